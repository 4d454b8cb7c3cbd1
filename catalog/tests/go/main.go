package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

func main() {
	line, _ := bufio.NewReader(os.Stdin).ReadString('\n')
	n, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		os.Exit(1)
	}
	fmt.Println(n * 2)
	for _, a := range os.Args[1:] {
		fmt.Println(a)
	}
	fmt.Fprintln(os.Stderr, "conformance-stderr")
	os.Exit(3)
}
