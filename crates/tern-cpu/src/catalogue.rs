//! The catalogue of named CPU baselines (EVC modes): the x86-64 psABI levels and QEMU's vendor
//! models, each with its exact feature set and vendor, ordered within its line.
//!
//! Three lines: `x86-64` (v1 < v2 < v3 < v4, vendor-neutral), `Intel` (Nehalem … SapphireRapids)
//! and `AMD` (EPYC … EPYC-Genoa). Within a line each baseline contains the one before it (a test
//! checks it); Intel and AMD models are never compared, and a vendor model is only ever offered
//! on a host of its vendor. The vendor models' feature sets come from QEMU (see [`crate::data`]);
//! the levels come from QEMU too when it has x86-64-vN models, otherwise from the psABI
//! definitions encoded here ([`PSABI_LEVELS`], plus [`LEVEL_ADDITIONS`]) on top of QEMU's `qemu64`.

use std::cmp::Ordering;
use std::fmt;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::data::{self, ModelData, QemuData};
use crate::error::CpuError;
use crate::feature::FeatureSet;
use crate::vm::qemu_cpu_arg;

/// The Intel line, oldest first.
pub const INTEL_LINE: [&str; 10] = [
    "Nehalem",
    "Westmere",
    "SandyBridge",
    "IvyBridge",
    "Haswell",
    "Broadwell",
    "Skylake-Server",
    "Cascadelake-Server",
    "Icelake-Server",
    "SapphireRapids",
];

/// The AMD line, oldest first.
pub const AMD_LINE: [&str; 4] = ["EPYC", "EPYC-Rome", "EPYC-Milan", "EPYC-Genoa"];

/// The features each x86-64 psABI micro-architecture level adds to the one before, in QEMU's
/// names. The psABI's CMPXCHG16B is `cx16`, LAHF-SAHF `lahf-lm`, SSE3 `pni`, LZCNT `abm`, SCE
/// `syscall`; OSFXSR and OSXSAVE are the OS enabling `fxsr` and `xsave`, so the CPU side of
/// them is `fxsr` and `xsave`.
pub const PSABI_LEVELS: [(&str, &[&str]); 4] = [
    (
        "x86-64-v1",
        &[
            "cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2",
        ],
    ),
    (
        "x86-64-v2",
        &[
            "cx16", "lahf-lm", "popcnt", "pni", "sse4.1", "sse4.2", "ssse3",
        ],
    ),
    (
        "x86-64-v3",
        &[
            "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
        ],
    ),
    (
        "x86-64-v4",
        &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
    ),
];

/// Features a level has beyond the psABI's list. `xsaveopt` comes with x86-64-v3: every CPU with
/// AVX2 has it (Intel since Sandy Bridge, AMD since Piledriver), and a Linux 6.1 guest under TCG
/// hangs at boot when it sees XSAVE (CPUID level ≥ 0xD) without XSAVEOPT.
pub const LEVEL_ADDITIONS: [(&str, &[&str]); 1] = [("x86-64-v3", &["xsaveopt"])];

/// What every 64-bit QEMU CPU model has besides psABI v1 (long mode, paging, APIC, MSRs, TSC…):
/// the level baselines are these plus their psABI features. `hypervisor` is here because QEMU
/// sets it on every model.
pub const X86_64_ARCH_BASE: &[&str] = &[
    "apic",
    "clflush",
    "de",
    "hypervisor",
    "lm",
    "mca",
    "mce",
    "msr",
    "mtrr",
    "nx",
    "pae",
    "pat",
    "pge",
    "pse",
    "pse36",
    "sep",
    "tsc",
];

/// The generic QEMU model the level baselines are built from when QEMU has no x86-64-vN models.
pub const LEVEL_BASE_MODEL: &str = "qemu64";

/// A CPU vendor, from the CPUID vendor string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Vendor {
    Intel,
    Amd,
    /// Any other vendor string (Hygon, Zhaoxin, …), kept as reported.
    Other(String),
}

impl Vendor {
    /// From the CPUID vendor string (`GenuineIntel`, `AuthenticAMD`, …); `None` when empty.
    pub fn from_cpuid(s: &str) -> Option<Vendor> {
        match s.trim() {
            "" => None,
            "GenuineIntel" => Some(Vendor::Intel),
            "AuthenticAMD" => Some(Vendor::Amd),
            other => Some(Vendor::Other(other.to_string())),
        }
    }

    /// The CPUID vendor string.
    pub fn cpuid(&self) -> &str {
        match self {
            Vendor::Intel => "GenuineIntel",
            Vendor::Amd => "AuthenticAMD",
            Vendor::Other(s) => s,
        }
    }
}

impl From<String> for Vendor {
    fn from(s: String) -> Self {
        Vendor::from_cpuid(&s).unwrap_or(Vendor::Other(s))
    }
}

impl From<Vendor> for String {
    fn from(v: Vendor) -> Self {
        v.cpuid().to_string()
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Vendor::Intel => f.write_str("Intel"),
            Vendor::Amd => f.write_str("AMD"),
            Vendor::Other(s) => f.write_str(s),
        }
    }
}

/// A line of baselines that are ordered among themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Line {
    /// The vendor-neutral x86-64 psABI levels.
    #[serde(rename = "x86-64")]
    X86_64,
    Intel,
    #[serde(rename = "AMD")]
    Amd,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Line::X86_64 => "x86-64",
            Line::Intel => "Intel",
            Line::Amd => "AMD",
        })
    }
}

/// Where a baseline's feature set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// QEMU's expansion of the model (version in [`Catalogue::qemu_version`]).
    Qemu,
    /// The x86-64 psABI level definition encoded in this crate, on QEMU's qemu64.
    PsAbi,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Qemu => "qemu",
            Source::PsAbi => "psABI",
        })
    }
}

/// A named baseline: a CPU model every host of a cluster can offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Baseline {
    pub name: String,
    pub line: Line,
    /// Position in its line, 0 = oldest.
    pub rank: usize,
    /// `None` for the vendor-neutral x86-64 levels.
    pub vendor: Option<Vendor>,
    pub source: Source,
    /// The QEMU model the `-cpu` argument starts from (`Haswell-v1`, `qemu64-v1`).
    pub qemu_model: String,
    /// The model-id string the guest sees (from QEMU; the base model's for psABI levels).
    pub model_id: String,
    /// The exact features a guest of this baseline sees.
    pub features: FeatureSet,
    /// What `qemu_model` gives by itself; `-cpu` adds and removes the difference.
    base_features: FeatureSet,
}

impl Baseline {
    /// Features `qemu_model` has by itself.
    pub fn base_features(&self) -> &FeatureSet {
        &self.base_features
    }

    /// QEMU's `-cpu` argument for exactly this baseline, e.g. `Haswell-v1,enforce` or
    /// `qemu64-v1,+abm,+avx,…,-svm,enforce` (see [`crate::vm::qemu_cpu_arg`]).
    pub fn qemu_cpu_arg(&self) -> String {
        qemu_cpu_arg(&self.qemu_model, &self.base_features, &self.features, true)
    }

    /// Order within a line (by rank); `None` across lines: Intel, AMD and x86-64 levels are not
    /// ordered against each other.
    pub fn cmp_in_line(&self, other: &Baseline) -> Option<Ordering> {
        (self.line == other.line).then(|| self.rank.cmp(&other.rank))
    }

    /// Whether this baseline may run on a host whose guests see vendor `vendor` (`None`: the
    /// accelerator emulates any vendor, as TCG does).
    pub fn allowed_for_vendor(&self, vendor: Option<&Vendor>) -> bool {
        match (&self.vendor, vendor) {
            (Some(mine), Some(host)) => mine == host,
            _ => true,
        }
    }
}

/// All baselines tern knows, built from the embedded QEMU data.
#[derive(Debug, Clone)]
pub struct Catalogue {
    qemu_version: String,
    /// Levels, then the Intel line, then the AMD line, each oldest first.
    baselines: Vec<Baseline>,
}

static CATALOGUE: LazyLock<Catalogue> = LazyLock::new(|| Catalogue::build(data::qemu_data()));

/// The catalogue built from the embedded data.
pub fn catalogue() -> &'static Catalogue {
    &CATALOGUE
}

impl Catalogue {
    /// Builds a catalogue from QEMU data (the embedded file, or a regenerated one in tests).
    pub fn build(data: &QemuData) -> Catalogue {
        let mut baselines = Vec::new();
        let qemu_levels: Vec<&ModelData> = PSABI_LEVELS
            .iter()
            .filter_map(|(name, _)| data.levels.iter().find(|m| m.name == *name))
            .collect();
        if qemu_levels.len() == PSABI_LEVELS.len() {
            for (rank, m) in qemu_levels.into_iter().enumerate() {
                baselines.push(from_model(m, Line::X86_64, rank, None));
            }
        } else {
            baselines.extend(psabi_levels(data));
        }
        for (line, names) in [(Line::Intel, &INTEL_LINE[..]), (Line::Amd, &AMD_LINE[..])] {
            let models = names
                .iter()
                .filter_map(|name| data.models.iter().find(|m| m.name == *name));
            for (rank, m) in models.enumerate() {
                baselines.push(from_model(m, line, rank, Vendor::from_cpuid(&m.vendor)));
            }
        }
        Catalogue {
            qemu_version: data.qemu_version.clone(),
            baselines,
        }
    }

    /// Version of the QEMU the vendor models' data came from.
    pub fn qemu_version(&self) -> &str {
        &self.qemu_version
    }

    /// Every baseline: levels, Intel line, AMD line, each oldest first.
    pub fn all(&self) -> &[Baseline] {
        &self.baselines
    }

    /// One line, oldest first.
    pub fn line(&self, line: Line) -> impl Iterator<Item = &Baseline> + '_ {
        self.baselines.iter().filter(move |b| b.line == line)
    }

    /// A baseline by name (case-insensitive), or by the versioned QEMU model it resolves to
    /// (`Haswell-v1`).
    pub fn get(&self, name: &str) -> Option<&Baseline> {
        let name = name.trim();
        self.baselines.iter().find(|b| {
            b.name.eq_ignore_ascii_case(name)
                || (b.source == Source::Qemu && b.qemu_model.eq_ignore_ascii_case(name))
        })
    }

    /// Like [`Catalogue::get`], with an error listing the known names.
    pub fn require(&self, name: &str) -> Result<&Baseline, CpuError> {
        self.get(name).ok_or_else(|| CpuError::UnknownModel {
            name: name.to_string(),
            known: self.names().join(", "),
        })
    }

    pub fn names(&self) -> Vec<&str> {
        self.baselines.iter().map(|b| b.name.as_str()).collect()
    }

    /// The baselines a CPU with `features` can offer, for guests that see vendor `vendor`
    /// (`None` = any vendor can be emulated).
    pub fn supported_by(&self, features: &FeatureSet, vendor: Option<&Vendor>) -> Vec<&Baseline> {
        self.baselines
            .iter()
            .filter(|b| b.allowed_for_vendor(vendor) && b.features.is_subset(features))
            .collect()
    }

    /// The best of `candidates`: one no other candidate strictly contains; among those the one
    /// with the most features; on a tie (Nehalem and x86-64-v2 have the same set) the
    /// vendor-neutral level, then the newer in its line.
    pub fn best<'a>(&self, candidates: &[&'a Baseline]) -> Option<&'a Baseline> {
        candidates
            .iter()
            .filter(|b| {
                !candidates.iter().any(|o| {
                    o.features.len() > b.features.len() && o.features.is_superset(&b.features)
                })
            })
            .max_by_key(|b| (b.features.len(), b.line == Line::X86_64, b.rank))
            .copied()
    }
}

fn from_model(m: &ModelData, line: Line, rank: usize, vendor: Option<Vendor>) -> Baseline {
    let features = FeatureSet::from_names(&m.features);
    Baseline {
        name: m.name.clone(),
        line,
        rank,
        vendor,
        source: Source::Qemu,
        qemu_model: m.qemu_model.clone(),
        model_id: m.model_id.clone(),
        base_features: features.clone(),
        features,
    }
}

/// The psABI level sets: the x86-64 architectural base plus each level's features (and
/// [`LEVEL_ADDITIONS`]), built on QEMU's qemu64.
fn psabi_levels(data: &QemuData) -> Vec<Baseline> {
    let base = data.bases.iter().find(|m| m.name == LEVEL_BASE_MODEL);
    let (qemu_model, model_id, base_features) = match base {
        Some(m) => (
            m.qemu_model.clone(),
            m.model_id.clone(),
            FeatureSet::from_names(&m.features),
        ),
        // Without qemu64's expansion every feature goes on the command line explicitly.
        None => (
            LEVEL_BASE_MODEL.to_string(),
            String::new(),
            FeatureSet::new(),
        ),
    };
    let mut features = FeatureSet::from_names(X86_64_ARCH_BASE);
    PSABI_LEVELS
        .iter()
        .enumerate()
        .map(|(rank, (name, adds))| {
            features = features.union(&FeatureSet::from_names(*adds));
            for (_, extra) in LEVEL_ADDITIONS.iter().filter(|(level, _)| level == name) {
                features = features.union(&FeatureSet::from_names(*extra));
            }
            Baseline {
                name: name.to_string(),
                line: Line::X86_64,
                rank,
                vendor: None,
                source: Source::PsAbi,
                qemu_model: qemu_model.clone(),
                model_id: model_id.clone(),
                features: features.clone(),
                base_features: base_features.clone(),
            }
        })
        .collect()
}

/// The psABI features of a level and all levels below it (`x86-64-v3` → v1 ∪ v2 ∪ v3).
pub fn psabi_features(level: &str) -> Option<FeatureSet> {
    let upto = PSABI_LEVELS.iter().position(|(n, _)| *n == level)?;
    Some(
        PSABI_LEVELS[..=upto]
            .iter()
            .flat_map(|(_, f)| f.iter())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::qemu_data;

    fn get(name: &str) -> &'static Baseline {
        catalogue().get(name).unwrap()
    }

    #[test]
    fn every_named_model_is_there_with_its_vendor() {
        let cat = catalogue();
        for name in INTEL_LINE {
            let b = cat.get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(b.vendor, Some(Vendor::Intel), "{name}");
            assert_eq!(b.line, Line::Intel);
            assert_eq!(b.source, Source::Qemu);
        }
        for name in AMD_LINE {
            let b = cat.get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(b.vendor, Some(Vendor::Amd), "{name}");
            assert_eq!(b.line, Line::Amd);
        }
        for (name, _) in PSABI_LEVELS {
            assert_eq!(get(name).vendor, None);
            assert_eq!(get(name).line, Line::X86_64);
        }
        assert_eq!(cat.all().len(), 18);
        // The data file holds exactly the lines' models, in line order.
        let data_names: Vec<&str> = qemu_data().models.iter().map(|m| m.name.as_str()).collect();
        let lines: Vec<&str> = INTEL_LINE.iter().chain(AMD_LINE.iter()).copied().collect();
        assert_eq!(data_names, lines);
    }

    #[test]
    fn each_line_is_a_chain_of_supersets() {
        for line in [Line::X86_64, Line::Intel, Line::Amd] {
            let members: Vec<&Baseline> = catalogue().line(line).collect();
            assert!(members.len() >= 4, "{line}");
            for pair in members.windows(2) {
                let (lo, hi) = (pair[0], pair[1]);
                assert!(
                    lo.features.is_subset(&hi.features) && lo.features != hi.features,
                    "{} should be a strict subset of {}; it has {:?} extra",
                    lo.name,
                    hi.name,
                    lo.features.missing_in(&hi.features)
                );
                assert_eq!(lo.cmp_in_line(hi), Some(Ordering::Less));
                assert_eq!(hi.cmp_in_line(lo), Some(Ordering::Greater));
            }
        }
    }

    #[test]
    fn levels_match_the_psabi() {
        let mut below = FeatureSet::new();
        for (name, adds) in PSABI_LEVELS {
            let level = get(name);
            let psabi = psabi_features(name).unwrap();
            assert!(
                psabi.is_subset(&level.features),
                "{name} lacks psABI features {:?}",
                psabi.missing_in(&level.features)
            );
            // A level does not already contain the next level's features.
            for (next, next_adds) in PSABI_LEVELS.iter().skip_while(|(n, _)| *n != name).skip(1) {
                let next_set = FeatureSet::from_names(*next_adds);
                assert!(
                    level.features.intersection(&next_set).is_empty(),
                    "{name} already has {next} features"
                );
            }
            assert!(adds.iter().all(|f| !below.contains(f)));
            below = level.features.clone();
        }
        // Every feature name used here is one QEMU knows.
        for f in X86_64_ARCH_BASE
            .iter()
            .chain(PSABI_LEVELS.iter().flat_map(|(_, f)| f.iter()))
            .chain(LEVEL_ADDITIONS.iter().flat_map(|(_, f)| f.iter()))
        {
            assert!(crate::feature::is_known_feature(f), "{f}");
        }
    }

    #[test]
    fn vendor_models_sit_at_the_expected_levels() {
        // Each generation contains the psABI level it is known for, and not the next one.
        for (model, level, next) in [
            ("Nehalem", "x86-64-v2", Some("x86-64-v3")),
            ("IvyBridge", "x86-64-v2", Some("x86-64-v3")),
            ("Haswell", "x86-64-v3", Some("x86-64-v4")),
            ("Broadwell", "x86-64-v3", Some("x86-64-v4")),
            ("Skylake-Server", "x86-64-v4", None),
            ("SapphireRapids", "x86-64-v4", None),
            ("EPYC", "x86-64-v3", Some("x86-64-v4")),
            ("EPYC-Milan", "x86-64-v3", Some("x86-64-v4")),
            ("EPYC-Genoa", "x86-64-v4", None),
        ] {
            let m = &get(model).features;
            let l = &get(level).features;
            assert!(
                l.is_subset(m),
                "{model} lacks {level} features {:?}",
                l.missing_in(m)
            );
            if let Some(next) = next {
                assert!(!get(next).features.is_subset(m), "{model} contains {next}");
            }
        }
    }

    #[test]
    fn intel_and_amd_never_mix() {
        let haswell = get("Haswell");
        let epyc = get("EPYC");
        assert_eq!(haswell.cmp_in_line(epyc), None);
        assert_eq!(epyc.cmp_in_line(haswell), None);
        assert!(!haswell.allowed_for_vendor(Some(&Vendor::Amd)));
        assert!(!epyc.allowed_for_vendor(Some(&Vendor::Intel)));
        assert!(get("x86-64-v3").allowed_for_vendor(Some(&Vendor::Amd)));
        // A CPU with every feature still only gets its own vendor's models.
        let everything = FeatureSet::from_names(&qemu_data().features);
        let on_amd = catalogue().supported_by(&everything, Some(&Vendor::Amd));
        assert!(on_amd.iter().all(|b| b.line != Line::Intel));
        assert!(on_amd.iter().any(|b| b.name == "EPYC-Genoa"));
        let on_intel = catalogue().supported_by(&everything, Some(&Vendor::Intel));
        assert!(on_intel.iter().all(|b| b.line != Line::Amd));
        assert_eq!(
            catalogue().best(&on_intel).map(|b| b.name.as_str()),
            Some("SapphireRapids")
        );
        assert_eq!(
            catalogue().best(&on_amd).map(|b| b.name.as_str()),
            Some("EPYC-Genoa")
        );
    }

    #[test]
    fn lookup() {
        let cat = catalogue();
        assert_eq!(cat.get("haswell").unwrap().name, "Haswell");
        assert_eq!(cat.get("Haswell-v1").unwrap().name, "Haswell");
        assert!(cat.get("qemu64-v1").is_none());
        let err = cat.require("Pentium").unwrap_err();
        assert!(err.to_string().contains("Pentium") && err.to_string().contains("Haswell"));
    }

    #[test]
    fn cpu_args() {
        assert_eq!(get("Haswell").qemu_cpu_arg(), "Haswell-v1,enforce");
        let v3 = get("x86-64-v3");
        if v3.source == Source::PsAbi {
            assert_eq!(
                v3.qemu_cpu_arg(),
                "qemu64-v1,+abm,+avx,+avx2,+bmi1,+bmi2,+f16c,+fma,+movbe,+popcnt,+sse4.1,\
                 +sse4.2,+ssse3,+xsave,+xsaveopt,-svm,enforce"
            );
        }
    }
}
