//! What a VM's guest OS is told at boot: its firmware, and the cloud-init configuration the
//! host hands it as a NoCloud seed volume.
//!
//! Every field here ends up inside the guest (nothing reaches QEMU's command line or a host
//! path), but it crosses the management network, so [`CloudInit::check`] parses it into shapes
//! a guest's cloud-init reads the way the user meant: one host name, one key per line, real
//! addresses, bounded sizes. Center and agent both run the check.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Firmware the VM boots with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    /// SeaBIOS (QEMU's default): boots an MBR disk, or a kernel given directly.
    #[default]
    Bios,
    /// UEFI (OVMF): the host's firmware code, and a variables store of the VM's own on shared
    /// storage, so boot entries it writes move with it.
    Uefi,
}

impl Firmware {
    pub fn is_default(&self) -> bool {
        *self == Firmware::Bios
    }
}

impl std::fmt::Display for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        })
    }
}

impl std::str::FromStr for Firmware {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bios" => Ok(Firmware::Bios),
            "uefi" => Ok(Firmware::Uefi),
            _ => Err(format!("{s:?}: firmware is bios or uefi")),
        }
    }
}

/// The guest's cloud-init configuration (a NoCloud seed: `meta-data`, `user-data`,
/// `network-config` on a FAT volume labelled `cidata`, attached read-only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// The guest's host name [default: the VM's name].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// OpenSSH public keys (`ssh-ed25519 AAAA… comment`) for the image's default user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// Network of the first NIC [default: left to the image, usually DHCP].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<GuestNetwork>,
    /// User data handed to cloud-init as it is (`#cloud-config …`, a script…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

/// How the guest configures its first NIC (matched by its MAC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestNetwork {
    Dhcp,
    Static {
        /// Address and prefix, `10.78.0.100/24` or `fd00::5/64`.
        address: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gateway: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        dns: Vec<String>,
    },
}

/// Largest user data: it travels in every spec and must fit the seed volume.
pub const MAX_USER_DATA_BYTES: usize = 64 * 1024;
/// Most SSH keys, and the longest one (an RSA 16384-bit key is about 2.8 KiB).
pub const MAX_SSH_KEYS: usize = 32;
pub const MAX_SSH_KEY_BYTES: usize = 8 * 1024;
/// Most DNS servers a static network names.
pub const MAX_DNS: usize = 4;

/// Key types OpenSSH accepts for authorized keys.
const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

impl CloudInit {
    /// Checks every field; the message names the field and what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if let Some(h) = &self.hostname {
            if !valid_hostname(h) {
                return Err(format!(
                    "cloud_init.hostname {h:?} is not a host name: dot-separated labels of \
                     a-z, 0-9 and '-' (1 to 63 characters each, not starting or ending with \
                     '-'), 253 characters at most"
                ));
            }
        }
        if self.ssh_authorized_keys.len() > MAX_SSH_KEYS {
            return Err(format!(
                "cloud_init.ssh_authorized_keys: {} given, at most {MAX_SSH_KEYS}",
                self.ssh_authorized_keys.len()
            ));
        }
        for key in &self.ssh_authorized_keys {
            check_ssh_key(key)?;
        }
        if let Some(GuestNetwork::Static {
            address,
            gateway,
            dns,
        }) = &self.network
        {
            let (ip, _) = parse_cidr(address).ok_or_else(|| {
                format!(
                    "cloud_init.network.address {address:?} is not an address with a prefix \
                     (10.78.0.100/24, fd00::5/64)"
                )
            })?;
            if let Some(g) = gateway {
                let gw: IpAddr = g.parse().map_err(|_| {
                    format!("cloud_init.network.gateway {g:?} is not an IP address")
                })?;
                if gw.is_ipv4() != ip.is_ipv4() {
                    return Err(format!(
                        "cloud_init.network.gateway {g} is not of the address's family ({address})"
                    ));
                }
            }
            if dns.len() > MAX_DNS {
                return Err(format!(
                    "cloud_init.network.dns: {} given, at most {MAX_DNS}",
                    dns.len()
                ));
            }
            if let Some(d) = dns.iter().find(|d| d.parse::<IpAddr>().is_err()) {
                return Err(format!("cloud_init.network.dns {d:?} is not an IP address"));
            }
        }
        if let Some(u) = &self.user_data {
            if u.len() > MAX_USER_DATA_BYTES {
                return Err(format!(
                    "cloud_init.user_data is {} bytes; at most {MAX_USER_DATA_BYTES}",
                    u.len()
                ));
            }
            if u.contains('\0') {
                return Err("cloud_init.user_data holds a NUL byte: it must be text".into());
            }
        }
        Ok(())
    }
}

/// `addr/prefix` with a prefix that fits the family.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 3 {
        return None;
    }
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((ip, prefix))
}

/// RFC 1123 host names, lower case.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// One OpenSSH public key line: a known type, base64 key data, an optional printable comment.
/// Options (`command=…`) are refused: a key handed through the API grants a login, nothing
/// else.
fn check_ssh_key(key: &str) -> Result<(), String> {
    let shown: String = key.chars().take(40).collect();
    if key.len() > MAX_SSH_KEY_BYTES {
        return Err(format!(
            "cloud_init.ssh_authorized_keys: the key {shown:?}… is {} bytes; at most \
             {MAX_SSH_KEY_BYTES}",
            key.len()
        ));
    }
    if key.chars().any(|c| c.is_control()) {
        return Err(format!(
            "cloud_init.ssh_authorized_keys: the key {shown:?} holds a line break or control \
             character: give one key per entry"
        ));
    }
    let mut parts = key.splitn(3, ' ');
    let kind = parts.next().unwrap_or_default();
    let data = parts.next().unwrap_or_default();
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!(
            "cloud_init.ssh_authorized_keys: {shown:?} does not start with a key type ({})",
            SSH_KEY_TYPES.join(", ")
        ));
    }
    let b64 = data.len() >= 16
        && data
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if !b64 {
        return Err(format!(
            "cloud_init.ssh_authorized_keys: {shown:?} has no base64 key data after its type"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq4Vw0x8u1Y4m2kqf0a8l7YpQ3n3Yk8b9m6c0dZ2r4T tern@lab";

    fn ok() -> CloudInit {
        CloudInit {
            hostname: Some("db-1.lab".into()),
            ssh_authorized_keys: vec![KEY.into()],
            network: Some(GuestNetwork::Static {
                address: "10.78.0.100/24".into(),
                gateway: Some("10.78.0.1".into()),
                dns: vec!["10.78.0.1".into()],
            }),
            user_data: Some("#cloud-config\nruncmd: [ [ true ] ]\n".into()),
        }
    }

    #[test]
    fn accepts_a_full_configuration() {
        ok().check().unwrap();
        CloudInit::default().check().unwrap();
    }

    #[test]
    fn refuses_what_would_change_meaning_in_the_guest() {
        type Change = Box<dyn Fn(&mut CloudInit)>;
        let cases: Vec<(&str, Change)> = vec![
            ("hostname", Box::new(|c| c.hostname = Some("a b".into()))),
            ("hostname", Box::new(|c| c.hostname = Some("-x".into()))),
            (
                "hostname",
                Box::new(|c| c.hostname = Some("x\nroot".into())),
            ),
            (
                "line break",
                Box::new(|c| c.ssh_authorized_keys = vec![format!("{KEY}\nssh-rsa AAAA")]),
            ),
            (
                "key type",
                Box::new(|c| c.ssh_authorized_keys = vec![format!("command=\"rm -rf /\" {KEY}")]),
            ),
            (
                "base64",
                Box::new(|c| c.ssh_authorized_keys = vec!["ssh-ed25519 !!!! x".into()]),
            ),
            (
                "address",
                Box::new(|c| {
                    c.network = Some(GuestNetwork::Static {
                        address: "10.78.0.100".into(),
                        gateway: None,
                        dns: vec![],
                    })
                }),
            ),
            (
                "address",
                Box::new(|c| {
                    c.network = Some(GuestNetwork::Static {
                        address: "10.78.0.100/33".into(),
                        gateway: None,
                        dns: vec![],
                    })
                }),
            ),
            (
                "family",
                Box::new(|c| {
                    c.network = Some(GuestNetwork::Static {
                        address: "10.78.0.100/24".into(),
                        gateway: Some("fd00::1".into()),
                        dns: vec![],
                    })
                }),
            ),
            (
                "dns",
                Box::new(|c| {
                    c.network = Some(GuestNetwork::Static {
                        address: "10.78.0.100/24".into(),
                        gateway: None,
                        dns: vec!["evil.example; rm".into()],
                    })
                }),
            ),
            ("NUL", Box::new(|c| c.user_data = Some("a\0b".into()))),
            (
                "bytes",
                Box::new(|c| c.user_data = Some("x".repeat(MAX_USER_DATA_BYTES + 1))),
            ),
        ];
        for (want, change) in cases {
            let mut c = ok();
            change(&mut c);
            let err = c.check().expect_err(want);
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn cidr_and_firmware_parse() {
        assert_eq!(
            parse_cidr("fd00::5/64"),
            Some(("fd00::5".parse().unwrap(), 64))
        );
        assert_eq!(parse_cidr("10.0.0.1/+8"), None);
        assert_eq!("uefi".parse::<Firmware>(), Ok(Firmware::Uefi));
        assert!("efi".parse::<Firmware>().is_err());
    }
}
