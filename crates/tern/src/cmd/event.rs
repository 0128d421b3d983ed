//! `tern event list`.

use tern_api::center::{Event, EventLevel};
use tern_api::routes::center as route;
use tern_api::ApiClient;

use super::connect::query_value;
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

pub async fn run(cmd: EventCommand, api: &ApiClient, fmt: Format) -> Result<(), CliError> {
    let EventCommand::List(a) = cmd;
    let mut q = vec![format!("limit={}", a.limit)];
    if let Some(vm) = &a.vm {
        q.push(format!("vm={}", query_value(vm)));
    }
    if let Some(h) = &a.host {
        q.push(format!("host={}", query_value(h)));
    }
    let events: Vec<Event> = api
        .get(&format!("{}?{}", route::EVENTS.path(), q.join("&")))
        .await
        .or_list("tern event list")?;
    if fmt == Format::Json {
        return print_json(&events);
    }
    let mut t = Table::new(&["TIME", "LEVEL", "VM", "HOST", "TASK", "MESSAGE"]);
    for e in &events {
        t.row(vec![
            time(&e.time),
            match e.level {
                EventLevel::Info => "info",
                EventLevel::Warning => "warning",
                EventLevel::Error => "error",
            }
            .into(),
            opt(&e.vm),
            opt(&e.host),
            e.task.as_ref().map(short_id).unwrap_or_else(|| "-".into()),
            e.message.clone(),
        ]);
    }
    t.print();
    Ok(())
}
