//! The lab's topology as plain data: namespace and interface names, addresses, which veth
//! plugs into which bridge. Built from the prefix and host count; `topology` executes it.

use anyhow::bail;

/// Management/migration network of center and hosts.
pub const MGMT_PREFIX_LEN: u8 = 24;
pub const CENTER_IP: &str = "10.77.0.2";
pub const CENTER_PORT: u16 = tern_api::CENTER_PORT;
/// The VM LAN: the client plays the VMs' users from here; VMs use 10.78.0.100 and up.
pub const CLIENT_IP: &str = "10.78.0.2";
pub const VM_PREFIX_LEN: u8 = 24;
/// The storage network (`lab up --san-luns`): the iSCSI target, and each host's `stor0`.
pub const SAN_IP: &str = "10.79.0.2";
pub const SAN_PORT: u16 = 3260;
pub const STORAGE_PREFIX_LEN: u8 = 24;
/// The lab SAN's target name.
pub const SAN_TARGET: &str = "iqn.2026-12.lab.tern:san";

/// Bridges of the fabric namespace, and each host's VM bridge.
pub const SWITCH_BRIDGE: &str = "sw0";
pub const MGMT_BRIDGE: &str = "mg0";
pub const STORAGE_BRIDGE: &str = "st0";
pub const HOST_BRIDGE: &str = "br0";
/// Interface names inside the center/host/client namespaces.
pub const MGMT_IF: &str = "mgmt0";
pub const UPLINK_IF: &str = "uplink0";
pub const CLIENT_IF: &str = "eth0";
pub const STORAGE_IF: &str = "stor0";

/// Cluster `lab up` creates and every agent joins.
pub const CLUSTER: &str = "lab";
/// Most hosts a lab can have (addresses 10.77.0.11 …).
pub const MAX_HOSTS: u32 = 64;
/// Longest prefix; namespace names are `<prefix>-center` and the like.
pub const MAX_PREFIX_LEN: usize = 24;
/// Linux's limit on interface names (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// One end of a veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethEnd {
    pub namespace: String,
    pub name: String,
    /// Bridge (in the same namespace) this end is a port of.
    pub master: Option<String>,
    /// `IP/LEN` given to this end.
    pub address: Option<String>,
}

/// A veth pair: `fabric` end in the fabric namespace, `inner` end in a lab namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veth {
    pub fabric: VethEnd,
    pub inner: VethEnd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    /// `h<i>`.
    pub name: String,
    pub index: u32,
    pub namespace: String,
    pub mgmt_ip: String,
    /// Management veth peer in the fabric namespace (where links are shaped and cut).
    pub fabric_mgmt_link: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub prefix: String,
    pub fabric: String,
    pub center: String,
    pub client: String,
    pub hosts: Vec<HostPlan>,
    /// The SAN's namespace (`<p>-san`), when the lab has one.
    pub san: Option<String>,
}

/// Checks a lab prefix: `[a-z0-9][a-z0-9-]*`, at most [`MAX_PREFIX_LEN`] characters.
pub fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !prefix.starts_with('-');
    if !ok {
        bail!(
            "lab prefix `{prefix}` must be 1–{MAX_PREFIX_LEN} characters of a-z, 0-9 and `-`, \
             not starting with `-`"
        );
    }
    Ok(())
}

/// Namespace names of a prefix: `<p>-fab`, `<p>-center`, `<p>-client`, `<p>-h<i>`.
pub fn namespace_belongs(prefix: &str, ns: &str) -> bool {
    let Some(rest) = ns.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    matches!(rest, "fab" | "center" | "client" | "san")
        || rest
            .strip_prefix('h')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

pub fn host_name(i: u32) -> String {
    format!("h{i}")
}

/// Storage-network address of host `i` (1-based).
pub fn host_storage_ip(i: u32) -> String {
    format!("10.79.0.{}", 10 + i)
}

/// Management address of host `i` (1-based).
pub fn host_ip(i: u32) -> String {
    format!("10.77.0.{}", 10 + i)
}

impl Plan {
    pub fn new(prefix: &str, hosts: u32) -> anyhow::Result<Plan> {
        check_prefix(prefix)?;
        if hosts == 0 || hosts > MAX_HOSTS {
            bail!("a lab has 1–{MAX_HOSTS} hosts, not {hosts}");
        }
        let plan = Plan {
            prefix: prefix.to_string(),
            fabric: format!("{prefix}-fab"),
            center: format!("{prefix}-center"),
            client: format!("{prefix}-client"),
            hosts: (1..=hosts)
                .map(|i| HostPlan {
                    name: host_name(i),
                    index: i,
                    namespace: format!("{prefix}-h{i}"),
                    mgmt_ip: host_ip(i),
                    fabric_mgmt_link: format!("h{i}-mg"),
                })
                .collect(),
            san: None,
        };
        for v in plan.veths() {
            for end in [&v.fabric, &v.inner] {
                if end.name.len() > MAX_IFNAME_LEN {
                    bail!("interface name {} is too long", end.name);
                }
            }
        }
        Ok(plan)
    }

    /// The same lab with a SAN: a storage namespace on a storage network of its own.
    pub fn with_san(mut self) -> Plan {
        self.san = Some(format!("{}-san", self.prefix));
        self
    }

    /// Every namespace, fabric first.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![
            self.fabric.clone(),
            self.center.clone(),
            self.client.clone(),
        ];
        v.extend(self.hosts.iter().map(|h| h.namespace.clone()));
        v.extend(self.san.clone());
        v
    }

    /// Every veth pair. Fabric-side names carry the role instead of the prefix: they live
    /// inside the fabric namespace, so they never clash with the root namespace's links.
    pub fn veths(&self) -> Vec<Veth> {
        let fab = |name: &str, master: &str| VethEnd {
            namespace: self.fabric.clone(),
            name: name.to_string(),
            master: Some(master.to_string()),
            address: None,
        };
        let mut v = vec![
            Veth {
                fabric: fab("center-mg", MGMT_BRIDGE),
                inner: VethEnd {
                    namespace: self.center.clone(),
                    name: MGMT_IF.into(),
                    master: None,
                    address: Some(format!("{CENTER_IP}/{MGMT_PREFIX_LEN}")),
                },
            },
            Veth {
                fabric: fab("client-sw", SWITCH_BRIDGE),
                inner: VethEnd {
                    namespace: self.client.clone(),
                    name: CLIENT_IF.into(),
                    master: None,
                    address: Some(format!("{CLIENT_IP}/{VM_PREFIX_LEN}")),
                },
            },
        ];
        for h in &self.hosts {
            v.push(Veth {
                fabric: fab(&h.fabric_mgmt_link, MGMT_BRIDGE),
                inner: VethEnd {
                    namespace: h.namespace.clone(),
                    name: MGMT_IF.into(),
                    master: None,
                    address: Some(format!("{}/{MGMT_PREFIX_LEN}", h.mgmt_ip)),
                },
            });
            v.push(Veth {
                fabric: fab(&format!("h{}-sw", h.index), SWITCH_BRIDGE),
                inner: VethEnd {
                    namespace: h.namespace.clone(),
                    name: UPLINK_IF.into(),
                    master: Some(HOST_BRIDGE.into()),
                    address: None,
                },
            });
        }
        if let Some(san) = &self.san {
            v.push(Veth {
                fabric: fab("san-st", STORAGE_BRIDGE),
                inner: VethEnd {
                    namespace: san.clone(),
                    name: STORAGE_IF.into(),
                    master: None,
                    address: Some(format!("{SAN_IP}/{STORAGE_PREFIX_LEN}")),
                },
            });
            for h in &self.hosts {
                v.push(Veth {
                    fabric: fab(&format!("h{}-st", h.index), STORAGE_BRIDGE),
                    inner: VethEnd {
                        namespace: h.namespace.clone(),
                        name: STORAGE_IF.into(),
                        master: None,
                        address: Some(format!("{}/{STORAGE_PREFIX_LEN}", host_storage_ip(h.index))),
                    },
                });
            }
        }
        v
    }

    /// Bridges to create: (namespace, name).
    pub fn bridges(&self) -> Vec<(String, String)> {
        let mut v = vec![
            (self.fabric.clone(), SWITCH_BRIDGE.to_string()),
            (self.fabric.clone(), MGMT_BRIDGE.to_string()),
        ];
        v.extend(
            self.hosts
                .iter()
                .map(|h| (h.namespace.clone(), HOST_BRIDGE.to_string())),
        );
        if self.san.is_some() {
            v.push((self.fabric.clone(), STORAGE_BRIDGE.to_string()));
        }
        v
    }

    pub fn center_url(&self) -> String {
        format!("https://{CENTER_IP}:{CENTER_PORT}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn prefixes() {
        assert!(check_prefix("tern").is_ok());
        assert!(check_prefix("t-1").is_ok());
        assert!(check_prefix("").is_err());
        assert!(check_prefix("-x").is_err());
        assert!(check_prefix("Tern").is_err());
        assert!(check_prefix("a/b").is_err());
        assert!(check_prefix(&"a".repeat(MAX_PREFIX_LEN + 1)).is_err());
    }

    #[test]
    fn interface_names_fit_and_are_unique_per_namespace() {
        let plan = Plan::new(&"p".repeat(MAX_PREFIX_LEN), MAX_HOSTS)
            .unwrap()
            .with_san();
        let mut seen = HashSet::new();
        for v in plan.veths() {
            for end in [&v.fabric, &v.inner] {
                assert!(end.name.len() <= MAX_IFNAME_LEN, "{} too long", end.name);
                assert!(seen.insert((end.namespace.clone(), end.name.clone())));
            }
        }
        for (ns, b) in plan.bridges() {
            assert!(seen.insert((ns, b)));
        }
        let ns = plan.namespaces();
        assert_eq!(ns.len(), 4 + MAX_HOSTS as usize);
        assert!(ns.iter().all(|n| namespace_belongs(&plan.prefix, n)));
    }

    #[test]
    fn addresses() {
        let plan = Plan::new("tern", 2).unwrap();
        assert_eq!(plan.hosts[1].mgmt_ip, "10.77.0.12");
        assert_eq!(plan.hosts[1].namespace, "tern-h2");
        assert_eq!(plan.center_url(), "https://10.77.0.2:8700");
        assert!(Plan::new("tern", 0).is_err());
        assert!(Plan::new("tern", MAX_HOSTS + 1).is_err());
    }

    #[test]
    fn namespaces_of_a_prefix() {
        assert!(namespace_belongs("tern", "tern-h12"));
        assert!(namespace_belongs("tern", "tern-fab"));
        assert!(!namespace_belongs("tern", "tern-hx"));
        assert!(!namespace_belongs("tern", "tern-h"));
        assert!(!namespace_belongs("tern", "ternx-fab"));
        assert!(!namespace_belongs("te", "tern-fab"));
    }
}
