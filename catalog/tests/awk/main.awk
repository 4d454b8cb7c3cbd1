BEGIN {
    getline line < "/dev/stdin"
    print line * 2
    for (i = 1; i < ARGC; i++)
        print ARGV[i]
    print "conformance-stderr" > "/dev/stderr"
    exit 3
}
