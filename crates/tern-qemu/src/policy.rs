//! Migration policy: the settings a migration starts with, chosen from measurements, and the
//! convergence watcher that escalates while pre-copy runs. Pure: no QEMU, no clock — time and
//! QEMU's figures come in as arguments, decisions go out with their reasons.

use tern_api::migration::{Measurements, MigrateVm, MigrationSettings, ThrottlePlan};

use crate::migration::{MigrationStats, MigrationStatus};
use crate::qmp::QemuVersion;

/// Downtime budget when the request names none.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Smallest downtime limit tern sets: below it the device state alone does not fit.
pub const MIN_DOWNTIME_MS: u64 = 20;
/// Pace of a migration stream with no user cap, relative to the measured link.
pub const LINK_PACE: f64 = 1.1;
/// Bandwidth ÷ dirty rate from which tern starts at a tenth of the downtime budget.
///
/// The passes that take the pause from the budget `B` down to a limit `L` last about
/// `(B - L) / (s - 1)` in all, `s` being this ratio (each pass shrinks what is left `s`×):
/// at 1.5 lowering 300 ms to 30 ms costs about half a second of pre-copy, while clients see
/// the pause itself. Measured (bench/migrate, 1 Gbit/s, 64 MiB/s, s ≈ 1.8): half the budget
/// gave a 156 ms pause for the same end-to-end time as plain QEMU's 266 ms.
pub const FAST_SHRINK: f64 = 1.5;
/// Bandwidth ÷ dirty rate from which tern starts at a quarter of the budget (below: half).
pub const SLOW_SHRINK: f64 = 1.2;
/// Largest downtime budget accepted (a longer pause is a cold migration).
pub const MAX_DOWNTIME_MS: u64 = 10_000;
/// What one uncompressed migration stream (one sender thread, one TCP connection) carries.
pub const PLAIN_CHANNEL_MIB_S: f64 = 1000.0;
/// What one core compresses with zstd level 1, on the input side, conservatively.
pub const ZSTD_CHANNEL_MIB_S: f64 = 200.0;
/// Most multifd channels tern opens.
pub const MAX_CHANNELS: u32 = 16;
/// Guest memory worth one more channel for parallel zero-page scanning.
pub const MIB_PER_CHANNEL: u64 = 4096;
/// Link speed assumed when no measurement is available.
pub const ASSUMED_LINK_MBIT: f64 = 1000.0;
/// Default deadline: this many full copies of memory at the usable bandwidth...
pub const DEADLINE_COPIES: f64 = 10.0;
/// ...but never less than this...
pub const DEADLINE_FLOOR_MS: u64 = 60_000;
/// ...nor more than this.
pub const DEADLINE_CAP_MS: u64 = 4 * 3600 * 1000;
/// Dirty rate / bandwidth above which pre-copy is expected to need throttling.
pub const THROTTLE_EXPECTED_RATIO: f64 = 0.5;
/// First QEMU release whose post-copy works together with multifd.
pub const POSTCOPY_WITH_MULTIFD: QemuVersion = QemuVersion {
    major: 10,
    minor: 1,
    micro: 0,
};

/// What the two hosts can give a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostBudget {
    /// Cores both hosts can spare for migration threads (the smaller of the two figures).
    pub spare_cores: u32,
    /// The older QEMU of the two hosts.
    pub qemu: QemuVersion,
}

/// Megabits (10^6 bits) per second → MiB per second.
pub fn mbit_to_mib_s(mbit: f64) -> f64 {
    mbit * 1e6 / 8.0 / (1024.0 * 1024.0)
}

/// Chooses a migration's settings from the request, the measurements and the hosts; every
/// decision comes with one line in `reasons` saying what was chosen and why.
pub fn choose_settings(req: &MigrateVm, m: &Measurements, hosts: &HostBudget) -> MigrationSettings {
    let mut reasons = Vec::new();

    // Bandwidth: what the stream may use.
    let measured = m.link_mbit.is_finite() && m.link_mbit > 0.0;
    let link_mbit = if measured {
        m.link_mbit
    } else {
        reasons.push(format!(
            "link bandwidth: no measurement, assuming {ASSUMED_LINK_MBIT:.0} Mbit/s"
        ));
        ASSUMED_LINK_MBIT
    };
    let (bw_mbit, max_bandwidth_mib_s) = match req.bandwidth_mbit.filter(|c| *c > 0) {
        Some(cap) => {
            let cap_mib = mbit_to_mib_s(cap as f64).round().max(1.0) as u64;
            reasons.push(format!(
                "max-bandwidth: {cap_mib} MiB/s, the user's cap of {cap} Mbit/s (the link \
                 measured {link_mbit:.0} Mbit/s)"
            ));
            ((cap as f64).min(link_mbit), Some(cap_mib))
        }
        None if measured => {
            // Paced just above the link: a stream faster than the bottleneck only fills its
            // queue until packets drop and TCP backs off (measured in the lab: 85% of a
            // 1 Gbit/s link used unpaced, 97% paced).
            let pace = (mbit_to_mib_s(link_mbit) * LINK_PACE).ceil().max(1.0) as u64;
            reasons.push(format!(
                "max-bandwidth: {pace} MiB/s, {LINK_PACE}× the link's measured {link_mbit:.0} \
                 Mbit/s — as fast as the link carries (QEMU's own default caps at 1 Gbit/s), \
                 paced so TCP does not overrun the bottleneck; pass a bandwidth cap to protect \
                 other traffic"
            ));
            (link_mbit, Some(pace))
        }
        None => {
            reasons.push(
                "max-bandwidth: unlimited — no cap was asked and the link could not be \
                 measured; pass a bandwidth cap to protect other traffic"
                    .into(),
            );
            (link_mbit, None)
        }
    };
    let bw_mib_s = mbit_to_mib_s(bw_mbit);
    let dirty_mib_s = if m.dirty_rate_mib_s.is_finite() {
        m.dirty_rate_mib_s.max(0.0)
    } else {
        0.0
    };
    let ratio = dirty_mib_s / bw_mib_s;

    // Post-copy first: it decides whether multifd is possible.
    let multifd_possible = !req.allow_postcopy || hosts.qemu >= POSTCOPY_WITH_MULTIFD;
    if req.allow_postcopy {
        reasons.push(format!(
            "post-copy: allowed as asked, used only if pre-copy cannot converge{}",
            if multifd_possible {
                String::new()
            } else {
                format!(
                    "; QEMU {} cannot combine it with multifd (needs {}), so one stream",
                    hosts.qemu, POSTCOPY_WITH_MULTIFD
                )
            }
        ));
    } else {
        reasons.push(
            "post-copy: not allowed (not asked): a failure after switchover would lose the \
             VM, so only pre-copy runs"
                .into(),
        );
    }

    // Channels and compression.
    let cores = hosts.spare_cores.min(MAX_CHANNELS);
    let compress = multifd_possible
        && cores >= 1
        && bw_mib_s * 2.0 <= cores as f64 * ZSTD_CHANNEL_MIB_S
        && bw_mib_s < PLAIN_CHANNEL_MIB_S / 2.0;
    let (channels, compression) = if !multifd_possible {
        (0, "none")
    } else if compress {
        let n = ((2.0 * bw_mib_s / ZSTD_CHANNEL_MIB_S).ceil() as u32).clamp(1, cores);
        reasons.push(format!(
            "compression: zstd — the link ({bw_mib_s:.0} MiB/s) is the bottleneck: {cores} \
             spare core(s) compress about {:.0} MiB/s, at least twice what it carries",
            cores as f64 * ZSTD_CHANNEL_MIB_S
        ));
        reasons.push(format!(
            "multifd: {n} channel(s), enough zstd threads to compress twice the link's {bw_mib_s:.0} MiB/s"
        ));
        (n, "zstd")
    } else {
        let by_bw = (bw_mib_s / PLAIN_CHANNEL_MIB_S).ceil() as u32;
        let by_mem = m.memory_mib.div_ceil(MIB_PER_CHANNEL) as u32;
        let want = by_bw.max(by_mem).max(1);
        let n = want.min(cores.max(1));
        reasons.push(format!(
            "compression: none — {}",
            if cores == 0 {
                "no spare core to compress with".to_string()
            } else {
                format!(
                    "the link ({bw_mib_s:.0} MiB/s) is not slower than what {cores} spare \
                     core(s) could compress by half, so compressing would make the CPU the \
                     bottleneck"
                )
            }
        ));
        if n >= 2 {
            reasons.push(format!(
                "multifd: {n} channels — {by_bw} for {bw_mib_s:.0} MiB/s at ~{PLAIN_CHANNEL_MIB_S:.0} \
                 MiB/s per stream, {by_mem} for {} MiB of memory to scan, limited to {cores} \
                 spare core(s)",
                m.memory_mib
            ));
            (n, "none")
        } else {
            reasons.push(format!(
                "multifd: off — one stream carries {bw_mib_s:.0} MiB/s and scans {} MiB \
                 (spare cores: {cores})",
                m.memory_mib
            ));
            (0, "none")
        }
    };
    if !multifd_possible {
        reasons.push("compression: none — it needs multifd".into());
        reasons.push("multifd: off — post-copy is allowed".into());
    }
    let zero_page_detection = if channels > 0 {
        reasons.push(
            "zero pages: found by the multifd threads in parallel and sent as a flag, not 4 KiB \
             of zeroes"
                .into(),
        );
        "multifd"
    } else {
        reasons.push(
            "zero pages: found by the migration thread and sent as a flag (legacy detection)"
                .into(),
        );
        "legacy"
    };

    // Downtime: the budget is a ceiling, not a target — what clients see grows with the
    // pause. Each extra pre-copy pass divides what is left by about bandwidth ÷ dirty rate:
    // when that is large, a few short passes buy a pause far under the budget; when it is
    // small, passes are long and gain little, so start nearer the budget. Raised to the
    // budget (then throttling) only if pre-copy stalls.
    let budget = req
        .downtime_ms
        .unwrap_or(DEFAULT_DOWNTIME_MS)
        .clamp(MIN_DOWNTIME_MS, MAX_DOWNTIME_MS);
    let shrink = if ratio > 0.0 {
        1.0 / ratio
    } else {
        f64::INFINITY
    };
    // Pre-copy the passes from the budget down to `limit` add, in ms (see FAST_SHRINK).
    let extra_ms = |limit: u64| {
        if shrink.is_finite() {
            format!("about {:.0} ms", (budget - limit) as f64 / (shrink - 1.0))
        } else {
            "nothing (nothing is dirtied)".to_string()
        }
    };
    let (initial, why) = if shrink >= FAST_SHRINK {
        (
            budget / 10,
            format!(
                "a tenth of the {budget} ms budget: each extra pass shrinks what is left {}, so the passes that take the pause down to it add {} of pre-copy",
                if shrink.is_finite() { format!("{shrink:.1}×") } else { "to nothing".into() },
                extra_ms(budget / 10)
            ),
        )
    } else if shrink >= SLOW_SHRINK {
        (
            budget / 4,
            format!(
                "a quarter of the {budget} ms budget: each extra pass shrinks what is left only {shrink:.1}×, so the passes down to it add {} of pre-copy",
                extra_ms(budget / 4)
            ),
        )
    } else {
        (
            budget / 2,
            format!("half the {budget} ms budget: each extra pass shrinks what is left only {shrink:.1}×, so passes are long and gain little"),
        )
    };
    let initial = initial.max(MIN_DOWNTIME_MS);
    reasons.push(format!(
        "downtime: limit {initial} ms to start, {why}{} — raised to {budget} ms before \
         throttling if pre-copy stalls",
        if req.downtime_ms.is_none() {
            " (default budget)"
        } else {
            ""
        }
    ));

    // Throttling plan.
    let throttle = if ratio < THROTTLE_EXPECTED_RATIO {
        reasons.push(format!(
            "throttling: auto-converge armed as a safety net only (QEMU throttles only if the \
             guest dirties more than it sends): the guest dirties {dirty_mib_s:.1} MiB/s, {:.0}% \
             of the {bw_mib_s:.0} MiB/s the stream can carry",
            ratio * 100.0
        ));
        ThrottlePlan {
            trigger_threshold_pct: 100,
            ..ThrottlePlan::default()
        }
    } else {
        // A throttle t leaves (1 - t) of the dirty rate: aim at half the bandwidth.
        let initial_pct = ((1.0 - THROTTLE_EXPECTED_RATIO / ratio) * 100.0)
            .round()
            .clamp(20.0, 80.0) as u8;
        reasons.push(format!(
            "throttling: expected — the guest dirties {dirty_mib_s:.1} MiB/s, {:.0}% of the \
             {bw_mib_s:.0} MiB/s the stream can carry; auto-converge starts at {initial_pct}% \
             once QEMU sees dirtying outpace sending (dirty-limit needs KVM's dirty ring)",
            ratio * 100.0
        ));
        ThrottlePlan {
            trigger_threshold_pct: 50,
            initial_pct,
            ..ThrottlePlan::default()
        }
    };

    // Deadline.
    let copy_ms = m.memory_mib as f64 / bw_mib_s * 1000.0;
    let deadline_ms = match req.deadline_ms.filter(|d| *d > 0) {
        Some(d) => {
            reasons.push(format!(
                "deadline: {} s as asked (one full copy of memory takes {:.1} s)",
                d as f64 / 1000.0,
                copy_ms / 1000.0
            ));
            d
        }
        None => {
            let d = ((copy_ms * DEADLINE_COPIES) as u64).clamp(DEADLINE_FLOOR_MS, DEADLINE_CAP_MS);
            reasons.push(format!(
                "deadline: {} s — {DEADLINE_COPIES:.0} full copies of {} MiB at {bw_mib_s:.0} \
                 MiB/s ({:.1} s each), at least {} s",
                d / 1000,
                m.memory_mib,
                copy_ms / 1000.0,
                DEADLINE_FLOOR_MS / 1000
            ));
            d
        }
    };

    MigrationSettings {
        multifd_channels: channels,
        max_bandwidth_mib_s,
        downtime_limit_ms: initial,
        compression: compression.to_string(),
        auto_converge: true,
        postcopy_allowed: req.allow_postcopy,
        deadline_ms,
        reasons,
        downtime_budget_ms: budget,
        zero_page_detection: zero_page_detection.to_string(),
        throttle,
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
/// Share of the deadline after which post-copy (if allowed) is started rather than waiting.
pub const POSTCOPY_AT_DEADLINE_SHARE: f64 = 0.75;

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
    pub fn observe(&mut self, elapsed_ms: u64, s: &MigrationStats) -> Vec<Decision> {
        match s.status {
            MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecover
            | MigrationStatus::PostcopyRecoverSetup => {
                self.stage = Stage::PostCopy;
            }
            MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::None => {}
            _ => {
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
                    s.dirty_sync_count,
                    mib(s.remaining_bytes)
                ),
            }];
        }
        if s.status != MigrationStatus::Active {
            return Vec::new();
        }

        // Pass accounting.
        if s.dirty_sync_count != self.pass {
            let finished = self.pass;
            let size = self.pass_peak;
            self.pass = s.dirty_sync_count;
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

        // Rate fallback: QEMU's dirty rate (per sync) against the stream's current rate.
        let dirty_b_s = s.dirty_pages_rate as f64 * s.page_size_bytes.max(1) as f64;
        let sent_b_s = s.mbps * 1e6 / 8.0;
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
                s.dirty_sync_count,
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
                s.dirty_sync_count,
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
            // Fresh evidence for the next step.
            self.best_dirty_set = None;
            self.passes_without_progress = 0;
            self.settle_pass = self.pass;
            self.high_ratio_since = None;
            self.settle_until_ms = elapsed_ms + STALL_RATIO_MS;
        }
        decision.into_iter().collect()
    }

    fn escalate(
        &mut self,
        evidence: String,
        s: &MigrationStats,
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
                        self.budget_ms,
                        s.expected_downtime_ms.unwrap_or(0)
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
            let throttle_now = s.cpu_throttle_percent.unwrap_or(0);
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

    const V10: QemuVersion = QemuVersion {
        major: 10,
        minor: 0,
        micro: 2,
    };

    fn req() -> MigrateVm {
        MigrateVm {
            to: "h2".into(),
            downtime_ms: None,
            deadline_ms: None,
            bandwidth_mbit: None,
            allow_postcopy: false,
            dry_run: false,
        }
    }

    fn meas(memory_mib: u64, dirty: f64, link_mbit: f64) -> Measurements {
        Measurements {
            memory_mib,
            dirty_rate_mib_s: dirty,
            link_mbit,
        }
    }

    fn hosts(cores: u32) -> HostBudget {
        HostBudget {
            spare_cores: cores,
            qemu: V10,
        }
    }

    fn has(s: &MigrationSettings, prefix: &str) -> String {
        s.reasons
            .iter()
            .find(|r| r.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` reason in {:#?}", s.reasons))
            .clone()
    }

    #[test]
    fn fast_link_many_cores_uses_plain_multifd_paced_at_the_link() {
        // 25 Gbit/s ≈ 2980 MiB/s: three plain streams.
        let s = choose_settings(&req(), &meas(8192, 50.0, 25_000.0), &hosts(8));
        assert_eq!(s.multifd_channels, 3);
        assert_eq!(s.compression, "none");
        // Paced at 1.1× the measured 2980 MiB/s.
        assert_eq!(s.max_bandwidth_mib_s, Some(3279));
        assert_eq!(s.zero_page_detection, "multifd");
        assert!(has(&s, "max-bandwidth").contains("paced"));
        // No measurement: nothing to pace by.
        let u = choose_settings(&req(), &meas(8192, 50.0, f64::NAN), &hosts(8));
        assert_eq!(u.max_bandwidth_mib_s, None);
        assert!(has(&u, "max-bandwidth").contains("unlimited"));
        assert!(has(&s, "compression").contains("CPU the bottleneck"));
        assert_eq!(s.downtime_budget_ms, DEFAULT_DOWNTIME_MS);
        // 2980 MiB/s against 50 MiB/s dirtied: passes shrink 60×, start low.
        assert_eq!(s.downtime_limit_ms, DEFAULT_DOWNTIME_MS / 10);
        assert!(s.auto_converge);
        assert!(!s.postcopy_allowed);
        // 8 GiB at ~2980 MiB/s is 2.7 s a copy: the floor wins.
        assert_eq!(s.deadline_ms, DEADLINE_FLOOR_MS);
        // One reason per decision, all non-empty.
        for p in [
            "max-bandwidth",
            "post-copy",
            "compression",
            "multifd",
            "zero pages",
            "downtime",
            "throttling",
            "deadline",
        ] {
            has(&s, p);
        }
    }

    #[test]
    fn channels_are_limited_by_cores_and_grow_with_memory() {
        let s = choose_settings(&req(), &meas(8192, 0.0, 100_000.0), &hosts(2));
        assert_eq!(s.multifd_channels, 2);
        // Big memory on a 10 Gbit link: memory asks for channels, too.
        let s = choose_settings(&req(), &meas(65536, 0.0, 10_000.0), &hosts(32));
        assert_eq!(s.multifd_channels, 16);
        // Small VM, 10 Gbit: one stream is enough.
        let s = choose_settings(&req(), &meas(1024, 0.0, 8000.0), &hosts(8));
        assert_eq!(s.multifd_channels, 0);
        assert_eq!(s.zero_page_detection, "legacy");
        assert!(has(&s, "multifd").contains("off"));
    }

    #[test]
    fn zstd_only_when_the_link_is_the_bottleneck() {
        // 1 Gbit/s ≈ 119 MiB/s, 4 spare cores ≈ 800 MiB/s of zstd: compress.
        let s = choose_settings(&req(), &meas(4096, 10.0, 1000.0), &hosts(4));
        assert_eq!(s.compression, "zstd");
        assert_eq!(s.multifd_channels, 2);
        assert!(has(&s, "compression").contains("bottleneck"));
        // Same link, one spare core: 200 MiB/s is less than twice 119: do not.
        let s = choose_settings(&req(), &meas(4096, 10.0, 1000.0), &hosts(1));
        assert_eq!(s.compression, "none");
        // No spare core at all.
        let s = choose_settings(&req(), &meas(4096, 10.0, 1000.0), &hosts(0));
        assert_eq!(s.compression, "none");
        assert_eq!(s.multifd_channels, 0);
        assert!(has(&s, "compression").contains("no spare core"));
        // A user cap makes the stream the bottleneck on a fast link.
        let r = MigrateVm {
            bandwidth_mbit: Some(800),
            ..req()
        };
        let s = choose_settings(&r, &meas(4096, 10.0, 40_000.0), &hosts(4));
        assert_eq!(s.compression, "zstd");
        assert_eq!(s.max_bandwidth_mib_s, Some(95));
        assert!(has(&s, "max-bandwidth").contains("user's cap"));
    }

    #[test]
    fn postcopy_only_if_asked_and_then_without_multifd_on_qemu_10_0() {
        let r = MigrateVm {
            allow_postcopy: true,
            ..req()
        };
        let s = choose_settings(&r, &meas(8192, 10.0, 25_000.0), &hosts(8));
        assert!(s.postcopy_allowed);
        assert_eq!(s.multifd_channels, 0);
        assert_eq!(s.compression, "none");
        assert!(has(&s, "post-copy").contains("cannot combine"));
        let newer = HostBudget {
            spare_cores: 8,
            qemu: QemuVersion {
                major: 10,
                minor: 1,
                micro: 0,
            },
        };
        let s = choose_settings(&r, &meas(8192, 10.0, 25_000.0), &newer);
        assert_eq!(s.multifd_channels, 3);
        let s = choose_settings(&req(), &meas(8192, 10.0, 25_000.0), &hosts(8));
        assert!(!s.postcopy_allowed);
        assert!(has(&s, "post-copy").contains("not allowed"));
    }

    #[test]
    fn downtime_budget_and_deadline() {
        let r = MigrateVm {
            downtime_ms: Some(1000),
            ..req()
        };
        // An idle guest: extra passes cost nothing, start at a tenth of the budget.
        let s = choose_settings(&r, &meas(1024, 0.0, 1000.0), &hosts(0));
        assert_eq!(s.downtime_budget_ms, 1000);
        assert_eq!(s.downtime_limit_ms, 100);
        assert!(has(&s, "downtime").contains("a tenth"), "{:#?}", s.reasons);
        // 1 Gbit/s ≈ 119 MiB/s: 64 MiB/s dirtied shrinks 1.9× a pass, 90 MiB/s 1.3×,
        // 110 MiB/s 1.1×.
        let s = choose_settings(&r, &meas(1024, 64.0, 1000.0), &hosts(0));
        assert_eq!(s.downtime_limit_ms, 100);
        assert!(has(&s, "downtime").contains("1.9×"), "{:#?}", s.reasons);
        assert!(has(&s, "downtime").contains("about 1"), "{:#?}", s.reasons);
        let s = choose_settings(&r, &meas(1024, 90.0, 1000.0), &hosts(0));
        assert_eq!(s.downtime_limit_ms, 250);
        let s = choose_settings(&r, &meas(1024, 110.0, 1000.0), &hosts(0));
        assert_eq!(s.downtime_limit_ms, 500);
        assert!(
            has(&s, "downtime").contains("only 1.1×"),
            "{:#?}",
            s.reasons
        );
        let r = MigrateVm {
            downtime_ms: Some(1),
            ..req()
        };
        let s = choose_settings(&r, &meas(1024, 0.0, 1000.0), &hosts(0));
        assert_eq!(s.downtime_budget_ms, MIN_DOWNTIME_MS);
        assert_eq!(s.downtime_limit_ms, MIN_DOWNTIME_MS);
        // 64 GiB over 1 Gbit/s: 549 s a copy → ten copies.
        let s = choose_settings(&req(), &meas(65536, 0.0, 1000.0), &hosts(0));
        assert!(
            (5_400_000..5_600_000).contains(&s.deadline_ms),
            "{}",
            s.deadline_ms
        );
        // Huge and slow: capped.
        let s = choose_settings(&req(), &meas(1 << 20, 0.0, 100.0), &hosts(0));
        assert_eq!(s.deadline_ms, DEADLINE_CAP_MS);
        let r = MigrateVm {
            deadline_ms: Some(5000),
            ..req()
        };
        let s = choose_settings(&r, &meas(1 << 20, 0.0, 100.0), &hosts(0));
        assert_eq!(s.deadline_ms, 5000);
        assert!(has(&s, "deadline").contains("as asked"));
        // No link measurement: assumed, and said so.
        let s = choose_settings(&req(), &meas(1024, 0.0, f64::NAN), &hosts(0));
        assert!(has(&s, "link bandwidth").contains("assuming"));
        assert!(s.deadline_ms >= DEADLINE_FLOOR_MS);
    }

    #[test]
    fn throttle_plan_follows_the_dirty_rate() {
        // Quiet guest: armed only.
        let s = choose_settings(&req(), &meas(1024, 5.0, 1000.0), &hosts(0));
        assert_eq!(s.throttle.trigger_threshold_pct, 100);
        assert!(has(&s, "throttling").contains("safety net"));
        // Dirtying 2× what the link carries: start hard.
        let s = choose_settings(&req(), &meas(1024, 240.0, 1000.0), &hosts(0));
        assert_eq!(s.throttle.trigger_threshold_pct, 50);
        assert_eq!(s.throttle.initial_pct, 75);
        assert!(has(&s, "throttling").contains("expected"));
    }

    // ---- watcher ----

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

    fn sample(pass: u64, remaining_mib: u64, dirty_mib_s: u64, sent_mib_s: u64) -> MigrationStats {
        let mut s = MigrationStats::from_qmp(&serde_json::json!({"status": "active"}));
        s.dirty_sync_count = pass;
        s.remaining_bytes = remaining_mib * MIB;
        s.page_size_bytes = 4096;
        s.dirty_pages_rate = dirty_mib_s * 256;
        s.mbps = sent_mib_s as f64 * 8.0 * 1.048576;
        s.expected_downtime_ms = Some(400);
        s
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
        let done = MigrationStats::from_qmp(&serde_json::json!({"status": "completed"}));
        assert!(w.observe(t + 100, &done).is_empty());
        assert!(w.observe(999_999_999, &done).is_empty());
    }

    #[test]
    fn stalled_pre_copy_escalates_step_by_step() {
        let mut w = ConvergenceWatcher::new(&settings(false, 600_000));
        let mut t = 0;
        // Dirtying slower than sending (no rate stall), but the dirty set stays at 64 MiB.
        assert!(feed_pass(&mut w, &mut t, 1, 1024, 50, 100).is_empty());
        let mut actions = Vec::new();
        for pass in 2..40 {
            for d in feed_pass(&mut w, &mut t, pass, 64, 50, 100) {
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
        // Pass 2 lasts long: the guest dirties 4 MiB/s, 2 MiB/s are sent.
        let mut first = None;
        for i in 0..100 {
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
        // Pass 2 began at t=400; the ratio must hold for STALL_RATIO_MS.
        assert!(when >= 400 + STALL_RATIO_MS, "{when}");
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
        pc.status = MigrationStatus::PostcopyActive;
        assert!(w.observe(20_000, &pc).is_empty());
    }

    #[test]
    fn no_decisions_past_pre_copy() {
        let mut w = ConvergenceWatcher::new(&settings(false, 1_000));
        let mut s = sample(3, 10, 1, 100);
        s.status = MigrationStatus::PreSwitchover;
        assert!(w.observe(5_000, &s).is_empty());
        s.status = MigrationStatus::Active;
        assert!(w.observe(6_000, &s).is_empty());
    }
}
