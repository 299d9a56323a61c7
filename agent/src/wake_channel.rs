//! How the protocol thread talks to a datapath thread that sleeps in a mio
//! loop (a blk queue worker, a net data path): a command channel plus an
//! eventfd the thread polls. Commands that need an answer carry a reply
//! channel and are waited for ([`WakeSender::call`]); a thread that busy-
//! polls its rings looks at [`WakeReceiver::pending`] instead of the
//! eventfd.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The reply half a command carries.
pub type Reply<T> = mpsc::SyncSender<T>;

/// State both halves share.
#[derive(Debug)]
struct Shared {
    wake: Arc<EventFd>,
    /// Commands sent and not yet taken.
    pending: AtomicUsize,
}

/// The sending half (the protocol thread's).
#[derive(Debug)]
pub struct WakeSender<C> {
    commands: mpsc::Sender<C>,
    shared: Arc<Shared>,
}

impl<C> Clone for WakeSender<C> {
    fn clone(&self) -> Self {
        WakeSender {
            commands: self.commands.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// The thread went away before it took or answered a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the thread is gone")]
pub struct Gone;

impl<C> WakeSender<C> {
    /// Send `command` and wake the thread.
    pub fn send(&self, command: C) -> Result<(), Gone> {
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        if self.commands.send(command).is_err() {
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(Gone);
        }
        // A full counter (impossible: the thread drains it) or a closed fd
        // only means the thread will not sleep on it any more.
        let _ = self.shared.wake.write(1);
        Ok(())
    }

    /// Send the command `make` builds around a reply channel and wait for
    /// the answer.
    pub fn call<T>(&self, make: impl FnOnce(Reply<T>) -> C) -> Result<T, Gone> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(make(reply))?;
        answer.recv().map_err(|_| Gone)
    }

    /// The eventfd, for others that wake the thread (a write fence).
    pub fn eventfd(&self) -> Arc<EventFd> {
        self.shared.wake.clone()
    }
}

/// The receiving half (the datapath thread's).
#[derive(Debug)]
pub struct WakeReceiver<C> {
    commands: mpsc::Receiver<C>,
    shared: Arc<Shared>,
}

impl<C> WakeReceiver<C> {
    /// The fd to register in the thread's poll (readable when woken).
    pub fn fd(&self) -> RawFd {
        self.shared.wake.as_raw_fd()
    }

    /// Clear the wakeup (after the poll reported the fd).
    pub fn clear(&self) {
        let _ = self.shared.wake.read();
    }

    /// The next command, if one waits. `Err(Gone)` once every sender is
    /// gone and nothing is left.
    pub fn try_recv(&self) -> Result<Option<C>, Gone> {
        match self.commands.try_recv() {
            Ok(command) => {
                self.shared.pending.fetch_sub(1, Ordering::SeqCst);
                Ok(Some(command))
            }
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => Err(Gone),
        }
    }

    /// Whether a command waits: cheap enough for a busy-poll loop.
    pub fn pending(&self) -> bool {
        self.shared.pending.load(Ordering::Relaxed) > 0
    }
}

/// A connected pair.
pub fn channel<C>() -> io::Result<(WakeSender<C>, WakeReceiver<C>)> {
    let shared = Arc::new(Shared {
        wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        pending: AtomicUsize::new(0),
    });
    let (commands, receiver) = mpsc::channel();
    Ok((
        WakeSender {
            commands,
            shared: shared.clone(),
        },
        WakeReceiver {
            commands: receiver,
            shared,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_answered_and_pending_follows_the_queue() {
        let (sender, receiver) = channel::<Reply<u32>>().unwrap();
        let thread = std::thread::spawn(move || loop {
            match receiver.try_recv() {
                Ok(Some(reply)) => {
                    assert!(!receiver.pending());
                    reply.send(7).unwrap();
                }
                Ok(None) => std::thread::yield_now(),
                Err(Gone) => return,
            }
        });
        assert_eq!(sender.call(|reply| reply), Ok(7));
        drop(sender);
        thread.join().unwrap();
    }
}
