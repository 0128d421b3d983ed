//! `tern trust URL`: trusts a center's CA once, the way SSH trusts a host key at first
//! contact; later commands check the center against it (see `connect`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_api::{ApiClient, Endpoint};
use tern_pki::tls::{capturing_client_config, client_config, ServerTrust};
use tern_pki::Fingerprint;

use crate::error::{CliError, ExitKind};

const AFTER_HELP: &str = "\
The center is the cluster's certificate authority. This command connects once without
trusting anything, shows the fingerprint (SHA-256) of the CA certificate the center presents,
and keeps that certificate when you confirm it; later commands with --center https://… check
the center against it (and that its certificate names center.tern).

Compare the fingerprint with the one on the center host, printed by
    openssl x509 -noout -fingerprint -sha256 -in DATA_DIR/pki/ca.crt
or carried by a join token (the hex after .sha256-). Pass it with --fingerprint to trust
without a prompt (scripts), or keep your own copy of ca.crt and give it with --ca FILE.";

#[derive(Debug, clap::Args)]
#[command(after_long_help = AFTER_HELP)]
pub struct TrustArgs {
    /// The center's URL: https://IP:PORT
    pub url: String,
    /// The CA fingerprint you expect (64 hex digits; sha256: and colons accepted): trusts
    /// without asking when it matches, refuses when it does not.
    #[arg(long, value_name = "SHA256")]
    pub fingerprint: Option<String>,
    /// Where to keep the CA certificate [default: ~/.config/tern/ca/HOST_PORT.pem, where
    /// later commands look for it].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Where `tern trust` keeps the CA of the center at `url` by default.
pub fn default_ca_path(url: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    let authority = url
        .strip_prefix("https://")
        .unwrap_or(url)
        .trim_end_matches('/');
    let file: String = authority
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Some(base.join("tern").join("ca").join(format!("{file}.pem")))
}

fn check_url(url: &str) -> Result<String, CliError> {
    let url = url.trim_end_matches('/').to_string();
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(CliError::usage(format!(
            "{url:?} is not an https:// URL: give the center's https://IP:PORT"
        )));
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return Err(CliError::usage(format!(
            "{url:?} must be https://HOST:PORT, with nothing after the port"
        )));
    }
    Ok(url)
}

pub async fn run(args: TrustArgs) -> Result<(), CliError> {
    let url = check_url(&args.url)?;
    let expected: Option<Fingerprint> = args
        .fingerprint
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: tern_pki::PkiError| CliError::usage(e.to_string()))?;
    let timeout = Duration::from_secs(15);
    let unreachable = |e: tern_api::ApiError| {
        CliError::new(ExitKind::Unreachable, format!("{e}"))
            .hint("is the center running there, with its TLS listener (--listen)?")
    };

    // First contact: nothing is trusted and nothing secret is sent (no token).
    let (cfg, presented) = capturing_client_config();
    let probe =
        ApiClient::with_tls(Endpoint::Tcp(url.clone()), "", timeout, cfg).map_err(unreachable)?;
    probe
        .get_text(tern_api::routes::center::OPENAPI.template())
        .await
        .map_err(unreachable)?;
    let Some((fp, ca_pem)) = presented.ca() else {
        return Err(CliError::failed(format!(
            "{url} sent no CA certificate after its own: it is not a tern center (or one older \
             than its PKI)"
        )));
    };
    eprintln!("The center at {url} presents a CA certificate with SHA-256 fingerprint\n  {fp}");
    match expected {
        Some(want) if want == fp => eprintln!("It matches --fingerprint."),
        Some(want) => {
            return Err(CliError::new(
                ExitKind::Refused,
                format!(
                    "the CA's fingerprint is {fp}, not {want}: this is not the center you meant \
                     (or someone is in between); nothing was trusted"
                ),
            ))
        }
        None => {
            if !std::io::stdin().is_terminal() {
                return Err(CliError::usage(
                    "not a terminal, so tern cannot ask: compare the fingerprint above with the \
                     center's and pass it with --fingerprint",
                ));
            }
            eprint!("Compare it with the center's (see tern trust --help). Trust it? [y/N] ");
            let _ = std::io::stderr().flush();
            let mut answer = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut answer)
                .map_err(|e| CliError::failed(format!("reading the answer: {e}")))?;
            if !matches!(answer.trim(), "y" | "Y" | "yes") {
                return Err(CliError::new(
                    ExitKind::Refused,
                    "not trusted; nothing kept",
                ));
            }
        }
    }

    // Second contact, checked as every later command checks: the chain and center.tern.
    let trust = ServerTrust::Ca {
        ca_pem: ca_pem.clone(),
        name: tern_pki::CENTER_NAME.into(),
    };
    let cfg = client_config(&trust, None).map_err(|e| CliError::failed(e.to_string()))?;
    ApiClient::with_tls(Endpoint::Tcp(url.clone()), "", timeout, cfg)
        .map_err(unreachable)?
        .get_text(tern_api::routes::center::OPENAPI.template())
        .await
        .map_err(|e| {
            CliError::failed(format!(
                "the center's own certificate does not check out against that CA: {e}"
            ))
        })?;

    let out = match args.out.or_else(|| default_ca_path(&url)) {
        Some(p) => p,
        None => {
            return Err(CliError::usage(
                "no HOME or XDG_CONFIG_HOME to keep the CA in: pass --out FILE",
            ))
        }
    };
    save(&out, &ca_pem)?;
    eprintln!(
        "kept in {}; commands with --center {url} now check the center against it",
        out.display()
    );
    Ok(())
}

fn save(path: &Path, pem: &str) -> Result<(), CliError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| CliError::failed(format!("creating {}: {e}", dir.display())))?;
    }
    tern_pki::write_file(path, pem, 0o644).map_err(|e| CliError::failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_https_urls_are_trusted() {
        assert!(check_url("https://10.0.0.1:8700/").is_ok());
        assert!(check_url("http://10.0.0.1:8700").is_err());
        assert!(check_url("https://10.0.0.1:8700/api").is_err());
        assert!(check_url("https://user@10.0.0.1:8700").is_err());
    }

    #[test]
    fn each_center_gets_its_own_file() {
        let a = default_ca_path("https://10.0.0.1:8700");
        let b = default_ca_path("https://10.0.0.2:8700");
        if let (Some(a), Some(b)) = (a, b) {
            assert_ne!(a, b);
            assert!(a.ends_with("tern/ca/10_0_0_1_8700.pem"), "{}", a.display());
        }
    }
}
