const lines = require("fs").readFileSync(0, "utf8").split("\n");
const n = parseInt(lines[0], 10);
console.log(String(n * 2));
for (const a of process.argv.slice(2)) console.log(a);
console.error("conformance-stderr");
process.exitCode = 3;
