//! `tern event list`.

use tern_api::center::{Event, EventLevel, EventQuery};
use tern_api::CenterClient;

use super::output::{opt, print_json, short_id, time, Format, Table};
use crate::error::{ApiResultExt, CliError};

#[derive(Debug, clap::Args)]
pub struct EventListArgs {
    /// Only events about this VM.
    #[arg(long)]
    vm: Option<String>,
    /// Only events about this host.
    #[arg(long)]
    host: Option<String>,
    /// At most this many (newest).
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

#[derive(Debug, clap::Subcommand)]
pub enum EventCommand {
    /// List recent events.
    List(EventListArgs),
}

pub async fn run(cmd: EventCommand, api: &CenterClient, fmt: Format) -> Result<(), CliError> {
    let EventCommand::List(a) = cmd;
    let q = EventQuery {
        limit: Some(a.limit),
        vm: a.vm.clone(),
        host: a.host.clone(),
    };
    let events: Vec<Event> = api.events(&q).await.or_list("tern event list")?;
    if fmt == Format::Json {
        return print_json(&events);
    }
    let mut t = Table::new(&["TIME", "LEVEL", "BY", "VM", "HOST", "TASK", "MESSAGE"]);
    for e in &events {
        t.row(vec![
            time(&e.time),
            match e.level {
                EventLevel::Info => "info",
                EventLevel::Warning => "warning",
                EventLevel::Error => "error",
            }
            .into(),
            opt(&e.actor),
            opt(&e.vm),
            opt(&e.host),
            e.task.as_ref().map(short_id).unwrap_or_else(|| "-".into()),
            e.message.clone(),
        ]);
    }
    t.print();
    Ok(())
}
