#include <stdio.h>

int main(int argc, char **argv) {
    long n;
    if (scanf("%ld", &n) != 1) return 1;
    printf("%ld\n", n * 2);
    for (int i = 1; i < argc; i++) puts(argv[i]);
    fputs("conformance-stderr\n", stderr);
    return 3;
}
