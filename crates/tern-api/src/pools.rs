//! Resource pools: a tree per cluster that divides its CPU and memory, as vSphere users know
//! it. A pool has shares, a reservation and a limit for each resource, and an expandable
//! reservation flag; VMs belong to at most one pool (none: the cluster's root).
//!
//! The center divides each pool's settings down to its VMs (see `tern_center::pools`), and
//! the hosts enforce what reaches each VM like the VM's own policy.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::resources::Shares;

/// Largest pool CPU amount: 1,000 hosts of 100 cores at 10 GHz.
pub const MAX_POOL_MHZ: u64 = 1_000_000_000;

/// CPU settings of a pool (MHz: a pool spans hosts, so a share of one core means nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolCpu {
    #[serde(default)]
    #[schema(value_type = String, example = "high")]
    pub shares: Shares,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_mhz: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_mhz: Option<u64>,
    /// Children may reserve beyond the pool's reservation, borrowing from its parent.
    #[serde(default = "yes")]
    pub expandable: bool,
}

/// Memory settings of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolMemory {
    #[serde(default)]
    #[schema(value_type = String, example = "normal")]
    pub shares: Shares,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_mib: Option<u64>,
    /// Most memory the pool's running VMs together are configured with: a VM whose start
    /// would go beyond it is refused (there is no balloon to squeeze running guests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_mib: Option<u64>,
    #[serde(default = "yes")]
    pub expandable: bool,
}

fn yes() -> bool {
    true
}

impl Default for PoolCpu {
    fn default() -> PoolCpu {
        PoolCpu {
            shares: Shares::Normal,
            reservation_mhz: None,
            limit_mhz: None,
            expandable: true,
        }
    }
}

impl Default for PoolMemory {
    fn default() -> PoolMemory {
        PoolMemory {
            shares: Shares::Normal,
            reservation_mib: None,
            limit_mib: None,
            expandable: true,
        }
    }
}

/// What a pool is set to (the body of create and update).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// Parent pool (same cluster); `None`: a child of the cluster's root.
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub cpu: PoolCpu,
    #[serde(default)]
    pub memory: PoolMemory,
}

impl PoolSettings {
    /// Checks the numbers on their own (the tree's fit is the center's to check).
    pub fn check(&self) -> Result<(), String> {
        let c = &self.cpu;
        for (what, v) in [("reservation", c.reservation_mhz), ("limit", c.limit_mhz)] {
            if let Some(v) = v {
                if v == 0 || v > MAX_POOL_MHZ {
                    return Err(format!(
                        "CPU {what} {v} MHz: expected 1 to {MAX_POOL_MHZ} MHz"
                    ));
                }
            }
        }
        if let (Some(r), Some(l)) = (c.reservation_mhz, c.limit_mhz) {
            if r > l {
                return Err(format!(
                    "CPU reservation {r} MHz is above the CPU limit {l} MHz"
                ));
            }
        }
        let m = &self.memory;
        for (what, v) in [("reservation", m.reservation_mib), ("limit", m.limit_mib)] {
            if v == Some(0) {
                return Err(format!("memory {what} 0 MiB: give at least 1 MiB, or none"));
            }
        }
        if let (Some(r), Some(l)) = (m.reservation_mib, m.limit_mib) {
            if r > l {
                return Err(format!(
                    "memory reservation {r} MiB is above the memory limit {l} MiB"
                ));
            }
        }
        Ok(())
    }
}

/// Body of `POST /api/v1/clusters/{name}/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePool {
    /// Unique in the center, like a VM name.
    pub name: String,
    /// Parent pool (same cluster); `None`: a child of the cluster's root.
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub cpu: PoolCpu,
    #[serde(default)]
    pub memory: PoolMemory,
}

impl CreatePool {
    pub fn settings(&self) -> PoolSettings {
        PoolSettings {
            parent: self.parent.clone(),
            cpu: self.cpu,
            memory: self.memory,
        }
    }
}

/// A pool as the center shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResourcePool {
    pub name: String,
    pub cluster: String,
    pub settings: PoolSettings,
    /// Pools whose parent this is.
    #[serde(default)]
    pub children: Vec<String>,
    /// VMs that belong to it directly.
    #[serde(default)]
    pub vms: Vec<String>,
}

/// Body of `PUT /api/v1/vms/{name}/pool`: the VM's pool (`None`: the cluster's root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetVmPool {
    pub pool: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let mut s = PoolSettings::default();
        assert!(s.check().is_ok());
        s.cpu.reservation_mhz = Some(3000);
        s.cpu.limit_mhz = Some(2000);
        assert!(s.check().unwrap_err().contains("above the CPU limit"));
        s.cpu.limit_mhz = Some(0);
        assert!(s.check().is_err());
        let mut s = PoolSettings::default();
        s.memory.reservation_mib = Some(2048);
        s.memory.limit_mib = Some(1024);
        assert!(s.check().unwrap_err().contains("memory reservation"));
    }

    #[test]
    fn create_body_is_flat() {
        let c: CreatePool = serde_json::from_str(
            r#"{"name":"gold","parent":null,"cpu":{"shares":"high","limit_mhz":4000}}"#,
        )
        .unwrap();
        assert_eq!(c.cpu.shares, Shares::High);
        assert!(c.cpu.expandable);
        assert!(serde_json::from_str::<CreatePool>(r#"{"name":"x","cpus":{}}"#).is_err());
    }
}
