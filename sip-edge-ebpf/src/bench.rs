//! Benchmark-only XDP programs (issue #4) of the harness object, never
//! attached by the agent: a live-frame traffic generator, a bare redirect
//! forwarder (the forwarding ceiling) and a counting sink. Configured
//! through `BENCH_CFG` and counted in `BENCH_CNT` by the bench binary
//! (`tests/src/bench/`).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_redirect,
    macros::xdp,
    programs::XdpContext,
};
use sip_edge_common::{
    BenchCfg, BENCH_CNT_GEN, BENCH_CNT_LEN, BENCH_CNT_SINK, BENCH_PORTS_LEN, PROTO_UDP,
};

use crate::{
    mapdef::{MapDef, ARRAY, PERCPU_ARRAY},
    parse::{ptr_at, EthHdr, Ipv4Hdr},
};

/// Benchmark programs' settings (entry 0), written by the bench binary.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static BENCH_CFG: MapDef<ARRAY, u32, BenchCfg, 1> = MapDef::new();

/// Benchmark counters per CPU: generator sequence, sink count.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static BENCH_CNT: MapDef<PERCPU_ARRAY, u32, u64, { BENCH_CNT_LEN as usize }> = MapDef::new();

/// Destination port per flow when `BenchCfg::port_table` is set.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static BENCH_PORTS: MapDef<ARRAY, u32, u16, { BENCH_PORTS_LEN as usize }> = MapDef::new();

/// Header words the generator stamps (42 bytes: Ethernet, IPv4, UDP).
const HDR_WORDS: usize = 21;
/// Word of the IPv4 header checksum (frame offset 24).
const W_IP_CHECK: usize = 12;
/// Word holding the last two octets of the IPv4 destination (offset 32).
const W_DST_LO: usize = 16;
/// Word of the UDP destination port (offset 36).
const W_DPORT: usize = 18;

/// Live-frame generator (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES,
/// XDP_TX out of the ctx's ifindex). The kernel recycles live-frame pages
/// without restoring them, so every header byte is stamped on every run
/// from the template; the flow (destination address and port) comes from a
/// per-CPU sequence number.
#[xdp]
pub fn sip_edge_gen(ctx: XdpContext) -> u32 {
    let Some(cfg) = BENCH_CFG.get_ptr(&0) else {
        return XDP_DROP;
    };
    let Some(seq) = BENCH_CNT.get_ptr_mut(&BENCH_CNT_GEN) else {
        return XDP_DROP;
    };
    let Ok(hdr) = ptr_at::<[u16; HDR_WORDS]>(&ctx, 0) else {
        return XDP_DROP;
    };
    // SAFETY: a per-CPU slot and a live array value; `hdr` is bounds-checked.
    unsafe {
        let n = *seq as u32;
        *seq += 1;
        let flows = if (*cfg).flows == 0 { 1 } else { (*cfg).flows };
        let per = if (*cfg).per_addr == 0 {
            flows
        } else {
            (*cfg).per_addr
        };
        let flow = n % flows;
        let (addr_off, port_off) = (flow / per, flow % per);
        let w = hdr.cast::<u16>();
        let mut i = 0;
        while i < HDR_WORDS {
            // Volatile: LLVM would otherwise turn the copy into a memcpy call.
            w.add(i).write_volatile((*cfg).hdr[i]);
            i += 1;
        }
        // Last octet of the destination is the high byte of this LE word.
        let old = (*cfg).hdr[W_DST_LO];
        let new = old.wrapping_add((addr_off as u16) << 8);
        w.add(W_DST_LO).write_volatile(new);
        // RFC 1624 eqn. 3 on memory-order words.
        let mut s = (!(*cfg).hdr[W_IP_CHECK]) as u32 + (!old) as u32 + new as u32;
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        w.add(W_IP_CHECK).write_volatile(!(s as u16));
        let port = if (*cfg).port_table != 0 {
            match BENCH_PORTS.get_ptr(&flow) {
                Some(p) => *p,
                None => return XDP_DROP,
            }
        } else {
            (*cfg).port_base.wrapping_add(port_off as u16)
        };
        w.add(W_DPORT).write_volatile(port.to_be());
    }
    XDP_TX
}

/// Bare forwarder: every frame out of `BENCH_CFG.redirect_ifindex`,
/// untouched. The ceiling a forwarding XDP program can reach here.
#[xdp]
pub fn sip_edge_redirect(_ctx: XdpContext) -> u32 {
    let Some(cfg) = BENCH_CFG.get_ptr(&0) else {
        return XDP_DROP;
    };
    // SAFETY: a live array value.
    let ifindex = unsafe { (*cfg).redirect_ifindex };
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

/// Counting sink: IPv4 UDP frames are counted (per CPU) and dropped;
/// everything else (ARP, ND, TCP) goes to the kernel.
#[xdp]
pub fn sip_edge_sink(ctx: XdpContext) -> u32 {
    let Ok(eth) = ptr_at::<EthHdr>(&ctx, 0) else {
        return XDP_PASS;
    };
    let Ok(ip) = ptr_at::<Ipv4Hdr>(&ctx, core::mem::size_of::<EthHdr>()) else {
        return XDP_PASS;
    };
    // SAFETY: bounds-checked above.
    let (et, proto) = unsafe { ((*eth).ethertype, (*ip).proto) };
    if et != 0x0800_u16.to_be() || proto != PROTO_UDP {
        return XDP_PASS;
    }
    if let Some(c) = BENCH_CNT.get_ptr_mut(&BENCH_CNT_SINK) {
        // SAFETY: a per-CPU slot.
        unsafe { *c += 1 };
    }
    XDP_DROP
}
