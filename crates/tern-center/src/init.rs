//! `tern center init`: everything a new center needs before its first start, made once and
//! reported: the data directory (0700), the admin and enrolment tokens (0600), the store with
//! its schema, and (with TLS) the cluster CA and the center's certificate.
//!
//! The center makes the same things itself at its first start; doing it ahead lets a package's
//! install step give the operator the admin token's path and the CA's fingerprint before the
//! service runs, and fail early (a data directory in use, a bad setting) with nothing started.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::{create_private_dir, load_or_create_token, CenterConfig};
use crate::store::Store;

/// What `init` made (or found already there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initialised {
    pub data_dir: PathBuf,
    pub admin_token_file: PathBuf,
    pub enrol_token_file: PathBuf,
    pub store: PathBuf,
    /// SHA-256 of the cluster CA's certificate (hex); `None` without TLS.
    pub ca_fingerprint: Option<String>,
}

/// Prepares `config`'s data directory; safe to run again (it keeps what exists), refused
/// while a center runs on it.
pub fn init(config: &CenterConfig) -> anyhow::Result<Initialised> {
    config.check()?;
    create_private_dir(&config.data_dir)?;
    let _lock = crate::server::lock_data_dir(&config.data_dir)?;
    load_or_create_token(&config.admin_token_file)?;
    load_or_create_token(&config.enrol_token_file)?;
    let store = crate::server::store_file(&config.data_dir)?;
    drop(Store::open(&store).with_context(|| format!("opening the store {}", store.display()))?);
    let ca_fingerprint = if config.tls {
        let pki = crate::pki::CenterPki::open(config)?;
        Some(pki.ca.fingerprint().to_string())
    } else {
        None
    };
    Ok(Initialised {
        data_dir: config.data_dir.clone(),
        admin_token_file: config.admin_token_file.clone(),
        enrol_token_file: config.enrol_token_file.clone(),
        store,
        ca_fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn makes_a_private_data_dir_tokens_store_and_ca_and_keeps_them_on_a_second_run() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = CenterConfig::with_data_dir(tmp.path().join("center"));
        let first = init(&cfg).expect("init");
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&first.data_dir), 0o700);
        assert_eq!(mode(&first.admin_token_file), 0o600);
        assert_eq!(mode(&first.store), 0o600);
        let fp = first.ca_fingerprint.clone().expect("a CA with TLS");
        assert_eq!(fp.len(), 64);
        let token = std::fs::read_to_string(&first.admin_token_file).expect("token");
        // Again: nothing replaced.
        let second = init(&cfg).expect("init again");
        assert_eq!(second.ca_fingerprint.as_deref(), Some(fp.as_str()));
        assert_eq!(
            std::fs::read_to_string(&second.admin_token_file).expect("token"),
            token
        );
    }
}
