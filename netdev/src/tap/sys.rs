//! The system-call plumbing under [`super::TapDevice`]: name checks,
//! `ifreq`s, the clone device and the interface control socket.

use super::*;

/// Check `name` against the kernel's rules for interface names
/// (`dev_valid_name`, and `dev_alloc_name` for a `%d` template).
pub(super) fn validate_name(name: &str) -> Result<(), TapError> {
    let invalid = |reason| {
        Err(TapError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("empty (use a template such as \"tap%d\" for a kernel-chosen name)");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("longer than 15 bytes (IFNAMSIZ - 1)");
    }
    if name == "." || name == ".." {
        return invalid("\".\" and \"..\" are reserved");
    }
    // The kernel's isspace() also takes 0xa0 (Latin-1 no-break space),
    // which occurs inside UTF-8 sequences.
    if name.bytes().any(|b| {
        matches!(
            b,
            b'/' | b':' | 0 | b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0xa0
        )
    }) {
        return invalid("contains '/', ':', NUL or white space");
    }
    if let Some(at) = name.find('%') {
        if !name[at..].starts_with("%d") || name[at + 2..].contains('%') {
            return invalid("'%' may only appear once, as the template \"%d\"");
        }
    }
    Ok(())
}

pub(super) fn check_vnet_hdr_len(ifname: &str, len: usize) -> Result<(), TapError> {
    if len == VNET_HDR_LEN || len == VNET_HDR_MRG_RXBUF_LEN {
        Ok(())
    } else {
        Err(TapError::InvalidVnetHdrLen {
            ifname: ifname.to_owned(),
            len,
        })
    }
}

/// A zeroed `struct ifreq` naming `name`. Longer names are cut to fit (the
/// names used here are validated or come from the kernel, so none is).
pub(super) fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data (a name array and a union of
    // integers, arrays, sockaddrs and a pointer) for which all zeroes is a
    // valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name[..MAX_NAME_LEN].iter_mut().zip(name.bytes()) {
        *dst = src as c_char;
    }
    ifr
}

/// The NUL-terminated name the kernel wrote into `ifr`.
pub(super) fn name_from_ifreq(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub(super) fn open_tun() -> io::Result<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: `path` is a NUL-terminated string; open has no other
    // preconditions.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket has no preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ioctl(fd, request, arg)` for requests that take a pointer.
///
/// # Safety
///
/// `request` must read and write no more than one `T` through the pointer.
pub(super) unsafe fn ioctl_ptr<T>(
    fd: &impl AsRawFd,
    request: libc::Ioctl,
    arg: &mut T,
) -> io::Result<()> {
    // SAFETY: the caller vouches that `request` stays within `*arg`, which
    // is live and exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ioctl(fd, request, value)` for requests that take an integer by value.
///
/// # Safety
///
/// `request` must not treat `value` as a pointer.
pub(super) unsafe fn ioctl_val(
    fd: &impl AsRawFd,
    request: libc::Ioctl,
    value: c_ulong,
) -> io::Result<()> {
    // SAFETY: the caller vouches that `request` touches no memory of ours.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, value) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Run a read or write system call again while it is interrupted.
pub(super) fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<isize> {
    loop {
        let rc = call();
        if rc >= 0 {
            return Ok(rc);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
