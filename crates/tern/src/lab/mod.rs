//! `tern lab`: a whole cluster on one machine, built from network namespaces, and removed
//! without a trace.
//!
//! The lab is a test fixture that must mirror what an operator would type on real hosts, so
//! it drives the stock tools — `ip`, `tc`, `sysctl`, `ip netns exec` — through
//! `std::process` rather than netlink: every step it takes can be read in its logs and
//! replayed by hand. Topology (see DESIGN.md, "The lab"):
//!
//! - `<p>-fab`: bridges `sw0` (VM LAN switch) and `mg0` (management + migration), no IPs;
//! - `<p>-center`: `mgmt0` 10.77.0.2/24 on mg0; runs `tern center`;
//! - `<p>-h<i>`: VM bridge `br0` uplinked to sw0, `mgmt0` 10.77.0.<10+i>/24 on mg0; runs
//!   `tern host agent`;
//! - `<p>-client`: `eth0` 10.78.0.2/24 on sw0, plays the VMs' users.
//!
//! Everything made is recorded in `<dir>/lab.json` as it is made, so `lab down` (or the next
//! `lab up`) removes a crashed lab too.

pub mod plan;
pub mod state;

pub mod block;
mod daemons;
mod faults;
mod net;
mod procs;
pub mod san;
mod teardown;
mod topology;

pub use daemons::{restart, start, stop, StartOptions};
pub use faults::{link, memory_errors, LinkFault};
pub use teardown::teardown;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::Utc;
use serde::Serialize;
use tern_api::center::{AddHost, CreateCluster, Host, MigrationEncryption};

use daemons::{agent_args, api_client, center_args, start_process, wait_center, wait_hosts};
use plan::{Plan, CLUSTER};
use state::{LabGuest, LabHost, LabProcess, LabState};

/// Accelerator the lab's agents run guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// Software emulation: works everywhere (the default, see DESIGN.md).
    Tcg,
    Kvm,
    /// The agent picks KVM when the CPU has hardware virtualization.
    Auto,
}

impl Accel {
    fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
            Accel::Auto => "auto",
        }
    }
}

/// What `lab up` builds.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub hosts: u32,
    pub prefix: String,
    pub dir: PathBuf,
    pub accel: Accel,
    /// Guest image to copy into shared storage; `None` = `target/guest` when it exists.
    pub guest_dir: Option<PathBuf>,
    /// Build the network and directories only: no center, no agents.
    pub network_only: bool,
    /// `--cpu-ceiling` per host (`h2` → `Westmere`): lab hosts share one physical CPU, so a
    /// ceiling makes one stand for an older machine (EVC tests).
    pub cpu_ceilings: Vec<(String, String)>,
    /// LUNs of a SAN to build (0: no SAN), and their size.
    pub san_luns: u32,
    pub san_lun_mib: u64,
    /// Block LUNs (loop devices named under /dev/disk/by-id), registered as datastores
    /// `block1`…; 0 for none.
    pub block_luns: u32,
    pub block_lun_mib: u64,
    /// An HA group: three centers (`center`, `center2`, `center3`) sharing a three-member
    /// etcd, all in the center namespace.
    pub ha: bool,
}

/// Parses `HOST=MODEL` (a `lab up --cpu-ceiling` value).
pub fn parse_host_ceiling(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((h, m)) if !h.trim().is_empty() && !m.trim().is_empty() => {
            Ok((h.trim().to_string(), m.trim().to_string()))
        }
        _ => Err(format!("`{s}` is not HOST=MODEL (e.g. h2=Westmere)")),
    }
}

const DEFAULT_GUEST_DIR: &str = "target/guest";

fn say(msg: &str) {
    eprintln!("lab: {msg}");
}

fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab creates network namespaces: run it as root");
    }
    Ok(())
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
}

/// The running executable, also when it was rebuilt since it started.
fn current_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the tern executable")?;
    if exe.exists() {
        return Ok(exe);
    }
    let s = exe.to_string_lossy();
    match s.strip_suffix(" (deleted)") {
        Some(orig) if Path::new(orig).exists() => Ok(PathBuf::from(orig)),
        _ => bail!("the tern executable {} is gone", exe.display()),
    }
}

/// HA labs: starts three etcd members in the center namespace and waits until they elect a
/// leader.
async fn start_etcd(st: &mut LabState, namespace: &str) -> anyhow::Result<()> {
    say("starting a three-member etcd");
    let etcd = which("etcd").context("etcd is missing: run scripts/setup.sh")?;
    let n = 3;
    for i in 0..n {
        let p = LabProcess {
            name: format!("etcd{}", i + 1),
            namespace: namespace.to_string(),
            args: daemons::etcd_args(st, i, n),
            log: st.dir.join(format!("logs/etcd{}.log", i + 1)),
            pid: None,
            exe: Some(etcd.clone()),
        };
        st.etcd.push(p);
        st.save()?;
        let name = format!("etcd{}", i + 1);
        drop(start_process(st, &name)?);
    }
    let endpoints: Vec<String> = (0..n).map(|i| daemons::etcd_urls(i).0).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ok = std::process::Command::new("ip")
            .args(["netns", "exec", namespace, "etcdctl", "--endpoints"])
            .arg(endpoints.join(","))
            .args(["--command-timeout", "2s", "endpoint", "health"])
            .env("ETCDCTL_API", "3")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            // The agents were planned before the group existed: they get every center.
            let centers = daemons::HA_CENTERS.map(daemons::center_url).join(",");
            for h in &mut st.hosts {
                if let Some(i) = h.agent.args.iter().position(|a| a == "--center") {
                    if let Some(v) = h.agent.args.get_mut(i + 1) {
                        *v = centers.clone();
                    }
                }
            }
            st.save()?;
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "etcd did not become healthy within 30 s (logs in {}/logs)",
                st.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// HA labs: gives the other centers the first one's CA (as an operator copies the pki
/// directory to each center machine) and starts them; they stand by.
async fn start_standbys(st: &mut LabState, namespace: &str) -> anyhow::Result<()> {
    say("starting two standby centers");
    for name in &daemons::HA_CENTERS[1..] {
        let data = st.dir.join(name);
        copy_tree(&st.dir.join("center/pki"), &data.join("pki"))?;
        let mut p = LabProcess {
            name: name.to_string(),
            namespace: namespace.to_string(),
            args: Vec::new(),
            log: st.dir.join(format!("logs/{name}.log")),
            pid: None,
            exe: None,
        };
        p.args = center_args(st, name);
        st.standbys.push(p);
        st.save()?;
        let mut child = start_process(st, name)?;
        daemons::wait_center_named(st, name, &mut child).await?;
    }
    Ok(())
}

/// Copies a directory tree, keeping file modes (the CA key stays owner-only).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(to)
        .with_context(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), &dest)
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// A program on the PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// A fresh random token (hex), written to a 0600 file.
fn write_token(path: &Path) -> anyhow::Result<()> {
    let bytes: [u8; 24] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_secret(path, &token)
}

/// Writes one secret line, owner-only.
fn write_secret(path: &Path, token: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{token}")?;
    Ok(())
}

/// Builds a lab: cleans a previous one with the same prefix or dir, creates the network,
/// starts the center, creates cluster `lab`, starts the agents and waits until every host is
/// connected. On failure the partial lab is left for inspection (`lab down` removes it).
pub async fn up(o: &UpOptions) -> anyhow::Result<LabState> {
    require_root()?;
    let mut plan = Plan::new(&o.prefix, o.hosts)?;
    if o.san_luns > 0 {
        plan = plan.with_san();
    }
    let dir = absolute(&o.dir)?;
    let exe = current_exe()?;
    let guest_src = match &o.guest_dir {
        Some(g) if !g.is_dir() => bail!("guest image dir {} does not exist", g.display()),
        Some(g) => Some(absolute(g)?),
        None => Some(absolute(Path::new(DEFAULT_GUEST_DIR))?).filter(|g| g.is_dir()),
    };

    if let Some((h, _)) = o
        .cpu_ceilings
        .iter()
        .find(|(h, _)| !plan.hosts.iter().any(|p| &p.name == h))
    {
        bail!(
            "--cpu-ceiling names host {h}, which a lab of {} hosts does not have",
            o.hosts
        );
    }
    let removed = teardown(&dir, std::slice::from_ref(&o.prefix))?;
    if !removed.is_empty() {
        say(&format!("removed a previous lab: {}", removed.summary()));
    }
    for sub in ["logs", "center", "hosts", "shared"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let mut st = LabState {
        prefix: plan.prefix.clone(),
        dir: dir.clone(),
        exe: exe.clone(),
        accel: o.accel.as_str().into(),
        namespaces: Vec::new(),
        fabric_namespace: plan.fabric.clone(),
        center_namespace: plan.center.clone(),
        client_namespace: plan.client.clone(),
        center_url: plan.center_url(),
        socket: dir.join("center/center.sock"),
        admin_token_file: dir.join("admin.token"),
        shared_dir: dir.join("shared"),
        guest: None,
        center: None,
        standbys: Vec::new(),
        etcd: Vec::new(),
        hosts: Vec::new(),
        san: None,
        block_luns: Vec::new(),
        created_at: Utc::now(),
    };
    st.save()?;
    write_token(&st.admin_token_file)?;

    say(&format!(
        "creating {} namespaces and their links",
        plan.namespaces().len()
    ));
    for ns in plan.namespaces() {
        st.namespaces.push(ns.clone());
        st.save()?;
        topology::add_namespace(&ns)?;
    }
    for h in &plan.hosts {
        let state_dir = dir.join("hosts").join(&h.name);
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        // A healthy memory controller: no errors yet.
        let edac = daemons::edac_dir(&state_dir);
        std::fs::create_dir_all(&edac).with_context(|| format!("creating {}", edac.display()))?;
        for f in ["ce_count", "ue_count"] {
            std::fs::write(edac.join(f), "0\n")
                .with_context(|| format!("writing {}", edac.join(f).display()))?;
        }
        let mut host = LabHost {
            name: h.name.clone(),
            namespace: h.namespace.clone(),
            mgmt_ip: h.mgmt_ip.clone(),
            agent_url: format!("https://{}:{}", h.mgmt_ip, tern_api::AGENT_PORT),
            state_dir,
            fabric_mgmt_link: h.fabric_mgmt_link.clone(),
            agent: LabProcess {
                name: h.name.clone(),
                namespace: h.namespace.clone(),
                args: Vec::new(),
                log: dir.join(format!("logs/{}.log", h.name)),
                pid: None,
                exe: None,
            },
        };
        host.agent.args = agent_args(&st, &host);
        if let Some((_, model)) = o.cpu_ceilings.iter().find(|(n, _)| n == &h.name) {
            host.agent.args = daemons::with_cpu_ceiling(&host.agent.args, Some(model));
        }
        st.hosts.push(host);
    }
    st.save()?;
    topology::build_links(&plan)?;
    if let Some(ns) = &plan.san {
        say(&format!(
            "starting the SAN: {} LUN(s) of {} MiB",
            o.san_luns, o.san_lun_mib
        ));
        st.san = Some(san::start(
            &dir,
            &plan.prefix,
            ns,
            o.san_luns,
            o.san_lun_mib,
        )?);
        st.save()?;
    }

    if o.block_luns > 0 {
        say(&format!(
            "making {} block LUN(s) of {} MiB",
            o.block_luns, o.block_lun_mib
        ));
        st.block_luns = block::create(&dir, &plan.prefix, o.block_luns, o.block_lun_mib)?;
        st.save()?;
    }

    if let Some(src) = guest_src {
        st.guest = copy_guest(&src, &st.shared_dir.join("guest"))?;
        st.save()?;
    }
    if o.network_only {
        return Ok(st);
    }

    if o.ha {
        start_etcd(&mut st, &plan.center).await?;
    }
    say("starting the center");
    let center = LabProcess {
        name: "center".into(),
        namespace: plan.center.clone(),
        args: Vec::new(),
        log: dir.join("logs/center.log"),
        pid: None,
        exe: None,
    };
    st.center = Some(center);
    let args = center_args(&st, "center");
    if let Some(c) = st.center.as_mut() {
        c.args = args;
    }
    let mut child = start_process(&mut st, "center")?;
    let api = wait_center(&st, &mut child).await?;
    // In an HA lab the first center answers reads before it has won its election.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = api
            .create_cluster(&CreateCluster {
                name: CLUSTER.into(),
                evc_mode: None,
                // The default, said here because the lab shows the secure path.
                migration_encryption: Some(MigrationEncryption::Required),
            })
            .await;
        match r {
            Ok(_) => break,
            Err(e) if e.is_conflict() => break,
            Err(e) if e.status() == Some(503) && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).context("creating cluster `lab`"),
        }
    }
    if o.ha {
        start_standbys(&mut st, &plan.center).await?;
    }

    // Each host joins with its own one-time token, as on a real network.
    let join_dir = dir.join("join");
    std::fs::create_dir_all(&join_dir)
        .with_context(|| format!("creating {}", join_dir.display()))?;
    for name in st.hosts.iter().map(|h| h.name.clone()).collect::<Vec<_>>() {
        let t = api
            .add_host(&name, &AddHost { ttl_s: Some(3600) })
            .await
            .with_context(|| format!("creating the join token of host {name}"))?;
        write_secret(&st.join_token_file(&name), &t.token)?;
    }

    say(&format!("starting {} host agents", st.hosts.len()));
    let since = Utc::now();
    let mut children = Vec::new();
    for name in st.hosts.iter().map(|h| h.name.clone()).collect::<Vec<_>>() {
        children.push((name.clone(), start_process(&mut st, &name)?));
    }
    wait_hosts(&st, &api, &mut children, since).await?;
    register_datastores(&st, &api).await?;
    Ok(st)
}

/// The lab's storage as datastores: the shared directory (`shared`) and, with a SAN, its
/// target (`san`, LUNs 1..N).
async fn register_datastores(st: &LabState, api: &tern_api::CenterClient) -> anyhow::Result<()> {
    use tern_api::datastores::{AddDatastore, DatastoreBackend};
    let mut stores = vec![AddDatastore {
        name: "shared".into(),
        backend: DatastoreBackend::Directory {
            path: st.shared_dir.display().to_string(),
        },
    }];
    for (i, id) in st.block_luns.iter().enumerate() {
        stores.push(AddDatastore {
            name: format!("block{}", i + 1),
            backend: DatastoreBackend::Block {
                device_id: id.clone(),
            },
        });
    }
    if st.san.is_some() {
        stores.push(AddDatastore {
            name: "san".into(),
            backend: DatastoreBackend::Iscsi {
                portal: std::net::SocketAddr::new(
                    plan::SAN_IP.parse().context("the SAN's address")?,
                    plan::SAN_PORT,
                ),
                iqn: plan::SAN_TARGET.into(),
            },
        });
    }
    for d in stores {
        say(&format!(
            "datastore {}: {} {}",
            d.name,
            d.backend.kind(),
            d.backend.location()
        ));
        match api.add_datastore(&d).await {
            Ok(_) => {}
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e).with_context(|| format!("adding datastore {}", d.name)),
        }
    }
    Ok(())
}

/// Copies vmlinuz, initramfs.img (and tern-guest when present) into shared storage.
fn copy_guest(src: &Path, dst: &Path) -> anyhow::Result<Option<LabGuest>> {
    let (k, i) = (src.join("vmlinuz"), src.join("initramfs.img"));
    if !k.is_file() || !i.is_file() {
        say(&format!(
            "no guest image in {} (build it with guest/build.sh); skipping",
            src.display()
        ));
        return Ok(None);
    }
    std::fs::create_dir_all(dst)?;
    for name in ["vmlinuz", "initramfs.img", "tern-guest", "MANIFEST"] {
        let from = src.join(name);
        if from.is_file() {
            std::fs::copy(&from, dst.join(name))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    Ok(Some(LabGuest {
        kernel: dst.join("vmlinuz"),
        initrd: dst.join("initramfs.img"),
    }))
}

/// Loads the lab record, or says how to make one.
pub fn load(dir: &Path) -> anyhow::Result<LabState> {
    LabState::load(dir)?.with_context(|| {
        format!(
            "no lab in {} (no lab.json): start one with `tern lab up --hosts 2`",
            dir.display()
        )
    })
}

/// Live view of a lab for `lab status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub lab: LabState,
    /// Recorded namespaces that no longer exist.
    pub missing_namespaces: Vec<String>,
    pub processes: Vec<ProcessStatus>,
    /// Hosts as the center sees them (`None` when it does not answer).
    pub hosts: Option<Vec<Host>>,
    pub center_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ProcessStatus {
    pub name: String,
    pub namespace: String,
    pub pid: Option<u32>,
    pub running: bool,
    pub log: PathBuf,
}

pub async fn status(dir: &Path) -> anyhow::Result<Status> {
    let lab = load(&absolute(dir)?)?;
    let existing = net::list_namespaces()?;
    let missing_namespaces = lab
        .namespaces
        .iter()
        .filter(|n| !existing.contains(n))
        .cloned()
        .collect();
    let processes = lab
        .processes()
        .map(|p| ProcessStatus {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            pid: p.pid,
            running: p.pid.is_some_and(|pid| procs::is_ours(pid, &lab.dir)),
            log: p.log.clone(),
        })
        .collect();
    let (hosts, center_error) = match api_client(&lab, Duration::from_secs(3)) {
        Ok(api) => match api.hosts().await {
            Ok(h) => (Some(h), None),
            Err(e) => (None, Some(e.to_string())),
        },
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    Ok(Status {
        lab,
        missing_namespaces,
        processes,
        hosts,
        center_error,
    })
}

/// Namespace of the lab's client: `--prefix`, else the lab record's, else the default's.
pub fn client_namespace(dir: &Path, prefix: Option<&str>) -> anyhow::Result<String> {
    let ns = match prefix {
        Some(p) => {
            plan::check_prefix(p)?;
            format!("{p}-client")
        }
        None => match LabState::load(&absolute(dir)?)? {
            Some(s) => s.client_namespace,
            None => "tern-client".to_string(),
        },
    };
    if !net::list_namespaces()?.contains(&ns) {
        bail!("namespace {ns} does not exist: is the lab up? (`tern lab status`)");
    }
    Ok(ns)
}

/// Runs a command in the client namespace in place of this process (its exit code is ours).
pub fn exec_client(ns: &str, cmd: &[String]) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .exec();
    anyhow::Error::new(err).context("cannot run `ip netns exec`")
}
