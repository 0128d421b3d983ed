//! Requests, measurements and host budgets the unit tests share.

use tern_api::migration::{Measurements, MigrateVm};

use crate::settings::HostBudget;
use crate::version::QemuVersion;

pub const V10: QemuVersion = QemuVersion {
    major: 10,
    minor: 0,
    micro: 2,
};

pub fn req() -> MigrateVm {
    MigrateVm {
        to: "h2".into(),
        downtime_ms: None,
        deadline_ms: None,
        bandwidth_mbit: None,
        allow_postcopy: false,
        dry_run: false,
        probe_link: false,
    }
}

pub fn meas(memory_mib: u64, dirty: f64, link_mbit: f64) -> Measurements {
    Measurements {
        memory_mib,
        dirty_rate_mib_s: Some(dirty),
        link_mbit,
        link_age_s: None,
    }
}

pub fn hosts(cores: u32) -> HostBudget {
    HostBudget {
        spare_cores: cores,
        qemu: V10,
        encrypted: false,
        relayed: false,
    }
}
