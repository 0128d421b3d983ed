//! The memory verifier: fills guest RAM with a per-page pattern, dirties it at a set rate and
//! keeps checking every page, so a migration that loses or corrupts a page is seen.
//!
//! Page layout (4 KiB, 512 words): word 0 is the page's version word
//! `SEED ^ page << 32 ^ generation`, rewritten each time the page is dirtied (one word per page
//! is enough to make the whole page dirty for migration); words 1..512 are fixed
//! `SEED ^ page << 20 ^ word * GOLDEN`. The expected generation of every page lives in a side
//! table. Writing and checking run on one thread, so a check never races a write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WORDS_PER_PAGE: usize = 512;
const PAGE_BYTES: u64 = 4096;
const PAGES_PER_MIB: u64 = 256;
const SEED: u64 = 0x7465_726e_6775_6573;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
const TICK: Duration = Duration::from_millis(10);
/// Errors printed one by one before the verifier only prints every 1000th.
const LOUD_ERRORS: u64 = 20;

#[repr(C, align(4096))]
struct Page([u64; WORDS_PER_PAGE]);

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemConfig {
    pub mib: u64,
    /// MiB dirtied per second (one word per 4 KiB page); 0 = idle.
    pub dirty_mib_s: u64,
    /// Share of each 10 ms tick spent verifying.
    pub verify_percent: u32,
}

/// Live counters, shared with the stats reply.
#[derive(Debug, Default)]
pub struct MemCounters {
    pub mib: AtomicU64,
    pub dirty_mib_s: AtomicU64,
    pub pages: AtomicU64,
    pub pages_verified: AtomicU64,
    /// Pages found different from what was last written (each is repaired and counted once).
    pub errors: AtomicU64,
    /// Complete verification passes over all pages.
    pub passes: AtomicU64,
    pub bytes_dirtied: AtomicU64,
    /// Set once the memory is filled.
    pub filled: AtomicBool,
}

impl MemCounters {
    /// The counters as a JSON object.
    pub fn to_json(&self) -> String {
        crate::json::JsonObject::new()
            .u64("mib", self.mib.load(Ordering::Relaxed))
            .u64("dirty_mib_s", self.dirty_mib_s.load(Ordering::Relaxed))
            .u64("pages", self.pages.load(Ordering::Relaxed))
            .u64(
                "pages_verified",
                self.pages_verified.load(Ordering::Relaxed),
            )
            .u64("errors", self.errors.load(Ordering::Relaxed))
            .u64("passes", self.passes.load(Ordering::Relaxed))
            .u64("bytes_dirtied", self.bytes_dirtied.load(Ordering::Relaxed))
            .bool("filled", self.filled.load(Ordering::Relaxed))
            .finish()
    }
}

/// The filled memory and the cursors that walk it.
pub struct MemVerifier {
    pages: Vec<Page>,
    generations: Vec<u32>,
    dirty_cursor: usize,
    verify_cursor: usize,
    counters: Arc<MemCounters>,
}

fn version_word(page: usize, generation: u32) -> u64 {
    SEED ^ ((page as u64) << 32) ^ u64::from(generation)
}

fn pattern_word(page: usize, word: usize) -> u64 {
    SEED ^ ((page as u64) << 20) ^ (word as u64).wrapping_mul(GOLDEN)
}

fn fill_page(page: &mut Page, index: usize, generation: u32) {
    page.0[0] = version_word(index, generation);
    for (w, slot) in page.0.iter_mut().enumerate().skip(1) {
        *slot = pattern_word(index, w);
    }
}

impl MemVerifier {
    /// Allocates `mib` MiB and writes the pattern into every page (touching all of it).
    pub fn fill(mib: u64, counters: Arc<MemCounters>) -> Self {
        let n = usize::try_from(mib * PAGES_PER_MIB).unwrap_or(usize::MAX);
        let mut pages = Vec::with_capacity(n);
        for i in 0..n {
            let mut page = Page([0; WORDS_PER_PAGE]);
            fill_page(&mut page, i, 0);
            pages.push(page);
        }
        counters.mib.store(mib, Ordering::Relaxed);
        counters.pages.store(n as u64, Ordering::Relaxed);
        counters.filled.store(true, Ordering::Relaxed);
        Self {
            pages,
            generations: vec![0; n],
            dirty_cursor: 0,
            verify_cursor: 0,
            counters,
        }
    }

    /// Dirties the next page (round robin) by bumping its version word.
    pub fn dirty_one(&mut self) {
        let n = self.pages.len();
        if n == 0 {
            return;
        }
        let i = self.dirty_cursor;
        self.dirty_cursor = (i + 1) % n;
        let generation = self.generations[i].wrapping_add(1);
        self.generations[i] = generation;
        self.pages[i].0[0] = version_word(i, generation);
        self.counters
            .bytes_dirtied
            .fetch_add(PAGE_BYTES, Ordering::Relaxed);
    }

    /// Verifies the next page (round robin); returns false (and repairs it) if it was wrong.
    pub fn verify_one(&mut self) -> bool {
        let n = self.pages.len();
        if n == 0 {
            return true;
        }
        let i = self.verify_cursor;
        self.verify_cursor = (i + 1) % n;
        // black_box: the compiler must read memory, not assume what this thread wrote.
        let page = std::hint::black_box(&self.pages[i]);
        let mut first_bad: Option<(usize, u64, u64)> = None;
        let mut bad_words = 0u64;
        let want0 = version_word(i, self.generations[i]);
        if page.0[0] != want0 {
            first_bad = Some((0, want0, page.0[0]));
            bad_words += 1;
        }
        for (w, &found) in page.0.iter().enumerate().skip(1) {
            let want = pattern_word(i, w);
            if found != want {
                bad_words += 1;
                first_bad.get_or_insert((w, want, found));
            }
        }
        self.counters.pages_verified.fetch_add(1, Ordering::Relaxed);
        if self.verify_cursor == 0 {
            self.counters.passes.fetch_add(1, Ordering::Relaxed);
        }
        let Some((word, want, found)) = first_bad else {
            return true;
        };
        let errors = self.counters.errors.fetch_add(1, Ordering::Relaxed) + 1;
        if errors <= LOUD_ERRORS || errors % 1000 == 0 {
            eprintln!(
                "TERN-GUEST-ERROR mem page={i} word={word} expected={want:016x} found={found:016x} \
                 bad_words={bad_words} errors_total={errors}"
            );
        }
        // Repair so one fault is counted once, not once per pass.
        let generation = self.generations[i];
        fill_page(&mut self.pages[i], i, generation);
        false
    }

    /// Dirties at `dirty_mib_s` and verifies for `verify_percent` of each tick, forever.
    pub fn run(mut self, dirty_mib_s: u64, verify_percent: u32) -> ! {
        let pages_per_s = dirty_mib_s * PAGES_PER_MIB;
        let budget = TICK * verify_percent.min(100) / 100;
        let start = Instant::now();
        let mut dirtied: u64 = 0;
        loop {
            let tick_start = Instant::now();
            if pages_per_s > 0 {
                let due =
                    (tick_start.duration_since(start).as_secs_f64() * pages_per_s as f64) as u64;
                // After a stall (guest starved of CPU) catch up at most one second's worth.
                dirtied = dirtied.max(due.saturating_sub(pages_per_s));
                while dirtied < due {
                    self.dirty_one();
                    dirtied += 1;
                }
            }
            if !budget.is_zero() {
                let verify_start = Instant::now();
                let mut n = 0u32;
                loop {
                    self.verify_one();
                    n += 1;
                    if n % 8 == 0 && verify_start.elapsed() >= budget {
                        break;
                    }
                }
            }
            if let Some(rest) = (tick_start + TICK).checked_duration_since(Instant::now()) {
                std::thread::sleep(rest);
            }
        }
    }
}

/// Fills the memory now (so callers can report ready after it) and runs the verifier on its own
/// thread.
pub fn start(config: MemConfig) -> std::io::Result<Arc<MemCounters>> {
    let counters = Arc::new(MemCounters::default());
    counters
        .dirty_mib_s
        .store(config.dirty_mib_s, Ordering::Relaxed);
    let verifier = MemVerifier::fill(config.mib, counters.clone());
    std::thread::Builder::new()
        .name("mem".into())
        .spawn(move || verifier.run(config.dirty_mib_s, config.verify_percent))?;
    Ok(counters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_memory_verifies_and_corruption_is_counted_once() {
        let counters = Arc::new(MemCounters::default());
        let mut v = MemVerifier::fill(1, counters.clone());
        assert_eq!(counters.pages.load(Ordering::Relaxed), 256);
        for _ in 0..100 {
            v.dirty_one();
        }
        for _ in 0..256 {
            assert!(v.verify_one());
        }
        assert_eq!(counters.passes.load(Ordering::Relaxed), 1);
        assert_eq!(counters.bytes_dirtied.load(Ordering::Relaxed), 100 * 4096);

        // A stray write to a pattern word, and a lost write (stale version word).
        v.pages[17].0[300] ^= 1;
        v.generations[40] += 1;
        let bad: Vec<usize> = (0..256).filter(|_| !v.verify_one()).collect();
        assert_eq!(bad, vec![17, 40]);
        assert_eq!(counters.errors.load(Ordering::Relaxed), 2);
        // Repaired: the next pass is clean.
        assert!((0..256).all(|_| v.verify_one()));
        assert_eq!(counters.errors.load(Ordering::Relaxed), 2);
        assert_eq!(counters.pages_verified.load(Ordering::Relaxed), 768);
    }
}
