//! The XDP datapath as the agent sees it: loading the embedded object,
//! attaching and pinning it, and the map writer (the only code that writes
//! BPF maps), the lock that keeps one agent per pin directory, the lock
//! that keeps one map writer at a time, and the pinned layout's version.

pub mod attach;
pub mod hostcheck;
pub mod layout;
pub mod loader;
pub mod lock;
pub mod maps;
pub mod neigh;
pub mod rules;
pub mod writer;
