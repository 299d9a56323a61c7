//! Tests across modules: fixtures, the concrete switchover scenarios the
//! issue names, and the property tests of the presetup invariant.

mod fixtures;
mod properties;
mod scenarios;
