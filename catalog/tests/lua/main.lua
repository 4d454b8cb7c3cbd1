local n = tonumber(io.read("l"))
print(math.tointeger(n * 2))
for i = 1, #arg do
  print(arg[i])
end
io.stderr:write("conformance-stderr\n")
os.exit(3)
