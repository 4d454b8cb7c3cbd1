//! The snapshot's memory file: written sparse, mapped back copy-on-write.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

/// Pages are compared with zero and written in this unit.
pub const PAGE: usize = 4096;
/// Longest run of non-zero pages written by one `pwrite`.
const MAX_RUN: usize = 1 << 20;

/// True when every byte of `page` is zero.
fn is_zero(page: &[u8]) -> bool {
    // SAFETY: reinterpreting initialised bytes as u64 words is valid for any bit pattern;
    // align_to keeps the unaligned head and tail as bytes.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Writes the runs of non-zero pages of `data` at `base` in `file` (zero pages stay holes).
/// Returns the bytes written.
pub fn write_sparse_slice(file: &File, base: u64, data: &[u8]) -> std::io::Result<u64> {
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut flush = |from: usize, to: usize| -> std::io::Result<()> {
        file.write_all_at(&data[from..to], base + from as u64)?;
        written += (to - from) as u64;
        Ok(())
    };
    let mut off = 0;
    while off < data.len() {
        let end = (off + PAGE).min(data.len());
        let zero = is_zero(&data[off..end]);
        match (run_start, zero) {
            (None, false) => run_start = Some(off),
            (Some(s), true) => {
                flush(s, off)?;
                run_start = None;
            }
            (Some(s), false) if off - s >= MAX_RUN => {
                flush(s, off)?;
                run_start = Some(off);
            }
            _ => {}
        }
        off = end;
    }
    if let Some(s) = run_start {
        flush(s, data.len())?;
    }
    Ok(written)
}

/// Writes all guest RAM into `file` (created empty by the caller): regions one after another in
/// guest-physical order, zero pages as holes, length = guest memory size; then fsyncs it.
/// The guest must not run and no device may touch guest memory meanwhile.
pub fn write_memory(mem: &GuestMemoryMmap, file: &File) -> std::io::Result<u64> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total)?;
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // SAFETY: `host` is the start of this region's mapping, valid for `len` bytes for the
        // life of the process; every vCPU is paused and every device is locked, so nothing
        // writes to guest memory while the slice is read.
        let data = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        written += write_sparse_slice(file, offset, data)?;
        offset += len as u64;
    }
    file.sync_all()?;
    Ok(written)
}

/// Maps `len` bytes of `file` at `offset` privately (copy-on-write: the guest's writes stay in
/// this process; unmodified pages are shared through the page cache). `file` may be read-only.
/// The mapping is never unmapped (one VM per process).
pub fn map_private(file: &File, offset: u64, _gpa: u64, len: usize) -> std::io::Result<MmapRegion> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
    let off = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::other("memory file offset overflows"))?;
    // SAFETY: a fresh mapping at an address the kernel chooses; nothing is replaced. A private
    // mapping of a read-only descriptor may be writable (writes never reach the file).
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            flags,
            file.as_raw_fd(),
            off,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: [base, base + len) is a valid read/write mapping made above that lives as long as
    // the process.
    unsafe {
        MmapRegionBuilder::new(len)
            .with_mmap_prot(prot)
            .with_mmap_flags(flags)
            .with_raw_mmap_pointer(base.cast::<u8>())
    }
    .build()
    .map_err(|e| std::io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zero_pages_become_holes() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("memory");
        let f = File::create(&path).expect("create");
        let mut data = vec![0u8; 64 * PAGE];
        data[5 * PAGE + 7] = 1;
        data[40 * PAGE] = 2;
        data[41 * PAGE + PAGE - 1] = 3;
        f.set_len(data.len() as u64).expect("len");
        let n = write_sparse_slice(&f, 0, &data).expect("write");
        assert_eq!(n, 3 * PAGE as u64);
        f.sync_all().expect("sync");
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(meta.len(), data.len() as u64);
        // tmpfs and ext4 both allocate only what was written (some filesystems round up).
        assert!(
            meta.blocks() * 512 < data.len() as u64 / 2,
            "{} blocks",
            meta.blocks()
        );
        assert_eq!(std::fs::read(&path).expect("read"), data);
        let ro = File::open(&path).expect("open ro");
        let r = map_private(&ro, 0, 0, data.len()).expect("map");
        // SAFETY: the mapping is `data.len()` bytes, readable and writable, and ours.
        unsafe {
            assert_eq!(*r.as_ptr().add(40 * PAGE), 2);
            *r.as_ptr() = 9;
        }
        assert_eq!(
            std::fs::read(&path).expect("read")[0],
            0,
            "private writes stay private"
        );
    }
}
