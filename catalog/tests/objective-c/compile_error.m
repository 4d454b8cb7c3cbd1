#include <stdio.h>

int main(void) {
    int x = "not an int" * 2;
    return x
}
