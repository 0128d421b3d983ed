//! The lab's daemons: how `tern center` and each `tern host agent` are started (the same way
//! by `lab up` and `lab start|restart`), stopped, and waited for until ready.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use tern_api::center::Host;
use tern_api::{ApiClient, CenterClient, Endpoint, HostState};

use super::plan::{self, CLUSTER};
use super::state::{LabHost, LabProcess, LabState};
use super::{absolute, load, procs};

const CENTER_READY_TIMEOUT: Duration = Duration::from_secs(30);
const HOSTS_READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(5);

pub(super) fn api_client(st: &LabState, timeout: Duration) -> anyhow::Result<CenterClient> {
    let token = st.admin_token()?;
    Ok(CenterClient::new(ApiClient::with_timeout(
        Endpoint::Unix(st.socket.clone()),
        token,
        timeout,
    )?))
}

/// An HA lab's centers (`lab up --ha`), all in the center namespace on their own ports.
pub(super) const HA_CENTERS: [&str; 3] = ["center", "center2", "center3"];

/// The API port of center `name` (8700, 8710, 8720).
fn center_port(name: &str) -> u16 {
    let i = HA_CENTERS.iter().position(|n| *n == name).unwrap_or(0) as u16;
    plan::CENTER_PORT + 10 * i
}

/// The URL of center `name` (inside the lab).
pub(super) fn center_url(name: &str) -> String {
    format!("https://{}:{}", plan::CENTER_IP, center_port(name))
}

/// etcd member `i`'s client and peer URLs (in the center namespace).
pub(super) fn etcd_urls(i: usize) -> (String, String) {
    let port = 2379 + 10 * i as u16;
    (
        format!("http://{}:{port}", plan::CENTER_IP),
        format!("http://{}:{}", plan::CENTER_IP, port + 1),
    )
}

/// The arguments of etcd member `i` of `n`.
pub(super) fn etcd_args(st: &LabState, i: usize, n: usize) -> Vec<String> {
    let (client, peer) = etcd_urls(i);
    let initial: Vec<String> = (0..n)
        .map(|j| format!("etcd{}={}", j + 1, etcd_urls(j).1))
        .collect();
    [
        "--name",
        &format!("etcd{}", i + 1),
        "--data-dir",
        &st.dir.join(format!("etcd{}", i + 1)).display().to_string(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &initial.join(","),
        "--initial-cluster-token",
        &st.prefix,
        "--initial-cluster-state",
        "new",
        // One machine: fast heartbeats, so a lost etcd leader is replaced within seconds.
        "--heartbeat-interval",
        "100",
        "--election-timeout",
        "1000",
        "--logger",
        "zap",
        "--log-level",
        "warn",
    ]
    .map(String::from)
    .to_vec()
}

pub(super) fn center_args(st: &LabState, name: &str) -> Vec<String> {
    let d = &st.dir;
    let mut args: Vec<String> = vec![
        "center".into(),
        "--data-dir".into(),
        d.join(name).display().to_string(),
        "--listen".into(),
        format!("{}:{}", plan::CENTER_IP, center_port(name)),
        "--socket".into(),
        st.center_socket(name).display().to_string(),
        "--admin-token-file".into(),
        st.admin_token_file.display().to_string(),
        // Lab tests take storage away and expect the center to notice within seconds.
        "--datastore-check-ms".into(),
        "2000".into(),
        // Charts in the web client's tests fill within seconds.
        "--history-period-ms".into(),
        "1000".into(),
    ];
    if !st.etcd.is_empty() {
        args.extend(["--ha-name".into(), name.into()]);
        args.extend(["--advertise-url".into(), center_url(name)]);
        // A lab's takeovers take seconds, not the production lease of 15 s (see also
        // [`LEASE_OVERRIDE_ENV`]).
        args.extend([LEASE_FLAG.into(), "5".into()]);
        for i in 0..st.etcd.len() {
            args.extend(["--etcd".into(), etcd_urls(i).0]);
        }
    }
    args
}

pub(super) fn agent_args(st: &LabState, h: &LabHost) -> Vec<String> {
    vec![
        "host".into(),
        "agent".into(),
        "--name".into(),
        h.name.clone(),
        "--cluster".into(),
        CLUSTER.into(),
        "--center".into(),
        if st.etcd.is_empty() {
            st.center_url.clone()
        } else {
            HA_CENTERS.map(center_url).join(",")
        },
        "--enrol-token-file".into(),
        st.join_token_file(&h.name).display().to_string(),
        "--listen".into(),
        format!("{}:{}", h.mgmt_ip, tern_api::AGENT_PORT),
        "--advertise-url".into(),
        h.agent_url.clone(),
        "--migration-address".into(),
        h.mgmt_ip.clone(),
        "--bridge".into(),
        plan::HOST_BRIDGE.into(),
        "--state-dir".into(),
        h.state_dir.display().to_string(),
        "--shared-storage".into(),
        st.shared_dir.display().to_string(),
        "--accel".into(),
        st.accel.clone(),
        "--cgroup-parent".into(),
        lab_cgroup(&st.prefix, &h.name),
        "--health-sysfs".into(),
        health_sysfs(&h.state_dir).display().to_string(),
    ]
}

/// The sysfs tree a lab agent reads its health counters under: the lab's stand-in for the
/// hardware (`tern lab memory-errors` raises its EDAC counters), beside the host's state dir.
pub(super) fn health_sysfs(state_dir: &std::path::Path) -> std::path::PathBuf {
    let name = state_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    state_dir.with_file_name(format!("{name}-sysfs"))
}

/// The fake EDAC memory controller of a lab host (one, `mc0`).
pub(super) fn edac_dir(state_dir: &std::path::Path) -> std::path::PathBuf {
    health_sysfs(state_dir).join("devices/system/edac/mc/mc0")
}

/// The cgroup parent of a lab's agents (`tern lab down` removes `tern-lab/<prefix>`).
pub(super) fn lab_cgroup(prefix: &str, host: &str) -> String {
    format!("{LAB_CGROUP}/{prefix}/{host}")
}

/// Where every lab's VM cgroups live.
pub(super) const LAB_CGROUP: &str = "tern-lab";

fn process_mut<'a>(st: &'a mut LabState, name: &str) -> anyhow::Result<&'a mut LabProcess> {
    if name == "center" {
        return st.center.as_mut().context("the lab has no center");
    }
    let names: Vec<String> = st
        .standbys
        .iter()
        .chain(st.etcd.iter())
        .map(|p| p.name.clone())
        .chain(st.hosts.iter().map(|h| h.name.clone()))
        .collect();
    if let Some(i) = st
        .standbys
        .iter()
        .chain(st.etcd.iter())
        .position(|p| p.name == name)
    {
        let n = st.standbys.len();
        return Ok(if i < n {
            &mut st.standbys[i]
        } else {
            &mut st.etcd[i - n]
        });
    }
    st.hosts
        .iter_mut()
        .find(|h| h.name == name)
        .map(|h| &mut h.agent)
        .with_context(|| {
            format!(
                "the lab has no process `{name}` (it has: center, {})",
                names.join(", ")
            )
        })
}

/// Spawns the named process and records its pid.
/// The centers' lease flag in a lab's HA group.
const LEASE_FLAG: &str = "--lease-ttl-s";
/// Set when `tern lab start CENTER` runs, the lease (seconds) that center runs with this time
/// instead of the lab's: a test that needs no takeover for a while after a center dies.
const LEASE_OVERRIDE_ENV: &str = "TERN_LAB_LEASE_TTL_S";

/// A center's recorded flags, with the lease of [`LEASE_OVERRIDE_ENV`] if that is set (and a
/// number).
fn with_lease_override(args: &[String]) -> Vec<String> {
    let mut args = args.to_vec();
    let ttl = std::env::var(LEASE_OVERRIDE_ENV)
        .ok()
        .and_then(|v| v.parse::<u16>().ok());
    if let (Some(ttl), Some(i)) = (ttl, args.iter().position(|a| a == LEASE_FLAG)) {
        if let Some(v) = args.get_mut(i + 1) {
            *v = ttl.to_string();
        }
    }
    args
}

pub(super) fn start_process(st: &mut LabState, name: &str) -> anyhow::Result<Child> {
    let exe = st.exe.clone();
    let p = process_mut(st, name)?;
    let recorded = p.args.clone();
    p.args = with_lease_override(&recorded);
    let spawned = procs::spawn(p.exe.as_deref().unwrap_or(&exe), p);
    // The override is for this start only.
    p.args = recorded;
    let child = spawned?;
    p.pid = Some(child.id());
    st.save()?;
    Ok(child)
}

fn exited(child: &mut Child, p: Option<&LabProcess>) -> anyhow::Result<()> {
    if let Some(status) = child.try_wait()? {
        let (name, tail) = match p {
            Some(p) => (p.name.clone(), procs::log_tail(&p.log, 30)),
            None => ("process".into(), String::new()),
        };
        bail!("{name} exited during start-up ({status})\n{tail}");
    }
    Ok(())
}

/// Waits until the center answers on its socket.
pub(super) async fn wait_center(st: &LabState, child: &mut Child) -> anyhow::Result<CenterClient> {
    wait_center_named(st, "center", child).await
}

/// Waits until center `name` answers on its socket.
pub(super) async fn wait_center_named(
    st: &LabState,
    name: &str,
    child: &mut Child,
) -> anyhow::Result<CenterClient> {
    let token = st.admin_token()?;
    let client = |timeout| -> anyhow::Result<CenterClient> {
        Ok(CenterClient::new(ApiClient::with_timeout(
            Endpoint::Unix(st.center_socket(name)),
            token.clone(),
            timeout,
        )?))
    };
    let api = client(Duration::from_secs(3))?;
    let process = if name == "center" {
        st.center.as_ref()
    } else {
        st.standbys.iter().find(|p| p.name == name)
    };
    let deadline = Instant::now() + CENTER_READY_TIMEOUT;
    loop {
        exited(child, process)?;
        let err = match api.clusters().await {
            Ok(_) => return client(Duration::from_secs(30)),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            let tail = process
                .map(|p| procs::log_tail(&p.log, 30))
                .unwrap_or_default();
            bail!(
                "{name} did not answer on {} within {} s: {err}\n{tail}",
                st.center_socket(name).display(),
                CENTER_READY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until each named host is connected with a heartbeat newer than `since`.
pub(super) async fn wait_hosts(
    st: &LabState,
    api: &CenterClient,
    children: &mut [(String, Child)],
    since: DateTime<Utc>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + HOSTS_READY_TIMEOUT;
    loop {
        for (name, child) in children.iter_mut() {
            exited(child, st.host(name).map(|h| &h.agent))?;
        }
        let hosts: Vec<Host> = match api.hosts().await {
            Ok(h) => h,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("listing hosts: {e}");
                Vec::new()
            }
            Err(e) => return Err(e).context("listing hosts"),
        };
        let mut pending = Vec::new();
        for (name, _) in children.iter() {
            match hosts.iter().find(|h| &h.name == name) {
                Some(h)
                    if h.state == HostState::Connected
                        && h.last_heartbeat.is_some_and(|t| t >= since) => {}
                Some(h) => pending.push(format!("{name} ({})", h.state)),
                None => pending.push(format!("{name} (not registered)")),
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let mut tails = String::new();
            for (name, _) in children.iter() {
                if let Some(h) = st.host(name) {
                    tails.push_str(&procs::log_tail(&h.agent.log, 15));
                }
            }
            bail!(
                "hosts not connected after {} s: {}\n{tails}",
                HOSTS_READY_TIMEOUT.as_secs(),
                pending.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops a lab process (`center` or `h<i>`): TERM with a grace time, or KILL at once.
pub fn stop(dir: &Path, name: &str, kill: bool) -> anyhow::Result<Option<u32>> {
    let mut st = load(&absolute(dir)?)?;
    let lab_dir = st.dir.clone();
    let p = process_mut(&mut st, name)?;
    let pid = p.pid.filter(|pid| procs::is_ours(*pid, &lab_dir));
    if let Some(pid) = pid {
        if kill {
            procs::kill_now(&[pid])?;
        } else {
            procs::terminate(&[pid], STOP_GRACE)?;
        }
    }
    p.pid = None;
    st.save()?;
    Ok(pid)
}

/// How `lab start|restart` starts a process.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// For a host agent: `Some(Some(model))` sets its `--cpu-ceiling` (recorded, so later
    /// starts keep it), `Some(None)` removes it, `None` keeps what was recorded.
    pub cpu_ceiling: Option<Option<String>>,
    /// Return once the process is spawned instead of waiting until it is ready (e.g. an agent
    /// the center is expected to refuse).
    pub no_wait: bool,
}

/// The agent arguments with `--cpu-ceiling` replaced by `ceiling` (or removed).
pub(super) fn with_cpu_ceiling(args: &[String], ceiling: Option<&str>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--cpu-ceiling" {
            it.next();
        } else if !a.starts_with("--cpu-ceiling=") {
            out.push(a.clone());
        }
    }
    if let Some(c) = ceiling {
        out.push("--cpu-ceiling".into());
        out.push(c.to_string());
    }
    out
}

/// Starts a stopped lab process the way `lab up` did and waits until it is ready (the
/// center answers; an agent's host heartbeats again), unless `o.no_wait`. Returns the new pid.
pub async fn start(dir: &Path, name: &str, o: &StartOptions) -> anyhow::Result<u32> {
    let mut st = load(&absolute(dir)?)?;
    let lab_dir = st.dir.clone();
    let p = process_mut(&mut st, name)?;
    if let Some(pid) = p.pid.filter(|pid| procs::is_ours(*pid, &lab_dir)) {
        bail!("{name} is already running (pid {pid}); use `tern lab restart {name}`");
    }
    if let Some(ceiling) = &o.cpu_ceiling {
        if name == "center" {
            bail!("--cpu-ceiling applies to host agents, not the center");
        }
        p.args = with_cpu_ceiling(&p.args, ceiling.as_deref());
        st.save()?;
    }
    let since = Utc::now();
    let mut child = start_process(&mut st, name)?;
    let pid = child.id();
    if o.no_wait {
        // The child is not reaped here: the lab owns its processes by pid (lab.json).
        drop(child);
        return Ok(pid);
    }
    if HA_CENTERS.contains(&name) {
        wait_center_named(&st, name, &mut child).await?;
    } else if name.starts_with("etcd") {
        drop(child);
    } else {
        let api = api_client(&st, Duration::from_secs(10))?;
        let mut children = [(name.to_string(), child)];
        wait_hosts(&st, &api, &mut children, since).await?;
    }
    Ok(pid)
}

/// `stop` then `start`.
pub async fn restart(
    dir: &Path,
    name: &str,
    kill: bool,
    o: &StartOptions,
) -> anyhow::Result<(Option<u32>, u32)> {
    let old = stop(dir, name, kill)?;
    let new = start(dir, name, o).await?;
    Ok((old, new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ceiling_args_are_replaced() {
        let args: Vec<String> = [
            "host",
            "agent",
            "--cpu-ceiling",
            "Haswell",
            "--accel",
            "tcg",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            with_cpu_ceiling(&args, Some("Westmere")),
            [
                "host",
                "agent",
                "--accel",
                "tcg",
                "--cpu-ceiling",
                "Westmere"
            ]
        );
        assert_eq!(
            with_cpu_ceiling(&args, None),
            ["host", "agent", "--accel", "tcg"]
        );
    }
}
