//! A VM's resource policy — CPU and memory shares, reservations and limits, as vSphere
//! users know them — and its checks. The center stores it in the VM's spec, DRS reads it, and
//! the host's agent enforces it with the QEMU process's cgroup.
//!
//! Amounts are typed values parsed from their text form (`500MHz`, `25%`, `high`, `3000`), so
//! nothing a request or a file says reaches a cgroup file unparsed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Largest CPU amount accepted: 1,000 cores' worth (of MHz or percent).
const MAX_CPU_MHZ: u32 = 10_000_000;
const MAX_CPU_PERCENT: u32 = 100_000;
/// Largest custom shares value (vSphere's limit is 1,000,000).
pub const MAX_CUSTOM_SHARES: u32 = 1_000_000;

/// Proportional share of a resource under contention: `low`, `normal`, `high` (1 : 2 : 4, per
/// vCPU for CPU, per MiB for memory, like vSphere), or an absolute number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Shares {
    Low,
    #[default]
    Normal,
    High,
    Custom(u32),
}

impl Shares {
    /// CPU shares of a VM with `vcpus` vCPUs: 1000 per vCPU at `normal` (vSphere's figures).
    pub fn cpu_shares(self, vcpus: u32) -> u64 {
        let per_vcpu = match self {
            Shares::Low => 500,
            Shares::Normal => 1000,
            Shares::High => 2000,
            Shares::Custom(n) => return u64::from(n.max(1)),
        };
        per_vcpu * u64::from(vcpus.max(1))
    }
}

impl fmt::Display for Shares {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shares::Low => f.write_str("low"),
            Shares::Normal => f.write_str("normal"),
            Shares::High => f.write_str("high"),
            Shares::Custom(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for Shares {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "low" => Ok(Shares::Low),
            "normal" => Ok(Shares::Normal),
            "high" => Ok(Shares::High),
            n => match n.parse::<u32>() {
                Ok(v) if (1..=MAX_CUSTOM_SHARES).contains(&v) => Ok(Shares::Custom(v)),
                _ => Err(format!(
                    "shares {s:?}: expected low, normal, high or a number from 1 to \
                     {MAX_CUSTOM_SHARES}"
                )),
            },
        }
    }
}

/// An amount of CPU: MHz (`1500MHz`, `2GHz`), or percent of one core (`25%`; `200%` is two
/// cores). MHz are turned into cores with the host's own MHz per core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuAmount {
    Mhz(u32),
    CorePercent(u32),
}

impl CpuAmount {
    /// In cores of a host whose cores run at `core_mhz`.
    pub fn cores(self, core_mhz: u32) -> f64 {
        match self {
            CpuAmount::Mhz(m) => f64::from(m) / f64::from(core_mhz.max(1)),
            CpuAmount::CorePercent(p) => f64::from(p) / 100.0,
        }
    }

    /// In MHz of a host whose cores run at `core_mhz`.
    pub fn mhz(self, core_mhz: u32) -> f64 {
        match self {
            CpuAmount::Mhz(m) => f64::from(m),
            CpuAmount::CorePercent(p) => f64::from(p) / 100.0 * f64::from(core_mhz),
        }
    }
}

impl fmt::Display for CpuAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuAmount::Mhz(m) => write!(f, "{m}MHz"),
            CpuAmount::CorePercent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for CpuAmount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "CPU amount {s:?}: expected MHz (e.g. 1500MHz, 2GHz) or percent of one core \
                 (e.g. 25%, 200% for two cores), above zero"
            )
        };
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        let (digits, scale, max) = if let Some(n) = lower.strip_suffix("mhz") {
            (n, 1, MAX_CPU_MHZ)
        } else if let Some(n) = lower.strip_suffix("ghz") {
            (n, 1000, MAX_CPU_MHZ)
        } else if let Some(n) = lower.strip_suffix('%') {
            (n, 1, MAX_CPU_PERCENT)
        } else {
            return Err(bad());
        };
        let digits = digits.trim();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let v = digits
            .parse::<u32>()
            .ok()
            .and_then(|v| v.checked_mul(scale))
            .filter(|v| (1..=max).contains(v))
            .ok_or_else(bad)?;
        Ok(if lower.ends_with('%') {
            CpuAmount::CorePercent(v)
        } else {
            CpuAmount::Mhz(v)
        })
    }
}

macro_rules! serde_as_text {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_text!(Shares);
serde_as_text!(CpuAmount);

/// A VM's resource policy. Everything is optional: the default is normal shares, no
/// reservation and no limit, which is what a VM without a policy gets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU under contention, against the host's other VMs.
    #[serde(default, skip_serializing_if = "is_normal")]
    #[schema(value_type = String, example = "high")]
    pub cpu_shares: Shares,
    /// CPU the VM gets whenever it asks for it, however busy the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "500MHz")]
    pub cpu_reservation: Option<CpuAmount>,
    /// Most CPU the VM may use, even on an idle host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "25%")]
    pub cpu_limit: Option<CpuAmount>,
    /// Memory under contention (used by DRS's entitlements; Linux has no memory weight).
    #[serde(default, skip_serializing_if = "is_normal")]
    #[schema(value_type = String, example = "normal")]
    pub memory_shares: Shares,
    /// Host memory kept for the VM's QEMU process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_reservation_mib: Option<u64>,
    /// Most host memory the VM's QEMU process (guest RAM and QEMU's own) may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<u64>,
}

fn is_normal(s: &Shares) -> bool {
    *s == Shares::Normal
}

impl Resources {
    pub fn is_default(&self) -> bool {
        *self == Resources::default()
    }

    /// Checks the policy against the VM it is for (`vcpus` vCPUs, `memory_mib` of RAM); the
    /// error says what is wrong and what would be accepted.
    pub fn check(&self, vcpus: u32, memory_mib: u64) -> Result<(), String> {
        if let (Some(r), Some(l)) = (self.cpu_reservation, self.cpu_limit) {
            let comparable = match (r, l) {
                (CpuAmount::Mhz(a), CpuAmount::Mhz(b)) => Some((a, b)),
                (CpuAmount::CorePercent(a), CpuAmount::CorePercent(b)) => Some((a, b)),
                _ => None,
            };
            if let Some((r_v, l_v)) = comparable {
                if r_v > l_v {
                    return Err(format!(
                        "CPU reservation {r} is above the CPU limit {l}: a VM cannot be \
                         guaranteed more than it may use"
                    ));
                }
            } else {
                return Err(format!(
                    "CPU reservation {r} and limit {l} use different units: give both in MHz \
                     or both in percent of a core"
                ));
            }
        }
        let vcpu_percent = u64::from(vcpus.max(1)) * 100;
        for (what, amount) in [
            ("reservation", self.cpu_reservation),
            ("limit", self.cpu_limit),
        ] {
            if let Some(CpuAmount::CorePercent(p)) = amount {
                if u64::from(p) > vcpu_percent {
                    return Err(format!(
                        "CPU {what} {p}% is more than the VM's {vcpus} vCPU(s) can use \
                         ({vcpu_percent}% at most)"
                    ));
                }
            }
        }
        if let Some(r) = self.memory_reservation_mib {
            if r == 0 || r > memory_mib {
                return Err(format!(
                    "memory reservation {r} MiB: expected 1 to the VM's {memory_mib} MiB"
                ));
            }
        }
        if let Some(l) = self.memory_limit_mib {
            // No balloon yet: a QEMU held below its guest's RAM is killed by the host's OOM
            // killer once the guest touches its memory.
            if l < memory_mib {
                return Err(format!(
                    "memory limit {l} MiB is below the VM's {memory_mib} MiB of RAM: the \
                     host would kill the VM once its guest uses its memory (tern has no \
                     balloon); give at least {memory_mib} MiB, or make the VM smaller"
                ));
            }
            if let Some(r) = self.memory_reservation_mib {
                if r > l {
                    return Err(format!(
                        "memory reservation {r} MiB is above the memory limit {l} MiB"
                    ));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for Resources {
    /// One line, e.g. `cpu shares high, reservation 500MHz, limit 25%; memory shares normal`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpu shares {}", self.cpu_shares)?;
        if let Some(r) = self.cpu_reservation {
            write!(f, ", reservation {r}")?;
        }
        if let Some(l) = self.cpu_limit {
            write!(f, ", limit {l}")?;
        }
        write!(f, "; memory shares {}", self.memory_shares)?;
        if let Some(r) = self.memory_reservation_mib {
            write!(f, ", reservation {r} MiB")?;
        }
        if let Some(l) = self.memory_limit_mib {
            write!(f, ", limit {l} MiB")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_amounts_parse_from_their_text_and_nothing_else() {
        assert_eq!("1500MHz".parse(), Ok(CpuAmount::Mhz(1500)));
        assert_eq!("2GHz".parse(), Ok(CpuAmount::Mhz(2000)));
        assert_eq!("25%".parse(), Ok(CpuAmount::CorePercent(25)));
        assert_eq!(" 200% ".parse(), Ok(CpuAmount::CorePercent(200)));
        for bad in [
            "",
            "%",
            "0%",
            "-5%",
            "25",
            "2.5GHz",
            "1e3MHz",
            "25%%",
            "../x",
            "5000000GHz",
            "25 %x",
            "0MHz",
        ] {
            assert!(bad.parse::<CpuAmount>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(CpuAmount::Mhz(1000).cores(2000), 0.5);
        assert_eq!(CpuAmount::CorePercent(150).cores(2000), 1.5);
        assert_eq!(CpuAmount::CorePercent(50).mhz(3000), 1500.0);
    }

    #[test]
    fn shares_parse_levels_and_bounded_numbers() {
        assert_eq!("high".parse(), Ok(Shares::High));
        assert_eq!("3000".parse(), Ok(Shares::Custom(3000)));
        for bad in ["", "0", "High", "1000001", "-1", "normal "] {
            assert!(bad.parse::<Shares>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(Shares::High.cpu_shares(2), 4000);
        assert_eq!(Shares::Low.cpu_shares(1), 500);
        assert_eq!(Shares::Custom(7).cpu_shares(4), 7);
    }

    #[test]
    fn a_policy_travels_as_text_and_the_default_as_nothing() {
        let r = Resources {
            cpu_shares: Shares::High,
            cpu_limit: Some(CpuAmount::CorePercent(25)),
            memory_limit_mib: Some(512),
            ..Resources::default()
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"cpu_shares": "high", "cpu_limit": "25%", "memory_limit_mib": 512})
        );
        assert_eq!(serde_json::from_value::<Resources>(j).unwrap(), r);
        assert_eq!(
            serde_json::to_value(Resources::default()).unwrap(),
            serde_json::json!({})
        );
        assert!(
            serde_json::from_value::<Resources>(serde_json::json!({"cpu_limit": "25"})).is_err()
        );
        assert!(
            serde_json::from_value::<Resources>(serde_json::json!({"cpu_quota": "25%"})).is_err()
        );
    }

    #[test]
    fn checks_refuse_what_cannot_hold() {
        let ok = Resources {
            cpu_reservation: Some(CpuAmount::CorePercent(20)),
            cpu_limit: Some(CpuAmount::CorePercent(50)),
            memory_reservation_mib: Some(128),
            memory_limit_mib: Some(512),
            ..Resources::default()
        };
        assert_eq!(ok.check(1, 256), Ok(()));
        let cases = [
            (
                Resources {
                    cpu_reservation: Some(CpuAmount::CorePercent(60)),
                    cpu_limit: Some(CpuAmount::CorePercent(50)),
                    ..Resources::default()
                },
                "above the CPU limit",
            ),
            (
                Resources {
                    cpu_reservation: Some(CpuAmount::Mhz(500)),
                    cpu_limit: Some(CpuAmount::CorePercent(50)),
                    ..Resources::default()
                },
                "different units",
            ),
            (
                Resources {
                    cpu_limit: Some(CpuAmount::CorePercent(150)),
                    ..Resources::default()
                },
                "1 vCPU(s)",
            ),
            (
                Resources {
                    memory_limit_mib: Some(200),
                    ..Resources::default()
                },
                "below the VM's 256 MiB",
            ),
            (
                Resources {
                    memory_reservation_mib: Some(300),
                    ..Resources::default()
                },
                "expected 1 to the VM's 256 MiB",
            ),
        ];
        for (r, needle) in cases {
            let e = r.check(1, 256).expect_err(needle);
            assert!(e.contains(needle), "{e}");
        }
    }
}
