//! The center as the cluster's certificate authority: its CA on disk, its own certificate
//! (renewed in the background), signing hosts' requests, and who a client certificate names.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_pki::tls::{ClientPolicy, ServerConfig};
use tern_pki::{Ca, CertInfo, LiveIdentity};
use tern_serve::PeerCertificate;
use tokio::sync::watch;

use crate::config::CenterConfig;

/// The CA and the center's own certificate.
pub struct CenterPki {
    pub ca: Ca,
    /// The center's certificate: presented to clients and, as a client, to agents.
    pub identity: LiveIdentity,
    /// Lifetime of every certificate issued.
    pub lifetime: Duration,
    /// Names in the center's certificate besides center.tern.
    names: Vec<String>,
    /// The TLS settings of the TCP listener (the certificate inside renews in place).
    pub server: watch::Sender<Option<Arc<ServerConfig>>>,
    /// When the center's own certificate expires (Unix seconds), to renew it in time.
    own_not_after: std::sync::Mutex<CertInfo>,
}

impl std::fmt::Debug for CenterPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CenterPki")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl CenterPki {
    /// Loads (or, the first time, makes) the CA in `DATA_DIR/pki` and issues the center a
    /// fresh certificate.
    pub fn open(config: &CenterConfig) -> anyhow::Result<CenterPki> {
        let dir = config.data_dir.join("pki");
        let ca = Ca::load_or_create(&dir, &cluster_label(&config.data_dir))
            .with_context(|| format!("the cluster CA in {}", dir.display()))?;
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        if !config.listen.ip().is_unspecified() {
            names.push(config.listen.ip().to_string());
        }
        if let Ok(h) = nix::unistd::gethostname() {
            let h = h.to_string_lossy().to_string();
            if !h.is_empty() && h.parse::<std::net::IpAddr>().is_err() {
                names.push(h);
            }
        }
        names.extend(config.tls_names.iter().cloned());
        names.sort();
        names.dedup();
        let lifetime = Duration::from_secs(config.cert_lifetime_s);
        let own = ca
            .issue_center(&names, lifetime)
            .context("issuing the center's certificate")?;
        let info = own.info()?;
        let identity = LiveIdentity::new(&own)?;
        let server = tern_pki::tls::server_config(
            identity.clone(),
            &ClientPolicy::OptionalFromCa {
                ca_pem: ca.cert_pem().to_string(),
            },
        )?;
        let (tx, _) = watch::channel(Some(server));
        tracing::info!(
            ca = %ca.fingerprint(),
            "cluster CA ready (sha256 of {}/ca.crt)",
            dir.display()
        );
        Ok(CenterPki {
            ca,
            identity,
            lifetime,
            names,
            server: tx,
            own_not_after: std::sync::Mutex::new(info),
        })
    }

    /// Signs host `host`'s request; returns the chain and what it says.
    pub fn sign_host(&self, host: &str, csr: &str) -> Result<(String, CertInfo), String> {
        let chain = self
            .ca
            .sign_host_request(host, csr, self.lifetime)
            .map_err(|e| e.to_string())?;
        let info = tern_pki::inspect_pem(&chain).map_err(|e| e.to_string())?;
        Ok((chain, info))
    }

    /// Issues the center a new certificate if less than a third of the current one's life is
    /// left; new handshakes use it at once.
    fn renew_own_if_due(&self) -> anyhow::Result<bool> {
        let now = chrono::Utc::now().timestamp();
        let mut cur = self.own_not_after.lock().unwrap_or_else(|p| p.into_inner());
        if !cur.due_for_renewal(now) {
            return Ok(false);
        }
        let own = self.ca.issue_center(&self.names, self.lifetime)?;
        self.identity.set(&own)?;
        *cur = own.info()?;
        Ok(true)
    }
}

/// What the CA is called in certificates: after the data directory, which tells an operator
/// which center made it.
fn cluster_label(data_dir: &Path) -> String {
    data_dir.display().to_string()
}

/// Renews the center's certificate in time, until `stop`.
pub async fn renewer(pki: Arc<CenterPki>, mut stop: watch::Receiver<bool>) {
    // Checked often enough that a renewal due at a third of the life is never missed.
    let every = (pki.lifetime / 12).max(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.wait_for(|v| *v) => return,
            () = tokio::time::sleep(every) => {}
        }
        match pki.renew_own_if_due() {
            Ok(true) => tracing::info!("renewed the center's certificate"),
            Ok(false) => {}
            Err(e) => tracing::error!("renewing the center's certificate: {e:#}"),
        }
    }
}

/// The host a request's client certificate names, with what the certificate says; `None`
/// when the client gave none (or one that names no host).
pub fn peer_host(peer: Option<&PeerCertificate>) -> Option<(String, CertInfo)> {
    let info = tern_pki::inspect(peer?.0.as_ref()).ok()?;
    let host = info.host()?.to_string();
    Some((host, info))
}
