fs = require 'fs'
n = parseInt fs.readFileSync(0, 'utf8').split('\n')[0], 10
console.log String(n * 2)
console.log a for a in process.argv[2..]
console.error 'conformance-stderr'
process.exitCode = 3
