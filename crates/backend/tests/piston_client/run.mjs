// Usage: node run.mjs http://127.0.0.1:PORT
// Exercises the published `piston-client` package against Cloude's Piston v2 API.
// Prints one line per check and exits non-zero if any check fails.
import piston from "piston-client";

const server = process.argv[2];
const client = piston({ server });
let failed = 0;
let passed = 0;

function check(name, ok, detail) {
  console.log(`${ok ? "ok  " : "FAIL"} ${name}${ok ? "" : ": " + JSON.stringify(detail)}`);
  if (ok) passed++; else failed++;
}

const runtimes = await client.runtimes();
check("runtimes is an array with python", Array.isArray(runtimes) && runtimes.some(r => r.language === "python" && typeof r.version === "string" && Array.isArray(r.aliases)), runtimes);

const hello = await client.execute("python", 'import sys\nprint("hello from piston-client", sys.argv[1:])');
check("python run stdout (default args 1 2 3)", hello.run && hello.run.stdout === "hello from piston-client ['1', '2', '3']\n" && hello.run.code === 0 && hello.run.signal === null, hello);
check("response names language and version", hello.language === "python" && typeof hello.version === "string", hello);
check("run.output is stdout+stderr", hello.run && hello.run.output === hello.run.stdout + hello.run.stderr, hello);

const stdin = await client.execute("python", "print(input()[::-1])", { stdin: "olleh\n", args: [] });
check("stdin", stdin.run && stdin.run.stdout === "hello\n", stdin);

const bad = await client.execute("python", "import sys\nsys.stderr.write('boom\\n')\nsys.exit(3)", { args: [] });
check("stderr and exit code", bad.run && bad.run.stderr === "boom\n" && bad.run.code === 3 && bad.run.status === "RE", bad);

const cc = await client.execute("c", "int main( { return 0; }", { args: [] });
check("C compile error has a compile stage", cc.compile && cc.compile.code !== 0 && cc.compile.stderr.includes("error"), cc);

const c = await client.execute("c", '#include <stdio.h>\nint main(int c, char **v) { printf("%s\\n", v[1]); return 0; }', { args: ["arg-one"] });
check("C compiles and runs with args", c.compile && c.compile.code === 0 && c.run && c.run.stdout === "arg-one\n", c);

const unknown = await client.execute({ language: "cobol", version: "1.0.0", files: [{ content: "x" }] });
check("unknown runtime message", unknown.message === "cobol-1.0.0 runtime is unknown", unknown);

console.log(`piston-client: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
