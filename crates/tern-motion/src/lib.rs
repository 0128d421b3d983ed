//! tern-motion: live migration's decisions, as EVC's are `tern-cpu`'s and DRS's `tern-drs`'s.
//! Pure — no QEMU, no clock, no I/O: measurements and QEMU's figures come in as values,
//! decisions go out with their reasons; the center and the host agents drive them.
//!
//! - [`settings`]: the settings a migration starts with ([`choose_settings`]), from the
//!   request, the measured link and dirty rate, and the hosts' [`HostBudget`].
//! - [`converge`]: the [`ConvergenceWatcher`] that escalates while pre-copy runs, and waits
//!   out a disturbed link instead of throttling the guest for it.
//! - [`pace`]: the [`Pacer`] that re-judges a pace tern derived from its own link measurement.
//! - [`handover`]: the ownership record's states and legal transitions, and which way a
//!   migration stopped part-way is settled ([`settle`]) — forward only after post-copy.
//! - [`stage`]: the driver's [`Stage`]s and the progress each stands for.
//! - [`version`]: stream compatibility — [`QemuVersion`] and the fixed [`MACHINE_TYPE`].

pub mod converge;
pub mod handover;
pub mod pace;
pub mod settings;
pub mod stage;
pub mod version;

#[cfg(test)]
mod fixtures;

pub use converge::{Action, ConvergenceWatcher, Decision, PrecopySample, SamplePhase};
pub use handover::{settle, RecordState, Side, SourceState, Step, Way};
pub use pace::Pacer;
pub use settings::{choose_encryption, choose_settings, mbit_to_mib_s, HostBudget};
pub use stage::Stage;
pub use version::{QemuVersion, MACHINE_TYPE};
