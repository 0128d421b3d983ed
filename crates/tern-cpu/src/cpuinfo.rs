//! /proc/cpuinfo flags in QEMU's feature names, so what a guest (or host) kernel reports can be
//! compared with a recorded feature set.
//!
//! Linux names most CPUID bits like QEMU does, or with `_` where QEMU has `-` (`lahf_lm`,
//! `sse4_1`, `sha_ni`). The rest differ ([`LINUX_TO_QEMU`]), and some Linux flags are not
//! CPUID bits at all but derived by the kernel (`constant_tsc`, `rep_good`, `ibrs`, `pti`…):
//! those have no feature and come back as unmapped. Linux also hides some bits (OS-controlled
//! ones like `osxsave`, or features it disabled), so a guest may show fewer flags than its
//! recorded set: [`compare_guest`] reports both directions.

use std::collections::BTreeSet;

use crate::data;
use crate::feature::{canonical_name, is_known_feature, FeatureSet};

/// Linux flag names that differ from QEMU's (beyond `_` for `-`).
pub const LINUX_TO_QEMU: &[(&str, &str)] = &[
    ("dts", "ds"),
    ("tsc_deadline_timer", "tsc-deadline"),
    ("avx512_vnni", "avx512vnni"),
    ("avx512_vbmi2", "avx512vbmi2"),
    ("avx512_bitalg", "avx512bitalg"),
    ("cr8_legacy", "cr8legacy"),
    ("tsxldtrk", "tsx-ldtrk"),
    ("pausefilter", "pause-filter"),
    ("ibrs_enhanced", "ibrs-all"),
];

/// Linux flags named like a QEMU feature but derived by the kernel from other bits or vendor
/// leaves, so they do not mean that QEMU feature.
pub const LINUX_SYNTHETIC: &[&str] = &["ibrs", "ibpb", "stibp", "ssbd"];

/// Features Linux turns on by itself for a CPU vendor although CPUID does not report them:
/// (CPUID vendor string, feature, why). A guest showing one of these is not seeing too much.
pub const LINUX_IMPLIED: &[(&str, &str, &str)] = &[(
    "AuthenticAMD",
    "3dnowprefetch",
    "Linux assumes PREFETCHW on every AMD CPU with long mode",
)];

/// QEMU's name for a /proc/cpuinfo flag, or `None` when the flag is not a QEMU CPU feature.
pub fn feature_for_flag(flag: &str) -> Option<String> {
    let flag = flag.trim().to_ascii_lowercase();
    if LINUX_SYNTHETIC.contains(&flag.as_str()) {
        return None;
    }
    if let Some((_, q)) = LINUX_TO_QEMU.iter().find(|(l, _)| *l == flag) {
        return Some((*q).to_string());
    }
    if is_known_feature(&flag) {
        return Some(canonical_name(&flag));
    }
    let dashed = flag.replace('_', "-");
    data::names().features.contains(&dashed).then_some(dashed)
}

/// The /proc/cpuinfo flag Linux shows for a QEMU feature, where one exists.
pub fn flag_for_feature(feature: &str) -> Option<String> {
    let feature = canonical_name(feature);
    if let Some((l, _)) = LINUX_TO_QEMU.iter().find(|(_, q)| *q == feature) {
        return Some((*l).to_string());
    }
    let underscored = feature.replace(['-', '.'], "_");
    (feature_for_flag(&underscored).as_deref() == Some(feature.as_str())).then_some(underscored)
}

/// The flags of one CPU in /proc/cpuinfo, split into QEMU features and the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuinfoFlags {
    /// The `vendor_id` line.
    pub vendor_id: Option<String>,
    /// The raw flags, as Linux printed them.
    pub raw: BTreeSet<String>,
    /// Flags that are QEMU features, in QEMU's names.
    pub features: FeatureSet,
    /// Flags that are not (kernel-derived, or unknown to this QEMU).
    pub unmapped: Vec<String>,
}

/// Reads the first processor's `vendor_id` and `flags` lines from /proc/cpuinfo text. Returns
/// `None` when there is no flags line.
pub fn parse_cpuinfo(text: &str) -> Option<CpuinfoFlags> {
    let mut out = CpuinfoFlags::default();
    let mut have_flags = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "vendor_id" if out.vendor_id.is_none() => {
                out.vendor_id = Some(value.trim().to_string())
            }
            "flags" if !have_flags => {
                have_flags = true;
                out.raw = value.split_whitespace().map(str::to_string).collect();
            }
            _ => {}
        }
    }
    if !have_flags {
        return None;
    }
    for flag in &out.raw {
        match feature_for_flag(flag) {
            Some(f) => {
                out.features.insert(&f);
            }
            None => out.unmapped.push(flag.clone()),
        }
    }
    Some(out)
}

/// A guest's /proc/cpuinfo against the feature set it should run with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCpuCheck {
    /// Features the guest shows that the set lacks: a real leak (the guest sees too much).
    pub unexpected: Vec<String>,
    /// Features the guest shows that the set lacks but Linux sets by itself ([`LINUX_IMPLIED`]).
    pub implied_by_linux: Vec<String>,
    /// Features of the set the guest does not show: either hidden by Linux or really missing.
    pub absent: Vec<String>,
}

/// Compares what a guest shows with what it should see.
pub fn compare_guest(expected: &FeatureSet, guest: &CpuinfoFlags) -> GuestCpuCheck {
    let vendor = guest.vendor_id.as_deref().unwrap_or("");
    let (implied_by_linux, unexpected) =
        guest
            .features
            .missing_in(expected)
            .into_iter()
            .partition(|f| {
                LINUX_IMPLIED
                    .iter()
                    .any(|(v, feature, _)| *v == vendor && feature == f)
            });
    GuestCpuCheck {
        unexpected,
        implied_by_linux,
        absent: expected.missing_in(&guest.features),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_linux_names() {
        for (linux, qemu) in [
            ("sse4_1", Some("sse4.1")),
            ("sse4_2", Some("sse4.2")),
            ("lahf_lm", Some("lahf-lm")),
            ("pni", Some("pni")),
            ("pclmulqdq", Some("pclmulqdq")),
            ("sha_ni", Some("sha-ni")),
            ("avx512_vpopcntdq", Some("avx512-vpopcntdq")),
            ("avx512_bf16", Some("avx512-bf16")),
            ("avx512_vnni", Some("avx512vnni")),
            ("tsc_deadline_timer", Some("tsc-deadline")),
            ("dts", Some("ds")),
            ("nx", Some("nx")),
            ("avx2", Some("avx2")),
            ("arch_capabilities", Some("arch-capabilities")),
            ("rep_good", None),
            ("cpuid", None),
            ("ibpb", None),
        ] {
            assert_eq!(feature_for_flag(linux).as_deref(), qemu, "{linux}");
        }
        for (qemu, linux) in [
            ("avx2", "avx2"),
            ("sse4.2", "sse4_2"),
            ("tsc-deadline", "tsc_deadline_timer"),
            ("lahf-lm", "lahf_lm"),
        ] {
            assert_eq!(flag_for_feature(qemu).as_deref(), Some(linux), "{qemu}");
        }
        // Every mapping target is a feature QEMU knows.
        for (_, q) in LINUX_TO_QEMU {
            assert!(is_known_feature(q), "{q}");
        }
    }

    #[test]
    fn compares_a_guest() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse4_2 avx2 \
                    rep_good hypervisor bmi2\n\nprocessor\t: 1\nflags\t\t: fpu\n";
        let info = parse_cpuinfo(text).unwrap();
        assert_eq!(info.vendor_id.as_deref(), Some("GenuineIntel"));
        assert_eq!(info.unmapped, vec!["rep_good"]);
        let expected = FeatureSet::from_names(["fpu", "sse4.2", "avx2", "hypervisor", "xsave"]);
        let check = compare_guest(&expected, &info);
        assert_eq!(check.unexpected, vec!["bmi2"]);
        assert_eq!(check.absent, vec!["xsave"]);
        assert!(check.implied_by_linux.is_empty());
        // Linux adds 3dnowprefetch on AMD by itself.
        let amd = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu 3dnowprefetch\n";
        let check = compare_guest(
            &FeatureSet::from_names(["fpu"]),
            &parse_cpuinfo(amd).unwrap(),
        );
        assert!(check.unexpected.is_empty());
        assert_eq!(check.implied_by_linux, vec!["3dnowprefetch"]);
        assert!(parse_cpuinfo("processor: 0\n").is_none());
    }
}
