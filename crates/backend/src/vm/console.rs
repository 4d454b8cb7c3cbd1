//! The guest console, bounded: the hypervisor writes the guest's serial output (and its own
//! messages) into a pipe; a small thread per VM copies it into the VM's `console.log`, which
//! keeps only the newest output — between half and all of `[vm] console_bytes` — so a guest that
//! floods its console (guest root can write to ttyS0 for ever) costs bounded disk (often tmpfs,
//! i.e. RAM), and error messages still quote the end of what the guest said.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default of `[vm] console_bytes` (and for drivers built without a configuration).
pub const DEFAULT_CONSOLE_BYTES: u64 = 1 << 20;
/// Smallest console ring the configuration accepts.
pub const MIN_CONSOLE_BYTES: u64 = 64 * 1024;
/// Written at the start of `console.log` once older output has been dropped.
const DROPPED: &[u8] = b"[cloude: older console output dropped]\n";

/// `console.log` as a ring: appends, and when the next write would pass the limit, keeps only the
/// newest half.
struct Ring {
    file: File,
    len: u64,
    limit: u64,
}

impl Ring {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        let half = self.limit / 2;
        let room = (half - DROPPED.len() as u64) as usize;
        if data.len() > room {
            // One write larger than the kept half: only its end survives.
            self.file.set_len(0)?;
            self.file.write_all_at(DROPPED, 0)?;
            self.file
                .write_all_at(&data[data.len() - room..], DROPPED.len() as u64)?;
            self.len = half;
            return Ok(());
        }
        if self.len + data.len() as u64 > self.limit {
            let keep = self.len.min(half - DROPPED.len() as u64);
            let mut tail = vec![0u8; keep as usize];
            self.file.read_exact_at(&mut tail, self.len - keep)?;
            self.file.set_len(0)?;
            self.file.write_all_at(DROPPED, 0)?;
            self.file.write_all_at(&tail, DROPPED.len() as u64)?;
            self.len = DROPPED.len() as u64 + keep;
        }
        self.file.write_all_at(data, self.len)?;
        self.len += data.len() as u64;
        Ok(())
    }
}

/// The copying thread of one VM's console.
pub struct Pump {
    thread: Option<JoinHandle<()>>,
    /// The ring's file, for reading its end (never reopened by path: the VM's directory is its
    /// hypervisor's to change).
    log: File,
}

impl Pump {
    /// Creates `path` and a pipe into it; returns the pump and the pipe's write end (for the
    /// hypervisor's stdout and stderr). The pump ends when every write end is closed.
    pub fn start(path: &Path, limit: u64) -> std::io::Result<(Pump, std::io::PipeWriter)> {
        // Read access too: a compaction reads the newest half back.
        let file = super::hostile::create_new(path)?;
        let log = file.try_clone()?;
        let (mut reader, writer) = std::io::pipe()?;
        let mut ring = Ring {
            file,
            len: 0,
            limit: limit.max(MIN_CONSOLE_BYTES),
        };
        let thread = std::thread::Builder::new()
            .name("cloude-console".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut failed = false;
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        // After a write error (disk full) keep draining so the guest never
                        // blocks on its console.
                        Ok(n) if !failed => failed = ring.write(&buf[..n]).is_err(),
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            })?;
        Ok((
            Pump {
                thread: Some(thread),
                log,
            },
            writer,
        ))
    }

    /// The last `max` bytes of the console, read through the ring's own descriptor.
    pub fn tail(&self, max: u64) -> String {
        super::hostile::tail(&self.log, max)
    }

    /// After the hypervisor exited: waits (at most `max`) until everything it wrote is in the
    /// file, so that error messages quote its last words.
    pub async fn settle(&self, max: Duration) {
        let until = Instant::now() + max;
        while let Some(t) = &self.thread {
            if t.is_finished() || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        // The thread ends by itself at EOF; never block a drop on it.
        self.thread.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn a_flood_keeps_the_newest_output_within_the_limit() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("console.log");
        let limit = MIN_CONSOLE_BYTES;
        let (pump, mut w) = Pump::start(&path, limit).expect("pump");
        let mut largest = 0;
        for i in 0..20_000u32 {
            writeln!(w, "line {i:08} of a console flood").expect("write");
            if i % 500 == 0 {
                largest = largest.max(std::fs::metadata(&path).expect("meta").len());
            }
        }
        writeln!(w, "the last words").expect("write");
        drop(w);
        pump.settle(Duration::from_secs(5)).await;
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(largest <= limit && text.len() as u64 <= limit, "{largest}");
        assert!(text.len() as u64 >= limit / 2 - 64, "{}", text.len());
        assert!(text.starts_with("[cloude: older console output dropped]\n"));
        assert!(
            text.ends_with("line 00019999 of a console flood\nthe last words\n"),
            "{:?}",
            &text[text.len().saturating_sub(200)..]
        );
        assert!(!text.contains("line 00000000"));
    }

    #[test]
    fn one_write_larger_than_the_ring_keeps_its_end() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("console.log");
        let mut ring = Ring {
            file: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .expect("file"),
            len: 0,
            limit: 1000,
        };
        ring.write(b"start\n").expect("write");
        let big: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
        ring.write(&big).expect("write");
        let got = std::fs::read(&path).expect("read");
        assert!(got.len() <= 1000);
        assert!(got.ends_with(&big[big.len() - (500 - DROPPED.len())..]));
        assert!(got.starts_with(DROPPED));
    }

    #[tokio::test]
    async fn quiet_console_is_kept_whole() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("console.log");
        let (pump, mut w) = Pump::start(&path, 1 << 20).expect("pump");
        w.write_all(b"Linux version 6.1\nCLOUDE-READY 1\n")
            .expect("write");
        drop(w);
        pump.settle(Duration::from_secs(5)).await;
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "Linux version 6.1\nCLOUDE-READY 1\n"
        );
    }
}
