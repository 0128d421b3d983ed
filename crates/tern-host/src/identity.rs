//! The host's TLS identity: its key and certificate from the cluster CA, kept in
//! `STATE_DIR/tls`, and the TLS settings of its API server and of its calls to the center.
//!
//! Before the host has joined it knows the center only by the CA fingerprint its join token
//! carries: the first call checks the center's chain against it. The center answers the join
//! with a certificate naming this host and the CA's certificate; from then on the agent's API
//! accepts only clients whose certificate names the center, and its calls to the center
//! present the host's certificate. Renewal goes through the same registration call.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tern_pki::tls::{ClientConfig, ClientPolicy, ServerConfig, ServerTrust};
use tern_pki::{CertInfo, Fingerprint, Identity, LiveIdentity};
use tokio::sync::watch;

/// The host's certificate state.
pub struct HostTls {
    dir: PathBuf,
    host: String,
    /// What the agent presents (to the center as a client, to the center as a server).
    pub identity: LiveIdentity,
    /// The API listener's TLS settings: `None` until the host has a certificate.
    pub server: watch::Sender<Option<Arc<ServerConfig>>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The cluster CA's certificate, once known.
    ca_pem: Option<String>,
    /// The current certificate's facts.
    cert: Option<CertInfo>,
    /// The key of a signing request sent and not yet answered.
    pending_key: Option<String>,
    /// When the last renewal was asked for: a center that issues certificates already due
    /// (a clock far off) must not get a request on every heartbeat.
    last_renewal: Option<std::time::Instant>,
}

/// Least time between two renewals.
const RENEWAL_SPACING: std::time::Duration = std::time::Duration::from_secs(10);

impl std::fmt::Debug for HostTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTls")
            .field("dir", &self.dir)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl HostTls {
    /// Loads what `state_dir/tls` holds (nothing, before the first join).
    pub fn open(state_dir: &Path, host: &str) -> anyhow::Result<HostTls> {
        let dir = state_dir.join("tls");
        let tls = HostTls {
            identity: LiveIdentity::default(),
            server: watch::channel(None).0,
            state: Mutex::new(State::default()),
            host: host.to_string(),
            dir,
        };
        let read = |name: &str| std::fs::read_to_string(tls.dir.join(name)).ok();
        // host.pem holds the chain and the key together, so they are replaced as a pair.
        if let (Some(pem), Some(ca)) = (read("host.pem"), read("ca.crt")) {
            let id = Identity {
                chain_pem: pem.clone(),
                key_pem: pem,
            };
            let info = id
                .info()
                .with_context(|| format!("reading {}/host.pem", tls.dir.display()))?;
            if info.host() != Some(host) {
                anyhow::bail!(
                    "{}/host.pem names {:?}, not this host {host:?}: remove {} to join again",
                    tls.dir.display(),
                    info.dns_names,
                    tls.dir.display()
                );
            }
            tls.activate(&id, &ca, info)
                .with_context(|| format!("using {}/host.pem", tls.dir.display()))?;
            tracing::info!(dir = %tls.dir.display(), "host certificate loaded");
        }
        Ok(tls)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a certificate to use: for new handshakes, both ways.
    fn activate(&self, id: &Identity, ca_pem: &str, info: CertInfo) -> anyhow::Result<()> {
        self.identity.set(id)?;
        let server = tern_pki::tls::server_config(
            self.identity.clone(),
            &ClientPolicy::Named {
                ca_pem: ca_pem.to_string(),
                name: tern_pki::CENTER_NAME.to_string(),
            },
        )?;
        self.server.send_replace(Some(server));
        let mut st = self.lock();
        st.ca_pem = Some(ca_pem.to_string());
        st.cert = Some(info);
        Ok(())
    }

    /// TLS settings for calls to the center: trusting the known CA, or else the fingerprint
    /// `pin` (from the join token); presenting the host's certificate when it has one.
    pub fn client_config(&self, pin: Option<Fingerprint>) -> anyhow::Result<ClientConfig> {
        let trust = match (self.lock().ca_pem.clone(), pin) {
            (Some(ca_pem), _) => ServerTrust::Ca {
                ca_pem,
                name: tern_pki::CENTER_NAME.into(),
            },
            (None, Some(ca)) => ServerTrust::Pinned {
                ca,
                name: tern_pki::CENTER_NAME.into(),
            },
            (None, None) => anyhow::bail!(
                "this host has no certificate yet and its enrolment token carries no CA \
                 fingerprint: give the agent a join token from `tern host add NAME` (it ends in \
                 .sha256-…)"
            ),
        };
        Ok(tern_pki::tls::client_config(
            &trust,
            Some(self.identity.clone()),
        )?)
    }

    /// A signing request when `always`, or when the host has no certificate or its current
    /// one is due for renewal; the new key waits for the answer.
    pub fn request_if_due_or(&self, always: bool) -> anyhow::Result<Option<String>> {
        let now = chrono::Utc::now().timestamp();
        let mut st = self.lock();
        if !always && st.cert.as_ref().is_some_and(|c| !c.due_for_renewal(now)) {
            return Ok(None);
        }
        let (key, csr) = tern_pki::new_host_key(&self.host)?;
        st.pending_key = Some(key);
        Ok(Some(csr))
    }

    /// Whether to register again to renew: the certificate is due (or missing) and the last
    /// renewal is not too recent.
    pub fn should_renew(&self) -> bool {
        let now = chrono::Utc::now().timestamp();
        let mut st = self.lock();
        let due = st.cert.as_ref().is_none_or(|c| c.due_for_renewal(now));
        let spaced = st
            .last_renewal
            .is_none_or(|t| t.elapsed() >= RENEWAL_SPACING);
        if due && spaced {
            st.last_renewal = Some(std::time::Instant::now());
        }
        due && spaced
    }

    /// Takes the center's answer: keeps the certificate (and the key it was asked for) on disk
    /// and puts it to use.
    pub fn install(&self, chain_pem: &str, ca_pem: &str) -> anyhow::Result<CertInfo> {
        let Some(key) = self.lock().pending_key.take() else {
            anyhow::bail!("the center sent a certificate this agent did not ask for");
        };
        let id = Identity {
            chain_pem: chain_pem.to_string(),
            key_pem: key,
        };
        let info = id.info()?;
        if info.host() != Some(self.host.as_str()) {
            anyhow::bail!(
                "the center's certificate names {:?}, not this host {:?}",
                info.dns_names,
                self.host
            );
        }
        // Fails if the key does not match the certificate: nothing is written then.
        id.certified_key()?;
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        tern_pki::write_file(&self.dir.join("ca.crt"), ca_pem, 0o644)?;
        tern_pki::write_file(
            &self.dir.join("host.pem"),
            &format!("{}{}", id.chain_pem, id.key_pem),
            0o600,
        )?;
        self.activate(&id, ca_pem, info.clone())?;
        Ok(info)
    }
}
