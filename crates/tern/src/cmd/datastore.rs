//! `tern datastore add|list|show|remove`: the storage VMs' disks live on.

use std::net::SocketAddr;

use tern_api::datastores::{AddDatastore, Datastore, DatastoreBackend};
use tern_api::CenterClient;

use super::output::{print_json, time, Format, Sheet, Table};
use crate::error::{ApiResultExt, CliError};

const DATASTORE_HELP: &str = "\
A datastore is storage every host of a cluster should see; a VM's disks name a datastore and a
volume in it, and the center turns that into what a host opens:

  directory  a directory at the same path on every host (an NFS or cluster file system mount),
             beneath the agents' --shared-storage root. Volumes are files: shared:vms/db.qcow2.
             When it is added, a host writes a marker file (.tern-datastore) into it, so a host
             where the mount is missing (an empty local directory) is seen not to reach it.
  iscsi      an iSCSI target QEMU opens itself with its userspace initiator (no kernel
             initiator, no multipath on the host). Volumes are LUN numbers: san:2.
  block      a multipath or FC LUN by its /dev/disk/by-id name (catalogued and checked on every
             host; VM disks on it are not supported yet).

The center asks every connected host which datastores it reaches (every --datastore-check-ms,
and again before each placement and migration). A host that loses one raises an event naming
the VMs there that use it; no VM is placed on or moved to a host that does not reach its disks.

Examples:
  tern datastore add shared --directory /srv/shared
  tern datastore add san --iscsi 10.79.0.2:3260 --iqn iqn.2026-12.lab.tern:san
  tern vm create db-1 --cluster prod --vcpus 2 --memory-mib 2048 --disk san:2,bus=scsi
  tern datastore show san";

#[derive(Debug, clap::Subcommand)]
pub enum DatastoreCommand {
    /// Add a datastore (one of --directory, --iscsi with --iqn, --block).
    #[command(after_long_help = DATASTORE_HELP)]
    Add {
        /// The datastore's name: a-z, 0-9, '.' and '-'.
        name: String,
        /// A directory every host mounts at this absolute path.
        #[arg(long, value_name = "PATH", group = "backend")]
        directory: Option<String>,
        /// An iSCSI target's portal, IP:PORT (an address: no DNS answer can redirect a host).
        #[arg(long, value_name = "IP:PORT", group = "backend", requires = "iqn")]
        iscsi: Option<SocketAddr>,
        /// The iSCSI target's name.
        #[arg(long, value_name = "IQN", requires = "iscsi")]
        iqn: Option<String>,
        /// A block device every host sees, by its /dev/disk/by-id name.
        #[arg(long, value_name = "DEVICE-ID", group = "backend")]
        block: Option<String>,
    },
    /// List the datastores, the VMs on each and how many hosts reach it.
    List,
    /// Show a datastore: where it is, the VMs on it, and each host's last answer.
    Show { name: String },
    /// Remove a datastore no VM or image uses (its storage is left untouched).
    Remove { name: String },
}

fn reach_summary(d: &Datastore) -> String {
    if d.hosts.is_empty() {
        return "not checked yet".into();
    }
    let ok = d.hosts.iter().filter(|h| h.reachable).count();
    format!("{ok}/{} hosts", d.hosts.len())
}

fn show(d: &Datastore, fmt: Format) -> Result<(), CliError> {
    if fmt == Format::Json {
        return print_json(d);
    }
    let mut s = Sheet::new();
    s.add("name", &d.name)
        .add("kind", d.backend.kind())
        .add("location", d.backend.location())
        .add("id", &d.id)
        .add("added", format!("{} by {}", time(&d.added_at), d.added_by))
        .add("used by", super::cluster::join_or_dash(&d.used_by))
        .add("reached by", reach_summary(d));
    for h in &d.hosts {
        let verdict = if h.reachable {
            "reachable"
        } else {
            "UNREACHABLE"
        };
        s.add(
            &format!("host {}", h.host),
            format!("{verdict}: {} ({})", h.detail, time(&h.checked_at)),
        );
    }
    s.print();
    Ok(())
}

pub async fn run(cmd: DatastoreCommand, api: &CenterClient, fmt: Format) -> Result<(), CliError> {
    match cmd {
        DatastoreCommand::Add {
            name,
            directory,
            iscsi,
            iqn,
            block,
        } => {
            let backend = match (directory, iscsi, iqn, block) {
                (Some(path), None, None, None) => DatastoreBackend::Directory { path },
                (None, Some(portal), Some(iqn), None) => DatastoreBackend::Iscsi { portal, iqn },
                (None, None, None, Some(device_id)) => DatastoreBackend::Block { device_id },
                _ => {
                    return Err(CliError::usage(
                        "give one of --directory PATH, --iscsi IP:PORT --iqn IQN, --block ID",
                    ))
                }
            };
            let d = api
                .add_datastore(&AddDatastore { name, backend })
                .await
                .or_list("tern datastore list")?;
            show(&d, fmt)
        }
        DatastoreCommand::List => {
            let list = api.datastores().await.or_list("tern datastore list")?;
            if fmt == Format::Json {
                return print_json(&list);
            }
            let mut t = Table::new(&["NAME", "KIND", "LOCATION", "REACHED BY", "USED BY"]);
            for d in &list {
                t.row(vec![
                    d.name.clone(),
                    d.backend.kind().into(),
                    d.backend.location(),
                    reach_summary(d),
                    super::cluster::join_or_dash(&d.used_by),
                ]);
            }
            t.print();
            Ok(())
        }
        DatastoreCommand::Show { name } => {
            let d = api.datastore(&name).await.or_list("tern datastore list")?;
            show(&d, fmt)
        }
        DatastoreCommand::Remove { name } => {
            api.remove_datastore(&name)
                .await
                .or_list("tern datastore list")?;
            if fmt == Format::Table {
                println!("datastore {name} removed");
            }
            Ok(())
        }
    }
}
