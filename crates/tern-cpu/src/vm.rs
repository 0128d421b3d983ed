//! Per-VM CPU: resolving what a VM asks for into the exact features it runs with (recorded in
//! its spec) and QEMU's `-cpu` argument.
//!
//! A VM asks for one of:
//! - nothing: the cluster's EVC mode, or [`DEFAULT_BASELINE`] when the cluster has none;
//! - a catalogue model by name: it must fit inside the cluster's mode;
//! - `host-passthrough` (also spelt `host` or `max`): the host's whole capability, refused in a
//!   cluster with a mode, and migratable only to a host with an identical CPU.
//!
//! The `-cpu` argument ([`qemu_cpu_arg`]) names a QEMU model, then `+feat`/`-feat` for each
//! feature where the wanted set differs from what that model gives by itself (so the guest gets
//! exactly the recorded set, e.g. a psABI level built on `qemu64-v1`), then `enforce`: without
//! it QEMU only warns about a feature the host cannot provide and starts the guest without it,
//! so the VM would run with less than its record says and could later crash on a host that
//! honours the record. With `enforce` QEMU refuses to start instead. Named vendor models are
//! passed in their versioned form (`Haswell-v1`), so the meaning does not depend on the machine
//! type's default version. QEMU still adds what the accelerator always adds (under KVM: the
//! paravirtual `kvm-*` leaves and `vme`; TCG removes `vme`); those are the same on every host
//! with the same accelerator and QEMU version, so the record leaves them out.
//! Host-passthrough uses `host` (KVM) or `max` (TCG) with `-feat` for what a ceiling removes,
//! and no `enforce` (there is nothing fixed to enforce).

use serde::{Deserialize, Serialize};

use crate::catalogue::{catalogue, Baseline, Vendor};
use crate::error::CpuError;
use crate::feature::FeatureSet;
use crate::host::{Accel, CpuIdentity, HostCapability};

/// The baseline of a VM that names no model in a cluster without a mode: supported by every
/// x86-64 CPU of the last fifteen years, and by TCG.
pub const DEFAULT_BASELINE: &str = "x86-64-v2";

/// The model name that asks for the host's whole CPU.
pub const HOST_PASSTHROUGH: &str = "host-passthrough";

/// What a VM spec asks for (`VmSpec::cpu_model`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuRequest {
    ClusterDefault,
    Named(String),
    HostPassthrough,
}

impl CpuRequest {
    /// From a VM spec's `cpu_model` (`None` = the cluster's default).
    pub fn from_spec(cpu_model: Option<&str>) -> CpuRequest {
        match cpu_model.map(str::trim) {
            None | Some("") => CpuRequest::ClusterDefault,
            Some(m)
                if m.eq_ignore_ascii_case(HOST_PASSTHROUGH)
                    || m.eq_ignore_ascii_case("host")
                    || m.eq_ignore_ascii_case("max") =>
            {
                CpuRequest::HostPassthrough
            }
            Some(m) => CpuRequest::Named(m.to_string()),
        }
    }
}

/// How a VM's CPU was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmCpuKind {
    /// The cluster's EVC mode.
    ClusterMode,
    /// [`DEFAULT_BASELINE`]: no mode and no model.
    Default,
    /// A model the VM names.
    Named,
    HostPassthrough,
}

/// The CPU a VM runs with: recorded when it powers on, checked before every migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCpu {
    pub kind: VmCpuKind,
    /// Baseline name, or `host-passthrough`.
    pub model: String,
    /// The exact features the guest sees (besides the accelerator's fixed additions).
    pub features: FeatureSet,
    /// QEMU's `-cpu` argument; the same on the migration destination.
    pub qemu_cpu: String,
    pub accel: Accel,
    /// The vendor the guest sees when the host fixes it (KVM); `None` under TCG, where it is
    /// the model's own and the same everywhere.
    pub guest_vendor: Option<Vendor>,
    /// Host-passthrough only: the source host's capability, which a destination must equal.
    pub passthrough_source: Option<PassthroughSource>,
}

/// What a host-passthrough VM saw of its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassthroughSource {
    pub identity: CpuIdentity,
    /// The host's features before its ceiling (the `-feat` flags remove the rest).
    pub uncapped: FeatureSet,
}

/// Resolves a VM's CPU request on host `host_name` with capability `host`, in a cluster with
/// `cluster_mode`. Fails, naming the features, when the host cannot run it or it does not fit
/// the mode.
pub fn resolve(
    request: &CpuRequest,
    cluster_mode: Option<&Baseline>,
    host_name: &str,
    host: &HostCapability,
) -> Result<VmCpu, CpuError> {
    let (kind, baseline) = match request {
        CpuRequest::HostPassthrough => {
            if let Some(mode) = cluster_mode {
                return Err(CpuError::PassthroughWithMode {
                    mode: mode.name.clone(),
                });
            }
            let model = host.accel.passthrough_model();
            return Ok(VmCpu {
                kind: VmCpuKind::HostPassthrough,
                model: HOST_PASSTHROUGH.to_string(),
                features: host.features.clone(),
                qemu_cpu: qemu_cpu_arg(model, &host.uncapped, &host.features, false),
                accel: host.accel,
                guest_vendor: host.guest_vendor().cloned(),
                passthrough_source: Some(PassthroughSource {
                    identity: host.identity.clone(),
                    uncapped: host.uncapped.clone(),
                }),
            });
        }
        CpuRequest::ClusterDefault => match cluster_mode {
            Some(mode) => (VmCpuKind::ClusterMode, mode),
            None => (VmCpuKind::Default, catalogue().require(DEFAULT_BASELINE)?),
        },
        CpuRequest::Named(name) => {
            let b = catalogue().require(name)?;
            if let Some(mode) = cluster_mode {
                if let (Some(bv), Some(mv)) = (&b.vendor, &mode.vendor) {
                    if bv != mv {
                        return Err(CpuError::VendorMismatch {
                            subject: format!("CPU model {}", b.name),
                            found: bv.to_string(),
                            required: format!("{mv} (EVC mode {})", mode.name),
                        });
                    }
                }
                let extra = b.features.missing_in(&mode.features);
                if !extra.is_empty() {
                    return Err(CpuError::ModelAboveMode {
                        model: b.name.clone(),
                        mode: mode.name.clone(),
                        extra,
                    });
                }
            }
            (VmCpuKind::Named, b)
        }
    };
    host.check(host_name, baseline)?;
    Ok(VmCpu {
        kind,
        model: baseline.name.clone(),
        features: baseline.features.clone(),
        qemu_cpu: baseline.qemu_cpu_arg(),
        accel: host.accel,
        guest_vendor: host.guest_vendor().cloned(),
        passthrough_source: None,
    })
}

/// QEMU's `-cpu` value: `model`, then `+f` for each feature of `wanted` the model lacks, `-f`
/// for each feature the model has beyond `wanted` (sorted, additions first), then `enforce` if
/// asked. `model_features` is what `model` gives by itself.
pub fn qemu_cpu_arg(
    model: &str,
    model_features: &FeatureSet,
    wanted: &FeatureSet,
    enforce: bool,
) -> String {
    let mut parts = vec![model.to_string()];
    parts.extend(
        wanted
            .difference(model_features)
            .iter()
            .map(|f| format!("+{f}")),
    );
    parts.extend(
        model_features
            .difference(wanted)
            .iter()
            .map(|f| format!("-{f}")),
    );
    if enforce {
        parts.push("enforce".to_string());
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(vendor: Vendor, model: &str, accel: Accel, ceiling: Option<&str>) -> HostCapability {
        let identity = CpuIdentity {
            vendor: Some(vendor),
            family: 6,
            model: 85,
            stepping: 7,
            model_id: "test".into(),
        };
        let mut features = catalogue().get(model).unwrap().features.clone();
        features.insert("vmx");
        HostCapability::from_features(accel, identity, features, ceiling).unwrap()
    }

    fn mode(name: &str) -> &'static Baseline {
        catalogue().get(name).unwrap()
    }

    #[test]
    fn request_parsing() {
        assert_eq!(CpuRequest::from_spec(None), CpuRequest::ClusterDefault);
        assert_eq!(CpuRequest::from_spec(Some(" ")), CpuRequest::ClusterDefault);
        for s in ["host-passthrough", "host", "max"] {
            assert_eq!(CpuRequest::from_spec(Some(s)), CpuRequest::HostPassthrough);
        }
        assert_eq!(
            CpuRequest::from_spec(Some("Haswell")),
            CpuRequest::Named("Haswell".into())
        );
    }

    #[test]
    fn default_is_the_cluster_mode() {
        let h = host(Vendor::Intel, "Skylake-Server", Accel::Kvm, None);
        let cpu = resolve(&CpuRequest::ClusterDefault, Some(mode("Haswell")), "h1", &h).unwrap();
        assert_eq!(cpu.kind, VmCpuKind::ClusterMode);
        assert_eq!(cpu.model, "Haswell");
        assert_eq!(cpu.features, mode("Haswell").features);
        assert_eq!(cpu.qemu_cpu, "Haswell-v1,enforce");
        assert_eq!(cpu.guest_vendor, Some(Vendor::Intel));
        let cpu = resolve(&CpuRequest::ClusterDefault, None, "h1", &h).unwrap();
        assert_eq!(cpu.kind, VmCpuKind::Default);
        assert_eq!(cpu.model, DEFAULT_BASELINE);
        assert!(cpu.qemu_cpu.ends_with(",enforce"));
    }

    #[test]
    fn named_model_must_fit_the_mode_and_the_host() {
        let h = host(Vendor::Intel, "Skylake-Server", Accel::Kvm, None);
        let named = |n: &str| CpuRequest::Named(n.into());
        let cpu = resolve(&named("SandyBridge"), Some(mode("Haswell")), "h1", &h).unwrap();
        assert_eq!(cpu.kind, VmCpuKind::Named);
        assert_eq!(cpu.qemu_cpu, "SandyBridge-v1,enforce");
        let err = resolve(&named("Broadwell"), Some(mode("Haswell")), "h1", &h).unwrap_err();
        match err {
            CpuError::ModelAboveMode { extra, .. } => {
                assert!(extra.iter().any(|f| f == "adx"), "{extra:?}")
            }
            other => panic!("unexpected {other}"),
        }
        let err = resolve(&named("EPYC"), Some(mode("Haswell")), "h1", &h).unwrap_err();
        assert!(matches!(err, CpuError::VendorMismatch { .. }), "{err}");
        let err = resolve(&named("Icelake-Server"), None, "h1", &h).unwrap_err();
        assert!(err.to_string().contains("host h1"), "{err}");
        let err = resolve(&named("Pentium"), None, "h1", &h).unwrap_err();
        assert!(matches!(err, CpuError::UnknownModel { .. }));
        // A level is fine inside a vendor mode it is contained in.
        let cpu = resolve(&named("x86-64-v3"), Some(mode("Haswell")), "h1", &h).unwrap();
        assert_eq!(cpu.features, mode("x86-64-v3").features);
    }

    #[test]
    fn passthrough() {
        let h = host(Vendor::Intel, "Icelake-Server", Accel::Kvm, None);
        let req = CpuRequest::HostPassthrough;
        let cpu = resolve(&req, None, "h1", &h).unwrap();
        assert_eq!(cpu.qemu_cpu, "host");
        assert_eq!(cpu.features, h.features);
        assert!(matches!(
            resolve(&req, Some(mode("Nehalem")), "h1", &h),
            Err(CpuError::PassthroughWithMode { .. })
        ));
        let tcg = host(Vendor::Amd, "Westmere", Accel::Tcg, None);
        assert_eq!(resolve(&req, None, "h1", &tcg).unwrap().qemu_cpu, "max");
        // Under a ceiling the extra features are switched off.
        let capped = host(Vendor::Intel, "Haswell", Accel::Kvm, Some("IvyBridge"));
        let cpu = resolve(&req, None, "h1", &capped).unwrap();
        assert!(cpu.qemu_cpu.starts_with("host,-"), "{}", cpu.qemu_cpu);
        assert!(cpu.qemu_cpu.contains("-avx2") && cpu.qemu_cpu.contains("-vmx"));
        assert_eq!(cpu.features, mode("IvyBridge").features);
    }

    #[test]
    fn cpu_arg_flags() {
        let base = FeatureSet::from_names(["a", "b", "c"]);
        let wanted = FeatureSet::from_names(["b", "c", "d", "e"]);
        assert_eq!(
            qemu_cpu_arg("m", &base, &wanted, true),
            "m,+d,+e,-a,enforce"
        );
        assert_eq!(qemu_cpu_arg("m", &base, &base, false), "m");
    }

    #[test]
    fn record_roundtrip() {
        let h = host(Vendor::Intel, "Haswell", Accel::Kvm, None);
        let cpu = resolve(&CpuRequest::HostPassthrough, None, "h1", &h).unwrap();
        let json = serde_json::to_string(&cpu).unwrap();
        assert_eq!(serde_json::from_str::<VmCpu>(&json).unwrap(), cpu);
    }
}
