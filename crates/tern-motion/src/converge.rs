//! The convergence watcher: follows an outgoing migration's pre-copy sample by sample and says
//! when to escalate (raise the downtime limit, throttle, switch to post-copy, cancel at the
//! deadline). Pure: QEMU's figures come in as [`PrecopySample`]s, time as an argument.

use tern_api::migration::{MigrationSettings, ThrottlePlan};

use crate::pace::Pacer;
use crate::settings::{downtime_start, throttle_plan, MIN_DOWNTIME_MS};

/// Where an outgoing migration stands, as far as convergence is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplePhase {
    /// Not yet copying (QEMU's `none`, `setup`).
    Setup,
    /// Copying memory while the guest runs (`active`).
    PreCopy,
    /// The guest runs on the destination, which fetches pages on demand (`postcopy-*`).
    PostCopy,
    /// Past pre-copy: paused for the hand-over, copying device state, or ended.
    Past,
}

/// One observation of an outgoing migration (QEMU's `query-migrate`, as the driver reads it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrecopySample {
    pub phase: SamplePhase,
    /// RAM pass in progress (QEMU's dirty-sync-count: 1 + passes done).
    pub pass: u64,
    /// Bytes still to send.
    pub remaining_bytes: u64,
    /// How fast the guest dirties memory, bytes per second, as of the last pass.
    pub dirty_bytes_per_s: f64,
    /// How fast the stream sends now, megabits (10^6) per second, on the wire.
    pub sent_mbit_s: f64,
    /// Guest bytes the stream carries per byte on the wire (≥ 1; above 1 with compression):
    /// the dirty rate, in guest bytes, is weighed against the wire rate times this.
    pub compression: f64,
    /// The pause QEMU expects if it stopped now, ms.
    pub expected_downtime_ms: u64,
    /// Auto-converge's vCPU throttle now, percent.
    pub cpu_throttle_pct: u64,
}

impl PrecopySample {
    /// [`Self::compression`], sane: at least 1 (TLS and framing make the wire a little
    /// longer than the pages), 1 when unknown.
    pub fn compression_factor(&self) -> f64 {
        if self.compression.is_finite() {
            self.compression.max(1.0)
        } else {
            1.0
        }
    }
}

/// A step the watcher asks for while a migration runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Let the final pause be longer (`downtime-limit`).
    RaiseDowntime { downtime_limit_ms: u64 },
    /// Make auto-converge throttle (sooner, harder): `throttle-trigger-threshold`,
    /// `cpu-throttle-initial`, `cpu-throttle-increment`.
    Throttle {
        trigger_threshold_pct: u8,
        initial_pct: u8,
        increment_pct: u8,
    },
    /// Switch to post-copy (`migrate-start-postcopy`).
    StartPostcopy,
    /// Nothing is left to try: pre-copy goes on until it converges or the deadline passes.
    Hold,
    /// Give up (`migrate_cancel`): the VM stays on the source.
    Cancel,
    /// Pace the stream anew (`max-bandwidth`; `None` = unlimited).
    SetBandwidth { max_bandwidth_mib_s: Option<u64> },
    /// Nothing changes; what the watcher saw is worth telling (the reason).
    Note,
}

/// An action and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    pub reason: String,
}

/// Share by which a pass's dirty set must undercut the best so far to count as progress.
pub const MIN_SHRINK: f64 = 0.10;
/// Completed passes without progress that make a stall.
pub const STALL_PASSES: u32 = 2;
/// Dirty rate / send rate at or above which pre-copy cannot shrink meaningfully...
pub const STALL_RATIO: f64 = 0.9;
/// ...when it holds this long (the fallback for long passes on slow links).
pub const STALL_RATIO_MS: u64 = 3000;
/// Increment auto-converge may be raised to.
pub const MAX_THROTTLE_INCREMENT_PCT: u8 = 40;
/// Throttle threshold once tern decides to throttle: any notable dirtying triggers it.
pub const EAGER_TRIGGER_THRESHOLD_PCT: u8 = 10;
/// Throttle threshold when throttling is expected from the start (`throttle_plan`).
pub const EXPECTED_TRIGGER_THRESHOLD_PCT: u8 = 50;
/// Share of the deadline after which post-copy (if allowed) is started rather than waiting.
pub const POSTCOPY_AT_DEADLINE_SHARE: f64 = 0.75;
/// Share of the stream's best (smoothed) rate below which, with data waiting, the link counts
/// as disturbed...
pub const DISTURBED_SHARE: f64 = 0.25;
/// ...once it stays there this long.
pub const DISTURBED_MS: u64 = 500;
/// A disturbance that lasts longer is the link's new normal, and convergence is judged at it.
pub const DISTURBED_GRACE_MS: u64 = 10_000;
/// Weight of a new sample in the stream's smoothed rate (100 ms samples: about half a second).
const RATE_SMOOTHING: f64 = 0.2;
const MIB_F: f64 = 1024.0 * 1024.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    PreCopy,
    PostCopy,
    /// Past pre-copy (pre-switchover, device state, or finished): nothing to decide.
    Over,
    Cancelled,
}

/// Watches successive `query-migrate` samples of one outgoing migration and says when to
/// escalate: raise the downtime limit within the budget, throttle the guest, step the throttle
/// up, switch to post-copy (if allowed), or cancel at the deadline.
///
/// "Remaining data stops shrinking" is judged per dirty-bitmap sync, not per sample: within a
/// pass `remaining` falls as pages are sent and jumps at each sync, so the figure compared is
/// each pass's dirty set (the highest remaining seen in it). A pass that does not undercut the
/// best one by [`MIN_SHRINK`] counts against convergence; [`STALL_PASSES`] in a row is a
/// stall. On slow links a pass can last minutes, so a dirty rate of at least [`STALL_RATIO`]
/// of the send rate for [`STALL_RATIO_MS`] is a stall too. After each escalation the evidence
/// starts afresh (a new sync and the windows again) so a step gets a chance to work.
///
/// A slow stream is the guest's fault only while the link delivers: when the stream falls far
/// below what it has carried while data waits (a cut link, a link squeezed by other traffic),
/// nothing is judged until it recovers (for up to [`DISTURBED_GRACE_MS`]), and the pass that
/// holds what piled up meanwhile is not held against convergence. A pace tern chose from its
/// own measurement is re-judged by the [`Pacer`] first; while it probes, nothing is judged.
#[derive(Debug, Clone)]
pub struct ConvergenceWatcher {
    budget_ms: u64,
    downtime_limit_ms: u64,
    plan: ThrottlePlan,
    throttling: bool,
    increment_pct: u8,
    postcopy_allowed: bool,
    deadline_ms: u64,
    stage: Stage,
    /// dirty-sync-count of the pass being observed.
    pass: u64,
    /// Highest remaining seen in the current pass.
    pass_peak: u64,
    best_dirty_set: Option<u64>,
    passes_without_progress: u32,
    /// Passes up to this one are not judged (settling after an escalation).
    settle_pass: u64,
    /// When the dirty/send ratio first held at or above STALL_RATIO (ms since start).
    high_ratio_since: Option<u64>,
    /// Earliest time the ratio rule may fire (settling after an escalation).
    settle_until_ms: u64,
    held: bool,
    pacer: Pacer,
    /// The stream's smoothed rate, and the best it has reached (MiB/s).
    sent_avg_mib_s: f64,
    best_sent_mib_s: f64,
    /// Since when the stream has run far below its best with data waiting (ms).
    low_since: Option<u64>,
    /// Since when the link has counted as disturbed (ms).
    disturbed_since: Option<u64>,
    /// Whether the first pass's figures have been judged ([`Self::judge_first_pass`]).
    first_pass_judged: bool,
}

impl ConvergenceWatcher {
    pub fn new(settings: &MigrationSettings) -> Self {
        ConvergenceWatcher {
            budget_ms: settings.downtime_budget_ms.max(settings.downtime_limit_ms),
            downtime_limit_ms: settings.downtime_limit_ms,
            plan: settings.throttle,
            throttling: false,
            increment_pct: settings.throttle.increment_pct,
            postcopy_allowed: settings.postcopy_allowed,
            deadline_ms: settings.deadline_ms,
            stage: Stage::PreCopy,
            pass: 0,
            pass_peak: 0,
            best_dirty_set: None,
            passes_without_progress: 0,
            settle_pass: 1,
            high_ratio_since: None,
            settle_until_ms: 0,
            held: false,
            pacer: Pacer::new(settings),
            sent_avg_mib_s: 0.0,
            best_sent_mib_s: 0.0,
            low_since: None,
            disturbed_since: None,
            first_pass_judged: false,
        }
    }

    /// Once the first pass is done, QEMU's own figures say what a measurement before the copy
    /// would have guessed from a short sample: the guest's dirty rate over a whole pass against
    /// what the stream carried. The downtime limit and the throttle plan are then set as the
    /// settings would have set them from a measurement (only ever raised or armed, never
    /// relaxed), so copying can start at once without measuring.
    fn judge_first_pass(&mut self, s: &PrecopySample) -> Vec<Decision> {
        if self.first_pass_judged || self.pass < 2 {
            return Vec::new();
        }
        self.first_pass_judged = true;
        let dirty = s.dirty_bytes_per_s / MIB_F;
        // In guest bytes: with compression the stream carries several times its wire rate,
        // and taking the wire rate for it would raise the limit (and the pause) for nothing.
        let wire = self.sent_avg_mib_s.max(s.sent_mbit_s * 1e6 / 8.0 / MIB_F);
        let sent = wire * s.compression_factor();
        if !(sent > 0.0 && dirty.is_finite()) {
            return Vec::new();
        }
        let mut out = Vec::new();
        let shrink = if dirty > 0.0 {
            sent / dirty
        } else {
            f64::INFINITY
        };
        let (limit, why) = downtime_start(self.budget_ms, shrink);
        let limit = limit.max(MIN_DOWNTIME_MS).min(self.budget_ms);
        if limit > self.downtime_limit_ms {
            let from = self.downtime_limit_ms;
            self.downtime_limit_ms = limit;
            out.push(Decision {
                action: Action::RaiseDowntime {
                    downtime_limit_ms: limit,
                },
                reason: format!(
                    "after the first pass (the guest dirties {dirty:.1} MiB/s, the stream \
                     carries {sent:.1} MiB/s of it, {wire:.1} MiB/s on the wire): downtime \
                     limit from {from} ms to {limit} ms, {why}"
                ),
            });
        }
        if self.plan.trigger_threshold_pct > EXPECTED_TRIGGER_THRESHOLD_PCT && !self.throttling {
            if let Some((plan, why)) = throttle_plan(dirty, sent) {
                self.plan = plan;
                self.increment_pct = plan.increment_pct;
                out.push(Decision {
                    action: Action::Throttle {
                        trigger_threshold_pct: plan.trigger_threshold_pct,
                        initial_pct: plan.initial_pct,
                        increment_pct: plan.increment_pct,
                    },
                    reason: format!("after the first pass, throttling is to be expected: {why}"),
                });
            }
        }
        out
    }

    /// Forgets the evidence gathered so far: after an escalation, a new pace or a disturbed
    /// link, a stall must be shown again under the new conditions.
    fn fresh_evidence(&mut self, elapsed_ms: u64) {
        self.best_dirty_set = None;
        self.passes_without_progress = 0;
        self.settle_pass = self.pass;
        self.high_ratio_since = None;
        self.settle_until_ms = elapsed_ms + STALL_RATIO_MS;
    }

    /// Follows the stream's rate; says when the link turns disturbed, recovers, or has run
    /// disturbed so long that its rate is the new normal.
    fn watch_link(&mut self, elapsed_ms: u64, s: &PrecopySample) -> Option<Decision> {
        let sent = s.sent_mbit_s * 1e6 / 8.0 / MIB_F;
        self.sent_avg_mib_s += RATE_SMOOTHING * (sent - self.sent_avg_mib_s);
        // Pass 1 is not judged, and its zero pages make its rate uneven.
        let waiting = s.remaining_bytes as f64 >= self.best_sent_mib_s * MIB_F * 0.5;
        let low = self.pass >= 2 && waiting && sent < self.best_sent_mib_s * DISTURBED_SHARE;
        if !low {
            self.best_sent_mib_s = self.best_sent_mib_s.max(self.sent_avg_mib_s);
            self.low_since = None;
            let since = self.disturbed_since.take()?;
            self.fresh_evidence(elapsed_ms);
            // The next pass holds what the guest dirtied while the link was disturbed.
            self.settle_pass = self.pass + 1;
            return Some(Decision {
                action: Action::Note,
                reason: format!(
                    "the stream is back at {sent:.1} MiB/s after {:.1} s disturbed; convergence \
                     is judged afresh after the next pass",
                    elapsed_ms.saturating_sub(since) as f64 / 1000.0
                ),
            });
        }
        // A starved stream says nothing about the guest's dirtying.
        self.high_ratio_since = None;
        let low_since = *self.low_since.get_or_insert(elapsed_ms);
        match self.disturbed_since {
            None if elapsed_ms.saturating_sub(low_since) >= DISTURBED_MS => {
                self.disturbed_since = Some(low_since);
                Some(Decision {
                    action: Action::Note,
                    reason: format!(
                        "the stream fell to {sent:.1} MiB/s with {:.1} MiB waiting (it has \
                         carried {:.1} MiB/s): the link looks disturbed, so pre-copy is not \
                         judged, nor the guest throttled, until it recovers (for up to {} s)",
                        s.remaining_bytes as f64 / MIB_F,
                        self.best_sent_mib_s,
                        DISTURBED_GRACE_MS / 1000
                    ),
                })
            }
            Some(since) if elapsed_ms.saturating_sub(since) >= DISTURBED_GRACE_MS => {
                self.disturbed_since = None;
                self.low_since = None;
                self.best_sent_mib_s = self.sent_avg_mib_s;
                // The rate rule starts counting now; passes keep their evidence.
                self.settle_until_ms = elapsed_ms;
                Some(Decision {
                    action: Action::Note,
                    reason: format!(
                        "the stream has run at about {:.1} MiB/s for {} s: taken as what the \
                         link carries now, and convergence is judged at that rate",
                        self.sent_avg_mib_s,
                        DISTURBED_GRACE_MS / 1000
                    ),
                })
            }
            _ => None,
        }
    }

    /// Downtime limit in force (after the watcher's raises).
    pub fn downtime_limit_ms(&self) -> u64 {
        self.downtime_limit_ms
    }

    /// True once the watcher has made the guest be throttled.
    pub fn throttling(&self) -> bool {
        self.throttling
    }

    /// Feeds one sample taken `elapsed_ms` after the migration started; returns what to do
    /// now (usually nothing).
    pub fn observe(&mut self, elapsed_ms: u64, s: &PrecopySample) -> Vec<Decision> {
        match s.phase {
            SamplePhase::PostCopy => self.stage = Stage::PostCopy,
            SamplePhase::Setup | SamplePhase::PreCopy => {}
            SamplePhase::Past => {
                if self.stage == Stage::PreCopy {
                    self.stage = Stage::Over;
                }
            }
        }
        if self.stage != Stage::PreCopy {
            // Post-copy cannot be cancelled without losing the VM; past pre-copy the
            // hand-over is someone else's decision.
            return Vec::new();
        }
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        if elapsed_ms >= self.deadline_ms {
            self.stage = Stage::Cancelled;
            return vec![Decision {
                action: Action::Cancel,
                reason: format!(
                    "deadline of {:.1} s passed in pass {} with {:.1} MiB still to send: \
                     cancelling, the VM stays on the source",
                    self.deadline_ms as f64 / 1000.0,
                    s.pass,
                    mib(s.remaining_bytes)
                ),
            }];
        }
        if s.phase != SamplePhase::PreCopy {
            return Vec::new();
        }

        // Pass accounting.
        if s.pass != self.pass {
            let finished = self.pass;
            let size = self.pass_peak;
            self.pass = s.pass;
            self.pass_peak = s.remaining_bytes;
            // Pass 1 holds all of memory: only later passes say anything about convergence.
            if finished >= 2 && finished > self.settle_pass {
                match self.best_dirty_set {
                    Some(best) if (size as f64) > best as f64 * (1.0 - MIN_SHRINK) => {
                        self.passes_without_progress += 1;
                    }
                    _ => {
                        self.best_dirty_set = Some(size);
                        self.passes_without_progress = 0;
                    }
                }
            }
        } else {
            self.pass_peak = self.pass_peak.max(s.remaining_bytes);
        }

        if let Some(d) = self.pacer.observe(elapsed_ms, s) {
            self.fresh_evidence(elapsed_ms);
            return vec![d];
        }
        if self.pacer.probing() {
            self.fresh_evidence(elapsed_ms);
            return Vec::new();
        }
        if let Some(d) = self.watch_link(elapsed_ms, s) {
            return vec![d];
        }
        if self.disturbed_since.is_some() {
            return Vec::new();
        }
        let judged = self.judge_first_pass(s);
        if !judged.is_empty() {
            // The new limit and plan get their chance: the rate rule waits its window again
            // (passes keep their evidence: a long pass must not wait for another).
            self.high_ratio_since = None;
            self.settle_until_ms = elapsed_ms + STALL_RATIO_MS;
            return judged;
        }

        // Rate fallback: QEMU's dirty rate (per sync) against the stream's current rate.
        let dirty_b_s = s.dirty_bytes_per_s;
        let sent_b_s = s.sent_mbit_s * 1e6 / 8.0 * s.compression_factor();
        let ratio = if sent_b_s > 0.0 {
            dirty_b_s / sent_b_s
        } else {
            0.0
        };
        if self.pass >= 2 && self.pass > self.settle_pass && ratio >= STALL_RATIO {
            self.high_ratio_since.get_or_insert(elapsed_ms);
        } else {
            self.high_ratio_since = None;
        }
        let by_passes = self.passes_without_progress >= STALL_PASSES;
        let by_rate = self
            .high_ratio_since
            .is_some_and(|t| elapsed_ms.saturating_sub(t) >= STALL_RATIO_MS)
            && elapsed_ms >= self.settle_until_ms;
        let deadline_near = self.postcopy_allowed
            && elapsed_ms as f64 >= self.deadline_ms as f64 * POSTCOPY_AT_DEADLINE_SHARE;
        if !(by_passes || by_rate || deadline_near) {
            return Vec::new();
        }
        let evidence = if by_passes {
            format!(
                "remaining data stopped shrinking: {} passes without a {:.0}% drop below the \
                 best dirty set of {:.1} MiB (pass {}, {:.1} MiB left)",
                self.passes_without_progress,
                MIN_SHRINK * 100.0,
                mib(self.best_dirty_set.unwrap_or(0)),
                s.pass,
                mib(s.remaining_bytes)
            )
        } else if by_rate {
            format!(
                "the guest dirties {:.1} MiB/s while {:.1} MiB/s are sent ({:.0}%) for {:.1} s: \
                 pre-copy cannot shrink (pass {}, {:.1} MiB left)",
                dirty_b_s / 1048576.0,
                sent_b_s / 1048576.0,
                ratio * 100.0,
                STALL_RATIO_MS as f64 / 1000.0,
                s.pass,
                mib(s.remaining_bytes)
            )
        } else {
            format!(
                "{:.0}% of the {:.1} s deadline used with {:.1} MiB left",
                POSTCOPY_AT_DEADLINE_SHARE * 100.0,
                self.deadline_ms as f64 / 1000.0,
                mib(s.remaining_bytes)
            )
        };
        let decision = self.escalate(evidence, s, deadline_near && !(by_passes || by_rate));
        if decision.is_some() {
            self.fresh_evidence(elapsed_ms);
        }
        decision.into_iter().collect()
    }

    fn escalate(
        &mut self,
        evidence: String,
        s: &PrecopySample,
        only_postcopy: bool,
    ) -> Option<Decision> {
        if !only_postcopy {
            if self.downtime_limit_ms < self.budget_ms {
                let from = self.downtime_limit_ms;
                self.downtime_limit_ms = self.budget_ms;
                return Some(Decision {
                    action: Action::RaiseDowntime {
                        downtime_limit_ms: self.budget_ms,
                    },
                    reason: format!(
                        "{evidence}: raising the downtime limit from {from} ms to the {} ms \
                         budget (QEMU expects {} ms)",
                        self.budget_ms, s.expected_downtime_ms
                    ),
                });
            }
            if !self.throttling {
                self.throttling = true;
                return Some(Decision {
                    action: Action::Throttle {
                        trigger_threshold_pct: EAGER_TRIGGER_THRESHOLD_PCT,
                        initial_pct: self.plan.initial_pct,
                        increment_pct: self.increment_pct,
                    },
                    reason: format!(
                        "{evidence}: throttling the guest (auto-converge from {}% in steps of \
                         {}%, triggered at {}% dirtied/sent)",
                        self.plan.initial_pct, self.increment_pct, EAGER_TRIGGER_THRESHOLD_PCT
                    ),
                });
            }
            let throttle_now = s.cpu_throttle_pct;
            if self.increment_pct < MAX_THROTTLE_INCREMENT_PCT
                && throttle_now < self.plan.max_pct as u64
            {
                let from = self.increment_pct;
                self.increment_pct = (self.increment_pct + 10).min(MAX_THROTTLE_INCREMENT_PCT);
                return Some(Decision {
                    action: Action::Throttle {
                        trigger_threshold_pct: EAGER_TRIGGER_THRESHOLD_PCT,
                        initial_pct: self.plan.initial_pct,
                        increment_pct: self.increment_pct,
                    },
                    reason: format!(
                        "{evidence} although the guest is throttled at {throttle_now}%: \
                         raising the throttle step from {from}% to {}%",
                        self.increment_pct
                    ),
                });
            }
        }
        if self.postcopy_allowed {
            self.stage = Stage::PostCopy;
            return Some(Decision {
                action: Action::StartPostcopy,
                reason: format!(
                    "{evidence}: switching to post-copy (allowed); the destination fetches the \
                     remaining pages on demand"
                ),
            });
        }
        if only_postcopy || self.held {
            return None;
        }
        self.held = true;
        Some(Decision {
            action: Action::Hold,
            reason: format!(
                "{evidence}: downtime at its {} ms budget and throttling at its steepest, \
                 post-copy not allowed — pre-copy goes on until it converges or the deadline",
                self.budget_ms
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{hosts, meas, req};
    use crate::settings::{choose_settings, DEFAULT_DOWNTIME_MS};
    use tern_api::migration::{Measurements, MigrateVm};

    fn settings(postcopy: bool, deadline_ms: u64) -> MigrationSettings {
        let r = MigrateVm {
            allow_postcopy: postcopy,
            deadline_ms: Some(deadline_ms),
            downtime_ms: Some(300),
            ..req()
        };
        choose_settings(&r, &meas(1024, 0.0, 1000.0), &hosts(0))
    }

    const MIB: u64 = 1024 * 1024;

    fn sample(pass: u64, remaining_mib: u64, dirty_mib_s: u64, sent_mib_s: u64) -> PrecopySample {
        PrecopySample {
            phase: SamplePhase::PreCopy,
            pass,
            remaining_bytes: remaining_mib * MIB,
            dirty_bytes_per_s: (dirty_mib_s * MIB) as f64,
            sent_mbit_s: sent_mib_s as f64 * 8.0 * 1.048576,
            compression: 1.0,
            expected_downtime_ms: 400,
            cpu_throttle_pct: 0,
        }
    }

    /// Feeds a pass as three samples with its dirty set at the start.
    fn feed_pass(
        w: &mut ConvergenceWatcher,
        t: &mut u64,
        pass: u64,
        set_mib: u64,
        dirty: u64,
        sent: u64,
    ) -> Vec<Decision> {
        let mut out = Vec::new();
        for rem in [set_mib, set_mib * 2 / 3, set_mib / 3] {
            *t += 100;
            out.extend(w.observe(*t, &sample(pass, rem, dirty, sent)));
        }
        out
    }

    #[test]
    fn converging_migration_needs_nothing() {
        let mut w = ConvergenceWatcher::new(&settings(false, 600_000));
        let mut t = 0;
        let mut set = 1024;
        for pass in 1..12 {
            let d = feed_pass(&mut w, &mut t, pass, set, 10, 100);
            assert!(d.is_empty(), "pass {pass}: {d:?}");
            set = (set / 2).max(1);
        }
        let done = PrecopySample {
            phase: SamplePhase::Past,
            ..sample(12, 0, 0, 0)
        };
        assert!(w.observe(t + 100, &done).is_empty());
        assert!(w.observe(999_999_999, &done).is_empty());
    }

    #[test]
    fn stalled_pre_copy_escalates_step_by_step() {
        let mut w = ConvergenceWatcher::new(&settings(false, 600_000));
        let mut t = 0;
        // Dirtying slower than sending (no rate stall, and too little to expect throttling
        // after the first pass), but the dirty set stays at 64 MiB.
        assert!(feed_pass(&mut w, &mut t, 1, 1024, 40, 100).is_empty());
        let mut actions = Vec::new();
        for pass in 2..40 {
            for d in feed_pass(&mut w, &mut t, pass, 64, 40, 100) {
                actions.push((pass, d));
            }
        }
        let kinds: Vec<&Action> = actions.iter().map(|(_, d)| &d.action).collect();
        assert_eq!(
            kinds,
            vec![
                &Action::RaiseDowntime {
                    downtime_limit_ms: 300
                },
                &Action::Throttle {
                    trigger_threshold_pct: EAGER_TRIGGER_THRESHOLD_PCT,
                    initial_pct: 20,
                    increment_pct: 10
                },
                &Action::Throttle {
                    trigger_threshold_pct: EAGER_TRIGGER_THRESHOLD_PCT,
                    initial_pct: 20,
                    increment_pct: 20
                },
                &Action::Throttle {
                    trigger_threshold_pct: EAGER_TRIGGER_THRESHOLD_PCT,
                    initial_pct: 20,
                    increment_pct: 30
                },
                &Action::Throttle {
                    trigger_threshold_pct: EAGER_TRIGGER_THRESHOLD_PCT,
                    initial_pct: 20,
                    increment_pct: 40
                },
                &Action::Hold,
            ],
            "{actions:#?}"
        );
        // The first stall is seen after pass 2 sets the best and two passes fail to beat it.
        assert_eq!(actions[0].0, 5, "{actions:#?}");
        // Each later step waits for fresh evidence: a pass to settle and two more.
        for pair in actions.windows(2) {
            assert!(pair[1].0 >= pair[0].0 + 3, "{actions:#?}");
        }
        assert!(actions[0].1.reason.contains("stopped shrinking"));
        assert!(w.throttling());
        assert_eq!(w.downtime_limit_ms(), 300);
    }

    #[test]
    fn noisy_but_shrinking_passes_are_not_a_stall() {
        let mut w = ConvergenceWatcher::new(&settings(false, 600_000));
        let mut t = 0;
        feed_pass(&mut w, &mut t, 1, 1024, 10, 100);
        // Shrinks by 15% a pass, with one pass bouncing up in between.
        let sets = [500, 425, 470, 361, 307, 330, 261, 222, 189];
        for (i, set) in sets.iter().enumerate() {
            let d = feed_pass(&mut w, &mut t, i as u64 + 2, *set, 10, 100);
            assert!(d.is_empty(), "pass {}: {d:?}", i + 2);
        }
    }

    #[test]
    fn slow_link_stall_is_seen_by_rate_within_a_long_pass() {
        let mut w = ConvergenceWatcher::new(&settings(false, 600_000));
        let mut t = 0;
        feed_pass(&mut w, &mut t, 1, 1024, 10, 2);
        // Pass 2 lasts long: the guest dirties 4 MiB/s, 2 MiB/s are sent. Its first sample
        // judges the first pass: half the budget, and throttling armed.
        t += 100;
        let judged = w.observe(t, &sample(2, 64, 4, 2));
        assert_eq!(
            judged.iter().map(|d| &d.action).collect::<Vec<_>>(),
            vec![
                &Action::RaiseDowntime {
                    downtime_limit_ms: 150
                },
                &Action::Throttle {
                    trigger_threshold_pct: EXPECTED_TRIGGER_THRESHOLD_PCT,
                    initial_pct: 75,
                    increment_pct: ThrottlePlan::default().increment_pct
                }
            ],
            "{judged:#?}"
        );
        assert!(judged[0].reason.contains("after the first pass"));
        let judged_at = t;
        let mut first = None;
        for i in 1..100 {
            t += 100;
            let d = w.observe(t, &sample(2, 64 - i / 4, 4, 2));
            if !d.is_empty() {
                first = Some((t, d));
                break;
            }
        }
        let (when, d) = first.expect("no escalation on a rate stall");
        assert!(matches!(d[0].action, Action::RaiseDowntime { .. }), "{d:?}");
        assert!(d[0].reason.contains("dirties 4.0 MiB/s"), "{}", d[0].reason);
        // The judgement is fresh evidence: the ratio must hold for STALL_RATIO_MS after it.
        assert!(when >= judged_at + STALL_RATIO_MS, "{when}");
        // The next step needs a new sync first.
        for _ in 0..100 {
            t += 100;
            assert!(w.observe(t, &sample(2, 40, 4, 2)).is_empty());
        }
        let mut next = Vec::new();
        for _ in 0..60 {
            t += 100;
            next.extend(w.observe(t, &sample(3, 60, 4, 2)));
        }
        assert!(
            matches!(
                next.as_slice(),
                [Decision {
                    action: Action::Throttle { .. },
                    ..
                }]
            ),
            "{next:?}"
        );
    }

    #[test]
    fn the_first_pass_sets_what_a_measurement_before_the_copy_would_have() {
        // Settings chosen without measuring the dirty rate start low and unthrottled.
        let unmeasured = Measurements {
            dirty_rate_mib_s: None,
            ..meas(1024, 0.0, 1000.0)
        };
        let s = choose_settings(&req(), &unmeasured, &hosts(0));
        assert_eq!(s.downtime_limit_ms, DEFAULT_DOWNTIME_MS / 10);
        assert_eq!(s.throttle.trigger_threshold_pct, 100);
        // A light guest: pass 1 leaves everything as it is.
        let mut w = ConvergenceWatcher::new(&s);
        let mut t = 0;
        feed_pass(&mut w, &mut t, 1, 1024, 5, 100);
        assert!(feed_pass(&mut w, &mut t, 2, 40, 5, 100).is_empty());
        assert_eq!(w.downtime_limit_ms(), DEFAULT_DOWNTIME_MS / 10);
        // A guest dirtying 80% of what is sent: passes shrink 1.25×, a quarter of the budget;
        // throttling is expected and armed at once, as a measurement would have had it.
        let mut w = ConvergenceWatcher::new(&s);
        let mut t = 0;
        feed_pass(&mut w, &mut t, 1, 1024, 80, 100);
        let d = feed_pass(&mut w, &mut t, 2, 400, 80, 100);
        let (plan, _) = throttle_plan(80.0, 100.0).expect("throttling expected");
        assert_eq!(
            d.iter().map(|d| &d.action).collect::<Vec<_>>(),
            vec![
                &Action::RaiseDowntime {
                    downtime_limit_ms: DEFAULT_DOWNTIME_MS / 4
                },
                &Action::Throttle {
                    trigger_threshold_pct: plan.trigger_threshold_pct,
                    initial_pct: plan.initial_pct,
                    increment_pct: plan.increment_pct
                }
            ],
            "{d:#?}"
        );
        assert_eq!(plan.initial_pct, 38);
        // Judged once: later passes like it change nothing by this rule.
        assert!(feed_pass(&mut w, &mut t, 3, 300, 80, 100).is_empty());
        assert!(!w.throttling());

        // The same guest over a compressed stream: 100 MiB/s on the wire carry 4× as much of
        // the guest's memory, so it dirties a fifth of what is carried and nothing is raised
        // (weighing its dirty rate against the wire rate raised the pause 3× in bench/migrate's
        // pgbench workload).
        let mut w = ConvergenceWatcher::new(&s);
        let mut t = 0;
        let compressed = |pass, rem| PrecopySample {
            compression: 4.0,
            ..sample(pass, rem, 80, 100)
        };
        for (pass, set) in [(1, 1024), (2, 400)] {
            for rem in [set, set * 2 / 3, set / 3] {
                t += 100;
                let d = w.observe(t, &compressed(pass, rem));
                assert!(d.is_empty(), "pass {pass}: {d:#?}");
            }
        }
        assert_eq!(w.downtime_limit_ms(), DEFAULT_DOWNTIME_MS / 10);
    }

    #[test]
    fn deadline_cancels_once_and_postcopy_wins_when_allowed() {
        let mut w = ConvergenceWatcher::new(&settings(false, 10_000));
        assert!(w.observe(9_900, &sample(1, 900, 1, 100)).is_empty());
        let d = w.observe(10_000, &sample(1, 800, 1, 100));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].action, Action::Cancel);
        assert!(d[0].reason.contains("deadline"), "{}", d[0].reason);
        assert!(w.observe(10_100, &sample(1, 700, 1, 100)).is_empty());

        // Post-copy allowed: started at 75% of the deadline, and never cancelled after.
        let mut w = ConvergenceWatcher::new(&settings(true, 10_000));
        assert!(w.observe(7_000, &sample(1, 900, 1, 100)).is_empty());
        let d = w.observe(7_600, &sample(1, 800, 1, 100));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].action, Action::StartPostcopy);
        let mut pc = sample(2, 100, 1, 100);
        pc.phase = SamplePhase::PostCopy;
        assert!(w.observe(20_000, &pc).is_empty());
    }

    /// Pre-copy converging against a 100 MiB/s stream (dirtying 30 MiB/s) is cut for 4 s in
    /// pass 4: the starved stream must not read as a stall, and the pass after the cut,
    /// swollen by what the guest dirtied meanwhile, must not either.
    #[test]
    fn a_cut_link_is_waited_out_not_throttled() {
        let mut w = ConvergenceWatcher::new(&settings(false, 600_000));
        let mut t = 0;
        let mut notes = Vec::new();
        let take = |d: Vec<Decision>, notes: &mut Vec<Decision>| {
            for d in d {
                assert_eq!(d.action, Action::Note, "{d:?}");
                notes.push(d);
            }
        };
        take(feed_pass(&mut w, &mut t, 1, 1024, 30, 100), &mut notes);
        take(feed_pass(&mut w, &mut t, 2, 300, 30, 100), &mut notes);
        take(feed_pass(&mut w, &mut t, 3, 100, 30, 100), &mut notes);
        for _ in 0..40 {
            t += 100;
            take(w.observe(t, &sample(4, 60, 30, 0)), &mut notes);
        }
        assert_eq!(notes.len(), 1, "{notes:#?}");
        assert!(
            notes[0].reason.contains("link looks disturbed"),
            "{}",
            notes[0].reason
        );
        // Back: the rest of pass 4, then pass 5 holds the 4 s of dirtying, then it shrinks.
        take(feed_pass(&mut w, &mut t, 4, 60, 30, 100), &mut notes);
        assert_eq!(notes.len(), 2, "{notes:#?}");
        assert!(notes[1].reason.contains("back at"), "{}", notes[1].reason);
        let mut set = 150;
        for pass in 5..15 {
            take(feed_pass(&mut w, &mut t, pass, set, 30, 100), &mut notes);
            set = (set * 3 / 5).max(1);
        }
        assert_eq!(notes.len(), 2, "{notes:#?}");
        assert!(!w.throttling());
    }

    /// A link that stays slow is not waited out for ever: after the grace its rate is the
    /// norm, and a guest that dirties faster than it carries is a stall again.
    #[test]
    fn a_lasting_slowdown_becomes_the_norm() {
        let mut w = ConvergenceWatcher::new(&settings(false, 600_000));
        let mut t = 0;
        feed_pass(&mut w, &mut t, 1, 1024, 30, 100);
        feed_pass(&mut w, &mut t, 2, 300, 30, 100);
        let mut seen = Vec::new();
        for _ in 0..200 {
            t += 100;
            for d in w.observe(t, &sample(3, 200, 30, 10)) {
                seen.push((t, d));
            }
        }
        let kinds: Vec<&Action> = seen.iter().map(|(_, d)| &d.action).collect();
        assert!(
            matches!(
                kinds.as_slice(),
                [Action::Note, Action::Note, Action::RaiseDowntime { .. }, ..]
            ),
            "{seen:#?}"
        );
        assert!(seen[1].1.reason.contains("taken as what the link carries"));
        assert!(seen[1].0 - seen[0].0 >= DISTURBED_GRACE_MS - DISTURBED_MS);
        assert!(seen[2].0 - seen[1].0 >= STALL_RATIO_MS);
    }

    /// The measurement before the migration saw 40 Mbit/s of a link that carries 100 MiB/s,
    /// and the guest dirties 32 MiB/s — far more than the 6 MiB/s pace, far less than the
    /// link. The pace is re-judged; the guest is never throttled nor the limit raised.
    #[test]
    fn a_misjudged_pace_is_lifted_before_the_guest_is_throttled() {
        let s = choose_settings(&req(), &meas(1024, 32.0, 40.0), &hosts(0));
        let mut cap = s.max_bandwidth_mib_s.map(|c| c as f64);
        assert_eq!(cap, Some(6.0));
        let mut w = ConvergenceWatcher::new(&s);
        let mut t = 0;
        let mut actions = Vec::new();
        // Each pass sends what the guest dirtied during the one before, until what is left
        // fits the 150 ms downtime limit at the link's 100 MiB/s.
        let (mut remaining, mut pass, mut pass_began) = (1024.0_f64, 1, 0);
        while t < 60_000 {
            t += 100;
            let sent = cap.unwrap_or(f64::INFINITY).min(100.0);
            remaining -= sent / 10.0;
            if remaining <= 0.0 {
                remaining = 32.0 * (t - pass_began) as f64 / 1000.0;
                (pass, pass_began) = (pass + 1, t);
                if remaining < 15.0 {
                    break;
                }
            }
            for d in w.observe(t, &sample(pass, remaining.max(0.0) as u64, 32, sent as u64)) {
                if let Action::SetBandwidth {
                    max_bandwidth_mib_s,
                } = d.action
                {
                    cap = max_bandwidth_mib_s.map(|c| c as f64);
                }
                actions.push(d.action);
            }
        }
        assert_eq!(
            actions,
            vec![
                Action::SetBandwidth {
                    max_bandwidth_mib_s: None
                },
                Action::SetBandwidth {
                    max_bandwidth_mib_s: Some(110)
                }
            ]
        );
        assert!(
            remaining < 15.0,
            "pre-copy did not converge at the new pace"
        );
    }

    #[test]
    fn no_decisions_past_pre_copy() {
        let mut w = ConvergenceWatcher::new(&settings(false, 1_000));
        let mut s = sample(3, 10, 1, 100);
        s.phase = SamplePhase::Past;
        assert!(w.observe(5_000, &s).is_empty());
        s.phase = SamplePhase::PreCopy;
        assert!(w.observe(6_000, &s).is_empty());
    }
}
