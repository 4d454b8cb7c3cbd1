my $n = $*IN.get.trim.Int;
say $n * 2;
.say for @*ARGS;
note "conformance-stderr";
exit 3;
