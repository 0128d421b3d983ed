//! The trace-driven simulator: replays a cluster over time under tern's engine or a
//! baseline policy and reports imbalance, overload, migrations, rule violations and engine
//! time per pass.
//!
//! - [`workload`]: the workload model and the seeded synthetic generator;
//! - [`trace`]: the CSV trace format (read from / written to caller-opened streams);
//! - [`baseline`]: the policies compared (none, greedy, LowNodeUtilization, tern);
//! - [`run`]: the simulation loop; [`report`]: the markdown table.

pub mod baseline;
pub mod report;
pub mod run;
pub mod trace;
pub mod workload;

pub use baseline::Policy;
pub use run::{simulate, SimOptions, SimReport};
pub use workload::{synthetic, ShapeMix, SyntheticSpec, Workload};
