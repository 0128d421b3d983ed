//! rustls settings that check peers by the names the cluster's CA gives them.
//!
//! The verifiers here check the certificate chain with rustls' WebPKI verifiers, then the
//! *expected* name in place of the one dialled: a host is called at an address, but what is
//! checked is that its certificate names that host.

use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
pub use rustls::{ClientConfig, ServerConfig};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::cert::{certs_from_pem, fingerprint, Fingerprint, Identity};
use crate::PkiError;

/// The cryptography every tern TLS setting uses (ring).
///
/// rustls deprecates ring's provider because it lacks post-quantum key exchange; the one that
/// has it (aws-lc-rs) needs cmake and a C build of minutes on two cores. Switching is one line
/// here once packaging builds aws-lc-rs.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate and key that can be replaced while servers and clients use them (renewal,
/// or the first certificate an agent gets when it joins). Empty until set: a server then
/// fails its handshakes, a client presents no certificate.
#[derive(Clone, Default)]
pub struct LiveIdentity(Arc<RwLock<Option<Arc<CertifiedKey>>>>);

impl std::fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveIdentity(set: {})", self.current().is_some())
    }
}

impl LiveIdentity {
    pub fn new(id: &Identity) -> Result<LiveIdentity, PkiError> {
        let live = LiveIdentity::default();
        live.set(id)?;
        Ok(live)
    }

    /// Replaces the certificate: the next handshake uses the new one.
    pub fn set(&self, id: &Identity) -> Result<(), PkiError> {
        let ck = id.certified_key()?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(ck);
        Ok(())
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ResolvesServerCert for LiveIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for LiveIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current().is_some()
    }
}

/// The trust anchors of a cluster: its CA certificate (PEM).
pub fn ca_roots(ca_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

fn dns(name: &str) -> Result<ServerName<'static>, PkiError> {
    ServerName::try_from(name.to_string())
        .map_err(|e| PkiError::Invalid(format!("{name:?} is not a DNS name: {e}")))
}

/// Which clients a server lets in.
#[derive(Debug, Clone)]
pub enum ClientPolicy {
    /// Anyone (bearer tokens decide); a client certificate, if one is given, must chain to
    /// the CA (the center: the CLI comes without one, agents with theirs).
    OptionalFromCa { ca_pem: String },
    /// Only a client whose certificate chains to the CA and names `name` (an agent lets in
    /// only the center).
    Named { ca_pem: String, name: String },
}

/// A TLS server presenting `identity` to the clients `policy` allows.
pub fn server_config(
    identity: LiveIdentity,
    policy: &ClientPolicy,
) -> Result<Arc<ServerConfig>, PkiError> {
    let provider = provider();
    let verifier: Arc<dyn ClientCertVerifier> = match policy {
        ClientPolicy::OptionalFromCa { ca_pem } => {
            WebPkiClientVerifier::builder_with_provider(ca_roots(ca_pem)?, provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| PkiError::Invalid(format!("client verifier: {e}")))?
        }
        ClientPolicy::Named { ca_pem, name } => Arc::new(NamedClient {
            inner: WebPkiClientVerifier::builder_with_provider(ca_roots(ca_pem)?, provider.clone())
                .build()
                .map_err(|e| PkiError::Invalid(format!("client verifier: {e}")))?,
            name: dns(name)?,
        }),
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(identity));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Whom a client talks to.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// A server whose certificate chains to the CA `ca_pem` and names `name`.
    Ca { ca_pem: String, name: String },
    /// A server whose chain includes the CA certificate with fingerprint `ca`, and whose
    /// certificate chains to it and names `name`: how a host that holds only its join token
    /// (which carries the fingerprint) first reaches the center.
    Pinned { ca: Fingerprint, name: String },
}

/// A TLS client that trusts as `trust` says and presents `identity` when a server asks.
pub fn client_config(
    trust: &ServerTrust,
    identity: Option<LiveIdentity>,
) -> Result<ClientConfig, PkiError> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        ServerTrust::Ca { ca_pem, name } => Arc::new(NamedServer {
            inner: WebPkiServerVerifier::builder_with_provider(ca_roots(ca_pem)?, provider.clone())
                .build()
                .map_err(|e| PkiError::Invalid(format!("server verifier: {e}")))?,
            name: dns(name)?,
        }),
        ServerTrust::Pinned { ca, name } => Arc::new(PinnedServer {
            pin: *ca,
            name: dns(name)?,
            provider: provider.clone(),
        }),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        Some(id) => builder.with_client_cert_resolver(Arc::new(id)),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A client that trusts no server: what a plain-HTTP client holds, so that a `https://` URL
/// given to it fails with a reason instead of trusting the system's roots.
pub fn refusing_client_config() -> ClientConfig {
    let provider = provider();
    let verifier = Arc::new(RefuseAll {
        provider: provider.clone(),
    });
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| unreachable_config())
}

/// The chain a server presented, captured without trusting it: what `tern` shows an operator
/// who is asked to trust a center for the first time.
#[derive(Debug, Default, Clone)]
pub struct Presented(Arc<Mutex<Vec<CertificateDer<'static>>>>);

impl Presented {
    /// The last certificate of the chain (the CA a tern center sends after its own), PEM.
    pub fn ca(&self) -> Option<(Fingerprint, String)> {
        let chain = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let ca = chain.get(1..)?.last()?;
        Some((fingerprint(ca), der_to_pem(ca)))
    }
}

fn der_to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// A client that records the server's chain and trusts nothing: the handshake completes so
/// the chain can be shown, but the caller must send nothing secret over it.
pub fn capturing_client_config() -> (ClientConfig, Presented) {
    let provider = provider();
    let presented = Presented::default();
    let verifier = Arc::new(Capture {
        seen: presented.clone(),
        provider: provider.clone(),
    });
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        });
    // The ring provider always supports the default versions.
    let cfg = cfg.unwrap_or_else(|_| unreachable_config());
    (cfg, presented)
}

/// The name a migration relay's throw-away certificate carries (checked by nobody: see
/// [`relay_client_config`]).
pub const RELAY_SERVER_NAME: &str = "tern-migration-relay";

/// A receiving migration relay's settings: TLS 1.3 only, with a certificate made afresh for
/// this process. Who may send is decided after the handshake, by the migration key's proof
/// bound to this session (`tern_host::relay`), not by certificates.
pub fn relay_server_config() -> Result<ServerConfig, PkiError> {
    let made = rcgen::generate_simple_self_signed(vec![RELAY_SERVER_NAME.to_string()])?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
    Ok(ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key)?)
}

/// A sending migration relay's settings: TLS 1.3 only, and any server certificate whose
/// handshake signature checks out.
///
/// Not trusting the certificate is safe here, and only here, because nothing is sent before
/// the peer proves it holds the migration's key with an HMAC over this session's exported
/// keying material (RFC 8446 section 7.5): a machine in the middle holds two sessions with
/// different keying material, and cannot forward either side's proof to the other.
pub fn relay_client_config() -> Result<ClientConfig, PkiError> {
    let provider = provider();
    let verifier = Arc::new(KeyProvesPeer {
        provider: provider.clone(),
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

#[allow(clippy::panic)]
fn unreachable_config() -> ClientConfig {
    panic!("rustls' ring provider refused its own default protocol versions")
}

/// The signature checks of a verifier that holds `provider`: those of the provider's
/// algorithms (every verifier here checks handshake signatures the same way).
macro_rules! signatures_by_provider {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// The signature checks of a verifier that wraps rustls' own (`inner`): unchanged, only the
/// name check differs.
macro_rules! signatures_by_inner {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}

/// Checks a server's chain against the CA and its name against `name`, not the one dialled.
#[derive(Debug)]
struct NamedServer {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    signatures_by_inner!();
}

/// Trusts the CA certificate with a known fingerprint from the server's own chain.
#[derive(Debug)]
struct PinnedServer {
    pin: Fingerprint,
    name: ServerName<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| fingerprint(c) == self.pin) else {
            return Err(rustls::Error::General(format!(
                "the server's CA is not the one pinned (sha256 {}): this is not the center the \
                 join token was made by",
                self.pin
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("server verifier: {e}")))?;
        inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    signatures_by_provider!();
}

/// Records the chain and accepts it (signatures are still checked, so the chain is the one the
/// server holds the key for).
#[derive(Debug)]
struct Capture {
    seen: Presented,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut seen = self.seen.0.lock().unwrap_or_else(|p| p.into_inner());
        *seen = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        Ok(ServerCertVerified::assertion())
    }

    signatures_by_provider!();
}

/// Accepts a migration relay's certificate: the migration key's proof authenticates the
/// peer instead ([`relay_client_config`]).
#[derive(Debug)]
struct KeyProvesPeer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for KeyProvesPeer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    signatures_by_provider!();
}

/// Trusts no server certificate.
#[derive(Debug)]
struct RefuseAll {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for RefuseAll {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General(
            "no CA is trusted for this server: give the cluster's CA certificate (tern: --ca or \
             TERN_CA; see tern trust --help)"
                .into(),
        ))
    }

    signatures_by_provider!();
}

/// Checks a client's chain against the CA and that its certificate names `name`.
#[derive(Debug)]
struct NamedClient {
    inner: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl ClientCertVerifier for NamedClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&parsed, &self.name)?;
        Ok(verified)
    }

    signatures_by_inner!();
}
