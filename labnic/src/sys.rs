//! The system calls the safe Rust library does not wrap: ioctls on the
//! VDUSE and vhost character devices, and a signalfd. This is the only
//! module of the crate with `unsafe`: guest memory is mapped and accessed
//! through `vm-memory`'s safe API.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::uapi::ioctl_size;

/// `ioctl(fd, request, buf)` for a request whose argument is `buf`: the
/// kernel reads and/or writes the argument's size (encoded in `request`)
/// at `buf`, and for a few requests (VDUSE_CREATE_DEV, VHOST_VDPA_GET_CONFIG)
/// also a length the argument itself names; `extra` is that length, and
/// `buf` must hold both.
pub fn ioctl_buf(fd: &impl AsRawFd, request: u64, buf: &mut [u8], extra: usize) -> io::Result<i32> {
    let needed = ioctl_size(request).checked_add(extra).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "ioctl argument size overflows")
    })?;
    if buf.len() < needed {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "ioctl {request:#x} needs {needed} bytes, the buffer has {}",
                buf.len()
            ),
        ));
    }
    // SAFETY: `buf` is a live, writable buffer of at least `needed` bytes:
    // the argument size the request encodes plus the trailing length the
    // caller says the kernel will touch, checked just above. The kernel
    // accesses nothing beyond those bytes, and the borrow keeps `buf` alive
    // and unaliased for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, buf.as_mut_ptr()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `ioctl(fd, request)` for a request without an argument (`_IO`).
pub fn ioctl_none(fd: &impl AsRawFd, request: u64) -> io::Result<i32> {
    if ioctl_size(request) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("ioctl {request:#x} takes an argument"),
        ));
    }
    // SAFETY: the request encodes no argument (checked above), so the
    // kernel reads no memory of ours; the third argument is ignored.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, 0usize) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Take ownership of a file descriptor an ioctl returned (VDUSE_IOTLB_GET_FD
/// installs a new descriptor in our table and returns its number).
pub fn adopt_fd(fd: i32) -> io::Result<File> {
    if fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "negative file descriptor",
        ));
    }
    // SAFETY: the kernel just installed `fd` in our descriptor table for
    // us (receive_fd) and nothing else in this process knows its number,
    // so this `File` is its only owner and closes it exactly once.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A signalfd for `signals`, which are blocked for the calling thread (call
/// it before spawning threads, so every thread inherits the mask).
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Block `signals` and open a non-blocking signalfd for them.
    pub fn new(signals: &[i32]) -> io::Result<SignalFd> {
        // SAFETY: an all-zero sigset_t is a valid value to initialise;
        // sigemptyset below sets it properly.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        for &signal in signals {
            // SAFETY: `set` is a valid sigset_t; an invalid signal number
            // makes sigaddset fail with EINVAL, which is checked.
            if unsafe { libc::sigaddset(&mut set, signal) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: `set` is initialised; the old mask is not asked for.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: -1 asks for a new descriptor; `set` is initialised.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalFd { fd })
    }

    /// The next pending signal, or None if none is pending.
    pub fn read(&self) -> io::Result<Option<i32>> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: `info` is a writable buffer of exactly one
        // signalfd_siginfo, the unit signalfd reads deliver.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(err);
        }
        if n as usize != info.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short signalfd read",
            ));
        }
        // ssi_signo is the first field (u32).
        let mut signo = [0u8; 4];
        signo.copy_from_slice(&info[..4]);
        Ok(Some(u32::from_ne_bytes(signo) as i32))
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
