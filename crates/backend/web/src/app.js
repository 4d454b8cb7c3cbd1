// The page cloude-server serves at `/`: pick a language, write a program, run it in a fresh VM
// over `/v1/executions/ws` and watch its output arrive. Everything it loads comes from the server
// itself (no CDN); the server's Content-Security-Policy allows nothing else.
import { EditorView, keymap } from "@codemirror/view";
import { EditorState, Compartment, Prec } from "@codemirror/state";
import { basicSetup } from "codemirror";
import { indentWithTab } from "@codemirror/commands";
import { oneDark } from "@codemirror/theme-one-dark";
import { modeFor } from "./modes.js";
import { encodeShare, decodeShare } from "./share.js";

const $ = (id) => document.getElementById(id);
const ui = {
  language: $("language"),
  run: $("run"),
  stop: $("stop"),
  share: $("share"),
  shareLink: $("share-link"),
  stdin: $("stdin"),
  args: $("args"),
  interactive: $("interactive"),
  live: $("live"),
  liveInput: $("live-input"),
  eof: $("eof"),
  output: $("output"),
  status: $("status"),
  notice: $("notice"),
  timings: $("timings"),
};

// ---- the editor ----------------------------------------------------------------------------

const languageConf = new Compartment();
const themeConf = new Compartment();
const dark = window.matchMedia("(prefers-color-scheme: dark)");

const view = new EditorView({
  parent: $("editor"),
  state: EditorState.create({
    doc: "",
    extensions: [
      basicSetup,
      keymap.of([indentWithTab]),
      Prec.highest(
        keymap.of([
          { key: "Mod-Enter", run: () => (run(), true) },
          { key: "Escape", run: () => (active ? (stop(), true) : false) },
        ]),
      ),
      languageConf.of([]),
      themeConf.of(dark.matches ? oneDark : []),
      EditorView.contentAttributes.of({ "aria-label": "Code" }),
      // The editor's styles go in a <style> element, which the page's policy allows only with
      // the nonce the server put in this answer.
      EditorView.cspNonce.of(document.querySelector('meta[name="csp-nonce"]')?.content || ""),
    ],
  }),
});
dark.addEventListener("change", () =>
  view.dispatch({ effects: themeConf.reconfigure(dark.matches ? oneDark : []) }),
);

function setCode(code) {
  view.dispatch({ changes: { from: 0, to: view.state.doc.length, insert: code } });
}

// ---- languages and examples ----------------------------------------------------------------

let languages = []; // from /v1/languages
let examples = {}; // catalogue name → {code, stdin, args}
// What was in the editor, input and arguments for each language left: switching back brings it
// back; a language not seen yet starts from its example.
const drafts = {};
let current = null;

function say(text, kind = "error") {
  ui.notice.textContent = text;
  ui.notice.dataset.kind = kind;
  ui.notice.hidden = !text;
}

async function fetchJson(path) {
  let resp;
  try {
    resp = await fetch(path, { headers: { Accept: "application/json" } });
  } catch (e) {
    throw new Error("The server could not be reached; is cloude-server running?");
  }
  if (!resp.ok) {
    let message = `${resp.status} ${resp.statusText}`;
    try {
      message = (await resp.json()).message || message;
    } catch (e) {}
    throw new Error(`The server answered ${path} with an error: ${message}`);
  }
  return resp.json();
}

function chooseLanguage(name, { keepCode = false } = {}) {
  if (current !== null && current !== name) drafts[current] = currentProgram();
  current = name;
  ui.language.value = name;
  view.dispatch({ effects: languageConf.reconfigure(modeFor(name)) });
  if (keepCode) return;
  const p = drafts[name] || examples[name] || { code: "", stdin: "", args: [] };
  setCode(p.code);
  ui.stdin.value = p.stdin;
  ui.args.value = p.args.join("\n");
}

function loadFromFragment() {
  const shared = decodeShare(location.hash);
  if (!shared) return false;
  if (shared.error) {
    say(shared.error);
    return false;
  }
  if (!languages.some((l) => l.name === shared.language)) {
    say(`This link names a language this server does not have (${shared.language}); its code is shown as plain text.`);
    view.dispatch({ effects: languageConf.reconfigure([]) });
  } else {
    chooseLanguage(shared.language, { keepCode: true });
  }
  setCode(shared.code);
  ui.stdin.value = shared.stdin;
  ui.args.value = shared.args.join("\n");
  return true;
}

async function start() {
  try {
    [languages, examples] = await Promise.all([
      fetchJson("/v1/languages").then((l) => l.languages),
      fetchJson("/assets/examples.json").catch(() => ({})),
    ]);
  } catch (e) {
    say(e.message);
    ui.status.textContent = "Not connected";
    return;
  }
  languages.sort((a, b) => a.name.localeCompare(b.name));
  for (const l of languages) {
    const opt = document.createElement("option");
    opt.value = l.name;
    opt.textContent = `${l.name} ${l.version}`;
    ui.language.append(opt);
  }
  ui.language.disabled = false;
  ui.run.disabled = false;
  ui.share.disabled = false;
  if (!loadFromFragment()) {
    const first = languages.find((l) => l.name === "python") || languages[0];
    if (first) chooseLanguage(first.name);
  }
  ui.status.textContent = "Ready";
  view.focus();
}

ui.language.addEventListener("change", () => chooseLanguage(ui.language.value));
window.addEventListener("hashchange", loadFromFragment);

// ---- share ---------------------------------------------------------------------------------

ui.share.addEventListener("click", async () => {
  const hash = encodeShare(currentProgram());
  history.replaceState(null, "", hash);
  ui.shareLink.value = location.href;
  ui.shareLink.hidden = false;
  ui.shareLink.select();
  try {
    await navigator.clipboard.writeText(location.href);
    say("Link copied: it holds the program itself, nothing is stored on the server.", "info");
  } catch (e) {
    say("Copy the link above: it holds the program itself, nothing is stored on the server.", "info");
  }
});

function currentProgram() {
  return {
    language: ui.language.value,
    code: view.state.doc.toString(),
    stdin: ui.stdin.value,
    args: ui.args.value.split("\n").filter((a) => a !== ""),
  };
}

// ---- running -------------------------------------------------------------------------------

// The run in progress: its socket, whether a stage began (a VM is running the program) and
// whether its end (a result or an error) arrived. A run that ended lets go of the page at once,
// before its socket closes.
let active = null;

function running(on) {
  ui.run.disabled = on;
  ui.stop.disabled = !on;
  ui.language.disabled = on;
  ui.live.hidden = !(on && ui.interactive.checked);
  document.body.dataset.running = on ? "yes" : "no";
}

function finish(r) {
  r.finished = true;
  if (active === r) {
    active = null;
    running(false);
  }
}

function append(text, cls) {
  const last = ui.output.lastElementChild;
  if (last && last.className === cls) {
    last.textContent += text;
  } else {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = text;
    ui.output.append(span);
  }
  ui.output.scrollTop = ui.output.scrollHeight;
}

function run() {
  if (active || ui.run.disabled) return;
  const program = currentProgram();
  const request = { language: program.language, code: program.code };
  if (program.stdin) request.stdin = program.stdin;
  if (program.args.length) request.args = program.args;
  ui.output.replaceChildren();
  ui.timings.replaceChildren();
  ui.timings.hidden = true;
  delete ui.status.dataset.status;
  say("");
  ui.status.textContent = "Connecting…";
  const url = new URL("/v1/executions/ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  let ws;
  try {
    ws = new WebSocket(url);
  } catch (e) {
    say(`The page could not open a connection to the server: ${e.message}`);
    return;
  }
  const r = { ws, opened: false, started: false, finished: false };
  active = r;
  running(true);
  ws.onopen = () => {
    r.opened = true;
    ws.send(JSON.stringify(request));
    if (!ui.interactive.checked) ws.send(JSON.stringify({ type: "close_stdin" }));
    ui.status.textContent = "Waiting for a VM…";
  };
  ws.onmessage = (ev) => {
    let line;
    try {
      line = JSON.parse(ev.data);
    } catch (e) {
      return;
    }
    if (!r.finished) handle(r, line);
  };
  ws.onclose = () => {
    if (r.finished) return;
    finish(r);
    ui.status.textContent = "Disconnected";
    say(
      r.opened
        ? "The connection to the server was lost before the program finished (the server stopped or the network failed); its result is unknown."
        : "The server could not be reached; is cloude-server running?",
    );
  };
}

function handle(r, line) {
  switch (line.type) {
    case "stage":
      r.started = true;
      ui.status.textContent = line.stage === "compile" ? "Compiling…" : "Running…";
      break;
    case "output":
      append(line.data, `${line.stage === "compile" ? "compile " : ""}${line.stream}`);
      break;
    case "result":
      finish(r);
      showResult(line.result, r.started);
      break;
    case "error":
      finish(r);
      showError(line);
      break;
  }
}

const ERRORS = {
  saturated: (l) =>
    `The server is busy: every VM is in use and the queue is full. Try again in ${l.retry_after_s || 1} s.`,
  shutting_down: () => "The server is shutting down; try again when it is back.",
  unknown_language: (l) => `The server has no such language: ${l.message}`,
};

function showError(line) {
  ui.status.textContent = "Not run";
  const make = ERRORS[line.error];
  say(make ? make(line) : `The server refused the run: ${line.message}`);
}

function describe(r) {
  const l = r.limits || {};
  switch (r.status) {
    case "ok":
      if (r.signal) return `Killed by ${r.signal}${r.signal_number ? ` (${r.signal_number})` : ""}`;
      return `Exited with code ${r.exit_code}`;
    case "compile_error":
      return "Compilation failed";
    case "timeout":
      return `Timed out (the limit is ${l.timeout_ms} ms)`;
    case "cpu_limit":
      return `Used more CPU time than allowed (${l.cpu_limit_ms} ms)`;
    case "memory_limit":
      return `Ran out of memory (the limit is ${l.memory_mib} MiB)`;
    case "output_limit":
      return `Wrote more output than allowed (${l.output_limit_bytes} bytes)`;
    case "internal_error":
      return "The server could not run it";
    default:
      return r.status;
  }
}

const SOURCES = { cold: "booted for this run", snapshot: "restored from a snapshot", pool: "taken from the warm pool" };

function showResult(r, streamed) {
  ui.status.textContent = describe(r);
  ui.status.dataset.status = r.status === "ok" && r.exit_code === 0 ? "ok" : "bad";
  if (r.message) say(r.message, r.status === "internal_error" ? "error" : "info");
  if (!streamed && r.stdout + r.stderr) {
    // Output the socket did not stream (none is left out today; kept for older servers).
    append(r.stdout, "stdout");
    append(r.stderr, "stderr");
  }
  const t = r.timings || {};
  const rows = [
    ["Queue", `${t.queue_ms} ms`],
    ["VM", `${t.boot_ms} ms, ${SOURCES[t.vm_source] || t.vm_source}`],
  ];
  if (r.compile) rows.push(["Compile", `${r.compile.wall_ms} ms, ${r.compile.cpu_ms} ms CPU`]);
  rows.push(
    ["Run", `${t.run_ms} ms`],
    ["CPU time", `${r.cpu_ms} ms`],
    ["Memory", `${(r.memory_kib / 1024).toFixed(1)} MiB peak`],
    ["Total", `${t.total_ms} ms`],
    ["Runtime", `${r.language} ${r.version}`],
  );
  ui.timings.replaceChildren(
    ...rows.flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      return [dt, dd];
    }),
  );
  ui.timings.hidden = false;
}

function stop() {
  const r = active;
  if (!r) return;
  if (r.started && r.ws.readyState === WebSocket.OPEN) {
    // The program is running: kill it and let the result (its signal) arrive.
    r.ws.send(JSON.stringify({ type: "signal", signal: "SIGKILL" }));
    ui.status.textContent = "Stopping…";
  } else {
    finish(r);
    r.ws.close();
    ui.status.textContent = "Stopped before it started";
  }
}

ui.run.addEventListener("click", run);
ui.stop.addEventListener("click", stop);
ui.liveInput.addEventListener("keydown", (ev) => {
  if (ev.key !== "Enter" || !active || active.ws.readyState !== WebSocket.OPEN) return;
  ev.preventDefault();
  const data = ui.liveInput.value + "\n";
  active.ws.send(JSON.stringify({ type: "stdin", data }));
  append(data, "echo");
  ui.liveInput.value = "";
});
ui.eof.addEventListener("click", () => {
  if (active && active.ws.readyState === WebSocket.OPEN) {
    active.ws.send(JSON.stringify({ type: "close_stdin" }));
  }
  ui.live.hidden = true;
});

start();
