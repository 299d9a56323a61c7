//! Device state transfer (SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE): the
//! agent-side state QEMU does not know (net: RSS, MTU, MAC) goes through
//! QEMU's pipe. The pipe is served on a thread of its own, since the
//! front-end reads or writes it only after the reply; CHECK joins it.

use std::fs::File;
use std::io::{Read, Write};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};

use super::{Session, SessionError};
use crate::vhost_user::requests::feature;

/// The largest device state we read (the real one is a few hundred bytes).
const MAX_STATE_BYTES: u64 = 1 << 20;

/// A device state transfer in progress.
pub(super) enum Transfer {
    /// Writing a saved state of this many bytes.
    Save(JoinHandle<std::io::Result<()>>, u64),
    Load(JoinHandle<std::io::Result<Vec<u8>>>),
}

impl Session {
    /// SET_DEVICE_STATE_FD: start saving or loading through `fd`.
    pub(super) fn transfer_start(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> Result<(), SessionError> {
        if self.device.protocol_features() & feature::mask(feature::DEVICE_STATE) == 0 {
            return Err(SessionError::Unsupported("SET_DEVICE_STATE_FD"));
        }
        if !matches!(phase, VhostTransferStatePhase::STOPPED) {
            return Err(SessionError::Unsupported(
                "device state transfer outside the stopped phase",
            ));
        }
        if self.transfer.is_some() {
            log::warn!(
                "{}: a new device state transfer replaces one that was never checked",
                self.name
            );
        }
        let spawn_error = |e: std::io::Error| SessionError::Transfer(e.to_string());
        let name = format!("{}-state", self.name);
        self.transfer = Some(match direction {
            VhostTransferStateDirection::SAVE => {
                let state = self.device.save_state()?;
                log::info!("{}: saving device state ({} bytes)", self.name, state.len());
                let bytes = state.len() as u64;
                Transfer::Save(
                    std::thread::Builder::new()
                        .name(name)
                        .spawn(move || {
                            let mut fd = fd;
                            fd.write_all(&state)
                        })
                        .map_err(spawn_error)?,
                    bytes,
                )
            }
            VhostTransferStateDirection::LOAD => Transfer::Load(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || {
                        let mut bytes = Vec::new();
                        fd.take(MAX_STATE_BYTES + 1).read_to_end(&mut bytes)?;
                        if bytes.len() as u64 > MAX_STATE_BYTES {
                            return Err(std::io::Error::other("device state larger than 1 MiB"));
                        }
                        Ok(bytes)
                    })
                    .map_err(spawn_error)?,
            ),
        });
        Ok(())
    }

    /// CHECK_DEVICE_STATE: the transfer finished; a loaded state is taken
    /// and what it changes is applied. A transfer that worked goes on the
    /// timeline (`device-state-saved` / `-loaded`), so an orchestrator
    /// sees when the state moved.
    pub(super) fn transfer_check(&mut self) -> Result<(), SessionError> {
        let joined = |r: std::thread::Result<std::io::Result<()>>| match r {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("the transfer thread panicked".to_string()),
        };
        let result = match self.transfer.take() {
            None => Err("no device state transfer was started".to_string()),
            Some(Transfer::Save(thread, bytes)) => {
                joined(thread.join()).map(|()| self.metrics.device_state(true, bytes))
            }
            Some(Transfer::Load(thread)) => match thread.join() {
                Ok(Ok(bytes)) => self
                    .device
                    .load_state(&bytes)
                    .map(|()| self.metrics.device_state(false, bytes.len() as u64))
                    .map_err(|e| crate::error_chain(&e)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("the transfer thread panicked".to_string()),
            },
        };
        if let Err(e) = result {
            log::error!("{}: device state transfer failed: {e}", self.name);
            return Err(SessionError::Transfer(e));
        }
        self.reconcile(None)
    }
}
