read -r n
echo $((n * 2))
for a in "$@"; do
  printf '%s\n' "$a"
done
echo conformance-stderr >&2
exit 3
