//! Checks of a new VM and the choice of its host: pure functions over an inventory snapshot.
//!
//! Placement here is the simple rule the DRS engine will replace: among the connected hosts of
//! the cluster that are not in maintenance, the one with the most free memory that fits.

use std::collections::HashSet;
use std::path::{Component, Path};

use tern_api::{parse_unicast_mac, valid_name, BootSource, HostState, VmSpec};
use uuid::Uuid;

use crate::error::CenterError;

/// Smallest memory a VM may have.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest memory a VM may have: 16 TiB (QEMU's x86 machines stop well before).
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;
/// Most vCPUs a VM may have (QEMU's q35 maximum).
pub const MAX_VCPUS: u32 = 1024;
/// Most disks and NICs a VM may have.
pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 16;
/// Longest file path (Linux's PATH_MAX) and kernel command line (x86's COMMAND_LINE_SIZE).
pub const MAX_PATH_BYTES: usize = 4096;
pub const MAX_CMDLINE_BYTES: usize = 2048;

/// Checks what can be checked from the spec alone, and normalises its MACs to lower case.
pub fn check_spec(spec: &mut VmSpec) -> Result<(), CenterError> {
    if !valid_name(&spec.name) {
        return Err(CenterError::invalid(format!(
            "VM name {:?} is not valid: use 1 to 32 characters of a-z, 0-9 and '-', starting \
             with a letter or digit",
            spec.name
        )));
    }
    if spec.vcpus == 0 {
        return Err(CenterError::invalid("vcpus must be at least 1"));
    }
    if spec.vcpus > MAX_VCPUS {
        return Err(CenterError::invalid(format!(
            "vcpus {} is above the most a VM can have ({MAX_VCPUS})",
            spec.vcpus
        )));
    }
    if spec.memory_mib < MIN_MEMORY_MIB {
        return Err(CenterError::invalid(format!(
            "memory_mib {} is too small: a VM needs at least {MIN_MEMORY_MIB} MiB",
            spec.memory_mib
        )));
    }
    if spec.memory_mib > MAX_MEMORY_MIB {
        return Err(CenterError::invalid(format!(
            "memory_mib {} is above {MAX_MEMORY_MIB} (16 TiB): give the size in MiB",
            spec.memory_mib
        )));
    }
    spec.resources
        .check(spec.vcpus, spec.memory_mib)
        .map_err(CenterError::invalid)?;
    if spec.disks.len() > MAX_DISKS {
        return Err(CenterError::invalid(format!(
            "disks: {} given, a VM may have {MAX_DISKS}",
            spec.disks.len()
        )));
    }
    if spec.nics.len() > MAX_NICS {
        return Err(CenterError::invalid(format!(
            "nics: {} given, a VM may have {MAX_NICS}",
            spec.nics.len()
        )));
    }
    if let BootSource::Kernel { cmdline, .. } = &spec.boot {
        if cmdline.len() > MAX_CMDLINE_BYTES {
            return Err(CenterError::invalid(format!(
                "boot.cmdline is {} bytes; a kernel command line holds {MAX_CMDLINE_BYTES}",
                cmdline.len()
            )));
        }
    }
    let mut seen = HashSet::new();
    for nic in &mut spec.nics {
        if parse_unicast_mac(&nic.mac).is_none() {
            return Err(CenterError::invalid(format!(
                "MAC {:?} is not a unicast MAC: write it as xx:xx:xx:xx:xx:xx with an even \
                 first byte (52:54:00:… is QEMU's usual prefix)",
                nic.mac
            )));
        }
        nic.mac = nic.mac.to_ascii_lowercase();
        if !seen.insert(nic.mac.clone()) {
            return Err(CenterError::invalid(format!(
                "MAC {} is given to two NICs of the VM; every NIC needs its own MAC",
                nic.mac
            )));
        }
    }
    if matches!(spec.boot, BootSource::Disk) && spec.disks.is_empty() {
        return Err(CenterError::invalid(
            "boot from disk needs at least one disk: add one to disks, or boot a kernel",
        ));
    }
    if let Some(ci) = &spec.cloud_init {
        ci.check().map_err(CenterError::invalid)?;
        if ci.network.is_some() && spec.nics.is_empty() {
            return Err(CenterError::invalid(
                "cloud_init.network configures the first NIC, and the VM has none",
            ));
        }
    }
    if let Some(model) = &spec.cpu_model {
        if model.is_empty() || model.len() > 64 || model.chars().any(char::is_whitespace) {
            return Err(CenterError::invalid(format!(
                "cpu_model {model:?} is not a QEMU CPU model name (e.g. qemu64, x86-64-v2, \
                 Haswell)"
            )));
        }
    }
    for d in spec.disks.iter().filter(|d| d.is_iscsi()) {
        if d.iscsi().is_none() {
            return Err(CenterError::invalid(format!(
                "disk {:?} is not an iSCSI LUN: write iscsi://IP:PORT/IQN/LUN (an address, \
                 not a host name; e.g. iscsi://10.0.0.5:3260/iqn.2026-12.com.example:san1/1)",
                d.path
            )));
        }
        if d.format != tern_api::DiskFormat::Raw {
            return Err(CenterError::invalid(format!(
                "disk {}: an iSCSI LUN is a raw block device; give it format=raw",
                d.path
            )));
        }
    }
    for (what, path) in spec_files(spec) {
        if path.len() > MAX_PATH_BYTES {
            return Err(CenterError::invalid(format!(
                "{what} path is {} bytes; a path holds {MAX_PATH_BYTES}",
                path.len()
            )));
        }
        let p = Path::new(path);
        if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
            return Err(CenterError::invalid(format!(
                "{what} path {path:?} must be absolute and without '..' (a path on the hosts' \
                 shared storage)"
            )));
        }
    }
    Ok(())
}

/// What a destination must reach of a spec: its files and its iSCSI LUNs (each agent's path
/// check tries the LUN's portal).
pub fn spec_storage(spec: &VmSpec) -> Vec<String> {
    spec_files(spec)
        .into_iter()
        .map(|(_, p)| p.to_string())
        .chain(
            spec.disks
                .iter()
                .filter(|d| d.is_iscsi())
                .map(|d| d.path.clone()),
        )
        .collect()
}

/// Files a spec names, with what each is (kernel, initrd, disk).
pub fn spec_files(spec: &VmSpec) -> Vec<(&'static str, &str)> {
    let mut out = Vec::new();
    if let BootSource::Kernel { kernel, initrd, .. } = &spec.boot {
        out.push(("kernel", kernel.as_str()));
        if let Some(i) = initrd {
            out.push(("initrd", i.as_str()));
        }
    }
    // An iSCSI LUN is no file of the shared storage: QEMU opens it over the network.
    for d in spec.disks.iter().filter(|d| !d.is_iscsi()) {
        out.push(("disk", d.path.as_str()));
    }
    out
}

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: Uuid,
    pub name: String,
    pub cluster: String,
    pub state: HostState,
    /// Why the host is degraded (it takes no new VMs); `None` when healthy.
    pub degraded: Option<String>,
    pub cores: u32,
    pub memory_mib: u64,
    /// Memory of the VMs placed on the host (running or not: they may start any time).
    pub placed_memory_mib: u64,
    /// The host has UEFI firmware.
    pub uefi: bool,
}

impl Candidate {
    pub fn free_memory_mib(&self) -> i128 {
        i128::from(self.memory_mib) - i128::from(self.placed_memory_mib)
    }
}

/// Checks that a host the user named can take the VM.
pub fn check_host(host: &Candidate, cluster: &str, spec: &VmSpec) -> Result<(), CenterError> {
    if host.cluster != cluster {
        return Err(CenterError::unsatisfiable(format!(
            "host {} is in cluster {}, not {cluster}: pick a host of cluster {cluster} \
             (tern host list)",
            host.name, host.cluster
        )));
    }
    match host.state {
        HostState::Connected => {
            if let Some(why) = &host.degraded {
                return Err(CenterError::conflict(format!(
                    "host {} is degraded ({why}): nothing new is placed there; pick another \
                     host, or leave out the host and let the center place the VM",
                    host.name
                )));
            }
        }
        HostState::Disconnected => {
            return Err(CenterError::conflict(format!(
                "host {} is disconnected: wait for its agent to reconnect, or pick another host",
                host.name
            )))
        }
        HostState::Maintenance => {
            return Err(CenterError::conflict(format!(
                "host {} is in maintenance mode: pick another host, or leave out the host and \
                 let the center place the VM",
                host.name
            )))
        }
    }
    fits(host, spec)
}

fn fits(host: &Candidate, spec: &VmSpec) -> Result<(), CenterError> {
    if spec.vcpus > host.cores {
        return Err(CenterError::unsatisfiable(format!(
            "vcpus {} is more than host {} has cores ({})",
            spec.vcpus, host.name, host.cores
        )));
    }
    if spec.memory_mib > host.memory_mib {
        return Err(CenterError::unsatisfiable(format!(
            "memory_mib {} is more than host {} has ({} MiB)",
            spec.memory_mib, host.name, host.memory_mib
        )));
    }
    check_firmware(&host.name, host.uefi, spec)
}

/// A UEFI VM runs only where the agent found UEFI firmware.
pub fn check_firmware(host: &str, uefi: bool, spec: &VmSpec) -> Result<(), CenterError> {
    if spec.firmware == tern_api::Firmware::Uefi && !uefi {
        return Err(CenterError::unsatisfiable(format!(
            "VM {} boots with UEFI and host {host} has no UEFI firmware: install Debian's ovmf \
             there (or set the agent's --uefi-code), or pick another host",
            spec.name
        )));
    }
    Ok(())
}

/// Picks the host for a VM: the usable host of the cluster with the most free memory that
/// fits it. Returns the index into `hosts`.
pub fn place(hosts: &[Candidate], cluster: &str, spec: &VmSpec) -> Result<usize, CenterError> {
    let usable: Vec<(usize, &Candidate)> = hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| {
            h.cluster == cluster && h.state == HostState::Connected && h.degraded.is_none()
        })
        .collect();
    if usable.is_empty() {
        return Err(CenterError::conflict(format!(
            "cluster {cluster} has no connected, healthy host (out of maintenance) to place \
             the VM on and to check its files: start a host agent with --cluster {cluster}, or \
             wait for one to reconnect"
        )));
    }
    let sized: Vec<&(usize, &Candidate)> = usable
        .iter()
        .filter(|(_, h)| fits(h, spec).is_ok())
        .collect();
    if sized.is_empty() {
        let biggest = usable
            .iter()
            .map(|(_, h)| format!("{} ({} cores, {} MiB)", h.name, h.cores, h.memory_mib))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(CenterError::unsatisfiable(format!(
            "no host of cluster {cluster} is big enough for {} vcpus and {} MiB: {biggest}",
            spec.vcpus, spec.memory_mib
        )));
    }
    let need = i128::from(spec.memory_mib);
    sized
        .iter()
        .filter(|(_, h)| h.free_memory_mib() >= need)
        // Most free memory; the name breaks ties so the choice is repeatable.
        .max_by(|(_, a), (_, b)| {
            a.free_memory_mib()
                .cmp(&b.free_memory_mib())
                .then_with(|| b.name.cmp(&a.name))
        })
        .map(|(i, _)| *i)
        .ok_or_else(|| {
            let free = sized
                .iter()
                .map(|(_, h)| format!("{} {} MiB", h.name, h.free_memory_mib().max(0)))
                .collect::<Vec<_>>()
                .join(", ");
            CenterError::conflict(format!(
                "no host of cluster {cluster} has {} MiB free (free: {free}); delete VMs, add a \
                 host, or name a host to overcommit it",
                spec.memory_mib
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::{DiskSpec, NicSpec};

    fn spec(vcpus: u32, memory_mib: u64) -> VmSpec {
        VmSpec {
            firmware: Default::default(),
            cloud_init: None,
            resources: Default::default(),
            name: "vm".into(),
            vcpus,
            memory_mib,
            cpu_model: None,
            boot: BootSource::Kernel {
                kernel: "/shared/vmlinuz".into(),
                initrd: Some("/shared/initrd".into()),
                cmdline: String::new(),
            },
            disks: vec![],
            nics: vec![NicSpec {
                mac: "52:54:00:AA:00:01".into(),
            }],
        }
    }

    fn host(name: &str, state: HostState, memory: u64, placed: u64) -> Candidate {
        Candidate {
            degraded: None,
            id: Uuid::new_v4(),
            name: name.into(),
            cluster: "lab".into(),
            state,
            cores: 4,
            memory_mib: memory,
            placed_memory_mib: placed,
            uefi: true,
        }
    }

    #[test]
    fn spec_checks() {
        let mut s = spec(1, 256);
        check_spec(&mut s).unwrap();
        assert_eq!(s.nics[0].mac, "52:54:00:aa:00:01");

        let mut s = spec(0, 256);
        assert!(matches!(
            check_spec(&mut s).unwrap_err(),
            CenterError::Invalid(_)
        ));
        let mut s = spec(1, 0);
        assert!(check_spec(&mut s)
            .unwrap_err()
            .message()
            .contains("at least 16"));
        let mut s = spec(1, 256);
        s.nics[0].mac = "01:00:5e:00:00:01".into();
        assert!(check_spec(&mut s).is_err());
        let mut s = spec(1, 256);
        s.nics.push(NicSpec {
            mac: "52:54:00:aa:00:01".into(),
        });
        assert!(check_spec(&mut s)
            .unwrap_err()
            .message()
            .contains("two NICs"));
        let mut s = spec(1, 256);
        s.disks.push(DiskSpec {
            bus: Default::default(),
            path: "/shared/../etc/passwd".into(),
            format: Default::default(),
            readonly: false,
            datastore: None,
            volume: None,
        });
        assert!(check_spec(&mut s)
            .unwrap_err()
            .message()
            .contains("absolute"));
        let mut s = spec(1, 256);
        s.boot = BootSource::Disk;
        assert!(check_spec(&mut s).is_err());
        let mut s = spec(1, 256);
        s.name = "Bad_Name".into();
        assert!(check_spec(&mut s).is_err());
        assert_eq!(spec_files(&spec(1, 1)).len(), 2);
    }

    #[test]
    fn sizes_and_lengths_are_bounded() {
        let refused = |f: &dyn Fn(&mut VmSpec), field: &str| {
            let mut s = spec(1, 256);
            f(&mut s);
            let e = check_spec(&mut s).expect_err(field).message().to_string();
            assert!(e.contains(field), "{field}: {e}");
        };
        refused(&|s| s.vcpus = u32::MAX, "vcpus");
        refused(&|s| s.memory_mib = u64::MAX, "memory_mib");
        refused(
            &|s| {
                s.disks = (0..17)
                    .map(|i| DiskSpec {
                        bus: Default::default(),
                        path: format!("/shared/d{i}"),
                        format: Default::default(),
                        readonly: false,
                        datastore: None,
                        volume: None,
                    })
                    .collect()
            },
            "disks",
        );
        refused(
            &|s| {
                s.nics = (0..17)
                    .map(|i| NicSpec {
                        mac: format!("52:54:00:aa:01:{i:02x}"),
                    })
                    .collect()
            },
            "nics",
        );
        refused(
            &|s| {
                if let BootSource::Kernel { cmdline, .. } = &mut s.boot {
                    *cmdline = "x".repeat(5000);
                }
            },
            "cmdline",
        );
        refused(
            &|s| {
                if let BootSource::Kernel { kernel, .. } = &mut s.boot {
                    *kernel = format!("/shared/{}", "k".repeat(5000));
                }
            },
            "kernel path",
        );
    }

    #[test]
    fn places_on_most_free_memory() {
        let hosts = vec![
            host("h1", HostState::Connected, 8192, 4096),
            host("h2", HostState::Connected, 8192, 1024),
            host("h3", HostState::Maintenance, 65536, 0),
            host("h4", HostState::Disconnected, 65536, 0),
        ];
        assert_eq!(place(&hosts, "lab", &spec(1, 1024)).unwrap(), 1);
        // Fits h1 and h2 in size but neither has 7500 MiB free.
        let e = place(&hosts, "lab", &spec(1, 7500)).unwrap_err();
        assert!(matches!(e, CenterError::Conflict(_)));
        let e = place(&hosts, "lab", &spec(1, 100_000)).unwrap_err();
        assert!(matches!(e, CenterError::Unsatisfiable(_)));
        let e = place(&hosts, "lab", &spec(8, 128)).unwrap_err();
        assert!(e.message().contains("big enough"));
        let e = place(&hosts, "other", &spec(1, 128)).unwrap_err();
        assert!(e.message().contains("no connected, healthy host"));
    }

    #[test]
    fn named_host_checks() {
        let h = host("h1", HostState::Connected, 4096, 4096);
        // A named host may be overcommitted; only its size matters.
        check_host(&h, "lab", &spec(2, 4096)).unwrap();
        assert!(matches!(
            check_host(&h, "lab", &spec(2, 4097)).unwrap_err(),
            CenterError::Unsatisfiable(_)
        ));
        assert!(check_host(&h, "other", &spec(1, 128)).is_err());
        let d = host("h2", HostState::Disconnected, 4096, 0);
        assert!(matches!(
            check_host(&d, "lab", &spec(1, 128)).unwrap_err(),
            CenterError::Conflict(_)
        ));
    }
}
