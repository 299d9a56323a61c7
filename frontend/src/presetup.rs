//! The in-band presetup bracket of NVIDIA's early-migration RFC, as a
//! destination QEMU with `x-early-migration=on` sends it during migration
//! setup (PROTOCOL.md §1, item 4): PRESETUP(START), [NET_SET_MTU], then per
//! queue pair SET_FEATURES, SET_MEM_TABLE, per ring SET_VRING_NUM / BASE /
//! ADDR, SET_VRING_KICK and SET_VRING_CALL without fds, SET_VRING_ENABLE(1),
//! and PRESETUP(END). The `vhost` crate's front-end can send neither
//! request 41 with a u64 nor a kick or call without an fd, so those go raw.

use std::io;

use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

use super::raw::{self, RawMessage};
use super::{GuestRam, TestFrontend};

/// VHOST_USER_PROTOCOL_F_PRESETUP of the RFC (upstream: SHARED_OBJECT).
pub const PROTOCOL_F_PRESETUP: u64 = 1 << 18;
/// VHOST_USER_PRESETUP of the RFC (upstream: GET_SHARED_OBJECT).
pub const PRESETUP: u32 = 41;
/// PRESETUP payload: the early configuration follows.
pub const PRESETUP_START: u64 = 1;
/// PRESETUP payload: the early configuration is complete.
pub const PRESETUP_END: u64 = 2;
/// VHOST_USER_NET_SET_MTU.
pub const NET_SET_MTU: u32 = 20;
/// VHOST_USER_GET_STATUS.
pub const GET_STATUS: u32 = 40;
/// VHOST_USER_SET_VRING_KICK.
const SET_VRING_KICK: u32 = 12;
/// VHOST_USER_SET_VRING_CALL.
const SET_VRING_CALL: u32 = 13;
/// VHOST_USER_VRING_NOFD_MASK: the u64 names a ring and carries no fd.
pub const VRING_NOFD: u64 = 0x100;

/// What a test puts in the early configuration besides START and END.
#[derive(Clone, Copy)]
pub struct EarlyConfig<'a> {
    /// Guest RAM the memory table and ring addresses name (the guest's own,
    /// or another to make the switchover's table differ).
    pub ram: &'a GuestRam,
    /// NET_SET_MTU first, as QEMU does when the guest acked VIRTIO_NET_F_MTU.
    pub mtu: Option<u16>,
    /// Attach the queue's real kick eventfd to SET_VRING_KICK, which the RFC
    /// never does: a misbehaving front-end, for the "no ring starts"
    /// checks.
    pub kick_fds: bool,
}

impl TestFrontend {
    /// PRESETUP(`value`) as the RFC sends it: a u64, no NEED_REPLY, no
    /// reply.
    pub fn presetup(&self, value: u64) {
        self.send_raw(PRESETUP, raw::FLAG_VERSION, &value.to_le_bytes());
    }

    /// PRESETUP(`value`) with NEED_REPLY; the REPLY_ACK value (0 = done).
    pub fn presetup_acked(&self, value: u64) -> u64 {
        self.send_raw(
            PRESETUP,
            raw::FLAG_VERSION | raw::FLAG_NEED_REPLY,
            &value.to_le_bytes(),
        );
        let reply = self.recv_raw();
        assert_eq!(reply.request, PRESETUP, "reply to another request");
        reply.u64().expect("REPLY_ACK is a u64")
    }

    /// The early configuration's messages, between START and END, in the
    /// RFC's order; every ring at base `bases[i]`.
    pub fn presetup_configure(&mut self, early: EarlyConfig<'_>, bases: &[u16]) {
        assert_eq!(bases.len(), self.queues.len(), "one base per queue");
        if let Some(mtu) = early.mtu {
            self.send_raw(
                NET_SET_MTU,
                raw::FLAG_VERSION | raw::FLAG_NEED_REPLY,
                &u64::from(mtu).to_le_bytes(),
            );
            let ack = self.recv_raw().u64().expect("NET_SET_MTU ack is a u64");
            assert_eq!(ack, 0, "NET_SET_MTU {mtu} refused");
        }
        self.frontend
            .set_features(self.features)
            .expect("SET_FEATURES");
        self.frontend
            .set_mem_table(&[early.ram.region_info()])
            .expect("SET_MEM_TABLE");
        for (queue, &base) in self.queues.iter().zip(bases) {
            self.set_ring_layout(early.ram, queue, base);
            let index = queue.index;
            let ring = index as u64;
            if early.kick_fds {
                self.frontend
                    .set_vring_kick(index, &queue.kick)
                    .expect("SET_VRING_KICK");
            } else {
                self.send_raw(
                    SET_VRING_KICK,
                    raw::FLAG_VERSION,
                    &(ring | VRING_NOFD).to_le_bytes(),
                );
            }
            self.send_raw(
                SET_VRING_CALL,
                raw::FLAG_VERSION,
                &(ring | VRING_NOFD).to_le_bytes(),
            );
        }
        for queue in &self.queues {
            self.frontend
                .set_vring_enable(queue.index, true)
                .expect("SET_VRING_ENABLE");
        }
    }

    /// A whole bracket, START to END, then a round trip so the back-end
    /// has finished what END asks of it.
    pub fn presetup_bracket(&mut self, early: EarlyConfig<'_>, bases: &[u16]) {
        self.presetup(PRESETUP_START);
        self.presetup_configure(early, bases);
        self.presetup(PRESETUP_END);
        self.sync();
    }

    /// GET_STATUS, raw: the device status byte (with NEEDS_RESET, 0x40,
    /// if the device broke).
    pub fn get_status(&self) -> u8 {
        self.send_raw(GET_STATUS, raw::FLAG_VERSION, &[]);
        let reply = self.recv_raw().u64().expect("GET_STATUS reply is a u64");
        u8::try_from(reply).expect("status fits a byte")
    }

    /// Receive one raw message, or the error that ended the connection
    /// (EOF when the back-end closed it).
    pub fn try_recv_raw(&self) -> io::Result<RawMessage> {
        raw::recv(&self.stream)
    }

    /// Write `bytes` over the rings of every queue (descriptor table, avail
    /// and used ring), as guest RAM looks before migration has brought it.
    pub fn scribble_rings(&self, ram: &GuestRam, byte: u8) {
        use vm_memory::{Bytes, GuestAddress};
        for queue in &self.queues {
            let end = queue.used_ring + 6 + 8 * u64::from(queue.size);
            let garbage = vec![byte; (end - queue.desc_table) as usize];
            ram.mem
                .write_slice(&garbage, GuestAddress(queue.desc_table))
                .expect("write the rings");
        }
    }
}
