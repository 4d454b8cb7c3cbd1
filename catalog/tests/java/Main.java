import java.io.BufferedReader;
import java.io.InputStreamReader;

public class Main {
    public static void main(String[] args) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        long n = Long.parseLong(in.readLine().trim());
        System.out.println(n * 2);
        for (String a : args) System.out.println(a);
        System.err.println("conformance-stderr");
        System.out.flush();
        System.exit(3);
    }
}
