//! The lab's tools for the kernel vhost datapaths, run inside the lab
//! guest (tests/src/lab.rs), whose kernel has vhost-net, vhost-vdpa and
//! VDUSE (this host's has none).
//!
//! Modules: [`uapi`] (layouts and ioctl numbers), [`sys`] (the unsafe
//! system calls), [`probe`] (checks of vhost devices for the lab's smoke
//! test, the `lab-probe` binary).

pub mod probe;
pub mod sys;
pub mod uapi;
