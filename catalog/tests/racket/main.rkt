#lang racket/base
(define n (string->number (read-line)))
(displayln (* 2 n))
(for ([a (current-command-line-arguments)])
  (displayln a))
(eprintf "conformance-stderr\n")
(exit 3)
