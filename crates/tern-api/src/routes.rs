//! Every path both APIs serve, named once: the routers mount these templates and the clients
//! fill them, so a path cannot drift between the two sides.
//!
//! A route is an axum path template with at most one `{param}` segment. [`Route::with`] fills
//! it with a percent-encoded value, so a name from a user or a peer cannot add path segments or
//! a query.
//!
//! Written by hand rather than with axum-extra's `TypedPath`: that derive ties each path to an
//! axum extractor, which would pull axum into the crates that use only these wire types.

use std::fmt::Display;

/// One path template of an API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route(&'static str);

impl Route {
    pub const fn new(template: &'static str) -> Route {
        Route(template)
    }

    /// The template as the router mounts it (`/v1/vms/{id}`).
    pub const fn template(self) -> &'static str {
        self.0
    }

    /// The path of a route without parameters.
    pub fn path(self) -> String {
        debug_assert!(!self.0.contains('{'), "route {} needs a parameter", self.0);
        self.0.to_string()
    }

    /// The path with its one `{id}` filled in.
    pub fn with_id(self, id: uuid::Uuid) -> String {
        self.fill(&id.to_string())
    }

    /// The path with its one `{name}` filled in, percent-encoded. A name that is empty, `.` or
    /// `..` is refused: URL normalisation would turn it into another path.
    pub fn with_name(self, name: &str) -> Result<String, BadName> {
        if name.is_empty() || name == "." || name == ".." {
            return Err(BadName(name.to_string()));
        }
        Ok(self.fill(&encode_segment(name)))
    }

    fn fill(self, segment: &str) -> String {
        match self.0.split_once('{') {
            Some((head, rest)) => {
                let tail = rest.split_once('}').map(|(_, t)| t).unwrap_or("");
                format!("{head}{segment}{tail}")
            }
            // A route without a parameter: the caller's mistake, caught by the tests below.
            None => self.0.to_string(),
        }
    }
}

/// A name that cannot be one segment of a path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a valid name")]
pub struct BadName(pub String);

impl Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The host agent's API (`/v1`), called by the center.
pub mod agent {
    use super::Route;

    pub const FACTS: Route = Route::new("/v1/facts");
    pub const LOAD: Route = Route::new("/v1/load");
    pub const VMS: Route = Route::new("/v1/vms");
    pub const VM: Route = Route::new("/v1/vms/{id}");
    pub const VM_STOP: Route = Route::new("/v1/vms/{id}/stop");
    pub const VM_PAUSE: Route = Route::new("/v1/vms/{id}/pause");
    pub const VM_RESUME: Route = Route::new("/v1/vms/{id}/resume");
    pub const VM_RESOURCES: Route = Route::new("/v1/vms/{id}/resources");
    pub const VM_CONSOLE: Route = Route::new("/v1/vms/{id}/console");
    pub const CHECK_PATHS: Route = Route::new("/v1/check-paths");
    pub const IMAGE_IMPORT: Route = Route::new("/v1/images/import");
    pub const VOLUME_CLONE: Route = Route::new("/v1/volumes/clone");
    pub const IMAGE_REMOVE: Route = Route::new("/v1/images/remove");
    pub const VOLUME_REMOVE: Route = Route::new("/v1/volumes/remove");
    pub const NVRAM_REMOVE: Route = Route::new("/v1/nvram/remove");
    pub const DATASTORES_PROBE: Route = Route::new("/v1/datastores/probe");
    pub const DATASTORES_MARK: Route = Route::new("/v1/datastores/mark");
    pub const MIGRATION: Route = Route::new("/v1/migrations/{id}");
    pub const MIGRATION_INCOMING: Route = Route::new("/v1/migrations/{id}/incoming");
    pub const MIGRATION_LISTEN: Route = Route::new("/v1/migrations/{id}/listen");
    pub const MIGRATION_OUTGOING: Route = Route::new("/v1/migrations/{id}/outgoing");
    pub const MIGRATION_MEASURE: Route = Route::new("/v1/migrations/{id}/measure");
    pub const MIGRATION_STEER: Route = Route::new("/v1/migrations/{id}/steer");
    pub const MIGRATION_SWITCHOVER: Route = Route::new("/v1/migrations/{id}/switchover");
    pub const MIGRATION_FRAMES: Route = Route::new("/v1/migrations/{id}/frames");
    pub const MIGRATION_COMMIT: Route = Route::new("/v1/migrations/{id}/commit");
    pub const MIGRATION_ABORT: Route = Route::new("/v1/migrations/{id}/abort");
    pub const MIGRATION_FINISH: Route = Route::new("/v1/migrations/{id}/finish");
    pub const BANDWIDTH_SINK: Route = Route::new("/v1/bandwidth-sink");
    pub const BANDWIDTH_PROBE: Route = Route::new("/v1/bandwidth-probe");
    /// Prometheus metrics (outside `/v1`, where scrapers look; behind the agent token too).
    pub const METRICS: Route = Route::new("/metrics");
}

/// The center's REST API; every path lies under [`center::PREFIX`].
pub mod center {
    use super::Route;

    /// Where the API is nested (`/api/v1/...`).
    pub const PREFIX: &str = crate::center::API_PREFIX;
    /// The OpenAPI document (outside the prefix, no token needed).
    pub const OPENAPI: Route = Route::new("/openapi.json");

    pub const CLUSTERS: Route = Route::new("/api/v1/clusters");
    pub const CLUSTER: Route = Route::new("/api/v1/clusters/{name}");
    pub const CLUSTER_EVC: Route = Route::new("/api/v1/clusters/{name}/evc");
    pub const CLUSTER_EVC_MODES: Route = Route::new("/api/v1/clusters/{name}/evc-modes");
    pub const CLUSTER_DRS: Route = Route::new("/api/v1/clusters/{name}/drs");
    pub const CLUSTER_RULES: Route = Route::new("/api/v1/clusters/{name}/rules");
    pub const RULE: Route = Route::new("/api/v1/rules/{name}");
    pub const CLUSTER_POOLS: Route = Route::new("/api/v1/clusters/{name}/pools");
    pub const POOL: Route = Route::new("/api/v1/pools/{name}");
    pub const IMAGES: Route = Route::new("/api/v1/images");
    pub const IMAGE: Route = Route::new("/api/v1/images/{name}");
    pub const DATASTORES: Route = Route::new("/api/v1/datastores");
    pub const DATASTORE: Route = Route::new("/api/v1/datastores/{name}");
    pub const CLUSTER_MIGRATION: Route = Route::new("/api/v1/clusters/{name}/migration");
    pub const CLUSTER_DRS_RECOMMENDATIONS: Route =
        Route::new("/api/v1/clusters/{name}/drs/recommendations");
    pub const CLUSTER_DRS_APPLY: Route = Route::new("/api/v1/clusters/{name}/drs/apply");
    pub const HOSTS: Route = Route::new("/api/v1/hosts");
    pub const HOST: Route = Route::new("/api/v1/hosts/{name}");
    pub const HOST_MAINTENANCE: Route = Route::new("/api/v1/hosts/{name}/maintenance");
    pub const HOST_MAINTENANCE_PLAN: Route = Route::new("/api/v1/hosts/{name}/maintenance-plan");
    pub const HOST_EVACUATE: Route = Route::new("/api/v1/hosts/{name}/evacuate");
    pub const HOST_HEALTH: Route = Route::new("/api/v1/hosts/{name}/health");
    pub const HOST_JOIN_TOKEN: Route = Route::new("/api/v1/hosts/{name}/join-token");
    pub const HOST_REGISTER: Route = Route::new("/api/v1/hosts/register");
    pub const HOST_HEARTBEAT: Route = Route::new("/api/v1/hosts/{id}/heartbeat");
    pub const HOST_OWNERSHIP: Route = Route::new("/api/v1/hosts/{id}/ownership");
    pub const VMS: Route = Route::new("/api/v1/vms");
    pub const VM: Route = Route::new("/api/v1/vms/{name}");
    pub const VM_START: Route = Route::new("/api/v1/vms/{name}/start");
    pub const VM_STOP: Route = Route::new("/api/v1/vms/{name}/stop");
    pub const VM_RESOURCES: Route = Route::new("/api/v1/vms/{name}/resources");
    pub const VM_POOL: Route = Route::new("/api/v1/vms/{name}/pool");
    pub const VM_CONSOLE: Route = Route::new("/api/v1/vms/{name}/console");
    pub const VM_CAN_MIGRATE: Route = Route::new("/api/v1/vms/{name}/can-migrate");
    pub const VM_MIGRATE: Route = Route::new("/api/v1/vms/{name}/migrate");
    pub const TASKS: Route = Route::new("/api/v1/tasks");
    pub const TASK: Route = Route::new("/api/v1/tasks/{id}");
    pub const TASK_CANCEL: Route = Route::new("/api/v1/tasks/{id}/cancel");
    pub const TASK_TIMELINE: Route = Route::new("/api/v1/tasks/{id}/timeline");
    pub const HOST_LOAD_HISTORY: Route = Route::new("/api/v1/hosts/{name}/load-history");
    pub const HOST_METRICS: Route = Route::new("/api/v1/hosts/{name}/metrics");
    pub const CLUSTER_DRS_HISTORY: Route = Route::new("/api/v1/clusters/{name}/drs/history");
    pub const SUMMARY: Route = Route::new("/api/v1/summary");
    pub const CONTROL_PLANE: Route = Route::new("/api/v1/control-plane");
    pub const EVENTS: Route = Route::new("/api/v1/events");
    pub const STREAM: Route = Route::new("/api/v1/stream");
    pub const WHOAMI: Route = Route::new("/api/v1/whoami");
    pub const TOKENS: Route = Route::new("/api/v1/tokens");
    pub const TOKEN: Route = Route::new("/api/v1/tokens/{name}");

    /// Every route of the API proper (what the OpenAPI document must describe).
    pub const ALL: &[Route] = &[
        CLUSTERS,
        CLUSTER,
        CLUSTER_EVC,
        CLUSTER_EVC_MODES,
        CLUSTER_DRS,
        CLUSTER_RULES,
        RULE,
        CLUSTER_POOLS,
        POOL,
        IMAGES,
        IMAGE,
        DATASTORES,
        DATASTORE,
        CLUSTER_MIGRATION,
        CLUSTER_DRS_RECOMMENDATIONS,
        CLUSTER_DRS_APPLY,
        HOSTS,
        HOST,
        HOST_MAINTENANCE,
        HOST_MAINTENANCE_PLAN,
        HOST_EVACUATE,
        HOST_HEALTH,
        HOST_JOIN_TOKEN,
        HOST_REGISTER,
        HOST_HEARTBEAT,
        HOST_OWNERSHIP,
        VMS,
        VM,
        VM_START,
        VM_STOP,
        VM_RESOURCES,
        VM_POOL,
        VM_CONSOLE,
        VM_CAN_MIGRATE,
        VM_MIGRATE,
        TASKS,
        TASK,
        TASK_CANCEL,
        TASK_TIMELINE,
        HOST_LOAD_HISTORY,
        HOST_METRICS,
        CLUSTER_DRS_HISTORY,
        SUMMARY,
        CONTROL_PLANE,
        EVENTS,
        STREAM,
        WHOAMI,
        TOKENS,
        TOKEN,
    ];

    /// A route's template relative to [`PREFIX`], as the nested router mounts it.
    pub fn nested(route: Route) -> &'static str {
        route
            .template()
            .strip_prefix(PREFIX)
            .unwrap_or_else(|| panic!("route {route} is not under {PREFIX}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_and_encodes_the_parameter() {
        let id = uuid::Uuid::nil();
        assert_eq!(agent::VM_STOP.with_id(id), format!("/v1/vms/{id}/stop"));
        assert_eq!(center::VM.with_name("web-1").unwrap(), "/api/v1/vms/web-1");
        // A hostile name stays one segment: no traversal, no query, no extra path.
        assert_eq!(
            center::VM_MIGRATE.with_name("../hosts?x=1#y").unwrap(),
            "/api/v1/vms/..%2Fhosts%3Fx%3D1%23y/migrate"
        );
        assert_eq!(center::VM.with_name("a b").unwrap(), "/api/v1/vms/a%20b");
        assert_eq!(center::VM.with_name("ü").unwrap(), "/api/v1/vms/%C3%BC");
        for bad in ["", ".", ".."] {
            assert_eq!(center::VM.with_name(bad), Err(BadName(bad.into())));
        }
        assert_eq!(agent::FACTS.path(), "/v1/facts");
    }

    #[test]
    fn center_routes_nest_under_the_prefix() {
        for r in center::ALL {
            assert!(center::nested(*r).starts_with('/'), "{r}");
        }
        assert_eq!(center::nested(center::TASKS), "/tasks");
    }

    #[test]
    fn every_template_has_at_most_one_parameter() {
        let all = center::ALL.iter().chain(
            [
                agent::VM,
                agent::VM_STOP,
                agent::MIGRATION,
                agent::MIGRATION_SWITCHOVER,
            ]
            .iter(),
        );
        for r in all {
            assert!(r.template().matches('{').count() <= 1, "{r}");
        }
    }
}
