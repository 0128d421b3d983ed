//! The typed client of a host agent's API ([`crate::agent`], paths in [`crate::routes::agent`]),
//! used by the center: one method per call, each with the time it may take, and errors that say
//! which host failed and whether it answered.

use std::time::Duration;

use uuid::Uuid;

use crate::agent::{CheckPaths, PathsReport, StartVm, VmRuntime};
use crate::center::StopVm;
use crate::client::{ApiClient, HttpPool};
use crate::error::ApiError;
use crate::migration::{
    AbortMigration, AgentMigrationState, AgentMigrationStatus, BandwidthProbe, BandwidthReport,
    BandwidthSink, Commit, Committed, DirtyRateReport, IncomingReady, ListenIncoming,
    MeasureDirtyRate, PrepareIncoming, QueuedFrames, StartOutgoing,
};
use crate::routes::agent as route;

/// Time allowed for quick agent calls (facts, paths, state).
const QUICK: Duration = Duration::from_secs(15);
/// Image imports and full copies read and write whole images.
const IMAGE_WORK: Duration = Duration::from_secs(1800);
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
pub struct AgentClient {
    pub host: String,
    pub url: String,
    api: ApiClient,
}

/// A failed agent call, described for users.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent does not know the VM or migration asked about (HTTP 404).
    #[error("host {host}: {message}")]
    NotFound { host: String, message: String },
    /// The agent refused or failed the call (any other error status).
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
            AgentError::NotFound { .. } => Some(404),
            AgentError::Refused { status, .. } => Some(*status),
            AgentError::Unreachable { .. } => None,
        }
    }

    /// The agent answered that it does not know the VM or migration.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AgentError::NotFound { .. })
    }
}

impl AgentClient {
    /// The agent of host `host` at `url` (`http://addr:port`), called with its `token`, over
    /// the connections of `pool`.
    pub fn new(pool: &HttpPool, host: &str, url: &str, token: &str) -> AgentClient {
        AgentClient {
            host: host.to_string(),
            url: url.to_string(),
            api: ApiClient::pooled(pool, host, url, token),
        }
    }

    fn client(&self, timeout: Duration) -> ApiClient {
        self.api.timeout(timeout)
    }

    fn error(&self, e: ApiError) -> AgentError {
        match e {
            ApiError::Status {
                status: 404,
                message,
            } => AgentError::NotFound {
                host: self.host.clone(),
                message,
            },
            ApiError::Status { status, message } => AgentError::Refused {
                host: self.host.clone(),
                status,
                message,
            },
            // `{:#}`-like chain: reqwest's top-level text alone hides the cause.
            ApiError::Transport { source, .. } => AgentError::Unreachable {
                host: self.host.clone(),
                url: self.url.clone(),
                detail: crate::error::error_chain(&source),
            },
            ApiError::Tls { detail } => AgentError::Unreachable {
                host: self.host.clone(),
                url: self.url.clone(),
                detail: format!("TLS: {detail}"),
            },
            ApiError::Decode { detail, .. } => AgentError::Unreachable {
                host: self.host.clone(),
                url: self.url.clone(),
                detail: format!("unexpected answer: {detail}"),
            },
            // Agent paths carry only ids; kept for completeness (nothing was sent).
            ApiError::BadName(e) => AgentError::Refused {
                host: self.host.clone(),
                status: 400,
                message: e.to_string(),
            },
        }
    }

    pub async fn check_paths(&self, paths: Vec<String>) -> Result<PathsReport, AgentError> {
        self.client(QUICK)
            .post(&route::CHECK_PATHS.path(), &CheckPaths { paths })
            .await
            .map_err(|e| self.error(e))
    }

    /// Stores an image on the shared storage (copy, check and checksum: minutes for a big one).
    pub async fn import_image(
        &self,
        req: &crate::images::ImportImageFile,
    ) -> Result<crate::images::ImageFile, AgentError> {
        self.client(IMAGE_WORK)
            .post(&route::IMAGE_IMPORT.path(), req)
            .await
            .map_err(|e| self.error(e))
    }

    /// Removes a deleted UEFI VM's variables store from the shared storage.
    pub async fn remove_nvram(&self, id: Uuid) -> Result<(), AgentError> {
        self.client(QUICK)
            .post::<_, serde_json::Value>(
                &route::NVRAM_REMOVE.path(),
                &crate::images::RemoveNvram { id },
            )
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    /// Which of these datastores the host reaches (an iSCSI portal may take seconds to time
    /// out, hence the longer limit).
    pub async fn probe_datastores(
        &self,
        datastores: Vec<crate::datastores::DatastoreProbe>,
    ) -> Result<Vec<crate::datastores::DatastoreReach>, AgentError> {
        self.client(PROBE)
            .post(
                &route::DATASTORES_PROBE.path(),
                &crate::datastores::ProbeDatastores { datastores },
            )
            .await
            .map_err(|e| self.error(e))
    }

    /// Writes a directory datastore's marker.
    pub async fn mark_datastore(
        &self,
        req: &crate::datastores::MarkDatastore,
    ) -> Result<(), AgentError> {
        self.client(QUICK)
            .post::<_, serde_json::Value>(&route::DATASTORES_MARK.path(), req)
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    /// Makes a VM's disk from an image.
    pub async fn clone_volume(
        &self,
        req: &crate::images::CloneVolume,
    ) -> Result<crate::images::Volume, AgentError> {
        self.client(IMAGE_WORK)
            .post(&route::VOLUME_CLONE.path(), req)
            .await
            .map_err(|e| self.error(e))
    }

    /// Removes an image's template (`image`) or a VM's disk made from one (`volume`).
    pub async fn remove_image_file(&self, volume: bool, name: &str) -> Result<(), AgentError> {
        let route = if volume {
            route::VOLUME_REMOVE
        } else {
            route::IMAGE_REMOVE
        };
        let req = crate::images::RemoveFile { name: name.into() };
        self.client(QUICK)
            .post::<_, serde_json::Value>(&route.path(), &req)
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    pub async fn start(&self, id: Uuid, req: &StartVm) -> Result<VmRuntime, AgentError> {
        self.client(START)
            .put(&route::VM.with_id(id), req)
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
        self.client(grace + STOP_MARGIN)
            .post(&route::VM_STOP.with_id(id), req)
            .await
            .map_err(|e| self.error(e))
    }

    /// The VM as the agent sees it; `None` if the agent does not know it (never started there,
    /// or its files were removed).
    pub async fn vm(&self, id: Uuid) -> Result<Option<VmRuntime>, AgentError> {
        match self.client(QUICK).get(&route::VM.with_id(id)).await {
            Ok(rt) => Ok(Some(rt)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(self.error(e)),
        }
    }

    pub async fn delete(&self, id: Uuid) -> Result<(), AgentError> {
        match self.client(QUICK).delete(&route::VM.with_id(id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Every VM the agent knows.
    pub async fn vms(&self) -> Result<Vec<VmRuntime>, AgentError> {
        self.client(QUICK)
            .get(&route::VMS.path())
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn resume(&self, id: Uuid) -> Result<VmRuntime, AgentError> {
        self.client(QUICK)
            .post(&route::VM_RESUME.with_id(id), &())
            .await
            .map_err(|e| self.error(e))
    }

    /// Changes a VM's resource policy; a running VM's cgroup follows at once.
    pub async fn set_resources(
        &self,
        id: Uuid,
        resources: &crate::Resources,
    ) -> Result<VmRuntime, AgentError> {
        self.client(QUICK)
            .put(&route::VM_RESOURCES.with_id(id), resources)
            .await
            .map_err(|e| self.error(e))
    }

    // ---- migrations (tern_api::migration) ----

    pub async fn migration_incoming(
        &self,
        id: Uuid,
        req: &PrepareIncoming,
    ) -> Result<IncomingReady, AgentError> {
        self.client(START)
            .post(&route::MIGRATION_INCOMING.with_id(id), req)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_listen(
        &self,
        id: Uuid,
        req: &ListenIncoming,
    ) -> Result<IncomingReady, AgentError> {
        self.client(START)
            .post(&route::MIGRATION_LISTEN.with_id(id), req)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_outgoing(
        &self,
        id: Uuid,
        req: &StartOutgoing,
    ) -> Result<(), AgentError> {
        self.client(QUICK)
            .post(&route::MIGRATION_OUTGOING.with_id(id), req)
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
        let mut path = format!(
            "{}?wait_ms={}",
            route::MIGRATION.with_id(id),
            wait.as_millis()
        );
        if let Some(s) = unless {
            let name = serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            path.push_str(&format!("&state={name}"));
        }
        self.client(QUICK + wait)
            .get(&path)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_measure(
        &self,
        id: Uuid,
        duration_ms: u32,
    ) -> Result<DirtyRateReport, AgentError> {
        self.client(QUICK + Duration::from_millis(u64::from(duration_ms)))
            .post(
                &route::MIGRATION_MEASURE.with_id(id),
                &MeasureDirtyRate { duration_ms },
            )
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_steer(&self, id: Uuid) -> Result<AgentMigrationStatus, AgentError> {
        self.client(QUICK)
            .post(&route::MIGRATION_STEER.with_id(id), &())
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_switchover(&self, id: Uuid) -> Result<AgentMigrationStatus, AgentError> {
        self.client(SWITCHOVER)
            .post(&route::MIGRATION_SWITCHOVER.with_id(id), &())
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_frames(&self, id: Uuid) -> Result<QueuedFrames, AgentError> {
        self.client(QUICK)
            .post(&route::MIGRATION_FRAMES.with_id(id), &())
            .await
            .map_err(|e| self.error(e))
    }

    /// Runs the committed guest at the destination. An agent that answers nothing (one from
    /// before `Committed`) committed all the same.
    pub async fn migration_commit(
        &self,
        id: Uuid,
        commit: &Commit,
    ) -> Result<Committed, AgentError> {
        self.client(QUICK)
            .post::<_, Option<Committed>>(&route::MIGRATION_COMMIT.with_id(id), commit)
            .await
            .map(Option::unwrap_or_default)
            .map_err(|e| self.error(e))
    }

    pub async fn migration_abort(&self, id: Uuid, req: &AbortMigration) -> Result<(), AgentError> {
        self.client(START)
            .post(&route::MIGRATION_ABORT.with_id(id), req)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn migration_finish(&self, id: Uuid) -> Result<(), AgentError> {
        self.client(FINISH)
            .post(&route::MIGRATION_FINISH.with_id(id), &())
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn bandwidth_sink(&self) -> Result<BandwidthSink, AgentError> {
        self.client(QUICK)
            .post(&route::BANDWIDTH_SINK.path(), &())
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn bandwidth_probe(
        &self,
        req: &BandwidthProbe,
    ) -> Result<BandwidthReport, AgentError> {
        self.client(PROBE)
            .post(&route::BANDWIDTH_PROBE.path(), req)
            .await
            .map_err(|e| self.error(e))
    }

    /// The agent's Prometheus metrics, as text.
    pub async fn metrics(&self) -> Result<String, AgentError> {
        self.client(QUICK)
            .get_text(route::METRICS.template())
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn console(&self, id: Uuid, bytes: Option<u64>) -> Result<String, AgentError> {
        let path = match bytes {
            Some(n) => format!("{}?bytes={n}", route::VM_CONSOLE.with_id(id)),
            None => route::VM_CONSOLE.with_id(id),
        };
        self.client(QUICK)
            .get_text(&path)
            .await
            .map_err(|e| self.error(e))
    }
}
