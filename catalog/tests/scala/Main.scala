object Main {
  def main(args: Array[String]): Unit = {
    val n = scala.io.StdIn.readLine().trim.toLong
    println(n * 2)
    args.foreach(println)
    System.err.println("conformance-stderr")
    System.out.flush()
    sys.exit(3)
  }
}
