//! Builds the lab's network from a [`Plan`]: namespaces, bridges, veths, addresses; and
//! checks it works (carrier, management reachability) before any daemon starts.

use std::path::Path;
use std::time::Duration;

use super::net::{ip, ip_ns, sysctl_in, wait_carrier, wait_ping};
use super::plan::{Plan, CENTER_IP};

/// br_netfilter makes bridged frames traverse iptables; the lab turns that off in each of
/// its namespaces (the setting is per namespace) so no rule can drop guest traffic.
const BRIDGE_NF: [&str; 3] = [
    "net.bridge.bridge-nf-call-iptables=0",
    "net.bridge.bridge-nf-call-ip6tables=0",
    "net.bridge.bridge-nf-call-arptables=0",
];

/// The lab speaks IPv4 only: no router solicitations or DAD chatter on its bridges.
const NO_IPV6: [&str; 2] = [
    "net.ipv6.conf.all.disable_ipv6=1",
    "net.ipv6.conf.default.disable_ipv6=1",
];

/// Creates one namespace, with `lo` up and the lab's sysctls.
pub fn add_namespace(ns: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", ns])?;
    ip_ns(ns, &["link", "set", "lo", "up"])?;
    if Path::new("/proc/sys/net/ipv6").exists() {
        sysctl_in(ns, &NO_IPV6)?;
    }
    if Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        sysctl_in(ns, &BRIDGE_NF)?;
    }
    Ok(())
}

/// Creates bridges and veths in namespaces that already exist, then waits until every veth
/// has carrier and every host reaches the center's address.
pub fn build_links(plan: &Plan) -> anyhow::Result<()> {
    for (ns, br) in plan.bridges() {
        // STP off (the default) means no forwarding delay; no multicast snooping keeps the
        // switch a plain learning bridge.
        ip_ns(
            &ns,
            &["link", "add", &br, "type", "bridge", "mcast_snooping", "0"],
        )?;
        ip_ns(&ns, &["link", "set", &br, "up"])?;
    }
    let mut ends = Vec::new();
    for v in plan.veths() {
        let (f, i) = (&v.fabric, &v.inner);
        // Both ends are born in their namespaces: nothing passes through the root namespace.
        ip_ns(
            &f.namespace,
            &[
                "link",
                "add",
                &f.name,
                "type",
                "veth",
                "peer",
                "name",
                &i.name,
                "netns",
                &i.namespace,
            ],
        )?;
        for end in [f, i] {
            if let Some(master) = &end.master {
                ip_ns(
                    &end.namespace,
                    &["link", "set", &end.name, "master", master],
                )?;
            }
            if let Some(addr) = &end.address {
                ip_ns(&end.namespace, &["addr", "add", addr, "dev", &end.name])?;
            }
            ip_ns(&end.namespace, &["link", "set", &end.name, "up"])?;
            ends.push((end.namespace.clone(), end.name.clone()));
        }
    }
    wait_carrier(&ends, Duration::from_secs(15))?;
    for h in &plan.hosts {
        wait_ping(&h.namespace, CENTER_IP, Duration::from_secs(15))?;
    }
    Ok(())
}
