//! The pre-checks a migration runs before anything moves.

use super::*;

impl Mig {
    /// The pre-checks of the EVC dry run, plus: source connected, MAC not live elsewhere,
    /// destination QEMU able to load the source's stream.
    pub(super) async fn prechecks(&self) -> Result<MigrationCheckReport, String> {
        let mut report =
            crate::evc::can_migrate(&self.app, self.name().to_string(), self.dest.name.clone())
                .await
                .map_err(|e| e.into_message())?;
        report.checks.retain(|c| c.check != CheckKind::State);
        let mut add = |check: CheckKind, r: Result<String, String>| {
            let (ok, detail) = match r {
                Ok(d) => (true, d),
                Err(d) => (false, d),
            };
            report.checks.push(MigrationCheck { check, ok, detail });
        };
        // The dry run's state check counts this very task as busy: judge it here instead.
        let (vm_id, task) = (self.vm.id, self.task);
        let now = self
            .app
            .db
            .read(move |tx| {
                let others: Vec<Uuid> = tx
                    .active_tasks(Some(vm_id))?
                    .into_iter()
                    .map(|t| t.task.id)
                    .filter(|t| *t != task)
                    .collect();
                Ok::<_, StoreError>((tx.vm_by_id(vm_id)?, others))
            })
            .await
            .map_err(|e| format!("center store: {e}"))?;
        add(
            CheckKind::State,
            match now {
                (None, _) => Err("the VM was deleted".into()),
                (_, others) if !others.is_empty() => Err(format!(
                    "task {} is acting on the VM: wait for it to end",
                    others[0]
                )),
                (Some(vm), _) if vm.actual == PowerState::Running => Ok(format!(
                    "VM {} is running on {}",
                    vm.name(),
                    vm.host.as_deref().unwrap_or("-")
                )),
                (Some(vm), _) => Err(format!(
                    "VM {} is {}: only a running VM migrates live",
                    vm.name(),
                    vm.actual
                )),
            },
        );
        add(
            CheckKind::Source,
            match self.source.state() {
                HostState::Disconnected => Err(format!(
                    "source host {} is disconnected: wait for its agent",
                    self.source.name
                )),
                s => Ok(format!("source host {} is {s}", self.source.name)),
            },
        );
        add(CheckKind::Qemu, qemu_check(&self.source, &self.dest));
        add(CheckKind::Mac, self.mac_check().await);
        report.ok = report.checks.iter().all(|c| c.ok);
        Ok(report)
    }

    /// No other VM with one of this VM's MACs is live on any connected host of the cluster;
    /// a stopped leftover of this VM on the destination is removed.
    pub(super) async fn mac_check(&self) -> Result<String, String> {
        let macs: Vec<String> = self
            .vm
            .spec
            .nics
            .iter()
            .map(|n| n.mac.to_ascii_lowercase())
            .collect();
        let cluster = self.vm.cluster_id;
        let hosts = self
            .app
            .db
            .read(move |tx| tx.hosts_in_cluster(cluster))
            .await
            .map_err(|e| format!("center store: {e}"))?;
        let mut asked = 0;
        for h in hosts
            .iter()
            .filter(|h| h.state() != HostState::Disconnected)
        {
            let list = match self.app.agent(h).vms().await {
                Ok(l) => l,
                Err(e) if h.id == self.dest.id => {
                    return Err(format!("cannot ask the destination: {e}"))
                }
                Err(_) => continue,
            };
            asked += 1;
            for rt in list {
                let live = matches!(rt.state, PowerState::Running | PowerState::Paused);
                if rt.id == self.vm.id {
                    if h.id == self.dest.id {
                        if live {
                            return Err(format!(
                                "VM {} already has a live QEMU on {} ({}): two copies must \
                                 never run; investigate before migrating",
                                self.name(),
                                h.name,
                                rt.state
                            ));
                        }
                        self.app
                            .agent(h)
                            .delete(rt.id)
                            .await
                            .map_err(|e| format!("removing a leftover on {}: {e}", h.name))?;
                    }
                    continue;
                }
                if let Some(mac) = rt
                    .spec
                    .nics
                    .iter()
                    .map(|n| n.mac.to_ascii_lowercase())
                    .find(|m| live && macs.contains(m))
                {
                    return Err(format!(
                        "MAC {mac} is live on host {} (VM {}): the LAN would see it twice",
                        h.name, rt.spec.name
                    ));
                }
            }
        }
        Ok(if macs.is_empty() {
            "the VM has no NIC".into()
        } else {
            format!(
                "{} not live on any other VM ({asked} host(s) asked)",
                macs.join(", ")
            )
        })
    }
}

pub(super) fn qemu_check(source: &HostRecord, dest: &HostRecord) -> Result<String, String> {
    match (
        QemuVersion::parse(&source.facts.qemu_version),
        QemuVersion::parse(&dest.facts.qemu_version),
    ) {
        (Some(s), Some(d)) if d >= s => Ok(format!(
            "QEMU {d} on {} loads streams of QEMU {s} on {} (same machine type {})",
            dest.name, source.name, MACHINE_TYPE
        )),
        (Some(s), Some(d)) => Err(format!(
            "QEMU {d} on {} is older than QEMU {s} on {}: an older QEMU cannot be relied on to \
             load a newer one's stream; upgrade {}",
            dest.name, source.name, dest.name
        )),
        _ => Err(format!(
            "unknown QEMU version on {} ({:?}) or {} ({:?})",
            source.name, source.facts.qemu_version, dest.name, dest.facts.qemu_version
        )),
    }
}

/// Cores a host can spare for migration threads, from its last load figures.
pub(super) fn spare_cores(h: &HostRecord) -> u32 {
    let busy = h
        .load
        .as_ref()
        .map(|l| l.cpu_percent.clamp(0.0, 100.0))
        .unwrap_or(50.0);
    (f64::from(h.facts.cores) * (100.0 - busy) / 100.0).floor() as u32
}
