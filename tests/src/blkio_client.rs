//! A small synchronous + queue-depth wrapper around libblkio (the `blkio`
//! crate, driver `virtio-blk-vhost-user`): a real, independently written
//! vhost-user-blk client for tests and benchmarks.
//!
//! # Model
//!
//! * [`BlkioClient::connect`] (or [`BlkioClient::connect_with`]) connects to
//!   a vhost-user-blk socket, starts `num_queues` virtqueues and allocates
//!   one shared **buffer pool**. A vhost-user back-end can only reach memory
//!   the client shares with it by file descriptor, so every I/O buffer lives
//!   in that pool (allocated with libblkio's `alloc_mem_region` and mapped
//!   with `map_mem_region`), never in ordinary heap memory.
//! * [`BlkioClient::queue`] gives a [`QueueIo`]: one virtqueue plus the whole
//!   pool. [`BlkioClient::split_queues`] gives one [`QueueIo`] per virtqueue,
//!   each with its own disjoint slice of the pool; they are `Send`, so each
//!   can be driven from its own thread (`std::thread::scope`).
//! * A [`QueueIo`] offers synchronous calls ([`QueueIo::read`],
//!   [`QueueIo::write`], [`QueueIo::flush`], [`QueueIo::discard`],
//!   [`QueueIo::write_zeroes`]), the raw asynchronous pieces
//!   (`submit_*` + [`QueueIo::reap`]), pipelined bulk pattern I/O at a queue
//!   depth ([`QueueIo::write_pattern`], [`QueueIo::verify_pattern`]) and a
//!   timed random workload for benchmarks ([`QueueIo::run_workload`],
//!   [`BlkioClient::random_io`]).
//!
//! Every wait is bounded (see [`ClientOptions::timeout`]), so a back-end
//! that stops answering makes a test fail, not hang.
//!
//! # Example
//!
//! ```no_run
//! use std::path::Path;
//! use vhost_agent_tests::blkio_client::{random_blocks, BlkioClient};
//!
//! let mut client = BlkioClient::connect(Path::new("/tmp/blk.sock"), 1, 1 << 20).unwrap();
//! let blocks = random_blocks(client.capacity() / 4096, 1000, 42);
//! let mut q = client.queue(0);
//! q.write_pattern(&blocks, 4096, 32, 7).unwrap();
//! q.verify_pattern(&blocks, 4096, 32, 7).unwrap();
//! q.flush().unwrap();
//! ```

use std::fmt;
use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// Default bound on any single wait for completions.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`BlkioClient::connect_with`] keeps retrying a refused or
/// missing socket (a back-end may create its socket before it listens).
const CONNECT_RETRY: Duration = Duration::from_secs(5);

/// What went wrong in a [`BlkioClient`] operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// A libblkio call itself failed (set-up, property access, `do_io`).
    Blkio {
        /// Which call.
        call: String,
        /// Positive errno libblkio reported.
        errno: i32,
        /// libblkio's message.
        message: String,
    },
    /// A request completed with an error status.
    Request {
        /// Which request (e.g. `read 4096 bytes at 0x1000`).
        op: String,
        /// Positive errno of the completion (`EIO` for `VIRTIO_BLK_S_IOERR`,
        /// `ENOTSUP` for `VIRTIO_BLK_S_UNSUPP`, `EBADF` for writes that
        /// libblkio refuses on a read-only device, ...).
        errno: i32,
    },
    /// Requests did not complete within the timeout.
    Timeout {
        /// What was being waited for.
        what: String,
        /// How many of the expected completions arrived.
        completed: usize,
        /// How many were expected.
        expected: usize,
    },
    /// Data read back differs from what was written.
    Mismatch {
        /// Disk byte offset of the block that differs.
        offset: u64,
        /// Details: first differing byte, expected and found values.
        detail: String,
    },
}

impl ClientError {
    /// The errno behind a [`ClientError::Blkio`] or [`ClientError::Request`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            ClientError::Blkio { errno, .. } | ClientError::Request { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    fn blkio(call: impl Into<String>, e: blkio::Error) -> ClientError {
        ClientError::Blkio {
            call: call.into(),
            errno: e.errno().raw_os_error(),
            message: e.message().to_string(),
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Blkio {
                call,
                errno,
                message,
            } => write!(f, "libblkio {call} failed: {message} (errno {errno})"),
            ClientError::Request { op, errno } => write!(
                f,
                "{op} failed: {} (errno {errno})",
                std::io::Error::from_raw_os_error(*errno)
            ),
            ClientError::Timeout {
                what,
                completed,
                expected,
            } => write!(
                f,
                "timed out waiting for {what}: {completed} of {expected} requests completed"
            ),
            ClientError::Mismatch { offset, detail } => {
                write!(f, "data mismatch in block at byte {offset:#x}: {detail}")
            }
        }
    }
}

impl std::error::Error for ClientError {}

/// Result of [`BlkioClient`] operations.
pub type Result<T> = std::result::Result<T, ClientError>;

/// How to connect; [`ClientOptions::default`] is one interrupt-driven queue
/// of libblkio's default size, a 1 MiB pool and a read-write device.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Number of virtqueues to start (must not exceed the device's
    /// `num_queues`).
    pub num_queues: usize,
    /// Use busy-polling queues (`num-poll-queues`) instead of
    /// interrupt-driven ones: lower latency, burns a CPU while waiting.
    pub poll_queues: bool,
    /// Virtqueue size; `None` keeps libblkio's default (256).
    pub queue_size: Option<u32>,
    /// Bytes of shared buffer pool (rounded up to the region alignment).
    pub buffer_bytes: usize,
    /// Tell libblkio the device is read-only. libblkio refuses to start a
    /// device that advertises `VIRTIO_BLK_F_RO` unless this is set, and then
    /// fails writes itself with `EBADF`.
    pub read_only: bool,
    /// Bound on every wait for completions.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            num_queues: 1,
            poll_queues: false,
            queue_size: None,
            buffer_bytes: 1 << 20,
            read_only: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A connected libblkio `virtio-blk-vhost-user` client with started queues
/// and a shared buffer pool. Dropping it unmaps the pool and disconnects.
pub struct BlkioClient {
    // Field order matters for drop: queues go before the driver.
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    capacity: u64,
    block_size: u64,
    max_queues: usize,
    timeout: Duration,
}

/// One finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// The `user_data` it was submitted with.
    pub user_data: usize,
    /// 0 on success, a negative errno on failure.
    pub ret: i32,
}

/// I/O mix of a timed random workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Only reads.
    Read,
    /// Only writes.
    Write,
    /// Random mix with this percentage (0..=100) of reads.
    Mixed {
        /// Percentage of reads.
        read_percent: u8,
    },
}

/// A timed, closed-loop random I/O workload on one queue (see
/// [`QueueIo::run_workload`]).
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Read, write or mixed.
    pub direction: Direction,
    /// Bytes per request; a multiple of the device's block size.
    pub block_size: usize,
    /// Requests kept in flight.
    pub depth: usize,
    /// Offsets are drawn from `[0, span)`, aligned to `block_size`; `0`
    /// means the whole disk.
    pub span: u64,
    /// How long to measure (after `warmup`).
    pub duration: Duration,
    /// Run this long before measuring.
    pub warmup: Duration,
    /// Seed of the offset generator.
    pub seed: u64,
}

/// What a [`Workload`] achieved.
#[derive(Clone, Copy, Debug)]
pub struct IoStats {
    /// Requests completed in the measured interval.
    pub ops: u64,
    /// Of which reads.
    pub reads: u64,
    /// Bytes transferred in the measured interval.
    pub bytes: u64,
    /// Length of the measured interval.
    pub elapsed: Duration,
    /// Requests per second.
    pub iops: f64,
    /// Mean completion latency (submit to reap) in microseconds.
    pub mean_latency_us: f64,
}

impl IoStats {
    /// Throughput in MiB/s.
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64()
    }
}

impl BlkioClient {
    /// Connect to the vhost-user-blk socket at `socket` with `num_queues`
    /// interrupt-driven queues and `buffer_bytes` of shared buffer pool.
    pub fn connect(socket: &Path, num_queues: usize, buffer_bytes: usize) -> Result<BlkioClient> {
        BlkioClient::connect_with(
            socket,
            &ClientOptions {
                num_queues,
                buffer_bytes,
                ..ClientOptions::default()
            },
        )
    }

    /// Connect to the vhost-user-blk socket at `socket` with `options`.
    ///
    /// A refused or missing socket is retried for a few seconds (a back-end
    /// may create its socket file before it listens); other errors are
    /// returned at once.
    pub fn connect_with(socket: &Path, options: &ClientOptions) -> Result<BlkioClient> {
        let deadline = Instant::now() + CONNECT_RETRY;
        let mut blkio = loop {
            let mut blkio =
                Blkio::new("virtio-blk-vhost-user").map_err(|e| ClientError::blkio("new", e))?;
            blkio
                .set_str("path", &socket.to_string_lossy())
                .map_err(|e| ClientError::blkio("set path", e))?;
            if options.read_only {
                blkio
                    .set_bool("read-only", true)
                    .map_err(|e| ClientError::blkio("set read-only", e))?;
            }
            match blkio.connect() {
                Ok(()) => break blkio,
                Err(e)
                    if [libc::ECONNREFUSED, libc::ENOENT].contains(&e.errno().raw_os_error())
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(ClientError::blkio(
                        format!("connect to {}", socket.display()),
                        e,
                    ))
                }
            }
        };

        let num_queues = i32::try_from(options.num_queues).expect("queue count fits i32");
        let (interrupt, poll) = if options.poll_queues {
            (0, num_queues)
        } else {
            (num_queues, 0)
        };
        blkio
            .set_i32("num-queues", interrupt)
            .map_err(|e| ClientError::blkio("set num-queues", e))?;
        blkio
            .set_i32("num-poll-queues", poll)
            .map_err(|e| ClientError::blkio("set num-poll-queues", e))?;
        if let Some(size) = options.queue_size {
            let size = i32::try_from(size).expect("queue size fits i32");
            blkio
                .set_i32("queue-size", size)
                .map_err(|e| ClientError::blkio("set queue-size", e))?;
        }
        let capacity = blkio
            .get_u64("capacity")
            .map_err(|e| ClientError::blkio("get capacity", e))?;
        let block_size = blkio
            .get_i32("request-alignment")
            .map_err(|e| ClientError::blkio("get request-alignment", e))?;
        let max_queues = blkio
            .get_i32("max-queues")
            .map_err(|e| ClientError::blkio("get max-queues", e))?;
        let outcome = blkio.start().map_err(|e| ClientError::blkio("start", e))?;
        let queues = if options.poll_queues {
            outcome.poll_queues
        } else {
            outcome.queues
        };
        let align = blkio
            .get_u64("mem-region-alignment")
            .map_err(|e| ClientError::blkio("get mem-region-alignment", e))?
            .max(4096) as usize;
        let len = options.buffer_bytes.max(1).div_ceil(align) * align;
        let region = blkio
            .alloc_mem_region(len)
            .map_err(|e| ClientError::blkio(format!("alloc_mem_region({len})"), e))?;
        if let Err(e) = blkio.map_mem_region(&region) {
            blkio.free_mem_region(&region);
            return Err(ClientError::blkio("map_mem_region", e));
        }
        Ok(BlkioClient {
            queues,
            blkio,
            region,
            capacity,
            block_size: block_size as u64,
            max_queues: max_queues as usize,
            timeout: options.timeout,
        })
    }

    /// Disk size in bytes, from the device's config space.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Logical block size in bytes (`blk_size` of the config space, 512 if
    /// the device does not offer `VIRTIO_BLK_F_BLK_SIZE`).
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Queues the device offers (`num_queues` of the config space).
    pub fn max_queues(&self) -> usize {
        self.max_queues
    }

    /// Number of started queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Size of the shared buffer pool in bytes.
    pub fn pool_len(&self) -> usize {
        self.region.len
    }

    /// Read a libblkio property (e.g. `max-transfer`, `max-segments`,
    /// `max-discard-len`); for checking what the device advertises.
    pub fn property_u64(&self, name: &str) -> Result<u64> {
        self.blkio
            .get_u64(name)
            .map_err(|e| ClientError::blkio(format!("get {name}"), e))
    }

    /// Read a 32-bit libblkio property (e.g. `max-segments`).
    pub fn property_i32(&self, name: &str) -> Result<i32> {
        self.blkio
            .get_i32(name)
            .map_err(|e| ClientError::blkio(format!("get {name}"), e))
    }

    fn pool_and_queues(&mut self) -> (&mut [u8], &mut [Blkioq]) {
        // SAFETY: libblkio mapped `region.len` bytes at `region.addr` for us
        // (a MAP_SHARED memfd mapping); they stay mapped until `Drop`, and
        // `&mut self` makes the returned slice the only reference from our
        // side. The back-end writes into it only for reads we submit from a
        // `QueueIo` borrowing this slice, and every `QueueIo` method waits for
        // its requests before returning (a timeout error leaves the client
        // unusable, which the documentation says).
        let pool =
            unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) };
        (pool, &mut self.queues)
    }

    /// Queue `index` with the whole buffer pool.
    pub fn queue(&mut self, index: usize) -> QueueIo<'_> {
        let timeout = self.timeout;
        let capacity = self.capacity;
        let count = self.queues.len();
        assert!(index < count, "queue {index} of {count}");
        let (pool, queues) = self.pool_and_queues();
        QueueIo {
            index,
            queue: &mut queues[index],
            pool,
            timeout,
            capacity,
        }
    }

    /// Every queue, each with `pool_len() / num_queues()` bytes of the pool
    /// (rounded down to 4 KiB), for driving queues from separate threads.
    pub fn split_queues(&mut self) -> Vec<QueueIo<'_>> {
        let timeout = self.timeout;
        let capacity = self.capacity;
        let count = self.queues.len();
        let (mut pool, queues) = self.pool_and_queues();
        let share = (pool.len() / count) & !4095;
        let mut out = Vec::with_capacity(count);
        for (index, queue) in queues.iter_mut().enumerate() {
            let (mine, rest) = pool.split_at_mut(share);
            pool = rest;
            out.push(QueueIo {
                index,
                queue,
                pool: mine,
                timeout,
                capacity,
            });
        }
        out
    }

    /// Timed random I/O on `queue`: `depth` requests of `block_size` bytes
    /// kept in flight for `duration`, offsets uniformly random over the
    /// first `span` bytes (`0` = whole disk). Returns IOPS.
    ///
    /// The pool must hold `depth * block_size` bytes. For more detail
    /// (latency, throughput, warm-up, mixes) use [`QueueIo::run_workload`].
    pub fn random_io(
        &mut self,
        queue: usize,
        direction: Direction,
        block_size: usize,
        depth: usize,
        span: u64,
        duration: Duration,
    ) -> Result<f64> {
        let stats = self.queue(queue).run_workload(&Workload {
            direction,
            block_size,
            depth,
            span,
            duration,
            warmup: Duration::ZERO,
            seed: 0x5eed,
        })?;
        Ok(stats.iops)
    }
}

impl Drop for BlkioClient {
    fn drop(&mut self) {
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}

/// One virtqueue of a [`BlkioClient`] plus a slice of its buffer pool.
///
/// Offsets called `pool_offset` index that slice. Methods that wait return
/// only after all the requests they submitted completed, except on
/// [`ClientError::Timeout`], after which requests may still be in flight and
/// the client should be dropped.
pub struct QueueIo<'a> {
    index: usize,
    queue: &'a mut Blkioq,
    pool: &'a mut [u8],
    timeout: Duration,
    capacity: u64,
}

impl QueueIo<'_> {
    /// Index of this virtqueue.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// This queue's part of the buffer pool. Do not touch bytes of requests
    /// still in flight.
    pub fn pool(&mut self) -> &mut [u8] {
        self.pool
    }

    fn buffer_ptr(&mut self, pool_offset: usize, len: usize) -> *mut u8 {
        assert!(
            pool_offset
                .checked_add(len)
                .is_some_and(|end| end <= self.pool.len()),
            "buffer {pool_offset:#x}+{len:#x} beyond this queue's {:#x}-byte pool",
            self.pool.len()
        );
        self.pool[pool_offset..].as_mut_ptr()
    }

    /// Queue (not yet submit) a read of `len` bytes at disk `offset` into
    /// the pool at `pool_offset`. [`QueueIo::reap`] submits and waits.
    pub fn submit_read(&mut self, offset: u64, pool_offset: usize, len: usize, user_data: usize) {
        let buf = self.buffer_ptr(pool_offset, len);
        self.queue
            .read(offset, buf, len, user_data, ReqFlags::empty());
    }

    /// Queue a write of `len` bytes at disk `offset` from the pool at
    /// `pool_offset`.
    pub fn submit_write(&mut self, offset: u64, pool_offset: usize, len: usize, user_data: usize) {
        let buf = self.buffer_ptr(pool_offset, len);
        self.queue
            .write(offset, buf, len, user_data, ReqFlags::empty());
    }

    /// Queue a flush.
    pub fn submit_flush(&mut self, user_data: usize) {
        self.queue.flush(user_data, ReqFlags::empty());
    }

    /// Queue a discard of `len` bytes at `offset`.
    pub fn submit_discard(&mut self, offset: u64, len: u64, user_data: usize) {
        self.queue
            .discard(offset, len, user_data, ReqFlags::empty());
    }

    /// Queue a write-zeroes of `len` bytes at `offset` (the device may unmap
    /// unless `no_unmap`).
    pub fn submit_write_zeroes(&mut self, offset: u64, len: u64, no_unmap: bool, user_data: usize) {
        let flags = if no_unmap {
            ReqFlags::NO_UNMAP
        } else {
            ReqFlags::empty()
        };
        self.queue.write_zeroes(offset, len, user_data, flags);
    }

    /// Submit everything queued and wait for at least `min` completions
    /// (and at most `max`), up to the client's timeout.
    pub fn reap(&mut self, min: usize, max: usize) -> Result<Vec<Done>> {
        let max = max.max(min).max(1);
        let mut slots: Vec<MaybeUninit<Completion>> =
            (0..max).map(|_| MaybeUninit::uninit()).collect();
        let mut timeout = self.timeout;
        let n = self
            .queue
            .do_io(&mut slots, min, Some(&mut timeout), None)
            .map_err(|e| {
                if e.errno() == blkio::Errno::TIME {
                    ClientError::Timeout {
                        what: format!("completions on queue {}", self.index),
                        completed: 0,
                        expected: min,
                    }
                } else {
                    ClientError::blkio("do_io", e)
                }
            })?;
        Ok(slots[..n]
            .iter()
            .map(|slot| {
                // SAFETY: do_io initialised the first `n` entries.
                let c = unsafe { slot.assume_init_ref() };
                Done {
                    user_data: c.user_data,
                    ret: c.ret,
                }
            })
            .collect())
    }

    /// Submit everything queued and wait until exactly `count` requests
    /// completed; returns them all (successful or not).
    pub fn wait_all(&mut self, count: usize, what: &str) -> Result<Vec<Done>> {
        let mut done = Vec::with_capacity(count);
        while done.len() < count {
            match self.reap(1, count - done.len()) {
                Ok(more) => done.extend(more),
                Err(ClientError::Timeout { .. }) => {
                    return Err(ClientError::Timeout {
                        what: what.to_string(),
                        completed: done.len(),
                        expected: count,
                    })
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn one(&mut self, op: String) -> Result<()> {
        let done = self.wait_all(1, &op)?;
        match done[0].ret {
            0 => Ok(()),
            ret => Err(ClientError::Request { op, errno: -ret }),
        }
    }

    /// Read `len` bytes at disk `offset` into the pool at `pool_offset`.
    pub fn read_into_pool(&mut self, offset: u64, pool_offset: usize, len: usize) -> Result<()> {
        self.submit_read(offset, pool_offset, len, 0);
        self.one(format!("read {len} bytes at {offset:#x}"))
    }

    /// Write `len` bytes from the pool at `pool_offset` to disk `offset`.
    pub fn write_from_pool(&mut self, offset: u64, pool_offset: usize, len: usize) -> Result<()> {
        self.submit_write(offset, pool_offset, len, 0);
        self.one(format!("write {len} bytes at {offset:#x}"))
    }

    /// Read `len` bytes at disk `offset` (through the start of the pool).
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.pool[..len].fill(0xa5);
        self.read_into_pool(offset, 0, len)?;
        Ok(self.pool[..len].to_vec())
    }

    /// Write `data` at disk `offset` (through the start of the pool).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.pool[..data.len()].copy_from_slice(data);
        self.write_from_pool(offset, 0, data.len())
    }

    /// Flush the device's write cache.
    pub fn flush(&mut self) -> Result<()> {
        self.submit_flush(0);
        self.one("flush".to_string())
    }

    /// Discard `len` bytes at `offset`.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.submit_discard(offset, len, 0);
        self.one(format!("discard {len} bytes at {offset:#x}"))
    }

    /// Make `len` bytes at `offset` read as zeroes (the device may unmap).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.submit_write_zeroes(offset, len, false, 0);
        self.one(format!("write-zeroes {len} bytes at {offset:#x}"))
    }

    /// Write `block_size`-byte blocks number `blocks` (disk offset
    /// `block * block_size`) with [`fill_pattern`] content for `seed`,
    /// keeping up to `depth` requests in flight.
    pub fn write_pattern(
        &mut self,
        blocks: &[u64],
        block_size: usize,
        depth: usize,
        seed: u64,
    ) -> Result<()> {
        self.pipeline(blocks, block_size, depth, seed, true)
    }

    /// Read blocks `blocks` back at queue depth `depth` and compare each with
    /// [`fill_pattern`] for `seed`; the error names the first wrong block.
    pub fn verify_pattern(
        &mut self,
        blocks: &[u64],
        block_size: usize,
        depth: usize,
        seed: u64,
    ) -> Result<()> {
        self.pipeline(blocks, block_size, depth, seed, false)
    }

    /// Sliding-window pattern I/O: `depth` pool slots of `block_size`; each
    /// completion frees its slot for the next block.
    fn pipeline(
        &mut self,
        blocks: &[u64],
        block_size: usize,
        depth: usize,
        seed: u64,
        write: bool,
    ) -> Result<()> {
        let depth = depth.clamp(1, blocks.len().max(1));
        assert!(
            depth * block_size <= self.pool.len(),
            "queue depth {depth} x {block_size} bytes exceeds this queue's {}-byte pool",
            self.pool.len()
        );
        let what = if write {
            "pattern write"
        } else {
            "pattern read"
        };
        // slot -> index into `blocks` of the request using it
        let mut slot_block = vec![0usize; depth];
        let mut free: Vec<usize> = (0..depth).rev().collect();
        let mut next = 0;
        let mut in_flight = 0;
        let mut expected = vec![0u8; block_size];
        while next < blocks.len() || in_flight > 0 {
            while next < blocks.len() {
                let Some(slot) = free.pop() else { break };
                let block = blocks[next];
                let range = slot * block_size..(slot + 1) * block_size;
                let offset = block * block_size as u64;
                if write {
                    fill_pattern(block, seed, &mut self.pool[range]);
                    self.submit_write(offset, slot * block_size, block_size, slot);
                } else {
                    self.pool[range].fill(0xa5);
                    self.submit_read(offset, slot * block_size, block_size, slot);
                }
                slot_block[slot] = next;
                next += 1;
                in_flight += 1;
            }
            let done = match self.reap(1, in_flight) {
                Err(ClientError::Timeout { .. }) => {
                    return Err(ClientError::Timeout {
                        what: format!("{what} on queue {}", self.index),
                        completed: next - in_flight,
                        expected: blocks.len(),
                    })
                }
                other => other?,
            };
            in_flight -= done.len();
            let mut failure = None;
            for d in done {
                let slot = d.user_data;
                free.push(slot);
                if failure.is_some() {
                    continue;
                }
                let block = blocks[slot_block[slot]];
                let offset = block * block_size as u64;
                if d.ret != 0 {
                    failure = Some(ClientError::Request {
                        op: format!("{what} of {block_size} bytes at {offset:#x}"),
                        errno: -d.ret,
                    });
                } else if !write {
                    fill_pattern(block, seed, &mut expected);
                    let got = &self.pool[slot * block_size..(slot + 1) * block_size];
                    if got != &expected[..] {
                        let detail = describe_mismatch(got, &expected, seed);
                        failure = Some(ClientError::Mismatch { offset, detail });
                    }
                }
            }
            if let Some(failure) = failure {
                // Let the others finish so no request outlives the call.
                let _ = self.wait_all(in_flight, what);
                return Err(failure);
            }
        }
        Ok(())
    }

    /// Run a timed closed-loop random workload (see [`Workload`]) and report
    /// what it achieved. Needs `depth * block_size` bytes of pool. Written
    /// data is whatever the pool holds (filled with a non-zero pattern
    /// first); reads are not verified.
    pub fn run_workload(&mut self, w: &Workload) -> Result<IoStats> {
        assert!(w.depth > 0 && w.block_size > 0, "empty workload {w:?}");
        assert!(
            w.depth * w.block_size <= self.pool.len(),
            "queue depth {} x {} bytes exceeds this queue's {}-byte pool",
            w.depth,
            w.block_size,
            self.pool.len()
        );
        let span = if w.span == 0 { self.capacity } else { w.span };
        let blocks = span / w.block_size as u64;
        assert!(blocks > 0, "span {span} smaller than one block");
        fill_pattern(!0, w.seed, &mut self.pool[..w.depth * w.block_size]);
        let read_percent = match w.direction {
            Direction::Read => 100,
            Direction::Write => 0,
            Direction::Mixed { read_percent } => u64::from(read_percent.min(100)),
        };

        let mut rng = XorShift::new(w.seed);
        let mut submitted_at = vec![Instant::now(); w.depth];
        let mut is_read = vec![false; w.depth];
        let bs = w.block_size;
        // Queue one random request in `slot`; returns whether it reads.
        let submit = |q: &mut QueueIo<'_>, slot: usize, rng: &mut XorShift| {
            let offset = rng.below(blocks) * bs as u64;
            let read = rng.below(100) < read_percent;
            if read {
                q.submit_read(offset, slot * bs, bs, slot);
            } else {
                q.submit_write(offset, slot * bs, bs, slot);
            }
            read
        };
        for (slot, read) in is_read.iter_mut().enumerate() {
            *read = submit(self, slot, &mut rng);
        }
        let mut in_flight = w.depth;

        let mut slots: Vec<MaybeUninit<Completion>> =
            (0..w.depth).map(|_| MaybeUninit::uninit()).collect();
        let begin = Instant::now();
        let measure_from = begin + w.warmup;
        let end = measure_from + w.duration;
        let (mut ops, mut reads, mut latency) = (0u64, 0u64, Duration::ZERO);
        let mut measuring = w.warmup.is_zero();
        let mut started = begin;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if !measuring && now >= measure_from {
                measuring = true;
                started = now;
            }
            let mut timeout = self.timeout;
            let n = self
                .queue
                .do_io(&mut slots, 1, Some(&mut timeout), None)
                .map_err(|e| {
                    if e.errno() == blkio::Errno::TIME {
                        ClientError::Timeout {
                            what: format!("random I/O on queue {}", self.index),
                            completed: ops as usize,
                            expected: ops as usize + w.depth,
                        }
                    } else {
                        ClientError::blkio("do_io", e)
                    }
                })?;
            in_flight -= n;
            let reaped = Instant::now();
            let mut failure = None;
            for slot in &slots[..n] {
                // SAFETY: do_io initialised the first `n` entries.
                let c = unsafe { slot.assume_init_ref() };
                let (slot, ret) = (c.user_data, c.ret);
                if ret != 0 {
                    failure.get_or_insert(ClientError::Request {
                        op: format!(
                            "random {} of {bs} bytes",
                            if is_read[slot] { "read" } else { "write" }
                        ),
                        errno: -ret,
                    });
                }
                if failure.is_some() {
                    continue;
                }
                if measuring {
                    ops += 1;
                    reads += u64::from(is_read[slot]);
                    latency += reaped - submitted_at[slot];
                }
                is_read[slot] = submit(self, slot, &mut rng);
                submitted_at[slot] = Instant::now();
                in_flight += 1;
            }
            if let Some(failure) = failure {
                let _ = self.wait_all(in_flight, "random I/O drain");
                return Err(failure);
            }
        }
        let elapsed = started.elapsed();
        // Drain what is still in flight so no request outlives the call.
        self.wait_all(in_flight, "random I/O drain")?;
        Ok(IoStats {
            ops,
            reads,
            bytes: ops * bs as u64,
            elapsed,
            iops: ops as f64 / elapsed.as_secs_f64(),
            mean_latency_us: if ops == 0 {
                0.0
            } else {
                latency.as_secs_f64() * 1e6 / ops as f64
            },
        })
    }
}

fn describe_mismatch(got: &[u8], expected: &[u8], seed: u64) -> String {
    let first = got
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let word = |buf: &[u8]| {
        let start = first & !7;
        let end = (start + 8).min(buf.len());
        let mut bytes = [0u8; 8];
        bytes[..end - start].copy_from_slice(&buf[start..end]);
        u64::from_le_bytes(bytes)
    };
    let found = match pattern_origin(got, seed) {
        Some(block) => format!("content is block {block}'s pattern"),
        None if got.iter().all(|&b| b == 0) => "block reads as all zeroes".to_string(),
        None if got.iter().all(|&b| b == 0xa5) => {
            "buffer untouched (0xa5 filler): no data transferred".to_string()
        }
        None => "content matches no block of this seed".to_string(),
    };
    format!(
        "first difference at byte {first}: expected word {:#018x}, found {:#018x}; {found}",
        word(expected),
        word(got)
    )
}

/// Content of block number `block` for `seed`: unique per block and seed,
/// so a misplaced, stale or foreign block is detected. Every 8-byte word is
/// `mix(block, seed) ^ word_index`.
pub fn fill_pattern(block: u64, seed: u64, buf: &mut [u8]) {
    let base = pattern_base(block, seed);
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let word = base ^ i as u64;
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
}

fn pattern_base(block: u64, seed: u64) -> u64 {
    // splitmix64 finaliser of (block, seed): never 0 for practical inputs,
    // so a pattern block never reads as zeroes.
    let mut z = block
        .wrapping_add(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(0x6a09_e667_f3bc_c909);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// If `buf` holds a complete [`fill_pattern`] block for `seed`, which
/// block? (Found by trying every block number below 2^20; for diagnosing
/// misplaced data.)
pub fn pattern_origin(buf: &[u8], seed: u64) -> Option<u64> {
    if buf.len() < 8 {
        return None;
    }
    let first = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    let block = (0..1u64 << 20).find(|&b| pattern_base(b, seed) == first)?;
    let mut expected = vec![0u8; buf.len()];
    fill_pattern(block, seed, &mut expected);
    (expected == buf).then_some(block)
}

/// Check a whole image (e.g. the file behind the device, read directly)
/// against the pattern: every block in `blocks` must hold its
/// [`fill_pattern`] for `seed`. Returns the first wrong block's error.
pub fn verify_image_blocks(
    image: &[u8],
    blocks: &[u64],
    block_size: usize,
    seed: u64,
) -> Result<()> {
    let mut expected = vec![0u8; block_size];
    for &block in blocks {
        let offset = block * block_size as u64;
        let start = offset as usize;
        let Some(got) = image.get(start..start + block_size) else {
            return Err(ClientError::Mismatch {
                offset,
                detail: format!("image is only {} bytes long", image.len()),
            });
        };
        fill_pattern(block, seed, &mut expected);
        if got != &expected[..] {
            return Err(ClientError::Mismatch {
                offset,
                detail: describe_mismatch(got, &expected, seed),
            });
        }
    }
    Ok(())
}

/// `count` distinct pseudo-random block numbers below `total`, a
/// deterministic function of `seed`.
pub fn random_blocks(total: u64, count: usize, seed: u64) -> Vec<u64> {
    assert!(
        count as u64 <= total,
        "{count} distinct blocks out of {total}"
    );
    let mut all: Vec<u64> = (0..total).collect();
    let mut rng = XorShift::new(seed);
    // Partial Fisher-Yates: the first `count` entries end up a random sample.
    for i in 0..count {
        let j = i + rng.below(total - i as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(count);
    all
}

/// xorshift64*: tiny, fast and deterministic; good enough for offsets.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(pattern_base(seed, 0x0123_4567) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-enough value in `[0, n)`.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}
