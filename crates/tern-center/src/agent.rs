//! Calls from the center to a host agent's API (`/v1`), with the URL and token the agent gave
//! at registration.

use std::time::Duration;

use tern_api::agent::{CheckPaths, PathsReport, StartVm, VmRuntime};
use tern_api::center::StopVm;
use tern_api::migration::{
    AgentMigrationState, AgentMigrationStatus, BandwidthProbe, BandwidthReport, BandwidthSink,
    Commit, DirtyRateReport, IncomingReady, ListenIncoming, MeasureDirtyRate, PrepareIncoming,
    StartOutgoing,
};
use tern_api::{ApiClient, ApiError, Endpoint};
use uuid::Uuid;

use crate::store::HostRecord;

/// Time allowed for quick agent calls (facts, paths, state).
const QUICK: Duration = Duration::from_secs(15);
/// Time allowed for a VM start (the agent answers once QEMU reports `running`).
const START: Duration = Duration::from_secs(120);
/// Margin over a stop's own grace time.
const STOP_MARGIN: Duration = Duration::from_secs(20);
/// Time allowed for a switchover (the final copy, at the migration's bandwidth).
const SWITCHOVER: Duration = Duration::from_secs(120);
/// Time allowed for finishing a migrated source (after post-copy it first sends the pages the
/// destination has not fetched yet).
const FINISH: Duration = Duration::from_secs(660);
/// Time allowed for the bandwidth probe (a quarter of a second of sending, plus connecting).
const PROBE: Duration = Duration::from_secs(60);
/// Grace time of a graceful stop when the caller gives none (as the agent API documents).
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(30);

/// The agent of one host.
#[derive(Debug, Clone)]
pub struct Agent {
    pub host: String,
    pub url: String,
    token: String,
}

/// A failed agent call, described for users.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent answered with an error status.
    #[error("host {host} answered: {message}")]
    Refused {
        host: String,
        status: u16,
        message: String,
    },
    #[error("cannot reach the agent of host {host} at {url}: {detail}")]
    Unreachable {
        host: String,
        url: String,
        detail: String,
    },
}

impl AgentError {
    pub fn status(&self) -> Option<u16> {
        match self {
            AgentError::Refused { status, .. } => Some(*status),
            AgentError::Unreachable { .. } => None,
        }
    }
}

impl Agent {
    pub fn of(host: &HostRecord) -> Agent {
        Agent {
            host: host.name.clone(),
            url: host.agent_url.clone(),
            token: host.agent_token.clone(),
        }
    }

    fn client(&self, timeout: Duration) -> Result<ApiClient, AgentError> {
        ApiClient::with_timeout(Endpoint::Tcp(self.url.clone()), &self.token, timeout)
            .map_err(|e| self.error(e))
    }

    fn error(&self, e: ApiError) -> AgentError {
        match e {
            ApiError::Status { status, message } => AgentError::Refused {
                host: self.host.clone(),
                status,
                message,
            },
            // `{:#}`-like chain: reqwest's top-level text alone hides the cause.
            ApiError::Transport { source, .. } => {
                let mut detail = source.to_string();
                let mut cause = std::error::Error::source(&source);
                while let Some(c) = cause {
                    detail.push_str(": ");
                    detail.push_str(&c.to_string());
                    cause = c.source();
                }
                AgentError::Unreachable {
                    host: self.host.clone(),
                    url: self.url.clone(),
                    detail,
                }
            }
            ApiError::Decode { detail, .. } => AgentError::Unreachable {
                host: self.host.clone(),
                url: self.url.clone(),
                detail: format!("unexpected answer: {detail}"),
            },
        }
    }

    pub async fn check_paths(&self, paths: Vec<String>) -> Result<PathsReport, AgentError> {
        self.client(QUICK)?
            .post("/v1/check-paths", &CheckPaths { paths })
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn start(&self, id: Uuid, req: &StartVm) -> Result<VmRuntime, AgentError> {
        self.client(START)?
            .put(&format!("/v1/vms/{id}"), req)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn stop(&self, id: Uuid, req: &StopVm) -> Result<VmRuntime, AgentError> {
        let grace = if req.force {
            Duration::ZERO
        } else {
            req.timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_STOP_GRACE)
        };
        self.client(grace + STOP_MARGIN)?
            .post(&format!("/v1/vms/{id}/stop"), req)
            .await
            .map_err(|e| self.error(e))
    }

    /// The VM as the agent sees it; `None` if the agent does not know it (never started there,
    /// or its files were removed).
    pub async fn vm(&self, id: Uuid) -> Result<Option<VmRuntime>, AgentError> {
        match self.client(QUICK)?.get(&format!("/v1/vms/{id}")).await {
            Ok(rt) => Ok(Some(rt)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(self.error(e)),
        }
    }

    pub async fn delete(&self, id: Uuid) -> Result<(), AgentError> {
        match self.client(QUICK)?.delete(&format!("/v1/vms/{id}")).await {
            Ok(()) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Every VM the agent knows.
    pub async fn vms(&self) -> Result<Vec<VmRuntime>, AgentError> {
        self.client(QUICK)?
            .get("/v1/vms")
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn resume(&self, id: Uuid) -> Result<VmRuntime, AgentError> {
        self.client(QUICK)?
            .post(&format!("/v1/vms/{id}/resume"), &())
            .await
            .map_err(|e| self.error(e))
    }

    // ---- migrations (tern_api::migration) ----

    pub async fn migration_incoming(
        &self,
        id: Uuid,
        req: &PrepareIncoming,
    ) -> Result<IncomingReady, AgentError> {
        self.client(START)?
            .post(&format!("/v1/migrations/{id}/incoming"), req)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_listen(
        &self,
        id: Uuid,
        req: &ListenIncoming,
    ) -> Result<IncomingReady, AgentError> {
        self.client(START)?
            .post(&format!("/v1/migrations/{id}/listen"), req)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_outgoing(
        &self,
        id: Uuid,
        req: &StartOutgoing,
    ) -> Result<(), AgentError> {
        self.client(QUICK)?
            .post(&format!("/v1/migrations/{id}/outgoing"), req)
            .await
            .map_err(|e| self.error(e))
    }

    /// The migration's state; waits up to `wait` for it to leave `unless`.
    pub async fn migration_status(
        &self,
        id: Uuid,
        unless: Option<AgentMigrationState>,
        wait: Duration,
    ) -> Result<AgentMigrationStatus, AgentError> {
        let mut path = format!("/v1/migrations/{id}?wait_ms={}", wait.as_millis());
        if let Some(s) = unless {
            let name = serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            path.push_str(&format!("&state={name}"));
        }
        self.client(QUICK + wait)?
            .get(&path)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_measure(
        &self,
        id: Uuid,
        duration_ms: u32,
    ) -> Result<DirtyRateReport, AgentError> {
        self.client(QUICK + Duration::from_millis(u64::from(duration_ms)))?
            .post(
                &format!("/v1/migrations/{id}/measure"),
                &MeasureDirtyRate { duration_ms },
            )
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_steer(&self, id: Uuid) -> Result<AgentMigrationStatus, AgentError> {
        self.client(QUICK)?
            .post(&format!("/v1/migrations/{id}/steer"), &())
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_switchover(&self, id: Uuid) -> Result<AgentMigrationStatus, AgentError> {
        self.client(SWITCHOVER)?
            .post(&format!("/v1/migrations/{id}/switchover"), &())
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_commit(&self, id: Uuid, generation: u64) -> Result<(), AgentError> {
        self.client(QUICK)?
            .post(
                &format!("/v1/migrations/{id}/commit"),
                &Commit { generation },
            )
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_abort(&self, id: Uuid) -> Result<(), AgentError> {
        self.client(START)?
            .post(&format!("/v1/migrations/{id}/abort"), &())
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_finish(&self, id: Uuid) -> Result<(), AgentError> {
        self.client(FINISH)?
            .post(&format!("/v1/migrations/{id}/finish"), &())
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn bandwidth_sink(&self) -> Result<BandwidthSink, AgentError> {
        self.client(QUICK)?
            .post("/v1/bandwidth-sink", &())
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn bandwidth_probe(
        &self,
        req: &BandwidthProbe,
    ) -> Result<BandwidthReport, AgentError> {
        self.client(PROBE)?
            .post("/v1/bandwidth-probe", req)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn console(&self, id: Uuid, bytes: Option<u64>) -> Result<String, AgentError> {
        let path = match bytes {
            Some(n) => format!("/v1/vms/{id}/console?bytes={n}"),
            None => format!("/v1/vms/{id}/console"),
        };
        self.client(QUICK)?
            .get_text(&path)
            .await
            .map_err(|e| self.error(e))
    }
}
