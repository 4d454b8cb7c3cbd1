//! The cpio newc reader (`cloude_image::image::cpio::parse`): never a panic on any bytes, and
//! what it returns is consistent with the input (no entry claims more data than there was).

use cloude_image::image::cpio;

pub fn run(data: &[u8]) {
    if let Ok(entries) = cpio::parse(data) {
        // A 110-byte header per entry, plus the trailer's.
        assert!(
            (entries.len() + 1) * 110 <= data.len(),
            "more entries than headers"
        );
        let bytes: usize = entries.iter().map(|e| e.data.len()).sum();
        assert!(
            bytes <= data.len(),
            "{bytes} bytes of data out of {}",
            data.len()
        );
    }
}
