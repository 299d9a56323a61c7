//! The requests the agent reads and answers itself: those the request
//! table routes to the agent (the `vhost` crate does not know them, or
//! reads them and answers nothing), and PRESETUP when the in-band bracket
//! claims request 41. Payloads are decoded with the `vhost` crate's
//! message types.

use vhost::vhost_user::message::{VhostUserU64, VhostUserVringState};
use vm_memory::ByteValued;

use super::rings::GetBase;
use super::Session;
use crate::vhost_user::requests::{code, feature};
use crate::vhost_user::wire::Header;

/// How the session answered a request it reads itself.
#[derive(Debug)]
pub enum OwnReply {
    /// Done; acknowledge with this result if the front-end asked for an
    /// ack (REPLY_ACK).
    Ack(bool),
    /// Done; send this reply payload.
    Reply(Vec<u8>),
    /// Failed where the front-end waits for a reply we cannot give: the
    /// connection must go.
    Fail(String),
    /// Nobody handles it.
    Unhandled,
}

fn decode<T: ByteValued>(payload: &[u8]) -> Option<T> {
    T::from_slice(payload).copied()
}

impl Session {
    /// Whether the session reads the request `header` announces itself
    /// although the `vhost` crate would decode it, and the name to log it
    /// under: request 41 is PRESETUP with the in-band switch on and bit 18
    /// negotiated (upstream's GET_SHARED_OBJECT otherwise).
    pub fn claims(&self, header: &Header) -> Option<&'static str> {
        (header.code == code::GET_SHARED_OBJECT
            && self.device.supports_inband_presetup()
            && self.inband.claims_request_41(self.acked_protocol_features))
        .then_some("PRESETUP")
    }

    /// Answer request `code` with `payload` (module documentation).
    pub fn handle_own(&mut self, request: u32, payload: &[u8]) -> OwnReply {
        match request {
            code::SET_VRING_ENABLE => {
                // The vhost crate refuses it until PROTOCOL_FEATURES is
                // *acked*, but QEMU's net client sends it before
                // SET_FEATURES (it enables pairs at connect time); we offer
                // the feature, so we take it.
                let Some(state) = decode::<VhostUserVringState>(payload) else {
                    return self.refuse("SET_VRING_ENABLE", payload.len());
                };
                let enable = match state.num {
                    0 => false,
                    1 => true,
                    other => {
                        log::warn!("{}: SET_VRING_ENABLE({other}) refused: 0 or 1", self.name);
                        return OwnReply::Ack(false);
                    }
                };
                use vhost::vhost_user::VhostUserBackendReqHandlerMut;
                match self.set_vring_enable(state.index, enable) {
                    Ok(()) => OwnReply::Ack(true),
                    Err(e) => {
                        log::warn!("{}: SET_VRING_ENABLE refused: {e}", self.name);
                        OwnReply::Ack(false)
                    }
                }
            }
            code::SET_STATUS => {
                let Some(status) = decode::<VhostUserU64>(payload) else {
                    return self.refuse("SET_STATUS", payload.len());
                };
                // The low byte is the status.
                let status = (status.value & 0xff) as u8;
                log::debug!("{}: device status {status:#x}", self.name);
                self.status.set(status);
                OwnReply::Ack(true)
            }
            code::GET_STATUS => {
                OwnReply::Reply(u64::from(self.status.get()).to_le_bytes().to_vec())
            }
            code::SEND_RARP => {
                let Some(bytes) = payload.get(..6) else {
                    return self.refuse("SEND_RARP", payload.len());
                };
                let mut mac = [0u8; 6];
                mac.copy_from_slice(bytes);
                match self.device.send_rarp(mac) {
                    Ok(_) => OwnReply::Ack(true),
                    Err(e) => {
                        log::warn!(
                            "{}: SEND_RARP failed: {}",
                            self.name,
                            crate::error_chain(&e)
                        );
                        OwnReply::Ack(false)
                    }
                }
            }
            code::NET_SET_MTU => {
                let Some(mtu) = decode::<VhostUserU64>(payload) else {
                    return self.refuse("NET_SET_MTU", payload.len());
                };
                if let Err(e) = self.device.net_set_mtu(mtu.value) {
                    log::warn!(
                        "{}: NET_SET_MTU refused: {}",
                        self.name,
                        crate::error_chain(&e)
                    );
                    return OwnReply::Ack(false);
                }
                log::info!("{}: MTU {}", self.name, mtu.value);
                match self.reconcile(None) {
                    Ok(()) => OwnReply::Ack(true),
                    Err(e) => {
                        log::warn!(
                            "{}: NET_SET_MTU {} failed: {}",
                            self.name,
                            mtu.value,
                            crate::error_chain(&e)
                        );
                        OwnReply::Ack(false)
                    }
                }
            }
            code::GET_SHARED_OBJECT => match decode::<VhostUserU64>(payload) {
                Some(value) => self.presetup_request(value.value),
                // Only claimed with bit 18 negotiated as PRESETUP: a
                // front-end sending GET_SHARED_OBJECT's UUID means the
                // other thing by bit 18, and wants a reply we cannot give.
                None => OwnReply::Fail(format!(
                    "request 41 with a {}-byte payload is upstream GET_SHARED_OBJECT, but \
                     protocol feature 18 was negotiated as the NVIDIA presetup \
                     (--presetup-protocol=nvidia-rfc): the front-end speaks SHARED_OBJECT",
                    payload.len()
                )),
            },
            code::GET_VRING_BASE_SKIP_DRAIN => {
                // A vring state {index, num}; the reply has the same shape.
                let Some(state) = decode::<VhostUserVringState>(payload) else {
                    return OwnReply::Fail(format!("a {}-byte payload", payload.len()));
                };
                if !self.protocol_acked(feature::mask(feature::GET_VRING_BASE_SKIP_DRAIN)) {
                    return OwnReply::Fail(
                        "GET_VRING_BASE_SKIP_DRAIN without its protocol feature negotiated"
                            .to_string(),
                    );
                }
                match self.get_base(state.index, GetBase::SkipDrain) {
                    Ok(base) => {
                        self.publish();
                        let reply = VhostUserVringState::new(state.index, u32::from(base));
                        OwnReply::Reply(reply.as_slice().to_vec())
                    }
                    Err(e) => OwnReply::Fail(crate::error_chain(&e)),
                }
            }
            _ => OwnReply::Unhandled,
        }
    }

    fn refuse(&self, name: &str, len: usize) -> OwnReply {
        log::warn!("{}: {name} with a {len}-byte payload refused", self.name);
        OwnReply::Ack(false)
    }
}
