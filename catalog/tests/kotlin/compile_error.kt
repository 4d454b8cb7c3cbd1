fun main(args: Array<String>) {
    val n: Int = "not an int"
    println(n)
}
