//! The harness XDP object (`sip-edge-ebpf/src/harness.rs`): the programs
//! tests and benchmarks load and the agent never does. Embedded from
//! OUT_DIR (this crate's build script), so it is never older than the
//! datapath source.

use aya::{Ebpf, EbpfLoader};
use sip_edge::datapath::loader::LoadError;

/// The object, built by `build.rs`.
pub static HARNESS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sip-edge-harness"));

/// Program names: `sip_edge_common::bench_progs`.
pub use sip_edge_common::bench_progs;
/// Pass-through program of test end hosts and the benches' XDP_PASS baseline.
pub const PASS_PROG: &str = bench_progs::PASS;

/// Parse the harness object and create its (unpinned) maps; programs are
/// loaded by the caller, by name.
pub fn load() -> Result<Ebpf, LoadError> {
    EbpfLoader::new()
        .load(HARNESS_OBJECT)
        .map_err(|source| LoadError::Object {
            source: Box::new(source),
        })
}
