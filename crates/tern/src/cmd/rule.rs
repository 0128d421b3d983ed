//! `tern rule add|list|remove`: a cluster's DRS placement rules.

use tern_api::drs::{DrsRule, DrsRuleKind};
use tern_api::CenterClient;

use super::output::{print_json, Format, Table};
use crate::error::{ApiResultExt, CliError};

const RULE_HELP: &str = "\
Kinds:
  affinity           the VMs run on one host together
  anti-affinity      no two of the VMs share a host
  must-run-on        the VMs never run outside --hosts
  must-not-run-on    the VMs never run on --hosts
  should-run-on      the VMs run on --hosts unless nothing there fits (reported when broken)
  should-not-run-on  the VMs stay off --hosts unless nothing else fits (reported when broken)

DRS keeps every rule when it places, balances and evacuates (a maintenance that would break a
must rule stops and names it), and a migration that would break a must or anti-affinity rule
is refused by its pre-checks. A rule the VMs break when it is created is fixed by DRS's next
pass (see `tern drs recommend CLUSTER`).

Examples:
  tern rule add prod db-apart --kind anti-affinity --vms db-1,db-2
  tern rule add prod licensed --kind must-run-on --vms app-1 --hosts h1,h2";

#[derive(Debug, clap::Subcommand)]
pub enum RuleCommand {
    /// Add a placement rule to a cluster.
    #[command(after_long_help = RULE_HELP)]
    Add {
        /// The cluster.
        cluster: String,
        /// The rule's name (unique in the center; a-z, 0-9, '-').
        name: String,
        /// affinity, anti-affinity, must-run-on, must-not-run-on, should-run-on,
        /// should-not-run-on.
        #[arg(long, value_parser = |s: &str| s.parse::<DrsRuleKind>())]
        kind: DrsRuleKind,
        /// The VMs, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        vms: Vec<String>,
        /// The hosts (the kinds that tie VMs to hosts), comma-separated.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
    },
    /// List a cluster's rules.
    List { cluster: String },
    /// Remove a rule.
    Remove { name: String },
}

pub async fn run(cmd: RuleCommand, api: &CenterClient, fmt: Format) -> Result<(), CliError> {
    match cmd {
        RuleCommand::Add {
            cluster,
            name,
            kind,
            vms,
            hosts,
        } => {
            let rule = DrsRule {
                name,
                kind,
                vms,
                hosts,
            };
            let r = api
                .create_rule(&cluster, &rule)
                .await
                .or_list(&format!("tern rule list {cluster}"))?;
            match fmt {
                Format::Json => print_json(&r),
                Format::Table => {
                    println!("rule {r} added to cluster {cluster}");
                    Ok(())
                }
            }
        }
        RuleCommand::List { cluster } => {
            let rules = api.rules(&cluster).await.or_list("tern cluster list")?;
            if fmt == Format::Json {
                return print_json(&rules);
            }
            let mut t = Table::new(&["NAME", "KIND", "VMS", "HOSTS"]);
            for r in &rules {
                t.row(vec![
                    r.name.clone(),
                    r.kind.to_string(),
                    r.vms.join(","),
                    if r.hosts.is_empty() {
                        "-".into()
                    } else {
                        r.hosts.join(",")
                    },
                ]);
            }
            t.print();
            Ok(())
        }
        RuleCommand::Remove { name } => {
            api.remove_rule(&name)
                .await
                .or_list("tern rule list CLUSTER")?;
            if fmt == Format::Table {
                println!("removed rule {name}");
            }
            Ok(())
        }
    }
}
