//! What an fd from the front-end must be before it is mapped.
//!
//! A mapping that reaches past the end of its file maps fine and raises
//! SIGBUS on the first access past the end, which kills the whole agent
//! (every device it serves) from whatever thread touched it. So the range a
//! message claims is checked against the file as `fstat` sees it before
//! anything is mapped, and fds that are not memory at all are refused.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Which shared memory an fd is meant to be: named in errors, and it
/// decides whether the fd must be sealed (see [`Purpose::requires_seal`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A guest RAM region (SET_MEM_TABLE, ADD_MEM_REG).
    GuestRam,
    /// The dirty log (SET_LOG_BASE).
    DirtyLog,
    /// The inflight region (SET_INFLIGHT_FD).
    Inflight,
}

impl Purpose {
    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Purpose::GuestRam => "guest RAM region",
            Purpose::DirtyLog => "dirty log",
            Purpose::Inflight => "inflight region",
        }
    }

    /// Whether an fd of this purpose must carry F_SEAL_SHRINK.
    ///
    /// The dirty log and the inflight region must: every front-end that
    /// sends them makes them with `memfd_create` and seals them against
    /// shrinking and growing (QEMU's `qemu_memfd_alloc("vhost-log")` and
    /// its migrated inflight copy, libvhost-user's and DPDK's inflight
    /// memfds, and the agent's own GET_INFLIGHT_FD region), so a seal
    /// costs no real front-end anything and makes a later SIGBUS
    /// impossible. Guest RAM may not be: file-backed RAM (hugetlbfs,
    /// `memory-backend-file`) cannot be sealed and DPDK's memfds are not;
    /// its mappings are contained instead ([`crate::fault`]).
    pub fn requires_seal(self) -> bool {
        !matches!(self, Purpose::GuestRam)
    }
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An fd, or the range a message claims in it, is refused.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// fstat, fstatfs or fcntl(F_GET_SEALS) failed.
    #[error("cannot inspect the {purpose} fd")]
    Inspect {
        /// What the fd was for.
        purpose: Purpose,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The fd is not a file that can back shared memory.
    #[error("the {purpose} fd is a {kind}, not shared memory")]
    NotMemory {
        /// What the fd was for.
        purpose: Purpose,
        /// What it is instead.
        kind: &'static str,
    },
    /// The message describes an empty range.
    #[error("the {purpose} is described with 0 bytes")]
    Empty {
        /// What the fd was for.
        purpose: Purpose,
    },
    /// Offset plus size overflow, or do not fit this process's address
    /// space or `off_t`.
    #[error(
        "the {purpose} range of {size} bytes at offset {offset} does not fit an address space"
    )]
    TooLarge {
        /// What the fd was for.
        purpose: Purpose,
        /// Offset claimed.
        offset: u64,
        /// Size claimed.
        size: u64,
    },
    /// The offset is not a multiple of the file's page size (mmap needs it).
    #[error("the {purpose} offset {offset} is not a multiple of the page size {page_size}")]
    Unaligned {
        /// What the fd was for.
        purpose: Purpose,
        /// Offset claimed.
        offset: u64,
        /// The file's page size.
        page_size: u64,
    },
    /// The range ends past the end of the file: touching it would raise
    /// SIGBUS.
    #[error("the {purpose} range of {size} bytes at offset {offset} ends past the end of its {file_size}-byte file")]
    PastEnd {
        /// What the fd was for.
        purpose: Purpose,
        /// Offset claimed.
        offset: u64,
        /// Size claimed.
        size: u64,
        /// The file's size.
        file_size: u64,
    },
    /// The fd must be sealed against shrinking and is not.
    #[error("the {purpose} fd is not sealed against shrinking (F_SEAL_SHRINK): the front-end could truncate it under the mapping")]
    NotSealed {
        /// What the fd was for.
        purpose: Purpose,
    },
    /// mmap itself failed.
    #[error("cannot map the {purpose} ({size} bytes at offset {offset})")]
    Map {
        /// What the fd was for.
        purpose: Purpose,
        /// Offset claimed.
        offset: u64,
        /// Size claimed.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Every slot of the fault registry is in use.
    #[error("too many guest memory mappings to contain faults in (limit {limit})")]
    TooManyMappings {
        /// Slots in the registry.
        limit: usize,
    },
}

/// What kind of file backs an fd that passed [`check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingKind {
    /// A regular file or memfd (tmpfs, shmem, an ordinary file system).
    Regular,
    /// A file on hugetlbfs: its pages are huge, and a writable shared
    /// mapping extends the file itself, so its size is not checked.
    Hugetlbfs,
}

/// What [`check`] found out about an fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backing {
    /// The kind of file.
    pub kind: BackingKind,
    /// Its page size in bytes (the huge page size on hugetlbfs).
    pub page_size: u64,
    /// The file cannot shrink: F_SEAL_SHRINK is set.
    pub sealed: bool,
    /// `st_size` when checked.
    pub file_size: u64,
}

/// The range `offset..offset + size` as usize/off_t values mmap takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// Offset into the file.
    pub offset: libc::off_t,
    /// Length in bytes, at most `isize::MAX`.
    pub len: usize,
}

/// The system's base page size.
pub fn base_page_size() -> u64 {
    // SAFETY: sysconf has no memory effects; a failure (-1) is handled.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// Validate `offset` and `size` as numbers mmap can take.
pub fn range(purpose: Purpose, offset: u64, size: u64) -> Result<Range, ShmError> {
    if size == 0 {
        return Err(ShmError::Empty { purpose });
    }
    let too_large = || ShmError::TooLarge {
        purpose,
        offset,
        size,
    };
    let end = offset.checked_add(size).ok_or_else(too_large)?;
    let len = usize::try_from(size)
        .ok()
        .filter(|&len| isize::try_from(len).is_ok())
        .ok_or_else(too_large)?;
    // The end must be representable too: the kernel computes it.
    libc::off_t::try_from(end).map_err(|_| too_large())?;
    let offset = libc::off_t::try_from(offset).map_err(|_| too_large())?;
    Ok(Range { offset, len })
}

/// Check that `file` can back `size` bytes of `purpose` memory from
/// `offset` without ever raising SIGBUS for a range the message claimed:
/// it is a regular file (or a hugetlbfs file), the range lies within it,
/// the offset is page-aligned, and, if `purpose` requires it, the file is
/// sealed against shrinking.
pub fn check(file: &File, purpose: Purpose, offset: u64, size: u64) -> Result<Backing, ShmError> {
    range(purpose, offset, size)?;
    let inspect = |source| ShmError::Inspect { purpose, source };
    let fd = file.as_raw_fd();
    // SAFETY: `stat` is plain old data; all-zero is a valid value.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the `stat` on our stack; fd is open for the
    // duration of the call (we borrow `file`).
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return Err(inspect(io::Error::last_os_error()));
    }
    let kind = match stat.st_mode & libc::S_IFMT {
        libc::S_IFREG => None,
        libc::S_IFCHR => Some("character device"),
        libc::S_IFBLK => Some("block device"),
        libc::S_IFDIR => Some("directory"),
        libc::S_IFIFO => Some("pipe"),
        libc::S_IFSOCK => Some("socket"),
        _ => Some("special file"),
    };
    if let Some(kind) = kind {
        return Err(ShmError::NotMemory { purpose, kind });
    }
    // SAFETY: `statfs` is plain old data; all-zero is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into the `statfs` on our stack; fd is open.
    if unsafe { libc::fstatfs(fd, &mut fs) } != 0 {
        return Err(inspect(io::Error::last_os_error()));
    }
    let hugetlbfs = fs.f_type == libc::HUGETLBFS_MAGIC;
    let page_size = if hugetlbfs {
        u64::try_from(fs.f_bsize)
            .ok()
            .filter(|&size| size > 0)
            .unwrap_or_else(base_page_size)
    } else {
        base_page_size()
    };
    if !offset.is_multiple_of(page_size) {
        return Err(ShmError::Unaligned {
            purpose,
            offset,
            page_size,
        });
    }
    let file_size = u64::try_from(stat.st_size).unwrap_or(0);
    // `range` checked that offset + size does not overflow.
    let end = offset.saturating_add(size);
    if !hugetlbfs && end > file_size {
        return Err(ShmError::PastEnd {
            purpose,
            offset,
            size,
            file_size,
        });
    }
    let sealed = seals(file).map_err(inspect)? & libc::F_SEAL_SHRINK != 0;
    if purpose.requires_seal() && !sealed {
        return Err(ShmError::NotSealed { purpose });
    }
    Ok(Backing {
        kind: if hugetlbfs {
            BackingKind::Hugetlbfs
        } else {
            BackingKind::Regular
        },
        page_size,
        sealed,
        file_size,
    })
}

/// The file's seals (F_GET_SEALS); 0 for files that cannot be sealed.
pub fn seals(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory of ours.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 {
        return Ok(seals);
    }
    let error = io::Error::last_os_error();
    // EINVAL: not a file system that supports sealing (a file that can
    // never be sealed).
    if error.raw_os_error() == Some(libc::EINVAL) {
        Ok(0)
    } else {
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::memfd;

    #[test]
    fn a_range_inside_the_file_passes_and_one_past_its_end_is_refused() {
        let file = memfd(2 * 4096, true);
        let backing = check(&file, Purpose::Inflight, 4096, 4096).unwrap();
        assert_eq!(backing.kind, BackingKind::Regular);
        assert!(backing.sealed);
        assert_eq!(backing.file_size, 8192);
        for (offset, size) in [(0, 8193), (4096, 8192), (1 << 30, 512)] {
            assert!(
                matches!(
                    check(&file, Purpose::Inflight, offset, size),
                    Err(ShmError::PastEnd {
                        file_size: 8192,
                        ..
                    })
                ),
                "{size} bytes at {offset}"
            );
        }
    }

    #[test]
    fn sizes_that_cannot_be_mapped_are_refused_before_the_fd_is_looked_at() {
        let file = memfd(4096, true);
        assert!(matches!(
            check(&file, Purpose::DirtyLog, 0, 0),
            Err(ShmError::Empty { .. })
        ));
        for (offset, size) in [(0, 1 << 63), (u64::MAX, 1), (1 << 62, 1 << 62)] {
            assert!(
                matches!(
                    check(&file, Purpose::DirtyLog, offset, size),
                    Err(ShmError::TooLarge { .. })
                ),
                "{size} bytes at {offset}"
            );
        }
        assert!(matches!(
            check(&file, Purpose::DirtyLog, 512, 512),
            Err(ShmError::Unaligned { .. })
        ));
    }

    #[test]
    fn fds_that_are_not_memory_are_refused() {
        let zero = File::open("/dev/zero").unwrap();
        assert!(matches!(
            check(&zero, Purpose::GuestRam, 0, 4096),
            Err(ShmError::NotMemory {
                kind: "character device",
                ..
            })
        ));
        let dir = File::open("/").unwrap();
        assert!(matches!(
            check(&dir, Purpose::GuestRam, 0, 4096),
            Err(ShmError::NotMemory {
                kind: "directory",
                ..
            })
        ));
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the array on our stack.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds are fresh and owned by the Files made here.
        let (read, _write) = unsafe {
            use std::os::unix::io::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        assert!(matches!(
            check(&read, Purpose::GuestRam, 0, 4096),
            Err(ShmError::NotMemory { kind: "pipe", .. })
        ));
    }

    #[test]
    fn log_and_inflight_fds_must_be_sealed_guest_ram_need_not() {
        let unsealed = memfd(4096, false);
        for purpose in [Purpose::DirtyLog, Purpose::Inflight] {
            assert!(matches!(
                check(&unsealed, purpose, 0, 4096),
                Err(ShmError::NotSealed { .. })
            ));
        }
        let backing = check(&unsealed, Purpose::GuestRam, 0, 4096).unwrap();
        assert!(!backing.sealed);
        // A plain file can never be sealed: refused for the log, fine for RAM.
        let file = tempfile_in_tmp(4096);
        assert!(matches!(
            check(&file, Purpose::DirtyLog, 0, 4096),
            Err(ShmError::NotSealed { .. })
        ));
        assert!(check(&file, Purpose::GuestRam, 0, 4096).is_ok());
    }

    fn tempfile_in_tmp(size: u64) -> File {
        let path = std::env::temp_dir().join(format!("shm-check-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        file.set_len(size).unwrap();
        file
    }
}
