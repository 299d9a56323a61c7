//! Dispatching one message: the requests the session answers itself or
//! claims, and what a failure of one the crate handled means for the
//! connection.

use vhost::vhost_user::Error as VhostError;

use super::{lock, Connection, DeviceServer, Disconnect};
use crate::vhost_user::requests::{self, Fds, Reply};
use crate::vhost_user::session::own::OwnReply;
use crate::vhost_user::wire;

impl DeviceServer {
    /// A request the crate handled failed. If the front-end still expects a
    /// reply we cannot give it any more, so the connection must go; a
    /// refused setter was already NACKed (or needs no answer) and the
    /// connection goes on. A refusal nobody was told of (`answered` false)
    /// raises NEEDS_RESET, so GET_STATUS shows the device did not take it.
    pub(super) fn crate_error(
        &self,
        name: &'static str,
        reply: Option<Reply>,
        answered: bool,
        error: VhostError,
    ) -> Result<(), Disconnect> {
        match (&error, reply) {
            (VhostError::ReqHandlerError(cause), Some(Reply::Ack)) => {
                let cause = crate::error_chain(handler_error(cause));
                if answered {
                    log::warn!("{}: {name} refused: {cause}", self.name);
                } else {
                    log::warn!(
                        "{}: {name} refused: {cause}; the front-end asked for no reply, so the device needs a reset",
                        self.name
                    );
                    lock(&self.session).refused_unanswered();
                }
                Ok(())
            }
            _ => {
                // The crate's text shows the handler's error itself; add
                // what it leaves out, the error's sources (they say why).
                let reason = match &error {
                    VhostError::ReqHandlerError(cause) => {
                        format!("{error}{}", crate::error_sources(handler_error(cause)))
                    }
                    _ => error.to_string(),
                };
                log::error!("{}: {name} failed: {reason}", self.name);
                Err(Disconnect::Failed {
                    request: name,
                    reason,
                })
            }
        }
    }

    /// The requests the crate cannot handle and those the session claims.
    pub(super) fn handle_own(
        &self,
        conn: &Connection,
        code: u32,
        name: &'static str,
    ) -> Result<(), Disconnect> {
        let (header, payload, files) =
            wire::read_message(&conn.stream).map_err(Disconnect::Read)?;
        let mut session = lock(&self.session);
        let ack_enabled = session.reply_ack_enabled();
        let reply_error = |source| Disconnect::Reply {
            request: name,
            source,
        };
        let answered = header.need_reply() && ack_enabled;
        let ack = |ok: bool| -> Result<(), Disconnect> {
            if answered {
                wire::send_u64(&conn.stream, &header, u64::from(!ok)).map_err(reply_error)?;
            }
            Ok(())
        };
        let info = requests::lookup(code);
        if !files.is_empty() && info.is_some_and(|info| info.fds == Fds::None) {
            // The fds close when `files` goes.
            log::warn!(
                "{}: {name} carries {} fd(s) it may not have; refusing it",
                self.name,
                files.len()
            );
            return match info.map(|info| info.reply) {
                Some(Reply::Ack) => {
                    if !answered {
                        session.refused_unanswered();
                    }
                    ack(false)
                }
                _ => Err(Disconnect::Failed {
                    request: name,
                    reason: "fds it may not carry".to_string(),
                }),
            };
        }
        // A request whose protocol feature was not negotiated is refused
        // before its handler sees it (the vhost crate checks its own).
        if let Some(bit) = info.and_then(|info| info.feature) {
            if session.acked_protocol_features() & requests::feature::mask(bit) == 0 {
                log::warn!(
                    "{}: {name} without protocol feature {bit} negotiated; refusing it",
                    self.name
                );
                return match info.map(|info| info.reply) {
                    Some(Reply::Ack) => {
                        if !answered {
                            session.refused_unanswered();
                        }
                        ack(false)
                    }
                    _ => Err(Disconnect::Failed {
                        request: name,
                        reason: format!("protocol feature {bit} was not negotiated"),
                    }),
                };
            }
        }
        match session.handle_own(code, &payload) {
            OwnReply::Ack(ok) => {
                if !ok && !answered {
                    session.refused_unanswered();
                }
                ack(ok)
            }
            OwnReply::Reply(reply) => {
                wire::send_reply(&conn.stream, &header, &reply).map_err(reply_error)
            }
            OwnReply::Fail(reason) => {
                log::error!("{}: {name} failed: {reason}", self.name);
                Err(Disconnect::Failed {
                    request: name,
                    reason,
                })
            }
            OwnReply::Unhandled => match info.map(|info| info.reply) {
                Some(Reply::Ack) => {
                    log::warn!(
                        "{}: {name} ({code}) is not supported; refusing it",
                        self.name
                    );
                    ack(false)
                }
                _ => {
                    log::error!(
                        "{}: cannot answer request {name} ({code}); closing the connection",
                        self.name
                    );
                    Err(Disconnect::Failed {
                        request: name,
                        reason: format!("request {code} is not supported and requires a reply"),
                    })
                }
            },
        }
    }
}

/// The session's own error inside the crate's `ReqHandlerError`.
fn handler_error(cause: &std::io::Error) -> &(dyn std::error::Error + 'static) {
    cause
        .get_ref()
        .map_or(cause as &(dyn std::error::Error + 'static), |inner| inner)
}
