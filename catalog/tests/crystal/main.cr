n = gets.not_nil!.strip.to_i64
puts n * 2
ARGV.each { |a| puts a }
STDERR.puts "conformance-stderr"
exit 3
