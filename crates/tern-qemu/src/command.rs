//! The QEMU command line of a VM, built from its spec in one pure function.
//!
//! Choices that matter for live migration:
//! - Machine type is the fixed, versioned [`MACHINE_TYPE`] (never the `q35` alias, which
//!   moves with QEMU upgrades), so source and destination build the same virtual hardware.
//! - CPU model is always given with `enforce`: QEMU refuses to start rather than silently
//!   dropping a feature the host lacks, so a guest never sees a CPU that differs between hosts.
//! - Disks use `cache=none` (O_DIRECT, `cache.direct=on`) with `aio=native` and image locking
//!   on. With a shared image, the destination reads the disk from storage while the source
//!   has been writing it; O_DIRECT keeps the source's writes out of its host page cache so
//!   nothing the destination needs is left behind in a cache it cannot see (libvirt refuses
//!   migration on shared storage for other cache modes for this reason). The guest still
//!   sees a write-back cache and flushes it; QEMU flushes and inactivates the image on the
//!   source before the destination activates it and takes the write lock.
//! - NICs have no option ROM (`romfile=""`): tern boots from a kernel or a disk, and ROM
//!   sizes would otherwise have to match between hosts' QEMU packages.
//! - Fixed topology (`sockets=1,cores=N,threads=1`) so it never depends on QEMU defaults.
//!
//! Files: when the agent has opened the VM's files itself ([`OpenedFile`]), QEMU gets only their
//! descriptors — disks through fd sets (`-add-fd`, `/dev/fdset/N`), kernel and initrd as
//! `/proc/self/fd/N` — and never a path of the spec, so nothing QEMU opens can be changed by
//! swapping a path after the agent checked it.
//!
//! Privilege: QEMU runs as an unprivileged user of its own per VM ([`RunAs`], chosen by the
//! agent: see `tern_host::qemu_user` for why per VM and what such a QEMU is given), set
//! between fork and exec, so QEMU never holds root. On top of that: a seccomp filter that
//! denies every group QEMU offers (`-sandbox`, see below: no new processes, no change of user
//! or privilege, no obsolete calls, no scheduling or memory policy changes), descriptors
//! instead of paths, a run dir of 0700 that is QEMU's working directory (it names its socket,
//! logs, pidfile and migration key relative to it, so it needs no right on any directory
//! above), and typed migration targets (no `exec:`, which `spawn=deny` would stop anyway).
//! Without [`RunAs`] (tests, `--qemu-as-root`) QEMU runs as its caller.
//!
//! Process hygiene: `-nodefaults -no-user-config`, no display, serial console to a file, QMP
//! on a unix socket, a pidfile, and `-D qemu.log`. QEMU does not daemonize (its fork and
//! `setsid` would need the `spawn` and `elevateprivileges` groups the filter denies): the agent
//! starts it in a session of its own, so it outlives the agent that started it and no signal
//! meant for the agent's process group reaches it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use tern_api::{Accelerator, BootSource, DiskBus, DiskFormat, Firmware, VmSpec};
use uuid::Uuid;

use crate::error::{Error, Result};

pub use tern_motion::MACHINE_TYPE;

/// QEMU's seccomp filter: every group it offers, denied.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// How a destination QEMU waits for an incoming migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// `-incoming defer`: the URI is given later with `migrate-incoming`, after migration
    /// capabilities and parameters are set (the way every migration in tern starts).
    Defer,
    /// `-incoming URI`: listen at once (e.g. `tcp:10.77.0.12:49152`).
    Uri(String),
}

/// Everything needed to start one VM's QEMU on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchConfig {
    pub id: Uuid,
    pub spec: VmSpec,
    /// Absolute directory holding this VM's runtime files (see [`RunPaths`]).
    pub run_dir: PathBuf,
    /// One tap per NIC of the spec, in order, already created by the agent.
    pub taps: Vec<String>,
    pub accel: Accelerator,
    /// `qemu-system-x86_64` or a path to it.
    pub qemu_binary: PathBuf,
    /// CPU model when the spec has none (`qemu64`, a cluster baseline, `host`…).
    pub default_cpu_model: String,
    /// Start as a migration destination.
    pub incoming: Option<Incoming>,
    /// `-S`: stay paused until `cont` (also keeps a migration destination paused after the
    /// migration completes, until tern decides the hand-over).
    pub start_paused: bool,
    /// The spec's files, already opened by the caller; a file of the spec not listed here is
    /// opened by QEMU from its path (tools and tests without an agent).
    pub files: Vec<OpenedFile>,
    /// The unprivileged user QEMU runs as; `None`: the caller's (root, for tests and tools).
    pub run_as: Option<RunAs>,
    /// `cgroup.procs` files QEMU joins before it runs (one per cgroup hierarchy), so all its
    /// memory and threads are charged to the VM's group from the first instruction.
    pub cgroup_procs: Vec<PathBuf>,
    /// UEFI firmware and the cloud-init seed, opened by the agent.
    pub guest_files: GuestFiles,
}

/// Files a VM's spec implies without naming them: the agent finds (or makes) and opens them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestFiles {
    /// For [`tern_api::Firmware::Uefi`]: the host's firmware code and the VM's variables.
    pub uefi: Option<UefiFiles>,
    /// The cloud-init NoCloud seed volume (raw, attached read-only after the spec's disks).
    pub seed: Option<SharedFd>,
}

/// A descriptor shared between the agent's bookkeeping and QEMU's launch.
#[derive(Debug, Clone)]
pub struct SharedFd(pub Arc<OwnedFd>);

impl PartialEq for SharedFd {
    fn eq(&self, other: &SharedFd) -> bool {
        self.0.as_raw_fd() == other.0.as_raw_fd()
    }
}

impl Eq for SharedFd {}

/// UEFI's two flash devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UefiFiles {
    /// The firmware code (OVMF_CODE_4M.fd), read-only: the same file on every host.
    pub code: SharedFd,
    /// The VM's own variables store on shared storage, read-only and read-write (O_DIRECT),
    /// so it is handed over between hosts like a disk.
    pub vars_read: SharedFd,
    pub vars_write: SharedFd,
}

/// An image under a qcow2 disk (its backing file, then that one's, ...), opened read-only
/// (O_DIRECT) by the agent: QEMU is never left to open a path written in an image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedBacking {
    pub read: SharedFd,
    pub format: DiskFormat,
}

/// The user and groups a QEMU process runs as: set by the agent between fork and exec, so
/// QEMU itself never holds root (and the seccomp filter forbids changing back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the device groups QEMU needs (`/dev/kvm`, `/dev/userfaultfd`).
    pub groups: Vec<u32>,
}

/// A file of a VM's spec that the agent opened for QEMU (kernel, initrd or disk).
#[derive(Debug, Clone)]
pub struct OpenedFile {
    /// The path the spec names.
    pub path: String,
    /// Opened read-only (disks with O_DIRECT, as QEMU opens them for `cache.direct`).
    pub read: Arc<OwnedFd>,
    /// Opened read-write (O_DIRECT), for a disk the guest may write.
    pub write: Option<Arc<OwnedFd>>,
    /// The disk's backing chain, nearest first; empty for an image without one.
    pub backing: Vec<OpenedBacking>,
    /// A whole block device (a block datastore's LUN), not a file: QEMU's `host_device`.
    pub block_device: bool,
}

impl OpenedFile {
    /// The descriptors QEMU must inherit.
    pub fn fds(&self) -> impl Iterator<Item = i32> + '_ {
        std::iter::once(self.read.as_raw_fd())
            .chain(self.write.iter().map(|f| f.as_raw_fd()))
            .chain(self.backing.iter().map(|b| b.read.0.as_raw_fd()))
    }
}

impl PartialEq for OpenedFile {
    fn eq(&self, other: &OpenedFile) -> bool {
        self.path == other.path && self.fds().eq(other.fds()) && self.backing == other.backing
    }
}

impl Eq for OpenedFile {}

/// The runtime files of one VM inside its run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    pub run_dir: PathBuf,
    /// QMP control socket.
    pub qmp_socket: PathBuf,
    /// Written by QEMU with its pid.
    pub pidfile: PathBuf,
    /// Guest serial console (appended to across starts).
    pub console_log: PathBuf,
    /// QEMU's own log (`-D`).
    pub qemu_log: PathBuf,
    /// QEMU's stdout/stderr (the reason a launch failed is there).
    pub start_log: PathBuf,
    /// The VM's screen (VNC, RFB over a unix socket), for VMs that boot from a disk.
    pub vnc_socket: PathBuf,
    /// The key file of a migration's TLS, while the migration needs it.
    pub migration_tls_dir: PathBuf,
    /// Where a relayed migration's QEMU and relay meet ([`RunPaths::MIGRATION_SOCKET`]).
    pub migration_socket: PathBuf,
}

impl RunPaths {
    /// Names in the run dir, as QEMU (whose working directory it is) is given them.
    pub const QMP_SOCKET: &'static str = "qmp.sock";
    pub const PIDFILE: &'static str = "qemu.pid";
    pub const CONSOLE_LOG: &'static str = "console.log";
    pub const QEMU_LOG: &'static str = "qemu.log";
    pub const MIGRATION_TLS_DIR: &'static str = "migration-tls";
    /// A relayed migration's clear stream between QEMU and its relay, in a directory of
    /// QEMU's user: shorter than [`RunPaths::QMP_SOCKET`], so it fits wherever that does.
    pub const MIGRATION_SOCKET: &'static str = "mig/s";
    pub const VNC_SOCKET: &'static str = "vnc.sock";

    pub fn new(run_dir: &Path) -> Self {
        RunPaths {
            run_dir: run_dir.to_path_buf(),
            qmp_socket: run_dir.join(Self::QMP_SOCKET),
            pidfile: run_dir.join(Self::PIDFILE),
            console_log: run_dir.join(Self::CONSOLE_LOG),
            qemu_log: run_dir.join(Self::QEMU_LOG),
            start_log: run_dir.join("qemu-start.log"),
            vnc_socket: run_dir.join(Self::VNC_SOCKET),
            migration_tls_dir: run_dir.join(Self::MIGRATION_TLS_DIR),
            migration_socket: run_dir.join(Self::MIGRATION_SOCKET),
        }
    }
}

impl LaunchConfig {
    pub fn paths(&self) -> RunPaths {
        RunPaths::new(&self.run_dir)
    }

    /// The opened file standing for `path`, if the caller opened it.
    fn opened(&self, path: &str) -> Option<&OpenedFile> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Every descriptor QEMU must inherit.
    pub fn inherited_fds(&self) -> Vec<i32> {
        let mut fds: Vec<i32> = self.files.iter().flat_map(OpenedFile::fds).collect();
        if let Some(u) = &self.guest_files.uefi {
            fds.extend([&u.code, &u.vars_read, &u.vars_write].map(|f| f.0.as_raw_fd()));
        }
        fds.extend(self.guest_files.seed.iter().map(|f| f.0.as_raw_fd()));
        fds
    }

    /// The CPU model QEMU is given: a model name, or a full `-cpu` value with feature flags
    /// (`qemu64-v1,+avx,-svm,enforce`) as the center resolves it for EVC.
    pub fn cpu_model(&self) -> &str {
        self.spec
            .cpu_model
            .as_deref()
            .unwrap_or(&self.default_cpu_model)
    }

    /// The `-cpu` value: [`Self::cpu_model`] with `enforce` added unless it has it already.
    pub fn cpu_arg(&self) -> String {
        let model = self.cpu_model();
        if model.split(',').skip(1).any(|p| p == "enforce") {
            model.to_string()
        } else {
            format!("{model},enforce")
        }
    }

    /// Checks what [`build_command`] cannot express (no file system access).
    pub fn validate(&self) -> Result<()> {
        let spec = &self.spec;
        if !tern_api::valid_name(&spec.name) {
            return Err(Error::Config(format!(
                "VM name `{}` is not [a-z0-9][a-z0-9-]{{0,31}}",
                spec.name
            )));
        }
        if spec.vcpus == 0 || spec.vcpus > 1024 {
            return Err(Error::Config(format!(
                "vcpus {} out of range 1..=1024",
                spec.vcpus
            )));
        }
        if spec.memory_mib < 16 {
            return Err(Error::Config(format!(
                "memory_mib {} is below 16",
                spec.memory_mib
            )));
        }
        if !self.run_dir.is_absolute() {
            return Err(Error::Config(format!(
                "run_dir {} must be absolute (QEMU's paths must not depend on its working \
                 directory)",
                self.run_dir.display()
            )));
        }
        // sun_path holds 108 bytes with the terminating NUL.
        let socket = self.paths().qmp_socket;
        if socket.as_os_str().len() > 107 {
            return Err(Error::Config(format!(
                "QMP socket path {} is longer than a unix socket allows (107 bytes): use a \
                 shorter state dir",
                socket.display()
            )));
        }
        let model = self.cpu_model();
        if !valid_cpu_arg(model) {
            return Err(Error::Config(format!(
                "CPU model `{model}` is not a model name, optionally followed by feature flags \
                 (`,+feat`, `,-feat`, `,feat=on|off`, `,enforce`)"
            )));
        }
        if self.taps.len() != spec.nics.len() {
            return Err(Error::Config(format!(
                "{} NICs but {} taps given",
                spec.nics.len(),
                self.taps.len()
            )));
        }
        for (nic, tap) in spec.nics.iter().zip(&self.taps) {
            if tern_api::parse_unicast_mac(&nic.mac).is_none() {
                return Err(Error::Config(format!("MAC `{}` is not unicast", nic.mac)));
            }
            if tap.is_empty() || tap.len() > 15 || tap.contains(['/', ' ', ',']) {
                return Err(Error::Config(format!(
                    "tap name `{tap}` is not an interface name"
                )));
            }
        }
        if let Some(d) = spec
            .disks
            .iter()
            .find(|d| d.is_iscsi() && (d.iscsi().is_none() || d.format != DiskFormat::Raw))
        {
            return Err(Error::Config(format!(
                "disk `{}` is not a raw iSCSI LUN (iscsi://IP:PORT/IQN/LUN)",
                d.path
            )));
        }
        let mut files: Vec<&str> = spec
            .disks
            .iter()
            .filter(|d| !d.is_iscsi())
            .map(|d| d.path.as_str())
            .collect();
        if let BootSource::Kernel { kernel, initrd, .. } = &spec.boot {
            files.push(kernel);
            files.extend(initrd.as_deref());
        }
        if let Some(f) = files.iter().find(|f| !Path::new(f).is_absolute()) {
            return Err(Error::Config(format!("path `{f}` must be absolute")));
        }
        if matches!(spec.boot, BootSource::Disk) && spec.disks.is_empty() {
            return Err(Error::Config("disk boot needs at least one disk".into()));
        }
        if spec.firmware == Firmware::Uefi && self.guest_files.uefi.is_none() {
            return Err(Error::Config(
                "UEFI firmware needs its code and variables files, opened by the caller".into(),
            ));
        }
        if spec.cloud_init.is_some() && self.guest_files.seed.is_none() {
            return Err(Error::Config(
                "cloud-init needs its seed volume, made and opened by the caller".into(),
            ));
        }
        Ok(())
    }
}

/// A CPU model name, then only feature switches: nothing else (no `model-id=…`, no file
/// paths) can reach QEMU's `-cpu` through a spec.
fn valid_cpu_arg(arg: &str) -> bool {
    let word = |w: &str| {
        !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let mut parts = arg.split(',');
    let model_ok = parts.next().is_some_and(word);
    model_ok
        && parts.all(|p| match p.split_once('=') {
            Some((f, v)) => word(f) && matches!(v, "on" | "off"),
            None => p == "enforce" || p.strip_prefix(['+', '-']).is_some_and(word),
        })
}

/// A short tag of a run dir (FNV-1a): differs between the hosts a VM runs on.
fn run_dir_tag(dir: &Path) -> u32 {
    dir.as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
        })
}

/// QEMU option values separate with `,`: a literal comma is written twice.
fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_opt(path: &Path) -> String {
    escape_opt(&path.to_string_lossy())
}

/// The full argv (program first) that starts the VM; no shell is involved.
///
/// Pure: reads no file and checks nothing (see [`LaunchConfig::validate`]).
pub fn build_command(cfg: &LaunchConfig) -> Vec<String> {
    let spec = &cfg.spec;
    let mut a: Vec<String> = vec![cfg.qemu_binary.to_string_lossy().into_owned()];
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));

    push(&[
        "-name",
        &format!("guest={},debug-threads=on", escape_opt(&spec.name)),
    ]);
    push(&["-uuid", &cfg.id.to_string()]);
    // UEFI: QEMU's two flash chips, backed by block nodes defined below.
    let machine = match (&spec.firmware, &cfg.guest_files.uefi) {
        (Firmware::Uefi, Some(_)) => format!("{MACHINE_TYPE},pflash0=fw-code,pflash1=fw-vars"),
        _ => MACHINE_TYPE.to_string(),
    };
    push(&["-machine", &machine]);
    push(&[
        "-accel",
        match cfg.accel {
            Accelerator::Kvm => "kvm",
            // One host thread per vCPU instead of one for all.
            Accelerator::Tcg => "tcg,thread=multi",
        },
    ]);
    push(&["-cpu", &cfg.cpu_arg()]);
    push(&[
        "-smp",
        &format!("{0},sockets=1,cores={0},threads=1", spec.vcpus),
    ]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    push(&["-nodefaults", "-no-user-config"]);
    if matches!(spec.boot, BootSource::Disk) {
        // A guest booted by firmware has a screen (its boot menu, an installer, a login), served
        // as VNC on a unix socket in the run dir: only the agent reaches it, and a console in
        // the web client can be proxied from there. Kernel-booted test guests have none.
        push(&["-display", &format!("vnc=unix:{}", RunPaths::VNC_SOCKET)]);
        push(&["-device", r#"{"driver":"VGA","id":"video0"}"#]);
    } else {
        push(&["-display", "none"]);
    }
    // Seccomp filter, every group denied: obsolete system calls; set*uid/gid and setsid
    // (elevateprivileges); fork and exec (spawn: no helper, no `exec:` migration); scheduling,
    // affinity and memory policy (resourcecontrol: the agent's cgroup decides those).
    push(&["-sandbox", SANDBOX]);
    push(&["-msg", "timestamp=on"]);

    match &spec.boot {
        BootSource::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            // The loader opens these by name (no fd sets): the magic link names the file
            // the agent opened, whatever the path points at by now.
            let by_fd = |p: &str| match cfg.opened(p) {
                Some(f) => format!("/proc/self/fd/{}", f.read.as_raw_fd()),
                None => p.to_string(),
            };
            push(&["-kernel", &by_fd(kernel)]);
            if let Some(initrd) = initrd {
                push(&["-initrd", &by_fd(initrd)]);
            }
            if !cmdline.is_empty() {
                push(&["-append", cmdline]);
            }
        }
        BootSource::Disk => {}
    }

    // Fd sets 1..=16 are the disks'; the others count up from here.
    let mut next_set = 100;
    // Puts `fds` in a new fd set: the `-add-fd` arguments go to `args`, the set's path back.
    let mut fd_set = |args: &mut Vec<String>, fds: &[i32], opaque: &str| {
        let set = next_set;
        next_set += 1;
        for fd in fds {
            args.push("-add-fd".into());
            args.push(format!("fd={fd},set={set},opaque={opaque}"));
        }
        format!("/dev/fdset/{set}")
    };
    let mut extra: Vec<String> = Vec::new();
    // Moves what `extra` gathered onto the command line, keeping definition order (a node must
    // be defined before one that names it).
    macro_rules! flush {
        () => {
            push(&extra.iter().map(String::as_str).collect::<Vec<_>>());
            extra.clear();
        };
    }
    let cache = json!({"direct": true, "no-flush": false});
    if let (Firmware::Uefi, Some(uefi)) = (&spec.firmware, &cfg.guest_files.uefi) {
        let code = fd_set(&mut extra, &[uefi.code.0.as_raw_fd()], "fw-code");
        let vars = fd_set(
            &mut extra,
            &[uefi.vars_read.0.as_raw_fd(), uefi.vars_write.0.as_raw_fd()],
            "fw-vars",
        );
        let nodes = [
            json!({"driver": "file", "node-name": "fw-code-file", "filename": code,
                   "read-only": true}),
            json!({"driver": "raw", "node-name": "fw-code", "file": "fw-code-file",
                   "read-only": true}),
            // The variables move between hosts like a disk: uncached, locked.
            json!({"driver": "file", "node-name": "fw-vars-file", "filename": vars,
                   "cache": cache, "aio": "native", "locking": "on"}),
            json!({"driver": "raw", "node-name": "fw-vars", "file": "fw-vars-file",
                   "cache": cache}),
        ];
        for n in nodes {
            extra.extend(["-blockdev".into(), n.to_string()]);
        }
    }
    let format_name = |f: DiskFormat| match f {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    // One virtio-scsi controller holds every SCSI disk (a controller serves 255 targets).
    if spec.disks.iter().any(|d| d.bus == DiskBus::VirtioScsi) {
        push(&["-device", r#"{"driver":"virtio-scsi-pci","id":"scsi0"}"#]);
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        let filename = match cfg.opened(&disk.path) {
            Some(f) => {
                // One fd set per disk, holding the read-only and the read-write descriptor:
                // QEMU picks the one whose access mode it needs, also when it reopens.
                let set = i + 1;
                for fd in f.fds() {
                    push(&["-add-fd", &format!("fd={fd},set={set},opaque=disk{i}")]);
                }
                format!("/dev/fdset/{set}")
            }
            None => disk.path.clone(),
        };
        let file = match disk.iscsi() {
            // QEMU's own initiator. Each QEMU logs in under a name of its own (the VM and its
            // run dir, which is per host): a source and destination sharing one would each
            // end the other's session (session reinstatement) in the middle of the hand-over.
            Some(lun) => json!({
                "driver": "iscsi",
                "node-name": format!("file{i}"),
                "transport": "tcp",
                "portal": lun.portal.to_string(),
                "target": lun.target,
                "lun": lun.lun,
                "initiator-name": format!(
                    "iqn.2026-12.org.tern:{}.{:08x}",
                    cfg.id,
                    run_dir_tag(&cfg.run_dir)
                ),
                "cache": cache,
                "read-only": disk.readonly,
            }),
            None => json!({
                "driver": if cfg.opened(&disk.path).is_some_and(|f| f.block_device) {
                    "host_device"
                } else {
                    "file"
                },
                "node-name": format!("file{i}"),
                "filename": filename,
                "cache": cache,
                "aio": "native",
                "locking": "on",
                "read-only": disk.readonly,
            }),
        };
        // The backing chain, deepest first, each image's format node naming the one below;
        // `backing: null` ends the chain, so QEMU never opens a path from an image header.
        let chain = cfg
            .opened(&disk.path)
            .map(|f| f.backing.as_slice())
            .unwrap_or(&[]);
        let mut below = serde_json::Value::Null;
        for (j, b) in chain.iter().enumerate().rev() {
            let path = fd_set(&mut extra, &[b.read.0.as_raw_fd()], &format!("disk{i}b{j}"));
            let file = json!({"driver": "file", "node-name": format!("file{i}b{j}"),
                "filename": path, "cache": cache, "aio": "native", "locking": "on",
                "read-only": true});
            let mut node = json!({"driver": format_name(b.format),
                "node-name": format!("disk{i}b{j}"), "file": format!("file{i}b{j}"),
                "cache": cache, "read-only": true});
            if b.format == DiskFormat::Qcow2 {
                node["backing"] = below;
            }
            extra.extend(["-blockdev".into(), file.to_string()]);
            extra.extend(["-blockdev".into(), node.to_string()]);
            below = json!(format!("disk{i}b{j}"));
        }
        let mut format = json!({
            "driver": format_name(disk.format),
            "node-name": format!("disk{i}"),
            "file": format!("file{i}"),
            "cache": cache,
            "read-only": disk.readonly,
        });
        if disk.format == DiskFormat::Qcow2 && cfg.opened(&disk.path).is_some() {
            format["backing"] = below;
        }
        let mut device = match disk.bus {
            DiskBus::VirtioBlk => json!({
                "driver": "virtio-blk-pci",
                "id": format!("vdisk{i}"),
                "drive": format!("disk{i}"),
            }),
            // Target = the disk's index: the same disk keeps the same SCSI address on every
            // host and across restarts.
            DiskBus::VirtioScsi => json!({
                "driver": "scsi-hd",
                "id": format!("vdisk{i}"),
                "drive": format!("disk{i}"),
                "bus": "scsi0.0",
                "channel": 0,
                "scsi-id": i,
                "lun": 0,
            }),
        };
        if i == 0 && matches!(spec.boot, BootSource::Disk) {
            device["bootindex"] = json!(1);
        }
        flush!();
        push(&["-blockdev", &file.to_string()]);
        push(&["-blockdev", &format.to_string()]);
        push(&["-device", &device.to_string()]);
    }

    if let Some(seed) = &cfg.guest_files.seed {
        // Made by the agent in the VM's run dir, the same bytes on every host: a local file,
        // so its page cache is harmless.
        let path = fd_set(&mut extra, &[seed.0.as_raw_fd()], "seed");
        let nodes = [
            json!({"driver": "file", "node-name": "seed-file", "filename": path,
                   "read-only": true, "locking": "off"}),
            json!({"driver": "raw", "node-name": "seed", "file": "seed-file", "read-only": true}),
            json!({"driver": "virtio-blk-pci", "id": "vseed", "drive": "seed"}),
        ];
        for (n, flag) in nodes.iter().zip(["-blockdev", "-blockdev", "-device"]) {
            extra.extend([flag.to_string(), n.to_string()]);
        }
    }
    flush!();

    for (i, (nic, tap)) in spec.nics.iter().zip(&cfg.taps).enumerate() {
        let netdev = json!({
            "type": "tap",
            "id": format!("net{i}"),
            "ifname": tap,
            "script": "no",
            "downscript": "no",
        });
        let device = json!({
            "driver": "virtio-net-pci",
            "id": format!("nic{i}"),
            "netdev": format!("net{i}"),
            "mac": nic.mac,
            "romfile": "",
        });
        push(&["-netdev", &netdev.to_string()]);
        push(&["-device", &device.to_string()]);
    }

    // Guests block at boot waiting for entropy without one.
    push(&["-device", r#"{"driver":"virtio-rng-pci","id":"rng0"}"#]);

    // The run dir is QEMU's working directory, and QEMU names its files relative to it: an
    // unprivileged QEMU then needs no right on the directories above (they may stay 0700).
    push(&[
        "-chardev",
        &format!(
            "file,id=serial0,path={},append=on",
            path_opt(Path::new(RunPaths::CONSOLE_LOG))
        ),
        "-serial",
        "chardev:serial0",
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            path_opt(Path::new(RunPaths::QMP_SOCKET))
        ),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    push(&["-pidfile", RunPaths::PIDFILE]);
    push(&["-D", RunPaths::QEMU_LOG]);

    if cfg.start_paused {
        push(&["-S"]);
    }
    match &cfg.incoming {
        Some(Incoming::Defer) => push(&["-incoming", "defer"]),
        Some(Incoming::Uri(uri)) => push(&["-incoming", uri]),
        None => {}
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::{DiskSpec, NicSpec};

    fn config() -> LaunchConfig {
        LaunchConfig {
            cgroup_procs: Vec::new(),
            id: Uuid::parse_str("6b0c5f4e-6a8e-4f57-9d57-3d0f1f3b2a10").unwrap(),
            spec: VmSpec {
                firmware: Default::default(),
                cloud_init: None,
                resources: Default::default(),
                name: "web-1".into(),
                vcpus: 2,
                memory_mib: 768,
                cpu_model: None,
                boot: BootSource::Kernel {
                    kernel: "/shared/vmlinuz".into(),
                    initrd: Some("/shared/initramfs.img".into()),
                    cmdline: "console=ttyS0 tern.ip=10.78.0.100/24".into(),
                },
                disks: vec![],
                nics: vec![],
            },
            run_dir: PathBuf::from("/var/lib/tern/vms/x"),
            taps: vec![],
            accel: Accelerator::Tcg,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            default_cpu_model: "qemu64".into(),
            incoming: None,
            start_paused: false,
            files: Vec::new(),
            run_as: None,
            guest_files: Default::default(),
        }
    }

    /// The value following the first occurrence of `flag` (panics if absent).
    fn value<'a>(argv: &'a [String], flag: &str) -> &'a str {
        let i = argv
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} missing in {argv:?}"));
        &argv[i + 1]
    }

    fn values<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn basic_fields() {
        let cfg = config();
        cfg.validate().unwrap();
        let argv = build_command(&cfg);
        assert_eq!(argv[0], "qemu-system-x86_64");
        assert_eq!(value(&argv, "-name"), "guest=web-1,debug-threads=on");
        assert_eq!(
            value(&argv, "-uuid"),
            "6b0c5f4e-6a8e-4f57-9d57-3d0f1f3b2a10"
        );
        assert_eq!(value(&argv, "-machine"), "pc-q35-10.0");
        assert_eq!(value(&argv, "-accel"), "tcg,thread=multi");
        assert_eq!(value(&argv, "-cpu"), "qemu64,enforce");
        assert_eq!(value(&argv, "-smp"), "2,sockets=1,cores=2,threads=1");
        assert_eq!(value(&argv, "-m"), "768M");
        assert_eq!(value(&argv, "-kernel"), "/shared/vmlinuz");
        assert_eq!(value(&argv, "-initrd"), "/shared/initramfs.img");
        // The whole cmdline is one argv element: no shell splitting.
        assert_eq!(
            value(&argv, "-append"),
            "console=ttyS0 tern.ip=10.78.0.100/24"
        );
        // Relative to the run dir, QEMU's working directory.
        assert_eq!(value(&argv, "-pidfile"), "qemu.pid");
        assert_eq!(value(&argv, "-D"), "qemu.log");
        assert_eq!(value(&argv, "-mon"), "chardev=qmp,mode=control");
        // Confined: a seccomp filter with every group denied.
        assert_eq!(
            value(&argv, "-sandbox"),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        );
        let chardevs = values(&argv, "-chardev");
        assert!(chardevs.contains(&"file,id=serial0,path=console.log,append=on"));
        assert!(chardevs.contains(&"socket,id=qmp,path=qmp.sock,server=on,wait=off"));
        for flag in ["-nodefaults", "-no-user-config"] {
            assert!(argv.iter().any(|a| a == flag), "{flag} missing");
        }
        // The agent starts QEMU in its own session: a daemonizing fork would break the filter.
        for absent in [
            "-S",
            "-incoming",
            "-netdev",
            "-blockdev",
            "-nographic",
            "-daemonize",
        ] {
            assert!(!argv.iter().any(|a| a == absent), "{absent} present");
        }
    }

    #[test]
    fn kvm_cpu_model_and_empty_cmdline() {
        let mut cfg = config();
        cfg.accel = Accelerator::Kvm;
        cfg.spec.cpu_model = Some("Haswell".into());
        cfg.spec.boot = BootSource::Kernel {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
        };
        let argv = build_command(&cfg);
        assert_eq!(value(&argv, "-accel"), "kvm");
        assert_eq!(value(&argv, "-cpu"), "Haswell,enforce");
        assert!(!argv.iter().any(|a| a == "-initrd" || a == "-append"));
    }

    #[test]
    fn resolved_cpu_arguments_pass_through_with_one_enforce() {
        let mut cfg = config();
        cfg.spec.cpu_model = Some("qemu64-v1,+avx,-svm,enforce".into());
        cfg.validate().unwrap();
        assert_eq!(
            value(&build_command(&cfg), "-cpu"),
            "qemu64-v1,+avx,-svm,enforce"
        );
        cfg.spec.cpu_model = Some("max,-avx2,pmu=off".into());
        cfg.validate().unwrap();
        assert_eq!(
            value(&build_command(&cfg), "-cpu"),
            "max,-avx2,pmu=off,enforce"
        );
    }

    #[test]
    fn paused_and_incoming() {
        let mut cfg = config();
        cfg.start_paused = true;
        cfg.incoming = Some(Incoming::Defer);
        let argv = build_command(&cfg);
        assert!(argv.iter().any(|a| a == "-S"));
        assert_eq!(value(&argv, "-incoming"), "defer");
        cfg.incoming = Some(Incoming::Uri("tcp:10.77.0.12:4444".into()));
        assert_eq!(
            value(&build_command(&cfg), "-incoming"),
            "tcp:10.77.0.12:4444"
        );
    }

    #[test]
    fn disks_and_nics() {
        let mut cfg = config();
        cfg.spec.boot = BootSource::Disk;
        cfg.spec.disks = vec![
            DiskSpec {
                bus: Default::default(),
                path: "/shared/a,b.qcow2".into(),
                format: DiskFormat::Qcow2,
                readonly: false,
                datastore: None,
                volume: None,
            },
            DiskSpec {
                bus: Default::default(),
                path: "/shared/data.raw".into(),
                format: DiskFormat::Raw,
                readonly: true,
                datastore: None,
                volume: None,
            },
        ];
        cfg.spec.nics = vec![
            NicSpec {
                mac: "52:54:00:00:00:01".into(),
            },
            NicSpec {
                mac: "52:54:00:00:00:02".into(),
            },
        ];
        cfg.taps = vec!["tt-a1".into(), "tt-a2".into()];
        cfg.validate().unwrap();
        let argv = build_command(&cfg);
        let blockdevs: Vec<serde_json::Value> = values(&argv, "-blockdev")
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        assert_eq!(blockdevs.len(), 4);
        // A comma in a path needs no escaping in JSON syntax.
        assert_eq!(blockdevs[0]["filename"], "/shared/a,b.qcow2");
        assert_eq!(blockdevs[0]["cache"]["direct"], true);
        assert_eq!(blockdevs[0]["aio"], "native");
        assert_eq!(blockdevs[0]["locking"], "on");
        assert_eq!(blockdevs[1]["driver"], "qcow2");
        assert_eq!(blockdevs[1]["file"], "file0");
        assert_eq!(blockdevs[3]["driver"], "raw");
        assert_eq!(blockdevs[3]["read-only"], true);
        assert_eq!(blockdevs[2]["read-only"], true);
        let devices: Vec<serde_json::Value> = values(&argv, "-device")
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        let blk: Vec<_> = devices
            .iter()
            .filter(|d| d["driver"] == "virtio-blk-pci")
            .collect();
        assert_eq!(blk.len(), 2);
        assert_eq!(blk[0]["bootindex"], 1);
        assert!(blk[1].get("bootindex").is_none());
        let nics: Vec<_> = devices
            .iter()
            .filter(|d| d["driver"] == "virtio-net-pci")
            .collect();
        assert_eq!(nics.len(), 2);
        assert_eq!(nics[1]["mac"], "52:54:00:00:00:02");
        assert_eq!(nics[1]["netdev"], "net1");
        let netdevs: Vec<serde_json::Value> = values(&argv, "-netdev")
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        assert_eq!(netdevs[0]["ifname"], "tt-a1");
        assert_eq!(netdevs[1]["ifname"], "tt-a2");
        assert_eq!(netdevs[1]["id"], "net1");
        assert_eq!(netdevs[0]["script"], "no");
        assert!(!argv.iter().any(|a| a == "-kernel"));
    }

    #[test]
    fn uefi_seed_and_backing_chain_reach_qemu_as_descriptors_only() {
        let dir = tempfile::tempdir().unwrap();
        let fd = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, b"x").unwrap();
            SharedFd(Arc::new(std::fs::File::open(p).unwrap().into()))
        };
        let mut cfg = config();
        cfg.spec.boot = BootSource::Disk;
        cfg.spec.firmware = Firmware::Uefi;
        cfg.spec.cloud_init = Some(Default::default());
        cfg.spec.disks = vec![DiskSpec {
            bus: Default::default(),
            path: "/shared/vms/clone.qcow2".into(),
            format: DiskFormat::Qcow2,
            readonly: false,
            datastore: None,
            volume: None,
        }];
        assert!(matches!(cfg.validate(), Err(Error::Config(m)) if m.contains("UEFI")));
        cfg.files = vec![OpenedFile {
            path: "/shared/vms/clone.qcow2".into(),
            read: fd("r").0,
            write: Some(fd("w").0),
            backing: vec![
                OpenedBacking {
                    read: fd("b0"),
                    format: DiskFormat::Qcow2,
                },
                OpenedBacking {
                    read: fd("b1"),
                    format: DiskFormat::Raw,
                },
            ],
            block_device: false,
        }];
        cfg.guest_files.uefi = Some(UefiFiles {
            code: fd("code"),
            vars_read: fd("vr"),
            vars_write: fd("vw"),
        });
        assert!(matches!(cfg.validate(), Err(Error::Config(m)) if m.contains("seed")));
        cfg.guest_files.seed = Some(fd("seed"));
        cfg.validate().unwrap();
        let argv = build_command(&cfg);
        assert_eq!(
            value(&argv, "-machine"),
            format!("{MACHINE_TYPE},pflash0=fw-code,pflash1=fw-vars")
        );
        let nodes: Vec<serde_json::Value> = values(&argv, "-blockdev")
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        let at = |name: &str| {
            nodes
                .iter()
                .position(|n| n["node-name"] == name)
                .unwrap_or_else(|| panic!("no node {name}: {nodes:?}"))
        };
        // Each node comes after the one it names, and the chain ends explicitly.
        assert!(at("disk0b1") < at("disk0b0") && at("disk0b0") < at("disk0"));
        assert_eq!(nodes[at("disk0")]["backing"], "disk0b0");
        assert_eq!(nodes[at("disk0b0")]["backing"], "disk0b1");
        assert!(nodes[at("disk0b1")].get("backing").is_none());
        assert_eq!(nodes[at("disk0b1")]["driver"], "raw");
        assert_eq!(nodes[at("file0b0")]["read-only"], true);
        assert_eq!(nodes[at("fw-code")]["read-only"], true);
        assert_eq!(nodes[at("fw-vars-file")]["locking"], "on");
        for n in nodes.iter().filter(|n| n["driver"] == "file") {
            let f = n["filename"].as_str().unwrap();
            assert!(f.starts_with("/dev/fdset/"), "{n}");
        }
        let seed = values(&argv, "-device")
            .into_iter()
            .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
            .find(|d| d["drive"] == "seed")
            .expect("the seed's device");
        assert!(seed.get("bootindex").is_none());
        let fds = cfg.inherited_fds();
        assert_eq!(fds.len(), 8, "disk r/w, two backing, code, vars r/w, seed");
        for fd in fds {
            assert!(
                values(&argv, "-add-fd")
                    .iter()
                    .any(|a| a.starts_with(&format!("fd={fd},"))),
                "fd {fd} is not handed to QEMU"
            );
        }
    }

    #[test]
    fn an_iscsi_lun_is_opened_by_qemu_under_a_name_per_host() {
        let mut cfg = config();
        cfg.spec.disks = vec![DiskSpec {
            path: "iscsi://10.77.0.3:3260/iqn.2026-12.lab.tern:san/1".into(),
            format: DiskFormat::Raw,
            readonly: false,
            datastore: None,
            volume: None,
            bus: DiskBus::VirtioBlk,
        }];
        cfg.validate().unwrap();
        let node = |cfg: &LaunchConfig| -> serde_json::Value {
            serde_json::from_str(values(&build_command(cfg), "-blockdev")[0]).unwrap()
        };
        let n = node(&cfg);
        assert_eq!(n["driver"], "iscsi");
        assert_eq!(n["portal"], "10.77.0.3:3260");
        assert_eq!(n["target"], "iqn.2026-12.lab.tern:san");
        assert_eq!(n["lun"], 1);
        let mut other_host = cfg.clone();
        other_host.run_dir = PathBuf::from("/var/lib/tern/h2/vms/x");
        assert_ne!(n["initiator-name"], node(&other_host)["initiator-name"]);
        assert_eq!(n["initiator-name"], node(&cfg)["initiator-name"]);
        cfg.spec.disks[0].format = DiskFormat::Qcow2;
        assert!(matches!(cfg.validate(), Err(Error::Config(m)) if m.contains("iSCSI")));
        cfg.spec.disks[0].format = DiskFormat::Raw;
        cfg.spec.disks[0].path = "iscsi://san.example:3260/iqn.x:y/1".into();
        assert!(matches!(cfg.validate(), Err(Error::Config(m)) if m.contains("iSCSI")));
    }

    #[test]
    fn a_firmware_booted_guest_has_a_screen_on_a_unix_socket_and_a_test_guest_none() {
        let mut cfg = config();
        assert_eq!(value(&build_command(&cfg), "-display"), "none");
        cfg.spec.boot = BootSource::Disk;
        cfg.spec.disks = vec![DiskSpec {
            path: "/shared/boot.raw".into(),
            format: DiskFormat::Raw,
            readonly: false,
            datastore: None,
            volume: None,
            bus: DiskBus::VirtioBlk,
        }];
        let argv = build_command(&cfg);
        assert_eq!(value(&argv, "-display"), "vnc=unix:vnc.sock");
        assert!(values(&argv, "-device")
            .iter()
            .any(|d| d.contains(r#""driver":"VGA""#)));
    }

    #[test]
    fn scsi_disks_share_one_controller_at_fixed_addresses() {
        let mut cfg = config();
        cfg.spec.boot = BootSource::Disk;
        let disk = |path: &str, bus| DiskSpec {
            path: path.into(),
            format: DiskFormat::Raw,
            readonly: false,
            datastore: None,
            volume: None,
            bus,
        };
        cfg.spec.disks = vec![
            disk("/shared/boot.raw", DiskBus::VirtioScsi),
            disk("/shared/data.raw", DiskBus::VirtioBlk),
            disk("/shared/logs.raw", DiskBus::VirtioScsi),
        ];
        let argv = build_command(&cfg);
        let devices: Vec<serde_json::Value> = values(&argv, "-device")
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        let of = |driver: &str| -> Vec<&serde_json::Value> {
            devices.iter().filter(|d| d["driver"] == driver).collect()
        };
        assert_eq!(of("virtio-scsi-pci").len(), 1);
        let scsi = of("scsi-hd");
        assert_eq!(scsi.len(), 2);
        assert_eq!(scsi[0]["drive"], "disk0");
        assert_eq!(scsi[0]["bootindex"], 1);
        assert_eq!(scsi[1]["scsi-id"], 2);
        assert_eq!(scsi[1]["bus"], "scsi0.0");
        assert_eq!(of("virtio-blk-pci")[0]["drive"], "disk1");
        // The controller is defined before the disks that name it.
        let pos = |needle: &str| argv.iter().position(|a| a.contains(needle)).unwrap();
        assert!(pos("virtio-scsi-pci") < pos("scsi-hd"));
    }

    #[test]
    fn the_run_dir_never_reaches_an_option_string() {
        // A comma in the run dir would split an option; QEMU names its files relative to it.
        let mut cfg = config();
        cfg.run_dir = PathBuf::from("/tmp/a,b");
        let argv = build_command(&cfg);
        assert!(!argv.iter().any(|a| a.contains("/tmp/a")), "{argv:?}");
        assert!(
            values(&argv, "-chardev").contains(&"socket,id=qmp,path=qmp.sock,server=on,wait=off")
        );
    }

    #[test]
    fn validation() {
        let mut cfg = config();
        cfg.spec.nics = vec![NicSpec {
            mac: "52:54:00:00:00:01".into(),
        }];
        assert!(matches!(cfg.validate(), Err(Error::Config(m)) if m.contains("taps")));
        cfg.taps = vec!["t0".into()];
        cfg.validate().unwrap();
        cfg.spec.nics[0].mac = "01:00:5e:00:00:01".into();
        assert!(cfg.validate().is_err());
        let mut cfg = config();
        cfg.run_dir = PathBuf::from("relative");
        assert!(cfg.validate().is_err());
        for bad in [
            "qemu64,model-id=x",
            "qemu64,+a v x",
            "qemu64,,+avx",
            ",+avx",
            "qemu64,avx=maybe",
        ] {
            let mut cfg = config();
            cfg.spec.cpu_model = Some(bad.into());
            assert!(cfg.validate().is_err(), "{bad}");
        }
        let mut cfg = config();
        cfg.spec.boot = BootSource::Disk;
        assert!(cfg.validate().is_err());
        let mut cfg = config();
        cfg.spec.vcpus = 0;
        assert!(cfg.validate().is_err());
        let mut cfg = config();
        cfg.run_dir = PathBuf::from(format!("/{}", "d".repeat(100)));
        assert!(matches!(cfg.validate(), Err(Error::Config(m)) if m.contains("unix socket")));
    }
}
