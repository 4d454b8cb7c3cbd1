// E2B's published JavaScript SDK (`e2b` on npm), unchanged, against a Cloude server.
// Usage: node run.mjs BASE_URL KEY   (BASE_URL like http://127.0.0.1:PORT/e2b; the SDK reads
// E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY, set here before it is loaded)
const [base, key] = process.argv.slice(2);
process.env.E2B_API_URL = base;
process.env.E2B_SANDBOX_URL = base;
process.env.E2B_API_KEY = key;
const { Sandbox, CommandExitError } = await import("e2b");

function check(cond, what) {
  if (!cond) throw new Error(`FAILED: ${what}`);
  console.log(`ok: ${what}`);
}

const sbx = await Sandbox.create({ timeoutMs: 120_000, envs: { WHO: "js" } });
check(sbx.sandboxId.startsWith("sbx_"), `create (${sbx.sandboxId})`);
const chunks = [];
const r = await sbx.commands.run("echo hi $WHO; echo oops >&2", { onStdout: (d) => chunks.push(d) });
check(r.exitCode === 0 && r.stdout === "hi js\n" && r.stderr === "oops\n", `commands.run (${JSON.stringify(r.stdout)})`);
check(chunks.join("") === "hi js\n", "onStdout");
try {
  await sbx.commands.run("exit 7");
  check(false, "a non-zero exit throws");
} catch (e) {
  check(e instanceof CommandExitError && e.exitCode === 7, `a non-zero exit throws CommandExitError (${e.exitCode})`);
}
await sbx.files.write("/home/user/js.txt", "from js\n");
check((await sbx.files.read("/home/user/js.txt")) === "from js\n", "files write and read");
check((await sbx.commands.run("cat js.txt")).stdout === "from js\n", "a command sees the file");
const entries = await sbx.files.list("/home/user");
check(entries.some((e) => e.name === "js.txt" && e.type === "file"), "files.list");
await sbx.kill();
check(!(await sbx.isRunning()), "kill: the sandbox is gone");
check((await Sandbox.kill(sbx.sandboxId)) === false, "kill again -> false");
console.log("all ok");
