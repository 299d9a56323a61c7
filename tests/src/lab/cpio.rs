//! A writer for the `newc` cpio format, the one the kernel unpacks into its
//! initramfs (see the kernel's Documentation/driver-api/early-userspace/
//! buffer-format.rst): per entry a 110-byte ASCII header of thirteen 8-digit
//! hex fields after the magic `070701`, the NUL-terminated name, the data,
//! each padded to 4 bytes; a `TRAILER!!!` entry ends the archive.
//!
//! Entries are written with nlink 1 and distinct inode numbers, so the
//! kernel never treats two of them as hard links.

use std::io::{self, Write};

/// The file type bits of a cpio mode.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// The newc magic.
const MAGIC: &[u8; 6] = b"070701";
/// Fields are 8 hex digits: nothing may exceed `u32`.
const MAX_FIELD: u64 = u32::MAX as u64;

/// What one entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link; its data is the target.
    Symlink,
}

impl Kind {
    fn type_bits(self) -> u32 {
        match self {
            Kind::Dir => S_IFDIR,
            Kind::File => S_IFREG,
            Kind::Symlink => S_IFLNK,
        }
    }
}

/// A newc archive being written to `W`.
pub struct Writer<W: Write> {
    out: W,
    /// Bytes written so far (for padding).
    offset: u64,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    /// Start an archive on `out`.
    pub fn new(out: W) -> Self {
        Writer {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// Add a directory `name` (relative, no leading `/`) with permission
    /// bits `perm` (e.g. `0o755`).
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, Kind::Dir, perm, &[])
    }

    /// Add a regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, Kind::File, perm, data)
    }

    /// Add a symbolic link `name` -> `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, Kind::Symlink, 0o777, target.as_bytes())
    }

    /// Add one entry of `kind`.
    pub fn entry(&mut self, name: &str, kind: Kind, perm: u32, data: &[u8]) -> io::Result<()> {
        if name.is_empty() || name.starts_with('/') || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry name {name:?} must be relative and non-empty"),
            ));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(name, kind.type_bits() | (perm & 0o7777), ino, 1, data.len())?;
        self.write_padded(data)
    }

    /// End the archive (the trailer entry) and return the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, 1, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        ino: u32,
        nlink: u32,
        size: usize,
    ) -> io::Result<()> {
        let size = u64::try_from(size).unwrap_or(u64::MAX);
        if size > MAX_FIELD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: {size} bytes do not fit a newc header"),
            ));
        }
        // Name length includes its NUL.
        let name_size = name.len() + 1;
        let fields: [u64; 13] = [
            u64::from(ino),
            u64::from(mode),
            0, // uid
            0, // gid
            u64::from(nlink),
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            name_size as u64,
            0, // check
        ];
        let mut head = Vec::with_capacity(110 + name_size + 3);
        head.extend_from_slice(MAGIC);
        for field in fields {
            head.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        head.extend_from_slice(name.as_bytes());
        head.push(0);
        self.write_padded(&head)
    }

    fn write_padded(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        let pad = (4 - (self.offset % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.offset += pad as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_and_padding_follow_newc() {
        let mut w = Writer::new(Vec::new());
        w.file("a", 0o644, b"xyz").unwrap();
        let out = w.finish().unwrap();
        // Header (110) + "a\0" (2) = 112, 4-aligned; data 3 + 1 pad.
        assert_eq!(&out[..6], b"070701");
        let field = |i: usize| {
            let s = std::str::from_utf8(&out[6 + 8 * i..14 + 8 * i]).unwrap();
            u32::from_str_radix(s, 16).unwrap()
        };
        assert_eq!(field(1), 0o100644, "mode");
        assert_eq!(field(4), 1, "nlink");
        assert_eq!(field(6), 3, "filesize");
        assert_eq!(field(11), 2, "namesize");
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..116], b"xyz\0");
        assert_eq!(&out[116..122], b"070701", "the trailer starts 4-aligned");
        assert_eq!(out.len() % 4, 0);
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn the_system_cpio_reads_what_we_write() {
        if !crate::support::have_program("cpio") {
            panic!("cpio is not installed: run `sudo scripts/install-test-deps.sh`");
        }
        let mut w = Writer::new(Vec::new());
        w.dir("d", 0o755).unwrap();
        w.file("d/f", 0o755, b"hello").unwrap();
        w.symlink("d/l", "f").unwrap();
        let archive = w.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-i", "--quiet", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(dir.path().join("d/f")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read_link(dir.path().join("d/l")).unwrap(),
            std::path::Path::new("f")
        );
    }

    #[test]
    fn absolute_names_are_refused() {
        let mut w = Writer::new(Vec::new());
        assert!(w.file("/etc/x", 0o644, b"").is_err());
        assert!(w.file("", 0o644, b"").is_err());
    }
}
