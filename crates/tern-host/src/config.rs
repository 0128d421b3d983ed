//! The agent's settings: command-line flags, the TOML config file, defaults, and their merge.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
pub use tern_qemu::AccelChoice;

/// Default directory of the agent's state (token, per-VM run dirs).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tern/host";
/// Default address of the agent API.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8701";
/// Default QEMU binary.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
/// Default heartbeat period.
pub const DEFAULT_HEARTBEAT_MS: u64 = 2000;
/// CPU model given to VMs whose spec names none: every x86-64 host offers it, so VMs started
/// with it can migrate anywhere.
pub const DEFAULT_CPU_MODEL: &str = "qemu64";

/// Flags of `tern host agent` (each may also come from the config file).
///
/// Every flag is also a key of the TOML file given with `--config` (same name, `-` written
/// `_`, e.g. `state_dir = "/srv/tern"`); a flag on the command line wins over the file.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(after_long_help = AFTER_HELP)]
pub struct AgentArgs {
    /// TOML config file; flags given on the command line win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Name of this host in the center [default: the machine's hostname].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Cluster to join (it must exist in the center) [default: default].
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// Center to register with, `https://IP:PORT` (the agent then speaks only mutual TLS;
    /// an `http://` center, started with --insecure-http, makes it plain too); for an HA
    /// group, every center's URL, comma-separated: the agent finds the leader among them.
    /// Without it the agent runs alone, serving its API only (plain HTTP, for tests).
    #[arg(long, value_name = "URL")]
    pub center: Option<String>,
    /// File holding this host's one-time join token (`tern host add NAME` on the center
    /// prints it), or a shared enrolment token; needed with --center for the first
    /// registration, after which the host uses the secret the center gave it (kept in the
    /// state dir as host.secret).
    #[arg(long, value_name = "FILE")]
    pub enrol_token_file: Option<PathBuf>,
    /// Address of the agent API [default: the --migration-address IP, port 8701; or
    /// 0.0.0.0:8701 without one].
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<SocketAddr>,
    /// URL the center calls this agent at [default: from --listen, or from
    /// --migration-address when listening on every address].
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,
    /// Directory of the agent's state: agent.token and vms/<uuid>/ run dirs
    /// [default: /var/lib/tern/host].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Bridge the VMs' taps are attached to (needed for VMs with NICs).
    #[arg(long, value_name = "BRIDGE")]
    pub bridge: Option<String>,
    /// Root of the shared storage this host sees (VM kernels and disks live under it).
    #[arg(long, value_name = "DIR")]
    pub shared_storage: Option<PathBuf>,
    /// IP this host receives migrations on [default: the --listen IP].
    #[arg(long, value_name = "IP")]
    pub migration_address: Option<IpAddr>,
    /// Accelerator: auto (KVM when the CPU has vmx/svm and /dev/kvm opens, else TCG with a
    /// warning), kvm (or refuse to start), tcg [default: auto].
    #[arg(long, value_name = "auto|kvm|tcg")]
    pub accel: Option<AccelChoice>,
    /// Most capable CPU model this host may offer guests (EVC ceiling), e.g. `Haswell`.
    #[arg(long, value_name = "MODEL")]
    pub cpu_ceiling: Option<String>,
    /// CPU model for VMs whose spec names none [default: qemu64].
    #[arg(long, value_name = "MODEL")]
    pub default_cpu_model: Option<String>,
    /// QEMU binary [default: qemu-system-x86_64].
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// Heartbeat period in milliseconds [default: 2000].
    #[arg(long, value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// First id of the range QEMU processes run as: each running VM gets a uid and gid of its
    /// own after it (65,536 ids; no passwd entry needed) [default: 400000000].
    #[arg(long, value_name = "UID")]
    pub qemu_uid_base: Option<u32>,
    /// Run QEMU as root, as the agent: for hosts where QEMU needs files only root may read.
    /// QEMU stays under its seccomp filter either way.
    #[arg(long)]
    pub qemu_as_root: bool,
    /// Encrypt migration streams with QEMU's own TLS instead of relays run by the agents.
    /// QEMU writes a TLS record per guest page: on the lab machine its copy of a 1 GiB guest
    /// took 2.8 times as long as through the relays.
    #[arg(long)]
    pub qemu_migration_tls: bool,
    /// cgroup (relative path) holding one group per VM, where the VMs' shares, reservations
    /// and limits are enforced: at the root of cgroup v2, or under the agent's own group in
    /// each cgroup v1 hierarchy [default: tern/<name>].
    #[arg(long, value_name = "PATH")]
    pub cgroup_parent: Option<String>,
    /// Root of the sysfs tree the health counters (EDAC memory errors, disk I/O errors) are
    /// read under: a lab or a test points it at a tree of its own [default: /sys].
    #[arg(long, value_name = "DIR")]
    pub health_sysfs: Option<PathBuf>,
    /// UEFI firmware code for VMs with `firmware: uefi`: the same 4 MiB file on every host of
    /// a cluster (it is part of what migrates) [default: /usr/share/OVMF/OVMF_CODE_4M.fd].
    #[arg(long, value_name = "FILE")]
    pub uefi_code: Option<PathBuf>,
    /// Empty UEFI variables store a new UEFI VM's own copy is made from (kept on the shared
    /// storage under .tern/nvram/) [default: /usr/share/OVMF/OVMF_VARS_4M.fd].
    #[arg(long, value_name = "FILE")]
    pub uefi_vars_template: Option<PathBuf>,
}

/// Default first id of the QEMU users' range: far above login users (1000+), systemd's
/// dynamic users (61184–65519) and the usual subordinate id ranges of containers (100000+).
pub const DEFAULT_QEMU_UID_BASE: u32 = 400_000_000;

const AFTER_HELP: &str = "\
Example (one host of a cluster):
  tern host agent --name h1 --cluster prod --center https://10.0.0.2:8700 \\
      --enrol-token-file /etc/tern/enrol.token --listen 10.0.0.11:8701 \\
      --bridge br0 --shared-storage /srv/shared

The same as a config file (tern host agent --config /etc/tern/host.toml):
  name = \"h1\"
  cluster = \"prod\"
  center = \"https://10.0.0.2:8700\"
  enrol_token_file = \"/etc/tern/enrol.token\"
  listen = \"10.0.0.11:8701\"
  bridge = \"br0\"
  shared_storage = \"/srv/shared\"

QEMU processes outlive the agent: stopping or restarting it leaves VMs running, and the next
start adopts them again from the state dir.

QEMU confinement: each VM's QEMU runs as a uid and gid of its own (from --qemu-uid-base; no
passwd entry needed), under a seccomp filter that denies every group QEMU offers, in a session
of its own, with its run dir as working directory. The agent opens the VM's files and hands
over descriptors; kernel and initrd files must be readable by others (QEMU re-opens them with
its own rights). The agent gives /dev/userfaultfd to the range's group (0660) for post-copy.

TLS: the join token from `tern host add NAME` ends in the cluster CA's fingerprint; the agent
checks the center against it, sends a signing request for a key it makes, and keeps the
certificate the center signs (naming this host) with its key in STATE_DIR/tls/host.pem (0600)
and the CA in STATE_DIR/tls/ca.crt. From then on its API accepts only the center's
certificate, its calls present the host's, and it renews the certificate itself after two
thirds of its lifetime. The center also presents the token the agent keeps in
STATE_DIR/agent.token.";

/// The config file: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    cluster: Option<String>,
    center: Option<String>,
    enrol_token_file: Option<PathBuf>,
    listen: Option<SocketAddr>,
    advertise_url: Option<String>,
    state_dir: Option<PathBuf>,
    bridge: Option<String>,
    shared_storage: Option<PathBuf>,
    migration_address: Option<IpAddr>,
    accel: Option<AccelChoice>,
    cpu_ceiling: Option<String>,
    default_cpu_model: Option<String>,
    qemu: Option<PathBuf>,
    heartbeat_ms: Option<u64>,
    qemu_uid_base: Option<u32>,
    #[serde(default)]
    qemu_as_root: bool,
    #[serde(default)]
    qemu_migration_tls: bool,
    cgroup_parent: Option<String>,
    health_sysfs: Option<PathBuf>,
    uefi_code: Option<PathBuf>,
    uefi_vars_template: Option<PathBuf>,
}

/// Where and how to reach the center.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CenterLink {
    /// `https://IP:PORT` (or `http://` for a center with --insecure-http), no trailing slash:
    /// the center the agent talks to now.
    pub url: String,
    /// Every center of an HA group (`url` among them), in the order given: the agent moves
    /// to the next when the one it talks to is down or a standby.
    pub urls: Vec<String>,
    pub enrol_token_file: PathBuf,
}

impl CenterLink {
    /// Moves to the next center of the group (no change with one center).
    pub fn next_center(&mut self) {
        if let Some(i) = self.urls.iter().position(|u| *u == self.url) {
            self.url = self.urls[(i + 1) % self.urls.len()].clone();
        }
    }
}

/// The agent's settings once flags, file and defaults are merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub name: String,
    pub cluster: String,
    /// `None`: run alone (API only, no registration).
    pub center: Option<CenterLink>,
    pub listen: SocketAddr,
    /// `None`: derived from the address actually bound (see [`AgentConfig::agent_url`]).
    pub advertise_url: Option<String>,
    pub state_dir: PathBuf,
    pub bridge: Option<String>,
    pub shared_storage: Option<PathBuf>,
    pub migration_address: IpAddr,
    pub accel: AccelChoice,
    pub cpu_ceiling: Option<String>,
    pub default_cpu_model: String,
    pub qemu: PathBuf,
    pub heartbeat_ms: u64,
    /// First id of the QEMU users' range; `None`: QEMU runs as root (`--qemu-as-root`).
    pub qemu_uid_base: Option<u32>,
    /// Encrypted migration streams use QEMU's TLS, not the agents' relays.
    pub qemu_migration_tls: bool,
    /// Relative cgroup path of the VMs' groups (checked: plain names only).
    pub cgroup_parent: String,
    /// Root of the sysfs the health counters are read under.
    pub health_sysfs: PathBuf,
    /// UEFI firmware code and the empty variables store new UEFI VMs start from.
    pub uefi: crate::firmware::UefiFirmware,
}

impl AgentArgs {
    /// Merges flags over the config file over defaults, and checks the result.
    pub fn resolve(&self) -> anyhow::Result<AgentConfig> {
        let file = match &self.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let name = match self.name.clone().or(file.name) {
            Some(n) => n,
            None => nix::unistd::gethostname()
                .context("reading the hostname (give --name)")?
                .to_string_lossy()
                .into_owned(),
        };
        if name.is_empty() {
            bail!("the host name is empty: give --name");
        }
        // Without --listen, the API binds the host's migration address when one is given:
        // every address (0.0.0.0) would expose it on networks the host did not choose.
        let listen: SocketAddr = match self.listen.or(file.listen) {
            Some(l) => l,
            None => {
                let default: SocketAddr =
                    DEFAULT_LISTEN.parse().context("default listen address")?;
                match self.migration_address.or(file.migration_address) {
                    Some(ip) => SocketAddr::new(ip, default.port()),
                    None => default,
                }
            }
        };
        let center_url = self.center.clone().or(file.center);
        let enrol_token_file = self.enrol_token_file.clone().or(file.enrol_token_file);
        let center = match center_url {
            Some(list) => {
                let mut urls = Vec::new();
                for url in list.split(',').map(str::trim) {
                    let url = url.trim_end_matches('/').to_string();
                    if !url.starts_with("https://") && !url.starts_with("http://") {
                        bail!("--center must be an https://IP:PORT URL (or several, comma-separated, for an HA group), not {url:?}");
                    }
                    if !urls.contains(&url) {
                        urls.push(url);
                    }
                }
                let Some(enrol_token_file) = enrol_token_file else {
                    bail!("--center needs --enrol-token-file (the file the center wrote its enrolment token to)");
                };
                Some(CenterLink {
                    url: urls[0].clone(),
                    urls,
                    enrol_token_file,
                })
            }
            None => None,
        };
        let advertise_url = self
            .advertise_url
            .clone()
            .or(file.advertise_url)
            .map(|u| u.trim_end_matches('/').to_string());
        if let Some(u) = &advertise_url {
            if !u.starts_with("https://") && !u.starts_with("http://") {
                bail!("--advertise-url must be an https://IP:PORT URL, not {u:?}");
            }
        }
        let migration_address = match self.migration_address.or(file.migration_address) {
            Some(a) => a,
            None if !listen.ip().is_unspecified() => listen.ip(),
            None => IpAddr::from([127, 0, 0, 1]),
        };
        let heartbeat_ms = self
            .heartbeat_ms
            .or(file.heartbeat_ms)
            .unwrap_or(DEFAULT_HEARTBEAT_MS);
        if heartbeat_ms < 100 {
            bail!("--heartbeat-ms {heartbeat_ms} is too short (at least 100)");
        }
        let bridge = self.bridge.clone().or(file.bridge);
        if let Some(b) = &bridge {
            if b.is_empty() || b.len() > 15 {
                bail!("--bridge {b:?} is not an interface name (1 to 15 characters)");
            }
        }
        let cgroup_parent = self
            .cgroup_parent
            .clone()
            .or(file.cgroup_parent)
            .unwrap_or_else(|| format!("tern/{name}"));
        crate::cgroups::check_parent(&cgroup_parent).context("--cgroup-parent")?;
        Ok(AgentConfig {
            cgroup_parent,
            uefi: crate::firmware::UefiFirmware {
                code: self
                    .uefi_code
                    .clone()
                    .or(file.uefi_code)
                    .unwrap_or_else(|| PathBuf::from(crate::firmware::DEFAULT_CODE)),
                vars_template: self
                    .uefi_vars_template
                    .clone()
                    .or(file.uefi_vars_template)
                    .unwrap_or_else(|| PathBuf::from(crate::firmware::DEFAULT_VARS)),
            },
            health_sysfs: self
                .health_sysfs
                .clone()
                .or(file.health_sysfs)
                .unwrap_or_else(|| PathBuf::from("/sys")),
            name,
            cluster: self
                .cluster
                .clone()
                .or(file.cluster)
                .unwrap_or_else(|| "default".to_string()),
            center,
            listen,
            advertise_url,
            state_dir: self
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            bridge,
            shared_storage: self.shared_storage.clone().or(file.shared_storage),
            migration_address,
            accel: self.accel.or(file.accel).unwrap_or_default(),
            cpu_ceiling: self.cpu_ceiling.clone().or(file.cpu_ceiling),
            default_cpu_model: self
                .default_cpu_model
                .clone()
                .or(file.default_cpu_model)
                .unwrap_or_else(|| DEFAULT_CPU_MODEL.to_string()),
            qemu: self
                .qemu
                .clone()
                .or(file.qemu)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_QEMU)),
            heartbeat_ms,
            qemu_migration_tls: self.qemu_migration_tls || file.qemu_migration_tls,
            qemu_uid_base: if self.qemu_as_root || file.qemu_as_root {
                None
            } else {
                Some(
                    self.qemu_uid_base
                        .or(file.qemu_uid_base)
                        .unwrap_or(DEFAULT_QEMU_UID_BASE),
                )
            },
        })
    }
}

impl AgentConfig {
    /// URL the center calls this agent at, given the address the API actually bound.
    pub fn agent_url(&self, bound: SocketAddr) -> String {
        if let Some(u) = &self.advertise_url {
            return u.clone();
        }
        let ip = if bound.ip().is_unspecified() {
            self.migration_address
        } else {
            bound.ip()
        };
        let scheme = if self.tls() { "https" } else { "http" };
        match ip {
            IpAddr::V4(v4) => format!("{scheme}://{v4}:{}", bound.port()),
            IpAddr::V6(v6) => format!("{scheme}://[{v6}]:{}", bound.port()),
        }
    }

    /// Whether the agent speaks TLS: when its center does (an `https://` URL). A center
    /// started with `--insecure-http` has plain-HTTP agents; an agent without a center (API
    /// only, for tests) is plain too.
    pub fn tls(&self) -> bool {
        self.center
            .as_ref()
            .is_some_and(|c| c.url.starts_with("https://"))
    }
}

fn read_file_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing the config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn parse(argv: &[&str]) -> AgentArgs {
        let mut v = vec!["agent"];
        v.extend_from_slice(argv);
        Cli::try_parse_from(v).expect("flags parse").args
    }

    #[test]
    fn defaults() {
        let c = parse(&["--name", "h1"]).resolve().expect("resolves");
        assert_eq!(c.name, "h1");
        assert_eq!(c.cluster, "default");
        assert_eq!(c.center, None);
        assert_eq!(c.listen, "0.0.0.0:8701".parse().expect("addr"));
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.accel, AccelChoice::Auto);
        assert_eq!(c.heartbeat_ms, 2000);
        assert_eq!(c.default_cpu_model, "qemu64");
        assert_eq!(c.migration_address, IpAddr::from([127, 0, 0, 1]));
        // With a migration address and no --listen, the API binds that address only.
        let c = parse(&["--name", "h1", "--migration-address", "10.0.0.7"])
            .resolve()
            .expect("resolves");
        assert_eq!(c.listen, "10.0.0.7:8701".parse().expect("addr"));
    }

    #[test]
    fn flags_win_over_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("host.toml");
        std::fs::write(
            &file,
            "name = \"from-file\"\ncluster = \"lab\"\nlisten = \"10.0.0.5:9000\"\n\
             accel = \"tcg\"\nheartbeat_ms = 500\nbridge = \"br9\"\n",
        )
        .expect("write config");
        let c = parse(&[
            "--config",
            file.to_str().expect("utf-8 path"),
            "--name",
            "h2",
            "--heartbeat-ms",
            "700",
        ])
        .resolve()
        .expect("resolves");
        assert_eq!(c.name, "h2");
        assert_eq!(c.cluster, "lab");
        assert_eq!(c.accel, AccelChoice::Tcg);
        assert_eq!(c.heartbeat_ms, 700);
        assert_eq!(c.bridge.as_deref(), Some("br9"));
        // The migration address follows a specific listen address.
        assert_eq!(c.migration_address, IpAddr::from([10, 0, 0, 5]));
        assert_eq!(
            c.agent_url("10.0.0.5:9000".parse().expect("addr")),
            "http://10.0.0.5:9000"
        );
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("host.toml");
        std::fs::write(&file, "nmae = \"typo\"\n").expect("write config");
        let err = parse(&["--config", file.to_str().expect("utf-8 path")])
            .resolve()
            .expect_err("typo refused");
        assert!(format!("{err:#}").contains("nmae"), "{err:#}");
    }

    #[test]
    fn center_needs_enrol_token() {
        let err = parse(&["--name", "h", "--center", "http://10.0.0.2:8700"])
            .resolve()
            .expect_err("refused");
        assert!(format!("{err}").contains("--enrol-token-file"));
        let c = parse(&[
            "--name",
            "h",
            "--center",
            "http://10.0.0.2:8700/",
            "--enrol-token-file",
            "/tmp/t",
        ])
        .resolve()
        .expect("resolves");
        assert_eq!(
            c.center.map(|l| l.url).as_deref(),
            Some("http://10.0.0.2:8700")
        );
    }

    #[test]
    fn agent_url_from_unspecified_listen() {
        let c = parse(&["--name", "h", "--migration-address", "10.77.0.11"])
            .resolve()
            .expect("resolves");
        assert_eq!(
            c.agent_url("0.0.0.0:8701".parse().expect("addr")),
            "http://10.77.0.11:8701"
        );
    }
}
