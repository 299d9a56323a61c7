//! The in-band presetup bracket of NVIDIA's early-migration RFC
//! (docs/presetup-inband.md): during migration setup the destination QEMU sends
//! `PRESETUP(START)`, the device's configuration (features, memory table,
//! rings with no-fd kick and call, enables, MTU), then `PRESETUP(END)`; at
//! switchover it sends the normal start sequence again.
//!
//! The RFC was never merged, and upstream QEMU later gave its numbers to
//! SHARED_OBJECT: protocol bit 18 and request 41 (GET_SHARED_OBJECT, a
//! 16-byte UUID payload with a reply). So the agent speaks it only behind
//! `serve --presetup-protocol=nvidia-rfc`, offers bit 18 only then, never
//! offers SHARED_OBJECT semantics, and tells the two requests 41 apart by
//! payload size: 8 bytes (a u64) is presetup.
//!
//! This module is the bracket's bookkeeping, free of I/O: which requests
//! open and close it and which are malformed. What the session does inside
//! it lives in `session/inband.rs`.

use std::fmt;

/// `VHOST_USER_PROTOCOL_F_PRESETUP` of the RFC (upstream: SHARED_OBJECT).
pub const VHOST_USER_PROTOCOL_F_PRESETUP: u64 = 1 << 18;
/// `VHOST_USER_PRESETUP` of the RFC (upstream: GET_SHARED_OBJECT).
pub const VHOST_USER_PRESETUP: u32 = super::requests::code::GET_SHARED_OBJECT;
/// `VHOST_USER_PRESETUP_START`: early configuration follows.
pub const VHOST_USER_PRESETUP_START: u64 = 1;
/// `VHOST_USER_PRESETUP_END`: early configuration is complete.
pub const VHOST_USER_PRESETUP_END: u64 = 2;
/// Payload size of a presetup request (a u64). Upstream's
/// GET_SHARED_OBJECT carries a 16-byte UUID.
pub const PRESETUP_PAYLOAD_SIZE: u32 = 8;

/// Which in-band presetup protocol the agent speaks (`serve
/// --presetup-protocol`). Off by default: the numbers collide with
/// upstream SHARED_OBJECT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PresetupProtocol {
    /// No in-band presetup: bit 18 is not offered and request 41 is
    /// upstream GET_SHARED_OBJECT, which the agent does not serve.
    #[default]
    None,
    /// NVIDIA's RFC: bit 18 is PRESETUP, request 41 with a u64 payload
    /// brackets the early configuration (1 = start, 2 = end).
    NvidiaRfc,
}

impl PresetupProtocol {
    /// The protocol feature bits this choice adds to a device's offer.
    pub fn protocol_features(self) -> u64 {
        match self {
            PresetupProtocol::None => 0,
            PresetupProtocol::NvidiaRfc => VHOST_USER_PROTOCOL_F_PRESETUP,
        }
    }

    /// Whether request 41 is presetup on a connection that acked
    /// `acked_protocol_features`: the switch is on and the front-end
    /// negotiated bit 18. Otherwise request 41 keeps its upstream meaning.
    pub fn claims_request_41(self, acked_protocol_features: u64) -> bool {
        self == PresetupProtocol::NvidiaRfc
            && acked_protocol_features & VHOST_USER_PROTOCOL_F_PRESETUP != 0
    }
}

/// The presetup value of a request-41 payload: `None` unless it is exactly
/// a u64 (a 16-byte payload is upstream GET_SHARED_OBJECT's UUID).
pub fn decode(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.try_into().ok()?))
}

/// A presetup request that does not fit the bracket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// END with no bracket open.
    #[error("PRESETUP END without a START")]
    EndWithoutStart,
    /// START while a bracket is open.
    #[error("PRESETUP START inside an open bracket")]
    StartTwice,
    /// A value the RFC does not define.
    #[error("PRESETUP with value {0} (the RFC defines 1 = START and 2 = END)")]
    UnknownValue(u64),
}

/// What a presetup request did to the bracket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// START: the messages that follow are the early configuration.
    Opened,
    /// END of a well-formed bracket: what the device holds now is the
    /// early configuration.
    Closed,
    /// END of a bracket abandoned earlier: nothing to take.
    ClosedAbandoned,
    /// The request broke the bracket: it is abandoned (or, outside one,
    /// ignored). Counted once as a presetup fallback.
    Malformed(Malformed),
    /// A further bad request inside an already abandoned bracket: logged,
    /// not counted again.
    Ignored(Malformed),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    /// No bracket.
    #[default]
    Idle,
    /// Inside a well-formed bracket.
    Open,
    /// Inside a bracket that went wrong: it still lasts until END (rings
    /// stay unstarted, guest memory is still not valid), but what it set
    /// up is not taken as an early configuration.
    Abandoned,
}

/// Where a connection stands with respect to the bracket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bracket {
    state: State,
}

impl fmt::Display for Bracket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.state {
            State::Idle => "no bracket",
            State::Open => "bracket open",
            State::Abandoned => "bracket abandoned",
        })
    }
}

impl Bracket {
    /// Between START and END (well-formed or not): guest RAM has not been
    /// migrated yet, so no ring may start and no ring may be read.
    pub fn is_open(&self) -> bool {
        self.state != State::Idle
    }

    /// Apply one presetup request with payload `value`.
    pub fn step(&mut self, value: u64) -> Step {
        let (next, step) = match (self.state, value) {
            (State::Idle, VHOST_USER_PRESETUP_START) => (State::Open, Step::Opened),
            (State::Open, VHOST_USER_PRESETUP_END) => (State::Idle, Step::Closed),
            (State::Abandoned, VHOST_USER_PRESETUP_END) => (State::Idle, Step::ClosedAbandoned),
            (State::Idle, VHOST_USER_PRESETUP_END) => {
                (State::Idle, Step::Malformed(Malformed::EndWithoutStart))
            }
            (State::Open, VHOST_USER_PRESETUP_START) => {
                (State::Abandoned, Step::Malformed(Malformed::StartTwice))
            }
            (State::Abandoned, VHOST_USER_PRESETUP_START) => {
                (State::Abandoned, Step::Ignored(Malformed::StartTwice))
            }
            (State::Idle, other) => (State::Idle, Step::Malformed(Malformed::UnknownValue(other))),
            (State::Open, other) => (
                State::Abandoned,
                Step::Malformed(Malformed::UnknownValue(other)),
            ),
            (State::Abandoned, other) => (
                State::Abandoned,
                Step::Ignored(Malformed::UnknownValue(other)),
            ),
        };
        self.state = next;
        step
    }

    /// The connection went away: no bracket any more.
    pub fn reset(&mut self) {
        self.state = State::Idle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(values: &[u64]) -> (Vec<Step>, Bracket) {
        let mut bracket = Bracket::default();
        let steps = values.iter().map(|&value| bracket.step(value)).collect();
        (steps, bracket)
    }

    #[test]
    fn start_then_end_is_a_bracket() {
        let (steps, bracket) = run(&[1, 2]);
        assert_eq!(steps, [Step::Opened, Step::Closed]);
        assert!(!bracket.is_open());
        // And another one after it.
        let (steps, _) = run(&[1, 2, 1, 2]);
        assert_eq!(steps[2..], [Step::Opened, Step::Closed]);
    }

    #[test]
    fn end_without_start_is_malformed_and_opens_nothing() {
        let (steps, bracket) = run(&[2]);
        assert_eq!(steps, [Step::Malformed(Malformed::EndWithoutStart)]);
        assert!(!bracket.is_open());
    }

    #[test]
    fn start_twice_abandons_the_bracket_until_its_end() {
        let (steps, bracket) = run(&[1, 1]);
        assert_eq!(steps[1], Step::Malformed(Malformed::StartTwice));
        assert!(bracket.is_open(), "rings must stay unstarted until END");
        let (steps, bracket) = run(&[1, 1, 1, 2]);
        assert_eq!(steps[2], Step::Ignored(Malformed::StartTwice));
        assert_eq!(steps[3], Step::ClosedAbandoned);
        assert!(!bracket.is_open());
    }

    #[test]
    fn unknown_values_abandon_an_open_bracket_and_are_refused_outside() {
        for value in [0, 3, 0x100, u64::MAX] {
            let (steps, bracket) = run(&[value]);
            assert_eq!(steps, [Step::Malformed(Malformed::UnknownValue(value))]);
            assert!(!bracket.is_open());
            let (steps, _) = run(&[1, value, value, 2]);
            assert_eq!(
                steps[1..],
                [
                    Step::Malformed(Malformed::UnknownValue(value)),
                    Step::Ignored(Malformed::UnknownValue(value)),
                    Step::ClosedAbandoned
                ]
            );
        }
    }

    #[test]
    fn reset_closes_any_bracket() {
        let (_, mut bracket) = run(&[1]);
        bracket.reset();
        assert!(!bracket.is_open());
        assert_eq!(bracket.step(2), Step::Malformed(Malformed::EndWithoutStart));
    }

    #[test]
    fn only_eight_byte_payloads_are_presetup() {
        assert_eq!(decode(&1u64.to_le_bytes()), Some(1));
        assert_eq!(decode(&[0u8; 16]), None, "GET_SHARED_OBJECT's UUID");
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[1, 0, 0, 0]), None);
    }

    #[test]
    fn request_41_is_presetup_only_with_the_switch_on_and_bit_18_acked() {
        let bit = VHOST_USER_PROTOCOL_F_PRESETUP;
        assert!(PresetupProtocol::NvidiaRfc.claims_request_41(bit | 1));
        assert!(!PresetupProtocol::NvidiaRfc.claims_request_41(!bit));
        assert!(!PresetupProtocol::None.claims_request_41(u64::MAX));
        assert_eq!(PresetupProtocol::None.protocol_features(), 0);
        assert_eq!(PresetupProtocol::NvidiaRfc.protocol_features(), bit);
        assert_eq!(
            PresetupProtocol::NvidiaRfc.protocol_features(),
            vhost::vhost_user::message::VhostUserProtocolFeatures::SHARED_OBJECT.bits(),
            "the RFC's bit is the one upstream calls SHARED_OBJECT"
        );
    }
}
