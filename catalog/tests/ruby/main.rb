n = $stdin.gets.to_i
puts n * 2
ARGV.each { |a| puts a }
$stderr.puts "conformance-stderr"
exit 3
