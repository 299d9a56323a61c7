//! Guest RAM the test front-end shares with the back-end (a memfd mapped
//! at guest physical address 0), and the memfds a front-end hands over.

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};

/// A memfd of `size` bytes named `name`; `sealing` allows F_ADD_SEALS.
pub(crate) fn memfd(name: &str, size: u64, sealing: bool) -> File {
    let name = std::ffi::CString::new(name).expect("no NUL in name");
    let flags = libc::MFD_CLOEXEC | if sealing { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create with a valid C string; the returned fd (checked
    // below) is owned by the File we wrap it in.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    assert!(
        fd >= 0,
        "memfd_create failed: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("size the memfd");
    file
}

/// A memfd of `size` bytes sealed against shrinking and growing, the way
/// QEMU's `qemu_memfd_alloc(F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL)`
/// makes its dirty log and its migrated inflight region: the agent refuses
/// a log or an inflight region that is not sealed.
pub fn sealed_memfd(name: &str, size: u64) -> File {
    let file = memfd(name, size, true);
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) on a memfd we own, with an integer
    // argument; no memory is passed.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert_eq!(rc, 0, "seal: {}", std::io::Error::last_os_error());
    file
}

/// Guest RAM shared with the back-end through a memfd, mapped at guest
/// physical address 0.
pub struct GuestRam {
    /// The mapping, for reading and writing guest memory.
    pub mem: GuestMemoryMmap,
    file: File,
    size: u64,
}

impl GuestRam {
    /// Allocate `size` bytes of shared guest RAM.
    pub fn new(size: u64) -> GuestRam {
        let file = memfd("vhost-agent-test-ram", size, false);
        let region = MmapRegion::<()>::from_file(
            FileOffset::new(file.try_clone().expect("dup memfd"), 0),
            size as usize,
        )
        .expect("map guest RAM");
        let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("guest region");
        let mem = GuestMemoryMmap::from_regions(vec![region]).expect("guest memory");
        GuestRam { mem, file, size }
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd behind it (unsealed, like file-backed RAM): a hostile
    /// front-end can truncate it under the back-end's mapping.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Our virtual address of guest physical address `gpa` (what the
    /// front-end tells the back-end in SET_VRING_ADDR).
    pub fn user_addr(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .expect("address in guest RAM") as u64
    }

    /// A copy of all of guest RAM, to prove later that nobody wrote to it.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.size as usize];
        self.mem
            .read_slice(&mut bytes, GuestAddress(0))
            .expect("read guest RAM");
        bytes
    }

    /// The memory table entry of this RAM (SET_MEM_TABLE).
    pub fn region_info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.user_addr(0),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}
