//! The disk journal: numbered, checksummed 4 KiB records appended to a block device with
//! O_DIRECT|O_DSYNC (a record counts as appended only once the device acknowledged it), and
//! verified from the start of the device at each boot.
//!
//! Record `n` lives at byte `n * 4096`: magic `TERNJRN1`, seq (u64 LE), guest monotonic ns,
//! 16-byte boot id, a payload derived from seq, and FNV-1a 64 of everything before it in the
//! last 8 bytes. The journal ends at the first block without the magic.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::fnv1a64;

/// Size of one record (and the O_DIRECT alignment).
pub const RECORD_BYTES: usize = 4096;
const MAGIC: &[u8; 8] = b"TERNJRN1";
const SUM_AT: usize = RECORD_BYTES - 8;
/// Records appended per second unless told otherwise.
pub const DEFAULT_RATE_PER_S: u32 = 20;

#[repr(C, align(4096))]
struct Block([u8; RECORD_BYTES]);

/// Live counters, shared with the stats reply and the power-off path.
#[derive(Debug, Default)]
pub struct DiskState {
    pub verified: AtomicU64,
    pub appended: AtomicU64,
    pub errors: AtomicU64,
    /// Sequence number the next appended record gets.
    pub next_seq: AtomicU64,
    pub capacity_records: AtomicU64,
    /// Set once the journal that was on the device at start is verified.
    pub verified_at_start: AtomicBool,
    pub full: AtomicBool,
    /// Set to stop appending (power-off); the appender holds `write_lock` while writing.
    pub stop: AtomicBool,
    pub write_lock: Mutex<()>,
}

impl DiskState {
    /// The counters as a JSON object.
    pub fn to_json(&self, dev: &str) -> String {
        crate::json::JsonObject::new()
            .str("dev", dev)
            .u64("verified", self.verified.load(Ordering::Relaxed))
            .u64("appended", self.appended.load(Ordering::Relaxed))
            .u64("errors", self.errors.load(Ordering::Relaxed))
            .u64("next_seq", self.next_seq.load(Ordering::Relaxed))
            .u64(
                "capacity_records",
                self.capacity_records.load(Ordering::Relaxed),
            )
            .bool("full", self.full.load(Ordering::Relaxed))
            .finish()
    }

    /// Stops appending and waits for a write in flight to finish.
    pub fn stop_appending(&self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.write_lock.lock());
    }
}

/// What one block holds.
#[derive(Debug, PartialEq, Eq)]
enum BlockCheck {
    /// No magic: the journal ends here.
    End,
    Valid,
    Corrupt(&'static str),
}

fn payload_byte(seq: u64, i: usize) -> u8 {
    (seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> ((i % 8) * 8)) as u8 ^ (i as u8)
}

fn encode(block: &mut Block, seq: u64, guest_ns: u64, boot_id: &[u8; 16]) {
    let b = &mut block.0;
    b[0..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&guest_ns.to_le_bytes());
    b[24..40].copy_from_slice(boot_id);
    for (i, slot) in b[40..SUM_AT].iter_mut().enumerate() {
        *slot = payload_byte(seq, i);
    }
    let sum = fnv1a64(&b[..SUM_AT]);
    b[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
}

fn check(block: &Block, index: u64) -> BlockCheck {
    let b = &block.0;
    if &b[0..8] != MAGIC {
        return BlockCheck::End;
    }
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&b[SUM_AT..]);
    if fnv1a64(&b[..SUM_AT]) != u64::from_le_bytes(sum) {
        return BlockCheck::Corrupt("checksum mismatch");
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[8..16]);
    let seq = u64::from_le_bytes(seq);
    if seq != index {
        return BlockCheck::Corrupt("sequence number does not match position");
    }
    if b[40..SUM_AT]
        .iter()
        .enumerate()
        .any(|(i, &v)| v != payload_byte(seq, i))
    {
        return BlockCheck::Corrupt("payload differs");
    }
    BlockCheck::Valid
}

/// An open journal device.
pub struct Journal {
    file: File,
    path: PathBuf,
    boot_id: [u8; 16],
    started: Instant,
    state: Arc<DiskState>,
}

impl Journal {
    /// Opens `path` for direct, synchronous I/O (plain synchronous I/O where O_DIRECT is refused,
    /// e.g. tmpfs).
    pub fn open(path: &Path, boot_id: [u8; 16], state: Arc<DiskState>) -> io::Result<Self> {
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
        };
        let file = match open(libc::O_DIRECT | libc::O_DSYNC) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(libc::O_DSYNC),
            other => other,
        }
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
        let mut journal = Self {
            file,
            path: path.to_path_buf(),
            boot_id,
            started: Instant::now(),
            state,
        };
        let bytes = journal.file.seek(SeekFrom::End(0))?;
        journal
            .state
            .capacity_records
            .store(bytes / RECORD_BYTES as u64, Ordering::Relaxed);
        Ok(journal)
    }

    fn capacity(&self) -> u64 {
        self.state.capacity_records.load(Ordering::Relaxed)
    }

    /// Reads and checks every record from the start; numbering continues after the last one.
    pub fn verify_existing(&mut self) -> io::Result<()> {
        let mut block = Block([0; RECORD_BYTES]);
        let mut index = 0;
        while index < self.capacity() {
            self.file
                .read_exact_at(&mut block.0, index * RECORD_BYTES as u64)?;
            match check(&block, index) {
                BlockCheck::End => break,
                BlockCheck::Valid => {
                    self.state.verified.fetch_add(1, Ordering::Relaxed);
                }
                BlockCheck::Corrupt(why) => {
                    self.state.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "TERN-GUEST-ERROR disk {} record={index}: {why}",
                        self.path.display()
                    );
                }
            }
            index += 1;
        }
        self.state.next_seq.store(index, Ordering::Relaxed);
        self.state
            .full
            .store(index >= self.capacity(), Ordering::Relaxed);
        self.state.verified_at_start.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Appends the next record; returns false when the device is full or appending stopped.
    pub fn append(&mut self) -> io::Result<bool> {
        let _guard = self
            .state
            .write_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.state.stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let seq = self.state.next_seq.load(Ordering::Relaxed);
        if seq >= self.capacity() {
            self.state.full.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        let mut block = Block([0; RECORD_BYTES]);
        let guest_ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        encode(&mut block, seq, guest_ns, &self.boot_id);
        self.file
            .write_all_at(&block.0, seq * RECORD_BYTES as u64)?;
        self.state.next_seq.store(seq + 1, Ordering::Relaxed);
        self.state.appended.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Appends `rate_per_s` records a second until full or stopped.
    pub fn run(mut self, rate_per_s: u32) {
        let period = Duration::from_secs(1) / rate_per_s.max(1);
        let mut next = Instant::now();
        loop {
            match self.append() {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    let errors = self.state.errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if errors <= 20 {
                        eprintln!("TERN-GUEST-ERROR disk {} append: {e}", self.path.display());
                    }
                }
            }
            next += period;
            match next.checked_duration_since(Instant::now()) {
                Some(wait) => std::thread::sleep(wait),
                None => next = Instant::now(),
            }
        }
    }
}

/// Opens and verifies the journal now (so callers report ready after it), then appends on its
/// own thread.
pub fn start(path: &Path, rate_per_s: u32, boot_id: [u8; 16]) -> io::Result<Arc<DiskState>> {
    let state = Arc::new(DiskState::default());
    let mut journal = Journal::open(path, boot_id, state.clone())?;
    journal.verify_existing()?;
    std::thread::Builder::new()
        .name("disk".into())
        .spawn(move || journal.run(rate_per_s))?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(path: &Path) -> (Journal, Arc<DiskState>) {
        let state = Arc::new(DiskState::default());
        let mut j = Journal::open(path, [7; 16], state.clone()).expect("open journal");
        j.verify_existing().expect("verify journal");
        (j, state)
    }

    #[test]
    fn records_survive_reopen_and_corruption_is_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 16 * RECORD_BYTES]).expect("create disk");

        let (mut j, state) = journal(&path);
        assert_eq!(state.capacity_records.load(Ordering::Relaxed), 16);
        assert_eq!(state.verified.load(Ordering::Relaxed), 0);
        for _ in 0..5 {
            assert!(j.append().expect("append"));
        }
        drop(j);

        let (mut j, state) = journal(&path);
        assert_eq!(state.verified.load(Ordering::Relaxed), 5);
        assert_eq!(state.errors.load(Ordering::Relaxed), 0);
        assert_eq!(state.next_seq.load(Ordering::Relaxed), 5);
        while j.append().expect("append") {}
        assert!(state.full.load(Ordering::Relaxed));
        assert_eq!(state.appended.load(Ordering::Relaxed), 11);
        drop(j);

        // Flip a payload byte of record 3.
        let mut bytes = std::fs::read(&path).expect("read disk");
        bytes[3 * RECORD_BYTES + 100] ^= 0x40;
        std::fs::write(&path, &bytes).expect("write disk");
        let (_j, state) = journal(&path);
        assert_eq!(state.verified.load(Ordering::Relaxed), 15);
        assert_eq!(state.errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn stop_prevents_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 4 * RECORD_BYTES]).expect("create disk");
        let (mut j, state) = journal(&path);
        state.stop_appending();
        assert!(!j.append().expect("append"));
        assert_eq!(state.appended.load(Ordering::Relaxed), 0);
    }
}
