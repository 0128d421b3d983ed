//! Host health (proactive evacuation): the center judges the counters each agent sends with
//! its heartbeats, marks a host degraded when one crosses its limit (or an operator says so),
//! and acts on the cluster's proactive mode: off (shown only), recommend (an event names the
//! signal and the command), automatic (the host is emptied live at once, see
//! [`crate::maintenance::evacuate`]). A degraded host takes no new VMs in any mode.
//!
//! Counters are judged against a baseline: what the host reported when this center first
//! heard from it, or when an operator last restored it. Errors from before that degrade
//! nothing, so a restarted center does not re-degrade a repaired host, and a counter that goes
//! down (a reboot reset it) becomes the new baseline.
//!
//! The default limits ([`LIMITS`]; the config file's `[health]` table sets others): an
//! uncorrected memory error, a machine
//! check or a disk I/O error degrade at once; corrected memory errors and NIC errors only in
//! numbers; CPU pressure only when the host stands out from the others of its cluster for
//! two minutes (pressure that every host shares is not fixed by moving VMs around).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tern_api::health::{HealthFinding, HealthReport, HealthSignal, HostHealth, ProactiveMode};
use uuid::Uuid;

use crate::app::{lock, App, HealthTracker as Tracker};
use crate::error::CenterError;
use crate::store::{HostRecord, NewEvent, StoreError, Tx};

/// When a signal degrades a host (kept with the center's settings, which may change them).
pub use crate::config::{HealthLimits as Limits, DEFAULT_HEALTH_LIMITS as LIMITS};

impl Tracker {
    fn new(cluster: Uuid, first: HealthReport) -> Tracker {
        Tracker {
            cluster,
            baseline: first.clone(),
            last: first,
            crashes: 0,
            disconnections: 0,
            pressure_since: None,
        }
    }

    /// Takes a new report: a counter the baseline lacks, or that went down, is rebased.
    fn observe(&mut self, now: &HealthReport) {
        let b = &mut self.baseline;
        for (base, cur) in [
            (&mut b.memory_corrected, now.memory_corrected),
            (&mut b.memory_uncorrected, now.memory_uncorrected),
            (&mut b.machine_checks, now.machine_checks),
            (&mut b.disk_errors, now.disk_errors),
            (&mut b.nic_errors, now.nic_errors),
        ] {
            if let Some(c) = cur {
                if base.is_none_or(|v| c < v) {
                    *base = Some(c);
                }
            }
        }
        self.last = now.clone();
    }

    /// Forgets everything seen so far (an operator restored the host).
    fn rebase(&mut self) {
        self.baseline = self.last.clone();
        self.crashes = 0;
        self.disconnections = 0;
        self.pressure_since = None;
    }
}

/// The findings `t` holds now, given the latest reports of the cluster's other hosts.
pub fn assess(
    t: &mut Tracker,
    others: &[HealthReport],
    limits: &Limits,
    now: DateTime<Utc>,
) -> Vec<HealthFinding> {
    let mut out = Vec::new();
    let mut finding = |signal: HealthSignal, detail: String| {
        out.push(HealthFinding {
            signal,
            detail,
            at: now,
        })
    };
    let (b, n) = (&t.baseline, &t.last);
    for (signal, base, cur, limit, source) in [
        (
            HealthSignal::MemoryUncorrected,
            b.memory_uncorrected,
            n.memory_uncorrected,
            limits.memory_uncorrected,
            "EDAC",
        ),
        (
            HealthSignal::MemoryCorrected,
            b.memory_corrected,
            n.memory_corrected,
            limits.memory_corrected,
            "EDAC",
        ),
        (
            HealthSignal::MachineCheck,
            b.machine_checks,
            n.machine_checks,
            limits.machine_checks,
            "/proc/interrupts",
        ),
        (
            HealthSignal::DiskErrors,
            b.disk_errors,
            n.disk_errors,
            limits.disk_errors,
            "the storage disk's ioerr_cnt",
        ),
        (
            HealthSignal::NicErrors,
            b.nic_errors,
            n.nic_errors,
            limits.nic_errors,
            "the migration interface",
        ),
    ] {
        if let (Some(base), Some(cur)) = (base, cur) {
            if cur.saturating_sub(base) >= limit {
                finding(
                    signal,
                    format!("{base} → {cur} ({source}; the limit is {limit} more)"),
                );
            }
        }
    }
    if t.crashes >= limits.qemu_crashes {
        finding(
            HealthSignal::QemuCrashes,
            format!(
                "{} VM processes exited unasked (the limit is {})",
                t.crashes, limits.qemu_crashes
            ),
        );
    }
    if t.disconnections >= limits.disconnections {
        finding(
            HealthSignal::MissedHeartbeats,
            format!(
                "its heartbeats stopped for the whole timeout {} times (the limit is {})",
                t.disconnections, limits.disconnections
            ),
        );
    }
    // Pressure counts only where this host stands out: every host of a cluster sharing it is
    // a capacity problem, which moving VMs around does not fix.
    let pressed = (!others.is_empty()).then(|| {
        let k = others.len() as f64;
        let steal = others.iter().map(|o| o.cpu_steal_percent).sum::<f64>() / k;
        let rq = others.iter().map(|o| o.run_queue_per_core).sum::<f64>() / k;
        let by_steal = n.cpu_steal_percent >= limits.steal_percent
            && n.cpu_steal_percent - steal >= limits.steal_margin;
        let by_queue = n.run_queue_per_core >= limits.run_queue
            && n.run_queue_per_core - rq >= limits.run_queue_margin;
        (by_steal || by_queue).then(|| {
            format!(
                "steal {:.0}% and run queue {:.1} per core, against {:.0}% and {:.1} on the \
                 cluster's other hosts",
                n.cpu_steal_percent, n.run_queue_per_core, steal, rq
            )
        })
    });
    match pressed.flatten() {
        Some(detail) => {
            let since = *t.pressure_since.get_or_insert(now);
            let lasted = (now - since).num_seconds();
            if lasted >= limits.pressure_s {
                finding(
                    HealthSignal::CpuPressure,
                    format!("{detail}, for {lasted} s"),
                );
            }
        }
        None => t.pressure_since = None,
    }
    out
}

/// What a heartbeat asks of the center after its transaction: empty a host live.
#[derive(Debug, Clone, PartialEq)]
pub struct Evacuation {
    pub host: String,
    pub why: String,
}

/// Judges a heartbeat's health report (inside the heartbeat's transaction): records the
/// counters and any new finding, with an event naming the signal. Returns the evacuation to
/// start when the host just became degraded in a cluster whose proactive mode is automatic.
pub fn on_heartbeat(
    app: &App,
    tx: &Tx,
    host: &HostRecord,
    report: Option<&HealthReport>,
    crashes: u64,
    reconnected: bool,
    now: DateTime<Utc>,
) -> Result<Option<Evacuation>, StoreError> {
    let Some(report) = report else {
        return Ok(None);
    };
    let found = {
        let mut trackers = lock(&app.health);
        let t = trackers
            .entry(host.id)
            .or_insert_with(|| Tracker::new(host.cluster_id, report.clone()));
        t.cluster = host.cluster_id;
        t.observe(report);
        t.crashes += crashes;
        t.disconnections += u64::from(reconnected);
        let others: Vec<HealthReport> = trackers
            .iter()
            .filter(|(id, o)| **id != host.id && o.cluster == host.cluster_id)
            .map(|(_, o)| o.last.clone())
            .collect();
        let t = trackers.get_mut(&host.id).expect("inserted above");
        assess(t, &others, &app.config.health_limits, now)
    };
    let mode = tx.drs_settings(host.cluster_id)?.proactive;
    let mut health = host.health.clone();
    health.report = Some(report.clone());
    let was_degraded = health.is_degraded();
    for f in found {
        let known = health
            .degraded
            .iter()
            .chain(&health.ignored)
            .any(|d| d.signal == f.signal);
        if known {
            continue;
        }
        if mode == ProactiveMode::Off {
            tx.add_event(
                NewEvent::info(format!(
                    "host {} reports {f}; the cluster's proactive mode is off, so nothing is \
                     done (tern drs set {} --proactive recommend|automatic acts on it)",
                    host.name, host.cluster
                ))
                .host(Some(&host.name)),
                now,
            )?;
            health.ignored.push(f);
        } else {
            tx.add_event(
                NewEvent::warning(format!(
                    "host {} is degraded: {f}; nothing new is placed there",
                    host.name
                ))
                .host(Some(&host.name)),
                now,
            )?;
            health.degraded.push(f);
        }
    }
    tx.set_host_health(host.id, &health)?;
    if was_degraded || !health.is_degraded() {
        return Ok(None);
    }
    act(tx, host, mode, &health, now)
}

/// What the proactive mode does with a host that just became degraded: automatic asks for
/// an evacuation, recommend and off record what the operator may do.
fn act(
    tx: &Tx,
    host: &HostRecord,
    mode: ProactiveMode,
    health: &HostHealth,
    now: DateTime<Utc>,
) -> Result<Option<Evacuation>, StoreError> {
    let why = health.summary();
    let running: Vec<String> = tx
        .vms_on_host(host.id)?
        .iter()
        .filter(|v| v.actual == tern_api::PowerState::Running)
        .map(|v| v.name().to_string())
        .collect();
    if running.is_empty() {
        return Ok(None);
    }
    match mode {
        ProactiveMode::Automatic => Ok(Some(Evacuation {
            host: host.name.clone(),
            why,
        })),
        ProactiveMode::Recommend | ProactiveMode::Off => {
            tx.add_event(
                NewEvent::warning(format!(
                    "recommendation: empty degraded host {} ({why}) with tern host evacuate {}; \
                     VMs on it: {} (proactive mode {mode}: nothing moves by itself)",
                    host.name,
                    host.name,
                    running.join(", ")
                ))
                .host(Some(&host.name)),
                now,
            )?;
            Ok(None)
        }
    }
}

/// Starts an evacuation the health judgement asked for; a host already being emptied is
/// left to the task doing it.
pub async fn start_evacuation(app: &Arc<App>, e: Evacuation) {
    if let Err(err) = crate::maintenance::evacuate(app, e.host.clone(), e.why).await {
        tracing::warn!(host = e.host, "proactive evacuation not started: {err}");
    }
}

/// Names of the VMs on a host, for its API view.
fn vm_names(tx: &Tx, host: Uuid) -> Result<Vec<String>, StoreError> {
    Ok(tx
        .vms_on_host(host)?
        .iter()
        .map(|v| v.name().to_string())
        .collect())
}

/// `PUT /hosts/{name}/health`: an operator marks a host degraded, with the reason. The
/// cluster's proactive mode then acts as for any signal (automatic empties it).
pub async fn degrade(
    app: &Arc<App>,
    name: String,
    reason: String,
    actor: String,
) -> Result<tern_api::center::Host, CenterError> {
    if !tern_api::health::valid_reason(&reason) {
        return Err(CenterError::invalid(
            "reason must be 1 to 200 printable characters on one line",
        ));
    }
    let (host, evac) = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let host = tx
                .host_by_name(&name)?
                .ok_or_else(|| CenterError::host_not_found(&name))?;
            let mut health = host.health.clone();
            let was = health.is_degraded();
            health
                .degraded
                .retain(|f| f.signal != HealthSignal::Operator);
            health.degraded.push(HealthFinding {
                signal: HealthSignal::Operator,
                detail: reason.clone(),
                at: now,
            });
            tx.set_host_health(host.id, &health)?;
            tx.add_event(
                NewEvent::warning(format!(
                    "host {name} is degraded: marked by {actor}: {reason}; nothing new is \
                     placed there"
                ))
                .host(Some(&name))
                .actor(actor.clone()),
                now,
            )?;
            let mode = tx.drs_settings(host.cluster_id)?.proactive;
            let evac = if was {
                None
            } else {
                act(tx, &host, mode, &health, now)?
            };
            let vms = vm_names(tx, host.id)?;
            let host = HostRecord { health, ..host };
            Ok::<_, CenterError>((host.to_api(vms), evac))
        })
        .await?;
    if let Some(e) = evac {
        start_evacuation(app, e).await;
    }
    Ok(host)
}

/// `DELETE /hosts/{name}/health`: the host is repaired; it takes VMs again and its counters
/// are judged from their values now.
pub async fn restore(
    app: &Arc<App>,
    name: String,
    actor: String,
) -> Result<tern_api::center::Host, CenterError> {
    let (id, host) = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let host = tx
                .host_by_name(&name)?
                .ok_or_else(|| CenterError::host_not_found(&name))?;
            if let Some(t) = crate::maintenance::active_emptying(tx, &name)? {
                return Err(CenterError::conflict(format!(
                    "task {} is emptying host {name}: wait for it, or cancel it with tern \
                     task cancel {}",
                    t.id, t.id
                )));
            }
            let was = host.health.summary();
            let health = HostHealth {
                degraded: vec![],
                ignored: vec![],
                report: host.health.report.clone(),
            };
            tx.set_host_health(host.id, &health)?;
            let msg = if was.is_empty() {
                format!("host {name} restored by {actor} (it was not degraded)")
            } else {
                format!(
                    "host {name} restored by {actor}: it takes VMs again (it was degraded: \
                     {was})"
                )
            };
            tx.add_event(
                NewEvent::info(msg).host(Some(&name)).actor(actor.clone()),
                now,
            )?;
            let vms = vm_names(tx, host.id)?;
            let id = host.id;
            let host = HostRecord { health, ..host };
            Ok::<_, CenterError>((id, host.to_api(vms)))
        })
        .await?;
    if let Some(t) = lock(&app.health).get_mut(&id) {
        t.rebase();
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ue: u64, ce: u64) -> HealthReport {
        HealthReport {
            memory_uncorrected: Some(ue),
            memory_corrected: Some(ce),
            ..Default::default()
        }
    }

    fn signals(f: &[HealthFinding]) -> Vec<HealthSignal> {
        f.iter().map(|f| f.signal).collect()
    }

    #[test]
    fn counters_are_judged_from_the_baseline() {
        let now = Utc::now();
        // Old errors (before the baseline) degrade nothing.
        let mut t = Tracker::new(Uuid::nil(), report(5, 40));
        assert!(assess(&mut t, &[], &LIMITS, now).is_empty());
        t.observe(&report(5, 49));
        assert!(assess(&mut t, &[], &LIMITS, now).is_empty());
        t.observe(&report(6, 50));
        let f = assess(&mut t, &[], &LIMITS, now);
        assert_eq!(
            signals(&f),
            vec![
                HealthSignal::MemoryUncorrected,
                HealthSignal::MemoryCorrected
            ]
        );
        assert!(f[0].detail.starts_with("5 → 6"), "{}", f[0].detail);
        // A restore starts over from the values now.
        t.rebase();
        assert!(assess(&mut t, &[], &LIMITS, now).is_empty());
    }

    #[test]
    fn the_configured_limits_decide() {
        let now = Utc::now();
        let lenient = Limits {
            memory_corrected: 50,
            ..LIMITS
        };
        let mut t = Tracker::new(Uuid::nil(), report(0, 0));
        t.observe(&report(0, 20));
        // 20 corrected errors degrade by default, not under a limit of 50.
        assert_eq!(
            signals(&assess(&mut t, &[], &LIMITS, now)),
            vec![HealthSignal::MemoryCorrected]
        );
        let mut t = Tracker::new(Uuid::nil(), report(0, 0));
        t.observe(&report(0, 20));
        assert!(assess(&mut t, &[], &lenient, now).is_empty());
        t.observe(&report(0, 50));
        assert_eq!(
            signals(&assess(&mut t, &[], &lenient, now)),
            vec![HealthSignal::MemoryCorrected]
        );
    }

    #[test]
    fn a_counter_that_went_down_is_the_new_baseline() {
        let now = Utc::now();
        let mut t = Tracker::new(Uuid::nil(), report(3, 0));
        t.observe(&report(0, 0)); // the host rebooted
        t.observe(&report(1, 0));
        assert_eq!(
            signals(&assess(&mut t, &[], &LIMITS, now)),
            vec![HealthSignal::MemoryUncorrected]
        );
        // A counter the baseline lacked starts there.
        let mut t = Tracker::new(Uuid::nil(), HealthReport::default());
        t.observe(&report(7, 0));
        assert!(assess(&mut t, &[], &LIMITS, now).is_empty());
    }

    #[test]
    fn crashes_and_disconnections_count_up_to_their_limits() {
        let now = Utc::now();
        let mut t = Tracker::new(Uuid::nil(), HealthReport::default());
        t.crashes = 2;
        t.disconnections = 2;
        assert!(assess(&mut t, &[], &LIMITS, now).is_empty());
        t.crashes = 3;
        t.disconnections = 3;
        assert_eq!(
            signals(&assess(&mut t, &[], &LIMITS, now)),
            vec![HealthSignal::QemuCrashes, HealthSignal::MissedHeartbeats]
        );
    }

    #[test]
    fn pressure_counts_only_when_the_host_stands_out_for_long() {
        let t0 = Utc::now();
        let hot = HealthReport {
            cpu_steal_percent: 40.0,
            run_queue_per_core: 1.0,
            ..Default::default()
        };
        let calm = HealthReport {
            cpu_steal_percent: 2.0,
            run_queue_per_core: 0.5,
            ..Default::default()
        };
        let mut t = Tracker::new(Uuid::nil(), hot.clone());
        // Alone in its cluster, or with others as hot: nothing.
        assert!(assess(&mut t, &[], &LIMITS, t0).is_empty());
        let later = t0 + chrono::Duration::seconds(300);
        assert!(assess(&mut t, std::slice::from_ref(&hot), &LIMITS, later).is_empty());
        // Standing out: only once it has lasted the window.
        assert!(assess(&mut t, std::slice::from_ref(&calm), &LIMITS, t0).is_empty());
        let early = t0 + chrono::Duration::seconds(60);
        assert!(assess(&mut t, std::slice::from_ref(&calm), &LIMITS, early).is_empty());
        let late = t0 + chrono::Duration::seconds(121);
        assert_eq!(
            signals(&assess(&mut t, std::slice::from_ref(&calm), &LIMITS, late)),
            vec![HealthSignal::CpuPressure]
        );
        // A calm sample resets the window.
        t.observe(&calm);
        assert!(assess(&mut t, std::slice::from_ref(&calm), &LIMITS, late).is_empty());
        t.observe(&hot);
        assert!(assess(&mut t, &[calm], &LIMITS, late).is_empty());
    }
}
