//! Shared memory from a vhost-user front-end, treated as hostile: the
//! guest RAM regions of SET_MEM_TABLE / ADD_MEM_REG, the dirty log of
//! SET_LOG_BASE and the inflight region of SET_INFLIGHT_FD.
//!
//! * [`mod@check`]: what an fd must be, and the range a message claims in it,
//!   before it is mapped (a typed [`ShmError`] otherwise).
//! * [`fault`]: guest RAM mappings whose SIGBUS (the front-end shrank the
//!   file after it was mapped) fails the device instead of the process.
//!
//! The reasoning per kind of fd is in `docs/hostile-peers.md`.

pub mod check;
pub mod fault;

pub use check::{check, Backing, BackingKind, Purpose, ShmError};
pub use fault::GuestMapping;

#[cfg(test)]
pub(crate) mod testutil {
    use std::fs::File;
    use std::os::unix::io::{AsRawFd, FromRawFd};

    /// A memfd of `size` bytes, sealed against shrinking and growing if
    /// `sealed`.
    pub fn memfd(size: u64, sealed: bool) -> File {
        // SAFETY: a NUL-terminated name; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"shm-test".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        if sealed {
            let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            // SAFETY: F_ADD_SEALS with an int argument on our memfd.
            let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
            assert_eq!(rc, 0);
        }
        file
    }
}
