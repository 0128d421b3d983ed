//! The types every tern process exchanges, and the HTTP clients that carry them.
//!
//! Two APIs meet here:
//! - the center's REST API (`/api/v1/...`), used by the CLI, the host agents (registration and
//!   heartbeats) and later the web UI — see [`center`];
//! - each host agent's API (`/v1/...`), used by the center only — see [`agent`].
//!
//! Units live in field names (`memory_mib`, `cpu_mhz`, `_ms`), and states are enums.

pub mod agent;
#[cfg(feature = "client")]
pub mod agent_client;
pub mod center;
#[cfg(feature = "client")]
pub mod center_client;
#[cfg(feature = "client")]
pub mod client;
pub mod datastores;
pub mod drs;
pub mod error;
pub mod evc;
pub mod guest;
pub mod health;
pub mod history;
pub mod images;
pub mod migration;
pub mod pools;
pub mod resources;
pub mod routes;
pub mod spec;

#[cfg(feature = "client")]
pub use agent_client::{AgentClient, AgentError};
#[cfg(feature = "client")]
pub use center_client::CenterClient;
#[cfg(feature = "client")]
pub use client::{ApiClient, Endpoint, HttpPool};
#[cfg(feature = "client")]
pub use error::ApiError;
pub use error::ErrorBody;
pub use guest::{CloudInit, Firmware, GuestNetwork};
pub use resources::{CpuAmount, Resources, Shares};
pub use spec::*;

/// Header carrying the bearer token on every call (`Authorization: Bearer <token>`).
pub const AUTH_HEADER: &str = "authorization";

/// Header of every center → agent call in HA mode: the calling leader's term (a decimal
/// integer, the etcd revision that elected it). An agent refuses a term below the highest it
/// has seen, so a deposed leader that wakes up cannot drive it.
pub const LEADER_TERM_HEADER: &str = "tern-leader-term";

/// Header of a standby center's refusal: the leader's URL, where the change should go.
pub const LEADER_URL_HEADER: &str = "tern-leader";

/// Default TCP port of `tern center`'s REST API.
pub const CENTER_PORT: u16 = 8700;
/// Default TCP port of a `tern host` agent's API.
pub const AGENT_PORT: u16 = 8701;
