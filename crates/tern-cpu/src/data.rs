//! QEMU-derived data: `data/qemu-cpu-models.json`, written by `scripts/gen-cpu-models.py` from
//! the installed QEMU, embedded at build time and parsed once.
//!
//! It holds QEMU's x86 feature names (canonical names, aliases, and the bool CPU properties that
//! are not features) and the exact feature set of each vendor model of the catalogue, as QEMU's
//! `query-cpu-model-expansion` (type `static`, under TCG) reports it. The test
//! `catalogue_matches_qemu` regenerates it and compares.

use std::collections::{BTreeMap, HashSet};
use std::sync::LazyLock;

use serde::Deserialize;

/// The checked-in data file.
pub const QEMU_MODELS_JSON: &str = include_str!("../data/qemu-cpu-models.json");

/// The parsed data file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QemuData {
    pub generated_by: String,
    /// QEMU version the data came from, e.g. `10.0.2`.
    pub qemu_version: String,
    /// QEMU's package string (distribution build).
    pub qemu_package: String,
    /// Canonical feature names (the bool props of a static expansion).
    pub features: Vec<String>,
    /// Alias → canonical feature name (`sse4_2` → `sse4.2`, `pclmuldq` → `pclmulqdq`, …).
    pub aliases: BTreeMap<String, String>,
    /// Bool CPU properties that are options, not CPUID features (`pmu`, `hv-*`, `enforce`…).
    pub non_feature_props: Vec<String>,
    /// The catalogue's vendor models.
    pub models: Vec<ModelData>,
    /// QEMU's own x86-64-vN models, when this QEMU has them.
    #[serde(default)]
    pub levels: Vec<ModelData>,
    /// Generic models tern builds CPUs from (qemu64).
    #[serde(default)]
    pub bases: Vec<ModelData>,
}

/// One model's static expansion.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ModelData {
    /// Name as tern and users spell it (`Haswell`).
    pub name: String,
    /// The versioned QEMU model it resolves to (`Haswell-v1`), used on `-cpu`.
    pub qemu_model: String,
    /// CPUID vendor string (`GenuineIntel`, `AuthenticAMD`).
    pub vendor: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    pub model_id: String,
    /// Canonical names of the features it enables.
    pub features: Vec<String>,
}

/// Parses a data file (the embedded one, or a freshly generated one in tests).
pub fn parse(text: &str) -> Result<QemuData, serde_json::Error> {
    serde_json::from_str(text)
}

/// Name lookups over the embedded data.
pub(crate) struct Names {
    pub features: HashSet<String>,
    pub non_features: HashSet<String>,
}

static DATA: LazyLock<QemuData> = LazyLock::new(|| {
    // The file is part of the source tree and checked by this crate's tests, so a parse
    // failure is a build defect, not an input error.
    parse(QEMU_MODELS_JSON).expect("embedded data/qemu-cpu-models.json is valid")
});

static NAMES: LazyLock<Names> = LazyLock::new(|| Names {
    features: DATA.features.iter().cloned().collect(),
    non_features: DATA.non_feature_props.iter().cloned().collect(),
});

/// The embedded data.
pub fn qemu_data() -> &'static QemuData {
    &DATA
}

pub(crate) fn names() -> &'static Names {
    &NAMES
}
