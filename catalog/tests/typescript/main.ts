declare const require: (module: string) => any;
declare const process: { argv: string[]; exitCode?: number };

const fs = require("fs");
const line: string = fs.readFileSync(0, "utf8").split("\n")[0];
const n: number = parseInt(line, 10);
console.log(String(n * 2));
for (const a of process.argv.slice(2)) console.log(a);
console.error("conformance-stderr");
process.exitCode = 3;
