//! A synthetic inventory written straight into a center's store, for scale tests and
//! `bench/ui`: `hosts` hosts of a new cluster, each owning its share of `vms` VMs.
//!
//! The hosts have no agent behind them, so they are written as they would be after losing
//! their agents: disconnected, their VMs' state unknown (or stopped, for every fifth VM, which
//! a disconnection leaves stopped). The center then leaves them alone (it calls connected
//! hosts only) and every listing, search and page sees a real store of that size.

use chrono::{DateTime, Utc};
use tern_api::spec::{Accelerator, BootSource, HostFacts, HostLoad, NicSpec, PowerState, VmSpec};
use uuid::Uuid;

use crate::store::{HostRecord, Link, Store, StoreError, VmRecord};

/// What to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedPlan {
    /// A cluster that does not exist yet.
    pub cluster: String,
    pub hosts: u32,
    pub vms: u32,
}

impl SeedPlan {
    /// Host `i` (1-based): `s0001` … (as wide as the count needs, at least 4 digits).
    pub fn host_name(&self, i: u32) -> String {
        format!("s{i:0w$}", w = digits(self.hosts).max(4))
    }

    /// VM `i` (1-based): `v00001` … (at least 5 digits).
    pub fn vm_name(&self, i: u32) -> String {
        format!("v{i:0w$}", w = digits(self.vms).max(5))
    }
}

fn digits(n: u32) -> usize {
    n.max(1).ilog10() as usize + 1
}

/// A host's facts: a 32-core, 256 GiB machine of the kind such a fleet holds.
fn facts(name: &str) -> HostFacts {
    HostFacts {
        resource_control: None,
        uefi: true,
        hostname: name.to_string(),
        cores: 32,
        memory_mib: 256 * 1024,
        cpu_mhz: 2600,
        cpu_model_name: "Seeded CPU".into(),
        cpu_flags: vec!["sse2".into(), "avx2".into()],
        qemu_version: "10.0.0".into(),
        accelerator: Accelerator::Kvm,
        migration_address: "192.0.2.1".into(),
        shared_storage: "/shared".into(),
        // What an x86-64-v2 machine gives a guest (an empty list reads as "not probed", and
        // such a host is degraded).
        cpu_capability: [
            "apic", "clflush", "cmov", "cx16", "cx8", "de", "fpu", "fxsr", "lahf-lm", "lm", "mca",
            "mce", "mmx", "msr", "mtrr", "nx", "pae", "pat", "pge", "pni", "popcnt", "pse",
            "pse36", "sep", "sse", "sse2", "sse4.1", "sse4.2", "ssse3", "syscall", "tsc",
        ]
        .map(String::from)
        .to_vec(),
        cpu_ceiling: None,
        cpu: None,
        agent_version: "seeded".into(),
        migration_tls: true,
        migration_relay: true,
        relay_source_checked: true,
    }
}

/// Writes the plan's cluster, hosts and VMs in one transaction; nothing is written if any
/// part is refused (a name or MAC already taken, a cluster that exists).
pub fn seed(store: &mut Store, plan: &SeedPlan, now: DateTime<Utc>) -> Result<(), StoreError> {
    if plan.hosts == 0 && plan.vms > 0 {
        return Err(StoreError::Unprocessable(
            "VMs need at least one host to belong to".into(),
        ));
    }
    store.write(|tx| {
        let cluster = tx.insert_cluster(&plan.cluster, None, now)?;
        let mut hosts = Vec::with_capacity(plan.hosts as usize);
        for i in 1..=plan.hosts {
            let name = plan.host_name(i);
            let host = HostRecord {
                id: Uuid::new_v4(),
                cluster_id: cluster.id,
                cluster: cluster.name.clone(),
                link: Link::Disconnected,
                maintenance: false,
                agent_url: "https://192.0.2.1:7901".into(),
                agent_token: Uuid::new_v4().to_string(),
                host_token: Uuid::new_v4().to_string(),
                facts: facts(&name),
                // A spread of loads, so bars and sorting have something to show.
                load: Some(HostLoad {
                    cpu_percent: f64::from((i * 37) % 90),
                    memory_used_mib: u64::from((i * 53) % 200 + 20) * 1024,
                    memory_total_mib: 256 * 1024,
                    vms: Vec::new(),
                }),
                last_heartbeat: Some(now),
                health: Default::default(),
                name,
            };
            tx.insert_host(&host, now)?;
            hosts.push(host);
        }
        for i in 1..=plan.vms {
            let host = &hosts[((i - 1) as usize) % hosts.len()];
            let stopped = i % 5 == 0;
            let state = if stopped {
                PowerState::Stopped
            } else {
                PowerState::Unknown
            };
            let spec = VmSpec {
                name: plan.vm_name(i),
                vcpus: 1 + i % 4,
                memory_mib: 512 << (i % 4),
                cpu_model: None,
                boot: BootSource::Kernel {
                    kernel: "/shared/guest/vmlinuz".into(),
                    initrd: Some("/shared/guest/initrd.img".into()),
                    cmdline: String::new(),
                },
                disks: Vec::new(),
                // Locally administered, one per VM.
                nics: vec![NicSpec {
                    mac: format!(
                        "02:5e:ed:{:02x}:{:02x}:{:02x}",
                        i >> 16 & 0xff,
                        i >> 8 & 0xff,
                        i & 0xff
                    ),
                }],
                resources: Default::default(),
                firmware: Default::default(),
                cloud_init: None,
            };
            tx.insert_vm(&VmRecord {
                id: Uuid::new_v4(),
                cluster_id: cluster.id,
                cluster: cluster.name.clone(),
                host_id: Some(host.id),
                host: Some(host.name.clone()),
                spec,
                desired: if stopped {
                    PowerState::Stopped
                } else {
                    PowerState::Running
                },
                actual: state,
                generation: 1,
                created_at: now,
                pool: None,
            })?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_host_and_vm_or_nothing() {
        let mut store = Store::open_in_memory().expect("store");
        let plan = SeedPlan {
            cluster: "scale".into(),
            hosts: 12,
            vms: 100,
        };
        seed(&mut store, &plan, Utc::now()).expect("seeded");
        let (hosts, vms) = store
            .read(|tx| Ok::<_, StoreError>((tx.hosts()?, tx.vms()?)))
            .expect("read");
        assert_eq!(hosts.len(), 12);
        assert_eq!(vms.len(), 100);
        assert!(hosts.iter().all(|h| h.link == Link::Disconnected));
        assert_eq!(plan.host_name(7), "s0007");
        assert_eq!(plan.vm_name(42), "v00042");
        assert_eq!(
            vms.iter()
                .filter(|v| v.host.as_deref() == Some("s0001"))
                .count(),
            9
        );
        assert_eq!(
            vms.iter()
                .filter(|v| v.actual == PowerState::Stopped)
                .count(),
            20
        );
        // Again: the cluster exists, and nothing more is written.
        assert!(seed(&mut store, &plan, Utc::now()).is_err());
        let n = store
            .read(|tx| Ok::<_, StoreError>(tx.vms()?.len()))
            .expect("read");
        assert_eq!(n, 100);
    }
}
