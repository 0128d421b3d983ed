//! Migration CPU pre-check: can a destination host run a VM's recorded CPU?
//!
//! The destination's capability must contain every feature the VM runs with, its guests must
//! see the same vendor (KVM), and it must use the same accelerator. A host-passthrough VM needs
//! an identical CPU: same identity, same features before and after the ceiling.

use crate::error::CpuError;
use crate::host::HostCapability;
use crate::vm::{VmCpu, VmCpuKind};

/// Checks that `dest` (named `dest_name`) can receive a VM running with `vm`; the error names
/// the missing features or the difference.
pub fn precheck(vm: &VmCpu, dest_name: &str, dest: &HostCapability) -> Result<(), CpuError> {
    if vm.accel != dest.accel {
        return Err(CpuError::AccelMismatch {
            host: format!("host {dest_name}"),
            vm: vm.accel.to_string(),
            dest: dest.accel.to_string(),
        });
    }
    if vm.kind == VmCpuKind::HostPassthrough {
        let mut differences = Vec::new();
        match &vm.passthrough_source {
            Some(src) => {
                let (a, b) = (&src.identity, &dest.identity);
                if a != b {
                    differences.push(format!(
                        "CPU {} family {} model {} stepping {} ({}) vs {} family {} model {} \
                         stepping {} ({})",
                        vendor_name(a.vendor.as_ref()),
                        a.family,
                        a.model,
                        a.stepping,
                        a.model_id,
                        vendor_name(b.vendor.as_ref()),
                        b.family,
                        b.model,
                        b.stepping,
                        b.model_id
                    ));
                }
                let lacks = src.uncapped.missing_in(&dest.uncapped);
                let adds = dest.uncapped.missing_in(&src.uncapped);
                if !lacks.is_empty() {
                    differences.push(format!("lacks {}", lacks.join(" ")));
                }
                if !adds.is_empty() {
                    differences.push(format!("adds {}", adds.join(" ")));
                }
            }
            None => differences.push("the VM's record has no source CPU".to_string()),
        }
        if dest.features != vm.features {
            differences.push(format!(
                "offers {} features, the VM runs with {}",
                dest.features.len(),
                vm.features.len()
            ));
        }
        return if differences.is_empty() {
            Ok(())
        } else {
            Err(CpuError::PassthroughNotIdentical {
                host: format!("host {dest_name}"),
                differences,
            })
        };
    }
    if let Some(want) = &vm.guest_vendor {
        if dest.guest_vendor() != Some(want) {
            return Err(CpuError::VendorMismatch {
                subject: format!("host {dest_name}"),
                found: vendor_name(dest.guest_vendor()),
                required: format!("{want}, the vendor the VM's guest sees"),
            });
        }
    }
    let missing = vm.features.missing_in(&dest.features);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CpuError::MissingFeatures {
            subject: format!("host {dest_name}"),
            target: format!("the VM's CPU ({})", vm.model),
            missing,
        })
    }
}

/// What a host offers a VM's CPU, as tokens a scheduler can match by set inclusion (the DRS
/// engine's CPU fit): the features guests can be given, the accelerator, the vendor guests
/// see, and a digest of the whole CPU (what a host-passthrough VM must find again).
/// [`precheck`] passes exactly when [`vm_fit_tokens`] ⊆ these.
pub fn host_fit_tokens(host: &HostCapability) -> Vec<String> {
    let mut out: Vec<String> = host.features.iter().map(str::to_string).collect();
    out.push(format!("accel:{}", host.accel));
    if let Some(v) = host.guest_vendor() {
        out.push(format!("vendor:{}", v.cpuid()));
    }
    out.push(passthrough_token(
        &host.identity,
        &host.uncapped,
        &host.features,
    ));
    out
}

/// What a VM's CPU needs from a host, as tokens (see [`host_fit_tokens`]).
pub fn vm_fit_tokens(vm: &VmCpu) -> Vec<String> {
    let mut out = vec![format!("accel:{}", vm.accel)];
    if vm.kind == VmCpuKind::HostPassthrough {
        match &vm.passthrough_source {
            Some(src) => out.push(passthrough_token(
                &src.identity,
                &src.uncapped,
                &vm.features,
            )),
            // No record of the source: no host matches (as `precheck` refuses every one).
            None => out.push("passthrough:unknown-source".to_string()),
        }
        return out;
    }
    out.extend(vm.features.iter().map(str::to_string));
    if let Some(v) = &vm.guest_vendor {
        out.push(format!("vendor:{}", v.cpuid()));
    }
    out
}

/// One token for a whole CPU: identity, features before and after the ceiling.
fn passthrough_token(
    identity: &crate::host::CpuIdentity,
    uncapped: &crate::FeatureSet,
    features: &crate::FeatureSet,
) -> String {
    use sha2::{Digest, Sha256};
    let text = serde_json::to_string(&(identity, uncapped, features)).unwrap_or_default();
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("passthrough:{hex}")
}

fn vendor_name(v: Option<&crate::Vendor>) -> String {
    v.map(|v| v.to_string())
        .unwrap_or_else(|| "unknown vendor".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::{catalogue, Vendor};
    use crate::host::{Accel, CpuIdentity};
    use crate::vm::{resolve, CpuRequest};

    fn host(vendor: Vendor, model: &str, accel: Accel, stepping: u32) -> HostCapability {
        let identity = CpuIdentity {
            vendor: Some(vendor),
            family: 6,
            model: 63,
            stepping,
            model_id: "test".into(),
        };
        let features = catalogue().get(model).unwrap().features.clone();
        HostCapability::from_features(accel, identity, features, None).unwrap()
    }

    #[test]
    fn destination_must_contain_the_vm_features() {
        let src = host(Vendor::Intel, "Skylake-Server", Accel::Kvm, 4);
        let vm = resolve(&CpuRequest::Named("Haswell".into()), None, "h1", &src).unwrap();
        assert!(precheck(&vm, "h2", &host(Vendor::Intel, "Broadwell", Accel::Kvm, 1)).is_ok());
        let err =
            precheck(&vm, "h3", &host(Vendor::Intel, "IvyBridge", Accel::Kvm, 1)).unwrap_err();
        match &err {
            CpuError::MissingFeatures {
                subject, missing, ..
            } => {
                assert_eq!(subject, "host h3");
                assert!(missing.iter().any(|f| f == "avx2"), "{missing:?}");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().contains("Haswell"));
        // Guests see the host's vendor under KVM: never across vendors.
        let level = resolve(&CpuRequest::Named("x86-64-v2".into()), None, "h1", &src).unwrap();
        let amd = host(Vendor::Amd, "EPYC", Accel::Kvm, 1);
        assert!(matches!(
            precheck(&level, "h4", &amd),
            Err(CpuError::VendorMismatch { .. })
        ));
        let tcg = host(Vendor::Amd, "EPYC", Accel::Tcg, 1);
        assert!(matches!(
            precheck(&level, "h5", &tcg),
            Err(CpuError::AccelMismatch { .. })
        ));
    }

    #[test]
    fn passthrough_needs_an_identical_cpu() {
        let src = host(Vendor::Intel, "Haswell", Accel::Kvm, 2);
        let vm = resolve(&CpuRequest::HostPassthrough, None, "h1", &src).unwrap();
        assert!(precheck(&vm, "h2", &src.clone()).is_ok());
        let err = precheck(&vm, "h3", &host(Vendor::Intel, "Haswell", Accel::Kvm, 3)).unwrap_err();
        assert!(err.to_string().contains("stepping 2"), "{err}");
        let err =
            precheck(&vm, "h4", &host(Vendor::Intel, "Broadwell", Accel::Kvm, 2)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("adds") && msg.contains("adx"), "{msg}");
    }

    /// The scheduler's token match and the migration pre-check agree on every pair of a grid
    /// of hosts (vendors, accelerators, generations, steppings) and VM CPUs resolved on them
    /// (named baselines, psABI levels, host-passthrough).
    #[test]
    fn fit_tokens_agree_with_the_precheck() {
        let mut hosts = Vec::new();
        for (vendor, models) in [
            (
                Vendor::Intel,
                &["IvyBridge", "Haswell", "Broadwell", "Skylake-Server"][..],
            ),
            (Vendor::Amd, &["EPYC", "EPYC-Rome"][..]),
        ] {
            for model in models {
                for accel in [Accel::Kvm, Accel::Tcg] {
                    for stepping in [1, 2] {
                        hosts.push(host(vendor.clone(), model, accel, stepping));
                    }
                }
            }
        }
        let requests = [
            CpuRequest::Named("IvyBridge".into()),
            CpuRequest::Named("Haswell".into()),
            CpuRequest::Named("x86-64-v2".into()),
            CpuRequest::Named("x86-64-v3".into()),
            CpuRequest::HostPassthrough,
        ];
        let (mut agree_ok, mut agree_refused) = (0, 0);
        for src in &hosts {
            for req in &requests {
                let Ok(vm) = resolve(req, None, "src", src) else {
                    continue;
                };
                let needed = vm_fit_tokens(&vm);
                for dest in &hosts {
                    let offered = host_fit_tokens(dest);
                    let fits = needed.iter().all(|t| offered.contains(t));
                    let ok = precheck(&vm, "d", dest).is_ok();
                    assert_eq!(
                        fits, ok,
                        "{req:?} from {:?} to {:?}",
                        src.identity, dest.identity
                    );
                    if ok {
                        agree_ok += 1;
                    } else {
                        agree_refused += 1;
                    }
                }
            }
        }
        // Both outcomes occur, so the agreement means something.
        assert!(
            agree_ok > 50 && agree_refused > 50,
            "{agree_ok} {agree_refused}"
        );
    }
}
