//! `tern center`: inventory, tasks, events, the scheduler loop and the REST API.

use std::path::PathBuf;

/// Flags of `tern center` (each may also come from the config file).
#[derive(Debug, Clone, clap::Args)]
pub struct CenterArgs {
    /// TOML config file; flags given on the command line win over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Runs the center until SIGINT/SIGTERM.
pub async fn run(_args: CenterArgs) -> anyhow::Result<()> {
    anyhow::bail!("tern center: not built yet")
}
