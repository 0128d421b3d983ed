//! The center's configuration: command-line flags, the TOML config file, defaults, tokens.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// Default data directory (SQLite store, tokens, unix socket).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/tern/center";
/// Default TCP address of the REST API: loopback only. Agents on other hosts need the center
/// on an address of the management network, which only the operator knows: a default of every
/// address (0.0.0.0) would also expose the API on networks nobody chose.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8700";
/// Default time without a heartbeat after which a host counts as disconnected.
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 10_000;
/// Default heartbeat period the center asks agents for.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 2_000;
/// Default period of the DRS scheduler's pass (5 min).
pub const DEFAULT_DRS_PERIOD_MS: u64 = 300_000;
/// Default period of the pools' division of CPU limits by demand.
pub const DEFAULT_POOL_DIVISION_PERIOD_MS: u64 = 10_000;
/// How often hosts are asked which datastores they reach.
pub const DEFAULT_DATASTORE_CHECK_MS: u64 = 10_000;
pub const DEFAULT_HISTORY_PERIOD_MS: u64 = 10_000;
/// Default lifetime of the certificates the center issues (30 days); they renew after two
/// thirds of it, so a host that is down for up to ten days comes back with a valid one.
pub const DEFAULT_CERT_LIFETIME_S: u64 = 30 * 24 * 3600;
/// Bounds of the certificate lifetime: short ones are for tests of renewal.
pub const MIN_CERT_LIFETIME_S: u64 = 30;
pub const MAX_CERT_LIFETIME_S: u64 = 397 * 24 * 3600;

const AFTER_HELP: &str = "\
Every flag can also be set in the TOML file given with --config, under the same name with '_'
instead of '-'; a flag given on the command line wins over the file. Example:

    data_dir = \"/var/lib/tern/center\"
    listen = \"10.77.0.2:8700\"
    socket = \"/run/tern/center.sock\"
    heartbeat_timeout_ms = 10000

    [health]                # when a host's health signals degrade it (these are the defaults)
    memory_uncorrected = 1  # uncorrected memory errors (EDAC), since the center first saw it
    memory_corrected = 10
    machine_checks = 1
    disk_errors = 1
    nic_errors = 100
    qemu_crashes = 3
    disconnections = 3
    steal_percent = 25.0    # CPU steal above this, and steal_margin points above its peers,
    steal_margin = 20.0     # for pressure_s seconds
    run_queue = 4.0         # runnable tasks per core, likewise
    run_queue_margin = 2.0
    pressure_s = 120

Tokens: the admin token (--admin-token-file, created with a random token if missing) is the
first user's; read it on the center host, set TERN_TOKEN to it, and create a named token per
user with a role (tern token create NAME --role viewer|operator|admin). Hosts join with a
one-time token each (tern host add NAME; give it to the agent with --enrol-token-file), then
with the secret the center gives them; --shared-enrolment lets one shared token join new
hosts instead (closed networks only).

The API listens on TCP and on the unix socket at the same time; its OpenAPI document is at
GET /openapi.json (no token needed). TCP is on loopback unless --listen names an address of the
management network, which agents on other hosts need.

TLS: the center is the cluster's certificate authority (DATA_DIR/pki/ca.key, 0600; back it up:
a new CA means joining every host again). The TCP API speaks HTTPS only; its certificate names
center.tern, which every tern client checks, plus --tls-name for browsers. Hosts get a
certificate naming them when they join (the join token carries the CA's fingerprint, so the
agent checks the center first) and renew it themselves; from then on center and agents use
mutual TLS and check each other's names. The CLI trusts the CA once: tern trust URL.";

/// Flags of `tern center` (each may also come from the config file).
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[command(
    about = "Run the cluster manager: inventory, tasks, events and the REST API",
    after_long_help = AFTER_HELP
)]
#[serde(deny_unknown_fields)]
pub struct CenterArgs {
    /// TOML config file; flags given on the command line win over it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Directory of the store (center.db), the tokens and the socket
    /// [default: /var/lib/tern/center].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// TCP address of the REST API, used by host agents and remote users: an address of the
    /// management network [default: 127.0.0.1:8700, this host only].
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<SocketAddr>,

    /// Unix socket of the REST API (mode 0600), for the local CLI
    /// [default: DATA_DIR/center.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// File holding the admin token users present (created if missing)
    /// [default: DATA_DIR/admin.token].
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// File holding the cluster-wide enrolment token (created if missing), accepted only
    /// with --shared-enrolment [default: DATA_DIR/enrol.token].
    #[arg(long, value_name = "FILE")]
    pub enrol_token_file: Option<PathBuf>,

    /// Let any holder of the enrolment token join new hosts (never take over a registered
    /// one). Off by default: hosts join with one-time tokens from `tern host add NAME`.
    #[arg(long)]
    #[serde(default)]
    pub shared_enrolment: bool,

    /// A host that sent no heartbeat for this long is marked disconnected [default: 10000].
    #[arg(long, value_name = "MS")]
    pub heartbeat_timeout_ms: Option<u64>,

    /// Heartbeat period the center asks agents for at registration [default: 2000].
    #[arg(long, value_name = "MS")]
    pub heartbeat_interval_ms: Option<u64>,

    /// Period of the DRS scheduler's pass over every cluster (it also runs when a host
    /// joins) [default: 300000].
    #[arg(long, value_name = "MS")]
    pub drs_period_ms: Option<u64>,

    /// Period of the pools' division: each pool's CPU limit is divided among its running
    /// VMs by their demand, so what idle VMs leave goes to busy ones [default: 10000].
    #[arg(long, value_name = "MS")]
    pub pool_division_period_ms: Option<u64>,

    /// How often every connected host is asked which datastores it reaches (also asked
    /// before each placement and migration) [default: 10000].
    #[arg(long, value_name = "MS")]
    pub datastore_check_ms: Option<u64>,

    /// How often the center samples each host's load and each cluster's DRS imbalance for
    /// the last hour's charts (kept in memory only) [default: 10000].
    #[arg(long, value_name = "MS")]
    pub history_period_ms: Option<u64>,

    /// Serve the TCP API as plain HTTP: no TLS, no host certificates, tokens in clear. For a
    /// closed test network only; off by default.
    #[arg(long)]
    #[serde(default)]
    pub insecure_http: bool,

    /// A DNS name or IP address the center's certificate carries besides center.tern and the
    /// --listen address, for browsers and curl; repeat for several.
    #[arg(long = "tls-name", value_name = "NAME")]
    #[serde(default)]
    pub tls_names: Vec<String>,

    /// Lifetime of the certificates the center issues (its own and the hosts'); each renews
    /// after two thirds of it [default: 2592000, 30 days].
    #[arg(long, value_name = "SECONDS")]
    pub cert_lifetime_s: Option<u64>,

    /// Testing aid, never for production: every migration fails at this point and rolls back
    /// (`after-steer`: the guest paused, the destination holding all of it, the LAN steered
    /// there). Also read from TERN_INJECT_FAULT, so a lab's restarted center can get it.
    #[arg(
        long,
        value_enum,
        value_name = "POINT",
        hide = true,
        env = "TERN_INJECT_FAULT"
    )]
    #[serde(default)]
    pub inject_fault: Option<FaultPoint>,

    /// HA mode: an etcd client URL (http://IP:PORT); repeat for each member. Centers given
    /// the same etcd and prefix share the cluster's state there and elect one leader; the
    /// others serve reads and refuse changes, naming the leader. Without it the center is
    /// alone, with its state in DATA_DIR/center.db.
    #[arg(long = "etcd", value_name = "URL")]
    #[serde(default)]
    pub etcd: Vec<String>,

    /// HA mode: the key prefix of this tern cluster in etcd [default: /tern].
    #[arg(long, value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,

    /// HA mode: this center's name in the group, unique [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub ha_name: Option<String>,

    /// HA mode: the URL of this center's API that standbys and agents are told while it
    /// leads [default: https://LISTEN].
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,

    /// HA mode: the leader's lease in seconds: a leader that cannot renew it for two thirds
    /// of this stops, and another takes over after it expires [default: 15].
    #[arg(long, value_name = "SECONDS")]
    pub lease_ttl_s: Option<u64>,

    /// HA mode: the CA (PEM) that signed the etcd members' certificates, for https:// etcd
    /// URLs.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// HA mode: this center's client certificate (PEM) for etcd (with --etcd-key-file), when
    /// etcd checks its clients' certificates (--client-cert-auth).
    #[arg(long, value_name = "FILE")]
    pub etcd_cert_file: Option<PathBuf>,

    /// HA mode: the key (PEM) of --etcd-cert-file.
    #[arg(long, value_name = "FILE")]
    pub etcd_key_file: Option<PathBuf>,

    /// When a host's health signals degrade it (config file only: a `[health]` table; see
    /// tern center --help).
    #[arg(skip)]
    #[serde(default)]
    pub health: Option<HealthLimits>,
}

/// Where `--inject-fault` makes migrations fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultPoint {
    /// After the switchover and before the commit: the rollback with the LAN steered to the
    /// destination and frames waiting on its taps.
    AfterSteer,
    /// The center kills itself (SIGKILL) the moment a migration's commit is durable, before
    /// it tells either host: whoever runs next (a restarted center, or an HA group's next
    /// leader) must finish the hand-over from the record.
    CrashAfterCommit,
}

/// The center's settings, every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct CenterConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub socket: PathBuf,
    pub admin_token_file: PathBuf,
    pub enrol_token_file: PathBuf,
    /// Whether the enrolment token joins new hosts (see [`CenterArgs::shared_enrolment`]).
    pub shared_enrolment: bool,
    pub heartbeat_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub drs_period_ms: u64,
    pub pool_division_period_ms: u64,
    pub datastore_check_ms: u64,
    pub history_period_ms: u64,
    /// Whether the TCP API speaks TLS (see [`CenterArgs::insecure_http`]).
    pub tls: bool,
    pub tls_names: Vec<String>,
    pub cert_lifetime_s: u64,
    /// See [`CenterArgs::inject_fault`].
    pub inject_fault: Option<FaultPoint>,
    /// When health signals degrade a host.
    pub health_limits: HealthLimits,
    /// HA mode's settings; `None`: a single center.
    pub ha: Option<HaSettings>,
}

/// HA mode: where the shared state is and how this center takes part (see `ha`).
#[derive(Debug, Clone, PartialEq)]
pub struct HaSettings {
    /// etcd client URLs (`http://IP:PORT`).
    pub endpoints: Vec<String>,
    /// Key prefix, so several tern clusters may share one etcd.
    pub prefix: String,
    /// This center's name in the group (unique).
    pub name: String,
    /// The URL others are told to send changes to while this center leads.
    pub advertise_url: String,
    /// The leader's lease.
    pub lease_ttl: std::time::Duration,
    /// TLS to etcd: the CA of its members, and this center's certificate and key, if any.
    pub tls: Option<EtcdTls>,
}

/// Files of TLS to etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    pub client: Option<(PathBuf, PathBuf)>,
}

pub const DEFAULT_ETCD_PREFIX: &str = "/tern";

impl HaSettings {
    /// Refuses what etcd or the agents could not use: every value is typed here, before it
    /// reaches a URL, a key or a message.
    pub fn check(&self) -> anyhow::Result<()> {
        for e in &self.endpoints {
            let ok = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .is_some_and(|rest| {
                    rest.parse::<SocketAddr>().is_ok()
                        || rest.rsplit_once(':').is_some_and(|(h, p)| {
                            !h.is_empty()
                                && h.bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                                && p.parse::<u16>().is_ok()
                        })
                });
            if !ok {
                bail!("--etcd {e:?} is not an etcd client URL (http://HOST:PORT)");
            }
            if e.starts_with("https://") && self.tls.is_none() {
                bail!("--etcd {e:?} speaks TLS: give --etcd-ca-file (the CA of etcd's members)");
            }
            if e.starts_with("http://") && self.tls.is_some() {
                bail!("--etcd {e:?} is plain http, but TLS files are given: use https:// URLs");
            }
        }
        let p = &self.prefix;
        if !p.starts_with('/')
            || p.len() < 2
            || p.ends_with('/')
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b))
        {
            bail!("--etcd-prefix {p:?} must look like /tern (letters, digits, / - _ .; no trailing /)");
        }
        let n = &self.name;
        if n.is_empty()
            || n.len() > 63
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            bail!("--ha-name {n:?} must be 1-63 letters, digits, - _ .");
        }
        let u = &self.advertise_url;
        let rest = u
            .strip_prefix("https://")
            .or_else(|| u.strip_prefix("http://"));
        if rest.is_none_or(|r| r.is_empty() || r.contains(['/', ' ', '?', '#', '@'])) {
            bail!("--advertise-url {u:?} must be https://HOST:PORT");
        }
        if !(2..=600).contains(&self.lease_ttl.as_secs()) {
            bail!("lease_ttl_s must be 2 to 600 seconds (default {DEFAULT_LEASE_TTL_S})");
        }
        Ok(())
    }
}
pub const DEFAULT_LEASE_TTL_S: u64 = 15;

impl CenterConfig {
    /// Defaults for a data directory: everything lives inside it.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> CenterConfig {
        let data_dir = data_dir.into();
        CenterConfig {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], tern_api::CENTER_PORT))),
            socket: data_dir.join("center.sock"),
            admin_token_file: data_dir.join("admin.token"),
            enrol_token_file: data_dir.join("enrol.token"),
            shared_enrolment: false,
            heartbeat_timeout_ms: DEFAULT_HEARTBEAT_TIMEOUT_MS,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            drs_period_ms: DEFAULT_DRS_PERIOD_MS,
            pool_division_period_ms: DEFAULT_POOL_DIVISION_PERIOD_MS,
            datastore_check_ms: DEFAULT_DATASTORE_CHECK_MS,
            history_period_ms: DEFAULT_HISTORY_PERIOD_MS,
            tls: true,
            tls_names: Vec::new(),
            cert_lifetime_s: DEFAULT_CERT_LIFETIME_S,
            inject_fault: None,
            health_limits: DEFAULT_HEALTH_LIMITS,
            ha: None,
            data_dir,
        }
    }

    /// Merges flags over the config file (if any) over the defaults.
    pub fn from_args(args: &CenterArgs) -> anyhow::Result<CenterConfig> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => CenterArgs::default(),
        };
        let pick = |flag: &Option<PathBuf>, file: &Option<PathBuf>| flag.clone().or(file.clone());
        let data_dir =
            pick(&args.data_dir, &file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let mut cfg = CenterConfig::with_data_dir(data_dir);
        if let Some(listen) = args.listen.or(file.listen) {
            cfg.listen = listen;
        }
        if let Some(p) = pick(&args.socket, &file.socket) {
            cfg.socket = p;
        }
        if let Some(p) = pick(&args.admin_token_file, &file.admin_token_file) {
            cfg.admin_token_file = p;
        }
        if let Some(p) = pick(&args.enrol_token_file, &file.enrol_token_file) {
            cfg.enrol_token_file = p;
        }
        cfg.shared_enrolment = args.shared_enrolment || file.shared_enrolment;
        if let Some(ms) = args.heartbeat_timeout_ms.or(file.heartbeat_timeout_ms) {
            cfg.heartbeat_timeout_ms = ms;
        }
        if let Some(ms) = args.heartbeat_interval_ms.or(file.heartbeat_interval_ms) {
            cfg.heartbeat_interval_ms = ms;
        }
        if let Some(ms) = args.drs_period_ms.or(file.drs_period_ms) {
            cfg.drs_period_ms = ms;
        }
        if let Some(ms) = args
            .pool_division_period_ms
            .or(file.pool_division_period_ms)
        {
            cfg.pool_division_period_ms = ms;
        }
        if let Some(ms) = args.datastore_check_ms.or(file.datastore_check_ms) {
            cfg.datastore_check_ms = ms;
        }
        if let Some(ms) = args.history_period_ms.or(file.history_period_ms) {
            cfg.history_period_ms = ms;
        }
        cfg.tls = !(args.insecure_http || file.insecure_http);
        cfg.tls_names = if args.tls_names.is_empty() {
            file.tls_names.clone()
        } else {
            args.tls_names.clone()
        };
        if let Some(s) = args.cert_lifetime_s.or(file.cert_lifetime_s) {
            cfg.cert_lifetime_s = s;
        }
        cfg.inject_fault = args.inject_fault.or(file.inject_fault);
        if let Some(l) = file.health {
            cfg.health_limits = l;
        }
        let etcd = if args.etcd.is_empty() {
            file.etcd.clone()
        } else {
            args.etcd.clone()
        };
        if !etcd.is_empty() {
            let scheme = if cfg.tls { "https" } else { "http" };
            cfg.ha = Some(HaSettings {
                endpoints: etcd,
                prefix: args
                    .etcd_prefix
                    .clone()
                    .or(file.etcd_prefix.clone())
                    .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_string()),
                name: match args.ha_name.clone().or(file.ha_name.clone()) {
                    Some(n) => n,
                    None => nix::unistd::gethostname()
                        .context("reading the host name (give --ha-name)")?
                        .to_string_lossy()
                        .into_owned(),
                },
                advertise_url: args
                    .advertise_url
                    .clone()
                    .or(file.advertise_url.clone())
                    .unwrap_or_else(|| format!("{scheme}://{}", cfg.listen)),
                lease_ttl: std::time::Duration::from_secs(
                    args.lease_ttl_s
                        .or(file.lease_ttl_s)
                        .unwrap_or(DEFAULT_LEASE_TTL_S),
                ),
                tls: {
                    let ca = pick(&args.etcd_ca_file, &file.etcd_ca_file);
                    let cert = pick(&args.etcd_cert_file, &file.etcd_cert_file);
                    let key = pick(&args.etcd_key_file, &file.etcd_key_file);
                    match (ca, cert, key) {
                        (None, None, None) => None,
                        (Some(ca_file), None, None) => Some(EtcdTls {
                            ca_file,
                            client: None,
                        }),
                        (Some(ca_file), Some(c), Some(k)) => Some(EtcdTls {
                            ca_file,
                            client: Some((c, k)),
                        }),
                        (None, _, _) => bail!(
                            "--etcd-cert-file and --etcd-key-file need --etcd-ca-file (the CA \
                             of etcd's members)"
                        ),
                        _ => bail!("--etcd-cert-file and --etcd-key-file go together"),
                    }
                },
            });
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Refuses settings the center cannot work with.
    pub fn check(&self) -> anyhow::Result<()> {
        if !(MIN_CERT_LIFETIME_S..=MAX_CERT_LIFETIME_S).contains(&self.cert_lifetime_s) {
            bail!(
                "cert_lifetime_s {} is out of range: give {MIN_CERT_LIFETIME_S} to \
                 {MAX_CERT_LIFETIME_S} seconds (default {DEFAULT_CERT_LIFETIME_S})",
                self.cert_lifetime_s
            );
        }
        for name in &self.tls_names {
            let ip = name.parse::<std::net::IpAddr>().is_ok();
            let dns = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !ip && !dns {
                bail!("--tls-name {name:?} is neither a DNS name nor an IP address");
            }
        }
        if self.datastore_check_ms < 100 {
            bail!("datastore_check_ms must be at least 100 (default {DEFAULT_DATASTORE_CHECK_MS})");
        }
        self.health_limits.check().map_err(anyhow::Error::msg)?;
        if self.history_period_ms < 100 {
            bail!("history_period_ms must be at least 100 (default {DEFAULT_HISTORY_PERIOD_MS})");
        }
        if let Some(ha) = &self.ha {
            ha.check()?;
        }
        if self.drs_period_ms == 0 {
            bail!("drs_period_ms must be more than 0 (default {DEFAULT_DRS_PERIOD_MS})");
        }
        if self.pool_division_period_ms == 0 {
            bail!(
                "pool_division_period_ms must be more than 0 (default \
                 {DEFAULT_POOL_DIVISION_PERIOD_MS})"
            );
        }
        if self.heartbeat_interval_ms == 0 {
            bail!("heartbeat_interval_ms must be more than 0 (default {DEFAULT_HEARTBEAT_INTERVAL_MS})");
        }
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms {
            bail!(
                "heartbeat_timeout_ms ({}) must be more than heartbeat_interval_ms ({}); \
                 a few intervals is usual (default {DEFAULT_HEARTBEAT_TIMEOUT_MS})",
                self.heartbeat_timeout_ms,
                self.heartbeat_interval_ms
            );
        }
        Ok(())
    }
}

fn load_file(path: &Path) -> anyhow::Result<CenterArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| {
        format!(
            "config file {} is not valid (keys are the flag names with '_', see tern center --help)",
            path.display()
        )
    })
}

/// Reads a token file, or creates it (mode 0600) with a new random token when it is missing.
pub fn load_or_create_token(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_string();
            if token.is_empty() {
                bail!(
                    "token file {} is empty: write a token in it, or delete it and the center \
                     creates one",
                    path.display()
                );
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                create_private_dir(dir)?;
            }
            let token = new_token();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating token file {}", path.display()))?;
            writeln!(f, "{token}").with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(file = %path.display(), "created a new token");
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("reading token file {}", path.display())),
    }
}

/// Creates a directory (and parents) readable by its owner only, if it does not exist yet.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// A random 256-bit token, hex encoded.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// When a health signal degrades a host: the defaults are [`DEFAULT_HEALTH_LIMITS`]; the center's config file may
/// set any of them in a `[health]` table.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthLimits {
    pub memory_uncorrected: u64,
    pub memory_corrected: u64,
    pub machine_checks: u64,
    pub disk_errors: u64,
    pub nic_errors: u64,
    pub qemu_crashes: u64,
    /// Disconnections (heartbeats missing for the whole timeout) since the baseline.
    pub disconnections: u64,
    /// Steal above this percent, and this many points above the cluster's other hosts.
    pub steal_percent: f64,
    pub steal_margin: f64,
    /// Run queue per core above this, and this much above the cluster's other hosts.
    pub run_queue: f64,
    pub run_queue_margin: f64,
    /// How long the pressure must last.
    pub pressure_s: i64,
}

pub const DEFAULT_HEALTH_LIMITS: HealthLimits = HealthLimits {
    memory_uncorrected: 1,
    memory_corrected: 10,
    machine_checks: 1,
    disk_errors: 1,
    nic_errors: 100,
    qemu_crashes: 3,
    disconnections: 3,
    steal_percent: 25.0,
    steal_margin: 20.0,
    run_queue: 4.0,
    run_queue_margin: 2.0,
    pressure_s: 120,
};

impl Default for HealthLimits {
    fn default() -> HealthLimits {
        DEFAULT_HEALTH_LIMITS
    }
}

impl HealthLimits {
    /// Refuses limits that would degrade every host, or none.
    pub fn check(&self) -> Result<(), String> {
        let counters = [
            ("memory_uncorrected", self.memory_uncorrected),
            ("memory_corrected", self.memory_corrected),
            ("machine_checks", self.machine_checks),
            ("disk_errors", self.disk_errors),
            ("nic_errors", self.nic_errors),
            ("qemu_crashes", self.qemu_crashes),
            ("disconnections", self.disconnections),
        ];
        for (name, v) in counters {
            if v == 0 {
                return Err(format!(
                    "[health] {name} = 0 would degrade every host: give 1 or more"
                ));
            }
        }
        let shares = [
            ("steal_percent", self.steal_percent, 100.0),
            ("steal_margin", self.steal_margin, 100.0),
            ("run_queue", self.run_queue, 1000.0),
            ("run_queue_margin", self.run_queue_margin, 1000.0),
        ];
        for (name, v, max) in shares {
            if !(v.is_finite() && v > 0.0 && v <= max) {
                return Err(format!(
                    "[health] {name} = {v} is out of range: give 0 < x <= {max}"
                ));
            }
        }
        if !(10..=86_400).contains(&self.pressure_s) {
            return Err(format!(
                "[health] pressure_s = {} is out of range: give 10 to 86400 seconds",
                self.pressure_s
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_live_in_the_data_dir() {
        let cfg = CenterConfig::from_args(&CenterArgs::default()).unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(
            cfg.socket,
            PathBuf::from(DEFAULT_DATA_DIR).join("center.sock")
        );
        assert_eq!(cfg.listen, "127.0.0.1:8700".parse().unwrap());
        assert_eq!(cfg.heartbeat_timeout_ms, 10_000);
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("center.toml");
        std::fs::write(
            &file,
            "data_dir = \"/srv/c\"\nlisten = \"127.0.0.1:9000\"\nheartbeat_timeout_ms = 5000\n",
        )
        .unwrap();
        let args = CenterArgs {
            config: Some(file.clone()),
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            ..Default::default()
        };
        let cfg = CenterConfig::from_args(&args).unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/c"));
        assert_eq!(cfg.socket, PathBuf::from("/srv/c/center.sock"));
        assert_eq!(cfg.listen, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(cfg.heartbeat_timeout_ms, 5000);

        std::fs::write(&file, "listn = \"127.0.0.1:9000\"\n").unwrap();
        let err = CenterConfig::from_args(&args).unwrap_err();
        assert!(format!("{err:#}").contains("listn"), "{err:#}");
    }

    #[test]
    fn health_limits_come_from_the_file_and_absurd_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("center.toml");
        let args = CenterArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        std::fs::write(&file, "[health]\nmemory_corrected = 50\npressure_s = 300\n").unwrap();
        let cfg = CenterConfig::from_args(&args).unwrap();
        assert_eq!(cfg.health_limits.memory_corrected, 50);
        assert_eq!(cfg.health_limits.pressure_s, 300);
        // The rest keep their defaults.
        assert_eq!(
            cfg.health_limits.memory_uncorrected,
            DEFAULT_HEALTH_LIMITS.memory_uncorrected
        );
        assert_eq!(
            CenterConfig::with_data_dir("/x").health_limits,
            DEFAULT_HEALTH_LIMITS
        );
        for (bad, says) in [
            ("[health]\nmachine_checks = 0\n", "machine_checks = 0"),
            ("[health]\nsteal_percent = 150.0\n", "steal_percent"),
            ("[health]\npressure_s = 1\n", "pressure_s"),
            ("[health]\nmemory_correctd = 5\n", "memory_correctd"),
        ] {
            std::fs::write(&file, bad).unwrap();
            let err = CenterConfig::from_args(&args).unwrap_err();
            assert!(format!("{err:#}").contains(says), "{bad}: {err:#}");
        }
    }

    #[test]
    fn ha_settings_are_checked_before_they_reach_etcd() {
        let ha = |f: &dyn Fn(&mut CenterArgs)| {
            let mut a = CenterArgs {
                etcd: vec!["http://10.0.0.2:2379".into()],
                ha_name: Some("center-a".into()),
                ..Default::default()
            };
            f(&mut a);
            CenterConfig::from_args(&a)
        };
        let ok = ha(&|_| {}).unwrap().ha.expect("HA settings");
        assert_eq!(ok.prefix, DEFAULT_ETCD_PREFIX);
        assert_eq!(ok.lease_ttl.as_secs(), DEFAULT_LEASE_TTL_S);
        assert_eq!(ok.advertise_url, "https://127.0.0.1:8700");
        for (bad, says) in [
            (
                Box::new(|a: &mut CenterArgs| a.etcd = vec!["10.0.0.2:2379".into()])
                    as Box<dyn Fn(&mut CenterArgs)>,
                "not an etcd client URL",
            ),
            (
                Box::new(|a: &mut CenterArgs| a.etcd = vec!["https://10.0.0.2:2379".into()]),
                "--etcd-ca-file",
            ),
            (
                Box::new(|a: &mut CenterArgs| a.etcd_cert_file = Some("c.pem".into())),
                "--etcd-ca-file",
            ),
            (
                Box::new(|a: &mut CenterArgs| {
                    a.etcd = vec!["https://10.0.0.2:2379".into()];
                    a.etcd_ca_file = Some("ca.pem".into());
                    a.etcd_cert_file = Some("c.pem".into());
                }),
                "go together",
            ),
            (
                Box::new(|a: &mut CenterArgs| a.etcd_prefix = Some("tern/../x".into())),
                "--etcd-prefix",
            ),
            (
                Box::new(|a: &mut CenterArgs| a.ha_name = Some("a b".into())),
                "--ha-name",
            ),
            (
                Box::new(|a: &mut CenterArgs| {
                    a.advertise_url = Some("https://evil.example/x?y".into())
                }),
                "--advertise-url",
            ),
            (
                Box::new(|a: &mut CenterArgs| a.lease_ttl_s = Some(1)),
                "lease_ttl_s",
            ),
        ] {
            let err = ha(&*bad).unwrap_err();
            assert!(format!("{err:#}").contains(says), "{says}: {err:#}");
        }
    }

    #[test]
    fn timeout_must_exceed_interval() {
        let args = CenterArgs {
            heartbeat_timeout_ms: Some(1000),
            heartbeat_interval_ms: Some(2000),
            ..Default::default()
        };
        assert!(CenterConfig::from_args(&args).is_err());
    }

    #[test]
    fn tokens_are_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin.token");
        let t1 = load_or_create_token(&path).unwrap();
        assert_eq!(t1.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_token(&path).unwrap(), t1);
        std::fs::write(&path, "  \n").unwrap();
        assert!(load_or_create_token(&path).is_err());
    }
}
