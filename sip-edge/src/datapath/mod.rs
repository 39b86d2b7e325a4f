//! The XDP datapath as the agent sees it: loading the embedded object,
//! attaching and pinning it, and the map writer (the only code that writes
//! BPF maps), and the lock that keeps one agent per pin directory.

pub mod attach;
pub mod hostcheck;
pub mod loader;
pub mod lock;
pub mod maps;
pub mod neigh;
pub mod rules;
