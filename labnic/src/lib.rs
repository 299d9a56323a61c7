//! The lab's NIC: a virtio-net device in userspace (VDUSE) for tests of
//! the agent's vhost-vdpa datapath inside the lab guest, whose kernel has
//! VDUSE and vhost-vdpa (this host's has neither).
//!
//! `labnic` creates a VDUSE net device (VERSION_1, ACCESS_PLATFORM, MAC,
//! MTU, STATUS, MRG_RXBUF, EVENT_IDX, INDIRECT_DESC, MQ with more than one
//! pair; no control virtqueue, which VDUSE refuses), sets up every
//! virtqueue, and once `vdpa dev add name NAME mgmtdev vduse` has made it
//! a vDPA device (`/dev/vhost-vdpa-N` with vhost_vdpa loaded and
//! virtio_vdpa not), serves it: rings from the IOVA mappings VDUSE hands
//! out, every TX frame reflected into the same pair's RX queue, kicks and
//! interrupts, status changes, GET_VQ_STATE. Configuration operations are
//! charged what a cost profile says (netdev's `sim` format), so a vDPA
//! hardware model runs behind the real uAPI; every page the device writes
//! is recorded for a dirty-log checker.
//!
//! Modules: [`uapi`] (layouts and ioctl numbers), [`sys`] (the unsafe
//! system calls), [`vduse`] (the two character devices), [`memory`] (the
//! IOVA space and the dirty record), [`ring`] (one virtqueue), [`net`]
//! (features, config space, the loopback), [`nic`] (device state and
//! counters), [`run`] (the event loop and the device's life), [`probe`]
//! (checks of vhost devices for the lab's smoke test), and the lab's own
//! minimal vhost-vdpa front-end: [`vdpa`] (the driver side of
//! /dev/vhost-vdpa-N), [`driver`] (driver-side rings, test frames),
//! [`frontend`] (the `vdpa-frontend` run).

pub mod driver;
pub mod frontend;
pub mod memory;
pub mod net;
pub mod nic;
pub mod probe;
pub mod ring;
pub mod run;
pub mod sys;
pub mod uapi;
pub mod vdpa;
pub mod vduse;
