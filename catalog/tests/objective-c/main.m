#import <objc/Object.h>
#include <stdio.h>

@interface Doubler : Object
+ (long)twice:(long)n;
@end

@implementation Doubler
+ (long)twice:(long)n { return n * 2; }
@end

int main(int argc, char **argv) {
    long n;
    if (scanf("%ld", &n) != 1) return 1;
    printf("%ld\n", [Doubler twice:n]);
    for (int i = 1; i < argc; i++) puts(argv[i]);
    fputs("conformance-stderr\n", stderr);
    return 3;
}
