//! The QEMU driver: command line from a VM spec, async QMP client, lifecycle, migration
//! control and statistics.
//!
//! - [`detect_accelerator`] picks KVM or TCG for the host.
//! - [`build_command`] turns a [`LaunchConfig`] (VM spec + host choices) into QEMU's argv:
//!   pure, tested without QEMU.
//! - [`QemuVm`] is one QEMU process: [`QemuVm::launch`] starts it in a session of its own (it
//!   outlives the agent), [`QemuVm::adopt`] takes it back after an agent restart, and the lifecycle
//!   (status, pause/resume, shutdown, kill, exit reason, /proc stats) and migration control
//!   (capabilities, parameters, incoming/outgoing, progress, dirty rate, announce) run over
//!   its [`Qmp`] connection.
//! - [`migrate`] drives the two ends of a migration: [`Outgoing`] (source: configure, send,
//!   escalate as `tern-motion`'s convergence watcher decides from the samples it is fed,
//!   stop paused at pre-switchover for the hand-over decision) and
//!   [`IncomingMigration`] (destination: paused, listening for this VM only, run on commit).
//! - [`probe_cpu`] tells what this host's QEMU offers (version, CPU models, host CPU
//!   features) without a VM, for host facts and EVC.

pub mod accel;
pub mod command;
pub mod error;
pub mod migrate;
pub mod migration;
pub mod probe;
pub mod process;
pub mod qmp;
pub mod vm;

pub use accel::{detect_accelerator, AccelChoice};
pub use command::{
    build_command, GuestFiles, Incoming, LaunchConfig, OpenedBacking, OpenedFile, RunAs, RunPaths,
    SharedFd, UefiFiles,
};
pub use error::{Error, QmpErrorClass, Result};
pub use migrate::{
    relay_socket, Incoming as IncomingMigration, IncomingStatus, MigrationReport, Outgoing,
    OutgoingOptions, OutgoingStatus, Resume, SwitchoverLeave, COMMIT_ANNOUNCE,
};
pub use migration::{
    AnnounceParams, CpuExpansion, DirtyRate, DirtyRateStatus, MigrationStats, MigrationStatus,
    ReceiveRingTail, RING_TAIL_BUFFERS,
};
pub use probe::{probe_cpu, CpuModelInfo, CpuProbe, QemuProbe};
pub use process::{owner as process_owner, VmStats};
pub use qmp::{wait_event, Qmp, QmpEvent, QmpGreeting};
pub use tern_api::Accelerator;
pub use tern_motion::{QemuVersion, MACHINE_TYPE};
pub use vm::{ExitReason, QemuVm, RunState};
