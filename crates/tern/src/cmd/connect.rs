//! Finds the center and its token: flags, then environment, then the running lab's record.

use std::path::PathBuf;
use std::time::Duration;

use tern_api::{ApiClient, CenterClient, Endpoint};

use crate::error::{CliError, ExitKind};
use crate::lab::state::LabState;

/// Default directory of the lab (and of its `lab.json`).
pub const DEFAULT_LAB_DIR: &str = "/var/tmp/tern-lab";

/// Connection flags shared by every command that talks to the center.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Center endpoint: `unix:/path/center.sock` or `https://IP:PORT` [default: the lab's]
    #[arg(long, env = "TERN_CENTER", global = true)]
    pub center: Option<String>,
    /// The cluster CA's certificate (PEM) to check an https:// center against [default: the
    /// one `tern trust URL` kept for that URL, or the lab's]
    #[arg(long, env = "TERN_CA", global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// API token (not shown in logs) [default: the lab's admin.token]
    #[arg(long, env = "TERN_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub lab: LabDirArgs,
}

/// Where a lab lives: `tern lab` keeps its lab there, and the other commands use that lab's
/// center when --center is not given.
#[derive(Debug, Clone, clap::Args)]
pub struct LabDirArgs {
    /// Lab directory: where `tern lab` keeps its lab, and whose center the other commands
    /// use when --center is not given [default: /var/tmp/tern-lab]
    #[arg(
        long = "lab-dir",
        visible_alias = "dir",
        env = "TERN_LAB_DIR",
        global = true
    )]
    pub lab_dir: Option<PathBuf>,
}

impl LabDirArgs {
    /// The lab directory (flag, env, or the default).
    pub fn lab_dir(&self) -> PathBuf {
        self.lab_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_LAB_DIR))
    }
}

impl ConnectArgs {
    /// Builds the center's client (no request is made yet).
    pub fn client(&self) -> Result<CenterClient, CliError> {
        let lab_dir = self.lab.lab_dir();
        let lab = LabState::load(&lab_dir).map_err(|e| {
            CliError::failed(format!("{e:#}"))
                .hint("remove the stale lab with `tern lab down`, or pass --center")
        })?;
        let (endpoint, lab_token) = match (&self.center, &lab) {
            (Some(c), lab) => {
                let ep = Endpoint::parse(c);
                // The lab's token is offered only to the lab's own center.
                let token = lab
                    .as_ref()
                    .filter(|l| lab_matches(l, &ep))
                    .map(|l| l.admin_token());
                (ep, token)
            }
            (None, Some(l)) => (Endpoint::Unix(l.socket.clone()), Some(l.admin_token())),
            (None, None) => {
                return Err(CliError::new(
                    ExitKind::Unreachable,
                    format!("no center given, and no lab in {}", lab_dir.display()),
                )
                .hint(
                    "pass --center unix:/path/center.sock or https://IP:PORT (or set \
                     TERN_CENTER), or start a lab: `tern lab up --hosts 2`",
                ))
            }
        };
        let token = match (&self.token, lab_token) {
            (Some(t), _) => t.clone(),
            (None, Some(Ok(t))) => t,
            (None, Some(Err(e))) => {
                return Err(CliError::failed(format!("{e:#}"))
                    .hint("pass --token or TERN_TOKEN, or recreate the lab"))
            }
            // No token: the center answers 401, whose hint says what to do.
            (None, None) => String::new(),
        };
        let timeout = Duration::from_secs(60);
        let client = match &endpoint {
            Endpoint::Tcp(url) if url.starts_with("https://") => {
                let ca_pem = self.ca_for(url, lab.as_ref())?;
                let trust = tern_pki::tls::ServerTrust::Ca {
                    ca_pem,
                    name: tern_pki::CENTER_NAME.into(),
                };
                let tls = tern_pki::tls::client_config(&trust, None)
                    .map_err(|e| CliError::failed(format!("the CA certificate: {e}")))?;
                ApiClient::with_tls(endpoint, token, timeout, tls)
            }
            _ => ApiClient::with_timeout(endpoint, token, timeout),
        };
        client
            .map(CenterClient::new)
            .map_err(|e| CliError::from_api(e, "tern lab status"))
    }

    /// The CA an https:// center is checked against: --ca, the one `tern trust` kept for
    /// this URL, or the lab's own when the URL is the lab's center.
    fn ca_for(&self, url: &str, lab: Option<&LabState>) -> Result<String, CliError> {
        let lab_ca = lab
            .filter(|l| l.center_url == url)
            .map(|l| l.dir.join("center/pki/ca.crt"));
        let path = match (&self.ca, super::trust::default_ca_path(url)) {
            (Some(p), _) => p.clone(),
            (None, Some(p)) if p.exists() => p,
            (None, _) => match lab_ca {
                Some(p) => p,
                None => {
                    return Err(CliError::new(
                        ExitKind::Refused,
                        format!("no CA is trusted for {url} yet"),
                    )
                    .hint(format!(
                        "trust it once with `tern trust {url}` (it shows the fingerprint to \
                         compare), or pass --ca FILE"
                    )))
                }
            },
        };
        std::fs::read_to_string(&path).map_err(|e| {
            CliError::failed(format!(
                "reading the CA certificate {}: {e}",
                path.display()
            ))
            .hint(format!("trust the center again with `tern trust {url}`"))
        })
    }
}

fn lab_matches(lab: &LabState, ep: &Endpoint) -> bool {
    match ep {
        Endpoint::Unix(p) => *p == lab.socket,
        Endpoint::Tcp(u) => *u == lab.center_url,
    }
}
