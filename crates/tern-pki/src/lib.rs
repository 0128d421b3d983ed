//! The cluster's public key infrastructure.
//!
//! The center is the cluster's certificate authority ([`Ca`]). It issues two kinds of
//! certificate, and each names exactly one party by a DNS name that only this CA hands out:
//!
//! - the center's own: [`CENTER_NAME`] (plus the names a browser or `curl` would use);
//! - a host's: `NAME.host.tern` ([`host_cert_name`]), signed from the host's signing request
//!   with the name forced, whatever the request asked for.
//!
//! Peers check those names, never the address they dialled: the center calls an agent only if
//! its certificate names that host, an agent accepts only the center's certificate, and a CLI
//! or agent talks only to a server whose certificate names the center and chains to the
//! cluster's CA. The rustls settings that do this live in [`tls`].
//!
//! Why `rcgen` and `ring`: rcgen writes certificates and signing requests without OpenSSL;
//! ring builds on two cores in seconds, where aws-lc-rs needs cmake and minutes.

mod ca;
mod cert;
pub mod tls;

pub use ca::{write_file, Ca};
pub use cert::{
    fingerprint, inspect, inspect_pem, new_host_key, CertInfo, Fingerprint, Identity, PemError,
};
/// The rustls these settings are made for, so users name the same version.
pub use rustls;
pub use tls::LiveIdentity;

/// The name in the center's certificate that every tern client checks.
pub const CENTER_NAME: &str = "center.tern";

/// The suffix of host names in host certificates.
const HOST_SUFFIX: &str = ".host.tern";

/// The name a host's certificate carries.
pub fn host_cert_name(host: &str) -> String {
    format!("{host}{HOST_SUFFIX}")
}

/// The host a certificate name stands for, if it is a host's name.
pub fn host_of_cert_name(name: &str) -> Option<&str> {
    name.strip_suffix(HOST_SUFFIX).filter(|h| !h.is_empty())
}

/// What went wrong with a key, a certificate or a TLS setting.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("making a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
}

impl PkiError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        PkiError::Io {
            what: what.into(),
            source,
        }
    }
}

impl From<PemError> for PkiError {
    fn from(e: PemError) -> Self {
        PkiError::Invalid(e.to_string())
    }
}
