//! `tern host agent`: the per-host agent that runs QEMU processes for the center.
//!
//! The agent owns this host's QEMU processes (started daemonized, so they outlive it), their
//! taps on the VM bridge, the host's facts and load figures, and its registration with the
//! center. Its API (`/v1`, see `tern_api::agent`) is called by the center only, with the
//! token the agent keeps in `STATE_DIR/agent.token`.
//!
//! Modules: [`config`] (flags and TOML), [`facts`] and [`load`] (/proc figures), [`tap`]
//! (tap devices), [`store`] (state dir layout), [`vms`] (VM lifecycle and supervision),
//! [`migrations`] (this host's end of live migrations, bandwidth probe), [`api`] (HTTP),
//! [`enrol`] (registration and heartbeats), [`paths`] (file checks).

pub mod api;
pub mod cgroups;
pub mod commit_watch;
pub mod config;
pub mod datastores;
pub mod enrol;
pub mod error;
pub mod facts;
pub mod fence;
pub mod firmware;
pub mod frames;
pub mod health;
pub mod identity;
pub mod images;
pub mod load;
pub mod metrics;
pub mod migrations;
pub mod paths;
pub mod qcow2;
pub mod qemu_user;
pub mod relay;
pub mod seed;
pub mod steer;
pub mod store;
pub mod tap;
pub mod vms;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tern_api::{HostFacts, HostLoad, VmLoad};
use tokio_util::sync::CancellationToken;

pub use config::{AgentArgs, AgentConfig};
pub use relay::RelayArgs;

use load::{HostFigures, LoadSampler, ProcLoad};
use vms::{VmHostConfig, VmManager};

/// Figures younger than this are served again rather than sampled over a tiny interval.
const LOAD_MIN_PERIOD: Duration = Duration::from_millis(500);

/// The last load sample.
#[derive(Default)]
struct LoadCache {
    sampler: LoadSampler,
    last: Option<(
        Instant,
        HostFigures,
        std::collections::HashMap<u32, ProcLoad>,
    )>,
}

/// The running agent's shared state.
pub struct Agent {
    pub cfg: AgentConfig,
    /// What the agent reports of its host; the CPU capability fills in later when its first
    /// probe failed.
    facts: std::sync::RwLock<HostFacts>,
    /// Bearer token the center presents on every agent API call.
    pub token: String,
    /// The state dir (the host's secret from the center lives there).
    pub state: store::StateDir,
    /// The host's certificate and TLS settings, when its center speaks TLS.
    pub tls: Option<Arc<identity::HostTls>>,
    pub vms: Arc<VmManager>,
    /// This host's side of live migrations.
    pub migrations: Arc<migrations::Migrations>,
    load: tokio::sync::Mutex<LoadCache>,
    /// Hardware and pressure counters, sent with every heartbeat.
    health: std::sync::Mutex<health::HealthProbe>,
    /// Refuses calls from a deposed HA leader.
    pub fence: fence::Fence,
    /// The id the center gave this host at registration.
    center_host_id: std::sync::Mutex<Option<uuid::Uuid>>,
}

impl Agent {
    /// The host's facts as known now.
    pub fn facts(&self) -> HostFacts {
        self.facts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The id the center registered this host under, once registered.
    pub fn center_host_id(&self) -> Option<uuid::Uuid> {
        *self
            .center_host_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn set_center_host_id(&self, id: uuid::Uuid) {
        *self
            .center_host_id
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(id);
    }

    /// The health counters now.
    pub fn health(&self) -> tern_api::health::HealthReport {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sample()
    }

    /// Host and per-VM load: CPU over the time since the previous sample, memory now.
    pub async fn load(&self) -> HostLoad {
        let procs = self.vms.procs();
        let pids: Vec<u32> = procs.iter().filter_map(|p| p.pid).collect();
        let mut cache = self.load.lock().await;
        let fresh = cache.last.as_ref().is_some_and(|(at, _, per_pid)| {
            at.elapsed() < LOAD_MIN_PERIOD && pids.iter().all(|p| per_pid.contains_key(p))
        });
        if !fresh {
            let host = cache.sampler.sample_host();
            let per_pid = cache.sampler.sample_procs(&pids);
            cache.last = Some((Instant::now(), host, per_pid));
        }
        let Some((_, host, per_pid)) = cache.last.as_ref() else {
            return HostLoad {
                cpu_percent: 0.0,
                memory_used_mib: 0,
                memory_total_mib: 0,
                vms: Vec::new(),
            };
        };
        let mut vms: Vec<VmLoad> = procs
            .iter()
            .map(|p| {
                let l = p
                    .pid
                    .and_then(|pid| per_pid.get(&pid).copied())
                    .unwrap_or_default();
                VmLoad {
                    vm_id: p.id,
                    name: p.name.clone(),
                    state: p.state,
                    cpu_percent: l.cpu_percent,
                    rss_mib: l.rss_mib,
                }
            })
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        HostLoad {
            cpu_percent: host.cpu_percent,
            memory_used_mib: host.memory_used_mib,
            memory_total_mib: host.memory_total_mib,
            vms,
        }
    }
}

/// Runs the agent until SIGINT/SIGTERM. VMs keep running after it stops.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    serve(cfg, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping the agent (VMs keep running)"),
                _ = int.recv() => tracing::info!("SIGINT: stopping the agent (VMs keep running)"),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers; stop the agent with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}

/// Starts the agent with a resolved config and serves until `shutdown` resolves: loads and
/// re-adopts the VMs of the state dir, serves the API, registers with the center and
/// heartbeats. QEMU processes are left running when it returns.
pub async fn serve(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = store::StateDir::open(&cfg.state_dir)?;
    let _lock = store.lock()?;
    let open_files = tern_serve::raise_open_files_limit().unwrap_or_else(|e| {
        tracing::warn!("cannot raise the open files limit: {e}");
        1024
    });
    let token = store.agent_token()?;
    let (accelerator, warning) = tern_qemu::detect_accelerator(cfg.accel)
        .context("choosing the accelerator (see --accel)")?;
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    let mut facts = facts::gather(&cfg, accelerator).await?;
    facts.uefi = cfg.uefi.available();
    if !facts.uefi {
        tracing::info!(
            code = %cfg.uefi.code.display(),
            "no UEFI firmware here: VMs with firmware uefi will not start on this host"
        );
    }
    let resource_control =
        match cgroups::ResourceControl::detect(&cfg.cgroup_parent, facts.cores, facts.cpu_mhz) {
            Ok(Some(rc)) => {
                tracing::info!(cgroups = %rc.describe(), "VM resource policies are enforced");
                facts.resource_control = Some(rc.describe().to_string());
                Some(Arc::new(rc))
            }
            Ok(None) => {
                tracing::warn!(
                    "no cgroup CPU controller is mounted: VMs with shares, reservations or \
                     limits cannot start here"
                );
                None
            }
            Err(e) => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "cannot prepare the VMs' cgroups (see --cgroup-parent): VMs with shares, \
                     reservations or limits cannot start here"
                );
                None
            }
        };
    tracing::info!(
        name = %cfg.name,
        %accelerator,
        qemu = %facts.qemu_version,
        cores = facts.cores,
        memory_mib = facts.memory_mib,
        state_dir = %store.root.display(),
        "tern host agent starting"
    );
    if let Some(b) = &cfg.bridge {
        if !tap::exists(b) {
            tracing::warn!(bridge = %b, "the VM bridge does not exist (yet): VMs with NICs will fail to start");
        }
    }
    let qemu_users = match cfg.qemu_uid_base {
        Some(base) => {
            let users = qemu_user::QemuUsers::new(base, accelerator)
                .context("preparing the QEMU users (see --qemu-uid-base, --qemu-as-root)")?;
            tracing::info!(base, "each VM's QEMU runs as a uid of its own");
            Some(Arc::new(users))
        }
        None => {
            tracing::warn!("--qemu-as-root: QEMU runs as root (under its seccomp filter)");
            None
        }
    };
    let vms = VmManager::new(VmHostConfig {
        store: store.clone(),
        accelerator,
        bridge: cfg.bridge.clone(),
        qemu: cfg.qemu.clone(),
        default_cpu_model: cfg.default_cpu_model.clone(),
        shared_storage: cfg.shared_storage.clone(),
        qemu_users,
        resource_control,
        uefi: cfg.uefi.clone(),
    });
    vms.recover()
        .await
        .context("loading the VMs of the state dir")?;

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {} (see --listen)", cfg.listen))?;
    let bound: SocketAddr = listener.local_addr().context("reading the bound address")?;
    let agent_url = cfg.agent_url(bound);
    tracing::info!(listen = %bound, %agent_url, "agent API listening");

    // Relayed streams go through `tern host relay`, this very program (whether the center
    // asks for relays follows the facts: `--qemu-migration-tls` says this host has none).
    let relay_program =
        std::env::current_exe().context("finding the agent's own program for its relays")?;
    let migrations = migrations::Migrations::new(vms.clone(), cfg.migration_address, relay_program);
    migrations.recover().await;
    let probe_again = facts.cpu_capability.is_empty();
    let tls = if cfg.tls() {
        Some(Arc::new(identity::HostTls::open(&store.root, &cfg.name)?))
    } else {
        if cfg.center.is_some() {
            tracing::warn!(
                "the center is plain http://: this agent's API is plain HTTP too (tokens and \
                 commands cross the network in clear)"
            );
        }
        None
    };
    let tls_source = tls.as_ref().map(|t| t.server.subscribe());
    let health_probe = health::HealthProbe::new(
        cfg.health_sysfs.clone(),
        cfg.shared_storage.clone(),
        cfg.migration_address,
        facts.cores,
    );
    let agent = Arc::new(Agent {
        cfg,
        tls,
        facts: std::sync::RwLock::new(facts),
        token,
        state: store.clone(),
        vms: vms.clone(),
        migrations,
        load: tokio::sync::Mutex::new(LoadCache::default()),
        health: std::sync::Mutex::new(health_probe),
        fence: fence::Fence::open(&store.root)?,
        center_host_id: std::sync::Mutex::new(None),
    });
    let stop = CancellationToken::new();
    if probe_again {
        let (agent, stop) = (agent.clone(), stop.clone());
        tokio::spawn(async move {
            facts::reprobe_until_known(&agent.cfg, accelerator, &agent.facts, &stop).await;
        });
    }
    let link = match agent.cfg.center.clone() {
        Some(link) => Some(tokio::spawn(enrol::run(
            agent.clone(),
            link,
            agent_url,
            stop.clone(),
        ))),
        None => {
            tracing::info!("no --center: running alone (API only, no registration)");
            None
        }
    };
    let stop2 = stop.clone();
    tern_serve::serve(
        listener,
        api::router(agent.clone()),
        &tern_serve::Limits::within_open_files(open_files, 1),
        tls_source,
        async move {
            tokio::select! {
                () = shutdown => {}
                () = stop2.cancelled() => {}
            }
        },
    )
    .await;
    stop.cancel();
    if let Some(task) = link {
        let _ = task.await;
    }
    agent.migrations.release().await;
    vms.release();
    tracing::info!("agent stopped; VMs left running");
    Ok(())
}
