//! Reading QEMU's `query-cpu-model-expansion` answer: features apart from the other CPU
//! properties, aliases resolved, and the CPU's identity (vendor, family, model, stepping).
//!
//! A `full` expansion mixes features (`avx2: true`), their aliases (`sse4_2`, `sse4-2` next to
//! `sse4.2`), CPU options that are also bools (`pmu`, `enforce`, `hv-*`, `l3-cache`…) and
//! non-bool properties (`family`, `level`, `xlevel`, `phys-bits`, `model-id`…). Bools are
//! features only when QEMU's data names them so (see [`crate::data`]); a bool this crate does not
//! know lands in [`CpuModelExpansion::unknown_bools`] and is not treated as a feature.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::catalogue::Vendor;
use crate::data;
use crate::error::CpuError;
use crate::feature::{canonical_name, FeatureSet};

/// A CPU model expansion, taken apart.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuModelExpansion {
    /// The model name QEMU reports (`host`, `max`, `base` for static expansions…).
    pub model_name: String,
    pub vendor: Option<Vendor>,
    pub family: Option<u32>,
    pub model: Option<u32>,
    pub stepping: Option<u32>,
    pub model_id: Option<String>,
    /// Enabled features, canonical names.
    pub features: FeatureSet,
    /// Bool CPU options (`pmu`, `l3-cache`, `hv-relaxed`…): not features.
    pub options: BTreeMap<String, bool>,
    /// Non-bool properties other than the identity above (`level`, `xlevel`, `phys-bits`…).
    pub other_props: BTreeMap<String, Value>,
    /// Bools neither a known feature, alias nor option (a newer QEMU's feature, say).
    pub unknown_bools: BTreeMap<String, bool>,
}

/// The QMP command that asks QEMU what `model` expands to, features and all: `host` on a QEMU
/// started with `-machine none -accel kvm`, `max` with `-accel tcg`.
pub fn expansion_request(model: &str) -> Value {
    serde_json::json!({
        "execute": "query-cpu-model-expansion",
        "arguments": {"type": "full", "model": {"name": model}}
    })
}

/// Parses the JSON of a `query-cpu-model-expansion` answer. Accepts the whole QMP reply
/// (`{"return":{"model":…}}`), its `return` object (`{"model":{"name":…,"props":{…}}}`) or the
/// model object itself (`{"name":…,"props":{…}}`).
pub fn parse_expansion(json: &str) -> Result<CpuModelExpansion, CpuError> {
    let value: Value =
        serde_json::from_str(json).map_err(|e| CpuError::Expansion(format!("not JSON: {e}")))?;
    expansion_from_value(&value)
}

/// Like [`parse_expansion`], from an already parsed value.
pub fn expansion_from_value(value: &Value) -> Result<CpuModelExpansion, CpuError> {
    let mut v = value;
    if let Some(error) = v.get("error") {
        return Err(CpuError::Expansion(format!(
            "QEMU answered an error: {error}"
        )));
    }
    if let Some(r) = v.get("return") {
        v = r;
    }
    if let Some(m) = v.get("model") {
        v = m;
    }
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| CpuError::Expansion("no model name".into()))?;
    let props = v
        .get("props")
        .and_then(Value::as_object)
        .ok_or_else(|| CpuError::Expansion(format!("model {name} has no props object")))?;

    let names = data::names();
    let aliases = &data::qemu_data().aliases;
    let mut exp = CpuModelExpansion {
        model_name: name.to_string(),
        vendor: None,
        family: None,
        model: None,
        stepping: None,
        model_id: None,
        features: FeatureSet::new(),
        options: BTreeMap::new(),
        other_props: BTreeMap::new(),
        unknown_bools: BTreeMap::new(),
    };
    for (key, val) in props {
        match (key.as_str(), val) {
            (_, Value::Bool(on)) => {
                if names.features.contains(key) || aliases.contains_key(key) {
                    // A feature is on if any of its spellings says so.
                    if *on {
                        exp.features.insert(&canonical_name(key));
                    }
                } else if names.non_features.contains(key) {
                    exp.options.insert(key.clone(), *on);
                } else {
                    exp.unknown_bools.insert(key.clone(), *on);
                }
            }
            ("vendor", Value::String(s)) => exp.vendor = Vendor::from_cpuid(s),
            ("model-id", Value::String(s)) => exp.model_id = Some(s.trim().to_string()),
            ("family", v) => exp.family = Some(as_u32(key, v)?),
            ("model", v) => exp.model = Some(as_u32(key, v)?),
            ("stepping", v) => exp.stepping = Some(as_u32(key, v)?),
            _ => {
                exp.other_props.insert(key.clone(), val.clone());
            }
        }
    }
    Ok(exp)
}

fn as_u32(key: &str, v: &Value) -> Result<u32, CpuError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| CpuError::Expansion(format!("{key} is not a small number: {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{"return": {"model": {"name": "max", "props": {
        "sse4.2": true, "sse4-2": true, "sse4_2": true, "pclmuldq": true, "pclmulqdq": true,
        "avx2": true, "avx512f": false, "xd": true, "pmu": false, "l3-cache": true,
        "hv-relaxed": false, "enforce": false, "x-brand-new-feature": true,
        "vendor": "AuthenticAMD", "family": 25, "model": 1, "stepping": 1,
        "model-id": "QEMU TCG CPU version 2.5+", "level": 13, "xlevel": 2147483658,
        "phys-bits": 0, "hv-vendor-id": ""}}}}"#;

    #[test]
    fn separates_features_from_props() {
        let e = parse_expansion(FULL).unwrap();
        assert_eq!(e.model_name, "max");
        assert_eq!(
            e.features.to_vec(),
            vec!["avx2", "nx", "pclmulqdq", "sse4.2"]
        );
        assert_eq!(e.vendor, Some(Vendor::Amd));
        assert_eq!(
            (e.family, e.model, e.stepping),
            (Some(25), Some(1), Some(1))
        );
        assert_eq!(e.model_id.as_deref(), Some("QEMU TCG CPU version 2.5+"));
        assert_eq!(e.options.get("pmu"), Some(&false));
        assert_eq!(e.options.get("l3-cache"), Some(&true));
        assert!(e.options.contains_key("hv-relaxed") && e.options.contains_key("enforce"));
        assert_eq!(e.unknown_bools.get("x-brand-new-feature"), Some(&true));
        assert!(e.other_props.contains_key("level") && e.other_props.contains_key("xlevel"));
        assert!(!e.other_props.contains_key("family"));
    }

    #[test]
    fn accepts_each_wrapping() {
        let inner = r#"{"name": "base", "props": {"avx": true, "vendor": ""}}"#;
        let a = parse_expansion(inner).unwrap();
        let b = parse_expansion(&format!(r#"{{"model": {inner}}}"#)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.vendor, None);
        assert!(a.features.contains("avx"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_expansion("nope").is_err());
        assert!(parse_expansion(r#"{"model": {"props": {}}}"#).is_err());
        assert!(parse_expansion(r#"{"model": {"name": "x"}}"#).is_err());
        assert!(parse_expansion(r#"{"error": {"desc": "CPU model 'y' not found"}}"#).is_err());
        assert!(
            parse_expansion(r#"{"model": {"name": "x", "props": {"family": "six"}}}"#).is_err()
        );
    }
}
