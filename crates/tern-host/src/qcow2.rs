//! What a qcow2 image's header says about its backing file, parsed by the agent so that it can
//! open the whole chain itself and hand QEMU descriptors (see `paths::open_for_qemu`).
//!
//! Written by hand rather than asking `qemu-img info`: the agent reads three fields of a
//! documented header (QEMU's `docs/interop/qcow2.txt`) from a file it already opened, and
//! must not run a tool on an image a peer may have crafted. Only what tern needs is accepted:
//! a plain file name (no `json:` or protocol names) and an explicit backing format.

use std::io::Read;

use tern_api::DiskFormat;

/// qcow2's magic, `QFI\xfb`.
const MAGIC: u32 = 0x5146_49fb;
/// Header extension: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// QEMU's own limit on a backing file name.
const MAX_BACKING_NAME: usize = 1023;
/// Bytes read: the header, its extensions and the backing name sit in the first cluster, and
/// no cluster is smaller than 512 bytes; QEMU writes them within the first 64 KiB.
const HEADER_BYTES: usize = 64 * 1024;

/// The backing file a qcow2 image names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// As written in the header: relative names are relative to the image's directory.
    pub name: String,
    pub format: DiskFormat,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not a qcow2 image (no QFI magic)")]
    NotQcow2,
    #[error("qcow2 header is damaged: {0}")]
    Damaged(&'static str),
    #[error(
        "its backing file {0:?} is not a plain file name (json: and protocol names are refused)"
    )]
    BackingName(String),
    #[error(
        "its backing file {0:?} has no recorded format: recreate the image with \
         `qemu-img create -F qcow2|raw` (tern never lets QEMU guess a format)"
    )]
    NoBackingFormat(String),
    #[error("its backing file {0:?} has format {1:?}; tern uses raw and qcow2")]
    BackingFormat(String, String),
    #[error("reading the header: {0}")]
    Io(String),
}

/// The backing file of the qcow2 image read from `image` (its start), if it has one.
pub fn backing(image: impl Read) -> Result<Option<Backing>, HeaderError> {
    let mut buf = Vec::with_capacity(HEADER_BYTES);
    image
        .take(HEADER_BYTES as u64)
        .read_to_end(&mut buf)
        .map_err(|e| HeaderError::Io(e.to_string()))?;
    parse(&buf)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn parse(b: &[u8]) -> Result<Option<Backing>, HeaderError> {
    if be32(b, 0) != Some(MAGIC) {
        return Err(HeaderError::NotQcow2);
    }
    let version = be32(b, 4).ok_or(HeaderError::Damaged("short header"))?;
    if !(2..=3).contains(&version) {
        return Err(HeaderError::Damaged("unknown version"));
    }
    let offset = be64(b, 8).ok_or(HeaderError::Damaged("short header"))?;
    let size = be32(b, 16).ok_or(HeaderError::Damaged("short header"))? as usize;
    if offset == 0 {
        return Ok(None);
    }
    if size == 0 || size > MAX_BACKING_NAME {
        return Err(HeaderError::Damaged("backing file name length"));
    }
    let start = usize::try_from(offset).map_err(|_| HeaderError::Damaged("backing offset"))?;
    let raw = b
        .get(start..start + size)
        .ok_or(HeaderError::Damaged("backing file name beyond the header"))?;
    let name = std::str::from_utf8(raw)
        .map_err(|_| HeaderError::Damaged("backing file name is not UTF-8"))?
        .to_string();
    if name.contains(['\0', '\n']) || name.starts_with("json:") || name.contains("://") {
        return Err(HeaderError::BackingName(name));
    }
    // Version 2 has no extensions; version 3 says where its header ends.
    let mut at = if version == 2 {
        72
    } else {
        be32(b, 100).ok_or(HeaderError::Damaged("short header"))? as usize
    };
    let mut format = None;
    loop {
        let (Some(kind), Some(len)) = (be32(b, at), be32(b, at + 4)) else {
            return Err(HeaderError::Damaged(
                "header extensions run past the header",
            ));
        };
        if kind == 0 {
            break;
        }
        let len = len as usize;
        let data = b
            .get(at + 8..at + 8 + len)
            .ok_or(HeaderError::Damaged("header extension beyond the header"))?;
        if kind == EXT_BACKING_FORMAT {
            format = Some(String::from_utf8_lossy(data).into_owned());
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    let format = match format.as_deref() {
        Some("qcow2") => DiskFormat::Qcow2,
        Some("raw") => DiskFormat::Raw,
        Some(other) => return Err(HeaderError::BackingFormat(name, other.to_string())),
        None => return Err(HeaderError::NoBackingFormat(name)),
    };
    Ok(Some(Backing { name, format }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 3 header (104 bytes), then the extensions, then the name.
    fn image(name: Option<&str>, format: Option<&str>) -> Vec<u8> {
        let mut b = vec![0u8; 104];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        if let Some(f) = format {
            b.extend(EXT_BACKING_FORMAT.to_be_bytes());
            b.extend((f.len() as u32).to_be_bytes());
            b.extend(f.as_bytes());
            b.resize(b.len().div_ceil(8) * 8, 0);
        }
        b.extend([0u8; 8]); // end of extensions
        if let Some(n) = name {
            let at = b.len() as u64;
            b[8..16].copy_from_slice(&at.to_be_bytes());
            b[16..20].copy_from_slice(&(n.len() as u32).to_be_bytes());
            b.extend(n.as_bytes());
        }
        b
    }

    #[test]
    fn reads_the_backing_file_and_its_format() {
        assert_eq!(parse(&image(None, None)), Ok(None));
        assert_eq!(
            parse(&image(Some("../images/debian-12.qcow2"), Some("qcow2"))),
            Ok(Some(Backing {
                name: "../images/debian-12.qcow2".into(),
                format: DiskFormat::Qcow2
            }))
        );
        assert_eq!(
            parse(&image(Some("base.raw"), Some("raw"))).map(|b| b.map(|b| b.format)),
            Ok(Some(DiskFormat::Raw))
        );
    }

    #[test]
    fn refuses_what_qemu_would_have_to_guess_or_fetch() {
        assert_eq!(parse(b"not an image at all"), Err(HeaderError::NotQcow2));
        assert!(matches!(
            parse(&image(Some("base.img"), None)),
            Err(HeaderError::NoBackingFormat(_))
        ));
        assert!(matches!(
            parse(&image(Some("base.img"), Some("vmdk"))),
            Err(HeaderError::BackingFormat(..))
        ));
        for name in [r#"json:{"driver":"nbd"}"#, "nbd://10.0.0.1/x", "a\nb"] {
            assert!(matches!(
                parse(&image(Some(name), Some("raw"))),
                Err(HeaderError::BackingName(_))
            ));
        }
        // A name offset past what was read.
        let mut b = image(Some("base.img"), Some("raw"));
        b[8..16].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(matches!(parse(&b), Err(HeaderError::Damaged(_))));
        // Truncated anywhere: an error, never a panic.
        let whole = image(Some("base.img"), Some("qcow2"));
        for len in 0..whole.len() {
            assert!(parse(&whole[..len]).is_err(), "{len} bytes");
        }
    }
}
