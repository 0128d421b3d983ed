//! x86 CPU compatibility for tern (EVC): feature sets, the catalogue of named baselines, host
//! capability, cluster EVC rules, per-VM CPU models and the migration CPU pre-check.
//!
//! Pure: no I/O. The vendor models' feature sets are data generated from QEMU
//! (`scripts/gen-cpu-models.py` → `data/qemu-cpu-models.json`) and embedded at build time.
//!
//! Typical use:
//! - an agent expands QEMU's `host` (KVM) or `max` (TCG) model over QMP, parses the answer with
//!   [`parse_expansion`] and builds a [`HostCapability`] (optionally under a `--cpu-ceiling`);
//! - the center checks hosts against a cluster's mode with [`evc::check_join`], picks modes with
//!   [`evc::best_common_mode`], and changes them with [`evc::plan_mode_change`];
//! - starting a VM, [`vm::resolve`] gives its exact features and QEMU's `-cpu` argument; the
//!   result ([`VmCpu`]) is recorded with the VM and checked by [`migrate::precheck`] before
//!   each migration.

pub mod catalogue;
pub mod cpuinfo;
pub mod data;
mod error;
pub mod evc;
pub mod expansion;
pub mod feature;
pub mod host;
pub mod migrate;
pub mod vm;

pub use catalogue::{catalogue, Baseline, Catalogue, Line, Source, Vendor};
pub use error::{CpuError, HostMissing, VmExtra};
pub use expansion::{parse_expansion, CpuModelExpansion};
pub use feature::FeatureSet;
pub use host::{Accel, CpuIdentity, HostCapability};
pub use vm::{CpuRequest, VmCpu, VmCpuKind};
