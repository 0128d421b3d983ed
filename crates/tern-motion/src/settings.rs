//! The settings a migration starts with, chosen from the request, the measured link and dirty
//! rate, and what the two hosts can spare. Every choice comes with its reason.

use tern_api::migration::{
    Compression, Measurements, MigrateVm, MigrationEncryption, MigrationSettings, ThrottlePlan,
    ZeroPageDetection,
};

use crate::version::QemuVersion;

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
/// What one encrypted stream carries: QEMU writes one TLS record (and one system call) per
/// page. Measured on the 2-core lab machine: 130–180 MiB/s per stream on loopback, against
/// 330+ MiB/s in clear.
pub const TLS_CHANNEL_MIB_S: f64 = 150.0;
/// What one stream carries through the hosts' relays (`tern host relay`), which seal 16 KiB
/// records in large writes: 611 MiB of a 1 GiB guest crossed loopback in 1.05 s over one
/// relayed stream (in 2.3 s over QEMU's TLS with two channels).
pub const RELAY_CHANNEL_MIB_S: f64 = 500.0;
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
/// How long QEMU's throttle lets a vCPU run between two sleeps (`CPU_THROTTLE_TIMESLICE_NS`).
pub const THROTTLE_RUN_MS: f64 = 10.0;
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
    /// The stream will be encrypted: QEMU's TLS costs CPU for every page (one record each),
    /// so a stream carries less and more channels are wanted.
    pub encrypted: bool,
    /// ...by the hosts' relays, not QEMU: then a page costs no record of its own, and the
    /// stream is judged as a clear one that carries [`RELAY_CHANNEL_MIB_S`].
    pub relayed: bool,
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
                 paced so TCP does not overrun the bottleneck, and re-judged from the stream's \
                 own rate if it runs at this cap; pass a bandwidth cap to protect other traffic"
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
    // Unmeasured: judged from QEMU's first pass (`ConvergenceWatcher`), started as if light.
    let dirty_mib_s = m
        .dirty_rate_mib_s
        .filter(|d| d.is_finite())
        .map(|d| d.max(0.0));

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

    // Channels and compression. Encrypted, the stream takes a core whatever is chosen (the
    // migration thread sealing one TLS record per page, or a multifd thread compressing and
    // sealing whole packets), so with no core to spare that one core compresses: measured on
    // the 2-core lab with both hosts' load at 100%, an idle 1 GiB guest took 6.1–6.6 s over
    // one TLS stream and 2.9–3.2 s compressed over one channel (107 MiB on the wire, not 610).
    // Relayed, QEMU streams in clear and the relays' records are large: only QEMU's own TLS
    // is judged by its per-page cost below. A relayed stream also keeps one core when none is
    // spare, for a link slower than that core compresses: the copy's threads weigh in the
    // moved VM's own group, and compressed the copy ends sooner (measured on the lab at
    // 1 Gbit/s with no core spare: an idle 1 GiB guest took 5.5 s uncompressed, 3.0 s
    // compressed).
    let qemu_tls = hosts.encrypted && !hosts.relayed;
    let cores = if hosts.encrypted {
        hosts.spare_cores.max(1)
    } else {
        hosts.spare_cores
    }
    .min(MAX_CHANNELS);
    // In clear, compress only where the link is the bottleneck by far. Encrypted, a page costs
    // a TLS record either way, and a compressed packet goes as a few large records instead of
    // one per page: measured on loopback, 610 MiB of guest memory took 3.7 s over one TLS
    // stream and 1.8 s compressed over two (108 MiB on the wire). So compress whenever the
    // spare cores compress what encrypted streams could carry on this link.
    // Relayed, a page costs no record of its own, but every byte on the wire is sealed and
    // opened once more: compress whenever the spare cores compress what the link carries
    // (measured on the lab at 1 Gbit/s, 1 GiB guest: 5.5 s idle and 12.5 s dirtying 64 MiB/s
    // relayed uncompressed, 611 MiB on the wire; 3.5 s and 5.5 s compressed to 108 MiB), not
    // on links faster than they compress.
    let compress = multifd_possible
        && cores >= 1
        && if qemu_tls {
            bw_mib_s.min(cores as f64 * TLS_CHANNEL_MIB_S) <= cores as f64 * ZSTD_CHANNEL_MIB_S
        } else if hosts.encrypted {
            bw_mib_s <= cores as f64 * ZSTD_CHANNEL_MIB_S
        } else {
            bw_mib_s * 2.0 <= cores as f64 * ZSTD_CHANNEL_MIB_S
                && bw_mib_s < PLAIN_CHANNEL_MIB_S / 2.0
        };
    let (channels, compression) = if !multifd_possible {
        (0, Compression::None)
    } else if compress {
        let n = ((2.0 * bw_mib_s / ZSTD_CHANNEL_MIB_S).ceil() as u32).clamp(1, cores);
        // (Encrypted on a fast link this is every spare core: each compresses less than the
        // link carries.)
        reasons.push(if qemu_tls && hosts.spare_cores == 0 {
            "compression: zstd — the stream is encrypted and no core is spare: the one core \
             the stream takes anyway goes further compressing packets and sealing them in a \
             few TLS records than sealing pages one by one"
                .to_string()
        } else if hosts.encrypted && !qemu_tls && hosts.spare_cores == 0 {
            format!(
                "compression: zstd — no core is spare, but one compresses about {:.0} MiB/s, \
                 more than the link ({bw_mib_s:.0} MiB/s) carries, and the copy's threads \
                 weigh in the moved VM's own group: compressed, the copy ends sooner",
                ZSTD_CHANNEL_MIB_S
            )
        } else if hosts.encrypted && !qemu_tls {
            format!(
                "compression: zstd — {cores} spare core(s) compress about {:.0} MiB/s, at \
                 least what the link ({bw_mib_s:.0} MiB/s) carries, so the relays seal fewer \
                 bytes and the link carries fewer",
                cores as f64 * ZSTD_CHANNEL_MIB_S
            )
        } else if qemu_tls {
            format!(
                "compression: zstd — the stream is encrypted, and compressed packets cost far \
                 fewer TLS records than pages one by one; {cores} spare core(s) compress about \
                 {:.0} MiB/s, as much as encrypted streams carry on this {bw_mib_s:.0} MiB/s \
                 link",
                cores as f64 * ZSTD_CHANNEL_MIB_S
            )
        } else {
            format!(
                "compression: zstd — the link ({bw_mib_s:.0} MiB/s) is the bottleneck: {cores} \
                 spare core(s) compress about {:.0} MiB/s, at least twice what it carries",
                cores as f64 * ZSTD_CHANNEL_MIB_S
            )
        });
        reasons.push(format!(
            "multifd: {n} channel(s), enough zstd threads to compress twice the link's {bw_mib_s:.0} MiB/s"
        ));
        (n, Compression::Zstd)
    } else {
        let per_channel = if qemu_tls {
            TLS_CHANNEL_MIB_S
        } else if hosts.encrypted {
            RELAY_CHANNEL_MIB_S
        } else {
            PLAIN_CHANNEL_MIB_S
        };
        let by_bw = (bw_mib_s / per_channel).ceil() as u32;
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
                "multifd: {n} channels — {by_bw} for {bw_mib_s:.0} MiB/s at ~{per_channel:.0} \
                 MiB/s per {}stream, {by_mem} for {} MiB of memory to scan, limited to {cores} \
                 spare core(s)",
                if hosts.encrypted { "encrypted " } else { "" },
                m.memory_mib
            ));
            (n, Compression::None)
        } else {
            reasons.push(format!(
                "multifd: off — one stream carries {bw_mib_s:.0} MiB/s and scans {} MiB \
                 (spare cores: {cores})",
                m.memory_mib
            ));
            (0, Compression::None)
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
        ZeroPageDetection::Multifd
    } else {
        reasons.push(
            "zero pages: found by the migration thread and sent as a flag (legacy detection)"
                .into(),
        );
        ZeroPageDetection::Legacy
    };

    // Downtime (`downtime_start`): raised to the budget (then throttling) only if pre-copy
    // stalls.
    let budget = req
        .downtime_ms
        .unwrap_or(DEFAULT_DOWNTIME_MS)
        .clamp(MIN_DOWNTIME_MS, MAX_DOWNTIME_MS);
    let (initial, why) = match dirty_mib_s {
        Some(d) => downtime_start(budget, bw_mib_s / d),
        None => (
            budget / 10,
            format!(
                "a tenth of the {budget} ms budget: the dirty rate is not measured up front \
                 (copying starts at once), and the limit is raised after QEMU's first pass if \
                 the guest's passes shrink slowly"
            ),
        ),
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
    let throttle = match dirty_mib_s.and_then(|d| throttle_plan(d, bw_mib_s)) {
        Some((plan, why)) => {
            reasons.push(format!("throttling: expected — {why}"));
            plan
        }
        None => {
            reasons.push(match dirty_mib_s {
                Some(d) => format!(
                    "throttling: auto-converge armed as a safety net only (QEMU throttles only \
                     if the guest dirties more than it sends): the guest dirties {d:.1} MiB/s, \
                     {:.0}% of the {bw_mib_s:.0} MiB/s the stream can carry",
                    d / bw_mib_s * 100.0
                ),
                None => "throttling: auto-converge armed as a safety net (QEMU throttles only \
                         if the guest dirties more than it sends), made ready to throttle after \
                         QEMU's first pass if the guest dirties half of what is sent"
                    .into(),
            });
            ThrottlePlan {
                trigger_threshold_pct: 100,
                ..ThrottlePlan::default()
            }
        }
    };

    // A throttled vCPU sleeps between its 10 ms runs, and its clients see each sleep as a
    // stall: none may outlast the downtime budget, the longest stall the user accepted.
    let max_pct = max_throttle_pct(budget);
    let throttle = ThrottlePlan {
        max_pct,
        initial_pct: throttle.initial_pct.min(max_pct),
        ..throttle
    };
    reasons.push(format!(
        "throttle ceiling: {max_pct}%, where the guest runs 10 ms and sleeps {:.0} ms, within \
         the {budget} ms downtime budget (QEMU's own 99% sleeps 990 ms at a time)",
        throttle_sleep_ms(max_pct)
    ));

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
        compression,
        auto_converge: true,
        postcopy_allowed: req.allow_postcopy,
        deadline_ms,
        reasons,
        downtime_budget_ms: budget,
        zero_page_detection,
        throttle,
        paced_from_link_mbit: (req.bandwidth_mbit.filter(|c| *c > 0).is_none()
            && max_bandwidth_mib_s.is_some())
        .then_some(link_mbit),
        // The cluster's policy decides, through `choose_encryption`, and the hosts whether
        // their relays carry it.
        encrypted: false,
        relayed: false,
        relay_source: None,
    }
}

/// Whether a migration's stream is encrypted: the cluster's `policy` against the hosts whose
/// QEMU cannot do TLS (`lacking`, by name). Returns the decision and its reason line, or the
/// refusal when the policy requires what a host cannot do.
pub fn choose_encryption(
    policy: MigrationEncryption,
    lacking: &[&str],
) -> Result<(bool, String), String> {
    const HOW: &str = "TLS 1.3 (the hosts' relays, or QEMU's own TLS where a host has no \
                       relay) with a key made for this migration alone, held only by the two \
                       hosts, so nobody else can read the stream or feed the destination";
    match (policy, lacking) {
        (MigrationEncryption::Disabled, _) => Ok((
            false,
            "encryption: off, as the cluster's policy says (disabled): the guest's memory \
             crosses the migration network in clear"
                .into(),
        )),
        (policy, []) => Ok((
            true,
            format!("encryption: on (cluster policy {policy}): {HOW}"),
        )),
        (MigrationEncryption::Opportunistic, lacking) => Ok((
            false,
            format!(
                "encryption: off — the cluster's policy is opportunistic and QEMU on {} has no \
                 TLS (tls-creds-psk)",
                lacking.join(", ")
            ),
        )),
        (MigrationEncryption::Required, lacking) => Err(format!(
            "the cluster requires encrypted migration and QEMU on {} has no TLS \
             (tls-creds-psk): install a QEMU built with GnuTLS there, or set the cluster's \
             migration encryption to opportunistic",
            lacking.join(", ")
        )),
    }
}

/// The downtime limit to start from when each extra pre-copy pass shrinks what is left
/// `shrink`× (bandwidth ÷ dirty rate), and why. The budget is a ceiling, not a target: when
/// passes shrink fast, a few short ones buy a pause far under it; when they shrink slowly,
/// passes are long and gain little, so start nearer the budget.
pub fn downtime_start(budget: u64, shrink: f64) -> (u64, String) {
    // Pre-copy the passes from the budget down to `limit` add, in ms (see FAST_SHRINK).
    let extra_ms = |limit: u64| {
        if shrink.is_finite() {
            format!("about {:.0} ms", (budget - limit) as f64 / (shrink - 1.0))
        } else {
            "nothing (nothing is dirtied)".to_string()
        }
    };
    if shrink >= FAST_SHRINK {
        (
            budget / 10,
            format!(
                "a tenth of the {budget} ms budget: each extra pass shrinks what is left {}, so \
                 the passes that take the pause down to it add {} of pre-copy",
                if shrink.is_finite() {
                    format!("{shrink:.1}×")
                } else {
                    "to nothing".into()
                },
                extra_ms(budget / 10)
            ),
        )
    } else if shrink >= SLOW_SHRINK {
        (
            budget / 4,
            format!(
                "a quarter of the {budget} ms budget: each extra pass shrinks what is left only \
                 {shrink:.1}×, so the passes down to it add {} of pre-copy",
                extra_ms(budget / 4)
            ),
        )
    } else {
        (
            budget / 2,
            format!(
                "half the {budget} ms budget: each extra pass shrinks what is left only \
                 {shrink:.1}×, so passes are long and gain little"
            ),
        )
    }
}

/// How long QEMU's throttle at `pct`% sleeps a vCPU after each 10 ms it lets it run.
pub fn throttle_sleep_ms(pct: u8) -> f64 {
    let t = f64::from(pct.min(99)) / 100.0;
    t / (1.0 - t) * THROTTLE_RUN_MS
}

/// The steepest throttle (percent) whose sleeps ([`throttle_sleep_ms`]) fit `budget_ms`;
/// never below 50% (a 10 ms sleep), never above QEMU's 99%.
pub fn max_throttle_pct(budget_ms: u64) -> u8 {
    let budget = budget_ms as f64;
    let t = budget / (budget + THROTTLE_RUN_MS);
    ((t * 100.0).floor() as u8).clamp(50, 99)
}

/// The throttle plan for a guest dirtying `dirty_mib_s` against a stream of `sent_mib_s`, when
/// throttling is to be expected (the guest dirties at least [`THROTTLE_EXPECTED_RATIO`] of it),
/// and why; `None`: auto-converge stays a safety net.
pub fn throttle_plan(dirty_mib_s: f64, sent_mib_s: f64) -> Option<(ThrottlePlan, String)> {
    let ratio = dirty_mib_s / sent_mib_s;
    if ratio.is_nan() || ratio < THROTTLE_EXPECTED_RATIO {
        return None;
    }
    // A throttle t leaves (1 - t) of the dirty rate: aim at half the bandwidth.
    let initial_pct = ((1.0 - THROTTLE_EXPECTED_RATIO / ratio) * 100.0)
        .round()
        .clamp(20.0, 80.0) as u8;
    Some((
        ThrottlePlan {
            trigger_threshold_pct: crate::converge::EXPECTED_TRIGGER_THRESHOLD_PCT,
            initial_pct,
            ..ThrottlePlan::default()
        },
        format!(
            "the guest dirties {dirty_mib_s:.1} MiB/s, {:.0}% of the {sent_mib_s:.0} MiB/s the \
             stream can carry; auto-converge starts at {initial_pct}% once QEMU sees dirtying \
             outpace sending (dirty-limit needs KVM's dirty ring)",
            ratio * 100.0
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{hosts, meas, req};

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
        assert_eq!(s.compression, Compression::None);
        // Paced at 1.1× the measured 2980 MiB/s.
        assert_eq!(s.max_bandwidth_mib_s, Some(3279));
        assert_eq!(s.zero_page_detection, ZeroPageDetection::Multifd);
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
            "throttle ceiling",
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
        assert_eq!(s.zero_page_detection, ZeroPageDetection::Legacy);
        assert!(has(&s, "multifd").contains("off"));
    }

    #[test]
    fn zstd_only_when_the_link_is_the_bottleneck() {
        // 1 Gbit/s ≈ 119 MiB/s, 4 spare cores ≈ 800 MiB/s of zstd: compress.
        let s = choose_settings(&req(), &meas(4096, 10.0, 1000.0), &hosts(4));
        assert_eq!(s.compression, Compression::Zstd);
        assert_eq!(s.multifd_channels, 2);
        assert!(has(&s, "compression").contains("bottleneck"));
        // Same link, one spare core: 200 MiB/s is less than twice 119: do not.
        let s = choose_settings(&req(), &meas(4096, 10.0, 1000.0), &hosts(1));
        assert_eq!(s.compression, Compression::None);
        // No spare core at all.
        let s = choose_settings(&req(), &meas(4096, 10.0, 1000.0), &hosts(0));
        assert_eq!(s.compression, Compression::None);
        assert_eq!(s.multifd_channels, 0);
        assert!(has(&s, "compression").contains("no spare core"));
        // Encrypted, no spare core: the core the stream takes anyway compresses.
        let enc = HostBudget {
            encrypted: true,
            ..hosts(0)
        };
        let s = choose_settings(&req(), &meas(1024, 0.0, 15_000.0), &enc);
        assert_eq!(s.compression, Compression::Zstd);
        assert_eq!(s.multifd_channels, 1);
        assert!(has(&s, "compression").contains("no core is spare"));
        // A user cap makes the stream the bottleneck on a fast link.
        let r = MigrateVm {
            bandwidth_mbit: Some(800),
            ..req()
        };
        let s = choose_settings(&r, &meas(4096, 10.0, 40_000.0), &hosts(4));
        assert_eq!(s.compression, Compression::Zstd);
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
        assert_eq!(s.compression, Compression::None);
        assert!(has(&s, "post-copy").contains("cannot combine"));
        let newer = HostBudget {
            encrypted: false,
            relayed: false,
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
    fn encryption_follows_the_cluster_policy_and_what_the_hosts_can() {
        use MigrationEncryption::*;
        assert!(matches!(choose_encryption(Required, &[]), Ok((true, _))));
        assert!(matches!(
            choose_encryption(Opportunistic, &[]),
            Ok((true, _))
        ));
        assert!(matches!(choose_encryption(Disabled, &[]), Ok((false, _))));
        assert!(matches!(
            choose_encryption(Disabled, &["h2"]),
            Ok((false, _))
        ));
        let (on, why) = choose_encryption(Opportunistic, &["h2"]).unwrap();
        assert!(!on && why.contains("h2"), "{why}");
        let refusal = choose_encryption(Required, &["h1", "h2"]).unwrap_err();
        assert!(refusal.contains("h1, h2"), "{refusal}");
        // The settings alone never encrypt: the policy decides.
        assert!(!choose_settings(&req(), &meas(1024, 10.0, 1000.0), &hosts(4)).encrypted);
    }

    #[test]
    fn an_encrypted_stream_is_compressed_over_the_channels_the_link_needs() {
        // Post-copy allowed on QEMU 10.0: no multifd, so no compression either.
        let fast = meas(1024, 10.0, 5_000.0);
        let enc = HostBudget {
            encrypted: true,
            ..hosts(8)
        };
        let postcopy = MigrateVm {
            allow_postcopy: true,
            ..req()
        };
        assert_eq!(choose_settings(&postcopy, &fast, &enc).multifd_channels, 0);
        // Encrypted and compressed: as many zstd channels as the link needs, at most the
        // spare cores; in clear one stream carries ~600 MiB/s.
        assert_eq!(
            choose_settings(&req(), &fast, &hosts(8)).multifd_channels,
            0
        );
        let tls = choose_settings(&req(), &fast, &enc);
        assert_eq!(
            (tls.compression, tls.multifd_channels),
            (Compression::Zstd, 6),
            "{:#?}",
            tls.reasons
        );
        let two = HostBudget {
            encrypted: true,
            ..hosts(2)
        };
        assert_eq!(choose_settings(&req(), &fast, &two).multifd_channels, 2);
    }

    #[test]
    fn a_relayed_stream_is_judged_as_a_clear_one_that_carries_less() {
        let relayed = |cores| HostBudget {
            encrypted: true,
            relayed: true,
            ..hosts(cores)
        };
        // A link faster than two spare cores compress: QEMU's TLS would compress on both;
        // relayed, nothing is compressed, and two streams carry what two relays seal.
        let fast = meas(1024, 10.0, 5_000.0);
        let tls = HostBudget {
            encrypted: true,
            ..hosts(2)
        };
        assert_eq!(
            choose_settings(&req(), &fast, &tls).compression,
            Compression::Zstd
        );
        let s = choose_settings(&req(), &fast, &relayed(2));
        assert_eq!(s.compression, Compression::None, "{:#?}", s.reasons);
        assert_eq!(s.multifd_channels, 2, "{:#?}", s.reasons);
        assert!(has(&s, "multifd: 2 channels").contains("per encrypted stream"));
        // 1 Gbit/s and one spare core: the core compresses more than the link carries, so
        // compressed (a clear stream would not be).
        let gbit = meas(1024, 10.0, 1000.0);
        let s = choose_settings(&req(), &gbit, &relayed(1));
        assert_eq!(s.compression, Compression::Zstd, "{:#?}", s.reasons);
        assert!(has(&s, "compression: zstd").contains("the relays seal fewer bytes"));
        assert_eq!(
            choose_settings(&req(), &gbit, &hosts(1)).compression,
            Compression::None
        );
        // No spare core: relayed on a fast link, nothing is compressed; on a link slower than
        // one core compresses, that one core compresses.
        let s = choose_settings(&req(), &meas(1024, 0.0, 15_000.0), &relayed(0));
        assert_eq!(s.compression, Compression::None, "{:#?}", s.reasons);
        let s = choose_settings(&req(), &gbit, &relayed(0));
        assert_eq!(
            (s.compression, s.multifd_channels),
            (Compression::Zstd, 1),
            "{:#?}",
            s.reasons
        );
        assert!(has(&s, "compression: zstd").contains("no core is spare"));
    }

    #[test]
    fn an_encrypted_stream_is_compressed_when_the_cores_keep_up_with_the_link() {
        let gbit = meas(1024, 10.0, 1000.0);
        let one = HostBudget {
            encrypted: true,
            ..hosts(1)
        };
        let s = choose_settings(&req(), &gbit, &one);
        assert_eq!(
            (s.compression, s.multifd_channels),
            (Compression::Zstd, 1),
            "{:#?}",
            s.reasons
        );
        has(&s, "compression: zstd — the stream is encrypted");
        // In clear, one spare core does not compress a 1 Gbit/s link.
        let plain = choose_settings(&req(), &gbit, &hosts(1));
        assert_eq!(plain.compression, Compression::None);
        // A faster link too: one encrypted stream would carry less than one core compresses.
        let s = choose_settings(&req(), &meas(1024, 10.0, 15_000.0), &one);
        assert_eq!((s.compression, s.multifd_channels), (Compression::Zstd, 1));
    }

    #[test]
    fn no_throttle_sleep_outlasts_the_downtime_budget() {
        for budget in [
            MIN_DOWNTIME_MS,
            100,
            DEFAULT_DOWNTIME_MS,
            1000,
            MAX_DOWNTIME_MS,
        ] {
            let pct = max_throttle_pct(budget);
            assert!(
                throttle_sleep_ms(pct) <= budget as f64,
                "{budget} ms: {pct}%"
            );
            // One step steeper would outlast it (or QEMU's ceiling is reached).
            assert!(
                pct == 99 || throttle_sleep_ms(pct + 1) > budget as f64,
                "{budget} ms: {pct}%"
            );
        }
        assert_eq!(max_throttle_pct(DEFAULT_DOWNTIME_MS), 96);
        assert_eq!(max_throttle_pct(MAX_DOWNTIME_MS), 99);
        let s = choose_settings(&req(), &meas(8192, 500.0, 1000.0), &hosts(8));
        assert_eq!(s.throttle.max_pct, 96);
        assert!(s.throttle.initial_pct <= s.throttle.max_pct);
        assert!(
            has(&s, "throttle ceiling").contains("96%"),
            "{:?}",
            s.reasons
        );
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
}
