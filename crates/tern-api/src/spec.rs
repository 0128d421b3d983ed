//! VM specs, host facts and load figures: the plain data shared by center, agents and CLI.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// What a VM is: everything needed to start the same guest on any host.
///
/// The same spec is used to start a VM and to prepare a migration destination, so it must not
/// contain anything host-specific (tap names, sockets and pids belong to the agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique name within the center, `[a-z0-9][a-z0-9-]{0,31}`.
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// QEMU CPU model name (`qemu64`, `x86-64-v2`, `Haswell`, `max`, `host`…); `None` = the
    /// cluster's baseline, or the agent's default when the cluster has none.
    #[serde(default)]
    pub cpu_model: Option<String>,
    pub boot: BootSource,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Shares, reservations and limits (default: normal shares, none of the others).
    #[serde(
        default,
        skip_serializing_if = "crate::resources::Resources::is_default"
    )]
    pub resources: crate::resources::Resources,
    /// Firmware (default: BIOS).
    #[serde(default, skip_serializing_if = "crate::guest::Firmware::is_default")]
    pub firmware: crate::guest::Firmware,
    /// cloud-init configuration handed to the guest as a NoCloud seed volume; `None`: no seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::guest::CloudInit>,
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub enum BootSource {
    /// Direct kernel boot: paths are on the host (normally on shared storage).
    Kernel {
        kernel: String,
        initrd: Option<String>,
        #[serde(default)]
        cmdline: String,
    },
    /// Boot from the first disk.
    Disk,
}

/// A virtio-blk disk backed by an image file on shared storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Absolute path of the image on the cluster's shared storage, or an `iscsi://` URL;
    /// may be left out when `datastore` and `volume` say where the disk is.
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default)]
    pub readonly: bool,
    /// How the guest sees it (default: virtio-blk).
    #[serde(default, skip_serializing_if = "DiskBus::is_default")]
    pub bus: DiskBus,
    /// The datastore the disk is on. Given with `volume` instead of `path`, the center
    /// works out the path; given a path, the center names the datastore holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore: Option<String>,
    /// The volume in the datastore: a relative path (directory), a LUN number (iscsi), or
    /// `disk` (block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

impl DiskSpec {
    /// The iSCSI LUN this disk is, when its path is an `iscsi://` URL (see [`IscsiLun`]);
    /// `None` for a file.
    pub fn iscsi(&self) -> Option<IscsiLun> {
        self.path
            .starts_with(IscsiLun::SCHEME)
            .then(|| IscsiLun::parse(&self.path))
            .flatten()
    }

    /// The disk names an iSCSI LUN (well formed or not): it is not a file of the storage.
    pub fn is_iscsi(&self) -> bool {
        self.path.starts_with(IscsiLun::SCHEME)
    }

    /// The disk is a whole block device named by its stable id (`/dev/disk/by-id/ID`, a
    /// block datastore): its id, when the path is one.
    pub fn block_device(&self) -> Option<&str> {
        self.path
            .strip_prefix(BY_ID_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .filter(|id| valid_device_id(id))
    }
}

/// A SAN LUN that QEMU opens itself with its userspace iSCSI initiator (libiscsi, Debian's
/// `qemu-block-extra`): no kernel initiator on the host, and every host of a cluster opens the
/// same LUN, handed over at the switchover like a shared file. Written
/// `iscsi://IP:PORT/IQN/LUN`: an address, not a name, so no DNS answer can redirect a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiLun {
    pub portal: std::net::SocketAddr,
    /// The target's IQN (`iqn.2026-12.com.example:san1`) or EUI/NAA name.
    pub target: String,
    pub lun: u16,
}

impl IscsiLun {
    pub const SCHEME: &'static str = "iscsi://";

    /// Parses `iscsi://IP:PORT/IQN/LUN`; `None` when any part is not what it should be.
    pub fn parse(s: &str) -> Option<IscsiLun> {
        let rest = s.strip_prefix(Self::SCHEME)?;
        let mut parts = rest.split('/');
        let portal = parts.next()?.parse().ok()?;
        let target = parts.next()?;
        let lun = parts.next()?;
        if parts.next().is_some() || !valid_iscsi_name(target) {
            return None;
        }
        if lun.is_empty() || lun.len() > 5 || !lun.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let lun: u16 = lun.parse().ok().filter(|l| *l < 16384)?;
        Some(IscsiLun {
            portal,
            target: target.to_string(),
            lun,
        })
    }

    pub fn url(&self) -> String {
        format!(
            "{}{}/{}/{}",
            Self::SCHEME,
            self.portal,
            self.target,
            self.lun
        )
    }
}

/// Where a block datastore's device is named: udev's stable names.
pub const BY_ID_DIR: &str = "/dev/disk/by-id";

/// One `/dev/disk/by-id` name: letters, digits, '-', '_', '.', ':' and '+', not starting with
/// '.', so it is always a single path component.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'+'))
}

/// iSCSI names (RFC 3720): `iqn.`, `eui.` or `naa.` and then lower-case letters, digits, '.',
/// '-' and ':', at most 223 bytes.
pub(crate) fn valid_iscsi_name(s: &str) -> bool {
    (s.starts_with("iqn.") || s.starts_with("eui.") || s.starts_with("naa."))
        && s.len() <= 223
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b':')
        })
}

/// The disk's controller in the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskBus {
    /// A virtio-blk PCI device per disk (`/dev/vdX`).
    #[default]
    VirtioBlk,
    /// A disk on the VM's one virtio-scsi controller (`/dev/sdX`): SCSI commands (unmap,
    /// persistent names), what some guests and clustered file systems expect.
    VirtioScsi,
}

impl DiskBus {
    pub fn is_default(&self) -> bool {
        *self == DiskBus::VirtioBlk
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

/// A virtio-net NIC attached to the host's VM bridge through a tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// Unicast MAC `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
}

/// Accelerator a host runs guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        })
    }
}

/// Power state of a VM, desired (set by users) or actual (reported by its host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    Stopped,
    Running,
    Paused,
    /// The QEMU process exited without being asked to.
    Crashed,
    /// Not known: its host is disconnected.
    Unknown,
}

impl std::fmt::Display for PowerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PowerState::Stopped => "stopped",
            PowerState::Running => "running",
            PowerState::Paused => "paused",
            PowerState::Crashed => "crashed",
            PowerState::Unknown => "unknown",
        })
    }
}

/// Connection state of a host as the center sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Connected,
    Disconnected,
    Maintenance,
}

impl std::fmt::Display for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostState::Connected => "connected",
            HostState::Disconnected => "disconnected",
            HostState::Maintenance => "maintenance",
        })
    }
}

/// What a host is: reported by its agent at registration and with every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostFacts {
    pub hostname: String,
    pub cores: u32,
    pub memory_mib: u64,
    /// Nominal MHz of one core (from /proc/cpuinfo; 0 if unknown).
    pub cpu_mhz: u32,
    pub cpu_model_name: String,
    /// /proc/cpuinfo flags of the physical CPU.
    pub cpu_flags: Vec<String>,
    /// e.g. "10.0.2".
    pub qemu_version: String,
    pub accelerator: Accelerator,
    /// Address (IP) the host receives migrations on.
    pub migration_address: String,
    /// Shared storage root this host sees.
    pub shared_storage: String,
    /// Feature names (QEMU's) the host can give a guest, after its `--cpu-ceiling`; empty when
    /// the agent could not probe QEMU.
    #[serde(default)]
    pub cpu_capability: Vec<String>,
    /// `--cpu-ceiling` configured on the agent, if any.
    #[serde(default)]
    pub cpu_ceiling: Option<String>,
    /// What QEMU's `host`/`max` model gives guests here (vendor, identity, features before
    /// the ceiling, supported baselines); `None` when the agent could not probe QEMU.
    #[serde(default)]
    pub cpu: Option<crate::evc::HostCpu>,
    pub agent_version: String,
    /// The host's QEMU can encrypt migration streams (it has TLS: `tls-creds-psk`). An agent
    /// that does not say is taken to lack it.
    #[serde(default)]
    pub migration_tls: bool,
    /// The agent carries encrypted migration streams with its own relays (`tern host
    /// relay`), which need nothing of QEMU; between two such hosts they are used instead of
    /// QEMU's TLS. An agent that does not say has none.
    #[serde(default)]
    pub migration_relay: bool,
    /// The agent's relays can be held to one source address
    /// (`MigrationSettings::relay_source`). An agent that does not say cannot.
    #[serde(default)]
    pub relay_source_checked: bool,
    /// How this host enforces VM resource policies, e.g. `cgroup v1 (cpu, cpuacct, memory)
    /// under /tern/h1`; `None`: it cannot (no cgroup CPU controller), and says why at start.
    #[serde(default)]
    pub resource_control: Option<String>,
    /// The host has UEFI firmware (OVMF) for VMs that boot with it. An agent that does not
    /// say is taken to lack it.
    #[serde(default)]
    pub uefi: bool,
}

/// Load of one VM on a host, sampled by the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmLoad {
    pub vm_id: Uuid,
    pub name: String,
    pub state: PowerState,
    /// CPU used by the QEMU process over the last sample, in percent of one core.
    pub cpu_percent: f64,
    pub rss_mib: u64,
}

/// Load of a host, sent with every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostLoad {
    /// Host CPU busy over the last sample, percent of all cores (0–100).
    pub cpu_percent: f64,
    pub memory_used_mib: u64,
    pub memory_total_mib: u64,
    pub vms: Vec<VmLoad>,
}

/// Checks a VM name: `[a-z0-9][a-z0-9-]{0,31}`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Parses a MAC `xx:xx:xx:xx:xx:xx`; rejects multicast and all-zero addresses.
pub fn parse_unicast_mac(mac: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut out = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        out[i] = u8::from_str_radix(p, 16).ok()?;
    }
    if out[0] & 1 == 1 || out == [0; 6] {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod iscsi_tests {
    use super::*;

    #[test]
    fn iscsi_urls_parse_into_typed_parts_or_not_at_all() {
        let l = IscsiLun::parse("iscsi://10.77.0.3:3260/iqn.2026-12.lab.tern:san/1").unwrap();
        assert_eq!(l.portal.to_string(), "10.77.0.3:3260");
        assert_eq!(l.target, "iqn.2026-12.lab.tern:san");
        assert_eq!(l.lun, 1);
        assert_eq!(IscsiLun::parse(&l.url()), Some(l));
        for bad in [
            "iscsi://san.example:3260/iqn.2026-12.x:y/1",
            "iscsi://10.0.0.1/iqn.2026-12.x:y/1",
            "iscsi://10.0.0.1:3260/iqn.2026-12.x:y/1/2",
            "iscsi://10.0.0.1:3260/IQN.X/1",
            "iscsi://10.0.0.1:3260/iqn.x\",/1",
            "iscsi://10.0.0.1:3260/iqn.x:y/-1",
            "iscsi://10.0.0.1:3260/iqn.x:y/99999",
            "iscsi://10.0.0.1:3260/iqn.x:y/",
            "/srv/shared/disk.raw",
        ] {
            assert_eq!(IscsiLun::parse(bad), None, "{bad}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("web-1"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("Web"));
        assert!(!valid_name(&"a".repeat(33)));
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_unicast_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert!(parse_unicast_mac("01:00:5e:00:00:01").is_none());
        assert!(parse_unicast_mac("00:00:00:00:00:00").is_none());
        assert!(parse_unicast_mac("52:54:00:12:34").is_none());
        assert!(parse_unicast_mac("52:54:00:12:34:zz").is_none());
    }

    #[test]
    fn spec_roundtrip() {
        let spec = VmSpec {
            firmware: Default::default(),
            cloud_init: None,
            resources: Default::default(),
            name: "a".into(),
            vcpus: 1,
            memory_mib: 256,
            cpu_model: None,
            boot: BootSource::Kernel {
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
            },
            disks: vec![],
            nics: vec![NicSpec {
                mac: "52:54:00:00:00:01".into(),
            }],
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<VmSpec>(&json).unwrap(), spec);
    }
}
