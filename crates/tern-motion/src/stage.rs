//! The stages a migration's driver goes through, in order, and the task progress each stands
//! for — so progress is a property of where the migration is, not a number at each call site.

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stage {
    /// Pre-checks run; nothing has been touched.
    Prechecks,
    /// The ownership intent is being recorded.
    Intent,
    /// Dirty rate and link are measured while the destination starts.
    Measure,
    /// The destination is configured and starts listening.
    Prepare,
    /// Pre-copy runs: `sent` bytes so far, `remaining` still dirty.
    Precopy { sent: u64, remaining: u64 },
    /// The guest is paused for the final copy.
    Switchover,
    /// The hand-over is being committed (after post-copy: until the store takes it).
    Commit,
}

/// Progress at the start of pre-copy and the most pre-copy alone can reach.
const PRECOPY_FROM: u8 = 12;
const PRECOPY_TO: u8 = 88;

impl Stage {
    /// Task progress in percent: rises with the stages, pre-copy by the share of bytes sent.
    pub fn progress(&self) -> u8 {
        match *self {
            Stage::Prechecks => 2,
            Stage::Intent => 5,
            Stage::Measure => 8,
            Stage::Prepare => 10,
            Stage::Precopy { sent, remaining } => {
                let total = sent.saturating_add(remaining);
                let share = if total == 0 {
                    0.0
                } else {
                    sent as f64 / total as f64
                };
                let span = f64::from(PRECOPY_TO - PRECOPY_FROM);
                PRECOPY_FROM + (share * span).round().clamp(0.0, span) as u8
            }
            Stage::Switchover => 90,
            Stage::Commit => 95,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_rises_through_the_stages() {
        let order = [
            Stage::Prechecks,
            Stage::Intent,
            Stage::Measure,
            Stage::Prepare,
            Stage::Precopy {
                sent: 0,
                remaining: 100,
            },
            Stage::Precopy {
                sent: 50,
                remaining: 50,
            },
            Stage::Precopy {
                sent: 100,
                remaining: 0,
            },
            Stage::Switchover,
            Stage::Commit,
        ];
        for w in order.windows(2) {
            assert!(
                w[0].progress() < w[1].progress(),
                "{:?} {} vs {:?} {}",
                w[0],
                w[0].progress(),
                w[1],
                w[1].progress()
            );
        }
        assert!(Stage::Commit.progress() < 100, "100 is for the end only");
    }

    #[test]
    fn precopy_stays_in_its_band_whatever_qemu_reports() {
        for (sent, remaining) in [(0, 0), (u64::MAX, u64::MAX), (u64::MAX, 0), (0, u64::MAX)] {
            let p = Stage::Precopy { sent, remaining }.progress();
            assert!(
                (PRECOPY_FROM..=PRECOPY_TO).contains(&p),
                "{sent} {remaining}: {p}"
            );
        }
    }
}
