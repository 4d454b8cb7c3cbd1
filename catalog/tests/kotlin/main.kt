import kotlin.system.exitProcess

fun main(args: Array<String>) {
    val n = readLine()!!.trim().toLong()
    println(n * 2)
    for (a in args) println(a)
    System.err.println("conformance-stderr")
    System.out.flush()
    exitProcess(3)
}
