//! `tern center`: inventory, tasks, events, the scheduler loop and the REST API.
//!
//! Layout, edge first; each module uses only those after it (a test keeps it so):
//! [`config`] (flags, config file, tokens) → [`server`] (listeners, lifecycle) → [`api`]
//! (routes, OpenAPI), [`api_error`] (domain errors as HTTP answers) and [`auth`] (bearer
//! tokens) → the domain: [`inventory`] (clusters, hosts, VMs), [`power`] (start, stop),
//! [`health`] (host health, proactive evacuation), [`maintenance`] (emptying hosts),
//! [`pools`] (resource pools and their division down to the VMs), [`drs`] (placement, balance, the scheduler loop),
//! [`migrate`] (live migrations: pre-checks, settings, the ownership record and its commit
//! rule, recovery), [`evc`] (CPU baselines), [`vmcheck`] (spec and size rules), [`pki`] (the
//! cluster CA, host certificates) → [`tasks`]
//! (the runner every long operation goes through) → [`agent`] (calls to host agents),
//! [`migration_slots`] (how many migrations each host sends and receives at once),
//! [`app`] (shared state), [`error`] (the domain error) → [`store`] (SQLite, the only
//! place SQL lives).

pub mod agent;
pub mod api;
pub mod api_error;
pub mod app;
pub mod auth;
pub mod config;
pub mod datastores;
pub mod drs;
pub mod error;
pub mod evc;
pub mod ha;
pub mod health;
pub mod history;
pub mod history_sampler;
pub mod images;
pub mod init;
pub mod inventory;
pub mod leadership;
pub mod maintenance;
pub mod metrics;
pub mod migrate;
pub mod migration_slots;
pub mod pki;
pub mod pools;
pub mod power;
pub mod resources;
pub mod retry;
pub mod rules;
pub mod seed;
pub mod server;
pub mod store;
pub mod stream;
pub mod tasks;
pub mod vmcheck;
pub mod web;

pub use config::{CenterArgs, CenterConfig};
pub use server::{serve, RunningCenter};

/// Runs the center until SIGINT/SIGTERM.
pub async fn run(args: CenterArgs) -> anyhow::Result<()> {
    let config = CenterConfig::from_args(&args)?;
    let mut center = serve(config).await?;
    tracing::info!(
        url = center.url(),
        admin_token_file = %center.config.admin_token_file.display(),
        enrol_token_file = %center.config.enrol_token_file.display(),
        "ready"
    );
    tokio::select! {
        sig = server::termination_signal() => {
            tracing::info!("{}: shutting down", sig?);
            center.shutdown().await
        }
        r = center.stopped() => r,
    }
}
