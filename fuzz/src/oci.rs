//! OCI layer flattening (`cloude_image::image::tree`) and the cpio writer behind it.
//!
//! Input layout: byte 0 holds flags (bit 0: merged-`/usr` rewriting, bit 1: whiteouts off);
//! bytes 1-2 are a little-endian length `n`; the rest is the first layer's first `n` bytes and,
//! if anything is left, a second layer applied on top. Errors are fine (a hostile layer must be
//! refused); panics are not, and whatever was applied must stay inside the root: no path is
//! absolute or has an empty, `.` or `..` component or a NUL byte. The flattened tree must then
//! survive the cpio round trip (every path written and read back, in order, with its data).

use cloude_image::image::cpio;
use cloude_image::image::tree::{ApplyOptions, Node, Tree};

/// Splits an input into options and one or two layers.
pub fn split(data: &[u8]) -> (ApplyOptions, &[u8], Option<&[u8]>) {
    let flags = data.first().copied().unwrap_or(0);
    let opts = ApplyOptions {
        whiteouts: flags & 2 == 0,
        merged_usr: flags & 1 == 1,
    };
    let n = usize::from(u16::from_le_bytes([
        data.get(1).copied().unwrap_or(0),
        data.get(2).copied().unwrap_or(0),
    ]));
    let body = data.get(3..).unwrap_or_default();
    let (first, rest) = body.split_at(n.min(body.len()));
    (opts, first, (!rest.is_empty()).then_some(rest))
}

/// The inverse of [`split`], for seeds and tests.
pub fn join(merged_usr: bool, first: &[u8], second: &[u8]) -> Vec<u8> {
    let n = u16::try_from(first.len()).expect("a seed layer under 64 KiB");
    let mut v = vec![u8::from(merged_usr)];
    v.extend(n.to_le_bytes());
    v.extend(first);
    v.extend(second);
    v
}

pub fn run(data: &[u8]) {
    let (opts, first, second) = split(data);
    let mut tree = Tree::new();
    if tree.apply_tar(first, opts).is_ok() {
        if let Some(second) = second {
            let _ = tree.apply_tar(second, opts);
        }
    }
    check_tree(&tree);
}

/// Asserts the escape invariants of every path and the cpio round trip.
pub fn check_tree(tree: &Tree) {
    let mut paths = Vec::new();
    let mut data = Vec::new();
    let mut inodes = std::collections::HashSet::new();
    tree.walk::<()>(&mut |path, node| {
        assert!(!path.is_empty(), "an empty path");
        assert!(!path.starts_with(b"/"), "absolute path {path:?}");
        assert!(!path.contains(&0), "NUL in {path:?}");
        for c in path.split(|b| *b == b'/') {
            assert!(
                !matches!(c, b"" | b"." | b".."),
                "path {:?} has an empty, `.` or `..` component",
                String::from_utf8_lossy(path)
            );
        }
        paths.push(String::from_utf8_lossy(path).into_owned());
        data.push(match node {
            // Hard links: the first name carries the data, later ones are empty.
            Node::File(i) if inodes.insert(i.id) => i.data.clone(),
            Node::Symlink { target, .. } => target.clone(),
            _ => Vec::new(),
        });
        Ok(())
    })
    .expect("the visitor never fails");

    let mut archive = Vec::new();
    let stats = cpio::write_tree(tree, &mut archive).expect("writing to memory");
    assert_eq!(stats.entries, paths.len() as u64, "entries written");
    let back = cpio::parse(&archive).expect("the writer's output parses");
    let names: Vec<&str> = back.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, paths, "names read back");
    for (e, d) in back.iter().zip(&data) {
        assert_eq!(&e.data, d, "data of {:?}", e.name);
    }
}
