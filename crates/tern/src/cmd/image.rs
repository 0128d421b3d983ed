//! `tern image import|list|show|remove`: disk templates VMs' disks are made from.

use std::path::PathBuf;

use tern_api::images::{Image, ImportImage};
use tern_api::CenterClient;

use super::output::{print_json, Format, Sheet, Table};
use crate::error::{ApiResultExt, CliError};

const IMAGE_HELP: &str = "\
An image is a disk template kept on the hosts' shared storage as images/NAME.qcow2. The
file to import must already be on the shared storage (copy it there first): a host's agent
checks it (qcow2 with qemu-img check; raw only with --convert; VMDK, VHDX, VDI and ISO are
refused by name, as are images with a backing file), copies it into place as qcow2 and records
its sha256.

VMs get their boot disk from an image at creation, as a linked clone (a qcow2 over the
template: instant, shares the template's blocks) or a full copy:
  tern vm create web-1 --cluster prod --vcpus 2 --memory-mib 2048 --image debian-12 \\
      --disk-size 20G --cloud-init --ssh-key ~/.ssh/id_ed25519.pub
The disk is vms/VM.qcow2 on the shared storage, and goes when the VM is deleted. An image
cannot be removed while VMs made from it exist.

Examples:
  tern image import /srv/shared/incoming/debian-12-generic-amd64.qcow2 --name debian-12
  tern image import /srv/shared/incoming/disk.raw --name legacy-app --convert";

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Store a template from a file on the shared storage (qcow2, or raw with --convert).
    #[command(after_long_help = IMAGE_HELP)]
    Import {
        /// The source file: an absolute path on the hosts' shared storage.
        file: PathBuf,
        /// The image's name: a-z, 0-9, '.' and '-' (e.g. debian-12, ubuntu-24.04).
        #[arg(long)]
        name: String,
        /// Accept a raw disk image and store it as qcow2.
        #[arg(long)]
        convert: bool,
    },
    /// List the images.
    List,
    /// Show an image: its file, sizes, checksum and the VMs made from it.
    Show { name: String },
    /// Remove an image no VM uses, and its template file.
    Remove { name: String },
}

fn size(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / GIB)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB)
    }
}

fn show(img: &Image, fmt: Format) -> Result<(), CliError> {
    if fmt == Format::Json {
        return print_json(img);
    }
    let mut s = Sheet::new();
    s.add("name", &img.name)
        .add("path", &img.path)
        .add("disk size", size(img.virtual_size_bytes))
        .add("file size", size(img.file_size_bytes))
        .add("sha256", &img.sha256)
        .add("source format", &img.source_format)
        .add(
            "imported",
            format!(
                "{} by {}",
                super::output::time(&img.imported_at),
                img.imported_by
            ),
        )
        .add("used by", super::cluster::join_or_dash(&img.used_by));
    s.print();
    Ok(())
}

pub async fn run(cmd: ImageCommand, api: &CenterClient, fmt: Format) -> Result<(), CliError> {
    match cmd {
        ImageCommand::Import {
            file,
            name,
            convert,
        } => {
            let source = if file.is_absolute() {
                file
            } else {
                std::env::current_dir()
                    .map_err(|e| CliError::usage(format!("current directory: {e}")))?
                    .join(file)
            };
            let req = ImportImage {
                name,
                source: source.display().to_string(),
                convert,
            };
            if fmt == Format::Table {
                eprintln!(
                    "importing {} (a host checks, copies and checksums it)…",
                    req.source
                );
            }
            let img = api.import_image(&req).await.or_list("tern image list")?;
            show(&img, fmt)
        }
        ImageCommand::List => {
            let list = api.images().await.or_list("tern image list")?;
            if fmt == Format::Json {
                return print_json(&list);
            }
            let mut t = Table::new(&["NAME", "DISK SIZE", "FILE SIZE", "USED BY", "PATH"]);
            for i in &list {
                t.row(vec![
                    i.name.clone(),
                    size(i.virtual_size_bytes),
                    size(i.file_size_bytes),
                    super::cluster::join_or_dash(&i.used_by),
                    i.path.clone(),
                ]);
            }
            t.print();
            Ok(())
        }
        ImageCommand::Show { name } => {
            let img = api.image(&name).await.or_list("tern image list")?;
            show(&img, fmt)
        }
        ImageCommand::Remove { name } => {
            api.remove_image(&name).await.or_list("tern image list")?;
            if fmt == Format::Table {
                println!("image {name} removed");
            }
            Ok(())
        }
    }
}
