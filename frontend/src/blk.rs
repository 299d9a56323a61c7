//! virtio-blk on the test front-end: requests in 64 KiB buffer slots,
//! put on a ring the way a Linux guest does (one INDIRECT descriptor each),
//! their status and data read back.

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use crate::{Desc, TestFrontend, BUFFER_BASE, SLOTS};

/// virtio-blk request types used by tests.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// virtio-blk write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Status byte values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// I/O error status.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// What the front-end writes into a status byte before submitting, so a
/// status the device never wrote is visible.
pub const STATUS_UNSET: u8 = 0xff;

/// Where in a slot [`TestFrontend::submit`] puts the indirect table.
const INDIRECT_TABLE_OFFSET: u64 = 0x100;

/// One virtio-blk read or write for [`TestFrontend::submit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkRequest {
    /// VIRTIO_BLK_T_IN or VIRTIO_BLK_T_OUT.
    pub request_type: u32,
    /// First sector (512 bytes).
    pub sector: u64,
    /// Data length in bytes (at most 52 KiB, the slot's data area).
    pub len: u32,
    /// Buffer slot (see [`TestFrontend::buffers`]); distinct per request
    /// in flight.
    pub slot: u64,
}

impl BlkRequest {
    /// A read of `len` bytes at `sector` into slot `slot`.
    pub fn read(slot: u64, sector: u64, len: u32) -> BlkRequest {
        BlkRequest {
            request_type: VIRTIO_BLK_T_IN,
            sector,
            len,
            slot,
        }
    }

    /// A write of slot `slot`'s first `len` data bytes to `sector`.
    pub fn write(slot: u64, sector: u64, len: u32) -> BlkRequest {
        BlkRequest {
            request_type: VIRTIO_BLK_T_OUT,
            sector,
            len,
            slot,
        }
    }

    /// Whether the device reads guest memory for it (a write).
    pub fn is_write(&self) -> bool {
        self.request_type == VIRTIO_BLK_T_OUT
    }
}

/// A request on a ring and the head the device will report it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// Queue index.
    pub queue: usize,
    /// Head descriptor index (the used-ring id).
    pub head: u16,
    /// The request.
    pub request: BlkRequest,
}

impl TestFrontend {
    /// Buffer area `slot` (64 KiB each) above the rings: (header, data, status).
    pub fn buffers(slot: u64) -> (u64, u64, u64) {
        assert!(slot < SLOTS, "slot {slot} beyond guest RAM");
        let base = BUFFER_BASE + slot * 0x1_0000;
        (base, base + 0x1000, base + 0xf000)
    }

    /// Write `bytes` into slot `slot`'s data buffer.
    pub fn fill(&self, slot: u64, bytes: &[u8]) {
        let (_, data, _) = Self::buffers(slot);
        self.ram.mem.write_slice(bytes, GuestAddress(data)).unwrap();
    }

    /// The first `len` bytes of slot `slot`'s data buffer.
    pub fn data(&self, slot: u64, len: usize) -> Vec<u8> {
        let (_, data, _) = Self::buffers(slot);
        let mut bytes = vec![0u8; len];
        self.ram
            .mem
            .read_slice(&mut bytes, GuestAddress(data))
            .unwrap();
        bytes
    }

    /// Slot `slot`'s status byte.
    pub fn status(&self, slot: u64) -> u8 {
        let (_, _, status) = Self::buffers(slot);
        self.ram.mem.read_obj(GuestAddress(status)).unwrap()
    }

    /// Put `requests` on ring `queue` the way a Linux guest does (one
    /// INDIRECT descriptor each, table in the request's slot), make them
    /// visible with a single avail->idx update and kick once. Status bytes
    /// are set to [`STATUS_UNSET`]; write data must already be in the
    /// slots. Heads are taken round-robin: at most `queue_size` in flight.
    pub fn submit(&mut self, queue: usize, requests: &[BlkRequest]) -> Vec<Submitted> {
        let mut submitted = Vec::with_capacity(requests.len());
        for request in requests {
            let (header, data, status) = Self::buffers(request.slot);
            assert!(
                u64::from(request.len) <= status - data,
                "{} bytes do not fit a slot",
                request.len
            );
            self.write_header(header, request.request_type, request.sector);
            self.ram
                .mem
                .write_obj(STATUS_UNSET, GuestAddress(status))
                .unwrap();
            let data_desc = if request.is_write() {
                Desc::readable(data, request.len)
            } else {
                Desc::writable(data, request.len)
            };
            let descs = [
                Desc::readable(header, 16),
                data_desc,
                Desc::writable(status, 1),
            ];
            let table = header + INDIRECT_TABLE_OFFSET;
            let head = self.queues[queue].place_indirect(&self.ram, table, &descs);
            submitted.push(Submitted {
                queue,
                head,
                request: *request,
            });
        }
        let ring = &self.queues[queue];
        ring.publish_avail(&self.ram);
        ring.kick();
        submitted
    }

    /// Take used entries of ring `queue` until `count` have come or
    /// `timeout` passes; returns their ids (heads), maybe fewer.
    pub fn collect_used(&mut self, queue: usize, count: usize, timeout: Duration) -> Vec<u16> {
        self.queues[queue]
            .collect_used(&self.ram, count, timeout)
            .into_iter()
            .map(|(id, _)| u16::try_from(id).unwrap_or(u16::MAX))
            .collect()
    }

    /// Write a virtio-blk request header at `addr`.
    pub fn write_header(&self, addr: u64, request_type: u32, sector: u64) {
        self.ram
            .mem
            .write_obj(request_type, GuestAddress(addr))
            .unwrap();
        self.ram
            .mem
            .write_obj(0u32, GuestAddress(addr + 4))
            .unwrap();
        self.ram
            .mem
            .write_obj(sector, GuestAddress(addr + 8))
            .unwrap();
    }
    /// Submit one well-formed request on `queue` using buffer `slot` and
    /// wait for it; returns the status byte. Write data must already be in
    /// the data buffer.
    pub fn request(
        &mut self,
        queue: usize,
        slot: u64,
        request_type: u32,
        sector: u64,
        len: u32,
    ) -> Option<u8> {
        let (header, data, status) = Self::buffers(slot);
        self.write_header(header, request_type, sector);
        self.ram
            .mem
            .write_obj(0xffu8, GuestAddress(status))
            .unwrap();
        let data_desc = if request_type == VIRTIO_BLK_T_OUT {
            Desc::readable(data, len)
        } else {
            Desc::writable(data, len)
        };
        let descs = [
            Desc::readable(header, 16),
            data_desc,
            Desc::writable(status, 1),
        ];
        let q = &mut self.queues[queue];
        q.add_chain(&self.ram, &descs);
        q.kick();
        q.wait_used(&self.ram, 1, Duration::from_secs(5))?;
        Some(self.ram.mem.read_obj(GuestAddress(status)).unwrap())
    }

    /// Read and write a test pattern at `sector` through `queue`; true if
    /// both succeed and the data matches.
    pub fn round_trip(&mut self, queue: usize, slot: u64, sector: u64) -> bool {
        let (_, data, _) = Self::buffers(slot);
        let pattern: Vec<u8> = (0..4096u32)
            .map(|i| (i as u8) ^ (sector as u8) ^ (queue as u8))
            .collect();
        self.ram
            .mem
            .write_slice(&pattern, GuestAddress(data))
            .unwrap();
        if self.request(queue, slot, VIRTIO_BLK_T_OUT, sector, 4096) != Some(VIRTIO_BLK_S_OK) {
            return false;
        }
        self.ram
            .mem
            .write_slice(&[0u8; 4096], GuestAddress(data))
            .unwrap();
        if self.request(queue, slot, VIRTIO_BLK_T_IN, sector, 4096) != Some(VIRTIO_BLK_S_OK) {
            return false;
        }
        let mut back = vec![0u8; 4096];
        self.ram
            .mem
            .read_slice(&mut back, GuestAddress(data))
            .unwrap();
        back == pattern
    }
}
