//! Starting and stopping a center: data directory lock, store, tokens, recovery, the TCP and
//! unix-socket listeners, the host monitor, graceful shutdown.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{umask, Mode};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::App;
use crate::config::{create_private_dir, load_or_create_token, CenterConfig};
use crate::leadership::Leadership;
use crate::store::{Db, Store};
use crate::{api, ha, inventory, tasks};

/// How long shutdown waits for open connections and for task drivers.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A center serving in the background of this process.
pub struct RunningCenter {
    /// Bound TCP address (the real port when the config asked for port 0).
    pub tcp_addr: SocketAddr,
    pub socket_path: PathBuf,
    pub admin_token: String,
    pub enrol_token: String,
    pub config: CenterConfig,
    /// The cluster CA's certificate (PEM) when the TCP API speaks TLS.
    pub ca_pem: Option<String>,
    shutdown: watch::Sender<bool>,
    done: Option<JoinHandle<anyhow::Result<()>>>,
}

impl RunningCenter {
    /// `https://IP:PORT` (`http://` with `--insecure-http`) of the TCP listener (0.0.0.0 is
    /// given as 127.0.0.1).
    pub fn url(&self) -> String {
        let mut addr = self.tcp_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{addr}")
    }

    /// A client of the TCP API presenting `token`, trusting the cluster CA.
    pub fn client(&self, token: &str) -> anyhow::Result<tern_api::ApiClient> {
        let endpoint = tern_api::Endpoint::Tcp(self.url());
        let timeout = Duration::from_secs(60);
        Ok(match &self.ca_pem {
            Some(ca) => {
                let trust = tern_pki::tls::ServerTrust::Ca {
                    ca_pem: ca.clone(),
                    name: tern_pki::CENTER_NAME.into(),
                };
                let tls = tern_pki::tls::client_config(&trust, None)?;
                tern_api::ApiClient::with_tls(endpoint, token, timeout, tls)?
            }
            None => tern_api::ApiClient::with_timeout(endpoint, token, timeout)?,
        })
    }

    /// Waits until the center stops on its own (an error), or forever.
    pub async fn stopped(&mut self) -> anyhow::Result<()> {
        match self.done.as_mut() {
            Some(h) => {
                let r = h.await.context("center task panicked")?;
                self.done = None;
                r
            }
            None => std::future::pending().await,
        }
    }

    /// Stops serving, waits (briefly) for running work, closes the store, removes the socket.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        match self.done.take() {
            Some(h) => h.await.context("center task panicked")?,
            None => Ok(()),
        }
    }
}

/// Starts a center: returns once it listens on both the TCP address and the unix socket.
pub async fn serve(config: CenterConfig) -> anyhow::Result<RunningCenter> {
    config.check()?;
    if let Some(f) = config.inject_fault {
        tracing::warn!(
            fault = ?f,
            "FAULT INJECTION ON: every migration fails there (a testing aid; unset \
             --inject-fault / TERN_INJECT_FAULT)"
        );
    }
    let open_files = tern_serve::raise_open_files_limit().unwrap_or_else(|e| {
        tracing::warn!("cannot raise the open files limit: {e}");
        1024
    });
    create_private_dir(&config.data_dir)?;
    let lock = lock_data_dir(&config.data_dir)?;
    let admin_token = load_or_create_token(&config.admin_token_file)?;
    let enrol_token = load_or_create_token(&config.enrol_token_file)?;

    let db_path = store_file(&config.data_dir)?;
    let mut store = tokio::task::spawn_blocking({
        let p = db_path.clone();
        move || Store::open(&p)
    })
    .await
    .context("store worker")?
    .with_context(|| format!("opening the store {}", db_path.display()))?;
    let leadership = Arc::new(match &config.ha {
        Some(ha) => Leadership::standby(&ha.name),
        None => Leadership::single(),
    });
    // HA mode: this store becomes a copy of the shared one, and writes go through etcd.
    let etcd = match &config.ha {
        Some(settings) => {
            let etcd = ha::Etcd::connect(settings)
                .await
                .with_context(|| format!("connecting to etcd at {:?}", settings.endpoints))?;
            let schema = store.replica_schema()?;
            let layout = store.schema_version()?;
            store.replicate_to(Box::new(ha::EtcdSink::new(
                etcd.clone(),
                leadership.clone(),
            )))?;
            Some((etcd, schema, layout))
        }
        None => None,
    };

    let pki = if config.tls {
        Some(Arc::new(crate::pki::CenterPki::open(&config)?))
    } else {
        tracing::warn!(
            "--insecure-http: the TCP API is plain HTTP; tokens cross the network in clear and \
             hosts get no certificates"
        );
        None
    };
    let http = match &pki {
        Some(p) => tern_api::HttpPool::with_tls(p.ca.cert_pem(), p.identity.clone()),
        None => tern_api::HttpPool::new(),
    }
    .context("HTTP client for the agents")?
    .with_leader_term(leadership.term_cell());
    let ca_pem = pki.as_ref().map(|p| p.ca.cert_pem().to_string());
    let app = Arc::new(
        App::new(
            Db::new(store),
            config.clone(),
            admin_token.clone(),
            enrol_token.clone(),
            http,
            pki,
        )
        .with_leadership(leadership.clone()),
    );
    let (tx, rx) = watch::channel(false);
    let role = match etcd {
        None => {
            recover(&app).await?;
            Role::Single
        }
        Some((etcd, schema, layout)) => {
            let applied = first_load(&etcd, &app, &schema, layout).await?;
            let applied_rx = applied.subscribe();
            tokio::spawn(ha::follow(
                etcd.clone(),
                app.db.clone(),
                schema,
                leadership.clone(),
                applied,
                rx.clone(),
            ));
            Role::Ha {
                etcd: Box::new(etcd),
                applied_rx,
            }
        }
    };

    let tcp = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", config.listen))?;
    let tcp_addr = tcp.local_addr()?;
    let unix = bind_unix(&config.socket)?;
    tracing::info!(
        tcp = %tcp_addr,
        socket = %config.socket.display(),
        data_dir = %config.data_dir.display(),
        ha = config.ha.as_ref().map(|h| h.name.as_str()),
        "tern center serving"
    );

    let listeners = Listeners {
        tcp,
        unix,
        open_files,
    };
    let leadership = app.leadership.clone();
    let done = tokio::spawn(supervise(
        app,
        listeners,
        role,
        config.socket.clone(),
        lock,
        rx,
    ));
    if let Some(ha) = &config.ha {
        settle_role(&leadership, ha).await;
    }
    Ok(RunningCenter {
        tcp_addr,
        socket_path: config.socket.clone(),
        admin_token,
        enrol_token,
        config,
        ca_pem,
        shutdown: tx,
        done: Some(done),
    })
}

/// How this center takes part: alone, or in an HA group.
enum Role {
    Single,
    Ha {
        etcd: Box<ha::Etcd>,
        applied_rx: watch::Receiver<i64>,
    },
}

/// HA mode: waits (at most a lease and a few seconds) until this center leads and takes
/// changes, or knows another leader, so that a caller of [`serve`] meets a settled center.
async fn settle_role(leadership: &Leadership, ha: &crate::config::HaSettings) {
    let deadline = std::time::Instant::now() + ha.lease_ttl + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let other = leadership.leader().is_some_and(|l| l.name != ha.name);
        if leadership.writable() || other {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!("no center leads yet; serving as a standby meanwhile");
}

/// How long a starting HA center keeps trying to read the shared state.
const FIRST_LOAD_PATIENCE: Duration = Duration::from_secs(30);

/// HA mode: loads the shared state into this center's copy before it serves anything.
async fn first_load(
    etcd: &ha::Etcd,
    app: &App,
    schema: &crate::store::replica::Schema,
    layout: u32,
) -> anyhow::Result<watch::Sender<i64>> {
    let started = std::time::Instant::now();
    loop {
        match etcd.check_layout(layout).await {
            Ok(Ok(())) => break,
            Ok(Err(refused)) => bail!("{refused}"),
            Err(e) if started.elapsed() < FIRST_LOAD_PATIENCE => {
                tracing::warn!("{e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => bail!("{e}"),
        }
    }
    let (rows, revision) = loop {
        match etcd.load(schema).await {
            Ok(r) => break r,
            Err(e) if started.elapsed() < FIRST_LOAD_PATIENCE => {
                tracing::warn!("reading the shared state from etcd: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => bail!("reading the shared state from etcd: {e}"),
        }
    };
    let n = rows.len();
    app.db
        .run(move |s| s.apply_replicated(&rows, true))
        .await
        .context("loading the shared state into this center's store")?;
    tracing::info!(rows = n, revision, "loaded the cluster's state from etcd");
    Ok(watch::channel(revision).0)
}

/// Settles what the previous center (or leader) left going: migrations first, as their
/// ownership records decide which way each one ends, then tasks.
async fn recover(app: &Arc<App>) -> anyhow::Result<()> {
    let migrations = crate::migrate::recover(app)
        .await
        .map_err(|e| anyhow::anyhow!("recovering migrations: {}", e))?;
    if migrations.settled > 0 {
        tracing::warn!(
            migrations = migrations.settled,
            "migrations left going by the previous center are being settled"
        );
    }
    if !migrations.resumed.is_empty() {
        tracing::warn!(
            migrations = migrations.resumed.len(),
            "migrations left in pre-copy by the previous center are driven on"
        );
    }
    let recovered = tasks::recover(app, &migrations.resumed)
        .await
        .map_err(|e| anyhow::anyhow!("recovering tasks: {}", e))?;
    if recovered > 0 {
        tracing::warn!(
            tasks = recovered,
            "tasks left going by the previous center were marked failed"
        );
    }
    Ok(())
}

/// The leader's own work: the host monitor, the DRS scheduler, the pools' division, the
/// datastore checks and the history sampler. Dropping the set stops them.
fn duties(app: &Arc<App>, rx: &watch::Receiver<bool>) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    set.spawn(inventory::monitor(app.clone(), rx.clone()));
    set.spawn(crate::drs::scheduler(app.clone(), rx.clone()));
    set.spawn(crate::pools::divider(app.clone(), rx.clone()));
    set.spawn(crate::datastores::monitor(app.clone(), rx.clone()));
    set.spawn(crate::history_sampler::sampler(app.clone(), rx.clone()));
    set
}

/// HA mode: stands for election; once elected, recovers, starts the leader's work, and
/// tells every host the new term. Runs until shutdown (the duties stop with it).
async fn lead(
    app: Arc<App>,
    etcd: ha::Etcd,
    applied_rx: watch::Receiver<i64>,
    rx: watch::Receiver<bool>,
) {
    let leadership = app.leadership.clone();
    let Some(term) = ha::campaign(etcd.clone(), leadership.clone(), applied_rx, rx.clone()).await
    else {
        return;
    };
    if let Err(e) = recover(&app).await {
        leadership.lose(&format!("taking over failed: {e:#}"));
        return;
    }
    let mut work = duties(&app, &rx);
    work.spawn(ha::compactor(etcd, rx.clone()));
    leadership.ready();
    tracing::info!(term, "leading: taking changes");
    crate::inventory::announce_term(&app).await;
    let mut rx = rx;
    let _ = rx.wait_for(|v| *v).await;
    drop(work);
}

async fn until_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

struct Listeners {
    tcp: tokio::net::TcpListener,
    unix: tokio::net::UnixListener,
    /// The process's open files limit, which sizes the connection caps.
    open_files: u64,
}

async fn supervise(
    app: Arc<App>,
    Listeners {
        tcp,
        unix,
        open_files,
    }: Listeners,
    role: Role,
    socket: PathBuf,
    lock: Flock<File>,
    rx: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let router = api::router(app.clone());
    let limits = tern_serve::Limits {
        shutdown_grace: SHUTDOWN_GRACE,
        ..tern_serve::Limits::within_open_files(open_files, 2)
    };
    let tls = app.pki.as_ref().map(|p| p.server.subscribe());
    let mut tcp_srv = tokio::spawn({
        let (router, limits, rx) = (router.clone(), limits.clone(), rx.clone());
        async move { tern_serve::serve(tcp, router, &limits, tls, until_true(rx)).await }
    });
    let mut unix_srv = tokio::spawn({
        let rx = rx.clone();
        async move { tern_serve::serve(unix, router, &limits, None, until_true(rx)).await }
    });
    let renewer = app
        .pki
        .clone()
        .map(|p| tokio::spawn(crate::pki::renewer(p, rx.clone())));
    let feed = tokio::spawn(crate::stream::publisher(app.clone(), rx.clone()));
    let leader = match role {
        Role::Single => {
            let work = duties(&app, &rx);
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let _ = rx.wait_for(|v| *v).await;
                drop(work);
            })
        }
        Role::Ha { etcd, applied_rx } => {
            tokio::spawn(lead(app.clone(), *etcd, applied_rx, rx.clone()))
        }
    };
    let mut lost = app.leadership.lost();

    // Serve until asked to stop, until a listener fails, or until this center loses the
    // leadership it held. Shutdown is checked first: the listeners also end when it is asked
    // for, and that is no failure.
    let (failure, still_serving) = tokio::select! {
        biased;
        _ = until_true(rx.clone()) => (None, vec![tcp_srv, unix_srv]),
        r = &mut tcp_srv => (Some(format!("the TCP listener stopped: {r:?}")), vec![unix_srv]),
        r = &mut unix_srv => (Some(format!("the unix socket listener stopped: {r:?}")), vec![tcp_srv]),
        _ = lost.wait_for(|l| *l) => (
            Some("this center lost the leadership of its HA group; it stops so that its \
                  service manager starts it again as a standby (the new leader finishes or \
                  rolls back its work)".to_string()),
            vec![tcp_srv, unix_srv],
        ),
    };
    // A listener that ended because shutdown was asked (it may be seen first) did not fail.
    let failure = failure.filter(|_| !*rx.borrow());
    tracing::info!("tern center stopping");
    for srv in still_serving {
        if failure.is_some() {
            srv.abort();
            continue;
        }
        // Each listener gives open requests the grace time, then cuts them itself.
        let _ = srv.await;
    }
    leader.abort();
    feed.abort();
    if let Some(r) = renewer {
        r.abort();
    }
    let left = app.drain(SHUTDOWN_GRACE).await;
    if left > 0 {
        tracing::warn!(
            tasks = left,
            "stopped with work still going; the next start marks those tasks failed"
        );
    }
    drop(app);
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::debug!("removing {}: {e}", socket.display());
    }
    drop(lock);
    match failure {
        Some(f) => bail!(f),
        None => Ok(()),
    }
}

/// Holds `DATA_DIR/center.lock` so two centers never share one store.
/// The store's file in `data_dir`, created empty (owner only) if missing: the store holds host
/// and agent tokens, SQLite gives its -wal and -shm files the database file's mode, and takes
/// an empty file as a new database.
pub(crate) fn store_file(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("center.db");
    if !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
    }
    Ok(path)
}

pub(crate) fn lock_data_dir(dir: &Path) -> anyhow::Result<Flock<File>> {
    let path = dir.join("center.lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!(
            "another tern center uses {} (its lock {} is held: {errno}); stop it, or give this \
             one another --data-dir",
            dir.display(),
            path.display()
        )
    })
}

/// Binds the unix socket (mode 0600), replacing a stale socket file left by a crash.
fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "something already listens on {} (another center?); stop it or choose \
                     another --socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
            tracing::info!(socket = %path.display(), "removed a stale socket");
        }
        Ok(_) => bail!(
            "{} exists and is not a socket: remove it or choose another --socket",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    // The socket is created owner-only: set after bind, its mode would leave a moment in which
    // anyone could connect. The umask is process-wide; nothing else creates files while the
    // center starts.
    let old_mask = umask(Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    umask(old_mask);
    let l = bound.with_context(|| format!("listening on {} (--socket)", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(l)
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn termination_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    })
}
