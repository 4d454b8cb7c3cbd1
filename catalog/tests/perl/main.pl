use strict;
use warnings;

my $n = <STDIN>;
chomp $n;
print $n * 2, "\n";
print "$_\n" for @ARGV;
print STDERR "conformance-stderr\n";
exit 3;
