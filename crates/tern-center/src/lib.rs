//! `tern center`: inventory, tasks, events, the scheduler loop and the REST API.
//!
//! Layout: [`config`] (flags, config file, tokens) → [`server`] (listeners, lifecycle) →
//! [`api`] (routes, auth, OpenAPI) → [`inventory`] and [`tasks`] (the rules) → [`store`] (SQLite,
//! the only place SQL lives); [`agent`] holds the calls to host agents; [`migrate`] drives live
//! migrations (pre-checks, settings, the ownership record and its commit rule, recovery);
//! [`maintenance`] puts hosts in maintenance mode and empties them. [`drs`] feeds the DRS
//! engine: placement, balance recommendations, applying them, the scheduler loop.

pub mod agent;
pub mod api;
pub mod app;
pub mod config;
pub mod drs;
pub mod error;
pub mod evc;
pub mod inventory;
pub mod maintenance;
pub mod migrate;
pub mod server;
pub mod store;
pub mod tasks;
pub mod vmcheck;

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
