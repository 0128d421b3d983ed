//! What a host can give a guest: QEMU's `host` (KVM) or `max` (TCG) model expansion, capped by
//! an optional ceiling model, and the catalogue baselines that fit in it.
//!
//! Under KVM the guest sees the host's CPU vendor whatever the model says (QEMU copies the
//! host's vendor string into every model), so a KVM host only offers its own vendor's models.
//! TCG emulates any vendor: a TCG host's capability has no vendor constraint.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::catalogue::{catalogue, Baseline, Vendor};
use crate::error::CpuError;
use crate::expansion::CpuModelExpansion;
use crate::feature::FeatureSet;

/// The accelerator a host runs guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The QEMU model that passes the host's whole CPU through: `host` under KVM, `max` under
    /// TCG (TCG has no `host`).
    pub fn passthrough_model(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Who a CPU says it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuIdentity {
    pub vendor: Option<Vendor>,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    pub model_id: String,
}

/// What a host can give its guests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCapability {
    pub accel: Accel,
    /// The `host`/`max` model's identity (under KVM: the physical CPU's).
    pub identity: CpuIdentity,
    /// What guests can be given: the expansion's features, intersected with the ceiling's.
    pub features: FeatureSet,
    /// The expansion's features before the ceiling.
    pub uncapped: FeatureSet,
    /// The ceiling model's name, if the host has one (`--cpu-ceiling`).
    pub ceiling: Option<String>,
}

impl HostCapability {
    /// From the expansion of `host` (KVM) or `max` (TCG), capped by `ceiling` (a catalogue name).
    pub fn from_expansion(
        exp: &CpuModelExpansion,
        accel: Accel,
        ceiling: Option<&str>,
    ) -> Result<Self, CpuError> {
        let identity = CpuIdentity {
            vendor: exp.vendor.clone(),
            family: exp.family.unwrap_or(0),
            model: exp.model.unwrap_or(0),
            stepping: exp.stepping.unwrap_or(0),
            model_id: exp.model_id.clone().unwrap_or_default(),
        };
        Self::from_features(accel, identity, exp.features.clone(), ceiling)
    }

    /// From features already known (say, a host's heartbeat), capped by `ceiling`.
    pub fn from_features(
        accel: Accel,
        identity: CpuIdentity,
        uncapped: FeatureSet,
        ceiling: Option<&str>,
    ) -> Result<Self, CpuError> {
        let (features, ceiling) = match ceiling {
            None => (uncapped.clone(), None),
            Some(name) => {
                let cap = catalogue().require(name)?;
                if accel == Accel::Kvm {
                    if let (Some(cv), Some(hv)) = (&cap.vendor, &identity.vendor) {
                        if cv != hv {
                            return Err(CpuError::CeilingVendor {
                                ceiling: cap.name.clone(),
                                ceiling_vendor: cv.to_string(),
                                host_vendor: hv.to_string(),
                            });
                        }
                    }
                }
                (uncapped.intersection(&cap.features), Some(cap.name.clone()))
            }
        };
        Ok(HostCapability {
            accel,
            identity,
            features,
            uncapped,
            ceiling,
        })
    }

    /// The vendor every guest of this host sees: the host's under KVM; `None` under TCG, which
    /// shows each model's own vendor.
    pub fn guest_vendor(&self) -> Option<&Vendor> {
        match self.accel {
            Accel::Kvm => self.identity.vendor.as_ref(),
            Accel::Tcg => None,
        }
    }

    /// Whether this host can run `baseline`; the error names what is missing. `host` names the
    /// host in the message.
    pub fn check(&self, host: &str, baseline: &Baseline) -> Result<(), CpuError> {
        if !baseline.allowed_for_vendor(self.guest_vendor()) {
            return Err(CpuError::VendorMismatch {
                subject: format!("host {host}"),
                found: self
                    .guest_vendor()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                required: format!(
                    "{} for {}",
                    baseline
                        .vendor
                        .as_ref()
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                    baseline.name
                ),
            });
        }
        let missing = baseline.features.missing_in(&self.features);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(CpuError::MissingFeatures {
                subject: format!("host {host}"),
                target: baseline.name.clone(),
                missing,
            })
        }
    }

    pub fn supports(&self, baseline: &Baseline) -> bool {
        self.check("", baseline).is_ok()
    }

    /// Every catalogue baseline this host can run.
    pub fn supported_baselines(&self) -> Vec<&'static Baseline> {
        catalogue().supported_by(&self.features, self.guest_vendor())
    }

    /// The best baseline this host can run (see [`crate::Catalogue::best`]).
    pub fn best_baseline(&self) -> Option<&'static Baseline> {
        catalogue().best(&self.supported_baselines())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expansion::parse_expansion;

    fn host(vendor: &str, model: &str, extra: &[&str]) -> CpuModelExpansion {
        let mut features = catalogue().get(model).unwrap().features.clone();
        for f in extra {
            features.insert(f);
        }
        let props: serde_json::Map<String, serde_json::Value> = features
            .iter()
            .map(|f| (f.to_string(), serde_json::Value::Bool(true)))
            .chain([("vendor".to_string(), serde_json::json!(vendor))])
            .collect();
        let json = serde_json::json!({"model": {"name": "host", "props": props}});
        parse_expansion(&json.to_string()).unwrap()
    }

    #[test]
    fn kvm_host_offers_its_vendor_line_up_to_its_generation() {
        let exp = host("GenuineIntel", "Broadwell", &["vmx"]);
        let cap = HostCapability::from_expansion(&exp, Accel::Kvm, None).unwrap();
        let names: Vec<&str> = cap
            .supported_baselines()
            .iter()
            .map(|b| b.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "x86-64-v1",
                "x86-64-v2",
                "x86-64-v3",
                "Nehalem",
                "Westmere",
                "SandyBridge",
                "IvyBridge",
                "Haswell",
                "Broadwell"
            ]
        );
        assert_eq!(cap.best_baseline().unwrap().name, "Broadwell");
        let err = cap
            .check("h1", catalogue().get("Skylake-Server").unwrap())
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("host h1") && msg.contains("avx512f"), "{msg}");
        let err = cap
            .check("h1", catalogue().get("EPYC").unwrap())
            .unwrap_err();
        assert!(matches!(err, CpuError::VendorMismatch { .. }), "{err}");
    }

    #[test]
    fn ceiling_caps_the_capability() {
        let exp = host("GenuineIntel", "Icelake-Server", &[]);
        let cap = HostCapability::from_expansion(&exp, Accel::Kvm, Some("Haswell")).unwrap();
        assert_eq!(cap.features, catalogue().get("Haswell").unwrap().features);
        assert_eq!(cap.best_baseline().unwrap().name, "Haswell");
        assert!(cap.uncapped.contains("avx512f"));
        assert_eq!(cap.ceiling.as_deref(), Some("Haswell"));
        // A ceiling of the other vendor makes no sense on KVM.
        let err = HostCapability::from_expansion(&exp, Accel::Kvm, Some("EPYC")).unwrap_err();
        assert!(matches!(err, CpuError::CeilingVendor { .. }), "{err}");
        assert!(HostCapability::from_expansion(&exp, Accel::Kvm, Some("nope")).is_err());
        // A level ceiling is vendor-neutral.
        let cap = HostCapability::from_expansion(&exp, Accel::Kvm, Some("x86-64-v2")).unwrap();
        assert_eq!(cap.best_baseline().unwrap().name, "x86-64-v2");
        assert!(cap.supports(catalogue().get("Nehalem").unwrap()));
    }

    #[test]
    fn tcg_emulates_any_vendor() {
        let exp = host("AuthenticAMD", "Westmere", &[]);
        let cap = HostCapability::from_expansion(&exp, Accel::Tcg, None).unwrap();
        assert_eq!(cap.guest_vendor(), None);
        assert!(cap.supports(catalogue().get("Westmere").unwrap()));
        let kvm = HostCapability::from_expansion(&exp, Accel::Kvm, None).unwrap();
        assert!(!kvm.supports(catalogue().get("Westmere").unwrap()));
    }
}
