//! The harness XDP object: programs the tests and benchmarks load, never
//! the agent. Built beside the datapath object by the same `cargo xtask
//! build-ebpf` (and by the `tests` crate's build script), so the object the
//! agent embeds holds its one program only.
//!
//! - `sip_edge_pass`: end hosts of test topologies (a veth accepts
//!   XDP_REDIRECTed frames only while its peer runs an XDP program) and the
//!   "trivial XDP_PASS" baseline of the benchmarks;
//! - `sip_edge_gen`, `sip_edge_redirect`, `sip_edge_sink`: see `bench.rs`.
#![no_std]
#![no_main]

mod bench;
#[expect(
    dead_code,
    reason = "shared with the datapath object, whose map types and helpers these programs do not all use"
)]
mod mapdef;
#[expect(
    dead_code,
    reason = "the datapath's parser, of which the bench programs use the header structs only"
)]
mod parse;

use aya_ebpf::{bindings::xdp_action::XDP_PASS, macros::xdp, programs::XdpContext};

/// Pass-through program (see the module docs).
#[xdp]
pub fn sip_edge_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
