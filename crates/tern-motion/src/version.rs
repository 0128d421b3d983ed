//! What makes two QEMUs' migration streams compatible: the QEMU version (a newer QEMU loads an
//! older one's stream, never the reverse) and the fixed machine type both sides run.

use serde::{Deserialize, Serialize};

/// The machine type every tern VM runs: versioned, never the `q35` alias, so the device model
/// is the same on every host whatever QEMU it has (a stream loads only into the same type).
pub const MACHINE_TYPE: &str = "pc-q35-10.0";

/// QEMU's version (from the QMP greeting, or a host's facts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl QemuVersion {
    /// Reads `10.0.2`, `9.2` or `10.1.0 (Debian …)`: the first word, missing parts as 0.
    /// `None` when it is not a version.
    pub fn parse(text: &str) -> Option<QemuVersion> {
        let v = text.split_whitespace().next()?;
        let mut parts = v.split('.').map(|p| p.parse::<u32>());
        Some(QemuVersion {
            major: parts.next()?.ok()?,
            minor: parts.next().unwrap_or(Ok(0)).ok()?,
            micro: parts.next().unwrap_or(Ok(0)).ok()?,
        })
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_order() {
        let v = QemuVersion::parse("10.0.2").expect("a version");
        assert_eq!((v.major, v.minor, v.micro), (10, 0, 2));
        assert_eq!(v.to_string(), "10.0.2");
        assert_eq!(
            QemuVersion::parse("9.2"),
            Some(QemuVersion {
                major: 9,
                minor: 2,
                micro: 0
            })
        );
        assert!(QemuVersion::parse("10.1.0 (Debian)").expect("a version") > v);
        assert_eq!(QemuVersion::parse("garbage"), None);
        assert_eq!(QemuVersion::parse("10.x"), None);
        assert_eq!(QemuVersion::parse(""), None);
    }
}
