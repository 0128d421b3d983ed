//! The certificate authority: its key and certificate on disk, and the certificates it issues.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::cert::{fingerprint, Fingerprint, Identity};
use crate::PkiError;

/// How long the CA's own certificate lives. Renewing a CA means re-trusting it everywhere, so
/// it lives long; the certificates it issues live short and renew themselves.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Clocks differ between hosts: a certificate is valid from a little before it was made (a
/// tenth of its lifetime at most, so renewal at two thirds of it still comes late).
const BACKDATE: Duration = Duration::from_secs(300);

/// The cluster's certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    fingerprint: Fingerprint,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CA kept in `dir` (`ca.key`, 0600, and `ca.crt`), or makes one there if the
    /// directory holds neither. `cluster` names it, for operators reading certificates.
    pub fn load_or_create(dir: &Path, cluster: &str) -> Result<Ca, PkiError> {
        let (key_path, cert_path) = (dir.join("ca.key"), dir.join("ca.crt"));
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => Ca::load(&key_path, &cert_path),
            (false, false) => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| PkiError::io(format!("creating {}", dir.display()), e))?;
                let ca = Ca::new(cluster)?;
                write_private(&key_path, &ca.issuer.key().serialize_pem())?;
                write_file(&cert_path, &ca.cert_pem, 0o644)?;
                Ok(ca)
            }
            _ => Err(PkiError::Invalid(format!(
                "{} holds only half of a CA (ca.key and ca.crt go together): restore the \
                 missing file from a backup; removing both makes a new CA that no host trusts",
                dir.display()
            ))),
        }
    }

    /// A new CA in memory.
    pub fn new(cluster: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("tern cluster CA {cluster}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, CA_LIFETIME);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let fingerprint = fingerprint(cert.der());
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_pem,
            fingerprint,
        })
    }

    fn load(key_path: &Path, cert_path: &Path) -> Result<Ca, PkiError> {
        let mode = std::fs::metadata(key_path)
            .map_err(|e| PkiError::io(format!("reading {}", key_path.display()), e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(PkiError::Invalid(format!(
                "{} is readable by others (mode {:o}): chmod 600 it",
                key_path.display(),
                mode & 0o777
            )));
        }
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p)
                .map_err(|e| PkiError::io(format!("reading {}", p.display()), e))
        };
        let key = KeyPair::from_pem(&read(&key_path.to_path_buf())?)?;
        let cert_pem = read(&cert_path.to_path_buf())?;
        let der = crate::cert::certs_from_pem(&cert_pem)?.remove(0);
        let fingerprint = fingerprint(&der);
        let issuer = Issuer::from_ca_cert_der(&der, key)?;
        Ok(Ca {
            issuer,
            cert_pem,
            fingerprint,
        })
    }

    /// The CA's certificate, PEM: what peers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The SHA-256 of the CA's certificate: what an operator compares before trusting it.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// A certificate for `public_key` naming `names` (DNS names or IP addresses), good for TLS
    /// servers and clients, valid for `lifetime`. Returns the chain (leaf, CA) as PEM.
    fn issue(
        &self,
        names: &[String],
        public_key: &impl PublicKeyData,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        let Some(first) = names.first() else {
            return Err(PkiError::Invalid("a certificate needs a name".into()));
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, first);
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        set_validity(&mut params, lifetime);
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(format!("{}{}", cert.pem(), self.cert_pem))
    }

    /// Signs host `host`'s signing request: the certificate names `host` only (as
    /// [`crate::host_cert_name`]), whatever names the request asked for. The request's
    /// signature proves the host holds the key.
    pub fn sign_host_request(
        &self,
        host: &str,
        csr_pem: &str,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        if csr_pem.len() > 16 * 1024 {
            return Err(PkiError::Invalid("the signing request is too long".into()));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            PkiError::Invalid(format!("the certificate signing request is not valid: {e}"))
        })?;
        self.issue(&[crate::host_cert_name(host)], &csr.public_key, lifetime)
    }

    /// A new key and certificate naming the center ([`crate::CENTER_NAME`] first, then
    /// `extra_names`: the host names and addresses a browser would use).
    pub fn issue_center(
        &self,
        extra_names: &[String],
        lifetime: Duration,
    ) -> Result<Identity, PkiError> {
        let mut names = vec![crate::CENTER_NAME.to_string()];
        names.extend(extra_names.iter().filter(|n| !n.is_empty()).cloned());
        names.dedup();
        self.issue_identity(&names, lifetime)
    }

    /// A new key and a certificate naming `names`. The center uses it for itself; tests use
    /// it to forge what an attacker could hold.
    pub fn issue_identity(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<Identity, PkiError> {
        let key = KeyPair::generate()?;
        let chain_pem = self.issue(names, &key, lifetime)?;
        Ok(Identity {
            chain_pem,
            key_pem: key.serialize_pem(),
        })
    }
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE.min(lifetime / 10);
    params.not_after = now + lifetime;
}

/// 128 random bits, positive (DER integers are signed).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Writes a secret: created 0600 (never wider, not even for a moment), replaced atomically.
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    write_file(path, text, 0o600)
}

/// Writes `text` to `path` with `mode`: created with that mode (never wider, not even for a
/// moment), synced, and renamed into place, so a crash leaves the old file or the new one.
pub fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| PkiError::io(format!("creating {}", tmp.display()), e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| PkiError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| PkiError::io(format!("renaming {} into place", tmp.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{inspect_pem, new_host_key};

    #[test]
    fn a_ca_is_kept_private_and_loads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let ca = Ca::load_or_create(&pki, "c1").unwrap();
        let mode = std::fs::metadata(pki.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Ca::load_or_create(&pki, "c1").unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        // A certificate issued by the loaded CA chains to the first one's certificate.
        let id = again.issue_center(&[], Duration::from_secs(60)).unwrap();
        assert!(id.chain_pem.ends_with(ca.cert_pem()));

        std::fs::set_permissions(pki.join("ca.key"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let err = Ca::load_or_create(&pki, "c1").unwrap_err().to_string();
        assert!(err.contains("readable by others"), "{err}");
        std::fs::remove_file(pki.join("ca.key")).unwrap();
        let err = Ca::load_or_create(&pki, "c1").unwrap_err().to_string();
        assert!(err.contains("half of a CA"), "{err}");
    }

    #[test]
    fn a_host_certificate_names_the_host_whatever_the_request_asked() {
        let ca = Ca::new("c1").unwrap();
        // A request made for another name (or for the center) still yields h1's name only.
        let (_key, csr) = new_host_key("h2").unwrap();
        let chain = ca
            .sign_host_request("h1", &csr, Duration::from_secs(3600))
            .unwrap();
        let info = inspect_pem(&chain).unwrap();
        assert_eq!(info.dns_names, vec!["h1.host.tern".to_string()]);
        assert_eq!(info.host(), Some("h1"));
        assert!(info.not_after - info.not_before >= 3600);
        // A new certificate is not due for renewal, however short its life.
        for life in [30, 3600, 30 * 24 * 3600] {
            let chain = ca
                .sign_host_request("h1", &csr, Duration::from_secs(life))
                .unwrap();
            let info = inspect_pem(&chain).unwrap();
            let now = info.not_after - life as i64;
            assert!(!info.due_for_renewal(now + 1), "life {life}");
            assert!(
                info.due_for_renewal(now + life as i64 * 3 / 4),
                "life {life}"
            );
        }
        assert!(ca
            .sign_host_request(
                "h1",
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                Duration::from_secs(60)
            )
            .is_err());
    }
}
