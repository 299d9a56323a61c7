//! A small wrapper around libblkio (the `blkio` crate, driver
//! `virtio-blk-vhost-user`): a real, independently written vhost-user-blk
//! client for tests and benchmarks.
//!
//! I/O buffers live in one region allocated through libblkio, because a
//! vhost-user back-end can only reach memory the client shares by fd.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A connected client with `queues` and a shared buffer pool.
pub struct BlkioClient {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    capacity: u64,
}

/// One finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// The `user_data` it was submitted with.
    pub user_data: usize,
    /// 0 on success, a negative errno on failure.
    pub ret: i32,
}

/// Random-I/O direction for [`BlkioClient::random_io`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Reads.
    Read,
    /// Writes.
    Write,
}

impl BlkioClient {
    /// Connect to the vhost-user-blk socket at `socket` with `num_queues`
    /// queues and `buffer_bytes` of shared I/O buffer.
    pub fn connect(
        socket: &Path,
        num_queues: usize,
        buffer_bytes: usize,
    ) -> Result<BlkioClient, String> {
        Self::connect_with(socket, num_queues, buffer_bytes, false)
    }

    /// Like [`Self::connect`]; `read_only` sets libblkio's `read-only`
    /// property, without which it refuses to start on a read-only disk.
    pub fn connect_with(
        socket: &Path,
        num_queues: usize,
        buffer_bytes: usize,
        read_only: bool,
    ) -> Result<BlkioClient, String> {
        let fail = |what: &str, e: blkio::Error| {
            format!("libblkio {what}: {} ({:?})", e.message(), e.errno())
        };
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(|e| fail("new", e))?;
        blkio
            .set_str("path", &socket.display().to_string())
            .map_err(|e| fail("set path", e))?;
        blkio
            .set_bool("read-only", read_only)
            .map_err(|e| fail("set read-only", e))?;
        blkio.connect().map_err(|e| fail("connect", e))?;
        blkio
            .set_i32("num-queues", num_queues as i32)
            .map_err(|e| fail("set num-queues", e))?;
        let queues = blkio.start().map_err(|e| fail("start", e))?.queues;
        let capacity = blkio.get_u64("capacity").map_err(|e| fail("capacity", e))?;
        let region = blkio
            .alloc_mem_region(buffer_bytes)
            .map_err(|e| fail("alloc_mem_region", e))?;
        blkio
            .map_mem_region(&region)
            .map_err(|e| fail("map_mem_region", e))?;
        Ok(BlkioClient {
            blkio,
            queues,
            region,
            capacity,
        })
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The shared buffer pool.
    pub fn buffers(&mut self) -> &mut [u8] {
        // SAFETY: libblkio allocated `region.len` bytes at `region.addr` for
        // us; they stay mapped until `Drop`, and `&mut self` makes this the
        // only live reference from our side.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn buffer_ptr(&self, buffer_offset: usize, len: usize) -> *mut u8 {
        assert!(
            buffer_offset + len <= self.region.len,
            "buffer range beyond the pool"
        );
        (self.region.addr + buffer_offset) as *mut u8
    }

    /// Queue a read of `len` bytes at disk `offset` into the pool at `buffer_offset`.
    pub fn submit_read(
        &mut self,
        queue: usize,
        offset: u64,
        buffer_offset: usize,
        len: usize,
        user_data: usize,
    ) {
        let buf = self.buffer_ptr(buffer_offset, len);
        self.queues[queue].read(offset, buf, len, user_data, ReqFlags::empty());
    }

    /// Queue a write of `len` bytes at disk `offset` from the pool at `buffer_offset`.
    pub fn submit_write(
        &mut self,
        queue: usize,
        offset: u64,
        buffer_offset: usize,
        len: usize,
        user_data: usize,
    ) {
        let buf = self.buffer_ptr(buffer_offset, len);
        self.queues[queue].write(offset, buf, len, user_data, ReqFlags::empty());
    }

    /// Submit queued requests and wait for `count` completions (up to 10 s).
    pub fn wait(&mut self, queue: usize, count: usize) -> Result<Vec<Done>, String> {
        let mut slots: Vec<MaybeUninit<Completion>> =
            (0..count).map(|_| MaybeUninit::uninit()).collect();
        let mut done = Vec::with_capacity(count);
        let deadline = Instant::now() + Duration::from_secs(10);
        while done.len() < count {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "only {} of {count} requests completed within 10 s",
                    done.len()
                ));
            }
            let mut timeout = deadline - now;
            let want = count - done.len();
            let n = self.queues[queue]
                .do_io(&mut slots[..want], want, Some(&mut timeout), None)
                .map_err(|e| format!("do_io: {}", e.message()))?;
            for slot in &slots[..n] {
                // SAFETY: do_io initialised the first `n` entries.
                let completion = unsafe { slot.assume_init_ref() };
                done.push(Done {
                    user_data: completion.user_data,
                    ret: completion.ret,
                });
            }
        }
        Ok(done)
    }

    fn one(&mut self, queue: usize) -> Result<(), String> {
        let done = self.wait(queue, 1)?;
        match done[0].ret {
            0 => Ok(()),
            ret => Err(format!("request failed with {ret}")),
        }
    }

    /// Read synchronously.
    pub fn read(
        &mut self,
        queue: usize,
        offset: u64,
        buffer_offset: usize,
        len: usize,
    ) -> Result<(), String> {
        self.submit_read(queue, offset, buffer_offset, len, 0);
        self.one(queue)
    }

    /// Write synchronously.
    pub fn write(
        &mut self,
        queue: usize,
        offset: u64,
        buffer_offset: usize,
        len: usize,
    ) -> Result<(), String> {
        self.submit_write(queue, offset, buffer_offset, len, 0);
        self.one(queue)
    }

    /// Flush synchronously.
    pub fn flush(&mut self, queue: usize) -> Result<(), String> {
        self.queues[queue].flush(0, ReqFlags::empty());
        self.one(queue)
    }

    /// Discard synchronously.
    pub fn discard(&mut self, queue: usize, offset: u64, len: u64) -> Result<(), String> {
        self.queues[queue].discard(offset, len, 0, ReqFlags::empty());
        self.one(queue)
    }

    /// Write zeroes synchronously.
    pub fn write_zeroes(&mut self, queue: usize, offset: u64, len: u64) -> Result<(), String> {
        self.queues[queue].write_zeroes(offset, len, 0, ReqFlags::empty());
        self.one(queue)
    }

    /// Write `blocks` (disk block numbers of `block_size`) with
    /// [`fill_pattern`] content at queue depth `depth`.
    pub fn write_blocks(
        &mut self,
        queue: usize,
        blocks: &[u64],
        block_size: usize,
        depth: usize,
        seed: u64,
    ) -> Result<(), String> {
        for batch in blocks.chunks(depth) {
            for (slot, &block) in batch.iter().enumerate() {
                let range = slot * block_size..(slot + 1) * block_size;
                fill_pattern(block, seed, &mut self.buffers()[range]);
                self.submit_write(
                    queue,
                    block * block_size as u64,
                    slot * block_size,
                    block_size,
                    slot,
                );
            }
            check_all(self.wait(queue, batch.len())?)?;
        }
        Ok(())
    }

    /// Read `blocks` back at depth `depth` and check each against
    /// [`fill_pattern`]; the error names the first wrong block.
    pub fn verify_blocks(
        &mut self,
        queue: usize,
        blocks: &[u64],
        block_size: usize,
        depth: usize,
        seed: u64,
    ) -> Result<(), String> {
        let mut expected = vec![0u8; block_size];
        for batch in blocks.chunks(depth) {
            for (slot, &block) in batch.iter().enumerate() {
                self.buffers()[slot * block_size..(slot + 1) * block_size].fill(0xee);
                self.submit_read(
                    queue,
                    block * block_size as u64,
                    slot * block_size,
                    block_size,
                    slot,
                );
            }
            check_all(self.wait(queue, batch.len())?)?;
            for (slot, &block) in batch.iter().enumerate() {
                fill_pattern(block, seed, &mut expected);
                if self.buffers()[slot * block_size..(slot + 1) * block_size] != expected[..] {
                    return Err(format!("block {block} read back wrong on queue {queue}"));
                }
            }
        }
        Ok(())
    }

    /// Closed-loop random I/O for `duration` on `queue` at queue depth
    /// `depth` with `block_size` requests over the first `span` bytes;
    /// returns IOPS. The pool must hold `depth * block_size` bytes.
    pub fn random_io(
        &mut self,
        queue: usize,
        direction: Direction,
        block_size: usize,
        depth: usize,
        span: u64,
        duration: Duration,
    ) -> Result<f64, String> {
        let blocks = span / block_size as u64;
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let submit = |client: &mut BlkioClient, slot: usize, rng: &mut XorShift| {
            let offset = (rng.next() % blocks) * block_size as u64;
            match direction {
                Direction::Read => {
                    client.submit_read(queue, offset, slot * block_size, block_size, slot)
                }
                Direction::Write => {
                    client.submit_write(queue, offset, slot * block_size, block_size, slot)
                }
            }
        };
        for slot in 0..depth {
            submit(self, slot, &mut rng);
        }
        let mut slots: Vec<MaybeUninit<Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        let started = Instant::now();
        let mut completed: u64 = 0;
        while started.elapsed() < duration {
            let n = self.queues[queue]
                .do_io(&mut slots, 1, None, None)
                .map_err(|e| format!("do_io: {}", e.message()))?;
            for slot in &slots[..n] {
                // SAFETY: do_io initialised the first `n` entries.
                let completion = unsafe { slot.assume_init_ref() };
                if completion.ret != 0 {
                    return Err(format!("request failed with {}", completion.ret));
                }
                completed += 1;
                submit(self, completion.user_data, &mut rng);
            }
        }
        let elapsed = started.elapsed();
        // Drain what is still in flight so the next run starts clean.
        let _ = self.wait(queue, depth);
        Ok(completed as f64 / elapsed.as_secs_f64())
    }
}

impl Drop for BlkioClient {
    fn drop(&mut self) {
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}

fn check_all(done: Vec<Done>) -> Result<(), String> {
    match done.iter().find(|d| d.ret != 0) {
        Some(d) => Err(format!("request {} failed with {}", d.user_data, d.ret)),
        None => Ok(()),
    }
}

/// Content of block `block` for `seed`: unique per block and per seed, so a
/// misplaced or stale block is detected.
pub fn fill_pattern(block: u64, seed: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let word = (block ^ seed.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64);
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
}

/// `count` distinct random block numbers below `total`.
pub fn random_blocks(total: u64, count: usize, seed: u64) -> Vec<u64> {
    let mut all: Vec<u64> = (0..total).collect();
    let mut rng = XorShift(seed | 1);
    for i in (1..all.len()).rev() {
        all.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    all.truncate(count);
    all
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
