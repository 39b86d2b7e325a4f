//! sip-edge agent library: configuration, the XDP datapath (load, attach,
//! pin, map writer) and the commands `main.rs` dispatches to. Integration
//! tests drive these directly.

pub mod access;
pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod doctor;
pub mod ha;
pub mod logging;
pub mod media;
pub mod metrics;
pub mod ports;
pub mod proxy;
pub mod service;
pub mod sip;
pub mod status;
pub mod transport;
