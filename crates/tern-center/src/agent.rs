//! The center's calls to host agents: the typed client of `tern_api`, made for a host of the
//! store over the center's one pool of connections.

pub use tern_api::{AgentClient as Agent, AgentError};

use crate::app::App;
use crate::store::HostRecord;

impl App {
    /// The agent of `host`, with the URL and token it gave at registration.
    pub fn agent(&self, host: &HostRecord) -> Agent {
        Agent::new(&self.http, &host.name, &host.agent_url, &host.agent_token)
    }
}
