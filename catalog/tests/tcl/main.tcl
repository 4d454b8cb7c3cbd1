gets stdin line
puts [expr {[string trim $line] * 2}]
foreach a $argv {
    puts $a
}
puts stderr "conformance-stderr"
exit 3
