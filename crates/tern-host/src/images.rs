//! Image files on the shared storage: importing a template (`images/<name>.qcow2`) and
//! making a VM's disk from one (`vms/<vm>.qcow2`, a linked clone or a full copy).
//!
//! The work is `qemu-img`'s (convert, check, create, info): the format code that QEMU itself
//! trusts. What reaches it is typed: names were checked as plain file names, the source is a
//! descriptor the agent opened beneath the shared storage (passed as `/proc/self/fd/N` of the
//! agent, which qemu-img opens as that same file), and every output is created under a
//! temporary name and linked into place only when whole, never replacing an existing file.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use tern_api::images::{valid_image_name, CloneVolume, ImageFile, ImportImageFile, Volume};

use crate::paths::{open_beneath, OpenError};

/// Where templates and VM disks live under the shared storage.
pub const IMAGES_DIR: &str = "images";
pub const VOLUMES_DIR: &str = "vms";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The request is wrong: a 4xx.
    #[error("{0}")]
    Invalid(String),
    /// The name is taken: a 409.
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Open(#[from] OpenError),
    /// The storage or a tool failed: a 5xx.
    #[error("{0}")]
    Failed(String),
}

/// Formats recognised by their magic, to refuse them by name instead of taking them for raw.
fn foreign_format(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        Some("VMDK")
    } else if at(0, b"vhdxfile") {
        Some("VHDX")
    } else if at(0, b"conectix") {
        Some("VHD")
    } else if at(0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
        Some("VDI")
    } else if at(0, b"QED\0") {
        Some("QED")
    } else if at(0x8001, b"CD001") {
        Some("ISO 9660")
    } else {
        None
    }
}

fn tool(cmd: &mut Command, what: &str) -> Result<String, ImageError> {
    let out = cmd
        .output()
        .map_err(|e| ImageError::Failed(format!("{what}: cannot run qemu-img: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let first: Vec<&str> = err.lines().take(3).collect();
        Err(ImageError::Invalid(format!("{what}: {}", first.join("; "))))
    }
}

/// Links `tmp` to `dest` (failing if `dest` exists) and removes `tmp` either way.
fn publish(tmp: &Path, dest: &Path) -> Result<(), ImageError> {
    let linked = std::fs::hard_link(tmp, dest);
    let _ = std::fs::remove_file(tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(ImageError::Exists(
            format!("{} exists already", dest.display()),
        )),
        Err(e) => Err(ImageError::Failed(format!("{}: {e}", dest.display()))),
    }
}

fn temp_name(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.{}.tmp", std::process::id()))
}

/// qemu-img's view of a file tern made (virtual size).
fn virtual_size(path: &Path) -> Result<u64, ImageError> {
    let json = tool(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2"])
            .arg(path),
        "reading the new image",
    )?;
    serde_json::from_str::<serde_json::Value>(&json)
        .ok()
        .and_then(|v| v["virtual-size"].as_u64())
        .ok_or_else(|| ImageError::Failed(format!("qemu-img info gave no size: {json}")))
}

fn sha256(path: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| ImageError::Failed(format!("{}: {e}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| ImageError::Failed(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Stores the template `req.name` from `req.source` (a file beneath `root`).
pub fn import(root: &Path, req: &ImportImageFile) -> Result<ImageFile, ImageError> {
    if !valid_image_name(&req.name) {
        return Err(ImageError::Invalid(format!(
            "image name {:?} is not valid: 1 to 64 of a-z, 0-9, '.' and '-', starting with a \
             letter or digit, without '..'",
            req.name
        )));
    }
    let dir = root.join(IMAGES_DIR);
    let dest = dir.join(format!("{}.qcow2", req.name));
    if dest.exists() {
        return Err(ImageError::Exists(format!(
            "an image named {} exists already ({})",
            req.name,
            dest.display()
        )));
    }
    let source = std::fs::File::from(open_beneath(root, &req.source, false, false)?);
    let mut head = Vec::new();
    (&source)
        .take(0x8010)
        .read_to_end(&mut head)
        .map_err(|e| ImageError::Failed(format!("reading {}: {e}", req.source)))?;
    let len = source
        .metadata()
        .map_err(|e| ImageError::Failed(format!("{}: {e}", req.source)))?
        .len();
    if len == 0 {
        return Err(ImageError::Invalid(format!("{} is empty", req.source)));
    }
    let qcow2 = match crate::qcow2::backing(&head[..]) {
        Ok(None) => true,
        Ok(Some(b)) => {
            return Err(ImageError::Invalid(format!(
                "{} has a backing file ({}): a template must stand alone; flatten it with \
                 `qemu-img convert -O qcow2` first",
                req.source, b.name
            )))
        }
        Err(crate::qcow2::HeaderError::NotQcow2) => false,
        Err(e) => return Err(ImageError::Invalid(format!("{}: {e}", req.source))),
    };
    if !qcow2 {
        if let Some(f) = foreign_format(&head) {
            return Err(ImageError::Invalid(format!(
                "{} is a {f} image; tern stores qcow2 (or raw with convert): convert it with \
                 `qemu-img convert -O qcow2` first",
                req.source
            )));
        }
        if !req.convert {
            return Err(ImageError::Invalid(format!(
                "{} is not qcow2; if it is a raw disk image, import it with convert (--convert) \
                 to store it as qcow2",
                req.source
            )));
        }
        if len % 512 != 0 {
            return Err(ImageError::Invalid(format!(
                "{} is {len} bytes, not whole 512-byte sectors: not a raw disk image (truncated?)",
                req.source
            )));
        }
    }
    let format = if qcow2 { "qcow2" } else { "raw" };
    // The agent's descriptor, as qemu-img (a child of this process) can open it.
    let src = format!("/proc/{}/fd/{}", std::process::id(), source.as_raw_fd());
    if qcow2 {
        // A truncated or damaged template would hand every clone its damage.
        tool(
            Command::new("qemu-img").args(["check", "-q", "-f", "qcow2", &src]),
            &format!("{} failed qemu-img's consistency check", req.source),
        )?;
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| ImageError::Failed(format!("{}: {e}", dir.display())))?;
    let tmp = temp_name(&dir, &req.name);
    let converted = tool(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", format, "-O", "qcow2", &src])
            .arg(&tmp),
        &format!("copying {}", req.source),
    );
    if let Err(e) = converted {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let size = virtual_size(&tmp);
    let sum = sha256(&tmp);
    let (size, sum) = match (size, sum) {
        (Ok(s), Ok(h)) => (s, h),
        (Err(e), _) | (_, Err(e)) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let file_size = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
    publish(&tmp, &dest)?;
    Ok(ImageFile {
        path: dest.display().to_string(),
        virtual_size_bytes: size,
        file_size_bytes: file_size,
        sha256: sum,
        source_format: format.to_string(),
    })
}

/// Makes VM `req.vm`'s disk from image `req.image`.
pub fn clone(root: &Path, req: &CloneVolume) -> Result<Volume, ImageError> {
    if !valid_image_name(&req.image) || !tern_api::valid_name(&req.vm) {
        return Err(ImageError::Invalid(format!(
            "image {:?} or VM {:?} is not a valid name",
            req.image, req.vm
        )));
    }
    let template = root.join(IMAGES_DIR).join(format!("{}.qcow2", req.image));
    if !template.is_file() {
        return Err(ImageError::Invalid(format!(
            "image {}'s template {} is not on this host's shared storage",
            req.image,
            template.display()
        )));
    }
    let image_size = virtual_size(&template)?;
    if let Some(url) = &req.lun {
        return copy_to_lun(&template, image_size, url, req);
    }
    let size = req.size_bytes.unwrap_or(image_size);
    if size < image_size {
        return Err(ImageError::Invalid(format!(
            "a disk of {size} bytes is smaller than image {} ({image_size} bytes)",
            req.image
        )));
    }
    let dir = root.join(VOLUMES_DIR);
    std::fs::create_dir_all(&dir)
        .map_err(|e| ImageError::Failed(format!("{}: {e}", dir.display())))?;
    let dest = dir.join(format!("{}.qcow2", req.vm));
    if dest.exists() {
        return Err(ImageError::Exists(format!(
            "VM {}'s disk {} exists already: remove it or pick another VM name",
            req.vm,
            dest.display()
        )));
    }
    let tmp = temp_name(&dir, &req.vm);
    let made = if req.full_copy {
        tool(
            Command::new("qemu-img")
                .args(["convert", "-q", "-f", "qcow2", "-O", "qcow2"])
                .arg(&template)
                .arg(&tmp),
            "copying the image",
        )
        .and_then(|_| {
            tool(
                Command::new("qemu-img")
                    .args(["resize", "-q", "-f", "qcow2"])
                    .arg(&tmp)
                    .arg(size.to_string()),
                "sizing the disk",
            )
        })
    } else {
        // Relative, so the clone finds its template wherever a host mounts the storage.
        let backing = format!("../{IMAGES_DIR}/{}.qcow2", req.image);
        tool(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &backing])
                .arg(&tmp)
                .arg(size.to_string()),
            "making the linked clone",
        )
    };
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    publish(&tmp, &dest)?;
    Ok(Volume {
        path: dest.display().to_string(),
        virtual_size_bytes: size,
    })
}

/// Writes a raw copy of `template` onto the iSCSI LUN `url`, with QEMU's own initiator (this
/// host's namespace, as the VM's QEMU will): the disk is the whole LUN.
fn copy_to_lun(
    template: &Path,
    image_size: u64,
    url: &str,
    req: &CloneVolume,
) -> Result<Volume, ImageError> {
    let lun = tern_api::IscsiLun::parse(url)
        .ok_or_else(|| ImageError::Invalid(format!("{url:?} is not an iSCSI LUN URL")))?;
    if !req.full_copy {
        return Err(ImageError::Invalid(
            "a disk on an iSCSI LUN is a full copy of the image (a linked clone keeps its \
             template on a directory datastore): ask for a full copy"
                .into(),
        ));
    }
    let info = tool(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "raw"])
            .arg(lun.url()),
        "reading the LUN",
    )?;
    let lun_size = serde_json::from_str::<serde_json::Value>(&info)
        .ok()
        .and_then(|v| v["virtual-size"].as_u64())
        .ok_or_else(|| ImageError::Failed(format!("qemu-img info gave no size: {info}")))?;
    let want = req.size_bytes.unwrap_or(image_size).max(image_size);
    if lun_size < want {
        return Err(ImageError::Invalid(format!(
            "LUN {} has {lun_size} bytes, less than the {want} the disk needs",
            lun.lun
        )));
    }
    tool(
        Command::new("qemu-img")
            .args([
                "convert", "-q", "-n", "-t", "none", "-f", "qcow2", "-O", "raw",
            ])
            .arg(template)
            .arg(lun.url()),
        "copying the image onto the LUN",
    )?;
    Ok(Volume {
        path: lun.url(),
        virtual_size_bytes: lun_size,
    })
}

/// Removes the template of image `name` (`volume`: VM `name`'s disk made from an image).
/// Gone already is fine: the catalogue, not the file, is what the center goes by.
pub fn remove(root: &Path, volume: bool, name: &str) -> Result<(), ImageError> {
    let ok = if volume {
        tern_api::valid_name(name)
    } else {
        valid_image_name(name)
    };
    if !ok {
        return Err(ImageError::Invalid(format!("{name:?} is not a valid name")));
    }
    let dir = if volume { VOLUMES_DIR } else { IMAGES_DIR };
    let path = root.join(dir).join(format!("{name}.qcow2"));
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::Failed(format!("{}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, source: &Path, convert: bool) -> ImportImageFile {
        ImportImageFile {
            name: name.into(),
            source: source.display().to_string(),
            convert,
        }
    }

    #[test]
    fn imports_refuse_what_is_not_a_whole_disk_image_and_change_nothing() {
        let shared = tempfile::tempdir().unwrap();
        let root = shared.path();
        let raw = root.join("disk.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        // Raw without convert, then with it.
        assert!(
            matches!(import(root, &req("base", &raw, false)), Err(ImageError::Invalid(m)) if m.contains("--convert"))
        );
        let img = import(root, &req("base", &raw, true)).unwrap();
        assert_eq!(img.virtual_size_bytes, 1 << 20);
        assert_eq!(img.source_format, "raw");
        assert_eq!(img.sha256.len(), 64);
        // The name is taken.
        assert!(matches!(
            import(root, &req("base", &raw, true)),
            Err(ImageError::Exists(_))
        ));
        // A name that is a path, a file outside the storage.
        assert!(matches!(
            import(root, &req("../x", &raw, true)),
            Err(ImageError::Invalid(_))
        ));
        assert!(matches!(
            import(root, &req("x", Path::new("/etc/passwd"), true)),
            Err(ImageError::Open(OpenError::Outside(..)))
        ));
        // A VMDK by its magic; a truncated qcow2.
        let vmdk = root.join("disk.vmdk");
        let mut v = b"KDMV".to_vec();
        v.resize(4096, 0);
        std::fs::write(&vmdk, v).unwrap();
        assert!(
            matches!(import(root, &req("v", &vmdk, true)), Err(ImageError::Invalid(m)) if m.contains("VMDK"))
        );
        let full = root.join("full.qcow2");
        let out = Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4096",
            ])
            .arg(&raw)
            .arg(&full)
            .output()
            .unwrap();
        assert!(out.status.success());
        // Fill it so that its data clusters lie at the end of the file.
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5a 0 1M"])
            .arg(&full)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let len = std::fs::metadata(&full).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&full).unwrap();
        f.set_len(len / 2).unwrap();
        assert!(
            matches!(import(root, &req("t", &full, false)), Err(ImageError::Invalid(m)) if m.contains("check"))
        );
        let left: Vec<String> = std::fs::read_dir(root.join(IMAGES_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            vec!["base.qcow2"],
            "a refused import leaves nothing behind"
        );

        // Clones: linked (over the template), full, and never smaller than the image.
        let linked = clone(
            root,
            &CloneVolume {
                image: "base".into(),
                vm: "a".into(),
                size_bytes: Some(2 << 20),
                full_copy: false,
                lun: None,
            },
        )
        .unwrap();
        let header = std::fs::File::open(&linked.path).unwrap();
        assert_eq!(
            crate::qcow2::backing(header).unwrap().unwrap().name,
            "../images/base.qcow2"
        );
        let full = clone(
            root,
            &CloneVolume {
                image: "base".into(),
                vm: "b".into(),
                size_bytes: None,
                full_copy: true,
                lun: None,
            },
        )
        .unwrap();
        assert_eq!(
            crate::qcow2::backing(std::fs::File::open(&full.path).unwrap()).unwrap(),
            None
        );
        assert!(
            matches!(clone(root, &CloneVolume { image: "base".into(), vm: "c".into(), size_bytes: Some(4096), full_copy: false, lun: None }), Err(ImageError::Invalid(m)) if m.contains("smaller"))
        );
        assert!(matches!(
            clone(
                root,
                &CloneVolume {
                    image: "base".into(),
                    vm: "a".into(),
                    size_bytes: None,
                    full_copy: false,
                    lun: None,
                }
            ),
            Err(ImageError::Exists(_))
        ));
    }
}
