//! The control socket: privacy, batching, limits, shutdown.

use super::*;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream as StdStream;
use std::time::Duration;

use crate::daemon::registry::Registry;

/// A server on a temporary socket, running on its own thread; quit
/// requests arrive on the returned receiver.
fn start() -> (
    tempfile::TempDir,
    PathBuf,
    ControlHandle,
    std::thread::JoinHandle<()>,
    mpsc::Receiver<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let (quit_tx, quit_rx) = mpsc::channel();
    let server = ControlServer::bind(
        &path,
        Arc::new(Devices::new(Arc::new(Registry::new()))),
        Box::new(move || {
            let _ = quit_tx.send(());
        }),
    )
    .unwrap();
    let handle = server.shutdown_handle();
    let thread = std::thread::spawn(move || server.run());
    (dir, path, handle, thread, quit_rx)
}

fn connect(path: &Path) -> (StdStream, BufReader<StdStream>) {
    let stream = StdStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

fn read_line(reader: &mut BufReader<StdStream>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

#[test]
fn the_socket_is_private_and_removed_at_shutdown() {
    let (_dir, path, handle, thread, _quit) = start();
    let metadata = std::fs::symlink_metadata(&path).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o7777, SOCKET_MODE);
    handle.shutdown();
    thread.join().unwrap();
    assert!(!path.exists());
}

/// The socket file is private from bind on, before the chmod that
/// follows: the process umask (022 here, unless the test runner set a
/// stricter one) would have left it readable and executable by all.
#[test]
fn the_socket_file_is_private_from_bind_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bound.sock");
    let _listener = bind_private(&path).unwrap();
    let mode = std::fs::symlink_metadata(&path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "mode {mode:o} lets others in");
}

#[test]
fn a_live_socket_is_not_taken_over() {
    let (_dir, path, handle, thread, _quit) = start();
    let devices = Arc::new(Devices::new(Arc::new(Registry::new())));
    let second = ControlServer::bind(&path, devices, Box::new(|| {}));
    assert!(matches!(second, Err(ListenError::InUse(_))));
    handle.shutdown();
    thread.join().unwrap();
}

#[test]
fn requests_split_and_batched_across_writes_are_all_answered() {
    let (_dir, path, handle, thread, _quit) = start();
    let (mut stream, mut reader) = connect(&path);
    // One request in two pieces, then two in one write, then a blank line.
    stream.write_all(b"{\"execute\": \"query-").unwrap();
    stream.flush().unwrap();
    stream
        .write_all(b"devices\", \"id\": 1}\n{\"id\": 2, \"execute\": \"query-devices\"}\n\n{\"id\": 3, \"execute\": \"x\"}\n")
        .unwrap();
    assert_eq!(read_line(&mut reader), "{\"return\":[],\"id\":1}\n");
    assert_eq!(read_line(&mut reader), "{\"return\":[],\"id\":2}\n");
    assert!(read_line(&mut reader).contains("CommandNotFound"));
    handle.shutdown();
    thread.join().unwrap();
}

#[test]
fn a_line_too_long_closes_only_its_connection() {
    let (_dir, path, handle, thread, _quit) = start();
    let (mut other, mut other_reader) = connect(&path);
    let (mut stream, mut reader) = connect(&path);
    let long = vec![b' '; MAX_LINE_BYTES + 2];
    // The server may close before taking all of it.
    let _ = stream.write_all(&long);
    let line = read_line(&mut reader);
    assert!(line.contains("longer than 1048576 bytes"), "{line}");
    let mut rest = String::new();
    assert!(matches!(reader.read_line(&mut rest), Ok(0) | Err(_)));
    other
        .write_all(b"{\"execute\": \"query-devices\"}\n")
        .unwrap();
    assert_eq!(read_line(&mut other_reader), "{\"return\":[]}\n");
    handle.shutdown();
    thread.join().unwrap();
}

#[test]
fn quit_is_answered_before_the_hook_runs() {
    let (_dir, path, handle, thread, quit) = start();
    let (mut stream, mut reader) = connect(&path);
    stream.write_all(b"{\"execute\": \"quit\"}\n").unwrap();
    assert_eq!(read_line(&mut reader), "{\"return\":{}}\n");
    quit.recv_timeout(Duration::from_secs(10)).unwrap();
    // The server keeps serving until the agent shuts it down.
    stream
        .write_all(b"{\"execute\": \"query-devices\"}\n")
        .unwrap();
    assert_eq!(read_line(&mut reader), "{\"return\":[]}\n");
    handle.shutdown();
    thread.join().unwrap();
}

#[test]
fn a_last_request_without_newline_is_answered() {
    let (_dir, path, handle, thread, _quit) = start();
    let (mut stream, mut reader) = connect(&path);
    stream
        .write_all(b"{\"execute\": \"query-devices\"}")
        .unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_line(&mut reader), "{\"return\":[]}\n");
    assert_eq!(read_line(&mut reader), "");
    handle.shutdown();
    thread.join().unwrap();
}

#[test]
fn clients_beyond_the_limit_are_told_and_closed() {
    let (_dir, path, handle, thread, _quit) = start();
    let mut clients: Vec<_> = (0..MAX_CLIENTS).map(|_| connect(&path)).collect();
    // Each of these is connected and served before the next connects.
    for (stream, reader) in &mut clients {
        stream
            .write_all(b"{\"execute\": \"query-devices\"}\n")
            .unwrap();
        assert_eq!(read_line(reader), "{\"return\":[]}\n");
    }
    let (_extra, mut extra_reader) = connect(&path);
    assert!(read_line(&mut extra_reader).contains("too many control clients"));
    assert_eq!(read_line(&mut extra_reader), "");
    handle.shutdown();
    thread.join().unwrap();
}

#[test]
fn a_removal_is_answered_in_request_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let devices = Arc::new(Devices::new(Arc::new(Registry::new())));
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let socket = dir.path().join("disk.sock");
    let spec = format!(
        "socket={},image={},engine=threads,id=disk",
        socket.display(),
        image.display()
    );
    devices
        .add(
            &crate::daemon::supervisor::DeviceSpec::Blk(spec.parse().unwrap()),
            "blk0",
        )
        .unwrap();
    let server = ControlServer::bind(&path, devices.clone(), Box::new(|| {})).unwrap();
    let handle = server.shutdown_handle();
    let thread = std::thread::spawn(move || server.run());

    let (mut stream, mut reader) = connect(&path);
    stream
        .write_all(
            b"{\"execute\": \"remove-device\", \"arguments\": {\"device\": \"disk\"}}\n\
              {\"execute\": \"query-devices\"}\n",
        )
        .unwrap();
    let (mut other, mut other_reader) = connect(&path);
    other
        .write_all(b"{\"execute\": \"query-commands\"}\n")
        .unwrap();
    assert!(read_line(&mut other_reader).contains("remove-device"));
    // In request order: the removal's reply, then a list without it.
    assert_eq!(read_line(&mut reader), "{\"return\":{\"handed-off\":0}}\n");
    assert_eq!(read_line(&mut reader), "{\"return\":[]}\n");
    assert!(!socket.exists());
    handle.shutdown();
    thread.join().unwrap();
    devices.shut_down();
}

#[test]
fn overlong_socket_paths_are_refused() {
    let long = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
    let error = listen_private(&long).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
}
