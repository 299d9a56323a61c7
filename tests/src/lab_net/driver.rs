//! The guest side of a net device for the lab: the test front-end
//! ([`TestFrontend`]) with one fixed 2 KiB buffer per descriptor slot, TX
//! rings pumped with numbered frames, RX rings kept full of buffers, and
//! counters that say where every ring must stand, so a stop's indices can
//! be checked exactly and a destination started from them.
//!
//! Every chain is one descriptor and the kernel completes them in order,
//! so the k-th chain of a ring has head `k % QUEUE_SIZE` and its buffer is
//! that slot's (checked on every used entry).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vm_memory::{Bytes, GuestAddress};

use super::frames::{self, Direction, Tag};
use crate::frontend::{raw, Desc, Inflight, StartOptions, TestFrontend, BUFFER_BASE, RAM_SIZE};

/// Ring size.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of each slot's buffer.
pub const BUF_SIZE: u64 = 2048;
/// The virtio-net header (VERSION_1: 12 bytes).
pub const HDR: usize = 12;
/// Bytes of a log page.
pub const PAGE: u64 = 4096;
/// VHOST_F_LOG_ALL.
const LOG_ALL: u64 = 1 << 26;
/// VHOST_USER_NET_SET_MTU.
const NET_SET_MTU: u32 = 20;
/// VHOST_USER_SEND_RARP.
const SEND_RARP: u32 = 19;

/// Where ring `ring`'s slot `slot` buffer lies in guest RAM.
pub fn buffer(ring: usize, slot: u16) -> u64 {
    BUFFER_BASE + (ring as u64 * u64::from(QUEUE_SIZE) + u64::from(slot)) * BUF_SIZE
}

/// What a front-end acks for the lab's net devices.
pub fn options(pairs: usize, protocol: u64) -> StartOptions {
    let mut options = StartOptions::plain(2 * pairs, QUEUE_SIZE);
    options.queues_per_unit = 2;
    options.protocol = protocol
        | (VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::RARP
            | VhostUserProtocolFeatures::DEVICE_STATE)
            .bits();
    options
}

/// Per ring: chains added and chains the device returned.
#[derive(Clone, Debug, Default)]
struct RingCount {
    added: u64,
    used: u64,
}

/// One frame the device put on an RX ring.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    /// The pair whose ring it came on.
    pub pair: usize,
    /// Its tag, if it is an intact frame of ours.
    pub tag: Option<Tag>,
    /// Its buffer's guest address and the bytes written there.
    pub addr: u64,
    /// Bytes the device wrote (header included).
    pub len: u32,
}

/// The guest side of one net device (module documentation).
pub struct NetGuest {
    /// The front-end.
    pub fe: TestFrontend,
    /// Queue pairs.
    pub pairs: usize,
    rings: Vec<RingCount>,
    /// Used entries whose id was not the slot expected.
    pub out_of_order: u64,
}

impl NetGuest {
    /// Connect to `socket` and negotiate (nothing started) with fresh RAM.
    pub fn connect(socket: &Path, pairs: usize, protocol: u64) -> NetGuest {
        let options = options(pairs, protocol);
        let fe = TestFrontend::negotiate(socket, &options);
        NetGuest {
            fe,
            pairs,
            rings: vec![RingCount::default(); 2 * pairs],
            out_of_order: 0,
        }
    }

    /// The same guest on another connection (to another agent, or the same
    /// one again): this connection closes first.
    pub fn follow(self, socket: &Path, protocol: u64) -> NetGuest {
        let NetGuest {
            fe,
            pairs,
            rings,
            out_of_order,
        } = self;
        let (ram, queues) = (fe.ram.clone(), fe.continued_queues());
        drop(fe);
        let fe = TestFrontend::follow(socket, &options(pairs, protocol), ram, queues);
        NetGuest {
            fe,
            pairs,
            rings,
            out_of_order,
        }
    }

    /// The same guest on `fe`, a connection made for it already (a
    /// destination that was set up early): this connection closes.
    pub fn adopt(self, fe: TestFrontend) -> NetGuest {
        NetGuest { fe, ..self }
    }

    /// Where every ring must stand: the next avail index the device takes
    /// (RX: buffers it filled; TX: frames it took).
    pub fn expected_bases(&self) -> Vec<u16> {
        self.rings.iter().map(|r| r.used as u16).collect()
    }

    /// NET_SET_MTU with NEED_REPLY, as QEMU sends it before a start.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), String> {
        self.fe.send_raw(
            NET_SET_MTU,
            raw::FLAG_VERSION | raw::FLAG_NEED_REPLY,
            &u64::from(mtu).to_le_bytes(),
        );
        let reply = self.fe.recv_raw();
        match (reply.request, reply.u64()) {
            (NET_SET_MTU, Some(0)) => Ok(()),
            _ => Err(format!("NET_SET_MTU {mtu}: {reply:?}")),
        }
    }

    /// SEND_RARP for `mac` with NEED_REPLY; whether it was acked.
    pub fn send_rarp(&self, mac: [u8; 6]) -> bool {
        let mut payload = [0u8; 8];
        payload[..6].copy_from_slice(&mac);
        self.fe.send_raw(
            SEND_RARP,
            raw::FLAG_VERSION | raw::FLAG_NEED_REPLY,
            &payload,
        );
        let reply = self.fe.recv_raw();
        reply.request == SEND_RARP && reply.u64() == Some(0)
    }

    /// QEMU's start sequence with every ring at its expected base.
    pub fn start(&mut self) {
        let bases = self.expected_bases();
        self.fe.start_device(Inflight::None, &bases);
    }

    /// QEMU's net stop: GET_VRING_BASE on every ring; what each returned.
    pub fn stop(&mut self) -> Vec<u16> {
        (0..2 * self.pairs)
            .map(|ring| {
                let base = self
                    .fe
                    .frontend
                    .get_vring_base(ring)
                    .expect("GET_VRING_BASE");
                u16::try_from(base).expect("a split-ring index")
            })
            .collect()
    }

    /// SET_VRING_ENABLE of both rings of `pair`, then a round trip.
    pub fn enable_pair(&mut self, pair: usize, enabled: bool) {
        for ring in [2 * pair, 2 * pair + 1] {
            self.fe
                .frontend
                .set_vring_enable(ring, enabled)
                .expect("SET_VRING_ENABLE");
        }
        self.fe.sync();
    }

    /// Take the used entries of ring `ring` that are there, checking each
    /// names the slot expected; (slot, len) of each.
    fn take(&mut self, ring: usize) -> Vec<(u16, u32)> {
        let entries = self.fe.queues[ring].take_used(&self.fe.ram);
        let count = &mut self.rings[ring];
        let mut taken = Vec::with_capacity(entries.len());
        for (id, len) in entries {
            let slot = (count.used % u64::from(QUEUE_SIZE)) as u16;
            if id != u32::from(slot) {
                self.out_of_order += 1;
            }
            count.used += 1;
            taken.push((slot, len));
        }
        taken
    }

    /// Put `count` frames of `len` bytes on pair `pair`'s TX ring (at most
    /// a ring's worth outstanding, one kick per batch) and wait until the
    /// device took them all, or nothing moved for `stall`. Returns how
    /// many it took.
    pub fn send(&mut self, pair: usize, count: u64, len: usize, stall: Duration) -> u64 {
        let ring = 2 * pair + 1;
        let target = self.rings[ring].used + count;
        let mut last_progress = Instant::now();
        while self.rings[ring].used < target {
            let mut added = 0;
            while self.rings[ring].added < target
                && self.rings[ring].added - self.rings[ring].used < u64::from(QUEUE_SIZE)
            {
                let seq = self.rings[ring].added;
                let slot = (seq % u64::from(QUEUE_SIZE)) as u16;
                let addr = buffer(ring, slot);
                let frame = frames::frame(Direction::Tx, pair as u16, seq as u32, len);
                let ram = &self.fe.ram.mem;
                ram.write_slice(&[0u8; HDR], GuestAddress(addr)).unwrap();
                ram.write_slice(&frame, GuestAddress(addr + HDR as u64))
                    .unwrap();
                let head = self.fe.queues[ring].add_chain(
                    &self.fe.ram,
                    &[Desc::readable(addr, (HDR + frame.len()) as u32)],
                );
                assert_eq!(head, slot, "TX heads are handed out in order");
                self.rings[ring].added += 1;
                added += 1;
            }
            if added > 0 {
                self.fe.queues[ring].kick();
            }
            let before = self.rings[ring].used;
            if self.fe.queues[ring].pending_used(&self.fe.ram) == 0 {
                self.fe.queues[ring].wait_call(Duration::from_millis(5));
            }
            self.take(ring);
            if self.rings[ring].used > before {
                last_progress = Instant::now();
            } else if last_progress.elapsed() > stall {
                break;
            }
        }
        count - (target - self.rings[ring].used)
    }

    /// One frame on pair `pair`'s TX ring behind the virtio-net header
    /// `header` (offload flags and all), waiting until the device took it;
    /// whether it did within `stall`.
    pub fn send_with_header(
        &mut self,
        pair: usize,
        header: [u8; HDR],
        frame: &[u8],
        stall: Duration,
    ) -> bool {
        let ring = 2 * pair + 1;
        let seq = self.rings[ring].added;
        let slot = (seq % u64::from(QUEUE_SIZE)) as u16;
        let addr = buffer(ring, slot);
        let ram = &self.fe.ram.mem;
        ram.write_slice(&header, GuestAddress(addr)).unwrap();
        ram.write_slice(frame, GuestAddress(addr + HDR as u64))
            .unwrap();
        let head = self.fe.queues[ring].add_chain(
            &self.fe.ram,
            &[Desc::readable(addr, (HDR + frame.len()) as u32)],
        );
        assert_eq!(head, slot, "TX heads are handed out in order");
        self.rings[ring].added += 1;
        self.fe.queues[ring].kick();
        let deadline = Instant::now() + stall;
        while self.rings[ring].used < self.rings[ring].added && Instant::now() < deadline {
            self.fe.queues[ring].wait_call(Duration::from_millis(5));
            self.take(ring);
        }
        self.rings[ring].used == self.rings[ring].added
    }

    /// Keep pair `pair`'s RX ring full of empty buffers; kick if any were
    /// added.
    pub fn fill_rx(&mut self, pair: usize) {
        let ring = 2 * pair;
        let mut added = false;
        while self.rings[ring].added - self.rings[ring].used < u64::from(QUEUE_SIZE) {
            let slot = (self.rings[ring].added % u64::from(QUEUE_SIZE)) as u16;
            let head = self.fe.queues[ring].add_chain(
                &self.fe.ram,
                &[Desc::writable(buffer(ring, slot), BUF_SIZE as u32)],
            );
            assert_eq!(head, slot, "RX heads are handed out in order");
            self.rings[ring].added += 1;
            added = true;
        }
        if added {
            self.fe.queues[ring].kick();
        }
    }

    /// Collect what arrives on every RX ring until `count` frames came or
    /// nothing arrived for `stall`; buffers are posted again as they fill.
    pub fn receive(&mut self, count: usize, stall: Duration) -> Vec<Received> {
        let mut got = Vec::new();
        let mut last_progress = Instant::now();
        while got.len() < count {
            let before = got.len();
            for pair in 0..self.pairs {
                let ring = 2 * pair;
                for (slot, len) in self.take(ring) {
                    let addr = buffer(ring, slot);
                    let frame_len = (len as usize).saturating_sub(HDR).min(BUF_SIZE as usize);
                    let mut bytes = vec![0u8; frame_len];
                    self.fe
                        .ram
                        .mem
                        .read_slice(&mut bytes, GuestAddress(addr + HDR as u64))
                        .unwrap();
                    got.push(Received {
                        pair,
                        tag: frames::parse(&bytes),
                        addr,
                        len,
                    });
                }
                self.fill_rx(pair);
            }
            if got.len() > before {
                last_progress = Instant::now();
                continue;
            }
            if last_progress.elapsed() > stall {
                break;
            }
            for pair in 0..self.pairs {
                self.fe.queues[2 * pair].wait_call(Duration::from_millis(1));
            }
        }
        got
    }

    /// Every ring's used index in guest memory.
    pub fn used_indices(&self) -> Vec<u16> {
        self.fe.used_indices()
    }

    /// The guest address range of ring `ring`'s used ring.
    pub fn used_ring(&self, ring: usize) -> (u64, u64) {
        let (_, _, used) = self.fe.queues[ring].addresses();
        (used, used + 6 + 8 * u64::from(QUEUE_SIZE))
    }

    /// SET_LOG_BASE with a fresh log for all of guest RAM and
    /// VHOST_F_LOG_ALL on, as a migration source gets it.
    pub fn log_on(&mut self) -> DirtyLog {
        let size = RAM_SIZE / PAGE / 8;
        // Sealed, as QEMU's: the agent refuses a log that could shrink.
        let file = crate::frontend::sealed_memfd("vhost-log", size);
        self.fe
            .frontend
            .set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: size,
                    mmap_offset: 0,
                    mmap_handle: file.as_raw_fd(),
                }),
            )
            .expect("SET_LOG_BASE");
        self.fe
            .frontend
            .set_features(self.fe.features | LOG_ALL)
            .expect("SET_FEATURES with LOG_ALL");
        self.fe.sync();
        DirtyLog { file, size }
    }

    /// VHOST_F_LOG_ALL off again.
    pub fn log_off(&mut self) {
        self.fe
            .frontend
            .set_features(self.fe.features)
            .expect("SET_FEATURES");
        self.fe.sync();
    }
}

/// The front-end's dirty log.
pub struct DirtyLog {
    file: File,
    size: u64,
}

impl DirtyLog {
    /// The guest addresses of every page marked.
    pub fn pages(&self) -> BTreeSet<u64> {
        let mut bytes = vec![0u8; self.size as usize];
        self.file
            .read_exact_at(&mut bytes, 0)
            .expect("read the log");
        let mut pages = BTreeSet::new();
        for (index, byte) in bytes.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    pages.insert((index as u64 * 8 + bit) * PAGE);
                }
            }
        }
        pages
    }

    /// Clear every bit (as QEMU does when it syncs the log).
    pub fn clear(&self) {
        self.file
            .write_all_at(&vec![0u8; self.size as usize], 0)
            .expect("clear the log");
    }
}

/// The pages `[addr, addr + len)` touches.
pub fn pages_of(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = addr / PAGE;
    let last = (addr + len.max(1) - 1) / PAGE;
    (first..=last).map(|page| page * PAGE)
}
