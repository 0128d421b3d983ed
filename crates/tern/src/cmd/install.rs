//! `tern center init` and `tern host join`: turn an installed machine into a center or a host.
//! Each writes its daemon's config file (TOML, the daemon's own keys), makes what the daemon
//! needs (the center's data directory, tokens and CA; the host's join token, 0600), and enables
//! the systemd unit the package ships (`tern-center.service`, `tern-host.service`) when systemd
//! runs the machine. Nothing is overwritten: a config file with settings in it is refused (the
//! packages' templates, comments only, are filled in).

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::cmd::output::Format;
use crate::error::CliError;

/// `tern center init`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Then: `systemctl start tern-center` (or run `tern center --config FILE`), and on the center
`tern host add NAME` prints the join token each host's `tern host join` takes.")]
pub struct CenterInitArgs {
    /// The config file to write (refused if it has settings already).
    #[arg(long, default_value = "/etc/tern/center.toml")]
    config: PathBuf,
    /// Where the center keeps its store, tokens and CA.
    #[arg(long, default_value = tern_center::config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// The REST API's TCP address: an address of the management network, which agents and
    /// operators reach (the default, loopback, serves this machine only).
    #[arg(long, default_value = tern_center::config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The API's unix socket (the CLI on this machine uses it).
    #[arg(long, default_value = "/run/tern/center.sock")]
    socket: PathBuf,
    /// A DNS name or address the center's certificate carries besides its --listen address
    /// (repeatable).
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_names: Vec<String>,
    /// The system user the service runs as: the data directory is given to it [default:
    /// `tern` when that user exists, else the current user].
    #[arg(long)]
    user: Option<String>,
    /// Do not enable tern-center.service.
    #[arg(long)]
    no_enable: bool,
}

/// `tern host join`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
On the center, `tern host add NAME` prints the token. Then `systemctl start tern-host` (or run
`tern host agent --config FILE`): the agent checks the center against the CA fingerprint the
token ends in, registers once with the token, and keeps the certificate the center signs.")]
pub struct HostJoinArgs {
    /// The center's API: https://IP:PORT (as its --listen); for an HA group, every center's,
    /// comma-separated.
    center: String,
    /// The join token `tern host add NAME` printed on the center.
    #[arg(long, env = "TERN_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// This host's name, as `tern host add` was given it [default: the hostname].
    #[arg(long)]
    name: Option<String>,
    /// The cluster the host joins (it must exist: `tern cluster create NAME`).
    #[arg(long)]
    cluster: String,
    /// The agent's API address, which the center and other hosts reach.
    #[arg(long, default_value = tern_host::config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The agent's URL as the center should call it [default: from --listen].
    #[arg(long)]
    advertise_url: Option<String>,
    /// The address other hosts send migrations to [default: --listen's].
    #[arg(long)]
    migration_address: Option<IpAddr>,
    /// The bridge VMs' NICs join.
    #[arg(long)]
    bridge: Option<String>,
    /// The shared storage every host mounts at the same path.
    #[arg(long)]
    shared_storage: Option<PathBuf>,
    /// Where the agent keeps its state (VM records, certificate).
    #[arg(long, default_value = tern_host::config::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The config file to write (refused if it has settings already); the token goes beside
    /// it in join.token (0600).
    #[arg(long, default_value = "/etc/tern/host.toml")]
    config: PathBuf,
    /// Do not enable tern-host.service.
    #[arg(long)]
    no_enable: bool,
    /// Write the config without first checking that the center answers with the CA the token
    /// names (a machine prepared before its center is up).
    #[arg(long)]
    offline: bool,
}

/// Asks the center for its API document (no token needed) over TLS that trusts only the CA
/// the join token names: a wrong address, a wrong port or the token of another center is said
/// now, not in the agent's log later.
async fn check_center(center: &str, token: &str) -> Result<(), CliError> {
    let timeout = std::time::Duration::from_secs(5);
    let endpoint = tern_api::Endpoint::Tcp(center.to_string());
    let client = match tern_api::center::join_token_ca(token) {
        Some(fp) => {
            let ca: tern_pki::Fingerprint = fp
                .parse()
                .map_err(|e| CliError::usage(format!("the token's CA fingerprint: {e}")))?;
            let tls = tern_pki::tls::client_config(
                &tern_pki::tls::ServerTrust::Pinned {
                    ca,
                    name: tern_pki::CENTER_NAME.into(),
                },
                None,
            )
            .map_err(|e| CliError::failed(format!("TLS settings: {e}")))?;
            tern_api::ApiClient::with_tls(endpoint, "", timeout, tls)
        }
        None => tern_api::ApiClient::with_timeout(endpoint, "", timeout),
    }
    .map_err(|e| CliError::failed(format!("a client for {center}: {e}")))?;
    match client.get::<serde_json::Value>("/openapi.json").await {
        Ok(_) => Ok(()),
        Err(tern_api::ApiError::Transport { .. }) if token_has_ca(token) => {
            Err(CliError::failed(format!(
                "the center at {center} did not answer over TLS with the cluster CA this token \
                 names (sha256 {}): check the address and port, and that the token comes from \
                 that center's `tern host add` (or give --offline to write the config anyway)",
                tern_api::center::join_token_ca(token).unwrap_or_default()
            )))
        }
        Err(e) => Err(CliError::failed(format!(
            "cannot check the center at {center}: {e} (give --offline to write the config \
             anyway)"
        ))),
    }
}

fn token_has_ca(token: &str) -> bool {
    tern_api::center::join_token_ca(token).is_some()
}

fn path_text(p: &Path) -> Result<String, CliError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| CliError::usage(format!("{} is not UTF-8", p.display())))
}

/// Whether `path` exists with a setting in it (the packages ship config files of comments
/// only, as conffiles: those are filled in, not refused).
fn configured(path: &Path) -> bool {
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().any(|l| {
            let l = l.trim();
            !l.is_empty() && !l.starts_with('#')
        }),
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

fn refuse_configured(path: &Path) -> Result<(), CliError> {
    if configured(path) {
        return Err(CliError::failed(format!(
            "{} is set up already (it has settings): edit it, or empty it to start over",
            path.display()
        )));
    }
    Ok(())
}

/// Writes `text` to `path` with `mode`, its directory made: a new file, or one of comments
/// only (a package's template); a file with settings is refused.
fn write_config(path: &Path, text: &str, mode: u32) -> Result<(), CliError> {
    refuse_configured(path)?;
    if path.exists() {
        std::fs::write(path, text)
            .map_err(|e| CliError::failed(format!("writing {}: {e}", path.display())))?;
        return Ok(());
    }
    write_new(path, text, mode)
}

/// Writes `text` to a new file (refusing one that exists) with `mode`, its directory made.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CliError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| CliError::failed(format!("creating {}: {e}", dir.display())))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CliError::failed(format!(
                    "{} exists: this machine is set up already (edit that file, or remove it \
                     to start over)",
                    path.display()
                ))
            } else {
                CliError::failed(format!("creating {}: {e}", path.display()))
            }
        })?;
    f.write_all(text.as_bytes())
        .map_err(|e| CliError::failed(format!("writing {}: {e}", path.display())))
}

/// A TOML file of `keys`, headed by a comment.
fn toml_file(header: &str, keys: toml::Table) -> Result<String, CliError> {
    let body =
        toml::to_string(&keys).map_err(|e| CliError::failed(format!("writing the config: {e}")))?;
    Ok(format!("{header}\n{body}"))
}

/// Enables `unit` when systemd runs this machine; says what to do otherwise.
fn enable(unit: &str, no_enable: bool, by_hand: &str) -> String {
    if no_enable {
        return format!("not enabled (--no-enable): start it with `systemctl enable --now {unit}` or `{by_hand}`");
    }
    if !Path::new("/run/systemd/system").is_dir() {
        return format!("systemd does not run this machine: start `{by_hand}` yourself");
    }
    match std::process::Command::new("systemctl")
        .args(["enable", unit])
        .output()
    {
        Ok(o) if o.status.success() => {
            format!("{unit} enabled: start it now with `systemctl start {unit}`")
        }
        Ok(o) => format!(
            "could not enable {unit} ({}): is the package installed? Or start `{by_hand}`",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("could not run systemctl ({e}): start `{by_hand}` yourself"),
    }
}

pub fn center_init(a: CenterInitArgs, fmt: Format) -> Result<(), CliError> {
    let mut cfg = tern_center::CenterConfig::with_data_dir(&a.data_dir);
    cfg.listen = a.listen;
    cfg.socket = a.socket.clone();
    cfg.tls_names = a.tls_names.clone();
    cfg.check().map_err(|e| CliError::usage(format!("{e:#}")))?;
    refuse_configured(&a.config)?;
    let user = match &a.user {
        Some(name) => Some(
            nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| CliError::usage(format!("no user named {name:?} here")))?,
        ),
        None => nix::unistd::User::from_name("tern").ok().flatten(),
    };
    let done = tern_center::init::init(&cfg).map_err(|e| CliError::failed(format!("{e:#}")))?;
    if let Some(u) = &user {
        chown_tree(&done.data_dir, u)?;
    }
    let mut keys = toml::Table::new();
    keys.insert("data_dir".into(), path_text(&cfg.data_dir)?.into());
    keys.insert("listen".into(), cfg.listen.to_string().into());
    keys.insert("socket".into(), path_text(&cfg.socket)?.into());
    if !cfg.tls_names.is_empty() {
        keys.insert(
            "tls_names".into(),
            toml::Value::Array(cfg.tls_names.iter().cloned().map(Into::into).collect()),
        );
    }
    let text = toml_file(
        "# tern center's settings, written by `tern center init`. Every flag of `tern center`\n\
         # (see `tern center --help`) may be set here under its name with '_' for '-'.",
        keys,
    )?;
    write_config(&a.config, &text, 0o644)?;
    let by_hand = format!("tern center --config {}", a.config.display());
    let service = enable("tern-center.service", a.no_enable, &by_hand);
    if fmt == Format::Json {
        let v = serde_json::json!({
            "config": a.config,
            "data_dir": done.data_dir,
            "admin_token_file": done.admin_token_file,
            "ca_fingerprint": done.ca_fingerprint,
            "user": user.as_ref().map(|u| u.name.clone()),
            "service": service,
        });
        println!("{v:#}");
        return Ok(());
    }
    println!("config        {}", a.config.display());
    println!("data dir      {}", done.data_dir.display());
    println!(
        "admin token   {} (keep it secret: it may do anything)",
        done.admin_token_file.display()
    );
    if let Some(fp) = &done.ca_fingerprint {
        println!("cluster CA    sha256 {fp} (every join token ends in it)");
    }
    if let Some(u) = &user {
        println!("runs as       {}", u.name);
    }
    println!("service       {service}");
    Ok(())
}

/// Gives `dir` and everything in it to `user`.
fn chown_tree(dir: &Path, user: &nix::unistd::User) -> Result<(), CliError> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        nix::unistd::chown(&p, Some(user.uid), Some(user.gid)).map_err(|e| {
            CliError::failed(format!("giving {} to {}: {e}", p.display(), user.name))
        })?;
        if p.is_dir() && !p.is_symlink() {
            let entries = std::fs::read_dir(&p)
                .map_err(|e| CliError::failed(format!("reading {}: {e}", p.display())))?;
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    Ok(())
}

pub async fn host_join(a: HostJoinArgs, fmt: Format) -> Result<(), CliError> {
    // One center, or every center of an HA group, comma-separated.
    let centers: Vec<String> = a
        .center
        .split(',')
        .map(|c| c.trim().trim_end_matches('/').to_string())
        .collect();
    for c in &centers {
        let authority = c
            .strip_prefix("https://")
            .or_else(|| c.strip_prefix("http://"))
            .ok_or_else(|| {
                CliError::usage(format!("the center must be https://IP:PORT, not {c:?}"))
            })?;
        if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
            return Err(CliError::usage(format!(
                "the center must be https://IP:PORT (its --listen), not {c:?}"
            )));
        }
    }
    let https = centers.iter().all(|c| c.starts_with("https://"));
    if !https && centers.iter().any(|c| c.starts_with("https://")) {
        return Err(CliError::usage(
            "the centers of one group all speak https, or (--insecure-http) all http",
        ));
    }
    let center = centers.join(",");
    let token = a.token.trim().to_string();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CliError::usage(
            "the join token is empty or has spaces: paste the one `tern host add NAME` printed",
        ));
    }
    if https && tern_api::center::join_token_ca(&token).is_none() {
        return Err(CliError::usage(format!(
            "this token carries no CA fingerprint (it should end in {}<64 hex digits>): an \
             https center's `tern host add NAME` prints one that does",
            tern_api::center::JOIN_TOKEN_CA_MARK
        )));
    }
    let name = match a.name {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .map_err(|e| CliError::failed(format!("reading the hostname: {e}")))?
            .to_string_lossy()
            .into_owned(),
    };
    for (what, v) in [("host name", &name), ("cluster name", &a.cluster)] {
        if !tern_api::valid_name(v) {
            return Err(CliError::usage(format!(
                "{what} {v:?} is not valid: use [a-z0-9][a-z0-9-]{{0,31}} (give --name)"
            )));
        }
    }
    refuse_configured(&a.config)?;
    if !a.offline {
        // Any center of the group answering with the token's CA will do (one may be down).
        let mut failed = None;
        for c in &centers {
            match check_center(c, &token).await {
                Ok(()) => {
                    failed = None;
                    break;
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
    }
    let token_file = a
        .config
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("join.token");
    let mut keys = toml::Table::new();
    keys.insert("name".into(), name.clone().into());
    keys.insert("cluster".into(), a.cluster.clone().into());
    keys.insert("center".into(), center.clone().into());
    keys.insert("enrol_token_file".into(), path_text(&token_file)?.into());
    keys.insert("listen".into(), a.listen.to_string().into());
    keys.insert("state_dir".into(), path_text(&a.state_dir)?.into());
    if let Some(u) = &a.advertise_url {
        keys.insert("advertise_url".into(), u.clone().into());
    }
    if let Some(m) = a.migration_address {
        keys.insert("migration_address".into(), m.to_string().into());
    }
    if let Some(b) = &a.bridge {
        keys.insert("bridge".into(), b.clone().into());
    }
    if let Some(s) = &a.shared_storage {
        keys.insert("shared_storage".into(), path_text(s)?.into());
    }
    let text = toml_file(
        "# tern host agent's settings, written by `tern host join`. Every flag of `tern host\n\
         # agent` (see `tern host agent --help`) may be set here under its name with '_' for '-'.",
        keys,
    )?;
    // A join.token left by an earlier attempt (its config never written) is stale.
    let _ = std::fs::remove_file(&token_file);
    write_new(&token_file, &format!("{token}\n"), 0o600)?;
    if let Err(e) = write_config(&a.config, &text, 0o644) {
        // Nothing half-made: the token goes with the config it belongs to.
        let _ = std::fs::remove_file(&token_file);
        return Err(e);
    }
    let by_hand = format!("tern host agent --config {}", a.config.display());
    let service = enable("tern-host.service", a.no_enable, &by_hand);
    if fmt == Format::Json {
        let v = serde_json::json!({
            "config": a.config,
            "token_file": token_file,
            "name": name,
            "cluster": a.cluster,
            "center": center,
            "service": service,
        });
        println!("{v:#}");
        return Ok(());
    }
    println!("config        {}", a.config.display());
    println!(
        "join token    {} (used once; the agent keeps its own secret after)",
        token_file.display()
    );
    println!(
        "joins         {} as host {name} of cluster {}",
        center, a.cluster
    );
    println!("service       {service}");
    Ok(())
}
