#include <iostream>
#include <string>

int main(int argc, char **argv) {
    long n;
    std::cin >> n;
    std::cout << n * 2 << '\n';
    for (int i = 1; i < argc; i++) std::cout << argv[i] << '\n';
    std::cerr << "conformance-stderr" << std::endl;
    return 3;
}
