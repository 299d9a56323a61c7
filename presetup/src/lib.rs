//! Presetup: configure a device early, then apply only the difference.
//!
//! During migration setup the destination agent learns the configuration
//! its devices will get and does the expensive work then: create dataplane
//! queues, map guest memory, program RSS, open storage, create I/O rings.
//! At switchover the real configuration arrives; [`plan`] compares it with
//! the early one and yields only the ops that differ, ideally just ring
//! bases and eventfds ([`OpClass::Light`]).
//!
//! The crate is pure: values in, plan out, no files, sockets, clocks,
//! threads or logging. The agent records [`DeviceConfig`]s from vhost-user
//! messages and the control API, and devices apply [`ConfigOp`]s;
//! [`model::ModelDevice`] is the executable specification of what those ops
//! mean, and the property tests hold the planner to it:
//!
//! > a device given `plan_full(E)` and then `plan(E, F)` ends in exactly
//! > the state of a fresh device given `plan_full(F)`, for any E and F.
//!
//! ```
//! use presetup::{plan, plan_full, DeviceConfig, ValidConfig};
//! # let json = r#"{"version":1,"acked_features":0,"protocol_features":0,"memory":[],"rings":[],
//! #   "device":{"net":{"mtu":1500,"mac":[82,84,0,18,52,86],"queue_pairs":1,"rss":null}}}"#;
//! let early = DeviceConfig::from_json(json).unwrap();
//! let final_ = ValidConfig::from_json(json).unwrap();
//! let switchover = plan(&early, &final_);
//! assert_eq!(switchover.applied.heavy, 0);
//! assert!(switchover.skipped.heavy > 0);
//! assert_eq!(plan_full(&final_).skipped.heavy, 0);
//! ```

mod config;
mod error;
pub mod model;
mod op;
mod plan;
mod validate;

#[cfg(test)]
mod tests;

pub use config::{
    BlkConfig, DeviceConfig, DeviceKind, DeviceType, FileIdentity, FrontendAddr, GuestAddr,
    MemoryRegion, NetConfig, RegionKey, RingAddresses, RingConfig, RingPart, RssSpec,
    FORMAT_VERSION,
};
pub use error::{AddressSpace, ConfigError, DecodeError, LoadError};
pub use op::{ConfigOp, OpClass, NET_DATAPLANE_FEATURES};
pub use plan::{plan, plan_delta, plan_full, ClassCounts, FallbackReason, Plan};
pub use validate::{
    ValidConfig, MAX_MEMORY_REGIONS, MAX_QUEUE_PAIRS, MAX_RINGS, MAX_RING_SIZE, MAX_RSS_KEY_LEN,
    MAX_RSS_TABLE_LEN, MIN_MTU, RSS_HASH_TYPES,
};
