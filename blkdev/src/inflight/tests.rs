//! Unit tests of the inflight region: layout, bookkeeping, recovery, and
//! the regions a hostile front-end may hand over.

use super::*;
use std::os::unix::io::FromRawFd;

#[test]
fn stride_matches_libvhost_user_and_dpdk() {
    for qs in 1..=32768u32 {
        let ours = queue_stride(qs as u16);
        let libvhost_user = (16 * u64::from(qs) + 2).div_ceil(64) * 64;
        let dpdk = (16 * u64::from(qs) + 16).div_ceil(64) * 64;
        assert_eq!(ours, libvhost_user, "qs {qs}");
        assert_eq!(ours, dpdk, "qs {qs}");
    }
    assert_eq!(queue_stride(128), 2112);
}

#[test]
fn created_region_is_sealed_and_zeroed() {
    let (region, file) = InflightRegion::create(2, 128).unwrap();
    assert_eq!(region.mmap_size(), 2 * 2112);
    assert_eq!(file.metadata().unwrap().len(), 2 * 2112);
    assert!(file.set_len(1).is_err(), "shrinking must be sealed");
    assert!(file.set_len(10 << 20).is_err(), "growing must be sealed");
    let queue = region.queue(1).unwrap();
    assert_eq!(queue.version(), 0);
    assert_eq!(queue.desc_num(), 128);
    assert!(region.queue(2).is_none());
}

#[test]
fn too_small_or_empty_regions_are_refused() {
    let (_, file) = InflightRegion::create(1, 128).unwrap();
    assert!(matches!(
        InflightRegion::map(&file, 2112, 0, 2, 128),
        Err(InflightError::TooSmall { needed: 4224, .. })
    ));
    assert!(matches!(
        InflightRegion::map(&file, 2112, 0, 0, 128),
        Err(InflightError::Empty { .. })
    ));
}

/// Raw bytes at the offsets the spec gives, as another back-end sees them.
fn raw(file: &File, at: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, at).unwrap();
    buf
}

#[test]
fn bookkeeping_follows_the_spec_layout() {
    let (region, file) = InflightRegion::create(2, 8).unwrap();
    let stride = queue_stride(8);
    let mut queue = region.queue(1).unwrap();
    assert!(queue.begin(8, 5).unwrap().fresh);
    queue.fetched(3);
    queue.fetched(6);
    let header = raw(&file, stride, 16);
    assert_eq!(u16::from_le_bytes([header[8], header[9]]), 1, "version");
    assert_eq!(u16::from_le_bytes([header[10], header[11]]), 8, "desc_num");
    assert_eq!(u16::from_le_bytes([header[14], header[15]]), 5, "used_idx");
    let desc6 = raw(&file, stride + 16 + 16 * 6, 16);
    assert_eq!(desc6[0], 1, "inflight");
    assert_eq!(u64::from_le_bytes(desc6[8..16].try_into().unwrap()), 1);
    queue.before_publish(3);
    queue.after_publish(3, 6);
    let header = raw(&file, stride, 16);
    assert_eq!(
        u16::from_le_bytes([header[12], header[13]]),
        3,
        "last batch"
    );
    assert_eq!(u16::from_le_bytes([header[14], header[15]]), 6, "used_idx");
    assert_eq!(raw(&file, stride + 16 + 16 * 3, 1)[0], 0);
    // Queue 0 is untouched.
    assert!(raw(&file, 0, stride as usize)
        .iter()
        .skip(16)
        .all(|&b| b == 0));
}

#[test]
fn recovery_resubmits_in_fetch_order() {
    let (region, file) = InflightRegion::create(1, 16).unwrap();
    let mut queue = region.queue(0).unwrap();
    queue.begin(16, 0).unwrap();
    for head in [9, 2, 14, 5] {
        queue.fetched(head);
    }
    queue.before_publish(2);
    queue.after_publish(2, 1);
    // A new back-end maps the same memfd.
    let again = InflightRegion::map(&file, region.mmap_size(), 0, 1, 16).unwrap();
    let mut queue = again.queue(0).unwrap();
    let recovery = queue.begin(16, 1).unwrap();
    assert_eq!(recovery.heads, vec![9, 14, 5]);
    assert!(!recovery.fresh && !recovery.fixed_last_batch);
    // New fetches continue after the highest counter.
    queue.fetched(7);
    let desc7 = raw(&file, 16 + 16 * 7, 16);
    assert_eq!(u64::from_le_bytes(desc7[8..16].try_into().unwrap()), 4);
}

#[test]
fn published_but_uncleared_last_batch_is_not_resubmitted() {
    let (region, _file) = InflightRegion::create(1, 16).unwrap();
    let mut queue = region.queue(0).unwrap();
    queue.begin(16, 0).unwrap();
    queue.fetched(4);
    queue.fetched(11);
    // Died after the used index went to 1 but before clearing head 11.
    queue.before_publish(11);
    let recovery = queue.begin(16, 1).unwrap();
    assert!(recovery.fixed_last_batch);
    assert_eq!(recovery.heads, vec![4]);
    assert_eq!(queue.used_idx(), 1);
}

#[test]
fn unpublished_last_batch_is_resubmitted() {
    let (region, _file) = InflightRegion::create(1, 16).unwrap();
    let mut queue = region.queue(0).unwrap();
    queue.begin(16, 0).unwrap();
    queue.fetched(4);
    // Died before the used index moved: head 4 was never answered.
    queue.before_publish(4);
    let recovery = queue.begin(16, 0).unwrap();
    assert!(!recovery.fixed_last_batch);
    assert_eq!(recovery.heads, vec![4]);
}

#[test]
fn corrupt_regions_are_refused() {
    let (region, file) = InflightRegion::create(1, 16).unwrap();
    let mut queue = region.queue(0).unwrap();
    assert!(matches!(
        queue.begin(32, 0),
        Err(InflightError::RingTooLarge { .. })
    ));
    queue.begin(8, 0).unwrap();
    queue.fetched(12); // beyond a ring of 8
    assert!(matches!(queue.begin(8, 0), Err(InflightError::Corrupt(_))));
    use std::os::unix::fs::FileExt;
    file.write_all_at(&0u8.to_le_bytes(), 16 + 16 * 12).unwrap();
    file.write_all_at(&9999u16.to_le_bytes(), 10).unwrap();
    assert!(matches!(queue.begin(16, 0), Err(InflightError::Corrupt(_))));
    file.write_all_at(&16u16.to_le_bytes(), 10).unwrap();
    queue.begin(16, 0).unwrap();
    file.write_all_at(&7u16.to_le_bytes(), 8).unwrap();
    assert!(matches!(queue.begin(16, 0), Err(InflightError::Corrupt(_))));
}

/// A memfd of `size` bytes, sealed like QEMU's and ours when `sealed`.
fn memfd(size: u64, sealed: bool) -> File {
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"inflight-test".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: a fresh fd owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    if sealed {
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS with an int argument on our memfd.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) }, 0);
    }
    file
}

/// SET_INFLIGHT_FD lies (issue 18). Before the fix each of these was
/// mapped and the agent died of SIGBUS inside SET_INFLIGHT_FD itself,
/// writing desc_num into a queue header the file does not have.
#[test]
fn regression_inflight_fds_too_small_or_offsets_past_the_end_are_refused() {
    let stride = queue_stride(128);
    // An empty memfd claimed to hold one queue.
    let empty = memfd(0, true);
    assert!(matches!(
        InflightRegion::map(&empty, stride, 0, 1, 128),
        Err(InflightError::Fd(shm::ShmError::PastEnd { .. }))
    ));
    // A memfd smaller than the size claimed.
    let small = memfd(4096, true);
    assert!(matches!(
        InflightRegion::map(&small, 2 * stride, 0, 2, 128),
        Err(InflightError::Fd(shm::ShmError::PastEnd { .. }))
    ));
    // An offset past the end.
    let region = memfd(stride, true);
    assert!(matches!(
        InflightRegion::map(&region, stride, 1 << 30, 1, 128),
        Err(InflightError::Fd(shm::ShmError::PastEnd { .. }))
    ));
    // The same fd with a truthful description maps.
    assert!(InflightRegion::map(&region, stride, 0, 1, 128).is_ok());
}

/// vhost-user spec, "Inflight I/O tracking": the region is shared memory
/// both sides keep; the agent requires the F_SEAL_SHRINK every producer
/// sets, so the front-end cannot truncate it under the mapping.
#[test]
fn regression_an_unsealed_inflight_memfd_is_refused() {
    let stride = queue_stride(16);
    let unsealed = memfd(stride, false);
    assert!(matches!(
        InflightRegion::map(&unsealed, stride, 0, 1, 16),
        Err(InflightError::Fd(shm::ShmError::NotSealed { .. }))
    ));
}

#[test]
fn inflight_shapes_must_fit_the_device() {
    let device = DeviceQueues {
        num_queues: 2,
        max_queue_size: 256,
    };
    assert!(check_shape(2, 256, device).is_ok());
    assert!(check_shape(1, 1, device).is_ok());
    for (num_queues, queue_size, rule) in [
        (0, 128, "no queues"),
        (3, 128, "more queues"),
        (1, 0, "zero-sized"),
        (1, 100, "power of two"),
        (1, 512, "larger than"),
    ] {
        match check_shape(num_queues, queue_size, device) {
            Err(InflightError::Shape { rule: broken, .. }) => {
                assert!(
                    broken.contains(rule),
                    "{num_queues} x {queue_size}: {broken}"
                )
            }
            other => panic!("{num_queues} x {queue_size}: {other:?}"),
        }
    }
}

/// A front-end that scribbles the region between back-ends (reconnect):
/// a counter at u64::MAX must not overflow (a panic in a debug build, a
/// wrapped, reordered counter in release).
#[test]
fn regression_a_scribbled_fetch_counter_at_its_maximum_is_refused() {
    use std::os::unix::fs::FileExt;
    let (region, file) = InflightRegion::create(1, 16).unwrap();
    let mut queue = region.queue(0).unwrap();
    queue.begin(16, 0).unwrap();
    queue.fetched(3);
    file.write_all_at(&u64::MAX.to_le_bytes(), 16 + 16 * 3 + 8)
        .unwrap();
    assert!(matches!(queue.begin(16, 0), Err(InflightError::Corrupt(_))));
}

/// Heads outside the region are ignored rather than panicking (the ring
/// is never larger than the region, but nothing here relies on that).
#[test]
fn heads_beyond_the_region_are_ignored() {
    let (region, _file) = InflightRegion::create(1, 8).unwrap();
    let mut queue = region.queue(0).unwrap();
    queue.begin(8, 0).unwrap();
    queue.fetched(8);
    queue.before_publish(200);
    queue.after_publish(65535, 1);
    assert!(!queue.is_inflight(8));
    assert_eq!(queue.inflight_count(), 0);
}
