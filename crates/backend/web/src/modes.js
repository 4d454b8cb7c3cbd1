// Syntax highlighting per catalogue language: CodeMirror's own language packages where there is
// one, its legacy stream modes otherwise, plain text for the few it has nothing for.
import { StreamLanguage } from "@codemirror/language";
import { python } from "@codemirror/lang-python";
import { javascript } from "@codemirror/lang-javascript";
import { cpp } from "@codemirror/lang-cpp";
import { java } from "@codemirror/lang-java";
import { rust } from "@codemirror/lang-rust";
import { php } from "@codemirror/lang-php";
import { go } from "@codemirror/lang-go";
import { sql, SQLite } from "@codemirror/lang-sql";
import * as clike from "@codemirror/legacy-modes/mode/clike";
import { oCaml, sml } from "@codemirror/legacy-modes/mode/mllike";
import { brainfuck } from "@codemirror/legacy-modes/mode/brainfuck";
import { clojure } from "@codemirror/legacy-modes/mode/clojure";
import { cobol } from "@codemirror/legacy-modes/mode/cobol";
import { coffeeScript } from "@codemirror/legacy-modes/mode/coffeescript";
import { commonLisp } from "@codemirror/legacy-modes/mode/commonlisp";
import { crystal } from "@codemirror/legacy-modes/mode/crystal";
import { d } from "@codemirror/legacy-modes/mode/d";
import { erlang } from "@codemirror/legacy-modes/mode/erlang";
import { forth } from "@codemirror/legacy-modes/mode/forth";
import { fortran } from "@codemirror/legacy-modes/mode/fortran";
import { gas } from "@codemirror/legacy-modes/mode/gas";
import { groovy } from "@codemirror/legacy-modes/mode/groovy";
import { haskell } from "@codemirror/legacy-modes/mode/haskell";
import { lua } from "@codemirror/legacy-modes/mode/lua";
import { octave } from "@codemirror/legacy-modes/mode/octave";
import { pascal } from "@codemirror/legacy-modes/mode/pascal";
import { perl } from "@codemirror/legacy-modes/mode/perl";
import { r } from "@codemirror/legacy-modes/mode/r";
import { ruby } from "@codemirror/legacy-modes/mode/ruby";
import { scheme } from "@codemirror/legacy-modes/mode/scheme";
import { shell } from "@codemirror/legacy-modes/mode/shell";
import { tcl } from "@codemirror/legacy-modes/mode/tcl";
import { verilog } from "@codemirror/legacy-modes/mode/verilog";
import { vb } from "@codemirror/legacy-modes/mode/vb";

const legacy = (mode) => () => StreamLanguage.define(mode);

// Catalogue name → a function making the editor extension. A language missing here (a name
// added to the catalogue later) is edited as plain text.
const MODES = {
  ada: null,
  awk: legacy(shell),
  bash: legacy(shell),
  basic: legacy(vb),
  brainfuck: legacy(brainfuck),
  c: () => cpp(),
  clojure: legacy(clojure),
  cobol: legacy(cobol),
  coffeescript: legacy(coffeeScript),
  cpp: () => cpp(),
  crystal: legacy(crystal),
  csharp: legacy(clike.csharp),
  d: legacy(d),
  dash: legacy(shell),
  elixir: legacy(ruby),
  emacs: legacy(commonLisp),
  erlang: legacy(erlang),
  forth: legacy(forth),
  fortran: legacy(fortran),
  go: () => go(),
  groovy: legacy(groovy),
  haskell: legacy(haskell),
  java: () => java(),
  javascript: () => javascript(),
  kotlin: legacy(clike.kotlin),
  lisp: legacy(commonLisp),
  llvm_ir: null,
  lua: legacy(lua),
  nasm: legacy(gas),
  nim: () => python(),
  "objective-c": legacy(clike.objectiveC),
  ocaml: legacy(oCaml),
  octave: legacy(octave),
  pascal: legacy(pascal),
  perl: legacy(perl),
  php: () => php({ plain: false }),
  prolog: null,
  pypy: () => python(),
  python: () => python(),
  r: legacy(r),
  racket: legacy(scheme),
  raku: legacy(perl),
  ruby: legacy(ruby),
  rust: () => rust(),
  scala: legacy(clike.scala),
  scheme: legacy(scheme),
  sml: legacy(sml),
  sqlite3: () => sql({ dialect: SQLite }),
  tcl: legacy(tcl),
  typescript: () => javascript({ typescript: true }),
  verilog: legacy(verilog),
};

/**
 * The editor extension for a catalogue language (an empty list: plain text). A variant entry
 * (`python-data`) takes its base language's (`python`).
 */
export function modeFor(language) {
  const make = language in MODES ? MODES[language] : MODES[language.split("-")[0]];
  return make ? make() : [];
}
