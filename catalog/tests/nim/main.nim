import os, strutils

let n = parseInt(stdin.readLine().strip())
echo n * 2
for i in 1 .. paramCount():
  echo paramStr(i)
stderr.writeLine("conformance-stderr")
quit(3)
