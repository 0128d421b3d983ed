//! A newc ("070701") cpio writer: enough to build a tiny initramfs (busybox and a script)
//! for a test guest. Hand-written because the format is a fixed ASCII header per entry and
//! the crates that write it bring archive features the tests do not need.

/// An archive being built, entries in order.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    pub fn new() -> Cpio {
        Cpio::default()
    }

    /// A directory (mode 0755).
    pub fn dir(self, name: &str) -> Cpio {
        self.entry(name, 0o040755, (0, 0), &[])
    }

    /// A character device node (mode 0600).
    pub fn char_dev(self, name: &str, major: u32, minor: u32) -> Cpio {
        self.entry(name, 0o020600, (major, minor), &[])
    }

    /// A regular file with permission bits `perm` (e.g. 0o755).
    pub fn file(self, name: &str, perm: u32, data: &[u8]) -> Cpio {
        self.entry(name, 0o100000 | (perm & 0o7777), (0, 0), data)
    }

    /// The archive, with its trailer.
    pub fn finish(self) -> Vec<u8> {
        let mut c = self;
        c.ino = 0;
        c.push("TRAILER!!!", 0, (0, 0), &[]);
        c.out
    }

    fn entry(mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> Cpio {
        self.ino += 1;
        self.push(name, mode, rdev, data);
        self
    }

    fn push(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() + 1,
            0 // check
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_end_with_the_trailer() {
        let a = Cpio::new()
            .dir("bin")
            .char_dev("dev/console", 5, 1)
            .file("init", 0o755, b"#!/bin/sh\n")
            .finish();
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&a);
        assert_eq!(text.matches("070701").count(), 4);
        assert!(text.contains("TRAILER!!!"));
        // The console's device numbers sit in the rdev fields of its header.
        let console = text.find("dev/console").expect("console entry");
        let header = &text[console - 110..console];
        assert_eq!(&header[6 + 8 * 9..6 + 8 * 11], "0000000500000001");
    }
}
