import std.conv : to;
import std.stdio;
import std.string : strip;

int main(string[] args)
{
    long n = readln().strip().to!long;
    writeln(n * 2);
    foreach (a; args[1 .. $])
        writeln(a);
    stderr.writeln("conformance-stderr");
    return 3;
}
