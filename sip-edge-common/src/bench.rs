//! Configuration shared by the benchmark-only XDP programs (`sip_edge_gen`,
//! `sip_edge_redirect`, `sip_edge_sink` in `sip-edge-ebpf/src/bench.rs`) and
//! the bench binary (`tests/src/bench/`), which writes it. The agent
//! never attaches these programs.

/// Bytes of the Ethernet + IPv4 + UDP headers the generator stamps.
pub const BENCH_HDR_LEN: usize = 42;

/// Value of `BENCH_CFG` (one entry). 64 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BenchCfg {
    /// Header template (Ethernet, IPv4 with a valid checksum for address
    /// offset 0, UDP with checksum 0), as 16-bit memory-order words; the
    /// last word is padding.
    pub hdr: [u16; 22],
    /// Flows the generator spreads packets over (round robin); 0 = 1.
    pub flows: u32,
    /// Flows per destination address: flow `f` goes to the template's
    /// destination + `f / per_addr` (last octet) and port `port_base + f % per_addr`.
    pub per_addr: u32,
    /// First destination port, host order.
    pub port_base: u16,
    /// Non-zero: flow `f`'s destination port is `BENCH_PORTS[f]` instead of
    /// `port_base + f % per_addr` (peers that pick their own ports, e.g.
    /// rtpengine); `flows` must then be at most `BENCH_PORTS_LEN`.
    pub port_table: u16,
    /// Egress ifindex of `sip_edge_redirect`.
    pub redirect_ifindex: u32,
    /// Explicit padding.
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<BenchCfg>() == 64);

/// Entries of `BENCH_PORTS`: the most flows a port table can describe.
pub const BENCH_PORTS_LEN: u32 = 4096;

/// `BENCH_CNT` index: the generator's per-CPU sequence number.
pub const BENCH_CNT_GEN: u32 = 0;
/// `BENCH_CNT` index: frames the sink counted (per CPU).
pub const BENCH_CNT_SINK: u32 = 1;
/// Entries of `BENCH_CNT`.
pub const BENCH_CNT_LEN: u32 = 2;

/// Names of the programs in the harness object (`sip-edge-ebpf/src/harness.rs`).
pub mod bench_progs {
    /// Pass-through (test end hosts, the XDP_PASS baseline).
    pub const PASS: &str = "sip_edge_pass";
    /// Live-frame generator (XDP_TX).
    pub const GEN: &str = "sip_edge_gen";
    /// Bare redirect forwarder.
    pub const REDIRECT: &str = "sip_edge_redirect";
    /// Counting sink.
    pub const SINK: &str = "sip_edge_sink";
}
