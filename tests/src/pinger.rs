//! An ICMP echo pinger on a raw socket inside a test's namespace: one echo
//! request every `interval`, each reply timed, and the longest stretch
//! without replies reported. For proving a guest kept answering through
//! something the host did (a live migration), with exact timestamps and
//! without depending on (and parsing the output of) another `ping`.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// ICMP types (RFC 792).
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
/// Payload bytes of each request, as `ping`'s default.
const PAYLOAD_LEN: usize = 56;

/// One answered request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Index of the request (0 for the first sent).
    pub index: usize,
    /// When the request went out.
    pub sent_at: Instant,
    /// When its reply came back.
    pub received_at: Instant,
}

/// State the sender and receiver threads share.
#[derive(Default)]
struct Shared {
    sent: Mutex<Vec<Instant>>,
    replies: Mutex<Vec<Reply>>,
}

/// The result of a [`Pinger`] run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingReport {
    /// Requests sent.
    pub sent: usize,
    /// Distinct requests answered.
    pub received: usize,
    /// The longest time between two consecutive replies (by arrival),
    /// counting from the first reply to the end of the run: a guest that
    /// stopped answering for good shows up as a gap up to the end.
    pub longest_gap: Duration,
    /// When that gap began, from the start of the run.
    pub longest_gap_start: Duration,
    /// The whole run.
    pub duration: Duration,
    /// The slowest reply's round trip.
    pub max_rtt: Duration,
}

impl std::fmt::Display for PingReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} echo requests answered in {:.1?}; longest gap {} ms (from {:.2?}), max rtt {} ms",
            self.received,
            self.sent,
            self.duration,
            self.longest_gap.as_millis(),
            self.longest_gap_start,
            self.max_rtt.as_millis()
        )
    }
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request with `id` and `seq`.
fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![0u8; 8 + PAYLOAD_LEN];
    p[0] = ICMP_ECHO_REQUEST;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in p[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The sequence number of an echo reply from `from` with `id` in the IPv4
/// packet `packet` (a raw ICMP socket receives the IP header too).
fn parse_reply(packet: &[u8], from: Ipv4Addr, id: u16) -> Option<u16> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    let src = Ipv4Addr::new(
        *packet.get(12)?,
        *packet.get(13)?,
        *packet.get(14)?,
        *packet.get(15)?,
    );
    let icmp = packet.get(ihl..)?;
    if src != from || icmp.len() < 8 || icmp[0] != ICMP_ECHO_REPLY {
        return None;
    }
    if u16::from_be_bytes([icmp[4], icmp[5]]) != id {
        return None;
    }
    Some(u16::from_be_bytes([icmp[6], icmp[7]]))
}

/// A raw ICMP socket created inside `ns`, with a receive timeout so the
/// receiver can notice a stop.
fn raw_icmp_socket(ns: &Netns) -> OwnedFd {
    ns.run_in(|| {
        // SAFETY: socket(2) takes no pointers; the fd is checked below and
        // owned by the OwnedFd from then on.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        assert!(
            fd >= 0,
            "raw ICMP socket: {} (the net tests run as root)",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a socket we just created and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        set_receive_timeout(&fd);
        fd
    })
}

/// Give a raw socket a 100 ms receive timeout, so its reader can notice
/// when it should stop.
pub(crate) fn set_receive_timeout(fd: &OwnedFd) {
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: the option value is a valid timeval that outlives the call,
    // and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
}

/// Pings one address at a fixed interval until stopped.
pub struct Pinger {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Pinger {
    /// Start pinging `target` from inside `ns` every `interval`.
    pub fn start(ns: &Netns, target: Ipv4Addr, interval: Duration) -> Pinger {
        let socket = Arc::new(raw_icmp_socket(ns));
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        // Unique enough among this host's pingers; the namespace is ours anyway.
        let id = (std::process::id() & 0xffff) as u16;
        let started = Instant::now();

        let sender = {
            let (socket, shared, stop) = (socket.clone(), shared.clone(), stop.clone());
            std::thread::spawn(move || {
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(target).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                let mut next = Instant::now();
                let mut index: usize = 0;
                while !stop.load(Ordering::Relaxed) {
                    let packet = echo_request(id, index as u16);
                    shared.sent.lock().expect("sent lock").push(Instant::now());
                    // SAFETY: `packet` and `addr` are valid for the lengths
                    // passed and outlive the call. A failed send (e.g. no
                    // route yet) is a lost ping, which the report shows.
                    unsafe {
                        libc::sendto(
                            socket.as_raw_fd(),
                            packet.as_ptr().cast(),
                            packet.len(),
                            0,
                            (&addr as *const libc::sockaddr_in).cast(),
                            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                        );
                    }
                    index += 1;
                    next += interval;
                    // Keep the schedule: a late wake-up does not shift the
                    // requests after it.
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
        };

        let receiver = {
            let (socket, shared, stop) = (socket, shared.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                let mut seen = std::collections::HashSet::new();
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: `buf` is valid for writes of its length for the
                    // whole call.
                    let n = unsafe {
                        libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    let received_at = Instant::now();
                    let Ok(n) = usize::try_from(n) else {
                        continue; // timeout (EAGAIN) or EINTR
                    };
                    let Some(seq) = parse_reply(&buf[..n], target, id) else {
                        continue;
                    };
                    let sent = shared.sent.lock().expect("sent lock");
                    // The newest request with this 16-bit sequence number.
                    let Some(index) = (0..sent.len()).rev().find(|&i| i as u16 == seq) else {
                        continue;
                    };
                    let sent_at = sent[index];
                    drop(sent);
                    if seen.insert(index) {
                        shared.replies.lock().expect("replies lock").push(Reply {
                            index,
                            sent_at,
                            received_at,
                        });
                    }
                }
            })
        };

        Pinger {
            shared,
            stop,
            threads: vec![sender, receiver],
            started,
        }
    }

    /// Replies so far to requests sent at or after `since`.
    pub fn replies_since(&self, since: Instant) -> usize {
        self.shared
            .replies
            .lock()
            .expect("replies lock")
            .iter()
            .filter(|r| r.sent_at >= since)
            .count()
    }

    /// Wait until `count` requests sent at or after `since` were answered;
    /// Err after `timeout`.
    pub fn wait_replies_since(
        &self,
        since: Instant,
        count: usize,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.replies_since(since);
            if n >= count {
                return Ok(since.elapsed());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{n} of {count} echo replies within {timeout:?} ({} requests sent so far)",
                    self.shared.sent.lock().expect("sent lock").len()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop and report.
    pub fn stop(mut self) -> PingReport {
        // Before the joins: the receiver may sit in a recv timeout.
        let ended = Instant::now();
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let sent = self.shared.sent.lock().expect("sent lock").len();
        let mut replies = self.shared.replies.lock().expect("replies lock").clone();
        replies.retain(|r| r.received_at <= ended);
        replies.sort_by_key(|r| r.received_at);
        let mut longest_gap = Duration::ZERO;
        let mut longest_gap_start = Duration::ZERO;
        let arrivals: Vec<Instant> = replies
            .iter()
            .map(|r| r.received_at)
            .chain(std::iter::once(ended))
            .collect();
        if replies.is_empty() {
            longest_gap = ended - self.started;
        } else {
            for pair in arrivals.windows(2) {
                let gap = pair[1] - pair[0];
                if gap > longest_gap {
                    longest_gap = gap;
                    longest_gap_start = pair[0] - self.started;
                }
            }
        }
        PingReport {
            sent,
            received: replies.len(),
            longest_gap,
            longest_gap_start,
            duration: ended - self.started,
            max_rtt: replies
                .iter()
                .map(|r| r.received_at - r.sent_at)
                .max()
                .unwrap_or_default(),
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_request_verifies_to_zero() {
        let p = echo_request(0x1234, 7);
        assert_eq!(checksum(&p), 0);
    }

    #[test]
    fn parse_reply_matches_source_id_and_type() {
        let mut packet = vec![0x45u8; 20];
        packet[12..16].copy_from_slice(&[10, 77, 0, 10]);
        let mut icmp = echo_request(42, 9);
        icmp[0] = ICMP_ECHO_REPLY;
        packet.extend_from_slice(&icmp);
        let guest = Ipv4Addr::new(10, 77, 0, 10);
        assert_eq!(parse_reply(&packet, guest, 42), Some(9));
        assert_eq!(parse_reply(&packet, guest, 43), None);
        assert_eq!(parse_reply(&packet, Ipv4Addr::new(10, 77, 0, 11), 42), None);
        packet[20] = ICMP_ECHO_REQUEST;
        assert_eq!(parse_reply(&packet, guest, 42), None);
    }
}
