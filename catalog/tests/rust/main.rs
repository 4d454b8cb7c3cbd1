use std::io::BufRead;

fn main() {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    let n: i64 = line.trim().parse().unwrap();
    println!("{}", n * 2);
    for a in std::env::args().skip(1) {
        println!("{}", a);
    }
    eprintln!("conformance-stderr");
    std::process::exit(3);
}
