//! Faults of lab hosts: on the management/migration link (shape, cut, restore) and in the
//! hardware the agents' health counters stand for (memory errors).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use super::{absolute, load, net, plan};

/// Link faults on a host's management link (`h<i>-mg` in the fabric namespace, and the
/// host's own `mgmt0` so both directions are affected).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinkFault {
    /// Rate limit and one-way delay, each direction.
    Shape { rate_mbit: u32, delay_ms: u32 },
    /// Remove shaping.
    Unshape,
    /// Take the link down (carrier lost on both ends).
    Cut,
    /// Bring a cut link back and wait for carrier.
    Restore,
}

pub fn link(dir: &Path, host: &str, fault: LinkFault) -> anyhow::Result<()> {
    let st = load(&absolute(dir)?)?;
    let h = st.host(host).with_context(|| {
        format!(
            "the lab has no host `{host}` (it has {})",
            st.hosts
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let ends = [
        (st.fabric_namespace.as_str(), h.fabric_mgmt_link.as_str()),
        (h.namespace.as_str(), plan::MGMT_IF),
    ];
    match fault {
        LinkFault::Shape {
            rate_mbit,
            delay_ms,
        } => {
            if rate_mbit == 0 {
                bail!("--rate-mbit must be above 0 (use `link cut` to cut a link)");
            }
            let rate = format!("{rate_mbit}mbit");
            for (ns, dev) in ends {
                let mut args: Vec<String> = ["-n", ns, "qdisc", "replace", "dev", dev, "root"]
                    .map(String::from)
                    .to_vec();
                if delay_ms == 0 {
                    // A token bucket: rate with a 4 ms burst (at least 32 KiB) and 100 ms of
                    // queue; available on every kernel with traffic control.
                    let burst = (u64::from(rate_mbit) * 1_000_000 / 8 / 250).max(32 * 1024);
                    args.extend(
                        [
                            "tbf",
                            "rate",
                            &rate,
                            "burst",
                            &burst.to_string(),
                            "latency",
                            "100ms",
                        ]
                        .map(String::from),
                    );
                } else {
                    // netem adds the delay; its queue holds twice the bandwidth-delay product.
                    let bdp_packets =
                        u64::from(rate_mbit) * 1_000_000 / 8 * u64::from(delay_ms) / 1000 / 1500;
                    let limit = (bdp_packets * 2 + 100).max(1000).to_string();
                    let delay = format!("{delay_ms}ms");
                    args.extend(
                        ["netem", "rate", &rate, "delay", &delay, "limit", &limit]
                            .map(String::from),
                    );
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                net::run("tc", &args).map_err(|e| {
                    if delay_ms > 0 && format!("{e:#}").contains("unknown") {
                        e.context(
                            "this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM), so links \
                             cannot be delayed here; shape the rate alone (no --delay-ms)",
                        )
                    } else {
                        e
                    }
                })?;
            }
        }
        LinkFault::Unshape => {
            for (ns, dev) in ends {
                // Deleting the root qdisc of an unshaped link fails; that is fine.
                if let Err(e) = net::run("tc", &["-n", ns, "qdisc", "del", "dev", dev, "root"]) {
                    tracing::debug!("unshape {ns}/{dev}: {e:#}");
                }
            }
        }
        LinkFault::Cut => {
            net::ip_ns(ends[0].0, &["link", "set", ends[0].1, "down"])?;
        }
        LinkFault::Restore => {
            net::ip_ns(ends[0].0, &["link", "set", ends[0].1, "up"])?;
            let links: Vec<(String, String)> = ends
                .iter()
                .map(|(ns, d)| (ns.to_string(), d.to_string()))
                .collect();
            net::wait_carrier(&links, Duration::from_secs(15))?;
            // Addresses that failed to resolve while the link was down stay FAILED for a
            // while: forget them on both sides so traffic flows at once.
            net::ip_ns(&h.namespace, &["neigh", "flush", "dev", plan::MGMT_IF])?;
            let peers = std::iter::once(&st.center_namespace).chain(
                st.hosts
                    .iter()
                    .filter(|o| o.name != h.name)
                    .map(|o| &o.namespace),
            );
            for ns in peers {
                net::ip_ns(
                    ns,
                    &["neigh", "flush", "to", &h.mgmt_ip, "dev", plan::MGMT_IF],
                )?;
            }
        }
    }
    Ok(())
}

/// Sets a lab host's fake EDAC memory-error counters (the agent reports them with its next
/// heartbeat). A value not given keeps its count.
pub fn memory_errors(
    dir: &Path,
    host: &str,
    corrected: Option<u64>,
    uncorrected: Option<u64>,
) -> anyhow::Result<()> {
    let st = load(&absolute(dir)?)?;
    let h = st
        .host(host)
        .with_context(|| format!("the lab has no host `{host}`"))?;
    let mc = super::daemons::edac_dir(&h.state_dir);
    for (file, value) in [("ce_count", corrected), ("ue_count", uncorrected)] {
        if let Some(v) = value {
            let path = mc.join(file);
            // Written whole then renamed: the agent never reads half a number.
            let tmp = mc.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, format!("{v}\n"))
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("replacing {}", path.display()))?;
        }
    }
    Ok(())
}
