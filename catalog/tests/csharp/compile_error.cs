public class Program
{
    public static void Main()
    {
        int n = "not an int";
    }
}
