//! Cluster EVC rules: may a host join a cluster, which modes a set of hosts supports, and
//! changing a cluster's mode.
//!
//! A cluster's mode is a catalogue baseline (or none). Rules:
//! - a host joins only if it can offer the mode, and only if its guests would see the same
//!   vendor as the cluster's other hosts' (Intel and AMD never mix; TCG hosts emulate any vendor);
//! - a mode can be set only if every host offers it;
//! - raising the mode is allowed: powered-on VMs keep the features they started with until they
//!   are powered off and on again ([`ModeChange::vms_keep_features_until_power_cycle`]);
//! - lowering it (or moving sideways) is refused while a powered-on VM uses a feature the new
//!   mode lacks; the refusal names each such VM and its features.

use serde::{Deserialize, Serialize};

use crate::catalogue::{catalogue, Baseline, Vendor};
use crate::error::{CpuError, HostMissing, VmExtra};
use crate::feature::FeatureSet;
use crate::host::HostCapability;

/// A host of a cluster, by name.
#[derive(Debug, Clone, Copy)]
pub struct ClusterHost<'a> {
    pub name: &'a str,
    pub capability: &'a HostCapability,
}

/// A powered-on VM of a cluster and the features it runs with (recorded at power-on).
#[derive(Debug, Clone, Copy)]
pub struct PoweredOnVm<'a> {
    pub name: &'a str,
    pub features: &'a FeatureSet,
    /// True when the VM takes its CPU from the cluster's mode (no model of its own), so a mode
    /// change reaches it at its next power cycle.
    pub follows_cluster_mode: bool,
}

/// May `host` (named `name`) join a cluster with `mode` whose current hosts are `members`?
/// The error names the missing features, or the vendor clash.
pub fn check_join(
    name: &str,
    host: &HostCapability,
    mode: Option<&Baseline>,
    members: &[ClusterHost<'_>],
) -> Result<(), CpuError> {
    if let Some(vendor) = host.guest_vendor() {
        let clash = members
            .iter()
            .filter(|m| m.name != name)
            .find_map(|m| m.capability.guest_vendor().filter(|v| *v != vendor));
        if let Some(other) = clash {
            return Err(CpuError::VendorMismatch {
                subject: format!("host {name}"),
                found: vendor.to_string(),
                required: format!("{other} like the cluster's other hosts"),
            });
        }
    }
    match mode {
        Some(mode) => host.check(name, mode),
        None => Ok(()),
    }
}

/// The vendor the guests of `hosts` see, if all KVM hosts agree; `Err` with both vendors if not.
pub fn cluster_vendor<'a>(
    hosts: &[&'a HostCapability],
) -> Result<Option<&'a Vendor>, (Vendor, Vendor)> {
    let mut found: Option<&Vendor> = None;
    for v in hosts.iter().filter_map(|h| h.guest_vendor()) {
        match found {
            Some(f) if f != v => return Err((f.clone(), v.clone())),
            _ => found = Some(v),
        }
    }
    Ok(found)
}

/// The catalogue baselines every one of `hosts` supports, in catalogue order. When the hosts'
/// guest vendors differ, only vendor-neutral levels can be in it.
pub fn common_modes(hosts: &[&HostCapability]) -> Vec<&'static Baseline> {
    catalogue()
        .all()
        .iter()
        .filter(|b| hosts.iter().all(|h| h.supports(b)))
        .collect()
}

/// The best mode every one of `hosts` supports (see [`crate::Catalogue::best`]).
pub fn best_common_mode(hosts: &[&HostCapability]) -> Option<&'static Baseline> {
    catalogue().best(&common_modes(hosts))
}

/// Which way a mode change goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeChangeKind {
    Unchanged,
    /// From no mode to a mode.
    Set,
    /// To no mode.
    Clear,
    /// The new mode contains the old one.
    Raise,
    /// The old mode contains the new one.
    Lower,
    /// Neither contains the other.
    Sideways,
}

/// An allowed mode change and what it means for running VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeChange {
    pub kind: ModeChangeKind,
    pub from: Option<String>,
    pub to: Option<String>,
    /// Powered-on VMs that follow the cluster's mode and keep their current features until they
    /// are powered off and on again (a reboot inside the guest is not enough: QEMU's CPU stays).
    pub vms_keep_features_until_power_cycle: Vec<String>,
}

/// Checks changing a cluster's mode from `current` to `new`, given its hosts and powered-on VMs.
pub fn plan_mode_change(
    current: Option<&Baseline>,
    new: Option<&Baseline>,
    hosts: &[ClusterHost<'_>],
    vms: &[PoweredOnVm<'_>],
) -> Result<ModeChange, CpuError> {
    let name = |b: Option<&Baseline>| b.map(|b| b.name.clone());
    let Some(new_mode) = new else {
        // Without a mode nothing restricts VMs; they keep what they run with.
        let kind = if current.is_some() {
            ModeChangeKind::Clear
        } else {
            ModeChangeKind::Unchanged
        };
        return Ok(ModeChange {
            kind,
            from: name(current),
            to: None,
            vms_keep_features_until_power_cycle: Vec::new(),
        });
    };

    let lacking: Vec<HostMissing> = hosts
        .iter()
        .filter_map(|h| match h.capability.check(h.name, new_mode) {
            Ok(()) => None,
            Err(CpuError::MissingFeatures { missing, .. }) => Some(HostMissing {
                host: h.name.to_string(),
                missing,
            }),
            Err(_) => Some(HostMissing {
                host: h.name.to_string(),
                missing: vec![format!(
                    "vendor {}",
                    new_mode
                        .vendor
                        .as_ref()
                        .map(|v| v.to_string())
                        .unwrap_or_default()
                )],
            }),
        })
        .collect();
    if !lacking.is_empty() {
        return Err(CpuError::HostsLackMode {
            mode: new_mode.name.clone(),
            hosts: lacking,
        });
    }

    let above: Vec<VmExtra> = vms
        .iter()
        .filter_map(|vm| {
            let extra = vm.features.missing_in(&new_mode.features);
            (!extra.is_empty()).then(|| VmExtra {
                vm: vm.name.to_string(),
                features: extra,
            })
        })
        .collect();
    if !above.is_empty() {
        return Err(CpuError::VmsAboveMode {
            mode: new_mode.name.clone(),
            vms: above,
        });
    }

    let kind = match current {
        None => ModeChangeKind::Set,
        Some(cur) if cur.features == new_mode.features => ModeChangeKind::Unchanged,
        Some(cur) if cur.features.is_subset(&new_mode.features) => ModeChangeKind::Raise,
        Some(cur) if cur.features.is_superset(&new_mode.features) => ModeChangeKind::Lower,
        Some(_) => ModeChangeKind::Sideways,
    };
    let pending = vms
        .iter()
        .filter(|vm| vm.follows_cluster_mode && *vm.features != new_mode.features)
        .map(|vm| vm.name.to_string())
        .collect();
    Ok(ModeChange {
        kind,
        from: name(current),
        to: name(Some(new_mode)),
        vms_keep_features_until_power_cycle: pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{Accel, CpuIdentity};

    fn cap(vendor: Vendor, model: &str, accel: Accel) -> HostCapability {
        let identity = CpuIdentity {
            vendor: Some(vendor),
            ..CpuIdentity::default()
        };
        let features = catalogue().get(model).unwrap().features.clone();
        HostCapability::from_features(accel, identity, features, None).unwrap()
    }

    fn mode(name: &str) -> &'static Baseline {
        catalogue().get(name).unwrap()
    }

    #[test]
    fn join_names_missing_features() {
        let old = cap(Vendor::Intel, "IvyBridge", Accel::Kvm);
        let err = check_join("h3", &old, Some(mode("Haswell")), &[]).unwrap_err();
        match &err {
            CpuError::MissingFeatures {
                subject,
                target,
                missing,
            } => {
                assert_eq!(subject, "host h3");
                assert_eq!(target, "Haswell");
                for f in ["avx2", "bmi1", "bmi2", "fma", "movbe", "invpcid"] {
                    assert!(missing.iter().any(|m| m == f), "{f} not in {missing:?}");
                }
                assert!(!missing.iter().any(|m| m == "avx"), "IvyBridge has avx");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().contains("avx2"));
        assert!(check_join("h3", &old, Some(mode("SandyBridge")), &[]).is_ok());
        assert!(check_join("h3", &old, None, &[]).is_ok());
    }

    #[test]
    fn join_refuses_the_other_vendor() {
        let intel = cap(Vendor::Intel, "Skylake-Server", Accel::Kvm);
        let amd = cap(Vendor::Amd, "EPYC-Genoa", Accel::Kvm);
        let members = [ClusterHost {
            name: "h1",
            capability: &intel,
        }];
        // Even under a vendor-neutral level the guests' vendor would change on migration.
        let err = check_join("h2", &amd, Some(mode("x86-64-v2")), &members).unwrap_err();
        assert!(matches!(err, CpuError::VendorMismatch { .. }), "{err}");
        let err = check_join("h2", &amd, Some(mode("Nehalem")), &[]).unwrap_err();
        assert!(matches!(err, CpuError::VendorMismatch { .. }), "{err}");
        // TCG hosts emulate any vendor.
        let tcg = cap(Vendor::Amd, "Westmere", Accel::Tcg);
        assert!(check_join("h4", &tcg, Some(mode("Nehalem")), &members).is_ok());
        assert!(cluster_vendor(&[&intel, &amd]).is_err());
        assert_eq!(cluster_vendor(&[&intel, &tcg]), Ok(Some(&Vendor::Intel)));
    }

    #[test]
    fn best_common_mode_is_in_both_hosts() {
        let pairs = [
            ("Haswell", "Skylake-Server", "Haswell"),
            ("SapphireRapids", "Icelake-Server", "Icelake-Server"),
            ("EPYC-Rome", "EPYC-Milan", "EPYC-Rome"),
        ];
        for (a, b, want) in pairs {
            let vendor = mode(a).vendor.clone().unwrap();
            let (ha, hb) = (
                cap(vendor.clone(), a, Accel::Kvm),
                cap(vendor, b, Accel::Kvm),
            );
            let best = best_common_mode(&[&ha, &hb]).unwrap();
            assert_eq!(best.name, want);
            assert!(best.features.is_subset(&ha.features) && best.features.is_subset(&hb.features));
            for m in common_modes(&[&ha, &hb]) {
                assert!(ha.supports(m) && hb.supports(m));
            }
        }
        // An Intel and an AMD host share only vendor-neutral levels.
        let intel = cap(Vendor::Intel, "SapphireRapids", Accel::Kvm);
        let amd = cap(Vendor::Amd, "EPYC-Genoa", Accel::Kvm);
        let common = common_modes(&[&intel, &amd]);
        assert!(common.iter().all(|b| b.vendor.is_none()));
        assert_eq!(best_common_mode(&[&intel, &amd]).unwrap().name, "x86-64-v4");
    }

    #[test]
    fn raising_keeps_running_vms_until_power_cycle() {
        let h = cap(Vendor::Intel, "Skylake-Server", Accel::Kvm);
        let hosts = [ClusterHost {
            name: "h1",
            capability: &h,
        }];
        let old = &mode("Haswell").features;
        let vms = [
            PoweredOnVm {
                name: "web",
                features: old,
                follows_cluster_mode: true,
            },
            PoweredOnVm {
                name: "db",
                features: &mode("Nehalem").features,
                follows_cluster_mode: false,
            },
        ];
        let plan = plan_mode_change(
            Some(mode("Haswell")),
            Some(mode("Skylake-Server")),
            &hosts,
            &vms,
        )
        .unwrap();
        assert_eq!(plan.kind, ModeChangeKind::Raise);
        assert_eq!(plan.vms_keep_features_until_power_cycle, vec!["web"]);
        // Raising above what a host offers is refused, naming host and features.
        let err = plan_mode_change(
            Some(mode("Haswell")),
            Some(mode("Icelake-Server")),
            &hosts,
            &vms,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("host h1") && msg.contains("avx512vbmi"),
            "{msg}"
        );
    }

    #[test]
    fn lowering_is_refused_while_vms_use_features_above() {
        let h = cap(Vendor::Intel, "Skylake-Server", Accel::Kvm);
        let hosts = [ClusterHost {
            name: "h1",
            capability: &h,
        }];
        let haswell = &mode("Haswell").features;
        let vms = [
            PoweredOnVm {
                name: "web",
                features: haswell,
                follows_cluster_mode: true,
            },
            PoweredOnVm {
                name: "old",
                features: &mode("Westmere").features,
                follows_cluster_mode: false,
            },
        ];
        let err = plan_mode_change(
            Some(mode("Haswell")),
            Some(mode("SandyBridge")),
            &hosts,
            &vms,
        )
        .unwrap_err();
        match &err {
            CpuError::VmsAboveMode { mode, vms } => {
                assert_eq!(mode, "SandyBridge");
                assert_eq!(vms.len(), 1);
                assert_eq!(vms[0].vm, "web");
                assert!(vms[0].features.iter().any(|f| f == "avx2"));
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().contains("VM web uses"));
        // Once web is off, lowering is fine.
        let plan = plan_mode_change(
            Some(mode("Haswell")),
            Some(mode("SandyBridge")),
            &hosts,
            &vms[1..],
        )
        .unwrap();
        assert_eq!(plan.kind, ModeChangeKind::Lower);
        // Clearing the mode is always allowed.
        let plan = plan_mode_change(Some(mode("Haswell")), None, &hosts, &vms).unwrap();
        assert_eq!(plan.kind, ModeChangeKind::Clear);
    }

    #[test]
    fn sideways_change_is_checked_like_lowering() {
        let h = cap(Vendor::Intel, "Haswell", Accel::Kvm);
        let hosts = [ClusterHost {
            name: "h1",
            capability: &h,
        }];
        let vms = [PoweredOnVm {
            name: "app",
            features: &mode("IvyBridge").features,
            follows_cluster_mode: true,
        }];
        // IvyBridge has aes, x86-64-v3 has avx2: neither contains the other.
        let err = plan_mode_change(
            Some(mode("IvyBridge")),
            Some(mode("x86-64-v3")),
            &hosts,
            &vms,
        )
        .unwrap_err();
        assert!(err.to_string().contains("VM app uses aes"), "{err}");
        let plan = plan_mode_change(
            Some(mode("IvyBridge")),
            Some(mode("x86-64-v3")),
            &hosts,
            &[],
        )
        .unwrap();
        assert_eq!(plan.kind, ModeChangeKind::Sideways);
        let plan = plan_mode_change(None, Some(mode("Haswell")), &hosts, &[]).unwrap();
        assert_eq!(plan.kind, ModeChangeKind::Set);
    }
}
