//! The cloud-init NoCloud seed of a VM: a small FAT volume labelled `CIDATA` holding
//! `meta-data`, `user-data` and (when the spec sets a network) `network-config`, attached to
//! the guest read-only.
//!
//! The seed is a pure function of the VM's id and spec, written by whichever host starts the
//! VM or receives it, into the VM's local run dir: both sides of a migration hold the same
//! bytes, so the guest's view of the volume never changes, and nothing about it lives on shared
//! storage. Every document is JSON written by serde (JSON is YAML), so no value from a spec can
//! break out of its field; the fields themselves were checked by `CloudInit::check`.

use std::io::{Cursor, Write};
use std::path::Path;

use serde_json::{json, Value};
use tern_api::{CloudInit, GuestNetwork, VmSpec};
use uuid::Uuid;

/// The volume's label, which cloud-init's NoCloud source looks for.
pub const LABEL: &[u8; 11] = b"CIDATA     ";
/// Smallest seed: room for the three documents and FAT's own tables.
const MIN_BYTES: u64 = 1024 * 1024;

/// The three documents of a seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedDocs {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: Option<String>,
}

/// What the guest is told, from the spec.
pub fn docs(id: Uuid, spec: &VmSpec, ci: &CloudInit) -> SeedDocs {
    let mut meta = json!({
        // A new instance id makes cloud-init run its once-per-instance modules again: the VM's
        // id stays the same across restarts and migrations.
        "instance-id": format!("tern-{id}"),
        "local-hostname": ci.hostname.as_deref().unwrap_or(&spec.name),
    });
    if !ci.ssh_authorized_keys.is_empty() {
        meta["public-keys"] = json!(ci.ssh_authorized_keys);
    }
    let network_config = match (&ci.network, spec.nics.first()) {
        (Some(net), Some(nic)) => Some(network_config(net, &nic.mac).to_string()),
        _ => None,
    };
    SeedDocs {
        meta_data: meta.to_string(),
        user_data: ci
            .user_data
            .clone()
            .unwrap_or_else(|| "#cloud-config\n{}\n".to_string()),
        network_config,
    }
}

/// Netplan-style version 2 configuration of the NIC with `mac`.
fn network_config(net: &GuestNetwork, mac: &str) -> Value {
    let mut nic = json!({ "match": { "macaddress": mac.to_ascii_lowercase() } });
    match net {
        GuestNetwork::Dhcp => {
            nic["dhcp4"] = json!(true);
            nic["dhcp6"] = json!(true);
        }
        GuestNetwork::Static {
            address,
            gateway,
            dns,
        } => {
            nic["addresses"] = json!([address]);
            if let Some(gw) = gateway {
                let default = if gw.contains(':') {
                    "::/0"
                } else {
                    "0.0.0.0/0"
                };
                nic["routes"] = json!([{ "to": default, "via": gw }]);
            }
            if !dns.is_empty() {
                nic["nameservers"] = json!({ "addresses": dns });
            }
        }
    }
    json!({ "version": 2, "ethernets": { "nic0": nic } })
}

/// The seed volume's bytes: the same for the same documents and id, on any host.
pub fn image(id: Uuid, docs: &SeedDocs) -> std::io::Result<Vec<u8>> {
    let content = docs.meta_data.len()
        + docs.user_data.len()
        + docs.network_config.as_ref().map_or(0, String::len);
    // Twice the content, rounded up to whole MiB: FAT12/16 tables and clusters fit easily.
    let size = (2 * content as u64 + MIN_BYTES).div_ceil(MIN_BYTES) * MIN_BYTES;
    let mut disk = Cursor::new(vec![0u8; size as usize]);
    // All of the id's bits folded into FAT's 32-bit serial number.
    let n = id.as_u128();
    let volume_id = (n ^ (n >> 32) ^ (n >> 64) ^ (n >> 96)) as u32;
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(*LABEL)
            .volume_id(volume_id),
    )?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        let mut files = vec![
            ("meta-data", &docs.meta_data),
            ("user-data", &docs.user_data),
        ];
        if let Some(n) = &docs.network_config {
            files.push(("network-config", n));
        }
        for (name, text) in files {
            let mut f = fs.root_dir().create_file(name)?;
            f.truncate()?;
            f.write_all(text.as_bytes())?;
            f.flush()?;
        }
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

/// Writes the VM's seed into `dir` (its run dir) as `seed.img`, replacing an older one
/// atomically; returns its path. `None` when the spec has no cloud-init.
pub fn write(dir: &Path, id: Uuid, spec: &VmSpec) -> std::io::Result<Option<std::path::PathBuf>> {
    let Some(ci) = &spec.cloud_init else {
        return Ok(None);
    };
    let bytes = image(id, &docs(id, spec, ci))?;
    let path = dir.join("seed.img");
    let tmp = dir.join(".seed.img.tmp");
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, &path)?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use tern_api::{BootSource, NicSpec};

    fn spec(ci: CloudInit) -> VmSpec {
        VmSpec {
            firmware: Default::default(),
            cloud_init: Some(ci),
            name: "db-1".into(),
            vcpus: 1,
            memory_mib: 512,
            cpu_model: None,
            boot: BootSource::Disk,
            disks: vec![],
            nics: vec![NicSpec {
                mac: "52:54:00:AA:00:01".into(),
            }],
            resources: Default::default(),
        }
    }

    fn read(img: &[u8], name: &str) -> Option<String> {
        let fs = fatfs::FileSystem::new(Cursor::new(img.to_vec()), fatfs::FsOptions::new())
            .expect("a FAT volume");
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut f = fs.root_dir().open_file(name).ok()?;
        let mut s = String::new();
        f.read_to_string(&mut s).expect("read");
        Some(s)
    }

    #[test]
    fn a_seed_holds_the_spec_as_cloud_init_reads_it() {
        let id = Uuid::from_u128(7);
        let ci = CloudInit {
            hostname: None,
            ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI x@y".into()],
            network: Some(GuestNetwork::Static {
                address: "10.78.0.100/24".into(),
                gateway: Some("10.78.0.1".into()),
                dns: vec![],
            }),
            // A value trying to break out of a YAML document stays a string.
            user_data: Some("#cloud-config\nhostname: \"x\"\n".into()),
        };
        let s = spec(ci);
        let img = image(id, &docs(id, &s, s.cloud_init.as_ref().unwrap())).unwrap();
        let meta: Value = serde_json::from_str(&read(&img, "meta-data").unwrap()).unwrap();
        assert_eq!(meta["local-hostname"], "db-1");
        assert_eq!(meta["instance-id"], format!("tern-{id}"));
        assert_eq!(
            meta["public-keys"][0],
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI x@y"
        );
        assert_eq!(
            read(&img, "user-data").unwrap(),
            "#cloud-config\nhostname: \"x\"\n"
        );
        let net: Value = serde_json::from_str(&read(&img, "network-config").unwrap()).unwrap();
        let nic = &net["ethernets"]["nic0"];
        assert_eq!(nic["match"]["macaddress"], "52:54:00:aa:00:01");
        assert_eq!(nic["addresses"][0], "10.78.0.100/24");
        assert_eq!(nic["routes"][0]["via"], "10.78.0.1");
    }

    #[test]
    fn the_same_spec_gives_the_same_bytes_on_every_host() {
        let id = Uuid::from_u128(9);
        let s = spec(CloudInit {
            user_data: Some("x".repeat(100_000)),
            ..Default::default()
        });
        let dir1 = tempfile::tempdir().unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let a = write(dir1.path(), id, &s).unwrap().unwrap();
        let b = write(dir2.path(), id, &s).unwrap().unwrap();
        let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        assert_eq!(a, b);
        assert_eq!(read(&a, "user-data").unwrap().len(), 100_000);
        assert_eq!(read(&a, "network-config"), None);
        let other = image(
            Uuid::from_u128(10),
            &docs(id, &s, s.cloud_init.as_ref().unwrap()),
        );
        assert_ne!(other.unwrap(), a, "the volume id follows the VM");
    }
}
