using System;

public class Program
{
    public static int Main(string[] args)
    {
        long n = long.Parse(Console.ReadLine().Trim());
        Console.WriteLine(n * 2);
        foreach (string a in args)
            Console.WriteLine(a);
        Console.Error.WriteLine("conformance-stderr");
        return 3;
    }
}
