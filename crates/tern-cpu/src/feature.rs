//! Feature names and sets: QEMU's canonical x86 feature names, their aliases, and set algebra.
//!
//! tern names a feature the way QEMU's static expansion does (`sse4.2`, `pclmulqdq`, `lahf-lm`,
//! `nx`, `pni`), so a set can go straight onto a `-cpu` argument. Every way in
//! ([`FeatureSet::from_names`], [`canonical_name`], deserialisation) maps QEMU's aliases
//! (`sse4_2`, `sse4-2`, `pclmuldq`, `xd`, `sse3`, `i64`, `lahf_lm`…) to that name. Names QEMU
//! does not know are kept (lower-cased) so sets from a newer QEMU still compare by name.
//! /proc/cpuinfo names are a separate vocabulary: see [`crate::cpuinfo`].

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::data;

/// QEMU's canonical name for `name` (alias resolved, lower-cased); unknown names come back
/// lower-cased.
pub fn canonical_name(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    if data::names().features.contains(&lower) {
        return lower;
    }
    match data::qemu_data().aliases.get(&lower) {
        Some(canonical) => canonical.clone(),
        None => lower,
    }
}

/// Whether QEMU (the version the data came from) knows `name` as a feature or feature alias.
pub fn is_known_feature(name: &str) -> bool {
    let lower = name.trim().to_ascii_lowercase();
    data::names().features.contains(&lower) || data::qemu_data().aliases.contains_key(&lower)
}

/// A set of CPU features by canonical name, kept sorted (so lists print in a stable order).
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "Vec<String>", into = "Vec<String>")]
pub struct FeatureSet(BTreeSet<String>);

impl FeatureSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// A set from names in any spelling QEMU accepts.
    pub fn from_names<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        FeatureSet(
            names
                .into_iter()
                .map(|n| canonical_name(n.as_ref()))
                .filter(|n| !n.is_empty())
                .collect(),
        )
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains(&canonical_name(name))
    }

    /// Adds a feature; true if it was not there.
    pub fn insert(&mut self, name: &str) -> bool {
        self.0.insert(canonical_name(name))
    }

    /// Removes a feature; true if it was there.
    pub fn remove(&mut self, name: &str) -> bool {
        self.0.remove(&canonical_name(name))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.iter().map(String::as_str)
    }

    pub fn is_subset(&self, other: &FeatureSet) -> bool {
        self.0.is_subset(&other.0)
    }

    pub fn is_superset(&self, other: &FeatureSet) -> bool {
        self.0.is_superset(&other.0)
    }

    /// The features of `self` that `other` lacks, sorted: what a host or mode `other` is
    /// missing to offer `self`.
    pub fn missing_in(&self, other: &FeatureSet) -> Vec<String> {
        self.0.difference(&other.0).cloned().collect()
    }

    pub fn intersection(&self, other: &FeatureSet) -> FeatureSet {
        FeatureSet(self.0.intersection(&other.0).cloned().collect())
    }

    pub fn union(&self, other: &FeatureSet) -> FeatureSet {
        FeatureSet(self.0.union(&other.0).cloned().collect())
    }

    pub fn difference(&self, other: &FeatureSet) -> FeatureSet {
        FeatureSet(self.0.difference(&other.0).cloned().collect())
    }

    /// The names as a vector (sorted), e.g. for `HostFacts::cpu_capability`.
    pub fn to_vec(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
}

impl From<Vec<String>> for FeatureSet {
    fn from(names: Vec<String>) -> Self {
        FeatureSet::from_names(names)
    }
}

impl From<FeatureSet> for Vec<String> {
    fn from(set: FeatureSet) -> Self {
        set.0.into_iter().collect()
    }
}

impl<S: AsRef<str>> FromIterator<S> for FeatureSet {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        FeatureSet::from_names(iter)
    }
}

impl<'a> IntoIterator for &'a FeatureSet {
    type Item = &'a String;
    type IntoIter = std::collections::btree_set::Iter<'a, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for FeatureSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().collect();
        f.write_str(&names.join(" "))
    }
}

impl fmt::Debug for FeatureSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_map_to_one_name() {
        for (alias, canonical) in [
            ("sse4_2", "sse4.2"),
            ("sse4-2", "sse4.2"),
            ("SSE4.2", "sse4.2"),
            ("sse4_1", "sse4.1"),
            ("pclmuldq", "pclmulqdq"),
            ("sse3", "pni"),
            ("xd", "nx"),
            ("i64", "lm"),
            ("lahf_lm", "lahf-lm"),
            ("ffxsr", "fxsr-opt"),
            ("kvm_pv_eoi", "kvm-pv-eoi"),
        ] {
            assert_eq!(canonical_name(alias), canonical, "{alias}");
            assert!(is_known_feature(alias), "{alias}");
        }
        assert_eq!(canonical_name("Frobnicate"), "frobnicate");
        assert!(!is_known_feature("frobnicate"));
        // Options are not features.
        assert!(!is_known_feature("pmu"));
        assert!(!is_known_feature("enforce"));
    }

    #[test]
    fn set_algebra() {
        let a = FeatureSet::from_names(["sse4_2", "avx2", "pclmuldq"]);
        let b = FeatureSet::from_names(["sse4.2", "pclmulqdq", "avx2", "bmi2"]);
        assert!(a.is_subset(&b));
        assert!(b.is_superset(&a));
        assert!(!b.is_subset(&a));
        assert_eq!(b.missing_in(&a), vec!["bmi2".to_string()]);
        assert!(a.missing_in(&b).is_empty());
        assert_eq!(a.intersection(&b), a);
        assert_eq!(a.union(&b), b);
        assert_eq!(b.difference(&a).to_vec(), vec!["bmi2"]);
        assert!(a.contains("SSE4_2"));
    }

    #[test]
    fn serde_canonicalises() {
        let set: FeatureSet = serde_json::from_str(r#"["sse4_1","xd","avx"]"#).unwrap();
        assert_eq!(
            serde_json::to_string(&set).unwrap(),
            r#"["avx","nx","sse4.1"]"#
        );
    }
}
