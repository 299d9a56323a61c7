//! The vhost uAPI calls (include/uapi/linux/vhost.h) that the rust-vmm
//! `vhost` crate's kernel backend (0.18, features `vhost-net` and
//! `vhost-vdpa`) lacks or gets wrong, written with the crate's own
//! bindings (structures and ioctl numbers), for both kernel datapaths.
//! Everything else goes through the crate (`vhost::vhost_kern::net::Net`
//! and `vhost::vhost_kern::vdpa::VhostKernVdpa`: open, VHOST_SET_OWNER,
//! features, ring size and base, VHOST_GET_VRING_BASE, a non-empty memory
//! table, the log base, VHOST_NET_SET_BACKEND, VHOST_VDPA_SET_STATUS,
//! GET_CONFIG, SET_VRING_ENABLE, SUSPEND, IOTLB messages).
//!
//! * An empty memory table: the crate refuses one, the kernel takes it,
//!   and it is how the kernel forgets a table whose mappings go away.
//! * VHOST_SET_VRING_KICK / VHOST_SET_VRING_CALL with the front-end's own
//!   eventfd, or -1 to unbind: the crate takes only its `EventFd` type and
//!   cannot unbind.
//! * VHOST_SET_VRING_ADDR with addresses translated and checked by the
//!   agent ([`super::table`]): the crate translates guest addresses
//!   through a `GuestAddressSpace` and checks only that the end of each
//!   ring part lies in some region, not that the part lies in one.
//! * VHOST_VDPA_RESUME (Linux 6.3, VHOST_BACKEND_F_RESUME): the crate has
//!   `suspend` but no `resume`.
//! * VHOST_VDPA_SET_GROUP_ASID: the crate's `set_group_asid` sends
//!   VHOST_VDPA_GET_VRING_GROUP (0x7b) instead of SET_GROUP_ASID (0x7c).
//!   The agent keeps every group in address space 0 (one IOTLB), so it
//!   calls this only where a device has more than one group.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use vhost::vhost_kern::vhost_binding::{
    vhost_vring_addr, vhost_vring_file, VhostMemory, VHOST_SET_MEM_TABLE, VHOST_SET_VRING_ADDR,
    VHOST_SET_VRING_CALL, VHOST_SET_VRING_KICK, VHOST_VRING_F_LOG,
};
use vmm_sys_util::ioctl::{ioctl_with_ptr, ioctl_with_ref};

use super::table::RingHost;

/// Which eventfd of a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingFd {
    /// The front-end's kick (the kernel polls it).
    Kick,
    /// The front-end's call (the kernel signals it).
    Call,
}

fn check(rc: i32) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// VHOST_SET_MEM_TABLE with no regions.
pub fn set_empty_mem_table(vhost: &impl AsRawFd) -> io::Result<()> {
    let table = VhostMemory::new(0);
    // SAFETY: VHOST_SET_MEM_TABLE reads a `struct vhost_memory` header and
    // `nregions` (0) regions after it; `table` holds a whole header and
    // lives until the call returns. The kernel copies what it reads.
    check(unsafe { ioctl_with_ptr(vhost, VHOST_SET_MEM_TABLE(), table.as_ptr()) })
}

/// VHOST_SET_VRING_KICK or VHOST_SET_VRING_CALL of virtqueue `index` with
/// `file`, or unbound (-1).
pub fn set_ring_fd(
    vhost: &impl AsRawFd,
    which: RingFd,
    index: u32,
    file: Option<&File>,
) -> io::Result<()> {
    let arg = vhost_vring_file {
        index,
        fd: file.map_or(-1, AsRawFd::as_raw_fd),
    };
    let request = match which {
        RingFd::Kick => VHOST_SET_VRING_KICK(),
        RingFd::Call => VHOST_SET_VRING_CALL(),
    };
    // SAFETY: both ioctls read one `struct vhost_vring_file`, and `arg` is
    // one, live for the call; the fd in it is open (borrowed from `file`)
    // or -1, and the kernel takes its own reference to the eventfd.
    check(unsafe { ioctl_with_ref(vhost, request, &arg) })
}

/// VHOST_SET_VRING_ADDR of virtqueue `index` at `host`, logging the used
/// ring's writes at its guest address when `log_used`.
pub fn set_ring_addr(
    vhost: &impl AsRawFd,
    index: u32,
    host: &RingHost,
    log_used: bool,
) -> io::Result<()> {
    let arg = vhost_vring_addr {
        index,
        flags: if log_used { 1 << VHOST_VRING_F_LOG } else { 0 },
        desc_user_addr: host.desc,
        used_user_addr: host.used,
        avail_user_addr: host.avail,
        log_guest_addr: if log_used { host.used_gpa } else { 0 },
    };
    // SAFETY: VHOST_SET_VRING_ADDR reads one `struct vhost_vring_addr`, and
    // `arg` is one, live for the call. The addresses in it were checked to
    // lie in mappings the kernel's memory table holds (`RingHost`).
    check(unsafe { ioctl_with_ref(vhost, VHOST_SET_VRING_ADDR(), &arg) })
}

/// The vhost ioctl type (`VHOST_VIRTIO` in include/uapi/linux/vhost.h).
const VHOST_VIRTIO: u32 = 0xAF;

vmm_sys_util::ioctl_io_nr!(VHOST_VDPA_RESUME, VHOST_VIRTIO, 0x7E);
vmm_sys_util::ioctl_iow_nr!(
    VHOST_VDPA_SET_GROUP_ASID,
    VHOST_VIRTIO,
    0x7C,
    vhost::vhost_kern::vhost_binding::vhost_vring_state
);

/// Backend feature bits (include/uapi/linux/vhost_types.h) past the
/// crate's bindings, which stop at VHOST_BACKEND_F_SUSPEND (bit 4).
pub mod backend {
    /// IOTLB messages in the v2 format.
    pub const IOTLB_MSG_V2: u64 = 1 << 1;
    /// IOTLB updates between BATCH_BEGIN and BATCH_END are applied at once.
    pub const IOTLB_BATCH: u64 = 1 << 2;
    /// VHOST_VDPA_SUSPEND.
    pub const SUSPEND: u64 = 1 << 4;
    /// VHOST_VDPA_RESUME.
    pub const RESUME: u64 = 1 << 5;
    /// Virtqueues may be enabled after DRIVER_OK.
    pub const ENABLE_AFTER_DRIVER_OK: u64 = 1 << 6;
    /// The IOTLB survives a device reset.
    pub const IOTLB_PERSIST: u64 = 1 << 8;
}

/// VHOST_VDPA_RESUME: a suspended device processes its virtqueues again.
pub fn vdpa_resume(vhost: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: VHOST_VDPA_RESUME takes no argument; the fd is open (borrowed).
    check(unsafe { vmm_sys_util::ioctl::ioctl(vhost, VHOST_VDPA_RESUME()) })
}

/// VHOST_VDPA_SET_GROUP_ASID: virtqueue group `group` uses address space
/// `asid`.
pub fn vdpa_set_group_asid(vhost: &impl AsRawFd, group: u32, asid: u32) -> io::Result<()> {
    let arg = vhost::vhost_kern::vhost_binding::vhost_vring_state {
        index: group,
        num: asid,
    };
    // SAFETY: VHOST_VDPA_SET_GROUP_ASID reads one `struct vhost_vring_state`,
    // and `arg` is one, live for the call.
    check(unsafe { ioctl_with_ref(vhost, VHOST_VDPA_SET_GROUP_ASID(), &arg) })
}
