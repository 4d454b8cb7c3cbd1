read n
echo $((n * 2))
for a in "$@"; do
  echo "$a"
done
echo conformance-stderr >&2
exit 3
