//! What Debian's maintainer scripts would have made, made without running them.
//!
//! The builder unpacks packages and never runs their scripts (they are programs from the
//! network and expect a live system). Some of what they do is needed for the image to work:
//!
//! - **Alternatives links** (`/usr/bin/php` → `php8.2`, `/usr/bin/awk` → `gawk`,
//!   `/usr/bin/fpc`, `/usr/bin/lua`, ...). [`parse_postinst`] reads the `update-alternatives
//!   --install LINK NAME PATH PRIORITY [--slave LINK NAME PATH]...` commands of a postinst
//!   script with a small, bounded interpreter of the shell that such scripts use: plain
//!   assignments (`basedir=/usr/lib/jvm/...`), `for VAR in WORDS; do ... done` loops, `$VAR` and
//!   `${VAR}` expansion. Anything it cannot evaluate (command substitution, an unknown variable)
//!   drops that one command, never guesses. [`apply`] then does what `update-alternatives
//!   --auto` would: per group the highest priority whose target exists in the tree wins, and
//!   the link (and its slaves whose targets exist) are created unless the path is taken.
//! - **The CA bundle** `/etc/ssl/certs/ca-certificates.crt` (`update-ca-certificates`): every
//!   certificate under `/usr/share/ca-certificates`, concatenated in order (Debian's default
//!   `/etc/ca-certificates.conf` enables all of them).
//! - **The time zone** (`tzdata`'s debconf step): `/etc/localtime` → `Etc/UTC`, `/etc/timezone`.
//!
//! Other generated files are per language (the catalogue's `post_build`, e.g. `ghc-pkg recache`).

use std::collections::{BTreeMap, HashMap};

use super::tree::{components, Meta, Node, Tree, TreeError};

/// Longest postinst script read, in bytes (Debian's longest are a few tens of KiB).
pub const MAX_SCRIPT_BYTES: usize = 256 * 1024;
/// Most words one `for` loop may iterate over.
pub const MAX_LOOP_WORDS: usize = 256;
/// Deepest nesting of `for` loops followed.
pub const MAX_LOOP_DEPTH: usize = 4;
/// Most alternatives one script may declare.
pub const MAX_PER_SCRIPT: usize = 512;

/// One `update-alternatives --install` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alternative {
    pub link: String,
    pub name: String,
    pub path: String,
    pub priority: i64,
    /// `(link, path)` of each `--slave`.
    pub slaves: Vec<(String, String)>,
}

/// The alternatives a postinst script installs (see the module documentation).
pub fn parse_postinst(script: &str) -> Vec<Alternative> {
    if script.len() > MAX_SCRIPT_BYTES {
        return Vec::new();
    }
    let joined = script.replace("\\\n", " ");
    let statements: Vec<String> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .flat_map(split_statements)
        .filter(|s| !s.is_empty())
        .collect();
    let mut out = Vec::new();
    let mut vars = HashMap::new();
    run(&statements, &mut vars, &mut out, 0);
    out.truncate(MAX_PER_SCRIPT);
    out
}

/// Splits a line at `;` outside quotes (`;;` of `case` included).
fn split_statements(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    for c in line.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                cur.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                cur.push(c);
            }
            (None, ';') => out.push(std::mem::take(&mut cur).trim().to_string()),
            _ => cur.push(c),
        }
    }
    out.push(cur.trim().to_string());
    out
}

/// `None`: the value is unknown (set from something not evaluated).
type Vars = HashMap<String, Option<String>>;

fn run(stmts: &[String], vars: &mut Vars, out: &mut Vec<Alternative>, depth: usize) {
    let mut i = 0;
    while i < stmts.len() {
        let s = strip_keywords(&stmts[i]);
        if let Some(rest) = s.strip_prefix("for ") {
            // `for VAR in WORDS` [`do`] BODY `done`
            let end = matching_done(stmts, i);
            let header: Vec<&str> = rest.split_whitespace().collect();
            let mut body: Vec<String> = stmts[i + 1..end].to_vec();
            if body.first().map(|b| b.as_str()) == Some("do") {
                body.remove(0);
            } else if let Some(b) = body.first_mut() {
                if let Some(r) = b.strip_prefix("do ") {
                    *b = r.to_string();
                }
            }
            if depth < MAX_LOOP_DEPTH && header.len() >= 2 && header[1] == "in" {
                let words: Option<Vec<String>> = header[2..]
                    .iter()
                    .map(|w| expand(w, vars))
                    .collect::<Option<Vec<_>>>()
                    .map(|ws| ws.iter().flat_map(|w| split_words(w)).collect());
                if let Some(words) = words {
                    for w in words.into_iter().take(MAX_LOOP_WORDS) {
                        vars.insert(header[0].to_string(), Some(w));
                        run(&body, vars, out, depth + 1);
                    }
                }
                vars.insert(header[0].to_string(), None);
            }
            i = end + 1;
            continue;
        }
        if let Some((name, value)) = assignment(s) {
            let v = expand(&dequote(value), vars).filter(|v| !v.contains('`'));
            vars.insert(name.to_string(), v);
        } else if let Some(pos) = s.find("update-alternatives ") {
            if let Some(a) = install_command(&s[pos + "update-alternatives ".len()..], vars) {
                out.push(a);
            }
        }
        i += 1;
    }
}

/// Drops leading `then`, `else`, `do` and `CASE)` words that precede a command.
fn strip_keywords(s: &str) -> &str {
    let mut s = s.trim();
    loop {
        let next = ["then ", "else ", "do ", "elif "]
            .iter()
            .find_map(|k| s.strip_prefix(k));
        match next {
            Some(r) => s = r.trim_start(),
            None => break,
        }
    }
    if let Some((pat, rest)) = s.split_once(") ") {
        if !pat.contains(' ') && !pat.contains('(') && !pat.contains('$') {
            return rest.trim_start();
        }
    }
    s
}

/// The index of the `done` closing the `for` at `start` (the last statement if none).
fn matching_done(stmts: &[String], start: usize) -> usize {
    let mut depth = 0usize;
    for (j, s) in stmts.iter().enumerate().skip(start) {
        let s = strip_keywords(s);
        let first = s.split_whitespace().next().unwrap_or("");
        if matches!(first, "for" | "while" | "until") {
            depth += 1;
        }
        if first == "done" || s.ends_with(" done") {
            depth -= 1;
            if depth == 0 {
                return j;
            }
        }
    }
    stmts.len() - 1
}

fn assignment(s: &str) -> Option<(&str, &str)> {
    let s = s
        .strip_prefix("local ")
        .or_else(|| s.strip_prefix("export "))
        .or_else(|| s.strip_prefix("readonly "))
        .unwrap_or(s);
    let (name, value) = s.split_once('=')?;
    let ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    // A value with an unquoted space is `VAR=x command`: not an assignment we keep.
    (ok && (value.starts_with(['\'', '"']) || !value.contains(' '))).then_some((name, value))
}

fn dequote(v: &str) -> String {
    let v = v.trim();
    for q in ['\'', '"'] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return v[1..v.len() - 1].to_string();
        }
    }
    v.to_string()
}

/// Expands `$VAR` and `${VAR}`; `None` if a variable is unknown or the word substitutes a
/// command.
fn expand(word: &str, vars: &Vars) -> Option<String> {
    if word.contains("$(") || word.contains('`') {
        return None;
    }
    let mut out = String::new();
    let mut rest = word;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (name, tail) = if let Some(b) = after.strip_prefix('{') {
            let end = b.find('}')?;
            (&b[..end], &b[end + 1..])
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        out.push_str(vars.get(name)?.as_deref()?);
        rest = tail;
    }
    out.push_str(rest);
    Some(out)
}

fn split_words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// Shell words of a command line, quotes removed, up to a pipe, list or redirection operator.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    for w in shell_words(s) {
        if matches!(
            w.as_str(),
            "||" | "&&" | "|" | ">" | "2>" | ">/dev/null" | "2>/dev/null"
        ) || w.starts_with('>')
            || w.starts_with("2>")
        {
            break;
        }
        out.push(w);
    }
    out
}

fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    let mut any = false;
    for c in s.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (_, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn install_command(args: &str, vars: &Vars) -> Option<Alternative> {
    // Unquoted variables holding several words (`$slave1`) split into words.
    let mut ws: Vec<Option<String>> = Vec::new();
    for w in words(args) {
        match expand(&w, vars) {
            Some(e) if w.starts_with('$') && e.contains(' ') => {
                ws.extend(split_words(&e).into_iter().map(Some))
            }
            e => ws.push(e),
        }
    }
    let pos = ws.iter().position(|w| w.as_deref() == Some("--install"))?;
    let take = |i: usize| ws.get(i).cloned().flatten();
    let (link, name, path) = (take(pos + 1)?, take(pos + 2)?, take(pos + 3)?);
    let priority = take(pos + 4)?.parse().ok()?;
    if ![&link, &path].iter().all(|p| p.starts_with('/')) {
        return None;
    }
    let mut slaves = Vec::new();
    let mut i = pos + 5;
    while i < ws.len() {
        if ws[i].as_deref() == Some("--slave") {
            if let (Some(l), Some(_), Some(p)) = (take(i + 1), take(i + 2), take(i + 3)) {
                if l.starts_with('/') && p.starts_with('/') {
                    slaves.push((l, p));
                }
            }
            i += 4;
        } else {
            i += 1;
        }
    }
    Some(Alternative {
        link,
        name,
        path,
        priority,
        slaves,
    })
}

/// The tree path of an absolute path, with the merged-`/usr` rewrite.
fn tree_path(abs: &str) -> Option<Vec<Vec<u8>>> {
    let comps = components(abs.trim_start_matches('/').as_bytes()).ok()?;
    Some(super::tree::merge_usr(comps))
}

/// Creates the links of `alts` (see the module documentation); returns how many were made.
pub fn apply(tree: &mut Tree, alts: &[Alternative]) -> Result<usize, TreeError> {
    let mut groups: BTreeMap<&str, &Alternative> = BTreeMap::new();
    for a in alts {
        let Some(target) = tree_path(&a.path) else {
            continue;
        };
        if !tree.resolves(&target) {
            continue;
        }
        match groups.get(a.name.as_str()) {
            Some(best) if best.priority >= a.priority => {}
            _ => {
                groups.insert(&a.name, a);
            }
        }
    }
    let mut made = 0;
    for a in groups.values() {
        let links = std::iter::once((&a.link, &a.path)).chain(a.slaves.iter().map(|(l, p)| (l, p)));
        for (link, path) in links {
            let (Some(at), Some(target)) = (tree_path(link), tree_path(path)) else {
                continue;
            };
            if tree.get(&at).is_some() || !tree.resolves(&target) {
                continue;
            }
            tree.insert(
                &at,
                Node::Symlink {
                    meta: Meta::root(0o777),
                    target: path.as_bytes().to_vec(),
                },
                link,
            )?;
            made += 1;
        }
    }
    Ok(made)
}

/// Where `update-ca-certificates` writes its bundle.
pub const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
const CA_DIR: &str = "usr/share/ca-certificates";

/// Builds the CA bundle from the certificates in the tree (an empty file when there are none,
/// so programs that load it at start, like Debian's node, find it); returns how many went in.
pub fn ca_bundle(tree: &mut Tree) -> Result<usize, TreeError> {
    let mut pems = Vec::new();
    if let Some(dir) = tree.lookup(CA_DIR) {
        let mut stack = vec![(CA_DIR.to_string(), dir)];
        while let Some((path, node)) = stack.pop() {
            match node {
                Node::Dir { children, .. } => {
                    for (name, child) in children.iter().rev() {
                        stack.push((format!("{path}/{}", String::from_utf8_lossy(name)), child));
                    }
                }
                Node::File(inode) if path.ends_with(".crt") => pems.push(inode.data.clone()),
                _ => {}
            }
        }
    }
    let n = pems.len();
    if n == 0 && tree.lookup(CA_BUNDLE).is_some() {
        return Ok(0);
    }
    let mut bundle = Vec::new();
    for p in pems {
        bundle.extend_from_slice(&p);
        if !bundle.ends_with(b"\n") {
            bundle.push(b'\n');
        }
    }
    tree.insert_file(CA_BUNDLE, Meta::root(0o644), bundle)?;
    Ok(n)
}

/// The time zone every image has: UTC, as `tzdata` configures it when asked nothing.
pub fn timezone(tree: &mut Tree) -> Result<(), TreeError> {
    let zone = "usr/share/zoneinfo/Etc/UTC";
    if tree.lookup(zone).is_none() || tree.lookup("etc/localtime").is_some() {
        return Ok(());
    }
    tree.insert(
        &components(b"etc/localtime")?,
        Node::Symlink {
            meta: Meta::root(0o777),
            target: format!("/{zone}").into_bytes(),
        },
        "etc/localtime",
    )?;
    tree.insert_file("etc/timezone", Meta::root(0o644), b"Etc/UTC\n".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alt(link: &str, name: &str, path: &str, priority: i64) -> Alternative {
        Alternative {
            link: link.into(),
            name: name.into(),
            path: path.into(),
            priority,
            slaves: Vec::new(),
        }
    }

    #[test]
    fn plain_commands_with_slaves_and_continuations() {
        let s = "#!/bin/sh\nset -e\nupdate-alternatives --quiet --install /usr/bin/awk awk /usr/bin/gawk 10 \\\n  --slave /usr/share/man/man1/awk.1.gz awk.1.gz /usr/share/man/man1/gawk.1.gz \\\n  --slave /usr/bin/nawk nawk /usr/bin/gawk\n";
        let a = parse_postinst(s);
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].link.as_str(), a[0].priority), ("/usr/bin/awk", 10));
        assert_eq!(a[0].slaves.len(), 2);
        assert_eq!(
            a[0].slaves[1],
            ("/usr/bin/nawk".into(), "/usr/bin/gawk".into())
        );
    }

    #[test]
    fn variables_loops_and_case_arms() {
        // Shapes of php8.2-cli's, fp-compiler's and ghc's scripts.
        let s = r#"
LIB_DIR="/usr/lib/x86_64-linux-gnu/fpc"
execdir=/usr/bin
case "$1" in
    configure)
    for binary in php phar; do
        update-alternatives \
            --install /usr/bin/${binary} ${binary} /usr/bin/${binary}8.2 82 \
            --slave /usr/share/man/man1/${binary}.1.gz ${binary}.1.gz /usr/share/man/man1/${binary}8.2.1.gz
    done
    update-alternatives --install /usr/bin/fpc fpc /usr/bin/fpc-3.2.2 3020200 --slave /usr/bin/ppcx64 ppcx64 ${LIB_DIR}/3.2.2/ppcx64
	if $execdir/ghc --info | grep x >/dev/null ; then
            update-alternatives --install $execdir/runhaskell runhaskell $execdir/runghc 600
	fi
    update-alternatives --install /usr/bin/x x $(pwd)/x 1
    update-alternatives --install /usr/bin/y y $unknown/y 1
    ;;
esac
"#;
        let a = parse_postinst(s);
        let links: Vec<&str> = a.iter().map(|a| a.link.as_str()).collect();
        assert_eq!(
            links,
            [
                "/usr/bin/php",
                "/usr/bin/phar",
                "/usr/bin/fpc",
                "/usr/bin/runhaskell"
            ]
        );
        assert_eq!(a[1].path, "/usr/bin/phar8.2");
        assert_eq!(
            a[2].slaves,
            [(
                "/usr/bin/ppcx64".to_string(),
                "/usr/lib/x86_64-linux-gnu/fpc/3.2.2/ppcx64".to_string()
            )]
        );
        assert_eq!(a[3].path, "/usr/bin/runghc");
    }

    #[test]
    fn a_loop_over_a_variable_of_words() {
        let s = "basedir=/usr/lib/jvm/j\npriority=1711\njdk_tools='javac jar'\nfor i in $jdk_tools; do\n  update-alternatives --install /usr/bin/$i $i $basedir/bin/$i $priority\ndone\n";
        let a = parse_postinst(s);
        assert_eq!(a.len(), 2);
        assert_eq!(
            a[0],
            alt("/usr/bin/javac", "javac", "/usr/lib/jvm/j/bin/javac", 1711)
        );
    }

    #[test]
    fn hostile_scripts_stay_bounded() {
        // A loop over more words than the cap, nested deeper than the cap, and a huge script.
        let words: Vec<String> = (0..MAX_LOOP_WORDS * 4).map(|i| format!("w{i}")).collect();
        let s = format!(
            "for i in {}; do\nupdate-alternatives --install /usr/bin/$i $i /usr/bin/x 1\ndone\n",
            words.join(" ")
        );
        assert_eq!(parse_postinst(&s).len(), MAX_LOOP_WORDS);
        let mut deep = String::new();
        for d in 0..MAX_LOOP_DEPTH + 2 {
            deep.push_str(&format!("for v{d} in a b; do\n"));
        }
        deep.push_str("update-alternatives --install /usr/bin/y y /usr/bin/y 1\n");
        for _ in 0..MAX_LOOP_DEPTH + 2 {
            deep.push_str("done\n");
        }
        assert!(parse_postinst(&deep).is_empty(), "too deep: not followed");
        let big = "update-alternatives --install /usr/bin/z z /usr/bin/z 1\n"
            .repeat(MAX_SCRIPT_BYTES / 40);
        assert!(
            parse_postinst(&big).is_empty(),
            "over MAX_SCRIPT_BYTES: ignored"
        );
        let many =
            "update-alternatives --install /usr/bin/z z /usr/bin/z 1\n".repeat(MAX_PER_SCRIPT + 10);
        assert_eq!(parse_postinst(&many).len(), MAX_PER_SCRIPT);
    }

    #[test]
    fn highest_priority_with_an_existing_target_wins_and_nothing_is_overwritten() {
        let mut t = Tree::new();
        for f in ["usr/bin/gawk", "usr/bin/mawk", "usr/bin/sh-real"] {
            t.insert_file(f, Meta::root(0o755), b"x".to_vec())
                .expect("file");
        }
        t.insert_file("usr/bin/sh", Meta::root(0o755), b"x".to_vec())
            .expect("file");
        let alts = [
            alt("/usr/bin/awk", "awk", "/usr/bin/mawk", 5),
            alt("/usr/bin/awk", "awk", "/usr/bin/gawk", 10),
            alt("/usr/bin/awk", "awk", "/usr/bin/missing-awk", 100),
            alt("/usr/bin/sh", "sh", "/usr/bin/sh-real", 1),
            alt("/bin/ed", "ed", "/bin/missing", 1),
        ];
        assert_eq!(apply(&mut t, &alts).expect("apply"), 1);
        assert!(
            matches!(t.lookup("usr/bin/awk"), Some(Node::Symlink { target, .. }) if target == b"/usr/bin/gawk")
        );
        assert!(matches!(t.lookup("usr/bin/sh"), Some(Node::File(_))));
        assert!(t.lookup("usr/bin/ed").is_none());
    }

    #[test]
    fn ca_bundle_and_timezone() {
        let mut t = Tree::new();
        t.insert_file(
            "usr/share/ca-certificates/mozilla/A.crt",
            Meta::root(0o644),
            b"-----A-----".to_vec(),
        )
        .expect("file");
        t.insert_file(
            "usr/share/ca-certificates/mozilla/B.crt",
            Meta::root(0o644),
            b"-----B-----\n".to_vec(),
        )
        .expect("file");
        t.insert_file(
            "usr/share/zoneinfo/Etc/UTC",
            Meta::root(0o644),
            b"TZif".to_vec(),
        )
        .expect("file");
        assert_eq!(ca_bundle(&mut t).expect("bundle"), 2);
        match t.lookup(CA_BUNDLE) {
            Some(Node::File(i)) => assert_eq!(i.data, b"-----A-----\n-----B-----\n"),
            _ => panic!("no bundle"),
        }
        timezone(&mut t).expect("tz");
        assert!(matches!(
            t.lookup("etc/localtime"),
            Some(Node::Symlink { .. })
        ));
        let mut empty = Tree::new();
        assert_eq!(ca_bundle(&mut empty).expect("bundle"), 0);
        assert!(empty.lookup(CA_BUNDLE).is_some(), "a placeholder for node");
    }
}
