//! `additional_files`: a zip the client sends (base64), unpacked into the job's files with
//! every entry checked: relative paths only (no `..`, no absolute, no backslash), no symbolic
//! links, no encryption, and caps on the entry count, each entry's size, the total and the
//! compression ratio. Sizes are measured while decompressing, never taken from the archive's
//! headers.

use std::io::Read;

use super::Judge0Config;
use crate::config::Limits;

/// Entries smaller than this are not held to the compression ratio (tiny files compress
/// absurdly well and cost nothing).
const RATIO_EXEMPT_BYTES: u64 = 4096;

#[derive(Clone, Debug)]
pub struct Caps {
    /// Files (directories not counted).
    pub max_entries: usize,
    /// Archive members of any kind, directories included (bounds the work on a hostile
    /// central directory).
    pub max_members: usize,
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
    pub max_ratio: u64,
}

impl Caps {
    pub fn from_config(j: &Judge0Config, l: &Limits) -> Caps {
        let total = (j.max_extract_size * 1024).min(l.max_code_bytes as u64);
        Caps {
            max_entries: j.max_additional_files,
            max_members: 4 * j.max_additional_files,
            max_file_bytes: total,
            max_total_bytes: total,
            max_ratio: j.max_compression_ratio,
        }
    }
}

/// The files in `zip`, in archive order, or why it is refused (a sentence for the client).
pub fn unpack(zip: &[u8], caps: &Caps) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip))
        .map_err(|e| format!("is not a valid zip archive ({e})"))?;
    if archive.len() > caps.max_members {
        return Err(format!(
            "has too many entries: {} (at most {})",
            archive.len(),
            caps.max_members
        ));
    }
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut total = 0u64;
    for i in 0..archive.len() {
        let mut f = archive
            .by_index(i)
            .map_err(|e| format!("has an unreadable entry ({e})"))?;
        let name = f.name().to_string();
        if f.encrypted() {
            return Err(format!("entry {name:?} is encrypted"));
        }
        if f.is_symlink() {
            return Err(format!("entry {name:?} is a symbolic link"));
        }
        if f.enclosed_name().is_none() || name.starts_with('/') {
            return Err(format!("entry {name:?} has an unsafe path"));
        }
        if f.is_dir() {
            continue;
        }
        if let Err(e) = cloude_protocol::validate_file_name(&name) {
            return Err(format!("entry {name:?} has an unsafe path ({e})"));
        }
        if out.len() == caps.max_entries {
            return Err(format!("has too many files (at most {})", caps.max_entries));
        }
        let room = caps
            .max_file_bytes
            .min(caps.max_total_bytes.saturating_sub(total));
        let mut data = Vec::new();
        (&mut f)
            .take(room + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("entry {name:?} cannot be unpacked ({e})"))?;
        let size = data.len() as u64;
        if size > caps.max_file_bytes {
            return Err(format!(
                "entry {name:?} is larger than {} bytes",
                caps.max_file_bytes
            ));
        }
        if size > room {
            return Err(format!(
                "unpacks to more than {} bytes",
                caps.max_total_bytes
            ));
        }
        if size > RATIO_EXEMPT_BYTES && size / f.compressed_size().max(1) > caps.max_ratio {
            return Err(format!(
                "entry {name:?} is compressed more than {}:1 (refused as a zip bomb)",
                caps.max_ratio
            ));
        }
        total += size;
        // `unzip -n`: a later entry with the same name does not replace the first.
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        out.push((name, data));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use super::*;
    use zip::write::SimpleFileOptions;

    /// A zip of `entries` (name, content), deflated.
    pub(crate) fn make_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            if name.ends_with('/') {
                w.add_directory(*name, opts).expect("dir");
            } else {
                w.start_file(*name, opts).expect("start");
                w.write_all(data).expect("write");
            }
        }
        w.finish().expect("finish").into_inner()
    }

    fn caps() -> Caps {
        Caps {
            max_entries: 3,
            max_members: 8,
            max_file_bytes: 100_000,
            max_total_bytes: 150_000,
            max_ratio: 100,
        }
    }

    #[test]
    fn unpacks_plain_files_and_directories() {
        let z = make_zip(&[("a.txt", b"A"), ("d/", b""), ("d/b.txt", b"B")]);
        let files = unpack(&z, &caps()).expect("ok");
        assert_eq!(
            files,
            vec![
                ("a.txt".into(), b"A".to_vec()),
                ("d/b.txt".into(), b"B".to_vec())
            ]
        );
    }

    #[test]
    fn refuses_unsafe_and_oversized_entries() {
        let c = caps();
        for bad in ["../x", "/etc/passwd", "a/../../x", "a\\b"] {
            let z = make_zip(&[(bad, b"x")]);
            let e = unpack(&z, &c).expect_err(bad);
            assert!(e.contains("unsafe path"), "{bad}: {e}");
        }
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        w.add_symlink("link", "/etc/passwd", SimpleFileOptions::default())
            .expect("symlink");
        let z = w.finish().expect("finish").into_inner();
        assert!(unpack(&z, &c).expect_err("link").contains("symbolic link"));

        let names: Vec<String> = (0..4).map(|i| format!("f{i}")).collect();
        let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
        assert!(unpack(&make_zip(&entries), &c)
            .expect_err("count")
            .contains("too many files"));
        let names: Vec<String> = (0..9).map(|i| format!("d{i}/")).collect();
        let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
        assert!(unpack(&make_zip(&entries), &c)
            .expect_err("members")
            .contains("too many entries"));

        // Random bytes do not compress: sizes are what they say.
        let noise: Vec<u8> = (0..110_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert!(unpack(&make_zip(&[("big", &noise)]), &c)
            .expect_err("file size")
            .contains("larger than"));
        let z = make_zip(&[("a", &noise[..80_000]), ("b", &noise[..80_000])]);
        assert!(unpack(&z, &c)
            .expect_err("total")
            .contains("more than 150000"));

        // A megabyte of zeros in about a kilobyte: a (small) zip bomb.
        let zeros = vec![0u8; 90_000];
        assert!(unpack(&make_zip(&[("z", &zeros)]), &c)
            .expect_err("ratio")
            .contains("zip bomb"));
        assert!(unpack(b"not a zip", &c)
            .expect_err("garbage")
            .contains("not a valid zip"));
    }
}
