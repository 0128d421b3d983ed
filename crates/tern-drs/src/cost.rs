//! Migration cost: how many bytes a live migration copies and how long it takes, from the
//! VM's memory size, its dirty rate and the migration bandwidth (a pre-copy model).
//!
//! Pre-copy sends all memory, then what the guest dirtied meanwhile, round after round,
//! until the rest fits in the downtime budget. Each round is `dirty / bandwidth` as long as
//! the previous one, so the total is about `memory / (1 - dirty / bandwidth)`. When the
//! rounds stop shrinking the migration throttles the guest (auto-converge): it still ends,
//! but the guest is slowed, so the cost is doubled.

use serde::{Deserialize, Serialize};

/// Estimated cost of one live migration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MigrationCost {
    /// Data sent over the migration network.
    pub copied_mib: f64,
    /// Wall time from start to switchover.
    pub duration_s: f64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// The guest dirties memory too fast to converge: it will be throttled.
    pub throttled: bool,
}

impl MigrationCost {
    /// MiB of copy the cost model charges: doubled when the guest must be throttled.
    pub fn charged_mib(&self) -> f64 {
        if self.throttled {
            2.0 * self.copied_mib
        } else {
            self.copied_mib
        }
    }
}

/// Estimates a migration of a `memory_mib` guest dirtying `dirty_mib_per_s`.
pub fn estimate(
    memory_mib: f64,
    dirty_mib_per_s: f64,
    bandwidth_mib_per_s: f64,
    max_downtime_ms: f64,
) -> MigrationCost {
    let bw = bandwidth_mib_per_s.max(1.0);
    let memory = memory_mib.max(0.0);
    let dirty = dirty_mib_per_s.max(0.0);
    let stop_mib = bw * max_downtime_ms.max(1.0) / 1000.0;
    let mut to_send = memory;
    let mut copied = 0.0;
    let mut duration = 0.0;
    let mut rounds = 0u32;
    let mut throttled = false;
    loop {
        rounds += 1;
        let t = to_send / bw;
        copied += to_send;
        duration += t;
        // What the guest dirtied during this round: never more than its memory.
        let dirtied = (dirty * t).min(memory);
        if dirtied <= stop_mib {
            // Final round happens with the guest paused.
            copied += dirtied;
            duration += dirtied / bw;
            break;
        }
        if dirtied >= 0.8 * to_send || rounds >= 30 {
            // Not converging: auto-converge throttles the guest; model one more full
            // round of the dirty set at the throttled (halved) rate, then switchover.
            throttled = true;
            copied += dirtied + stop_mib;
            duration += (dirtied + stop_mib) / bw;
            break;
        }
        to_send = dirtied;
    }
    MigrationCost {
        copied_mib: copied,
        duration_s: duration,
        rounds,
        throttled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_guest_copies_its_memory_once() {
        let c = estimate(8192.0, 0.0, 1024.0, 300.0);
        assert_eq!(c.rounds, 1);
        assert!((c.copied_mib - 8192.0).abs() < 1e-9);
        assert!((c.duration_s - 8.0).abs() < 1e-9);
        assert!(!c.throttled);
    }

    #[test]
    fn dirty_rate_adds_rounds_and_fast_dirtiers_throttle() {
        let slow = estimate(8192.0, 100.0, 1024.0, 300.0);
        let fast = estimate(8192.0, 300.0, 1024.0, 300.0);
        assert!(slow.copied_mib > 8192.0 && slow.rounds > 1);
        assert!(fast.copied_mib > slow.copied_mib);
        // Geometric bound: memory / (1 - d/b).
        assert!(slow.copied_mib < 8192.0 / (1.0 - 100.0 / 1024.0) + 1.0);
        let storm = estimate(8192.0, 2000.0, 1024.0, 300.0);
        assert!(storm.throttled);
        assert!(storm.charged_mib() > 2.0 * 8192.0);
    }
}
