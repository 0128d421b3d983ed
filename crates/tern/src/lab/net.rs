//! Runs `ip`, `tc` and `sysctl` for the lab, and waits for links and reachability.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Runs a command; fails with its stderr when it exits non-zero.
pub fn run(prog: &str, args: &[&str]) -> anyhow::Result<String> {
    tracing::debug!("{prog} {}", args.join(" "));
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {prog} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

/// `ip -n NS ...`.
pub fn ip_ns(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut v = vec!["-n", ns];
    v.extend_from_slice(args);
    ip(&v)
}

/// Runs a program inside a namespace (`ip netns exec NS prog args...`).
pub fn exec_in(ns: &str, prog: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut v = vec!["netns", "exec", ns, prog];
    v.extend_from_slice(args);
    ip(&v)
}

/// Names of the network namespaces that exist (`ip netns list`).
pub fn list_namespaces() -> anyhow::Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Pids of the processes inside a namespace (`ip netns pids`).
pub fn namespace_pids(ns: &str) -> anyhow::Result<Vec<u32>> {
    let out = ip(&["netns", "pids", ns])?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Sets sysctls inside a namespace.
pub fn sysctl_in(ns: &str, settings: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["-q", "-w"];
    args.extend_from_slice(settings);
    exec_in(ns, "sysctl", &args).map(drop)
}

/// Operational state of every link in a namespace (`ip -j link`), by name.
pub fn link_states(ns: &str) -> anyhow::Result<Vec<(String, String)>> {
    let out = ip_ns(ns, &["-j", "link", "show"])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).context("`ip -j link show` gave no JSON")?;
    Ok(v.as_array()
        .map(|links| {
            links
                .iter()
                .filter_map(|l| {
                    Some((
                        l.get("ifname")?.as_str()?.to_string(),
                        l.get("operstate")?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Waits until every (namespace, link) has carrier (operstate UP); veth carrier comes up
/// about a second after `link set up`.
pub fn wait_carrier(links: &[(String, String)], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut down = Vec::new();
        let mut namespaces: Vec<&String> = links.iter().map(|(ns, _)| ns).collect();
        namespaces.dedup();
        for ns in namespaces {
            let states = link_states(ns)?;
            for (lns, name) in links.iter().filter(|(n, _)| n == ns) {
                let up = states.iter().any(|(n, s)| n == name && s == "UP");
                if !up {
                    down.push(format!("{lns}/{name}"));
                }
            }
        }
        if down.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "links still without carrier after {} s: {}",
                timeout.as_secs(),
                down.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `ns` can ping `addr` (a lab address) once.
pub fn wait_ping(ns: &str, addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = Command::new("ip")
            .args([
                "netns", "exec", ns, "ping", "-q", "-n", "-c", "1", "-W", "1", addr,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run ping")?
            .success();
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{ns} cannot reach {addr} after {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
