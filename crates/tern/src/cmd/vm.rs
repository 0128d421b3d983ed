//! `tern vm create|start|stop|set|list|show|console|delete|migrate`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_api::center::{ConsoleQuery, CreateVm, StopVm, Task, Vm};
use tern_api::{
    ApiError, BootSource, CenterClient, CpuAmount, DiskFormat, DiskSpec, NicSpec, Resources,
    Shares, VmSpec,
};

use super::output::{opt, print_json, short_id, time, Format, Sheet, Table};
use super::task::{parse_duration, print_task, wait};
use crate::error::{ApiResultExt, CliError};

const LIST: &str = "tern vm list";

#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Define a VM (it starts stopped).
    Create(Box<CreateArgs>),
    /// Start a VM and wait until it runs.
    Start {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Stop a VM (guest power-off, then kill after the grace time) and wait.
    Stop {
        name: String,
        /// Kill the QEMU process at once instead of asking the guest.
        #[arg(long)]
        force: bool,
        /// Grace time for the guest to power off before it is killed [center default: 30000]
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Change a VM's resource policy: shares, reservations, limits. Only the options given
    /// change; `none` removes a reservation or limit. A running VM's host applies it at once.
    #[command(after_long_help = RESOURCES_HELP)]
    Set {
        name: String,
        #[command(flatten)]
        resources: ResourceArgs,
        /// Move the VM into this resource pool (`none`: the cluster's root); its share of
        /// the pools' settings reaches its host at once.
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
    },
    /// List VMs.
    List,
    /// Show one VM.
    Show { name: String },
    /// Print the tail of a VM's serial console.
    Console {
        name: String,
        /// How many bytes of the tail to print.
        #[arg(long, default_value_t = 16384)]
        bytes: u64,
        /// Keep printing new output until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Delete a stopped VM.
    Delete { name: String },
    /// Live-migrate a running VM to another host and follow it to the end (exit 1 if it
    /// rolled back: the VM then runs on its source as before).
    Migrate(super::migrate::MigrateArgs),
    /// Run every migration pre-check (CPU, memory, storage, state) as a dry run; exit 4 if one
    /// fails.
    CanMigrate {
        name: String,
        /// Destination host.
        #[arg(long)]
        to: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// Print the task id and return at once instead of waiting.
    #[arg(long)]
    detach: bool,
    /// Stop waiting after this long (`90`, `30s`, `5m`); the task keeps running.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    wait_timeout: Duration,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("boot").required(true).args(["kernel", "boot_disk", "image"])))]
pub struct CreateArgs {
    /// VM name: `[a-z0-9][a-z0-9-]{0,31}`.
    name: String,
    /// Cluster the VM belongs to.
    #[arg(long)]
    cluster: String,
    /// Host to run on [default: the center places it]
    #[arg(long)]
    host: Option<String>,
    /// Virtual CPUs.
    #[arg(long)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long)]
    memory_mib: u64,
    /// CPU model: a baseline (x86-64-v2, Haswell…; it must fit the cluster's EVC mode) or
    /// host-passthrough [default: the cluster's EVC mode, else x86-64-v2]
    #[arg(long)]
    cpu_model: Option<String>,
    /// Kernel to boot directly (a path every host sees, normally on shared storage).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs for --kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(
        long,
        value_name = "STR",
        requires = "kernel",
        allow_hyphen_values = true
    )]
    cmdline: Option<String>,
    /// Boot from the first --disk.
    #[arg(long, requires = "disk")]
    boot_disk: bool,
    /// Make the boot disk from this image (`tern image list`): a linked clone on the shared
    /// storage (vms/NAME.qcow2), deleted with the VM.
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,
    /// Size of the disk made from --image (`8G`, `20G`, `512M`) [default: the image's].
    #[arg(long, value_name = "SIZE", requires = "image", value_parser = parse_size)]
    disk_size: Option<u64>,
    /// A full, independent copy of the image instead of a linked clone.
    #[arg(long, requires = "image")]
    full_copy: bool,
    /// Put the disk made from --image on this volume of a datastore instead of the image's
    /// own: `san:2` writes a full, raw copy onto LUN 2 of iSCSI datastore san (with
    /// --full-copy).
    #[arg(long, value_name = "DATASTORE:VOLUME", requires = "image")]
    image_on: Option<String>,
    /// How the guest sees the disk made from --image: virtio (virtio-blk, /dev/vda) or scsi
    /// (virtio-scsi, /dev/sda).
    #[arg(long, value_name = "virtio|scsi", requires = "image", value_parser = parse_bus)]
    disk_bus: Option<tern_api::DiskBus>,
    /// A disk: a volume of a datastore (`DATASTORE:VOLUME`, e.g. `shared:vms/db.qcow2` or
    /// `san:2` for LUN 2), an image file on shared storage, or a SAN LUN QEMU opens itself
    /// (`iscsi://IP:PORT/IQN/LUN`, raw); then `[,format=raw|qcow2][,bus=virtio|scsi]
    /// [,readonly]` (repeatable).
    #[arg(long, value_name = "DATASTORE:VOLUME|PATH[,format=qcow2]", value_parser = parse_disk)]
    disk: Vec<DiskSpec>,
    /// NIC MAC address (repeatable; one NIC each) [default: one NIC, random 52:54:00 MAC]
    #[arg(long, value_parser = parse_mac)]
    mac: Vec<String>,
    /// Create the VM without any NIC.
    #[arg(long, conflicts_with = "mac")]
    no_nic: bool,
    /// Firmware: bios (SeaBIOS) or uefi (OVMF; the VM's variables store is kept on the
    /// shared storage and moves with it).
    #[arg(long, value_name = "bios|uefi", default_value = "bios")]
    firmware: tern_api::Firmware,
    #[command(flatten)]
    cloud_init: CloudInitArgs,
    #[command(flatten)]
    resources: ResourceArgs,
}

/// What the guest's cloud-init is told (any of these attaches a NoCloud seed volume).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "cloud-init (a NoCloud seed volume the host writes)")]
pub struct CloudInitArgs {
    /// Attach a seed even without any of the options below (the guest's host name is then
    /// the VM's name).
    #[arg(long)]
    cloud_init: bool,
    /// Guest host name [default: the VM's name].
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// OpenSSH public key file for the image's default user (repeatable; one key per line).
    #[arg(long, value_name = "FILE")]
    ssh_key: Vec<PathBuf>,
    /// Static address of the first NIC, with its prefix (10.78.0.100/24).
    #[arg(long, value_name = "CIDR", conflicts_with = "dhcp")]
    ip: Option<String>,
    /// Default gateway, with --ip.
    #[arg(long, value_name = "IP", requires = "ip")]
    gateway: Option<String>,
    /// DNS server, with --ip (repeatable).
    #[arg(long, value_name = "IP", requires = "ip")]
    dns: Vec<String>,
    /// Configure the first NIC by DHCP.
    #[arg(long)]
    dhcp: bool,
    /// User data handed to cloud-init as it is (`#cloud-config` YAML, a script…).
    #[arg(long, value_name = "FILE")]
    user_data: Option<PathBuf>,
}

impl CloudInitArgs {
    /// The configuration, `None` when no option asks for one; files are read here.
    fn build(&self) -> Result<Option<tern_api::CloudInit>, CliError> {
        let wanted = self.cloud_init
            || self.hostname.is_some()
            || !self.ssh_key.is_empty()
            || self.ip.is_some()
            || self.dhcp
            || self.user_data.is_some();
        if !wanted {
            return Ok(None);
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| CliError::usage(format!("cannot read {}: {e}", p.display())))
        };
        let mut keys = Vec::new();
        for f in &self.ssh_key {
            let text = read(f)?;
            let before = keys.len();
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
            if keys.len() == before {
                return Err(CliError::usage(format!(
                    "{} holds no public key (give the .pub file)",
                    f.display()
                )));
            }
        }
        let network = match (&self.ip, self.dhcp) {
            (Some(address), _) => Some(tern_api::GuestNetwork::Static {
                address: address.clone(),
                gateway: self.gateway.clone(),
                dns: self.dns.clone(),
            }),
            (None, true) => Some(tern_api::GuestNetwork::Dhcp),
            (None, false) => None,
        };
        let ci = tern_api::CloudInit {
            hostname: self.hostname.clone(),
            ssh_authorized_keys: keys,
            network,
            user_data: self.user_data.as_deref().map(read).transpose()?,
        };
        ci.check().map_err(CliError::usage)?;
        Ok(Some(ci))
    }
}

const RESOURCES_HELP: &str = "\
How the policy is enforced: each VM's QEMU runs in a cgroup of its own on its host.
  shares       CPU weight against the host's other VMs under contention (low : normal : high =
               1 : 2 : 4 per vCPU, or a number: 1000 is one normal vCPU)
  reservation  CPU the VM gets whenever it wants it, however busy the host (a floor on its
               weight); memory kept for its QEMU
  limit        most CPU the VM may use even on an idle host (a quota); most host memory its
               QEMU may use (at least the VM's RAM: tern has no balloon)
CPU amounts are MHz (1500MHz, 2GHz, turned into cores with the host's MHz per core) or
percent of one core (25%, 200% for two cores).

Examples:
  tern vm set web-1 --cpu-shares high --cpu-limit 150%
  tern vm set db-1 --cpu-reservation 2GHz --memory-reservation-mib 4096
  tern vm set web-1 --cpu-limit none";

/// A reservation or limit to set, or `none` to remove it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Setting<T> {
    Set(T),
    Clear,
}

impl<T> Setting<T> {
    /// The value to store: `None` for `none`.
    pub(crate) fn value(self) -> Option<T> {
        match self {
            Setting::Set(v) => Some(v),
            Setting::Clear => None,
        }
    }
}

fn parse_setting<T: std::str::FromStr<Err = String>>(s: &str) -> Result<Setting<T>, String> {
    if s == "none" {
        Ok(Setting::Clear)
    } else {
        s.parse().map(Setting::Set)
    }
}

/// A disk size: a number with K, M, G or T (powers of 1024), or bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        Some((i, 'T' | 't')) => (&s[..i], 40),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{s:?}: give a size like 8G, 512M or 20G"))
}

pub(crate) fn parse_mib_setting(s: &str) -> Result<Setting<u64>, String> {
    if s == "none" {
        return Ok(Setting::Clear);
    }
    match s.parse::<u64>() {
        Ok(v) if v > 0 => Ok(Setting::Set(v)),
        _ => Err(format!(
            "{s:?}: expected MiB (a whole number above 0) or none"
        )),
    }
}

/// The resource policy options of `vm create` and `vm set`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ResourceArgs {
    /// CPU shares: low, normal, high, or a number (1000 = one normal vCPU).
    #[arg(long, value_name = "SHARES", value_parser = |s: &str| s.parse::<Shares>())]
    cpu_shares: Option<Shares>,
    /// CPU always available to the VM: MHz (1500MHz, 2GHz) or % of a core (50%), or none.
    #[arg(long, value_name = "AMOUNT", value_parser = parse_setting::<CpuAmount>)]
    cpu_reservation: Option<Setting<CpuAmount>>,
    /// Most CPU the VM may use: MHz or % of a core (25%, 200% = two cores), or none.
    #[arg(long, value_name = "AMOUNT", value_parser = parse_setting::<CpuAmount>)]
    cpu_limit: Option<Setting<CpuAmount>>,
    /// Memory shares: low, normal, high or a number (used by DRS's entitlements).
    #[arg(long, value_name = "SHARES", value_parser = |s: &str| s.parse::<Shares>())]
    memory_shares: Option<Shares>,
    /// Host memory kept for the VM's QEMU, in MiB, or none.
    #[arg(long, value_name = "MIB", value_parser = parse_mib_setting)]
    memory_reservation_mib: Option<Setting<u64>>,
    /// Most host memory the VM's QEMU may use, in MiB (at least the VM's memory), or none.
    #[arg(long, value_name = "MIB", value_parser = parse_mib_setting)]
    memory_limit_mib: Option<Setting<u64>>,
}

impl ResourceArgs {
    fn is_empty(&self) -> bool {
        self.cpu_shares.is_none()
            && self.cpu_reservation.is_none()
            && self.cpu_limit.is_none()
            && self.memory_shares.is_none()
            && self.memory_reservation_mib.is_none()
            && self.memory_limit_mib.is_none()
    }

    /// `base` with the options given applied.
    fn apply(&self, mut r: Resources) -> Resources {
        fn set<T: Copy>(field: &mut Option<T>, s: Option<Setting<T>>) {
            match s {
                Some(Setting::Set(v)) => *field = Some(v),
                Some(Setting::Clear) => *field = None,
                None => {}
            }
        }
        if let Some(s) = self.cpu_shares {
            r.cpu_shares = s;
        }
        if let Some(s) = self.memory_shares {
            r.memory_shares = s;
        }
        set(&mut r.cpu_reservation, self.cpu_reservation);
        set(&mut r.cpu_limit, self.cpu_limit);
        set(&mut r.memory_reservation_mib, self.memory_reservation_mib);
        set(&mut r.memory_limit_mib, self.memory_limit_mib);
        r
    }
}

pub async fn run(cmd: VmCommand, api: &CenterClient, fmt: Format) -> Result<(), CliError> {
    match cmd {
        VmCommand::Create(a) => create(api, *a, fmt).await,
        VmCommand::Start { name, wait } => {
            let task: Task = api.start_vm(&name).await.or_list(LIST)?;
            follow_task(api, task, &wait, fmt, &format!("vm {name} is running")).await
        }
        VmCommand::Stop {
            name,
            force,
            timeout_ms,
            wait,
        } => {
            let body = StopVm { force, timeout_ms };
            let task: Task = api.stop_vm(&name, &body).await.or_list(LIST)?;
            follow_task(api, task, &wait, fmt, &format!("vm {name} is stopped")).await
        }
        VmCommand::Set {
            name,
            resources,
            pool,
        } => {
            if resources.is_empty() && pool.is_none() {
                return Err(CliError::usage(
                    "nothing to change: give at least one of --pool, --cpu-shares, \
                     --cpu-reservation, --cpu-limit, --memory-shares, --memory-reservation-mib, \
                     --memory-limit-mib",
                ));
            }
            let mut vm: Vm = api.vm(&name).await.or_list(LIST)?;
            if let Some(p) = &pool {
                let p = (p != "none").then_some(p.as_str());
                vm = api.set_vm_pool(&name, p).await.or_list(LIST)?;
            }
            if !resources.is_empty() {
                let policy = resources.apply(vm.spec.resources.clone());
                vm = api.set_vm_resources(&name, &policy).await.or_list(LIST)?;
            }
            match fmt {
                Format::Json => print_json(&vm),
                Format::Table => {
                    println!(
                        "vm {name}: {} (pool {}; enforced: {})",
                        vm.spec.resources,
                        vm.pool.as_deref().unwrap_or("none"),
                        vm.effective_resources
                            .as_ref()
                            .map_or("-".to_string(), |r| r.to_string())
                    );
                    Ok(())
                }
            }
        }
        VmCommand::List => list(api, fmt).await,
        VmCommand::Show { name } => {
            let vm: Vm = api.vm(&name).await.or_list(LIST)?;
            show(&vm, fmt)
        }
        VmCommand::Console {
            name,
            bytes,
            follow,
        } => console(api, &name, bytes, follow).await,
        VmCommand::Migrate(a) => super::migrate::run(api, a, fmt).await,
        VmCommand::CanMigrate { name, to } => super::evc::can_migrate(api, &name, &to, fmt).await,
        VmCommand::Delete { name } => {
            api.delete_vm(&name).await.map_err(|e| {
                let conflict = e.is_conflict();
                let err = CliError::from_api(e, LIST);
                if conflict {
                    err.hint_unless_told(format!("stop it first: `tern vm stop {name}`"))
                } else {
                    err
                }
            })?;
            if fmt == Format::Table {
                println!("deleted vm {name}");
            }
            Ok(())
        }
    }
}

async fn follow_task(
    api: &CenterClient,
    task: Task,
    w: &WaitArgs,
    fmt: Format,
    done: &str,
) -> Result<(), CliError> {
    if w.detach {
        return match fmt {
            Format::Json => print_json(&task),
            Format::Table => {
                println!("{}", task.id);
                Ok(())
            }
        };
    }
    let started = std::time::Instant::now();
    let task = wait(api, task.id, Some(w.wait_timeout), fmt).await?;
    match fmt {
        Format::Json => print_task(&task, fmt),
        Format::Table => {
            let on = task
                .host
                .as_ref()
                .map(|h| format!(" on {h}"))
                .unwrap_or_default();
            println!(
                "{done}{on} (task {}, {:.1} s)",
                short_id(&task.id),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

async fn create(api: &CenterClient, a: CreateArgs, fmt: Format) -> Result<(), CliError> {
    let boot = match &a.kernel {
        Some(k) => BootSource::Kernel {
            kernel: absolute(k)?,
            initrd: a.initrd.as_deref().map(absolute).transpose()?,
            cmdline: a.cmdline.clone().unwrap_or_default(),
        },
        None => BootSource::Disk,
    };
    let mut disks = a.disk.clone();
    // Files are named from here; an iSCSI LUN (iscsi://IP:PORT/IQN/LUN) is taken as written.
    for d in disks
        .iter_mut()
        .filter(|d| !d.is_iscsi() && d.datastore.is_none())
    {
        d.path = absolute(Path::new(&d.path))?;
    }
    let nics = if a.no_nic {
        Vec::new()
    } else if a.mac.is_empty() {
        vec![NicSpec { mac: random_mac() }]
    } else {
        a.mac.iter().map(|m| NicSpec { mac: m.clone() }).collect()
    };
    let on = match &a.image_on {
        Some(s) => Some(
            s.split_once(':')
                .filter(|(d, v)| tern_api::datastores::valid_datastore_name(d) && !v.is_empty())
                .map(|(d, v)| (d.to_string(), v.to_string()))
                .ok_or_else(|| {
                    CliError::usage(format!("--image-on {s:?} is not DATASTORE:VOLUME"))
                })?,
        ),
        None => None,
    };
    let body = CreateVm {
        spec: VmSpec {
            firmware: a.firmware,
            cloud_init: a.cloud_init.build()?,
            resources: a.resources.apply(Resources::default()),
            name: a.name.clone(),
            vcpus: a.vcpus,
            memory_mib: a.memory_mib,
            cpu_model: a.cpu_model.clone(),
            boot,
            disks,
            nics,
        },
        cluster: a.cluster.clone(),
        host: a.host.clone(),
        image: a
            .image
            .clone()
            .map(|image| tern_api::images::DiskFromImage {
                image,
                size_bytes: a.disk_size,
                full_copy: a.full_copy,
                bus: a.disk_bus.unwrap_or_default(),
                datastore: on.as_ref().map(|(d, _)| d.clone()),
                volume: on.as_ref().map(|(_, v)| v.clone()),
            }),
    };
    let vm: Vm = api.create_vm(&body).await.map_err(|e| {
        let nf = e.is_not_found();
        let err = CliError::from_api(e, LIST);
        if nf {
            err.hint_unless_told(
                "check the cluster and host names: `tern cluster list`, `tern host list`",
            )
        } else {
            err
        }
    })?;
    match fmt {
        Format::Json => print_json(&vm),
        Format::Table => {
            let macs: Vec<&str> = vm.spec.nics.iter().map(|n| n.mac.as_str()).collect();
            println!(
                "created vm {} in cluster {} (host {}, mac {}); start it with `tern vm start {}`",
                vm.spec.name,
                vm.cluster,
                opt(&vm.host),
                if macs.is_empty() {
                    "none".into()
                } else {
                    macs.join(",")
                },
                vm.spec.name
            );
            Ok(())
        }
    }
}

async fn list(api: &CenterClient, fmt: Format) -> Result<(), CliError> {
    let vms: Vec<Vm> = api.vms().await.or_list(LIST)?;
    if fmt == Format::Json {
        return print_json(&vms);
    }
    let mut t = Table::new(&[
        "NAME",
        "CLUSTER",
        "HOST",
        "STATE",
        "DESIRED",
        "VCPUS",
        "MEMORY_MIB",
        "GEN",
    ]);
    for v in &vms {
        t.row(vec![
            v.spec.name.clone(),
            v.cluster.clone(),
            opt(&v.host),
            v.actual_state.to_string(),
            v.desired_state.to_string(),
            v.spec.vcpus.to_string(),
            v.spec.memory_mib.to_string(),
            v.generation.to_string(),
        ]);
    }
    t.print();
    Ok(())
}

fn show(vm: &Vm, fmt: Format) -> Result<(), CliError> {
    if fmt == Format::Json {
        return print_json(vm);
    }
    let s_ = &vm.spec;
    let mut s = Sheet::new();
    s.add("name", &s_.name)
        .add("id", vm.id)
        .add("cluster", &vm.cluster)
        .add("host", opt(&vm.host))
        .add("state", vm.actual_state)
        .add("desired_state", vm.desired_state)
        .add("generation", vm.generation)
        .add("vcpus", s_.vcpus)
        .add("memory_mib", s_.memory_mib)
        .add("cpu_model", opt(&s_.cpu_model))
        .add("resources", &s_.resources)
        .add("pool", opt(&vm.pool));
    if let Some(e) = vm
        .effective_resources
        .as_ref()
        .filter(|e| **e != s_.resources)
    {
        s.add("enforced_resources", e);
    }
    super::evc::vm_cpu_lines(vm, &mut s);
    match &s_.boot {
        BootSource::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            s.add("boot", "kernel")
                .add("kernel", kernel)
                .add("initrd", opt(initrd))
                .add("cmdline", cmdline);
        }
        BootSource::Disk => {
            s.add("boot", "disk");
        }
    }
    s.add("firmware", s_.firmware);
    if let Some(ci) = &s_.cloud_init {
        let network = match &ci.network {
            None => "(the image's default)".to_string(),
            Some(tern_api::GuestNetwork::Dhcp) => "dhcp".to_string(),
            Some(tern_api::GuestNetwork::Static {
                address, gateway, ..
            }) => match gateway {
                Some(g) => format!("{address} via {g}"),
                None => address.clone(),
            },
        };
        s.add(
            "cloud_init",
            format!(
                "hostname {}, {} ssh key(s), network {network}, user data {}",
                ci.hostname.as_deref().unwrap_or(&s_.name),
                ci.ssh_authorized_keys.len(),
                ci.user_data
                    .as_ref()
                    .map_or("none".to_string(), |u| format!("{} bytes", u.len()))
            ),
        );
    }
    for (i, d) in s_.disks.iter().enumerate() {
        let fmt_name = match d.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        let ro = if d.readonly { ",readonly" } else { "" };
        let ro = match d.bus {
            tern_api::DiskBus::VirtioBlk => ro.to_string(),
            tern_api::DiskBus::VirtioScsi => format!(",bus=scsi{ro}"),
        };
        let on = match (&d.datastore, &d.volume) {
            (Some(ds), Some(v)) => format!(" on datastore {ds}, volume {v}"),
            _ => String::new(),
        };
        s.add(
            &format!("disk{i}"),
            format!("{} (format={fmt_name}{ro}){on}", d.path),
        );
    }
    for (i, n) in s_.nics.iter().enumerate() {
        s.add(&format!("nic{i}"), &n.mac);
    }
    s.add("created", time(&vm.created_at));
    s.print();
    Ok(())
}

async fn console(api: &CenterClient, name: &str, bytes: u64, follow: bool) -> Result<(), CliError> {
    let text = api
        .console(name, &ConsoleQuery { bytes: Some(bytes) })
        .await
        .or_list(LIST)?;
    print!("{text}");
    if !follow {
        return Ok(());
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // The API gives the log's tail; new output is what follows the last text already printed.
    let mut seen = text;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let tail = match api
            .console(name, &ConsoleQuery { bytes: Some(65536) })
            .await
        {
            Ok(t) => t,
            Err(e @ ApiError::Transport { .. }) => {
                tracing::debug!("console poll: {e}");
                continue;
            }
            Err(e) => return Err(CliError::from_api(e, LIST)),
        };
        let new = new_output(&seen, &tail);
        if !new.is_empty() {
            print!("{new}");
            let _ = std::io::stdout().flush();
        }
        seen = tail;
    }
}

/// The part of `tail` that follows the end of `seen`, both windows onto the end of the same
/// growing log: their overlap is the longest suffix of `seen` that starts `tail`; with no
/// overlap (the log grew past the window, or was replaced) all of `tail` is new.
fn new_output<'a>(seen: &str, tail: &'a str) -> &'a str {
    let max = seen.len().min(tail.len());
    for k in (1..=max).rev() {
        if tail.is_char_boundary(k) && seen.ends_with(&tail[..k]) {
            return &tail[k..];
        }
    }
    tail
}

fn absolute(p: &Path) -> Result<String, CliError> {
    let abs = std::path::absolute(p)
        .map_err(|e| CliError::usage(format!("bad path {}: {e}", p.display())))?;
    abs.to_str()
        .map(str::to_string)
        .ok_or_else(|| CliError::usage(format!("path {} is not UTF-8", abs.display())))
}

/// `PATH|DATASTORE:VOLUME[,format=raw|qcow2][,bus=virtio|scsi][,readonly]`.
fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    let mut parts = s.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err("empty disk path".into());
    }
    let mut d = DiskSpec {
        bus: Default::default(),
        path: path.to_string(),
        format: DiskFormat::Raw,
        readonly: false,
        datastore: None,
        volume: None,
    };
    // DATASTORE:VOLUME (a name cannot hold '/', so a path or an iscsi:// URL never matches).
    if let Some((ds, volume)) = path.split_once(':') {
        if !ds.contains('/') && !volume.starts_with("//") {
            if !tern_api::datastores::valid_datastore_name(ds) || volume.is_empty() {
                return Err(format!("`{path}` is not DATASTORE:VOLUME"));
            }
            d.path = String::new();
            d.datastore = Some(ds.to_string());
            d.volume = Some(volume.to_string());
        }
    }
    for opt in parts {
        match opt.split_once('=') {
            Some(("format", "raw")) => d.format = DiskFormat::Raw,
            Some(("format", "qcow2")) => d.format = DiskFormat::Qcow2,
            Some(("format", f)) => return Err(format!("unknown disk format `{f}` (raw, qcow2)")),
            Some(("bus", b)) => d.bus = parse_bus(b)?,
            None if opt == "readonly" => d.readonly = true,
            _ => {
                return Err(format!(
                    "unknown disk option `{opt}` (format=raw|qcow2, bus=virtio|scsi, readonly)"
                ))
            }
        }
    }
    Ok(d)
}

fn parse_bus(s: &str) -> Result<tern_api::DiskBus, String> {
    match s {
        "virtio" | "virtio-blk" => Ok(tern_api::DiskBus::VirtioBlk),
        "scsi" | "virtio-scsi" => Ok(tern_api::DiskBus::VirtioScsi),
        _ => Err(format!("unknown disk bus `{s}` (virtio, scsi)")),
    }
}

fn parse_mac(s: &str) -> Result<String, String> {
    tern_api::parse_unicast_mac(s)
        .map(|_| s.to_ascii_lowercase())
        .ok_or_else(|| format!("`{s}` is not a unicast MAC (xx:xx:xx:xx:xx:xx)"))
}

/// A random MAC in QEMU's 52:54:00 range.
fn random_mac() -> String {
    let b: [u8; 3] = rand::random();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_parse() {
        let d = parse_disk("/s/a.qcow2,format=qcow2,readonly").unwrap();
        assert_eq!(d.format, DiskFormat::Qcow2);
        assert!(d.readonly);
        assert_eq!(parse_disk("/s/a.raw").unwrap().format, DiskFormat::Raw);
        assert!(parse_disk("/s/a,format=vmdk").is_err());
        assert!(parse_disk(",format=raw").is_err());
        let d = parse_disk("san:2,bus=scsi").unwrap();
        assert_eq!(
            (d.datastore.as_deref(), d.volume.as_deref()),
            (Some("san"), Some("2"))
        );
        assert!(d.path.is_empty());
        let u = parse_disk("iscsi://10.0.0.1:3260/iqn.2026-12.x:y/1").unwrap();
        assert_eq!(u.datastore, None);
        assert!(parse_disk("Bad Name:x").is_err());
    }

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("52:54:00:AA:00:01").unwrap(), "52:54:00:aa:00:01");
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert!(parse_unicast_ok(&random_mac()));
    }

    fn parse_unicast_ok(m: &str) -> bool {
        tern_api::parse_unicast_mac(m).is_some()
    }

    #[test]
    fn console_follow_finds_new_output() {
        assert_eq!(new_output("", "abc"), "abc");
        assert_eq!(new_output("line1\nline2\n", "line2\nline3\n"), "line3\n");
        assert_eq!(new_output("old", "entirely new"), "entirely new");
        assert_eq!(new_output("same\n", "same\n"), "");
    }
}
