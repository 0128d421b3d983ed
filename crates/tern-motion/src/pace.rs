//! The pace of a migration stream whose cap tern derived from its own link measurement,
//! re-judged from QEMU's transfer rate while the migration runs.
//!
//! The measurement before a migration takes a fraction of a second; a link that hiccups just
//! then (a cut, a burst of other traffic) reports a fraction of its speed, and a cap fixed from
//! it slows the whole migration: in the chaos runs a ~1 s migration paced at 4 MiB/s took 91 s
//! and throttled the guest to 2% of its work. The evidence that the measurement was wrong is
//! QEMU's own: a stream that runs *at* its cap is held back by tern, not by the link. The
//! [`Pacer`] then lifts the cap, watches what the link carries unpaced, and paces just above
//! that. A cap the user asked for is theirs and never changes.

use tern_api::migration::MigrationSettings;

use crate::converge::{Action, Decision, PrecopySample, SamplePhase};
use crate::settings::LINK_PACE;

/// Share of its cap at which a stream counts as held back by it. A correctly measured link
/// carries at most 1 / [`LINK_PACE`] (91%) of the cap derived from it.
pub const SATURATED_SHARE: f64 = 0.95;
/// How long the stream must run at its cap before the cap is lifted (socket buffers filling
/// can make a window or two look fast).
pub const SATURATED_MS: u64 = 1000;
/// ...and in at least this many samples.
pub const SATURATED_SAMPLES: u32 = 5;
/// How long the stream runs unpaced to show what the link carries.
pub const PROBE_MS: u64 = 1500;
/// Re-judgements per migration: a link whose speed keeps changing is left unpaced after this.
pub const MAX_REJUDGEMENTS: u32 = 3;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// The cap is the user's, or there is none: nothing to re-judge.
    Fixed,
    /// Paced at `cap_mib_s`, tern's own choice.
    Paced {
        cap_mib_s: u64,
        /// Since when (ms) and in how many samples the stream has run at its cap.
        saturated: Option<(u64, u32)>,
    },
    /// Unpaced since `since`, collecting the stream's rates (MiB/s) while data waits.
    Probing {
        since: u64,
        from_cap_mib_s: u64,
        rates: Vec<f64>,
    },
}

/// Re-judges a measured pace from QEMU's figures: see the module's documentation.
#[derive(Debug, Clone)]
pub struct Pacer {
    state: State,
    link_mbit: f64,
    rejudgements: u32,
}

impl Pacer {
    pub fn new(settings: &MigrationSettings) -> Self {
        let state = match (settings.paced_from_link_mbit, settings.max_bandwidth_mib_s) {
            (Some(_), Some(cap)) if cap > 0 => State::Paced {
                cap_mib_s: cap,
                saturated: None,
            },
            _ => State::Fixed,
        };
        Pacer {
            state,
            link_mbit: settings.paced_from_link_mbit.unwrap_or(0.0),
            rejudgements: 0,
        }
    }

    /// True while the stream runs unpaced to find the link's rate: its rate then says
    /// nothing about whether pre-copy converges.
    pub fn probing(&self) -> bool {
        matches!(self.state, State::Probing { .. })
    }

    /// Feeds one pre-copy sample taken `elapsed_ms` after the start; returns a new pace when
    /// one is due.
    pub fn observe(&mut self, elapsed_ms: u64, s: &PrecopySample) -> Option<Decision> {
        if s.phase != SamplePhase::PreCopy {
            return None;
        }
        let sent_mib_s = s.sent_mbit_s * 1e6 / 8.0 / MIB;
        match &mut self.state {
            State::Fixed => None,
            State::Paced {
                cap_mib_s,
                saturated,
            } => {
                let cap = *cap_mib_s;
                if sent_mib_s < cap as f64 * SATURATED_SHARE {
                    *saturated = None;
                    return None;
                }
                let (since, n) = saturated.get_or_insert((elapsed_ms, 0));
                *n += 1;
                if elapsed_ms.saturating_sub(*since) < SATURATED_MS || *n < SATURATED_SAMPLES {
                    return None;
                }
                let held_ms = elapsed_ms - *since;
                self.rejudgements += 1;
                self.state = State::Probing {
                    since: elapsed_ms,
                    from_cap_mib_s: cap,
                    rates: Vec::new(),
                };
                Some(Decision {
                    action: Action::SetBandwidth {
                        max_bandwidth_mib_s: None,
                    },
                    reason: format!(
                        "the stream has run at its {cap} MiB/s cap for {:.1} s: the link carries \
                         more than the {:.0} Mbit/s measured before the migration (that \
                         measurement was disturbed or the link got faster); lifting the cap for \
                         {:.1} s to see what it carries",
                        held_ms as f64 / 1000.0,
                        self.link_mbit,
                        PROBE_MS as f64 / 1000.0
                    ),
                })
            }
            State::Probing {
                since,
                from_cap_mib_s,
                rates,
            } => {
                // Near the end of a pass the stream slows for want of data, not of link.
                if s.remaining_bytes as f64 >= sent_mib_s * MIB * 0.2 {
                    rates.push(sent_mib_s);
                }
                if elapsed_ms.saturating_sub(*since) < PROBE_MS {
                    return None;
                }
                let from = *from_cap_mib_s;
                let carried = upper_median(rates);
                self.link_mbit = carried * 8.0 * MIB / 1e6;
                if self.rejudgements >= MAX_REJUDGEMENTS {
                    self.state = State::Fixed;
                    return Some(Decision {
                        action: Action::Note,
                        reason: format!(
                            "the link carried {carried:.0} MiB/s unpaced; its speed was \
                             re-judged {MAX_REJUDGEMENTS} times, so the stream stays unpaced"
                        ),
                    });
                }
                // Never below the cap the stream was already filling.
                let cap = ((carried * LINK_PACE).round() as u64).max(from + 1);
                self.state = State::Paced {
                    cap_mib_s: cap,
                    saturated: None,
                };
                Some(Decision {
                    action: Action::SetBandwidth {
                        max_bandwidth_mib_s: Some(cap),
                    },
                    reason: format!(
                        "the link carried {carried:.0} MiB/s unpaced: max-bandwidth {cap} MiB/s \
                         ({LINK_PACE}× that, up from {from} MiB/s)"
                    ),
                })
            }
        }
    }
}

/// The rate three quarters up the sorted samples: above the slow windows of pass ends and
/// syncs, below a burst into empty socket buffers. 0 without samples.
fn upper_median(rates: &mut [f64]) -> f64 {
    if rates.is_empty() {
        return 0.0;
    }
    rates.sort_by(f64::total_cmp);
    rates[(rates.len() * 3 / 4).min(rates.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{hosts, meas, req};
    use crate::settings::choose_settings;
    use tern_api::migration::MigrateVm;

    fn sample(sent_mib_s: f64, remaining_mib: u64) -> PrecopySample {
        PrecopySample {
            phase: SamplePhase::PreCopy,
            pass: 1,
            remaining_bytes: remaining_mib * 1024 * 1024,
            dirty_bytes_per_s: 0.0,
            sent_mbit_s: sent_mib_s * MIB * 8.0 / 1e6,
            compression: 1.0,
            expected_downtime_ms: 300,
            cpu_throttle_pct: 0,
        }
    }

    /// A link measured at 40 Mbit/s (a disturbed probe) that carries 100 MiB/s.
    fn misjudged() -> Pacer {
        let s = choose_settings(&req(), &meas(1024, 0.0, 40.0), &hosts(0));
        assert_eq!(s.paced_from_link_mbit, Some(40.0));
        Pacer::new(&s)
    }

    /// Feeds samples every 100 ms from `t` for `ms`, the link carrying `link` MiB/s and the
    /// stream limited to the cap in force; returns the decisions.
    fn run(p: &mut Pacer, t: &mut u64, ms: u64, link: f64) -> Vec<Decision> {
        let mut out = Vec::new();
        for _ in 0..ms / 100 {
            *t += 100;
            let cap = match p.state {
                State::Paced { cap_mib_s, .. } => cap_mib_s as f64,
                _ => f64::INFINITY,
            };
            out.extend(p.observe(*t, &sample(link.min(cap), 500)));
        }
        out
    }

    #[test]
    fn a_misjudged_link_is_paced_from_what_it_carries() {
        let mut p = misjudged();
        let mut t = 0;
        let d = run(&mut p, &mut t, 3000, 100.0);
        assert_eq!(d.len(), 2, "{d:#?}");
        assert_eq!(
            d[0].action,
            Action::SetBandwidth {
                max_bandwidth_mib_s: None
            }
        );
        assert!(
            d[0].reason.contains("measured before the migration"),
            "{}",
            d[0].reason
        );
        assert_eq!(
            d[1].action,
            Action::SetBandwidth {
                max_bandwidth_mib_s: Some(110)
            }
        );
        // Paced above what the link carries, the stream no longer fills its cap: no more.
        assert!(run(&mut p, &mut t, 20_000, 100.0).is_empty());
    }

    #[test]
    fn a_well_measured_link_keeps_its_pace() {
        // Measured at 800 Mbit/s (95 MiB/s → cap 105), and carrying exactly that.
        let s = choose_settings(&req(), &meas(1024, 0.0, 800.0), &hosts(0));
        let mut p = Pacer::new(&s);
        let mut t = 0;
        assert!(run(&mut p, &mut t, 30_000, 95.4).is_empty());
    }

    #[test]
    fn a_users_cap_is_never_lifted() {
        let r = MigrateVm {
            bandwidth_mbit: Some(40),
            ..req()
        };
        let s = choose_settings(&r, &meas(1024, 0.0, 40.0), &hosts(0));
        assert_eq!(s.paced_from_link_mbit, None);
        let mut p = Pacer::new(&s);
        let mut t = 0;
        assert!(run(&mut p, &mut t, 30_000, 5.0).is_empty());
    }

    #[test]
    fn brief_saturation_and_pass_ends_do_not_lift_the_cap() {
        let mut p = misjudged();
        let cap = 6.0;
        let mut t = 0;
        // At the cap for 0.8 s, then a pass end (little to send), again and again.
        for _ in 0..20 {
            for _ in 0..8 {
                t += 100;
                assert!(p.observe(t, &sample(cap, 500)).is_none());
            }
            t += 100;
            assert!(p.observe(t, &sample(1.0, 1)).is_none());
        }
    }

    #[test]
    fn a_link_that_keeps_changing_ends_unpaced() {
        let mut p = misjudged();
        let mut t = 0;
        let mut link = 100.0;
        let mut actions = Vec::new();
        for _ in 0..MAX_REJUDGEMENTS + 2 {
            actions.extend(
                run(&mut p, &mut t, 3000, link)
                    .into_iter()
                    .map(|d| d.action),
            );
            link *= 3.0;
        }
        assert_eq!(actions.last(), Some(&Action::Note), "{actions:?}");
        assert_eq!(
            actions
                .iter()
                .filter(|a| matches!(
                    a,
                    Action::SetBandwidth {
                        max_bandwidth_mib_s: None
                    }
                ))
                .count() as u32,
            MAX_REJUDGEMENTS
        );
        assert!(!p.probing());
        assert!(run(&mut p, &mut t, 10_000, link).is_empty());
    }
}
