//! The typed client of the center's REST API ([`crate::center`], paths in
//! [`crate::routes::center`]), used by the CLI and the lab: one method per call, with the
//! request and answer types the center serves. Names go into paths percent-encoded (a name
//! that cannot be a path segment fails with [`ApiError::BadName`] before anything is sent).

use uuid::Uuid;

use crate::center::{
    AddHost, ApiToken, CanMigrateQuery, Cluster, ClusterMigrationSettings, ConsoleQuery,
    CreateCluster, CreateToken, CreateVm, CreatedToken, Event, EventQuery, Host, HostMaintenance,
    JoinToken, StopVm, Task, TaskQuery, Vm,
};
use crate::client::{ApiClient, Endpoint};
use crate::drs::{DrsRecommendations, DrsSettings};
use crate::error::ApiError;
use crate::evc::{EvcModeChange, EvcModes, MigrationCheckReport, SetEvcMode};
use crate::migration::MigrateVm;
use crate::routes::center as route;

/// A center, reached with an API token.
#[derive(Debug, Clone)]
pub struct CenterClient {
    api: ApiClient,
}

impl CenterClient {
    pub fn new(api: ApiClient) -> CenterClient {
        CenterClient { api }
    }

    pub fn endpoint(&self) -> &Endpoint {
        self.api.endpoint()
    }

    // ---- clusters ----

    pub async fn create_cluster(&self, req: &CreateCluster) -> Result<Cluster, ApiError> {
        self.api.post(&route::CLUSTERS.path(), req).await
    }

    pub async fn clusters(&self) -> Result<Vec<Cluster>, ApiError> {
        self.api.get(&route::CLUSTERS.path()).await
    }

    pub async fn cluster(&self, name: &str) -> Result<Cluster, ApiError> {
        self.api.get(&route::CLUSTER.with_name(name)?).await
    }

    pub async fn set_evc(
        &self,
        cluster: &str,
        req: &SetEvcMode,
    ) -> Result<EvcModeChange, ApiError> {
        self.api
            .post(&route::CLUSTER_EVC.with_name(cluster)?, req)
            .await
    }

    pub async fn cluster_migration(
        &self,
        cluster: &str,
    ) -> Result<ClusterMigrationSettings, ApiError> {
        self.api
            .get(&route::CLUSTER_MIGRATION.with_name(cluster)?)
            .await
    }

    pub async fn set_cluster_migration(
        &self,
        cluster: &str,
        s: &ClusterMigrationSettings,
    ) -> Result<ClusterMigrationSettings, ApiError> {
        self.api
            .put(&route::CLUSTER_MIGRATION.with_name(cluster)?, s)
            .await
    }

    pub async fn evc_modes(&self, cluster: &str) -> Result<EvcModes, ApiError> {
        self.api
            .get(&route::CLUSTER_EVC_MODES.with_name(cluster)?)
            .await
    }

    pub async fn drs(&self, cluster: &str) -> Result<DrsSettings, ApiError> {
        self.api.get(&route::CLUSTER_DRS.with_name(cluster)?).await
    }

    pub async fn set_drs(&self, cluster: &str, s: &DrsSettings) -> Result<DrsSettings, ApiError> {
        self.api
            .put(&route::CLUSTER_DRS.with_name(cluster)?, s)
            .await
    }

    pub async fn drs_recommendations(&self, cluster: &str) -> Result<DrsRecommendations, ApiError> {
        self.api
            .get(&route::CLUSTER_DRS_RECOMMENDATIONS.with_name(cluster)?)
            .await
    }

    /// Queues the cluster's current recommendations as one task.
    pub async fn drs_apply(&self, cluster: &str) -> Result<Task, ApiError> {
        self.api
            .post(&route::CLUSTER_DRS_APPLY.with_name(cluster)?, &())
            .await
    }

    /// The cluster's placement rules.
    pub async fn rules(&self, cluster: &str) -> Result<Vec<crate::drs::DrsRule>, ApiError> {
        self.api
            .get(&route::CLUSTER_RULES.with_name(cluster)?)
            .await
    }

    pub async fn create_rule(
        &self,
        cluster: &str,
        rule: &crate::drs::DrsRule,
    ) -> Result<crate::drs::DrsRule, ApiError> {
        self.api
            .post(&route::CLUSTER_RULES.with_name(cluster)?, rule)
            .await
    }

    pub async fn remove_rule(&self, name: &str) -> Result<(), ApiError> {
        self.api.delete(&route::RULE.with_name(name)?).await
    }

    // ---- pools ----

    pub async fn pools(&self, cluster: &str) -> Result<Vec<crate::pools::ResourcePool>, ApiError> {
        self.api
            .get(&route::CLUSTER_POOLS.with_name(cluster)?)
            .await
    }

    pub async fn create_pool(
        &self,
        cluster: &str,
        req: &crate::pools::CreatePool,
    ) -> Result<crate::pools::ResourcePool, ApiError> {
        self.api
            .post(&route::CLUSTER_POOLS.with_name(cluster)?, req)
            .await
    }

    pub async fn pool(&self, name: &str) -> Result<crate::pools::ResourcePool, ApiError> {
        self.api.get(&route::POOL.with_name(name)?).await
    }

    pub async fn set_pool(
        &self,
        name: &str,
        settings: &crate::pools::PoolSettings,
    ) -> Result<crate::pools::ResourcePool, ApiError> {
        self.api.put(&route::POOL.with_name(name)?, settings).await
    }

    pub async fn remove_pool(&self, name: &str) -> Result<(), ApiError> {
        self.api.delete(&route::POOL.with_name(name)?).await
    }

    /// Moves a VM into a pool (`None`: the cluster's root).
    pub async fn set_vm_pool(&self, vm: &str, pool: Option<&str>) -> Result<Vm, ApiError> {
        let body = crate::pools::SetVmPool {
            pool: pool.map(str::to_string),
        };
        self.api.put(&route::VM_POOL.with_name(vm)?, &body).await
    }

    // ---- images ----

    pub async fn images(&self) -> Result<Vec<crate::images::Image>, ApiError> {
        self.api.get(&route::IMAGES.path()).await
    }

    pub async fn import_image(
        &self,
        req: &crate::images::ImportImage,
    ) -> Result<crate::images::Image, ApiError> {
        self.api.post(&route::IMAGES.path(), req).await
    }

    pub async fn image(&self, name: &str) -> Result<crate::images::Image, ApiError> {
        self.api.get(&route::IMAGE.with_name(name)?).await
    }

    pub async fn remove_image(&self, name: &str) -> Result<(), ApiError> {
        self.api.delete(&route::IMAGE.with_name(name)?).await
    }

    // ---- datastores ----

    pub async fn datastores(&self) -> Result<Vec<crate::datastores::Datastore>, ApiError> {
        self.api.get(&route::DATASTORES.path()).await
    }

    pub async fn add_datastore(
        &self,
        req: &crate::datastores::AddDatastore,
    ) -> Result<crate::datastores::Datastore, ApiError> {
        self.api.post(&route::DATASTORES.path(), req).await
    }

    pub async fn datastore(&self, name: &str) -> Result<crate::datastores::Datastore, ApiError> {
        self.api.get(&route::DATASTORE.with_name(name)?).await
    }

    pub async fn remove_datastore(&self, name: &str) -> Result<(), ApiError> {
        self.api.delete(&route::DATASTORE.with_name(name)?).await
    }

    // ---- hosts ----

    pub async fn hosts(&self) -> Result<Vec<Host>, ApiError> {
        self.api.get(&route::HOSTS.path()).await
    }

    pub async fn host(&self, name: &str) -> Result<Host, ApiError> {
        self.api.get(&route::HOST.with_name(name)?).await
    }

    /// Enters or leaves maintenance mode (a task).
    pub async fn maintenance(&self, host: &str, req: &HostMaintenance) -> Result<Task, ApiError> {
        self.api
            .post(&route::HOST_MAINTENANCE.with_name(host)?, req)
            .await
    }

    /// Empties a host live without maintenance mode (a task).
    pub async fn evacuate(&self, host: &str) -> Result<Task, ApiError> {
        self.api
            .post(&route::HOST_EVACUATE.with_name(host)?, &())
            .await
    }

    /// Marks a host degraded (it takes no new VMs; the proactive mode acts).
    pub async fn degrade_host(&self, host: &str, reason: &str) -> Result<Host, ApiError> {
        let body = crate::health::DegradeHost {
            reason: reason.to_string(),
        };
        self.api
            .put(&route::HOST_HEALTH.with_name(host)?, &body)
            .await
    }

    /// Clears a host's degradation (it was repaired), then reads it back.
    pub async fn restore_host(&self, host: &str) -> Result<Host, ApiError> {
        self.api
            .delete(&route::HOST_HEALTH.with_name(host)?)
            .await?;
        self.host(host).await
    }

    // ---- VMs ----

    pub async fn create_vm(&self, req: &CreateVm) -> Result<Vm, ApiError> {
        self.api.post(&route::VMS.path(), req).await
    }

    pub async fn vms(&self) -> Result<Vec<Vm>, ApiError> {
        self.api.get(&route::VMS.path()).await
    }

    pub async fn vm(&self, name: &str) -> Result<Vm, ApiError> {
        self.api.get(&route::VM.with_name(name)?).await
    }

    pub async fn delete_vm(&self, name: &str) -> Result<(), ApiError> {
        self.api.delete(&route::VM.with_name(name)?).await
    }

    pub async fn start_vm(&self, name: &str) -> Result<Task, ApiError> {
        self.api.post(&route::VM_START.with_name(name)?, &()).await
    }

    pub async fn stop_vm(&self, name: &str, req: &StopVm) -> Result<Task, ApiError> {
        self.api.post(&route::VM_STOP.with_name(name)?, req).await
    }

    /// Replaces the VM's resource policy (applied live when it runs).
    pub async fn set_vm_resources(
        &self,
        name: &str,
        resources: &crate::Resources,
    ) -> Result<Vm, ApiError> {
        self.api
            .put(&route::VM_RESOURCES.with_name(name)?, resources)
            .await
    }

    /// The end of the VM's serial console log.
    pub async fn console(&self, name: &str, q: &ConsoleQuery) -> Result<String, ApiError> {
        self.api
            .get_text_query(&route::VM_CONSOLE.with_name(name)?, q)
            .await
    }

    /// Every migration pre-check, as a dry run (nothing moves).
    pub async fn can_migrate(
        &self,
        name: &str,
        to: &str,
    ) -> Result<MigrationCheckReport, ApiError> {
        self.api
            .get_query(
                &route::VM_CAN_MIGRATE.with_name(name)?,
                &CanMigrateQuery { to: to.to_string() },
            )
            .await
    }

    pub async fn migrate(&self, name: &str, req: &MigrateVm) -> Result<Task, ApiError> {
        self.api
            .post(&route::VM_MIGRATE.with_name(name)?, req)
            .await
    }

    // ---- tasks and events ----

    pub async fn tasks(&self, q: &TaskQuery) -> Result<Vec<Task>, ApiError> {
        self.api.get_query(&route::TASKS.path(), q).await
    }

    pub async fn task(&self, id: Uuid) -> Result<Task, ApiError> {
        self.api.get(&route::TASK.with_id(id)).await
    }

    pub async fn cancel_task(&self, id: Uuid) -> Result<Task, ApiError> {
        self.api.post(&route::TASK_CANCEL.with_id(id), &()).await
    }

    pub async fn events(&self, q: &EventQuery) -> Result<Vec<Event>, ApiError> {
        self.api.get_query(&route::EVENTS.path(), q).await
    }

    /// A one-time join token for host `name`.
    pub async fn add_host(&self, name: &str, req: &AddHost) -> Result<JoinToken, ApiError> {
        self.api
            .post(&route::HOST_JOIN_TOKEN.with_name(name)?, req)
            .await
    }

    pub async fn remove_host(&self, name: &str) -> Result<(), ApiError> {
        self.api.delete(&route::HOST.with_name(name)?).await
    }

    pub async fn create_token(&self, req: &CreateToken) -> Result<CreatedToken, ApiError> {
        self.api.post(&route::TOKENS.path(), req).await
    }

    pub async fn control_plane(&self) -> Result<crate::center::ControlPlane, ApiError> {
        self.api.get(&route::CONTROL_PLANE.path()).await
    }

    pub async fn tokens(&self) -> Result<Vec<ApiToken>, ApiError> {
        self.api.get(&route::TOKENS.path()).await
    }

    pub async fn revoke_token(&self, name: &str) -> Result<(), ApiError> {
        self.api.delete(&route::TOKEN.with_name(name)?).await
    }
}
