//! Verdict reason codes: one per early exit of the XDP program, counted per
//! CPU in the `REASONS` map and shown by `sip-edge stats`.

/// Why the datapath returned what it returned. The discriminant is the index
/// into the `REASONS` per-CPU array; append new codes at the end only, as
/// pinned maps outlive a program upgrade.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Matched a pinhole, rewritten and redirected.
    Forwarded = 0,
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed to the kernel.
    PassNotIp = 1,
    /// Interface not in `IFACES` (program attached elsewhere): passed.
    PassUnknownIface = 2,
    /// Aimed at an always-pass port (signalling/admin) on an edge address.
    PassSignalling = 3,
    /// Not aimed at a media port of an edge address; default policy pass.
    PassOther = 4,
    /// Not aimed at a media port of an edge address; default policy drop.
    DropOther = 5,
    /// Aimed at a media port of an edge address, no pinhole matched.
    DropNoPinhole = 6,
    /// Pinhole matched on the local side but the remote address/port is not
    /// the one signalling named (or latched).
    DropRemoteMismatch = 7,
    /// Header cut short (Ethernet, VLAN, IP or transport).
    DropTruncated = 8,
    /// IPv4 first fragment / IPv6 fragment header aimed at a media port.
    DropFragment = 9,
    /// Non-first IPv4 fragment (no ports to judge): left to the kernel,
    /// which cannot reassemble it when the first fragment was dropped.
    PassFragment = 10,
    /// IPv6 extension headers on a packet aimed at a media port: dropped
    /// (media never carries them; the fast path does not rewrite them).
    DropIpv6Ext = 11,
    /// IPv6 extension headers, not aimed at a media port: passed.
    PassIpv6Ext = 12,
    /// Pinhole hit with TTL/hop limit <= 1.
    DropTtlExceeded = 13,
    /// Pinhole hit, next hop has no neighbour entry yet: dropped and
    /// recorded in `NEIGH_MISS` so the agent gets the kernel to resolve it.
    DropNoNeigh = 14,
    /// Pinhole hit, `bpf_fib_lookup` found no usable route.
    DropFibFailed = 15,
    /// Pinhole hit, the egress interface is not in `TX_PORTS`.
    DropNoTxPort = 16,
    /// A latch-once pinhole learned its remote from this packet (also
    /// counted as Forwarded when it was).
    Latched = 17,
    /// IP version field does not match the Ethernet type, or IHL < 5.
    DropMalformed = 18,
    /// Pinhole matched, but the rule's rewrite is inconsistent (family).
    DropBadRule = 19,
    /// Would be `DropOther` under the drop policy, but a local socket the
    /// host opened owns the packet's 4-tuple (a TCP connection past LISTEN,
    /// a connected UDP socket): the reply to the agent's own connections.
    /// Also a TCP segment with ACK that would be `DropNoPinhole` on a media
    /// port, when a local TCP connection past LISTEN owns it (opened before
    /// a reload added that range).
    PassLocalSocket = 20,
    /// Would be `drop_other` (no ports, drop policy), but it is ICMP the host
    /// needs: IPv6 neighbour discovery (types 133-137, hop limit 255), or an
    /// ICMP/ICMPv6 error (unreachable, packet too big, time exceeded,
    /// parameter problem) quoting a packet of a connection a local socket
    /// owns (path MTU discovery for the agent's own connections).
    PassHostIcmp = 21,
}

/// Number of reason codes; size of the `REASONS` array.
pub const REASON_COUNT: u32 = 22;

impl Reason {
    /// Every reason, in discriminant order.
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::Forwarded,
        Reason::PassNotIp,
        Reason::PassUnknownIface,
        Reason::PassSignalling,
        Reason::PassOther,
        Reason::DropOther,
        Reason::DropNoPinhole,
        Reason::DropRemoteMismatch,
        Reason::DropTruncated,
        Reason::DropFragment,
        Reason::PassFragment,
        Reason::DropIpv6Ext,
        Reason::PassIpv6Ext,
        Reason::DropTtlExceeded,
        Reason::DropNoNeigh,
        Reason::DropFibFailed,
        Reason::DropNoTxPort,
        Reason::Latched,
        Reason::DropMalformed,
        Reason::DropBadRule,
        Reason::PassLocalSocket,
        Reason::PassHostIcmp,
    ];

    /// Stable snake_case name used in JSON output and docs.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Forwarded => "forwarded",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassUnknownIface => "pass_unknown_iface",
            Reason::PassSignalling => "pass_signalling",
            Reason::PassOther => "pass_other",
            Reason::DropOther => "drop_other",
            Reason::DropNoPinhole => "drop_no_pinhole",
            Reason::DropRemoteMismatch => "drop_remote_mismatch",
            Reason::DropTruncated => "drop_truncated",
            Reason::DropFragment => "drop_fragment",
            Reason::PassFragment => "pass_fragment",
            Reason::DropIpv6Ext => "drop_ipv6_ext",
            Reason::PassIpv6Ext => "pass_ipv6_ext",
            Reason::DropTtlExceeded => "drop_ttl_exceeded",
            Reason::DropNoNeigh => "drop_no_neigh",
            Reason::DropFibFailed => "drop_fib_failed",
            Reason::DropNoTxPort => "drop_no_tx_port",
            Reason::Latched => "latched",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropBadRule => "drop_bad_rule",
            Reason::PassLocalSocket => "pass_local_socket",
            Reason::PassHostIcmp => "pass_host_icmp",
        }
    }
}

const _: () = assert!(Reason::ALL.len() == REASON_COUNT as usize);
