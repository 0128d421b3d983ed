//! DRS in the center: the cluster snapshot the `tern-drs` engine reads, placement of VMs
//! (created without a host, or started while their host is unusable), per-cluster DRS
//! settings, balance recommendations, applying them as live migrations (task `drs_apply`)
//! and the scheduler loop.
//!
//! The engine is pure; this module feeds it the inventory and the load figures agents send
//! with their heartbeats (per-VM CPU of the QEMU process; memory demand is the VM's configured
//! size, since a guest may touch all of it). A migration pre-check a host fails becomes a
//! must-not-run-on rule, so the engine never proposes what the center would refuse. A VM's
//! latest committed migration feeds the engine's cooldown (a VM that just moved does not move
//! again within the hour, nor back to where it came from within four).
//!
//! Automation (per cluster, default `manual`): `manual` and `partially` record the
//! recommendations as an event when they change; `fully` applies them on the scheduler's
//! period (`drs_period_ms`) and when a host joins. Placement (creation, start) happens at
//! every level: the user asked the center to choose.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tern_api::center::{EventLevel, Task, TaskKind, TaskState};
use tern_api::drs::{
    DrsApplied, DrsApplyResult, DrsAutomation, DrsRecommendation, DrsRecommendations, DrsRule,
    DrsRuleKind, DrsSettings, DRS_THRESHOLDS,
};
use tern_api::evc::CheckKind;
use tern_api::migration::MigrateVm;
use tern_api::{HostState, PowerState};
use tern_drs::{
    explain, BalancePlan, LastMigration, Placement, Rule, Snapshot, Threshold, VmHostRelation,
};
use tokio::sync::watch;
use uuid::Uuid;

use crate::app::{lock, App};
use crate::error::CenterError;
use crate::migrate::MoveClass;
use crate::store::{
    HostRecord, MigrationRow, NewEvent, StoreError, TaskIntent, TaskRecord, VmRecord,
};
use crate::tasks::{self, TaskCtl, TaskEnd};

/// How often a migration task is polled.
const POLL: Duration = Duration::from_millis(300);
/// Longest a single migration is awaited (its own deadline normally ends it far sooner).
const MIGRATION_WAIT: Duration = Duration::from_secs(3600);

/// Failed destination pre-checks of one VM, by host name: (check, detail).
pub type Refused = HashMap<String, Vec<(String, String)>>;

// ---------- the snapshot ----------

/// Dry-runs the migration pre-checks of `vm` against every usable host of its cluster but
/// `skip_host`; returns the failed destination checks by host. A stopped VM gets its CPU
/// resolved afresh when it starts, so for it the CPU check is whether the host can run the
/// VM's CPU under the cluster's mode, not its recorded one.
pub async fn prechecks(app: &Arc<App>, vm: &VmRecord, skip_host: &str) -> Refused {
    let cluster = vm.cluster_id;
    let cluster_name = vm.cluster.clone();
    let (hosts, mode) = app
        .db
        .read(move |tx| {
            let mode = tx.cluster(&cluster_name)?.and_then(|c| c.evc_mode);
            Ok::<_, StoreError>((tx.hosts_in_cluster(cluster)?, mode))
        })
        .await
        .unwrap_or_default();
    let stopped = vm.actual != PowerState::Running;
    let mut out = HashMap::new();
    for h in hosts.iter().filter(|h| h.usable() && h.name != skip_host) {
        let mut failed: Vec<(String, String)> =
            match crate::evc::can_migrate(app, vm.name().to_string(), h.name.clone()).await {
                Ok(r) => r
                    .checks
                    .into_iter()
                    // `state` is about the VM, not the host; the plan decides memory fit
                    // over several moves itself (a stopped VM moves alone: the check holds).
                    .filter(|c| !c.ok && !c.check.about_the_vm())
                    .filter(|c| stopped || c.check != CheckKind::Memory)
                    .filter(|c| !(stopped && c.check == CheckKind::Cpu))
                    .map(|c| (c.check.to_string(), c.detail))
                    .collect(),
                Err(e) => vec![("pre-checks".into(), e.into_message())],
            };
        if stopped {
            if let Err(e) = crate::evc::resolve(&vm.spec, mode.as_deref(), h) {
                failed.push(("cpu".into(), e));
            }
        }
        if !failed.is_empty() {
            out.insert(h.name.clone(), failed);
        }
    }
    out
}

/// Must-not-run-on rules from failed pre-checks.
pub fn precheck_rules<'a>(refused: impl IntoIterator<Item = (&'a str, &'a Refused)>) -> Vec<Rule> {
    let mut rules = Vec::new();
    for (vm, by_host) in refused {
        let mut hosts: Vec<&String> = by_host.keys().collect();
        hosts.sort();
        for host in hosts {
            let checks: Vec<&str> = by_host[host].iter().map(|(c, _)| c.as_str()).collect();
            rules.push(Rule::VmHost {
                name: format!("pre-check {} of {vm} on {host}", checks.join("+")),
                vms: vec![vm.to_string()],
                host_group: host.clone(),
                relation: VmHostRelation::MustNotRunOn,
            });
        }
    }
    rules
}

/// " (pre-checks: h2: cpu: …; h3: storage: …)" or "" when every host passed.
pub fn precheck_text(refused: &Refused) -> String {
    if refused.is_empty() {
        return String::new();
    }
    let mut hosts: Vec<&String> = refused.keys().collect();
    hosts.sort();
    let parts: Vec<String> = hosts
        .iter()
        .map(|h| {
            let checks: Vec<String> = refused[*h]
                .iter()
                .map(|(c, d)| format!("{c}: {d}"))
                .collect();
            format!("{h}: {}", checks.join(", "))
        })
        .collect();
    format!(" (pre-checks: {})", parts.join("; "))
}

/// The DRS snapshot of a cluster as the store has it now, with `rules`; `placing` is a VM
/// added without a host.
pub async fn cluster_snapshot(
    app: &Arc<App>,
    cluster_id: Uuid,
    rules: Vec<Rule>,
    placing: Option<Uuid>,
) -> Result<Snapshot, String> {
    let (hosts, vms, user_rules, in_flight, pools, cpus) = app
        .db
        .read(move |tx| {
            let hosts = tx.hosts_in_cluster(cluster_id)?;
            let vms: Vec<VmRecord> = tx
                .vms()?
                .into_iter()
                .filter(|v| v.cluster_id == cluster_id)
                .collect();
            Ok::<_, StoreError>((
                hosts,
                vms,
                tx.drs_rules(cluster_id)?,
                tx.unfinished_migrations()?,
                tx.pools(cluster_id)?,
                tx.vm_cpus()?,
            ))
        })
        .await
        .map_err(|e| format!("center store: {e}"))?;
    let mut snap = drs_snapshot(&hosts, &vms, placing, rules);
    add_cpu_fit(&mut snap, &hosts, &vms, &cpus);
    add_user_rules(&mut snap, &user_rules);
    add_pools(&mut snap, &vms, &pools);
    add_in_flight(&mut snap, &hosts, &vms, &in_flight);
    Ok(snap)
}

/// CPU fit in a snapshot: what each host's CPU offers and what each powered-on VM's recorded
/// CPU needs, as the tokens the migration pre-check agrees with (`tern_cpu::migrate`). A VM
/// with no CPU record (or not started with it) needs nothing: its CPU is resolved at start.
/// A host that reported no capability is left unmodelled: the pre-checks refuse it, with
/// that reason, as a rule.
pub fn add_cpu_fit(
    snap: &mut Snapshot,
    hosts: &[HostRecord],
    vms: &[VmRecord],
    cpus: &HashMap<Uuid, crate::store::VmCpuRow>,
) {
    let offered: HashMap<&str, Vec<String>> = hosts
        .iter()
        .filter_map(|h| match crate::evc::capability(&h.facts) {
            Ok(Some(cap)) => Some((h.name.as_str(), tern_cpu::migrate::host_fit_tokens(&cap))),
            _ => None,
        })
        .collect();
    for h in &mut snap.hosts {
        h.cpu_features = offered.get(h.name.as_str()).cloned();
    }
    let by_name: HashMap<&str, Uuid> = vms.iter().map(|v| (v.name(), v.id)).collect();
    for v in &mut snap.vms {
        if v.host.is_none() {
            continue;
        }
        let row = by_name.get(v.name.as_str()).and_then(|id| cpus.get(id));
        if let Some(row) = row.filter(|r| r.powered_on) {
            v.cpu_features = tern_cpu::migrate::vm_fit_tokens(&row.cpu);
        }
    }
}

/// The cluster's resource pools in a snapshot, and each VM's pool.
pub fn add_pools(
    snap: &mut Snapshot,
    vms: &[VmRecord],
    pools: &[(String, tern_api::pools::PoolSettings)],
) {
    snap.pools = pools
        .iter()
        .map(|(name, s)| tern_drs::Pool {
            name: name.clone(),
            parent: s.parent.clone(),
            cpu: tern_drs::PoolCpu {
                reservation_mhz: s.cpu.reservation_mhz.unwrap_or(0) as f64,
                limit_mhz: s.cpu.limit_mhz.map(|l| l as f64),
                shares: drs_shares(s.cpu.shares),
                expandable_reservation: s.cpu.expandable,
            },
            memory: tern_drs::PoolMemory {
                reservation_mib: s.memory.reservation_mib.unwrap_or(0) as f64,
                limit_mib: s.memory.limit_mib.map(|l| l as f64),
                shares: drs_shares(s.memory.shares),
                expandable_reservation: s.memory.expandable,
            },
        })
        .collect();
    let pool_of: HashMap<&str, &str> = vms
        .iter()
        .filter_map(|v| v.pool.as_deref().map(|p| (v.name(), p)))
        .collect();
    for v in &mut snap.vms {
        v.pool = pool_of.get(v.name.as_str()).map(|p| p.to_string());
    }
}

/// Counts migrations in flight on both hosts: the VM stays on its source in the snapshot
/// (it runs there until the commit), and its destination already gives it the room it is
/// being handed (its memory, and its CPU demand), so no plan promises that room twice.
pub fn add_in_flight(
    snap: &mut Snapshot,
    hosts: &[HostRecord],
    vms: &[VmRecord],
    in_flight: &[MigrationRow],
) {
    for m in in_flight {
        let Some(vm) = vms.iter().find(|v| v.id == m.vm_id) else {
            continue;
        };
        // Committed: the store already has it on the destination.
        if vm.host_id == Some(m.dest_host_id) {
            continue;
        }
        let Some(dest) = hosts.iter().find(|h| h.id == m.dest_host_id) else {
            continue;
        };
        let demand = snap
            .vms
            .iter()
            .find(|v| v.name == vm.name())
            .map_or(0.0, |v| v.cpu_demand_mhz);
        if let Some(h) = snap.hosts.iter_mut().find(|h| h.name == dest.name) {
            h.memory_mib = (h.memory_mib - vm.spec.memory_mib as f64).max(1.0);
            h.cpu_mhz = (h.cpu_mhz - demand).max(1.0);
        }
    }
}

/// The host group a VM-host rule's hosts form in the engine's snapshot.
fn rule_group(rule: &str) -> String {
    format!("rule:{rule}")
}

/// Adds the cluster's placement rules to a snapshot: each rule binds the VMs of it the
/// snapshot holds (a stopped VM is not placed, so it binds nothing), and a VM-host rule's
/// hosts form a host group of the rule's own.
pub fn add_user_rules(snap: &mut Snapshot, rules: &[DrsRule]) {
    let present: HashSet<String> = snap.vms.iter().map(|v| v.name.clone()).collect();
    for r in rules {
        let vms: Vec<String> = r
            .vms
            .iter()
            .filter(|v| present.contains(v.as_str()))
            .cloned()
            .collect();
        let relation = match r.kind {
            DrsRuleKind::Affinity | DrsRuleKind::AntiAffinity => {
                if vms.len() < 2 {
                    continue;
                }
                snap.rules.push(if r.kind == DrsRuleKind::Affinity {
                    Rule::Affinity {
                        name: r.name.clone(),
                        vms,
                    }
                } else {
                    Rule::AntiAffinity {
                        name: r.name.clone(),
                        vms,
                    }
                });
                continue;
            }
            DrsRuleKind::MustRunOn => VmHostRelation::MustRunOn,
            DrsRuleKind::MustNotRunOn => VmHostRelation::MustNotRunOn,
            DrsRuleKind::ShouldRunOn => VmHostRelation::ShouldRunOn,
            DrsRuleKind::ShouldNotRunOn => VmHostRelation::ShouldNotRunOn,
        };
        if vms.is_empty() {
            continue;
        }
        let group = rule_group(&r.name);
        for h in snap.hosts.iter_mut().filter(|h| r.hosts.contains(&h.name)) {
            h.groups.push(group.clone());
        }
        snap.rules.push(Rule::VmHost {
            name: r.name.clone(),
            vms,
            host_group: group,
            relation,
        });
    }
}

/// A DRS snapshot of one cluster from the inventory: hosts with their state and capacity
/// (memory minus what the stopped VMs placed there hold), the running VMs where they run
/// with their CPU demand from the last heartbeat and their configured memory as demand (a
/// guest may touch all of it), `placing` as a VM without a host, and `rules`. Each host is
/// also a host group of its own name, so rules can name single hosts.
pub fn drs_snapshot(
    hosts: &[HostRecord],
    vms: &[VmRecord],
    placing: Option<Uuid>,
    rules: Vec<Rule>,
) -> Snapshot {
    let mut cpu_pct: HashMap<Uuid, f64> = HashMap::new();
    for h in hosts {
        for l in h.load.iter().flat_map(|l| &l.vms) {
            cpu_pct.insert(l.vm_id, l.cpu_percent);
        }
    }
    let by_id: HashMap<Uuid, &HostRecord> = hosts.iter().map(|h| (h.id, h)).collect();
    let mut stopped_mib: HashMap<Uuid, u64> = HashMap::new();
    let mut drs_vms = Vec::new();
    for v in vms {
        let host = v.host_id.and_then(|h| by_id.get(&h));
        let runs = matches!(
            v.actual,
            PowerState::Running | PowerState::Paused | PowerState::Unknown
        );
        if Some(v.id) != placing && !runs {
            if let Some(h) = host {
                *stopped_mib.entry(h.id).or_default() += v.spec.memory_mib;
            }
            continue;
        }
        let mut d = tern_drs::Vm::new(v.name(), v.spec.vcpus, v.spec.memory_mib as f64);
        d.host = if Some(v.id) == placing {
            None
        } else {
            host.map(|h| h.name.clone())
        };
        let mhz = host.map(|h| f64::from(h.facts.cpu_mhz)).unwrap_or(2000.0);
        d.cpu_demand_mhz = cpu_pct.get(&v.id).copied().unwrap_or(0.0) / 100.0 * mhz;
        d.memory_demand_mib = v.spec.memory_mib as f64;
        let r = &v.spec.resources;
        let core_mhz = mhz.max(1.0) as u32;
        d.cpu_reservation_mhz = r.cpu_reservation.map_or(0.0, |a| a.mhz(core_mhz));
        d.cpu_limit_mhz = r.cpu_limit.map(|a| a.mhz(core_mhz));
        d.memory_reservation_mib = r.memory_reservation_mib.map_or(0.0, |m| m as f64);
        d.memory_limit_mib = r.memory_limit_mib.map(|m| m as f64);
        d.cpu_shares = drs_shares(r.cpu_shares);
        d.memory_shares = drs_shares(r.memory_shares);
        drs_vms.push(d);
    }
    let drs_hosts = hosts
        .iter()
        .map(|h| {
            let total = h.facts.memory_mib as f64;
            let stopped = stopped_mib.get(&h.id).copied().unwrap_or(0) as f64;
            tern_drs::Host {
                name: h.name.clone(),
                cpu_mhz: (f64::from(h.facts.cores) * f64::from(h.facts.cpu_mhz)).max(1.0),
                memory_mib: (total - stopped).max(1.0),
                state: match h.state() {
                    HostState::Connected if h.health.is_degraded() => tern_drs::HostState::Degraded,
                    HostState::Connected => tern_drs::HostState::Connected,
                    HostState::Maintenance => tern_drs::HostState::Maintenance,
                    HostState::Disconnected => tern_drs::HostState::Disconnected,
                },
                groups: vec![h.name.clone()],
                cpu_features: None,
            }
        })
        .collect();
    // A rule naming a VM the snapshot left out (it stopped meanwhile) would void the snapshot.
    let names: HashSet<&str> = drs_vms.iter().map(|v| v.name.as_str()).collect();
    let rules = rules
        .into_iter()
        .filter(|r| r.vms().iter().all(|v| names.contains(v.as_str())))
        .collect();
    Snapshot {
        now_s: Utc::now().timestamp().max(0) as u64,
        config: tern_drs::Config::default(),
        hosts: drs_hosts,
        vms: drs_vms,
        rules,
        pools: vec![],
    }
}

// ---------- placement ----------

/// Where the engine puts a VM that is not in the store yet (`new`, with `host_id` None),
/// among the cluster's `hosts` but those in `refused` (host name → why). `vms` are the
/// cluster's VMs.
pub fn place_new(
    hosts: &[HostRecord],
    vms: &[VmRecord],
    new: &VmRecord,
    refused: &Refused,
) -> Result<Placement, String> {
    let mut all = vms.to_vec();
    all.push(new.clone());
    let rules = precheck_rules([(new.name(), refused)]);
    let snap = drs_snapshot(hosts, &all, Some(new.id), rules);
    match tern_drs::place(&snap, new.name()) {
        Ok(p) => Ok(p),
        Err(tern_drs::PlaceError::Admission(f)) => Err(format!(
            "{}{}",
            explain::admission_failure(&f),
            precheck_text(refused)
        )),
        Err(e) => Err(format!("the scheduler cannot place VM {}: {e}", new.name())),
    }
}

/// The engine's reason for a placement, one line.
pub fn placement_reason(p: &Placement) -> String {
    explain::placement(p).trim_end().replace('\n', ";")
}

/// Before a stopped VM starts: if its host cannot run it (maintenance, disconnected), the
/// engine picks another among those passing the pre-checks and the VM is re-homed there
/// (ownership generation bumped, the old host told to forget it). Does nothing when the host
/// is usable or the VM is not stopped.
pub async fn rehome_for_start(app: &Arc<App>, name: &str) -> Result<(), CenterError> {
    let n = name.to_string();
    let found = app
        .db
        .read(move |tx| {
            let Some(vm) = tx.vm_by_name(&n)? else {
                return Ok::<_, StoreError>(None);
            };
            let host = vm.host_id.map(|h| tx.host_by_id(h)).transpose()?.flatten();
            let ruled = tx
                .drs_rules(vm.cluster_id)?
                .iter()
                .any(|r| r.vms.contains(&n));
            Ok(Some((vm, host, ruled)))
        })
        .await?;
    let Some((vm, host, ruled)) = found else {
        return Ok(()); // the start itself answers 404
    };
    if !matches!(vm.actual, PowerState::Stopped | PowerState::Crashed) {
        return Ok(());
    }
    let usable = host.as_ref().is_some_and(HostRecord::usable);
    let r = &vm.spec.resources;
    let reserves = r.cpu_reservation.is_some() || r.memory_reservation_mib.is_some();
    if usable && !reserves && !ruled {
        return Ok(());
    }
    let old = host.as_ref().map(|h| h.name.clone()).unwrap_or_default();
    let refused = prechecks(app, &vm, &old).await;
    let rules = precheck_rules([(vm.name(), &refused)]);
    let snap = cluster_snapshot(app, vm.cluster_id, rules, Some(vm.id))
        .await
        .map_err(CenterError::internal)?;
    // Admission control: a VM with a reservation or a rule powers on only where the
    // reservation is honoured and the rules kept.
    let why_not = if usable {
        match tern_drs::admit_on(&snap, vm.name(), &old) {
            Ok(()) => return Ok(()),
            Err(tern_drs::PlaceError::Admission(f)) => format!(
                "cannot admit it ({})",
                match &f.pool {
                    Some(_) => explain::admission_failure(&f),
                    None => explain::rejections(&f.hosts),
                }
            ),
            Err(e) => return Err(CenterError::internal(format!("the scheduler failed: {e}"))),
        }
    } else {
        match host.as_ref().map(|h| (h.state(), h)) {
            Some((HostState::Maintenance, _)) => {
                "is in maintenance mode: VMs do not start there".to_string()
            }
            Some((HostState::Connected, h)) => format!(
                "is degraded ({}): nothing new starts there",
                h.health.summary()
            ),
            Some(_) => {
                "is disconnected: wait for its agent to reconnect (tern host list)".to_string()
            }
            None => "is gone".to_string(),
        }
    };
    let placed = match tern_drs::place(&snap, vm.name()) {
        Ok(p) if !p.over_high_water => p,
        Ok(p) => {
            return Err(CenterError::conflict(format!(
                "host {old} of VM {name} {why_not}, and no other host has room for it (the \
                 best, {}, would go over capacity)",
                p.host
            )))
        }
        Err(tern_drs::PlaceError::Admission(f)) => {
            return Err(CenterError::conflict(format!(
                "host {old} of VM {name} {why_not}, and no other host can take it: {}{}",
                explain::admission_failure(&f),
                precheck_text(&refused)
            )))
        }
        Err(e) => return Err(CenterError::internal(format!("the scheduler failed: {e}"))),
    };
    let reason = placement_reason(&placed);
    let (vm_id, generation, to, from) = (vm.id, vm.generation, placed.host.clone(), old.clone());
    let why_not = why_not.clone();
    let name2 = name.to_string();
    app.db
        .write(move |tx| {
            let dest = tx
                .host_by_name(&to)?
                .filter(HostRecord::usable)
                .ok_or_else(|| {
                    CenterError::conflict(format!("host {to} changed state; try again"))
                })?;
            tx.rehome_vm(vm_id, dest.id, generation)?;
            tx.add_event(
                NewEvent::info(format!(
                    "DRS placed VM {name2} on host {to} to start it (its host {from} \
                     {why_not}): {reason}"
                ))
                .vm(&name2)
                .host(Some(&to)),
                Utc::now(),
            )?;
            Ok::<_, CenterError>(())
        })
        .await?;
    // The old host keeps no copy of a VM it no longer owns (if it can be reached).
    if let Some(h) = host {
        if h.state() != HostState::Disconnected {
            if let Err(e) = app.agent(&h).delete(vm_id).await {
                tracing::warn!(vm = name, host = %h.name, "could not forget a re-homed VM: {e}");
            }
        }
    }
    Ok(())
}

// ---------- settings ----------

pub async fn settings(app: &Arc<App>, cluster: String) -> Result<DrsSettings, CenterError> {
    app.db
        .read(move |tx| {
            let id = tx
                .cluster_id(&cluster)?
                .ok_or_else(|| CenterError::cluster_not_found(&cluster))?;
            Ok::<_, CenterError>(tx.drs_settings(id)?)
        })
        .await
}

pub async fn set_settings(
    app: &Arc<App>,
    cluster: String,
    s: DrsSettings,
) -> Result<DrsSettings, CenterError> {
    if !DRS_THRESHOLDS.contains(&s.threshold) {
        return Err(CenterError::invalid(format!(
            "migration threshold {} is out of range: use 1 (mandatory moves only) to 5 (also \
             small gains)",
            s.threshold
        )));
    }
    let out = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let id = tx
                .cluster_id(&cluster)?
                .ok_or_else(|| CenterError::cluster_not_found(&cluster))?;
            let before = tx.drs_settings(id)?;
            tx.set_drs_settings(id, s, now)?;
            if before != s {
                tx.add_event(
                    NewEvent::info(format!(
                        "cluster {cluster}: DRS automation {} → {}, threshold {} → {}, \
                         proactive {} → {}",
                        before.automation,
                        s.automation,
                        before.threshold,
                        s.threshold,
                        before.proactive,
                        s.proactive
                    )),
                    now,
                )?;
            }
            Ok::<_, CenterError>(s)
        })
        .await?;
    app.drs.wake.notify_one();
    Ok(out)
}

// ---------- recommendations ----------

/// The engine's balance pass over a cluster now.
pub async fn recommend(app: &Arc<App>, cluster: String) -> Result<DrsRecommendations, CenterError> {
    let c2 = cluster.clone();
    let (id, settings, running, moved) = app
        .db
        .read(move |tx| {
            let id = tx
                .cluster_id(&c2)?
                .ok_or_else(|| CenterError::cluster_not_found(&c2))?;
            let running: Vec<VmRecord> = tx
                .vms()?
                .into_iter()
                .filter(|v| v.cluster_id == id && v.actual == PowerState::Running)
                .collect();
            Ok::<_, CenterError>((id, tx.drs_settings(id)?, running, tx.last_migrations()?))
        })
        .await?;
    let mut refused = Vec::new();
    for vm in &running {
        let r = prechecks(app, vm, vm.host.as_deref().unwrap_or_default()).await;
        refused.push((vm.name().to_string(), r));
    }
    let rules = precheck_rules(refused.iter().map(|(v, r)| (v.as_str(), r)));
    let mut snap = cluster_snapshot(app, id, rules, None)
        .await
        .map_err(CenterError::internal)?;
    let by_name: HashMap<&str, Uuid> = running.iter().map(|v| (v.name(), v.id)).collect();
    for v in &mut snap.vms {
        let last = by_name.get(v.name.as_str()).and_then(|id| moved.get(id));
        if let Some(m) = last {
            v.last_migration = Some(LastMigration {
                at_s: m.at.timestamp().max(0) as u64,
                from_host: m.from_host.clone(),
            });
        }
    }
    let threshold = Threshold::new(settings.threshold).unwrap_or_default();
    let plan = tern_drs::balance(&snap, threshold).map_err(|e| {
        CenterError::internal(format!("the scheduler cannot read the cluster: {e}"))
    })?;
    app.metrics.drs_pass(&cluster, plan.imbalance_before);
    Ok(recommendations(cluster, settings, &plan))
}

fn recommendations(
    cluster: String,
    settings: DrsSettings,
    plan: &BalancePlan,
) -> DrsRecommendations {
    DrsRecommendations {
        cluster,
        settings,
        imbalance_before: plan.imbalance_before,
        imbalance_after: plan.imbalance_after,
        recommendations: plan
            .moves
            .iter()
            .map(|m| DrsRecommendation {
                vm: m.vm.clone(),
                from_host: m.from_host.clone(),
                to_host: m.to_host.clone(),
                priority: m.priority,
                reason: explain::reason(&m.reason),
                imbalance_before: m.numbers.imbalance_before,
                imbalance_after: m.numbers.imbalance_after,
                detail: explain::move_line(m),
            })
            .collect(),
        text: explain::balance_plan(plan),
    }
}

// ---------- apply ----------

/// Queues a live migration of `vm` to `to` in the migration scheduler's `class`; the task is
/// kept in `children` (for a cancel to reach it) until [`wait_migration`] sees it end.
pub async fn start_migration(
    app: &Arc<App>,
    vm: &str,
    to: &str,
    class: MoveClass,
    children: &Mutex<Vec<Uuid>>,
) -> Result<Uuid, String> {
    let req = MigrateVm {
        to: to.to_string(),
        downtime_ms: None,
        deadline_ms: None,
        bandwidth_mbit: None,
        allow_postcopy: false,
        dry_run: false,
        probe_link: false,
    };
    let t = crate::migrate::migrate_vm_as(app, vm.to_string(), req, class)
        .await
        .map_err(|e| format!("the migration was refused: {}", e))?;
    lock(children).push(t.id);
    Ok(t.id)
}

/// Waits for migration task `id` (towards `to`) to end; `Ok(id)` when it succeeded.
pub async fn wait_migration(
    app: &Arc<App>,
    id: Uuid,
    to: &str,
    children: &Mutex<Vec<Uuid>>,
) -> Result<Uuid, String> {
    let done = wait_done(app, id).await;
    lock(children).retain(|c| *c != id);
    let done = done?;
    if done.state == TaskState::Succeeded {
        Ok(id)
    } else {
        Err(format!(
            "migration to {to} {} (task {id}): {}",
            done.state,
            done.error.as_deref().unwrap_or("no reason given")
        ))
    }
}

/// Waits for task `id` to end (at most [`MIGRATION_WAIT`]).
async fn wait_done(app: &Arc<App>, id: Uuid) -> Result<Task, String> {
    let deadline = tokio::time::Instant::now() + MIGRATION_WAIT;
    loop {
        let now = app
            .db
            .read(move |tx| tx.task(id))
            .await
            .map_err(|e| format!("center store: {e}"))?;
        match now {
            Some(r) if r.task.state.is_done() => return Ok(r.task),
            Some(_) => {}
            None => return Err(format!("migration task {id} vanished")),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "migration task {id} has not ended after {} s",
                MIGRATION_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Cancels the migration tasks still in flight (their parent task was cancelled).
pub async fn cancel_children(app: &Arc<App>, children: &Mutex<Vec<Uuid>>) -> Vec<String> {
    let ids: Vec<Uuid> = std::mem::take(&mut *lock(children));
    let mut failed = Vec::new();
    for child in ids {
        if let Err(e) = tasks::cancel(app, child).await {
            failed.push(format!(
                "the migration in flight (task {child}) goes on: {e}"
            ));
        }
    }
    failed
}

fn task_event(task: Uuid, level: EventLevel, msg: String) -> NewEvent {
    NewEvent::new(level, format!("task {task}: {msg}")).task(task)
}

/// Queues a `drs_apply` task for the cluster: the recommendations of a fresh pass run as live
/// migrations, several at once within the hosts' limits. `why` says who asked (an operator, the scheduler).
pub async fn apply(app: &Arc<App>, cluster: String, why: &str) -> Result<Task, CenterError> {
    let c2 = cluster.clone();
    let why = why.to_string();
    let rec = {
        // Checked and claimed under one lock so two applies of a cluster never overlap.
        let claim = lock(&app.drs.applying).get(&cluster).copied();
        if let Some(t) = claim {
            return Err(CenterError::conflict(format!(
                "task {t} is already applying the DRS recommendations of cluster {cluster}: \
                 follow it with tern task wait {t}"
            )));
        }
        let rec = app
            .db
            .write(move |tx| {
                let now = Utc::now();
                tx.cluster_id(&c2)?
                    .ok_or_else(|| CenterError::cluster_not_found(&c2))?;
                let rec = TaskRecord {
                    task: Task::queued(TaskKind::DrsApply, None, None, now),
                    vm_id: None,
                    intent: TaskIntent::default(),
                };
                tx.insert_task(&rec)?;
                tx.add_event(
                    task_event(
                        rec.task.id,
                        EventLevel::Info,
                        format!("applying the DRS recommendations of cluster {c2} ({why})"),
                    ),
                    now,
                )?;
                Ok::<_, CenterError>(rec)
            })
            .await?;
        let raced = {
            let mut map = lock(&app.drs.applying);
            let other = map.get(&cluster).copied();
            if other.is_none() {
                map.insert(cluster.clone(), rec.task.id);
            }
            other
        };
        if let Some(other) = raced {
            // Lost a race with another apply: this one ends at once.
            let id = rec.task.id;
            app.db
                .write(move |tx| {
                    tx.finish_task(
                        id,
                        TaskState::Failed,
                        "failed",
                        None,
                        Some(&format!("task {other} is already applying them")),
                        Utc::now(),
                    )
                })
                .await?;
            return Err(CenterError::conflict(format!(
                "task {other} is already applying the DRS recommendations of cluster {cluster}"
            )));
        }
        rec
    };
    let app2 = app.clone();
    tasks::spawn(app, rec.task.id, move |ctl| drive_apply(app2, ctl, cluster));
    Ok(rec.task)
}

async fn drive_apply(app: Arc<App>, ctl: TaskCtl, cluster: String) -> Option<TaskEnd> {
    let task = ctl.id();
    let child: Mutex<Vec<Uuid>> = Mutex::new(Vec::new());
    let result = Mutex::new(DrsApplyResult {
        cluster: cluster.clone(),
        applied: vec![],
    });
    let outcome = ctl
        .until_cancelled(run_apply(&app, task, &cluster, &child, &result))
        .await;
    lock(&app.drs.applying).remove(&cluster);
    let result = lock(&result).clone();
    let value = serde_json::to_value(&result).ok();
    let Some(r) = outcome else {
        // The cancel call recorded the task's end; stop the migration in flight too.
        for e in cancel_children(&app, &child).await {
            tracing::warn!(%task, "{e}");
        }
        if let Some(v) = value {
            let _ = app.db.write(move |tx| tx.set_task_result(task, &v)).await;
        }
        return None;
    };
    let moved = result.applied.iter().filter(|a| a.error.is_none()).count();
    let failed: Vec<String> = result
        .applied
        .iter()
        .filter_map(|a| a.error.as_ref().map(|e| format!("{}: {e}", a.vm)))
        .collect();
    let end = match r {
        Err(e) => TaskEnd::failed(e.clone(), e),
        Ok(()) if !failed.is_empty() => {
            let e = format!("{moved} VM(s) moved; not moved: {}", failed.join("; "));
            TaskEnd::failed(e.clone(), e)
        }
        Ok(()) => {
            let phase = if result.applied.is_empty() {
                format!("cluster {cluster} is balanced: nothing to move")
            } else {
                format!("cluster {cluster}: {moved} VM(s) moved")
            };
            TaskEnd::succeeded(phase.clone(), phase)
        }
    };
    Some(end.result(value))
}

async fn run_apply(
    app: &Arc<App>,
    task: Uuid,
    cluster: &str,
    child: &Mutex<Vec<Uuid>>,
    result: &Mutex<DrsApplyResult>,
) -> Result<(), String> {
    use futures::future::{FutureExt, Shared};
    let progress = |p: u8, phase: String| async move {
        app.db
            .write(move |tx| tx.update_task_progress(task, TaskState::Running, p, &phase))
            .await
            .map_err(|e| format!("center store: {e}"))
    };
    progress(1, "computing the recommendations".into()).await?;
    let recs = recommend(app, cluster.to_string())
        .await
        .map_err(|e| e.into_message())?;
    let recs = recs.recommendations;
    let total = recs.len();
    type Wait<'a> = Shared<futures::future::BoxFuture<'a, Result<Uuid, String>>>;
    // Every move is queued at once, in the plan's order, and the migration scheduler runs
    // as many as the hosts' limits allow. One exception keeps the plan sound: a move to a
    // host waits until the moves leaving that host have ended, as the room it needs may be
    // the room they free.
    let mut waits: Vec<(usize, Wait<'_>)> = Vec::new();
    let mut outcomes: Vec<Option<Result<Uuid, String>>> = vec![None; total];
    for (i, r) in recs.iter().enumerate() {
        let p = (5 + i * 90 / total.max(1)).min(95) as u8;
        if !progress(
            p,
            format!(
                "queueing VM {} from {} to {} ({} of {total})",
                r.vm,
                r.from_host,
                r.to_host,
                i + 1
            ),
        )
        .await?
        {
            return Err("the task ended meanwhile (cancelled)".into());
        }
        let freeing: Vec<Wait<'_>> = waits
            .iter()
            .filter(|(j, _)| recs[*j].from_host == r.to_host)
            .map(|(_, w)| w.clone())
            .collect();
        futures::future::join_all(freeing).await;
        let class = if r.priority <= 1 {
            MoveClass::Mandatory
        } else {
            MoveClass::Optional
        };
        let ev = task_event(
            task,
            EventLevel::Info,
            format!(
                "DRS: VM {} goes from {} to {}: {}; imbalance {:.4} → {:.4}",
                r.vm, r.from_host, r.to_host, r.reason, r.imbalance_before, r.imbalance_after
            ),
        )
        .vm(&r.vm)
        .host(Some(&r.to_host));
        app.db
            .write(move |tx| tx.add_event(ev, Utc::now()))
            .await
            .map_err(|e| format!("center store: {e}"))?;
        match start_migration(app, &r.vm, &r.to_host, class, child).await {
            Ok(id) => waits.push((
                i,
                wait_migration(app, id, &r.to_host, child).boxed().shared(),
            )),
            Err(e) => outcomes[i] = Some(Err(e)),
        }
    }
    progress(96, format!("{} migration(s) running", waits.len())).await?;
    for (i, w) in waits {
        outcomes[i] = Some(w.await);
    }
    for (r, outcome) in recs.iter().zip(outcomes) {
        let (task_id, error) = match outcome {
            Some(Ok(id)) => (Some(id), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, Some("not started".to_string())),
        };
        lock(result).applied.push(DrsApplied {
            vm: r.vm.clone(),
            from_host: r.from_host.clone(),
            to_host: r.to_host.clone(),
            reason: r.reason.clone(),
            task: task_id,
            error,
        });
    }
    Ok(())
}

// ---------- the scheduler loop ----------

/// Runs a DRS pass over every cluster each `drs_period_ms` and when woken (a host joined, a
/// setting changed), until shutdown.
pub async fn scheduler(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let period = Duration::from_millis(app.config.drs_period_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = app.drs.wake.notified() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        if let Err(e) = pass(&app).await {
            tracing::warn!("DRS pass failed: {e}");
        }
    }
}

/// One pass: `fully` clusters apply their recommendations, the others record them.
pub async fn pass(app: &Arc<App>) -> Result<(), CenterError> {
    let clusters = app.db.read(|tx| tx.clusters()).await?;
    for c in clusters {
        let recs = match recommend(app, c.name.clone()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(cluster = %c.name, "DRS pass: {}", e);
                continue;
            }
        };
        if recs.recommendations.is_empty() {
            lock(&app.drs.last_recorded).remove(&c.name);
            continue;
        }
        if recs.settings.automation == DrsAutomation::Fully {
            if !lock(&app.drs.applying).contains_key(&c.name) {
                if let Err(e) = apply(app, c.name.clone(), "automation fully").await {
                    tracing::warn!(cluster = %c.name, "DRS apply: {}", e);
                }
            }
            continue;
        }
        let lines: Vec<String> = recs
            .recommendations
            .iter()
            .map(|r| format!("{} {} → {}: {}", r.vm, r.from_host, r.to_host, r.reason))
            .collect();
        let text = lines.join("; ");
        let changed =
            lock(&app.drs.last_recorded).insert(c.name.clone(), text.clone()) != Some(text.clone());
        if !changed {
            continue;
        }
        let msg = format!(
            "cluster {}: DRS recommends (automation {}, apply with tern drs apply {}): {text}",
            c.name, recs.settings.automation, c.name
        );
        app.db
            .write(move |tx| tx.add_event(NewEvent::info(msg), Utc::now()))
            .await?;
    }
    Ok(())
}

/// The engine's shares for a VM's policy shares (the same levels and numbers).
fn drs_shares(s: tern_api::Shares) -> tern_drs::Shares {
    match s {
        tern_api::Shares::Low => tern_drs::Shares::Low,
        tern_api::Shares::Normal => tern_drs::Shares::Normal,
        tern_api::Shares::High => tern_drs::Shares::High,
        tern_api::Shares::Custom(n) => tern_drs::Shares::Custom(n),
    }
}
