//! The agent-side state of a net device: what it should hold besides what
//! the front-end configures (MTU, MAC, RSS steering), shown by the control
//! API and carried to a migration destination through
//! SET_DEVICE_STATE_FD as versioned JSON.

use netdev::rss::RssConfig;
use netdev::spec::MacAddress;
use serde::{Deserialize, Serialize};

/// Version of the device state format (SET_DEVICE_STATE_FD).
pub const NET_STATE_VERSION: u32 = 1;

/// The agent-side state of a net device (module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// [`NET_STATE_VERSION`].
    pub version: u32,
    /// Queue pairs of the device the state comes from.
    pub queue_pairs: u16,
    /// The MTU in force.
    pub mtu: u16,
    /// The MAC last announced (SEND_RARP) or configured.
    pub mac: MacAddress,
    /// RSS steering, if configured.
    pub rss: Option<RssConfig>,
}

/// A device state that cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not JSON of a device state.
    #[error("device state is not valid")]
    Decode(#[source] serde_json::Error),
    /// A version this agent does not read.
    #[error("device state version {found} (this agent reads {NET_STATE_VERSION})")]
    Version {
        /// The version found.
        found: u32,
    },
    /// Its RSS steering does not fit this device.
    #[error("its RSS steering does not fit this device")]
    Rss(#[source] netdev::rss::RssError),
}

impl NetState {
    /// Decode a migrated state.
    pub fn decode(bytes: &[u8]) -> Result<NetState, StateError> {
        let state: NetState = serde_json::from_slice(bytes).map_err(StateError::Decode)?;
        if state.version != NET_STATE_VERSION {
            return Err(StateError::Version {
                found: state.version,
            });
        }
        Ok(state)
    }

    /// The presetup form of the RSS steering.
    pub fn rss_spec(&self) -> Option<presetup::RssSpec> {
        self.rss.as_ref().map(|config| presetup::RssSpec {
            hash_types: config.hash_types,
            key: config.key.clone(),
            indirection_table: config.indirection_table.clone(),
            default_queue: config.default_queue,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_round_trips_and_garbage_or_new_versions_are_refused() {
        let state = NetState {
            version: NET_STATE_VERSION,
            queue_pairs: 2,
            mtu: 9000,
            mac: MacAddress::DEFAULT,
            rss: None,
        };
        let bytes = serde_json::to_vec(&state).unwrap();
        assert_eq!(NetState::decode(&bytes).unwrap(), state);
        assert!(matches!(
            NetState::decode(b"\x00garbage"),
            Err(StateError::Decode(_))
        ));
        let newer = serde_json::to_vec(&NetState {
            version: 2,
            ..state
        })
        .unwrap();
        assert!(matches!(
            NetState::decode(&newer),
            Err(StateError::Version { found: 2 })
        ));
    }
}
