//! `vhost-agent demo`: the whole path on one machine in a few seconds. A
//! scratch image is served by the agent in this process and driven by
//! libblkio's virtio-blk-vhost-user driver, the same client other
//! applications use; every block written is read back and checked.

use std::mem::MaybeUninit;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use vhost_agent::daemon::bind::bind_blk;
use vhost_agent::daemon::spec::BlkSpec;

/// Options of the demo.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Size of the scratch image in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Number of random 4 KiB blocks to write and verify.
    #[arg(long, default_value_t = 4096)]
    blocks: u64,
}

const BLOCK: usize = 4096;
const QUEUE_DEPTH: usize = 32;

/// Content of block `lba`: unique per block, so a misplaced write shows.
fn pattern(lba: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let word = lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64);
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
}

fn wait_all(queue: &mut Blkioq, count: usize) -> Result<()> {
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..count).map(|_| MaybeUninit::uninit()).collect();
    let mut done = 0;
    while done < count {
        let n = queue
            .do_io(&mut completions[done..], count - done, None, None)
            .context("blkioq_do_io")?;
        for completion in &completions[done..done + n] {
            // SAFETY: do_io initialised the first `n` entries it reports.
            let completion = unsafe { completion.assume_init_ref() };
            ensure!(
                completion.ret == 0,
                "request {} failed with {}",
                completion.user_data,
                completion.ret
            );
        }
        done += n;
    }
    Ok(())
}

/// Run the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    ensure!(args.size_mib >= 1, "--size-mib must be at least 1");
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let image = dir.path().join("demo.img");
    let socket = dir.path().join("demo.sock");
    let size = args.size_mib << 20;
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("creating {}", image.display()))?;
    println!(
        "demo: scratch image {} ({} MiB)",
        image.display(),
        args.size_mib
    );

    let spec: BlkSpec = format!(
        "socket={},image={},serial=demo",
        socket.display(),
        image.display()
    )
    .parse()
    .map_err(anyhow::Error::msg)?;
    let server = bind_blk(&spec, "demo")?.server;
    let shutdown = server.handle();
    let thread = std::thread::spawn(move || server.run());
    println!("demo: agent serving {}", socket.display());

    let result = drive(&socket, size, args.blocks);
    shutdown.shutdown();
    let _ = thread.join();
    let (written, elapsed) = result?;

    // Check the image file itself, independent of the agent.
    let contents = std::fs::read(&image).context("reading the image back")?;
    let mut expected = vec![0u8; BLOCK];
    for &lba in &written {
        pattern(lba, &mut expected);
        let offset = (lba as usize) * BLOCK;
        ensure!(
            contents[offset..offset + BLOCK] == expected[..],
            "image block {lba} differs"
        );
    }
    println!(
        "demo: {} blocks written, read back and verified through libblkio, and found on disk ({:.0} IOPS)",
        written.len(),
        (2 * written.len()) as f64 / elapsed.as_secs_f64()
    );
    println!("demo: PASS");
    Ok(())
}

fn drive(
    socket: &std::path::Path,
    size: u64,
    blocks: u64,
) -> Result<(Vec<u64>, std::time::Duration)> {
    let mut blkio =
        Blkio::new("virtio-blk-vhost-user").context("creating the libblkio instance")?;
    blkio
        .set_str("path", &socket.display().to_string())
        .context("setting path")?;
    blkio
        .connect()
        .context("connecting libblkio to the agent")?;
    blkio
        .set_i32("num-queues", 1)
        .context("setting num-queues")?;
    let mut queues = blkio.start().context("starting libblkio")?.queues;
    let Some(mut queue) = queues.pop() else {
        bail!("libblkio started no queue")
    };
    let capacity = blkio.get_u64("capacity").context("reading capacity")?;
    ensure!(capacity == size, "capacity {capacity} != image size {size}");
    println!("demo: libblkio connected, capacity {capacity} bytes");

    let region = blkio
        .alloc_mem_region(QUEUE_DEPTH * BLOCK)
        .context("allocating I/O buffers")?;
    blkio
        .map_mem_region(&region)
        .context("mapping I/O buffers")?;
    // SAFETY: libblkio allocated `region.len` bytes at `region.addr`, mapped
    // for our exclusive use until free_mem_region below.
    let buffers = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };

    let total_blocks = size / BLOCK as u64;
    let mut lbas: Vec<u64> = (0..total_blocks).collect();
    // A fixed-seed shuffle: random placement, reproducible runs.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for i in (1..lbas.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        lbas.swap(i, (state % (i as u64 + 1)) as usize);
    }
    lbas.truncate(blocks.min(total_blocks) as usize);

    let started = Instant::now();
    for batch in lbas.chunks(QUEUE_DEPTH) {
        for (slot, &lba) in batch.iter().enumerate() {
            let buf = &mut buffers[slot * BLOCK..(slot + 1) * BLOCK];
            pattern(lba, buf);
            queue.write(
                lba * BLOCK as u64,
                buf.as_ptr(),
                BLOCK,
                slot,
                ReqFlags::empty(),
            );
        }
        wait_all(&mut queue, batch.len())?;
    }
    queue.flush(0, ReqFlags::empty());
    wait_all(&mut queue, 1)?;
    let mut expected = vec![0u8; BLOCK];
    for batch in lbas.chunks(QUEUE_DEPTH) {
        for (slot, &lba) in batch.iter().enumerate() {
            let buf = &mut buffers[slot * BLOCK..(slot + 1) * BLOCK];
            buf.fill(0);
            queue.read(
                lba * BLOCK as u64,
                buf.as_mut_ptr(),
                BLOCK,
                slot,
                ReqFlags::empty(),
            );
        }
        wait_all(&mut queue, batch.len())?;
        for (slot, &lba) in batch.iter().enumerate() {
            pattern(lba, &mut expected);
            ensure!(
                buffers[slot * BLOCK..(slot + 1) * BLOCK] == expected[..],
                "block {lba} read back wrong"
            );
        }
    }
    let elapsed = started.elapsed();
    blkio.unmap_mem_region(&region);
    blkio.free_mem_region(&region);
    Ok((lbas, elapsed))
}
