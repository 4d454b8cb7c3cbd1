package main

func main() {
	var n int = "not an int"
	_ = n
}
