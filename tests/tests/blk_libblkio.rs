//! libblkio (a vhost-user-blk client we did not write) against the agent:
//! data integrity, flush, discard, write-zeroes, errors, multiqueue,
//! reconnect, read-only disks and several disks in one process. The
//! write/verify test also runs against qemu-storage-daemon, proving the
//! client wrapper itself is right.

use std::path::{Path, PathBuf};

use vhost_agent_tests::blkio_client::{fill_pattern, random_blocks, BlkioClient};
use vhost_agent_tests::frontend::{TestFrontend, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_OUT};
use vhost_agent_tests::qemu::{spawn_qemu_storage_daemon, QsdOptions};
use vhost_agent_tests::support::{create_image, spawn_agent, ChildGuard};
use vm_memory::{Bytes, GuestAddress};

const BLOCK: usize = 4096;
const DEPTH: usize = 32;
const IMAGE_SIZE: u64 = 64 << 20;

struct Disk {
    dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
}

fn disk(name: &str) -> Disk {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("{name}.img"));
    let socket = dir.path().join(format!("{name}.sock"));
    create_image(&image, IMAGE_SIZE).unwrap();
    Disk { dir, image, socket }
}

fn agent(disks: &[(&Disk, &str)]) -> ChildGuard {
    let specs: Vec<String> = disks
        .iter()
        .map(|(d, extra)| {
            format!(
                "socket={},image={}{extra}",
                d.socket.display(),
                d.image.display()
            )
        })
        .collect();
    let log = disks[0].0.dir.path().join("agent.log");
    spawn_agent(&specs, &[], Some(&log))
}

fn connect(socket: &Path, queues: usize) -> BlkioClient {
    BlkioClient::connect(socket, queues, DEPTH * BLOCK).unwrap_or_else(|e| panic!("{e}"))
}

/// Every written block is in the image file at the right place.
fn assert_image_has(image: &Path, blocks: &[u64], seed: u64) {
    let contents = std::fs::read(image).unwrap();
    let mut expected = vec![0u8; BLOCK];
    for &block in blocks {
        fill_pattern(block, seed, &mut expected);
        let at = block as usize * BLOCK;
        assert!(
            contents[at..at + BLOCK] == expected[..],
            "image file block {block} differs"
        );
    }
}

fn write_verify_4000_random_blocks(socket: &Path, image: &Path) {
    let mut client = connect(socket, 1);
    assert_eq!(client.capacity(), IMAGE_SIZE);
    let blocks = random_blocks(IMAGE_SIZE / BLOCK as u64, 4000, 7);
    client.write_blocks(0, &blocks, BLOCK, DEPTH, 7).unwrap();
    client.verify_blocks(0, &blocks, BLOCK, DEPTH, 7).unwrap();
    client.flush(0).unwrap();
    drop(client);
    assert_image_has(image, &blocks, 7);
}

#[test]
fn pattern_write_read_back_over_4000_random_blocks() {
    let d = disk("a");
    let _agent = agent(&[(&d, "")]);
    write_verify_4000_random_blocks(&d.socket, &d.image);
}

#[test]
fn pattern_write_read_back_with_o_direct_and_thread_pool_engine() {
    let d = disk("a");
    let _agent = agent(&[(&d, ",direct,engine=threads")]);
    write_verify_4000_random_blocks(&d.socket, &d.image);
}

#[test]
fn control_pattern_write_read_back_on_qemu_storage_daemon() {
    let d = disk("qsd");
    let _qsd = spawn_qemu_storage_daemon(
        &d.image,
        &d.socket,
        &QsdOptions::default(),
        &d.dir.path().join("qsd.log"),
    );
    write_verify_4000_random_blocks(&d.socket, &d.image);
}

#[test]
fn flush_succeeds() {
    let d = disk("a");
    let _agent = agent(&[(&d, "")]);
    let mut client = connect(&d.socket, 1);
    client.write_blocks(0, &[3], BLOCK, 1, 1).unwrap();
    client.flush(0).unwrap();
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    let d = disk("a");
    let _agent = agent(&[(&d, "")]);
    let mut client = connect(&d.socket, 1);
    let blocks: Vec<u64> = (0..32).collect();
    client.write_blocks(0, &blocks, BLOCK, DEPTH, 3).unwrap();

    client
        .write_zeroes(0, 4 * BLOCK as u64, 4 * BLOCK as u64)
        .unwrap();
    client
        .discard(0, 16 * BLOCK as u64, 4 * BLOCK as u64)
        .unwrap();
    client.flush(0).unwrap();

    for block in 0..32u64 {
        client.read(0, block * BLOCK as u64, 0, BLOCK).unwrap();
        let data = &client.buffers()[..BLOCK];
        if (4..8).contains(&block) || (16..20).contains(&block) {
            assert!(
                data.iter().all(|&b| b == 0),
                "block {block} should read back zeroes"
            );
        } else {
            let mut expected = vec![0u8; BLOCK];
            fill_pattern(block, 3, &mut expected);
            assert!(
                data == &expected[..],
                "neighbour block {block} was disturbed"
            );
        }
    }
}

#[test]
fn out_of_range_read_fails_and_the_agent_keeps_serving() {
    let d = disk("a");
    let mut agent = agent(&[(&d, "")]);
    let mut client = connect(&d.socket, 1);
    let err = client
        .read(0, IMAGE_SIZE, 0, BLOCK)
        .expect_err("read past the end must fail");
    assert!(err.contains("failed"), "{err}");
    let err = client
        .read(0, IMAGE_SIZE - 512, 0, BLOCK)
        .expect_err("read straddling the end must fail");
    assert!(err.contains("failed"), "{err}");
    client.write_blocks(0, &[5, 9], BLOCK, 2, 11).unwrap();
    client.verify_blocks(0, &[5, 9], BLOCK, 2, 11).unwrap();
    assert!(agent.child.try_wait().unwrap().is_none(), "agent exited");
}

#[test]
fn multiqueue_four_queues_all_serve() {
    let d = disk("a");
    let _agent = agent(&[(&d, ",num-queues=4")]);
    let mut client = connect(&d.socket, 4);
    assert_eq!(client.num_queues(), 4);
    let blocks = random_blocks(IMAGE_SIZE / BLOCK as u64, 2000, 5);
    for (queue, share) in blocks.chunks(500).enumerate() {
        client.write_blocks(queue, share, BLOCK, DEPTH, 5).unwrap();
    }
    // Read each share back through a different queue than wrote it.
    for (queue, share) in blocks.chunks(500).enumerate() {
        client
            .verify_blocks((queue + 1) % 4, share, BLOCK, DEPTH, 5)
            .unwrap();
    }
    drop(client);
    assert_image_has(&d.image, &blocks, 5);
}

#[test]
fn client_disconnect_and_reconnect_keeps_data() {
    let d = disk("a");
    let _agent = agent(&[(&d, "")]);
    let mut written: Vec<u64> = Vec::new();
    for round in 0..4u64 {
        let mut client = connect(&d.socket, 1);
        // Everything from earlier connections is still there.
        for &block in &written {
            client
                .verify_blocks(0, &[block], BLOCK, 1, block / 100)
                .unwrap();
        }
        let blocks: Vec<u64> = (0..50).map(|i| round * 100 + i).collect();
        for &block in &blocks {
            client
                .write_blocks(0, &[block], BLOCK, 1, block / 100)
                .unwrap();
        }
        written.extend(blocks);
    }
}

#[test]
fn readonly_disk_refuses_writes_and_serves_reads() {
    let d = disk("a");
    let mut pattern = vec![0u8; BLOCK];
    fill_pattern(2, 9, &mut pattern);
    std::fs::write(
        &d.image,
        [
            vec![0u8; 2 * BLOCK],
            pattern.clone(),
            vec![0u8; IMAGE_SIZE as usize - 3 * BLOCK],
        ]
        .concat(),
    )
    .unwrap();
    let _agent = agent(&[(&d, ",readonly")]);
    let mut client = BlkioClient::connect_with(&d.socket, 1, BLOCK, true).unwrap();
    client.verify_blocks(0, &[2], BLOCK, 1, 9).unwrap();
    drop(client);
    // libblkio refuses writes to a read-only disk itself; the test
    // front-end sends one anyway, so the agent's own refusal is exercised.
    let mut frontend = TestFrontend::connect(&d.socket, 1, 16);
    let (_, data, _) = TestFrontend::buffers(0);
    frontend
        .ram
        .mem
        .write_slice(&[0x55u8; BLOCK], GuestAddress(data))
        .unwrap();
    assert_eq!(
        frontend.request(0, 0, VIRTIO_BLK_T_OUT, 0, BLOCK as u32),
        Some(VIRTIO_BLK_S_IOERR)
    );
    drop(frontend);
    assert!(
        std::fs::read(&d.image).unwrap()[..BLOCK]
            .iter()
            .all(|&b| b == 0),
        "read-only image was modified"
    );
}

#[test]
fn two_disks_in_one_agent_serve_independently() {
    let (a, b) = (disk("a"), disk("b"));
    let _agent = agent(&[(&a, ",serial=disk-a"), (&b, ",serial=disk-b")]);
    let mut client_a = connect(&a.socket, 1);
    let mut client_b = connect(&b.socket, 1);
    let blocks: Vec<u64> = (0..64).collect();
    client_a
        .write_blocks(0, &blocks, BLOCK, DEPTH, 100)
        .unwrap();
    client_b
        .write_blocks(0, &blocks, BLOCK, DEPTH, 200)
        .unwrap();
    client_a
        .verify_blocks(0, &blocks, BLOCK, DEPTH, 100)
        .unwrap();
    client_b
        .verify_blocks(0, &blocks, BLOCK, DEPTH, 200)
        .unwrap();
    drop((client_a, client_b));
    assert_image_has(&a.image, &blocks, 100);
    assert_image_has(&b.image, &blocks, 200);
}
