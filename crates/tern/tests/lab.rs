//! The lab itself: its network (namespaces, bridges, addresses, link faults) and that
//! `lab down` — or the next `lab up` after a crash — leaves nothing behind.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{alive, namespaces, processes_mentioning, root_links, text, Lab};
use serde_json::Value;

fn ping(ns: &str, addr: &str) -> Option<f64> {
    ping_sized(ns, addr, 56)
}

/// One ping with `size` bytes of payload; the RTT in ms.
fn ping_sized(ns: &str, addr: &str, size: u32) -> Option<f64> {
    let size = size.to_string();
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "3", "-s", &size, addr,
        ])
        .output()
        .expect("run ping");
    if !out.status.success() {
        return None;
    }
    // "rtt min/avg/max/mdev = 0.052/0.052/0.052/0.000 ms"
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = s.lines().find(|l| l.contains("min/avg/max"))?;
    line.split('=')
        .nth(1)?
        .trim()
        .split('/')
        .nth(1)?
        .parse()
        .ok()
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run");
    assert!(out.status.success(), "{args:?}:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a lab could leave behind, seen from outside.
#[derive(Debug, PartialEq)]
struct Traces {
    namespaces: Vec<String>,
    root_links: Vec<String>,
    processes: Vec<(u32, String)>,
    dir_exists: bool,
}

fn traces(prefix: &str, dir: &std::path::Path) -> Traces {
    let mut ns: Vec<String> = namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    ns.sort();
    // The lab creates no link in the root namespace: any of its names there is a leak.
    let lab_names = [
        "sw0",
        "mg0",
        "br0",
        "mgmt0",
        "uplink0",
        "center-mg",
        "client-sw",
    ];
    let mut links: Vec<String> = root_links()
        .into_iter()
        .filter(|l| {
            lab_names.contains(&l.as_str())
                || (l.starts_with('h') && (l.ends_with("-mg") || l.ends_with("-sw")))
                || l.starts_with("tap")
        })
        .collect();
    links.sort();
    Traces {
        namespaces: ns,
        root_links: links,
        processes: processes_mentioning(&dir.display().to_string()),
        dir_exists: dir.exists(),
    }
}

fn nothing_left(prefix: &str, dir: &std::path::Path, before_links: &[String]) {
    let t = traces(prefix, dir);
    assert!(
        t.namespaces.is_empty(),
        "namespaces left: {:?}",
        t.namespaces
    );
    let new_links: Vec<&String> = t
        .root_links
        .iter()
        .filter(|l| !before_links.contains(l))
        .collect();
    assert!(
        new_links.is_empty(),
        "links left in the root namespace: {new_links:?}"
    );
    assert!(t.processes.is_empty(), "processes left: {:?}", t.processes);
    assert!(!t.dir_exists, "{} left", dir.display());
}

#[test]
fn network_topology_and_link_faults() {
    let lab = Lab::up_with("n", 2, &["--network-only"]);
    let p = &lab.prefix;
    let ns = namespaces();
    for suffix in ["fab", "center", "client", "h1", "h2"] {
        assert!(
            ns.contains(&format!("{p}-{suffix}")),
            "no {p}-{suffix} in {ns:?}"
        );
    }

    // Management network: hosts reach the center and each other.
    let h1 = format!("{p}-h1");
    assert!(
        ping(&h1, "10.77.0.2").is_some(),
        "h1 cannot reach the center"
    );
    assert!(ping(&h1, "10.77.0.12").is_some(), "h1 cannot reach h2");
    // The client sits on the VM LAN only.
    let client = format!("{p}-client");
    let addrs = sh(&["ip", "-n", &client, "-br", "addr", "show", "eth0"]);
    assert!(addrs.contains("10.78.0.2/24"), "{addrs}");
    assert!(
        ping(&client, "10.77.0.2").is_none(),
        "the client reaches the management net"
    );

    // VM LAN: a host's br0 is switched to the client (through uplink0 and sw0). Give br0 a
    // temporary address, as a guest on it would have.
    sh(&[
        "ip",
        "-n",
        &h1,
        "addr",
        "add",
        "10.78.0.201/24",
        "dev",
        "br0",
    ]);
    assert!(
        ping(&client, "10.78.0.201").is_some(),
        "client cannot reach h1's br0"
    );
    sh(&[
        "ip",
        "-n",
        &h1,
        "addr",
        "del",
        "10.78.0.201/24",
        "dev",
        "br0",
    ]);

    // br_netfilter must not see bridged traffic in a host namespace.
    let nf = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables");
    if nf.is_ok() {
        let v = sh(&[
            "ip",
            "netns",
            "exec",
            &h1,
            "sysctl",
            "-n",
            "net.bridge.bridge-nf-call-iptables",
        ]);
        assert_eq!(v.trim(), "0");
    }

    // Link faults on h1's management link. A 50 kB ping is IP-fragmented; at 1 Mbit/s the
    // part beyond the token bucket's 32 KiB burst takes ~140 ms each way.
    let base = ping_sized(&h1, "10.77.0.2", 50_000).expect("big ping");
    let out = lab.lab_cmd(&["lab", "link", "shape", "h1", "--rate-mbit", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let shaped = ping_sized(&h1, "10.77.0.2", 50_000).expect("ping through a shaped link");
    assert!(shaped >= 150.0, "shaped RTT {shaped} ms (base {base})");
    let other = ping_sized(&format!("{p}-h2"), "10.77.0.2", 50_000).expect("h2 ping");
    assert!(other < 100.0, "shaping h1 slowed h2: {other} ms");
    let out = lab.lab_cmd(&["lab", "link", "unshape", "h1"]);
    assert!(out.status.success(), "{}", text(&out));
    let unshaped = ping_sized(&h1, "10.77.0.2", 50_000).expect("ping");
    assert!(unshaped < 100.0, "unshaped RTT {unshaped} ms");

    let out = lab.lab_cmd(&["lab", "link", "cut", "h1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        ping(&h1, "10.77.0.2").is_none(),
        "a cut link still carries pings"
    );
    assert!(
        ping(&format!("{p}-h2"), "10.77.0.2").is_some(),
        "cutting h1 cut h2"
    );
    let out = lab.lab_cmd(&["lab", "link", "restore", "h1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        ping(&h1, "10.77.0.2").is_some(),
        "a restored link carries no pings"
    );

    let out = lab.lab_cmd(&["lab", "link", "cut", "h9"]);
    assert!(
        !out.status.success(),
        "cutting a host that does not exist succeeded"
    );

    let (prefix, dir) = (lab.prefix.clone(), lab.dir.clone());
    let before = root_links();
    lab.down();
    nothing_left(&prefix, &dir, &before);
}

#[test]
fn lab_down_and_crashed_labs_leave_nothing() {
    let before_links = root_links();
    let mut lab = Lab::up("d", 2);
    let (prefix, dir) = (lab.prefix.clone(), lab.dir.clone());

    let hosts: Vec<Value> = lab.tern_json(&["host", "list"]);
    let mut names: Vec<&str> = hosts.iter().filter_map(|h| h["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["h1", "h2"]);
    assert!(hosts.iter().all(|h| h["state"] == "connected"), "{hosts:?}");
    let clusters: Vec<Value> = lab.tern_json(&["cluster", "list"]);
    assert!(clusters.iter().any(|c| c["name"] == "lab"), "{clusters:?}");
    let status = lab.lab_cmd(&["lab", "status"]);
    assert!(status.status.success(), "{}", text(&status));

    // A process the lab did not start, inside a host namespace (as QEMU would be).
    let mut stray = Command::new("ip")
        .args(["netns", "exec", &format!("{prefix}-h1"), "sleep", "600"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start a stray process");

    // A crash: the center dies by SIGKILL, then the next `lab up` must clean up first.
    let old_agents = [lab.pid("h1"), lab.pid("h2")];
    let center = lab.pid("center");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(center as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the center");
    let out = lab.lab_cmd(&["lab", "up", "--hosts", "1"]);
    assert!(
        out.status.success(),
        "lab up over a crashed lab failed:\n{}",
        text(&out)
    );
    common::wait_for("the stray process to end", Duration::from_secs(10), || {
        stray.try_wait().ok().flatten()
    });
    for pid in old_agents {
        assert!(!alive(pid), "agent {pid} of the crashed lab survived");
    }
    let hosts: Vec<Value> = lab.tern_json(&["host", "list"]);
    assert_eq!(
        hosts.len(),
        1,
        "the new lab kept the old inventory: {hosts:?}"
    );
    assert!(
        !namespaces().contains(&format!("{prefix}-h2")),
        "the crashed lab's h2 namespace survived"
    );

    lab.down();
    nothing_left(&prefix, &dir, &before_links);

    // `lab down` of nothing is fine.
    let out = Command::new(common::tern_exe())
        .args(["lab", "down", "--prefix", &prefix, "--dir"])
        .arg(&dir)
        .output()
        .expect("run tern");
    assert!(out.status.success(), "{}", text(&out));
    nothing_left(&prefix, &dir, &before_links);
}
