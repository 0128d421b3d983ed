//! `tern token create|list|revoke`: named API tokens and their roles (admin only).

use tern_api::center::{ApiToken, CreateToken, CreatedToken, Role};
use tern_api::CenterClient;

use super::output::{print_json, time, Format, Table};
use crate::error::{ApiResultExt, CliError};

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a token for someone (or something): prints its secret, once.
    ///
    /// Roles: viewer reads everything; operator also creates, starts, stops, deletes and
    /// migrates VMs, cancels tasks, runs maintenance mode and applies DRS; admin also
    /// manages clusters, EVC, DRS settings and tokens. The event log names the token behind
    /// every change.
    Create {
        /// Who holds it, as the event log will name them (a-z, 0-9, '-').
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
    },
    /// List tokens (names and roles; secrets are never shown again).
    List,
    /// Revoke a token: it fails from the next call on.
    Revoke { name: String },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

pub async fn run(cmd: TokenCommand, api: &CenterClient, fmt: Format) -> Result<(), CliError> {
    match cmd {
        TokenCommand::Create { name, role } => {
            let t: CreatedToken = api
                .create_token(&CreateToken { name, role })
                .await
                .or_list("tern token list")?;
            match fmt {
                Format::Json => print_json(&t),
                Format::Table => {
                    eprintln!(
                        "created token {} (role {}); it is shown only now: give it to its \
                         holder, who sets TERN_TOKEN or --token to it",
                        t.name, t.role
                    );
                    println!("{}", t.token);
                    Ok(())
                }
            }
        }
        TokenCommand::List => {
            let list: Vec<ApiToken> = api.tokens().await.or_list("tern token list")?;
            match fmt {
                Format::Json => print_json(&list),
                Format::Table => {
                    let mut t = Table::new(&["NAME", "ROLE", "CREATED", "BY"]);
                    for k in &list {
                        t.row(vec![
                            k.name.clone(),
                            k.role.to_string(),
                            time(&k.created_at),
                            k.created_by.clone(),
                        ]);
                    }
                    t.print();
                    Ok(())
                }
            }
        }
        TokenCommand::Revoke { name } => {
            api.revoke_token(&name).await.or_list("tern token list")?;
            if fmt == Format::Table {
                println!("revoked token {name}");
            }
            Ok(())
        }
    }
}
