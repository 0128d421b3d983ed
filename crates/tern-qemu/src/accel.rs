//! Accelerator choice: KVM where the hardware offers it, TCG otherwise.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tern_api::Accelerator;

use crate::error::{Error, Result};

/// What the host's configuration asks for (`--accel auto|kvm|tcg`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when the CPU has vmx/svm and /dev/kvm opens, else TCG with a warning.
    #[default]
    Auto,
    /// KVM or fail.
    Kvm,
    /// TCG (software emulation) always.
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!(
                "unknown accelerator `{other}`: use auto, kvm or tcg"
            )),
        }
    }
}

impl std::fmt::Display for AccelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// Picks the accelerator for this host: `(accelerator, warning to log)`.
///
/// Auto gives KVM only when /proc/cpuinfo shows `vmx` or `svm` *and* /dev/kvm opens
/// read-write: a /dev/kvm without hardware virtualization is a software hypervisor too slow
/// to boot a stock kernel. An explicit `Kvm` is honoured whenever /dev/kvm opens (the
/// operator asked for it), with a warning when the CPU lacks vmx/svm.
pub fn detect_accelerator(requested: AccelChoice) -> Result<(Accelerator, Option<String>)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let kvm_dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm: {e}"));
    choose_accelerator(requested, cpu_has_hw_virt(&cpuinfo), kvm_dev)
}

/// True when a /proc/cpuinfo text lists `vmx` (Intel VT-x) or `svm` (AMD-V).
pub fn cpu_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .filter_map(|l| l.split_once(':'))
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The decision of [`detect_accelerator`], from its observations (pure, for tests).
pub fn choose_accelerator(
    requested: AccelChoice,
    hw_virt: bool,
    kvm_dev: std::result::Result<(), String>,
) -> Result<(Accelerator, Option<String>)> {
    match requested {
        AccelChoice::Tcg => Ok((Accelerator::Tcg, None)),
        AccelChoice::Kvm => match kvm_dev {
            Ok(()) if hw_virt => Ok((Accelerator::Kvm, None)),
            Ok(()) => Ok((
                Accelerator::Kvm,
                Some(
                    "KVM forced but the CPU shows no vmx/svm: /dev/kvm is a software \
                     hypervisor and guests may be very slow"
                        .to_string(),
                ),
            )),
            Err(e) => Err(Error::KvmUnavailable(e)),
        },
        AccelChoice::Auto => match (hw_virt, kvm_dev) {
            (true, Ok(())) => Ok((Accelerator::Kvm, None)),
            (true, Err(e)) => Ok((
                Accelerator::Tcg,
                Some(format!(
                    "CPU has hardware virtualization but {e}: using TCG (slow); \
                     load kvm_intel/kvm_amd and check permissions"
                )),
            )),
            (false, Ok(())) => Ok((
                Accelerator::Tcg,
                Some(
                    "/dev/kvm exists but the CPU shows no vmx/svm (software hypervisor): \
                     using TCG"
                        .to_string(),
                ),
            )),
            (false, Err(_)) => Ok((
                Accelerator::Tcg,
                Some("no hardware virtualization (vmx/svm): using TCG (slow)".to_string()),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parsing() {
        assert!(cpu_has_hw_virt(
            "processor\t: 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpu_has_hw_virt("flags : fpu svm\n"));
        assert!(!cpu_has_hw_virt("flags\t\t: fpu vme sse vmxx\n"));
        // A model name mentioning vmx is not a flag.
        assert!(!cpu_has_hw_virt("model name : vmx svm\nflags : fpu\n"));
    }

    #[test]
    fn decisions() {
        let ok = || Ok(());
        let no = || Err("/dev/kvm: No such file or directory".to_string());
        assert_eq!(
            choose_accelerator(AccelChoice::Auto, true, ok()).unwrap(),
            (Accelerator::Kvm, None)
        );
        let (a, w) = choose_accelerator(AccelChoice::Auto, false, ok()).unwrap();
        assert_eq!(a, Accelerator::Tcg);
        assert!(w.unwrap().contains("vmx/svm"));
        let (a, w) = choose_accelerator(AccelChoice::Auto, true, no()).unwrap();
        assert_eq!(a, Accelerator::Tcg);
        assert!(w.unwrap().contains("/dev/kvm"));
        assert_eq!(
            choose_accelerator(AccelChoice::Tcg, true, ok()).unwrap(),
            (Accelerator::Tcg, None)
        );
        let err = choose_accelerator(AccelChoice::Kvm, true, no()).unwrap_err();
        assert!(err.to_string().contains("/dev/kvm"), "{err}");
        let (a, w) = choose_accelerator(AccelChoice::Kvm, false, ok()).unwrap();
        assert_eq!(a, Accelerator::Kvm);
        assert!(w.is_some());
    }

    #[test]
    fn choice_strings() {
        for c in [AccelChoice::Auto, AccelChoice::Kvm, AccelChoice::Tcg] {
            assert_eq!(c.to_string().parse::<AccelChoice>().unwrap(), c);
        }
        assert!("hvf".parse::<AccelChoice>().is_err());
    }
}
