create buf 80 allot

: main ( -- )
  buf 80 stdin read-line 2drop          \ the line's length
  buf swap s>number? 2drop              \ its number (single cell)
  2 * 0 .r cr
  argc @ 1 ?do i arg type cr loop
  s" conformance-stderr" stderr write-line drop
  3 (bye) ;

main
