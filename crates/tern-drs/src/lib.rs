//! tern-drs: the DRS engine — placement, load balancing, rules, resource pools and
//! maintenance evacuation as pure functions from a cluster snapshot to decisions with
//! reasons — and a trace-driven simulator that compares it with baseline policies.
//!
//! No I/O: the engine reads a [`Snapshot`] and returns decisions; the simulator's trace
//! parser reads from any `BufRead` its caller opens. Deterministic: the same snapshot gives
//! the same decisions, the same seed the same simulation.
//!
//! - [`place`] / [`place_all`]: the best host for a VM being powered on, or an
//!   [`AdmissionFailure`] naming the reservation or rule that fails.
//! - [`balance`]: one DRS pass at a [`Threshold`]: prioritized migrations with reasons,
//!   imbalance after each, cost-benefit, hysteresis, cooldown and a move cap.
//! - [`evacuate`]: a maintenance plan that empties a host, with blockers.
//! - [`explain`]: the same decisions in words.
//! - [`sim`]: the simulator, workload generator, trace format and baselines.
//!
//! The imbalance of a cluster is `√(w_cpu·var(cpu load) + w_mem·var(memory load))` over
//! its connected hosts, where a host's load in a resource is the sum of its VMs'
//! entitlements divided by its capacity; `w_cpu = w_mem = 0.5` by default (see
//! [`Config::cpu_weight`] for why).

pub mod balance;
mod cluster;
pub mod cost;
pub mod decision;
pub mod entitlement;
pub mod evacuate;
pub mod explain;
pub mod model;
pub mod place;
pub mod rng;
pub mod sim;

pub use balance::balance;
pub use decision::*;
pub use evacuate::evacuate;
pub use model::*;
pub use place::{admit_on, place, place_all, PlaceError};
