//! Certificates as values: PEM in and out, fingerprints, what a certificate says, a host's key
//! and signing request.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

use crate::PkiError;

/// A PEM text that does not hold what it should.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct PemError {
    what: &'static str,
    detail: String,
}

pub(crate) fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError {
            what: "reading certificates (PEM)",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PemError {
            what: "reading certificates (PEM)",
            detail: "no certificate in the text".into(),
        });
    }
    Ok(certs)
}

fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PemError {
        what: "reading a private key (PEM)",
        detail: e.to_string(),
    })
}

/// The SHA-256 of a certificate's DER encoding: what an operator compares to trust a CA.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

/// The fingerprint of the certificate `der`.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    Fingerprint(Sha256::digest(der).into())
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

impl FromStr for Fingerprint {
    type Err = PkiError;

    /// 64 hex digits, optionally after `sha256:` and with `:` between bytes (as `openssl x509
    /// -fingerprint` prints them).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            PkiError::Invalid(format!(
                "{s:?} is not a SHA-256 fingerprint: give 64 hex digits (sha256:… and colons \
                 are accepted)"
            ))
        };
        let hex: String = s
            .trim()
            .strip_prefix("sha256:")
            .unwrap_or(s.trim())
            .chars()
            .filter(|c| *c != ':')
            .collect();
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// A certificate chain (leaf first, then the CA) and its private key, both PEM. `Debug` does
/// not print the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub chain_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("leaf", &self.info().ok())
            .field("key_pem", &"<secret>")
            .finish()
    }
}

impl Identity {
    /// What the leaf certificate says.
    pub fn info(&self) -> Result<CertInfo, PkiError> {
        inspect_pem(&self.chain_pem)
    }

    /// The chain and key as rustls signs with them; checks that the key belongs to the leaf.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, PkiError> {
        let chain = certs_from_pem(&self.chain_pem)?;
        let key = key_from_pem(&self.key_pem)?;
        let provider = crate::tls::provider();
        let ck = CertifiedKey::from_der(chain, key, &provider)?;
        Ok(Arc::new(ck))
    }
}

/// What a certificate says about whom it names and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, hex: what the center records to know a host's current certificate.
    pub serial: String,
    /// Its DNS names (subject alternative names).
    pub dns_names: Vec<String>,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub fingerprint: Fingerprint,
}

impl CertInfo {
    /// The host this certificate names, if it is a host's.
    pub fn host(&self) -> Option<&str> {
        let mut hosts = self
            .dns_names
            .iter()
            .filter_map(|n| crate::host_of_cert_name(n));
        let first = hosts.next()?;
        // A certificate naming two hosts is none of this CA's: trust neither.
        hosts.next().is_none().then_some(first)
    }

    /// Whether a certificate still valid at `now` (Unix seconds) should be replaced: less than
    /// a third of its lifetime is left.
    pub fn due_for_renewal(&self, now: i64) -> bool {
        let life = (self.not_after - self.not_before).max(1);
        self.not_after - now < life / 3
    }
}

/// Reads the certificate `der`.
pub fn inspect(der: &[u8]) -> Result<CertInfo, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::Invalid(format!("not an X.509 certificate: {e}")))?;
    let dns_names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::DNSName(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CertInfo {
        serial: cert.tbs_certificate.raw_serial_as_string().replace(':', ""),
        dns_names,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        fingerprint: fingerprint(der),
    })
}

/// Reads the first certificate of the PEM text `pem`.
pub fn inspect_pem(pem: &str) -> Result<CertInfo, PkiError> {
    let certs = certs_from_pem(pem)?;
    inspect(&certs[0])
}

/// A new key pair for host `host` and a signing request for it, both PEM. The CA decides the
/// names; the request only carries the public key and its proof of possession.
pub fn new_host_key(host: &str) -> Result<(String, String), PkiError> {
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec![crate::host_cert_name(host)])?;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_the_forms_people_paste() {
        let f = fingerprint(b"abc");
        let plain = f.to_string();
        assert_eq!(plain.len(), 64);
        assert_eq!(plain.parse::<Fingerprint>().unwrap(), f);
        assert_eq!(format!("sha256:{plain}").parse::<Fingerprint>().unwrap(), f);
        let colons: Vec<String> = f.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(colons.join(":").parse::<Fingerprint>().unwrap(), f);
        assert!("abcd".parse::<Fingerprint>().is_err());
        assert!(plain.replace('a', "g").parse::<Fingerprint>().is_err() || !plain.contains('a'));
        assert!(format!("{}é", &plain[..62]).parse::<Fingerprint>().is_err());
    }

    #[test]
    fn a_certificate_naming_two_hosts_names_none() {
        let info = |names: &[&str]| CertInfo {
            serial: "01".into(),
            dns_names: names.iter().map(|s| s.to_string()).collect(),
            not_before: 0,
            not_after: 90,
            fingerprint: fingerprint(b""),
        };
        assert_eq!(info(&["h1.host.tern"]).host(), Some("h1"));
        assert_eq!(info(&["center.tern"]).host(), None);
        assert_eq!(info(&["h1.host.tern", "h2.host.tern"]).host(), None);
        assert!(!info(&[]).due_for_renewal(59));
        assert!(info(&[]).due_for_renewal(61));
    }
}
