//! EVC in the center: hosts' CPU capabilities (rebuilt from their facts), the cluster mode
//! rules (join, set-evc, evc-modes), each VM's CPU (resolved at creation, recorded at each
//! power-on, passed to QEMU as its `-cpu` argument) and the migration pre-checks.
//!
//! The rules themselves live in `tern_cpu`; this module feeds them the inventory and turns
//! their answers into API answers and events.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::app::App;
use crate::error::CenterError;
use crate::store::{HostRecord, NewEvent, StoreError, Tx, VmCpuRow, VmRecord};
use crate::vmcheck;
use chrono::Utc;
use tern_api::center::Vm;
use tern_api::evc::{
    CheckKind, EvcChangeKind, EvcModeChange, EvcModes, HostEvc, MigrationCheck,
    MigrationCheckReport, SetEvcMode, VmCpuRecord, VmCpuSource,
};
use tern_api::migration::MigrationEncryption;
use tern_api::{Accelerator, HostFacts, HostState, PowerState, VmSpec};
use tern_cpu::evc::{ClusterHost, ModeChangeKind, PoweredOnVm};
use tern_cpu::vm::{CpuRequest, VmCpu, VmCpuKind};
use tern_cpu::{catalogue, Accel, Baseline, CpuError, CpuIdentity, FeatureSet, HostCapability};

fn accel_of(a: Accelerator) -> Accel {
    match a {
        Accelerator::Kvm => Accel::Kvm,
        Accelerator::Tcg => Accel::Tcg,
    }
}

fn accelerator_of(a: Accel) -> Accelerator {
    match a {
        Accel::Kvm => Accelerator::Kvm,
        Accel::Tcg => Accelerator::Tcg,
    }
}

/// A host's capability rebuilt from its facts (features before the ceiling, then the
/// ceiling); `Ok(None)` when its agent reported none.
pub fn capability(facts: &HostFacts) -> Result<Option<HostCapability>, CpuError> {
    let Some(cpu) = &facts.cpu else {
        return Ok(None);
    };
    // Placing one VM among 1,000 hosts asks this of every host, twice; hosts of one
    // generation report the same CPU, and working the capability out (feature sets, the
    // catalogue's baselines) costs far more than recognising a CPU seen before.
    type Key = (String, String, Option<String>);
    static SEEN: std::sync::Mutex<Option<std::collections::HashMap<Key, HostCapability>>> =
        std::sync::Mutex::new(None);
    let key: Key = (
        serde_json::to_string(cpu).unwrap_or_default(),
        format!("{:?}", facts.accelerator),
        facts.cpu_ceiling.clone(),
    );
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let cache = seen.get_or_insert_with(Default::default);
    if let Some(cap) = cache.get(&key) {
        return Ok(Some(cap.clone()));
    }
    drop(seen);
    let identity = CpuIdentity {
        vendor: cpu.vendor.as_deref().and_then(tern_cpu::Vendor::from_cpuid),
        family: cpu.family,
        model: cpu.model,
        stepping: cpu.stepping,
        model_id: cpu.model_id.clone(),
    };
    let cap = HostCapability::from_features(
        accel_of(facts.accelerator),
        identity,
        FeatureSet::from_names(&cpu.uncapped),
        facts.cpu_ceiling.as_deref(),
    )?;
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let cache = seen.get_or_insert_with(Default::default);
    // A bound, should hosts report many different CPUs: start over.
    if cache.len() >= 256 {
        cache.clear();
    }
    cache.insert(key, cap.clone());
    Ok(Some(cap))
}

/// A catalogue baseline by name; unknown names answer 400 with the known ones.
pub fn baseline(name: &str) -> Result<&'static Baseline, CenterError> {
    catalogue()
        .require(name)
        .map_err(|e| CenterError::invalid(e.to_string()))
}

/// The baseline of a cluster's stored mode (`None` = no mode).
fn mode_of(mode: Option<&str>) -> Result<Option<&'static Baseline>, CenterError> {
    mode.map(baseline).transpose()
}

/// Why `name` (with `facts`) may not join cluster `cluster`: its EVC mode or the vendor of
/// its other hosts. `None` = it may.
pub fn join_refusal(
    tx: &Tx,
    name: &str,
    cluster: &str,
    facts: &HostFacts,
) -> Result<Option<String>, CenterError> {
    let Some(c) = tx.cluster(cluster)? else {
        return Ok(None);
    };
    let Some(cluster_id) = tx.cluster_id(cluster)? else {
        return Ok(None);
    };
    let mode = mode_of(c.evc_mode.as_deref())?;
    let cap = match capability(facts) {
        Ok(Some(cap)) => cap,
        Ok(None) => {
            return Ok(mode.map(|m| {
                format!(
                    "host {name} cannot join cluster {cluster}: the cluster has EVC mode {} and \
                     the host reported no CPU capability (its agent could not probe QEMU: see \
                     its log)",
                    m.name
                )
            }))
        }
        Err(e) => {
            return Ok(Some(format!(
                "host {name} cannot join cluster {cluster}: its CPU capability is unusable: {e}"
            )))
        }
    };
    let members: Vec<(String, HostCapability)> = tx
        .hosts_in_cluster(cluster_id)?
        .into_iter()
        .filter(|h| h.name != name)
        .filter_map(|h| Some((h.name.clone(), capability(&h.facts).ok()??)))
        .collect();
    let members: Vec<ClusterHost<'_>> = members
        .iter()
        .map(|(n, c)| ClusterHost {
            name: n,
            capability: c,
        })
        .collect();
    Ok(tern_cpu::evc::check_join(name, &cap, mode, &members)
        .err()
        .map(|e| {
            let mode = mode
                .map(|m| format!(" (EVC mode {})", m.name))
                .unwrap_or_default();
            format!("host {name} cannot join cluster {cluster}{mode}: {e}")
        }))
}

/// A VM is powered on for EVC when it runs (or may: state unknown) or a start is under way.
fn powered_on(vm: &VmRecord) -> bool {
    matches!(
        vm.actual,
        PowerState::Running | PowerState::Paused | PowerState::Unknown
    ) || vm.desired == PowerState::Running
}

fn follows_mode(kind: VmCpuKind) -> bool {
    matches!(kind, VmCpuKind::ClusterMode | VmCpuKind::Default)
}

/// The modes every host of a cluster supports.
pub fn evc_modes(tx: &Tx, cluster: &str) -> Result<EvcModes, CenterError> {
    let c = tx
        .cluster(cluster)?
        .ok_or_else(|| CenterError::cluster_not_found(cluster))?;
    let cluster_id = tx
        .cluster_id(cluster)?
        .ok_or_else(|| CenterError::cluster_not_found(cluster))?;
    let mut hosts = Vec::new();
    let mut caps = Vec::new();
    let mut unknown = Vec::new();
    for h in tx.hosts_in_cluster(cluster_id)? {
        match capability(&h.facts) {
            Ok(Some(cap)) => {
                hosts.push(HostEvc {
                    host: h.name.clone(),
                    ceiling: cap.ceiling.clone(),
                    best: cap.best_baseline().map(|b| b.name.clone()),
                    supported: names(&cap.supported_baselines()),
                });
                caps.push(cap);
            }
            _ => {
                hosts.push(HostEvc {
                    host: h.name.clone(),
                    ceiling: h.facts.cpu_ceiling.clone(),
                    best: None,
                    supported: Vec::new(),
                });
                unknown.push(h.name.clone());
            }
        }
    }
    let refs: Vec<&HostCapability> = caps.iter().collect();
    let modes = tern_cpu::evc::common_modes(&refs);
    let best = if refs.is_empty() {
        None
    } else {
        catalogue().best(&modes).map(|b| b.name.clone())
    };
    Ok(EvcModes {
        cluster: c.name,
        current: c.evc_mode,
        modes: names(&modes),
        best,
        hosts,
        unknown_hosts: unknown,
    })
}

fn names(b: &[&Baseline]) -> Vec<String> {
    b.iter().map(|b| b.name.clone()).collect()
}

/// Changes a cluster's EVC mode if every host offers it and no powered-on VM uses a feature it
/// lacks; records an event.
pub async fn set_evc(
    app: &Arc<App>,
    cluster: String,
    req: SetEvcMode,
) -> Result<EvcModeChange, CenterError> {
    let new = req
        .mode
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(baseline)
        .transpose()?;
    app.db.write(move |tx| change_mode(tx, &cluster, new)).await
}

/// The rules of [`set_evc`] in one transaction: checks, then records the new mode and an event.
pub fn change_mode(
    tx: &Tx,
    cluster: &str,
    new: Option<&'static Baseline>,
) -> Result<EvcModeChange, CenterError> {
    let now = Utc::now();
    let c = tx
        .cluster(cluster)?
        .ok_or_else(|| CenterError::cluster_not_found(cluster))?;
    let cluster_id = tx
        .cluster_id(cluster)?
        .ok_or_else(|| CenterError::cluster_not_found(cluster))?;
    let current = mode_of(c.evc_mode.as_deref())?;

    let members = tx.hosts_in_cluster(cluster_id)?;
    let mut caps = Vec::new();
    for h in &members {
        match capability(&h.facts) {
            Ok(Some(cap)) => caps.push((h.name.clone(), cap)),
            Ok(None) if new.is_some() => {
                return Err(CenterError::unsatisfiable(format!(
                    "cannot set an EVC mode on cluster {cluster}: host {} reported no CPU \
                             capability (its agent could not probe QEMU: see its log)",
                    h.name
                )))
            }
            Ok(None) => {}
            Err(e) => {
                return Err(CenterError::unsatisfiable(format!(
                    "cannot change the EVC mode of cluster {cluster}: host {}: {e}",
                    h.name
                )))
            }
        }
    }
    let hosts: Vec<ClusterHost<'_>> = caps
        .iter()
        .map(|(n, c)| ClusterHost {
            name: n,
            capability: c,
        })
        .collect();

    let cluster_vms: Vec<VmRecord> = tx
        .vms()?
        .into_iter()
        .filter(|v| v.cluster_id == cluster_id)
        .collect();
    let mut running = Vec::new();
    for vm in cluster_vms.iter().filter(|v| powered_on(v)) {
        if let Some(row) = tx.vm_cpu(vm.id)? {
            running.push((vm.name().to_string(), row.cpu));
        }
    }
    let vms: Vec<PoweredOnVm<'_>> = running
        .iter()
        .map(|(n, cpu)| PoweredOnVm {
            name: n,
            features: &cpu.features,
            follows_cluster_mode: follows_mode(cpu.kind),
        })
        .collect();
    let plan =
        tern_cpu::evc::plan_mode_change(current, new, &hosts, &vms).map_err(|e| match e {
            CpuError::VmsAboveMode { .. } => {
                CenterError::conflict(format!("cluster {cluster}: {e}"))
            }
            other => CenterError::unsatisfiable(format!("cluster {cluster}: {other}")),
        })?;

    // Stopped VMs that name a model above the new mode will not start until changed.
    let mut blocked = Vec::new();
    if let Some(mode) = new {
        for vm in cluster_vms.iter().filter(|v| !powered_on(v)) {
            if let CpuRequest::Named(m) = CpuRequest::from_spec(vm.spec.cpu_model.as_deref()) {
                let above = catalogue()
                    .get(&m)
                    .is_some_and(|b| !b.features.is_subset(&mode.features));
                if above {
                    blocked.push(format!("{} ({m})", vm.name()));
                }
            }
        }
    }
    let kind = match plan.kind {
        ModeChangeKind::Unchanged => EvcChangeKind::Unchanged,
        ModeChangeKind::Set => EvcChangeKind::Set,
        ModeChangeKind::Clear => EvcChangeKind::Clear,
        ModeChangeKind::Raise => EvcChangeKind::Raise,
        ModeChangeKind::Lower => EvcChangeKind::Lower,
        ModeChangeKind::Sideways => EvcChangeKind::Sideways,
    };
    let mut note = match (kind, plan.to.as_deref()) {
        (EvcChangeKind::Unchanged, _) => "the mode is unchanged".to_string(),
        (EvcChangeKind::Clear, _) => {
            "VMs keep the CPU they run with; from their next power-on, VMs that name no \
                     model get the default baseline"
                .to_string()
        }
        (_, Some(to)) if plan.vms_keep_features_until_power_cycle.is_empty() => {
            format!("VMs that name no model get {to} from their next power-on")
        }
        (_, to) => format!(
            "running VMs {} keep the CPU features they started with until they are \
                     powered off and on again (a reboot inside the guest is not enough); then \
                     they get {}",
            plan.vms_keep_features_until_power_cycle.join(", "),
            to.unwrap_or("-")
        ),
    };
    if !blocked.is_empty() {
        note.push_str(&format!(
            "; VMs {} name a CPU model above the mode and will not start until their \
                     model is changed",
            blocked.join(", ")
        ));
    }
    if kind != EvcChangeKind::Unchanged || c.evc_mode.as_deref() != plan.to.as_deref() {
        tx.set_cluster_evc_mode(cluster, plan.to.as_deref())?;
        tx.add_event(
            NewEvent::info(format!(
                "cluster {cluster}: EVC mode {} → {} ({}); {note}",
                plan.from.as_deref().unwrap_or("none"),
                plan.to.as_deref().unwrap_or("none"),
                kind_text(kind)
            )),
            now,
        )?;
    }
    Ok(EvcModeChange {
        cluster: cluster.to_string(),
        kind,
        from: plan.from,
        to: plan.to,
        vms_keep_features_until_power_cycle: plan.vms_keep_features_until_power_cycle,
        note,
    })
}

fn kind_text(k: EvcChangeKind) -> &'static str {
    match k {
        EvcChangeKind::Unchanged => "unchanged",
        EvcChangeKind::Set => "set",
        EvcChangeKind::Clear => "cleared",
        EvcChangeKind::Raise => "raised",
        EvcChangeKind::Lower => "lowered",
        EvcChangeKind::Sideways => "changed sideways",
    }
}

/// A catalogue name for a cluster mode given at creation (canonical spelling), checked.
pub fn creation_mode(mode: Option<&str>) -> Result<Option<String>, CenterError> {
    mode.map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| baseline(m).map(|b| b.name.clone()))
        .transpose()
}

/// A capability that offers every catalogue feature: stands in for a host that reported none,
/// so a VM's model is still checked against the cluster's mode (QEMU's `enforce` then refuses
/// what the host cannot give).
fn unchecked_capability(accel: Accel) -> HostCapability {
    // Every feature the catalogue knows: the same set each time, and a costly union of every
    // baseline, so it is made once (placing a VM asks it of each unprobed host).
    static ALL: std::sync::OnceLock<FeatureSet> = std::sync::OnceLock::new();
    let all = ALL
        .get_or_init(|| {
            catalogue()
                .all()
                .iter()
                .fold(FeatureSet::new(), |acc, b| acc.union(&b.features))
        })
        .clone();
    HostCapability {
        accel,
        identity: CpuIdentity::default(),
        features: all.clone(),
        uncapped: all,
        ceiling: None,
    }
}

/// Resolves the CPU of a VM with `spec` on `host` in a cluster with `mode`: the error names
/// the features the host or mode lacks.
pub fn resolve(spec: &VmSpec, mode: Option<&str>, host: &HostRecord) -> Result<VmCpu, String> {
    let mode = mode_of(mode).map_err(|e| e.into_message())?;
    let request = CpuRequest::from_spec(spec.cpu_model.as_deref());
    let cap = match capability(&host.facts) {
        Ok(Some(cap)) => cap,
        Ok(None) if request == CpuRequest::HostPassthrough => {
            return Err(format!(
                "host-passthrough needs host {}'s CPU capability, which its agent did not \
                 report (it could not probe QEMU: see its log)",
                host.name
            ))
        }
        Ok(None) => unchecked_capability(accel_of(host.facts.accelerator)),
        Err(e) => return Err(format!("host {}: {e}", host.name)),
    };
    tern_cpu::vm::resolve(&request, mode, &host.name, &cap).map_err(|e| e.to_string())
}

/// The spec an agent starts (or a migration destination prepares): the VM's spec with its
/// resolved `-cpu` argument as the CPU model.
pub fn launch_spec(spec: &VmSpec, cpu: &VmCpu) -> VmSpec {
    VmSpec {
        cpu_model: Some(cpu.qemu_cpu.clone()),
        ..spec.clone()
    }
}

/// The API's view of a VM's CPU record.
pub fn record(row: &VmCpuRow) -> VmCpuRecord {
    let cpu = &row.cpu;
    VmCpuRecord {
        source: match cpu.kind {
            VmCpuKind::ClusterMode => VmCpuSource::ClusterMode,
            VmCpuKind::Default => VmCpuSource::Default,
            VmCpuKind::Named => VmCpuSource::Named,
            VmCpuKind::HostPassthrough => VmCpuSource::HostPassthrough,
        },
        model: cpu.model.clone(),
        qemu_cpu: cpu.qemu_cpu.clone(),
        features: cpu.features.to_vec(),
        accelerator: accelerator_of(cpu.accel),
        guest_vendor: cpu.guest_vendor.as_ref().map(|v| v.cpuid().to_string()),
        host: row.host.clone(),
        powered_on: row.powered_on,
    }
}

/// A VM as the API shows it: the record plus its CPU.
pub fn vm_view(tx: &Tx, vm: &VmRecord) -> Result<Vm, StoreError> {
    let mut v = vm.to_api();
    v.cpu = tx.vm_cpu(vm.id)?.as_ref().map(record);
    v.effective_resources = Some(crate::pools::effective_for(tx, vm)?);
    Ok(v)
}

/// Resolves a VM's CPU for a power-on on `host` under the cluster's current mode and records
/// it: the VM runs with exactly these features until its next power-off.
pub async fn prepare_start(app: &App, vm: &VmRecord, host: &HostRecord) -> Result<VmCpu, String> {
    let (vm_id, cluster, spec, host) = (vm.id, vm.cluster.clone(), vm.spec.clone(), host.clone());
    app.db
        .write(move |tx| -> Result<Result<VmCpu, String>, StoreError> {
            let mode = tx.cluster(&cluster)?.and_then(|c| c.evc_mode);
            let cpu = match resolve(&spec, mode.as_deref(), &host) {
                Ok(cpu) => cpu,
                Err(e) => return Ok(Err(e)),
            };
            tx.set_vm_cpu(
                vm_id,
                &VmCpuRow {
                    cpu: cpu.clone(),
                    host: host.name.clone(),
                    powered_on: true,
                },
                Utc::now(),
            )?;
            Ok(Ok(cpu))
        })
        .await
        .unwrap_or_else(|e| Err(format!("center store: {e}")))
}

/// Migration pre-check: can `dest` run the CPU `vm` was powered on with? The error names the
/// missing features (or the difference, for host-passthrough).
pub fn cpu_precheck(tx: &Tx, vm: &VmRecord, dest: &HostRecord) -> Result<(), String> {
    let row = tx
        .vm_cpu(vm.id)
        .map_err(|e| format!("center store: {e}"))?
        .ok_or_else(|| {
            format!(
                "VM {} has no recorded CPU (it was not started by this version of tern): power \
                 it off and on first",
                vm.name()
            )
        })?;
    cpu_precheck_row(&row, dest)
}

/// [`cpu_precheck`] with the VM's CPU record at hand.
pub fn cpu_precheck_row(row: &VmCpuRow, dest: &HostRecord) -> Result<(), String> {
    let cap = capability(&dest.facts)
        .map_err(|e| format!("host {}: {e}", dest.name))?
        .ok_or_else(|| {
            format!(
                "host {} reported no CPU capability (its agent could not probe QEMU): cannot \
                 tell whether it runs the VM's CPU",
                dest.name
            )
        })?;
    tern_cpu::migrate::precheck(&row.cpu, &dest.name, &cap).map_err(|e| e.to_string())
}

fn check(name: CheckKind, result: Result<String, String>) -> MigrationCheck {
    match result {
        Ok(detail) => MigrationCheck {
            check: name,
            ok: true,
            detail,
        },
        Err(detail) => MigrationCheck {
            check: name,
            ok: false,
            detail,
        },
    }
}

/// Everything a dry run needs, read in one transaction.
struct DryRun {
    vm: VmRecord,
    source: Option<HostRecord>,
    dest: HostRecord,
    dest_placed_mib: u64,
    busy: Option<String>,
    cpu: Result<String, String>,
    encryption: MigrationEncryption,
    rules: Result<String, String>,
}

/// Runs every migration pre-check of moving VM `name` to host `to` without moving anything.
pub async fn can_migrate(
    app: &Arc<App>,
    name: String,
    to: String,
) -> Result<MigrationCheckReport, CenterError> {
    let d = app
        .db
        .read(move |tx| {
            let vm = tx
                .vm_by_name(&name)?
                .ok_or_else(|| CenterError::vm_not_found(&name))?;
            let dest = tx.host_by_name(&to)?.ok_or_else(|| {
                CenterError::not_found(format!("host {to} is not registered: see tern host list"))
            })?;
            let source = vm.host_id.map(|h| tx.host_by_id(h)).transpose()?.flatten();
            let dest_placed_mib = tx
                .vms_on_host(dest.id)?
                .iter()
                .filter(|v| v.id != vm.id)
                .fold(0u64, |s, v| s.saturating_add(v.spec.memory_mib));
            let busy = tx.active_tasks(Some(vm.id))?.first().map(|t| {
                format!(
                    "task {} is still {} on VM {}",
                    t.task.id,
                    t.task.state,
                    vm.name()
                )
            });
            let cpu = cpu_precheck(tx, &vm, &dest).map(|()| {
                let features = tx
                    .vm_cpu(vm.id)
                    .ok()
                    .flatten()
                    .map(|r| format!("{} ({} features)", r.cpu.model, r.cpu.features.len()))
                    .unwrap_or_default();
                format!(
                    "host {} offers every feature of the VM's CPU {features}",
                    dest.name
                )
            });
            let encryption = tx
                .cluster(&vm.cluster)?
                .map(|c| c.migration_encryption)
                .unwrap_or_default();
            let running: Vec<(String, String)> = tx
                .vms()?
                .into_iter()
                .filter(|v| v.cluster_id == vm.cluster_id && v.actual == PowerState::Running)
                .filter_map(|v| Some((v.name().to_string(), v.host.clone()?)))
                .collect();
            let rules = crate::rules::rules_check(
                &tx.drs_rules(vm.cluster_id)?,
                vm.name(),
                &dest.name,
                &running,
            );
            Ok::<_, CenterError>(DryRun {
                vm,
                source,
                dest,
                dest_placed_mib,
                busy,
                cpu,
                encryption,
                rules,
            })
        })
        .await?;
    let vm = &d.vm;
    let dest = &d.dest;
    let mut checks = Vec::new();

    checks.push(check(
        CheckKind::State,
        match (vm.actual, &d.busy) {
            (_, Some(busy)) => Err(format!("{busy}: wait for it to end")),
            (PowerState::Running | PowerState::Paused, None) => Ok(format!(
                "VM {} is {} on {}",
                vm.name(),
                vm.actual,
                vm.host.as_deref().unwrap_or("-")
            )),
            (s, None) => Err(format!(
                "VM {} is {s}: only a running VM migrates live",
                vm.name()
            )),
        },
    ));
    let same_host = vm.host_id == Some(dest.id);
    checks.push(check(
        CheckKind::Host,
        if same_host {
            Err(format!(
                "VM {} already runs on host {}",
                vm.name(),
                dest.name
            ))
        } else if dest.cluster != vm.cluster {
            Err(format!(
                "host {} is in cluster {}, the VM in cluster {}",
                dest.name, dest.cluster, vm.cluster
            ))
        } else {
            match dest.state() {
                HostState::Connected if dest.health.is_degraded() => Err(format!(
                    "host {} is degraded ({}): nothing new is placed there",
                    dest.name,
                    dest.health.summary()
                )),
                HostState::Connected => Ok(format!(
                    "host {} is connected, in cluster {}",
                    dest.name, dest.cluster
                )),
                HostState::Maintenance => Err(format!(
                    "host {} is in maintenance mode: VMs do not move there",
                    dest.name
                )),
                HostState::Disconnected => Err(format!(
                    "host {} is disconnected: wait for its agent to reconnect",
                    dest.name
                )),
            }
        },
    ));
    checks.push(check(
        CheckKind::Vcpus,
        if vm.spec.vcpus <= dest.facts.cores {
            Ok(format!(
                "{} vcpus, host {} has {} cores",
                vm.spec.vcpus, dest.name, dest.facts.cores
            ))
        } else {
            Err(format!(
                "the VM has {} vcpus, host {} only {} cores",
                vm.spec.vcpus, dest.name, dest.facts.cores
            ))
        },
    ));
    let free = i128::from(dest.facts.memory_mib) - i128::from(d.dest_placed_mib);
    checks.push(check(
        CheckKind::Memory,
        if i128::from(vm.spec.memory_mib) <= free {
            Ok(format!(
                "the VM needs {} MiB, host {} has {} MiB free of {}",
                vm.spec.memory_mib, dest.name, free, dest.facts.memory_mib
            ))
        } else {
            Err(format!(
                "the VM needs {} MiB, host {} has {} MiB free of {} (VMs placed there hold {} \
                 MiB)",
                vm.spec.memory_mib,
                dest.name,
                free.max(0),
                dest.facts.memory_mib,
                d.dest_placed_mib
            ))
        },
    ));
    checks.push(check(
        CheckKind::Storage,
        storage_check(app, vm, dest).await,
    ));
    checks.push(check(CheckKind::Cpu, d.cpu.clone()));
    checks.push(check(
        CheckKind::Encryption,
        encryption_check(d.encryption, d.source.as_ref(), dest).map(|(_, why)| why),
    ));
    checks.push(check(CheckKind::Resources, resources_check(&vm.spec, dest)));
    checks.push(check(CheckKind::Rules, d.rules.clone()));
    Ok(MigrationCheckReport {
        vm: vm.name().to_string(),
        from: d.source.map(|h| h.name),
        to: dest.name.clone(),
        ok: checks.iter().all(|c| c.ok),
        checks,
    })
}

/// Whether `dest` can enforce the VM's resource policy (a VM without one goes anywhere).
pub fn resources_check(spec: &VmSpec, dest: &HostRecord) -> Result<String, String> {
    if spec.resources.is_default() {
        return Ok("the VM has no resource policy to enforce".into());
    }
    match &dest.facts.resource_control {
        Some(how) => Ok(format!(
            "host {} enforces the VM's policy ({}) with {how}",
            dest.name, spec.resources
        )),
        None => Err(format!(
            "the VM has a resource policy ({}) and host {} cannot enforce one (its agent found \
             no cgroup CPU controller)",
            spec.resources, dest.name
        )),
    }
}

/// Whether a migration from `source` to `dest` is encrypted under the cluster's `policy`, with
/// its reason; `Err` when the policy requires what a host's QEMU cannot do.
pub fn encryption_check(
    policy: MigrationEncryption,
    source: Option<&HostRecord>,
    dest: &HostRecord,
) -> Result<(bool, String), String> {
    let lacking: Vec<&str> = source
        .into_iter()
        .chain([dest])
        .filter(|h| !h.facts.migration_tls && !h.facts.migration_relay)
        .map(|h| h.name.as_str())
        .collect();
    tern_motion::choose_encryption(policy, &lacking)
}

/// Asks the destination's agent whether it sees the VM's files on its shared storage.
/// UEFI VMs also need the destination's UEFI firmware (their variables are a shared file).
async fn storage_check(app: &App, vm: &VmRecord, dest: &HostRecord) -> Result<String, String> {
    vmcheck::check_firmware(&dest.name, dest.facts.uefi, &vm.spec).map_err(|e| e.to_string())?;
    let files = vmcheck::spec_storage(&vm.spec);
    let datastores = crate::datastores::spec_datastores(&vm.spec);
    if !datastores.is_empty() {
        if dest.state() == HostState::Disconnected {
            return Err(format!("not checked: host {} is disconnected", dest.name));
        }
        crate::datastores::check_host(app, dest, &vm.spec).await?;
    }
    if files.is_empty() {
        return Ok("the VM has no files".into());
    }
    if dest.state() == HostState::Disconnected {
        return Err(format!("not checked: host {} is disconnected", dest.name));
    }
    let report = app
        .agent(dest)
        .check_paths(files.clone())
        .await
        .map_err(|e| format!("could not ask host {}: {e}", dest.name))?;
    let mut problems = BTreeSet::new();
    if !report.missing.is_empty() {
        problems.insert(format!(
            "host {} does not have {}",
            dest.name,
            report.missing.join(", ")
        ));
    }
    if !report.outside_shared_storage.is_empty() {
        problems.insert(format!(
            "{} not on host {}'s shared storage ({})",
            report.outside_shared_storage.join(", "),
            dest.name,
            dest.facts.shared_storage
        ));
    }
    if !report.unreachable.is_empty() {
        problems.insert(format!(
            "host {} cannot reach the SAN: {}",
            dest.name,
            report.unreachable.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(format!(
            "host {} reaches the VM's {} file(s) and LUN(s)",
            dest.name,
            files.len()
        ))
    } else {
        Err(problems.into_iter().collect::<Vec<_>>().join("; "))
    }
}

/// The record a new VM starts with (resolved on its host at creation, not powered on).
pub fn creation_row(cpu: VmCpu, host: &str) -> VmCpuRow {
    VmCpuRow {
        cpu,
        host: host.to_string(),
        powered_on: false,
    }
}

/// Records an event refusing host `name` (so the refusal shows in `tern event list`).
/// The agent retries every few seconds: the same refusal in a row is recorded once.
pub async fn record_join_refusal(app: &App, name: String, why: String) -> Result<(), CenterError> {
    app.db
        .write(move |tx| {
            let last = tx.events(&crate::store::EventFilter {
                limit: 1,
                vm: None,
                host: Some(name.clone()),
            })?;
            if last.first().is_some_and(|e| e.message == why) {
                return Ok(());
            }
            tx.add_event(NewEvent::error(why).host(Some(&name)), Utc::now())?;
            Ok::<_, CenterError>(())
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Link, Store};
    use tern_api::evc::HostCpu;
    use tern_api::{BootSource, NicSpec};
    use uuid::Uuid;

    /// Facts of a TCG host offering `model`'s features plus Westmere's (like QEMU's `max`,
    /// which has AES next to AVX2).
    fn facts(model: &str, ceiling: Option<&str>) -> HostFacts {
        let features = catalogue()
            .get(model)
            .unwrap()
            .features
            .union(&catalogue().get("Westmere").unwrap().features);
        HostFacts {
            qemu_version: "10.0.2".into(),
            cpu_ceiling: ceiling.map(str::to_string),
            cpu: Some(HostCpu {
                vendor: Some("AuthenticAMD".into()),
                uncapped: features.to_vec(),
                ..HostCpu::default()
            }),
            ..tern_testkit::fixtures::host_facts(4, 8192)
        }
    }

    fn spec(name: &str, model: Option<&str>) -> VmSpec {
        VmSpec {
            firmware: Default::default(),
            cloud_init: None,
            resources: Default::default(),
            name: name.into(),
            vcpus: 1,
            memory_mib: 256,
            cpu_model: model.map(str::to_string),
            boot: BootSource::Kernel {
                kernel: "/shared/k".into(),
                initrd: None,
                cmdline: String::new(),
            },
            disks: vec![],
            nics: vec![NicSpec {
                mac: format!("52:54:00:00:00:{:02x}", name.len()),
            }],
        }
    }

    struct Fixture {
        store: Store,
        cluster_id: Uuid,
    }

    fn fixture(mode: Option<&str>, hosts: &[(&str, &str, Option<&str>)]) -> Fixture {
        let mut store = Store::open_in_memory().unwrap();
        let cluster_id = store
            .write(|tx| -> Result<Uuid, StoreError> {
                let c = tx.insert_cluster("lab", mode, Utc::now())?;
                for (name, model, ceiling) in hosts {
                    let h = HostRecord {
                        id: Uuid::new_v4(),
                        name: name.to_string(),
                        cluster_id: c.id,
                        cluster: "lab".into(),
                        link: Link::Connected,
                        maintenance: false,
                        agent_url: "http://127.0.0.1:1".into(),
                        agent_token: "a".into(),
                        host_token: "b".into(),
                        facts: facts(model, *ceiling),
                        load: None,
                        last_heartbeat: None,
                        health: Default::default(),
                    };
                    tx.insert_host(&h, Utc::now())?;
                }
                Ok(c.id)
            })
            .unwrap();
        Fixture { store, cluster_id }
    }

    impl Fixture {
        /// Adds a VM resolved on `host` and marks it running.
        fn running_vm(&mut self, name: &str, model: Option<&str>, host: &str) -> VmCpu {
            let cluster_id = self.cluster_id;
            self.store
                .write(|tx| -> Result<VmCpu, CenterError> {
                    let h = tx.host_by_name(host)?.unwrap();
                    let mode = tx.cluster("lab")?.unwrap().evc_mode;
                    let spec = spec(name, model);
                    let cpu = resolve(&spec, mode.as_deref(), &h).map_err(CenterError::conflict)?;
                    let vm = VmRecord {
                        id: Uuid::new_v4(),
                        cluster_id,
                        cluster: "lab".into(),
                        host_id: Some(h.id),
                        host: Some(h.name.clone()),
                        spec,
                        desired: PowerState::Running,
                        actual: PowerState::Running,
                        generation: 1,
                        created_at: Utc::now(),
                        pool: None,
                    };
                    tx.insert_vm(&vm)?;
                    tx.set_vm_cpu(
                        vm.id,
                        &VmCpuRow {
                            cpu: cpu.clone(),
                            host: host.into(),
                            powered_on: true,
                        },
                        Utc::now(),
                    )?;
                    Ok(cpu)
                })
                .unwrap()
        }
    }

    #[test]
    fn capability_rebuilds_the_ceiling() {
        let cap = capability(&facts("x86-64-v3", Some("Westmere")))
            .unwrap()
            .unwrap();
        assert!(!cap.features.contains("avx"));
        assert!(cap.uncapped.contains("avx2"));
        assert_eq!(cap.best_baseline().unwrap().name, "Westmere");
        let mut f = facts("x86-64-v3", None);
        f.cpu = None;
        assert!(capability(&f).unwrap().is_none());
    }

    #[test]
    fn join_is_refused_naming_the_missing_features() {
        let mut fx = fixture(Some("x86-64-v3"), &[("h1", "x86-64-v3", None)]);
        let weak = facts("x86-64-v3", Some("Westmere"));
        let why = fx
            .store
            .read(|tx| join_refusal(tx, "h2", "lab", &weak))
            .unwrap()
            .expect("refused");
        assert!(
            why.contains("host h2") && why.contains("x86-64-v3"),
            "{why}"
        );
        for f in ["avx", "avx2", "fma", "bmi2"] {
            assert!(why.contains(f), "{f} not named: {why}");
        }
        let strong = facts("x86-64-v3", None);
        assert_eq!(
            fx.store
                .read(|tx| join_refusal(tx, "h2", "lab", &strong))
                .unwrap(),
            None
        );
        // No capability at all: refused under a mode, accepted without one.
        let mut none = strong.clone();
        none.cpu = None;
        let why = fx
            .store
            .read(|tx| join_refusal(tx, "h3", "lab", &none))
            .unwrap()
            .unwrap();
        assert!(why.contains("no CPU capability"), "{why}");
        let mut fx = fixture(None, &[]);
        assert_eq!(
            fx.store
                .read(|tx| join_refusal(tx, "h3", "lab", &none))
                .unwrap(),
            None
        );
    }

    #[test]
    fn evc_modes_follow_the_weakest_host() {
        let mut fx = fixture(
            None,
            &[
                ("h1", "x86-64-v3", None),
                ("h2", "x86-64-v3", Some("Westmere")),
            ],
        );
        let m = fx.store.read(|tx| evc_modes(tx, "lab")).unwrap();
        assert_eq!(m.best.as_deref(), Some("Westmere"));
        assert!(m.modes.iter().any(|x| x == "x86-64-v2"));
        assert!(!m.modes.iter().any(|x| x == "x86-64-v3"));
        let h1 = m.hosts.iter().find(|h| h.host == "h1").unwrap();
        assert!(h1.supported.iter().any(|x| x == "x86-64-v3"));
        assert_eq!(
            m.hosts
                .iter()
                .find(|h| h.host == "h2")
                .unwrap()
                .ceiling
                .as_deref(),
            Some("Westmere")
        );
    }

    #[test]
    fn resolution_follows_mode_and_request() {
        let mut fx = fixture(Some("x86-64-v2"), &[("h1", "x86-64-v3", None)]);
        let h1 = fx.store.read(|tx| tx.host_by_name("h1")).unwrap().unwrap();
        let cpu = resolve(&spec("a", None), Some("x86-64-v2"), &h1).unwrap();
        assert_eq!(cpu.kind, VmCpuKind::ClusterMode);
        assert!(!cpu.features.contains("avx"));
        assert!(cpu.qemu_cpu.ends_with(",enforce"));
        let launch = launch_spec(&spec("a", None), &cpu);
        assert_eq!(launch.cpu_model.as_deref(), Some(cpu.qemu_cpu.as_str()));
        let err = resolve(&spec("b", Some("x86-64-v3")), Some("x86-64-v2"), &h1).unwrap_err();
        assert!(err.contains("avx2"), "{err}");
        let err =
            resolve(&spec("c", Some("host-passthrough")), Some("x86-64-v2"), &h1).unwrap_err();
        assert!(err.contains("host-passthrough"), "{err}");
        assert!(resolve(&spec("d", Some("NoSuchCpu")), None, &h1).is_err());
        // A host without a capability still gets the model checked against the mode.
        let mut blind = h1.clone();
        blind.facts.cpu = None;
        let cpu = resolve(&spec("e", None), None, &blind).unwrap();
        assert_eq!(cpu.model, tern_cpu::vm::DEFAULT_BASELINE);
    }

    #[test]
    fn mode_changes_follow_hosts_and_running_vms() {
        let mut fx = fixture(
            None,
            &[
                ("h1", "x86-64-v3", None),
                ("h2", "x86-64-v3", Some("Westmere")),
            ],
        );
        let mode = |n: &str| Some(catalogue().get(n).unwrap());
        fx.running_vm("db", None, "h1");
        // Set: db keeps x86-64-v2 until it is powered off and on.
        let ch = fx
            .store
            .write(|tx| change_mode(tx, "lab", mode("Westmere")))
            .unwrap();
        assert_eq!(ch.kind, EvcChangeKind::Set);
        assert_eq!(ch.vms_keep_features_until_power_cycle, vec!["db"]);
        assert!(ch.note.contains("powered off and on"), "{}", ch.note);
        // Raising above what h2 offers names h2 and the features.
        let err = fx
            .store
            .write(|tx| change_mode(tx, "lab", mode("x86-64-v3")))
            .unwrap_err();
        assert!(matches!(err, CenterError::Unsatisfiable(_)), "{err:?}");
        assert!(
            err.message().contains("host h2") && err.message().contains("avx2"),
            "{}",
            err.message()
        );
        // web starts under Westmere; lowering to x86-64-v2 is refused while it runs.
        let web = fx.running_vm("web", None, "h1");
        assert_eq!(web.model, "Westmere");
        let err = fx
            .store
            .write(|tx| change_mode(tx, "lab", mode("x86-64-v2")))
            .unwrap_err();
        assert!(matches!(err, CenterError::Conflict(_)), "{err:?}");
        assert!(
            err.message().contains("VM web uses") && err.message().contains("aes"),
            "{}",
            err.message()
        );
        assert!(!err.message().contains("VM db"), "{}", err.message());
        assert_eq!(
            fx.store
                .read(|tx| tx.cluster("lab"))
                .unwrap()
                .unwrap()
                .evc_mode
                .as_deref(),
            Some("Westmere"),
            "a refused change changes nothing"
        );
        // Once web is off, lowering goes through.
        fx.store
            .write(|tx| -> Result<(), StoreError> {
                let web = tx.vm_by_name("web")?.unwrap();
                tx.set_vm_actual(web.id, PowerState::Stopped)?;
                tx.set_vm_desired(web.id, PowerState::Stopped)
            })
            .unwrap();
        let ch = fx
            .store
            .write(|tx| change_mode(tx, "lab", mode("x86-64-v2")))
            .unwrap();
        assert_eq!(ch.kind, EvcChangeKind::Lower);
        let modes = fx.store.read(|tx| evc_modes(tx, "lab")).unwrap();
        assert_eq!(modes.current.as_deref(), Some("x86-64-v2"));
    }

    #[test]
    fn cpu_precheck_names_what_the_destination_lacks() {
        let mut fx = fixture(None, &[("h1", "x86-64-v3", None)]);
        fx.running_vm("web", Some("x86-64-v3"), "h1");
        let h1 = fx.store.read(|tx| tx.host_by_name("h1")).unwrap().unwrap();
        // The CPU pre-check of a migration: a host under a Westmere ceiling lacks web's AVX.
        let mut weak = h1.clone();
        weak.name = "h2".into();
        weak.facts = facts("x86-64-v3", Some("Westmere"));
        let web = fx.store.read(|tx| tx.vm_by_name("web")).unwrap().unwrap();
        let err = fx
            .store
            .read(|tx| Ok::<_, StoreError>(cpu_precheck(tx, &web, &weak)))
            .unwrap()
            .unwrap_err();
        assert!(err.contains("host h2") && err.contains("avx2"), "{err}");
        let ok = fx
            .store
            .read(|tx| Ok::<_, StoreError>(cpu_precheck(tx, &web, &h1)))
            .unwrap();
        assert!(ok.is_ok(), "{ok:?}");
        let view = fx.store.read(|tx| vm_view(tx, &web)).unwrap();
        let rec = view.cpu.unwrap();
        assert_eq!(rec.model, "x86-64-v3");
        assert!(rec.powered_on && rec.features.iter().any(|f| f == "avx2"));
    }
}
