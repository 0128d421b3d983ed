//! `tern host agent`: the per-host agent that runs QEMU processes for the center.

use std::path::PathBuf;

/// Flags of `tern host agent` (each may also come from the config file).
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// TOML config file; flags given on the command line win over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(_args: AgentArgs) -> anyhow::Result<()> {
    anyhow::bail!("tern host agent: not built yet")
}
