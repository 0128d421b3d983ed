//! The `tern` binary: command line parsing and output only; the daemons and engines live in
//! their crates.

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Debug, Parser)]
#[command(name = "tern", version, about = "Live migration and cluster scheduling for QEMU/KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the cluster manager daemon.
    Center(tern_center::CenterArgs),
    /// Hosts: run the agent, or list and show them.
    #[command(subcommand)]
    Host(HostCommand),
    /// Run the DRS engine offline: simulate a cluster over time, explain recommendations.
    #[command(subcommand)]
    Drs(cmd::drs::DrsCommand),
}

#[derive(Debug, Subcommand)]
enum HostCommand {
    /// Run the host agent daemon (one per host).
    Agent(tern_host::AgentArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Command::Drs(c) = cli.command {
        return cmd::drs::run(c);
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        match cli.command {
            Command::Center(a) => tern_center::run(a).await,
            Command::Host(HostCommand::Agent(a)) => tern_host::run(a).await,
            Command::Drs(_) => unreachable!("handled above"),
        }
    })
}
