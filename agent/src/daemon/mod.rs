//! The daemon around the devices: `serve` (start-up, signals, shutdown),
//! the device specs of the command line and the control API, building a
//! device from one, the registry the control API reads, and the
//! supervisor that adds and removes devices at any time.

pub mod bind;
pub mod registry;
pub mod serve;
pub mod spec;
pub mod supervisor;
