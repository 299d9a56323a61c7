//! What kind of file a front-end handed over: kick and call must be
//! eventfds. A memfd or `/dev/null` as a kick would be read and polled as if
//! it were one (issue 18, finding 5).

use std::fs::File;
use std::os::unix::io::AsRawFd;

/// An fd that is not what the request needs.
#[derive(Debug, thiserror::Error)]
#[error("{which} fd is {found}, not an eventfd")]
pub struct NotAnEventfd {
    /// Which fd (`kick`, `call`).
    pub which: &'static str,
    /// What it is instead.
    pub found: String,
}

/// Check that `file` is an eventfd. Linux names an eventfd's anonymous
/// inode `anon_inode:[eventfd]` in /proc; without /proc, an fd whose mode
/// has no file type bits (an anonymous inode) is taken.
pub fn check_eventfd(file: &File, which: &'static str) -> Result<(), NotAnEventfd> {
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    let found = match std::fs::read_link(&link) {
        Ok(target) => {
            let target = target.to_string_lossy().into_owned();
            if target == "anon_inode:[eventfd]" {
                return Ok(());
            }
            target
        }
        Err(_) => {
            use std::os::unix::fs::MetadataExt;
            match file.metadata() {
                Ok(metadata) if metadata.mode() & libc::S_IFMT == 0 => return Ok(()),
                Ok(metadata) => format!("a file of mode {:o}", metadata.mode()),
                Err(e) => format!("a file that cannot be examined ({e})"),
            }
        }
    };
    Err(NotAnEventfd { which, found })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::FromRawFd;

    fn eventfd() -> File {
        // SAFETY: eventfd(2) takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd");
        // SAFETY: `fd` was just created and is owned by nothing else.
        unsafe { File::from_raw_fd(fd) }
    }

    #[test]
    fn only_an_eventfd_is_a_kick() {
        check_eventfd(&eventfd(), "kick").unwrap();
        let memfd = tempfile::tempfile().unwrap();
        let error = check_eventfd(&memfd, "kick").unwrap_err();
        assert_eq!(error.which, "kick");
        let null = File::open("/dev/null").unwrap();
        assert!(check_eventfd(&null, "call")
            .unwrap_err()
            .found
            .contains("/dev/null"));
    }
}
