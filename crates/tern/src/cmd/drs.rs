//! `tern drs`: run the DRS engine offline (simulate, explain).

#[derive(Debug, clap::Subcommand)]
pub enum DrsCommand {}

pub fn run(cmd: DrsCommand) -> anyhow::Result<()> {
    match cmd {}
}
