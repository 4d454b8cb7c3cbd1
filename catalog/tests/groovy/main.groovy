def reader = new BufferedReader(new InputStreamReader(System.in))
def n = reader.readLine().trim() as long
println(n * 2)
args.each { println(it) }
System.err.println("conformance-stderr")
System.out.flush()
System.exit(3)
