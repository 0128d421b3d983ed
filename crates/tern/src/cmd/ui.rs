//! `tern ui`: the web client through a local forward. A center serves its web client at
//! `https://CENTER:PORT/ui/`; on the center's own machine (or for a lab, whose center lives in
//! a network namespace) this forwards a loopback port to the center's unix socket, so a
//! browser there can open it.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::cmd::connect::LabDirArgs;
use crate::error::CliError;
use crate::lab::state::LabState;

const UI_HELP: &str = "\
The web client shows the cluster at a glance (inventory, hosts' load, VMs, tasks and events,
live) and runs migrations with their pre-check verdicts and live progress. It uses the
center's REST API with the token you sign in with, so it can do exactly what that token may.

A center answers it on its HTTPS address: https://CENTER:PORT/ui/. On the center's machine, or
for a lab, `tern ui` forwards a loopback port to the center's unix socket instead:
  tern ui                       # the lab's center, at http://127.0.0.1:8080/ui/
  tern ui --listen 127.0.0.1:9000 --socket /var/lib/tern/center.sock
Only loopback addresses are accepted: the forward is plain HTTP.";

#[derive(Debug, clap::Args)]
#[command(after_long_help = UI_HELP)]
pub struct UiArgs {
    /// Loopback address and port to answer on (port 0: any free one, printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The center's unix socket [default: the lab's].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(flatten)]
    pub lab: LabDirArgs,
}

pub async fn run(a: UiArgs) -> Result<(), CliError> {
    if !a.listen.ip().is_loopback() {
        return Err(CliError::usage(format!(
            "--listen {} is not a loopback address: the forward is plain HTTP (open the \
             center's https:// address from other machines)",
            a.listen
        )));
    }
    let (socket, token_hint) = match a.socket {
        Some(s) => (s, String::new()),
        None => {
            let dir = a.lab.lab_dir();
            let lab = LabState::load(&dir)
                .map_err(|e| CliError::failed(format!("{e:#}")))?
                .ok_or_else(|| {
                    CliError::usage(format!(
                        "no lab in {} and no --socket: start a lab (tern lab up) or name the \
                         center's socket",
                        dir.display()
                    ))
                })?;
            let hint = format!(
                "; sign in with the lab's admin token (in {})",
                lab.admin_token_file.display()
            );
            (lab.socket, hint)
        }
    };
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .map_err(|e| CliError::failed(format!("listening on {}: {e}", a.listen)))?;
    // The bound address (a port of 0 picks a free one).
    let at = listener.local_addr().unwrap_or(a.listen);
    println!(
        "web client: http://{at}/ui/ (forwarded to {}){token_hint}; Ctrl-C ends it",
        socket.display()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            accepted = listener.accept() => {
                let Ok((mut tcp, _)) = accepted else { continue };
                let socket = socket.clone();
                tokio::spawn(async move {
                    match tokio::net::UnixStream::connect(&socket).await {
                        Ok(mut unix) => {
                            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                        }
                        Err(e) => eprintln!("tern ui: {}: {e}", socket.display()),
                    }
                });
            }
        }
    }
}
