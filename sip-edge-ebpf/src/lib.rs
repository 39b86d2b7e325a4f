//! Host-side placeholder library: lets `sip-edge/build.rs` declare a
//! build-dependency on this crate so cargo rebuilds the agent (and its
//! embedded object) whenever the datapath changes.
#![no_std]
