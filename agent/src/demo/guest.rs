//! The demo's guest, played by the built-in front-end: a disk with
//! requests in flight whose data is checked, and a net device whose
//! frames must come back. Guest RAM and the driver's place in each ring
//! live in the front-end of the side the guest runs on; a migration
//! destination's front-end continues them ([`TestFrontend::attach`]).
//!
//! The front-end is test code: it panics on a broken peer, with the
//! message a test needs, and the demo turns that into a failed check.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use vhost_agent_frontend::{
    wait_until, BlkRequest, Desc, StartOptions, Submitted, TestFrontend, BUFFER_BASE,
    PROTOCOL_F_INFLIGHT_SHMFD, PROTOCOL_SUSPEND, VIRTIO_BLK_S_OK,
};
use vm_memory::{Bytes, GuestAddress};

use super::agents::{DISK_QUEUE_SIZE, QUEUE_PAIRS};

/// Request size.
pub const BLOCK: usize = 4096;
/// How long the requests and frames may take.
const WAIT: Duration = Duration::from_secs(30);
/// The virtio-net header (with `num_buffers`).
const NET_HDR: usize = 12;
/// Ring size of the net device's front-end.
const NET_QUEUE_SIZE: u16 = 256;
/// Bytes the net guest's buffers take each (64 KiB slots).
const NET_SLOT: u64 = 0x1_0000;
/// What a block of the image holds before the demo writes it.
const IMAGE_TAG: u64 = 0x1111;

/// The content of block `block` written with `tag`: unique per block and
/// tag, so a misplaced or stale write shows.
pub fn pattern(tag: u64, block: u64) -> Vec<u8> {
    (0..BLOCK / 8)
        .flat_map(|word| {
            (tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (block << 20) ^ word as u64).to_le_bytes()
        })
        .collect()
}

/// Fill blocks `0..blocks` of `image` with their initial content.
pub fn fill_image(image: &Path, blocks: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(image)?;
    for block in 0..blocks {
        file.write_all_at(&pattern(IMAGE_TAG, block), block * BLOCK as u64)?;
    }
    file.sync_all()
}

/// How the disk's front-end stops a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopKind {
    /// INFLIGHT_SHMFD only (QEMU 10): GET_VRING_BASE drains.
    Drain,
    /// With GET_VRING_BASE_INFLIGHT (QEMU 11.1 `inflight-migration=on`):
    /// it suspends and hands the requests to the destination.
    Suspend,
}

/// The disk front-end's options.
pub fn disk_options(stop: StopKind) -> StartOptions {
    let protocol = match stop {
        StopKind::Drain => PROTOCOL_F_INFLIGHT_SHMFD,
        StopKind::Suspend => PROTOCOL_SUSPEND,
    };
    StartOptions::with_protocol(1, DISK_QUEUE_SIZE, protocol)
}

/// The net front-end's options: every pair.
pub fn net_options() -> StartOptions {
    let mut options = StartOptions::plain(2 * QUEUE_PAIRS, NET_QUEUE_SIZE);
    options.queues_per_unit = 2;
    options
}

/// A batch of requests put on the disk's ring at once.
pub struct Batch {
    /// The requests and their heads.
    pub submitted: Vec<Submitted>,
    /// The tag of what the writes wrote.
    pub tag: u64,
}

/// Put `count` 4 KiB requests on the disk's ring with one kick, in slots
/// and blocks `first..`: writes of `tag`'s pattern on even blocks, reads
/// on odd ones. Then wait until the agent has taken them all (marked them
/// in flight in the inflight region): the requests are in flight.
pub fn requests_in_flight(
    disk: &mut TestFrontend,
    first: u64,
    count: usize,
    tag: u64,
) -> Result<Batch, String> {
    let requests: Vec<BlkRequest> = (first..first + count as u64)
        .map(|block| {
            let sector = block * (BLOCK as u64 / 512);
            if block % 2 == 0 {
                disk.fill(block, &pattern(tag, block));
                BlkRequest::write(block, sector, BLOCK as u32)
            } else {
                disk.fill(block, &[0xee; BLOCK]);
                BlkRequest::read(block, sector, BLOCK as u32)
            }
        })
        .collect();
    let submitted = disk.submit(0, &requests);
    let taken = wait_until(WAIT, || disk.region().queue(0).inflight_count() == count);
    if !taken {
        return Err(format!(
            "the agent took {} of {count} requests",
            disk.region().queue(0).inflight_count()
        ));
    }
    Ok(Batch { submitted, tag })
}

/// Collect the batch's completions on `disk` and check them: each request
/// completed exactly once with status OK, the writes are on `image`, the
/// reads brought the image's data. Returns how many completed.
pub fn check_batch(disk: &mut TestFrontend, batch: &Batch, image: &Path) -> Result<usize, String> {
    let count = batch.submitted.len();
    let mut heads = disk.collect_used(0, count, WAIT);
    // Anything more than the batch would be a request completed twice.
    std::thread::sleep(Duration::from_millis(200));
    heads.extend(disk.collect_used(0, 0, Duration::ZERO));
    heads.sort_unstable();
    let mut expected: Vec<u16> = batch.submitted.iter().map(|s| s.head).collect();
    expected.sort_unstable();
    if heads != expected {
        return Err(format!(
            "{} completions for {count} requests (heads {heads:?}, expected {expected:?})",
            heads.len()
        ));
    }
    let file = std::fs::File::open(image).map_err(|e| format!("open the image: {e}"))?;
    for s in &batch.submitted {
        let status = disk.status(s.request.slot);
        if status != VIRTIO_BLK_S_OK {
            return Err(format!("request {} ended with status {status}", s.head));
        }
        let block = s.request.sector / (BLOCK as u64 / 512);
        if s.request.is_write() {
            let mut on_disk = vec![0u8; BLOCK];
            file.read_exact_at(&mut on_disk, block * BLOCK as u64)
                .map_err(|e| format!("read block {block}: {e}"))?;
            if on_disk != pattern(batch.tag, block) {
                return Err(format!("block {block}: the write is not on the image"));
            }
        } else if disk.data(s.request.slot, BLOCK) != pattern(IMAGE_TAG, block) {
            return Err(format!(
                "block {block}: the read did not bring the image's data"
            ));
        }
    }
    Ok(count)
}

/// The net guest's buffer allocator: it continues across front-ends, as
/// the guest's memory does.
#[derive(Default)]
pub struct NetGuest {
    next_slot: u64,
}

impl NetGuest {
    fn slot(&mut self, net: &TestFrontend) -> Result<u64, String> {
        let addr = BUFFER_BASE + self.next_slot * NET_SLOT;
        if addr + NET_SLOT > net.ram.size() {
            return Err("the net guest ran out of buffers".to_string());
        }
        self.next_slot += 1;
        Ok(addr)
    }

    /// One numbered frame through every pair of `net`: an RX buffer
    /// posted, the frame sent on TX, and it must come back whole on RX
    /// (the `sim` dataplane reflects frames). Returns the frames that did.
    pub fn frames_flow(&mut self, net: &mut TestFrontend, round: u8) -> Result<usize, String> {
        let mut received = 0;
        for pair in 0..QUEUE_PAIRS {
            let frame = udp_frame(round, pair as u8);
            let rx = self.slot(net)?;
            let tx = self.slot(net)?;
            let ram = net.ram.clone();
            net.queues[2 * pair].add_chain(&ram, &[Desc::writable(rx, 2048)]);
            net.queues[2 * pair].kick();
            write(net, tx, &[0u8; NET_HDR])?;
            write(net, tx + 0x100, &frame)?;
            net.queues[2 * pair + 1].add_chain(
                &ram,
                &[
                    Desc::readable(tx, NET_HDR as u32),
                    Desc::readable(tx + 0x100, frame.len() as u32),
                ],
            );
            net.queues[2 * pair + 1].kick();
            let sent = net.queues[2 * pair + 1].wait_used(&ram, 1, WAIT);
            let back = net.queues[2 * pair].wait_used(&ram, 1, WAIT);
            let (Some(_), Some(back)) = (sent, back) else {
                return Err(format!("pair {pair}: frame {round} did not come back"));
            };
            let len = back[0].1 as usize;
            let mut bytes = vec![0u8; len];
            ram.mem
                .read_slice(&mut bytes, GuestAddress(rx))
                .map_err(|e| format!("read an RX buffer: {e}"))?;
            if bytes.get(NET_HDR..) != Some(frame.as_slice()) {
                return Err(format!("pair {pair}: frame {round} came back changed"));
            }
            received += 1;
        }
        Ok(received)
    }
}

fn write(net: &TestFrontend, addr: u64, bytes: &[u8]) -> Result<(), String> {
    net.ram
        .mem
        .write_slice(bytes, GuestAddress(addr))
        .map_err(|e| format!("write guest RAM: {e}"))
}

/// An Ethernet + IPv4 + UDP frame numbered by `round` and `pair`.
fn udp_frame(round: u8, pair: u8) -> Vec<u8> {
    let payload = 200usize;
    let mut frame = Vec::with_capacity(42 + payload);
    frame.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00]);
    let total = (20 + 8 + payload) as u16;
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    frame.extend_from_slice(&(4000 + u16::from(pair)).to_be_bytes());
    frame.extend_from_slice(&5000u16.to_be_bytes());
    frame.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend((0..payload).map(|i| (i as u8) ^ round ^ pair.wrapping_mul(31)));
    frame
}
