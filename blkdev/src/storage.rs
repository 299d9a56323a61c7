//! The backing store of a disk: a raw image file or a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Opening or sizing the backing store failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// open(2) failed.
    #[error("cannot open {path}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The size could not be determined.
    #[error("cannot determine the size of {path}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image is not a regular file or block device.
    #[error("{path} is neither a regular file nor a block device")]
    NotADisk {
        /// The image path.
        path: PathBuf,
    },
}

/// An opened image.
#[derive(Debug)]
pub struct Storage {
    file: File,
    size_bytes: u64,
}

impl Storage {
    /// Open `path` for the guest; O_DIRECT when `direct`, read-only when
    /// `readonly`.
    pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Storage, StorageError> {
        let mut options = OpenOptions::new();
        options.read(true).write(!readonly);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|source| StorageError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let metadata = file.metadata().map_err(|source| StorageError::Size {
            path: path.to_path_buf(),
            source,
        })?;
        let size_bytes = if metadata.file_type().is_block_device() {
            block_device_size(&file).map_err(|source| StorageError::Size {
                path: path.to_path_buf(),
                source,
            })?
        } else if metadata.is_file() {
            metadata.len()
        } else {
            return Err(StorageError::NotADisk {
                path: path.to_path_buf(),
            });
        };
        Ok(Storage { file, size_bytes })
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The open file, for the device's engines to share.
    pub fn into_file(self) -> File {
        self.file
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at
    // `size`, a live u64 on our stack; the fd is open for the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}
