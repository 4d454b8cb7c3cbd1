import sys

n = int(sys.stdin.readline())
print(n * 2)
for a in sys.argv[1:]:
    print(a)
print("conformance-stderr", file=sys.stderr)
sys.exit(3)
