//! Whether an interface can run the datapath in the configured `[xdp]
//! mode`: native XDP on receive, and native redirect *into* it (the
//! driver's `ndo_xdp_xmit`), which every pinhole needs for the interface
//! media leaves by. Decided from the driver name
//! (`/sys/class/net/IF/device/driver`) or, for virtual devices, the link
//! kind (`ip -d link`: veth, vlan, bond, ...).
//!
//! The table is what mainline drivers implement as of Linux 6.x (drivers
//! with `ndo_bpf` and `ndo_xdp_xmit`); a driver missing here is reported
//! as unknown, not as unsupported. Kernels from 6.3 also publish the exact
//! feature bits over the netdev generic-netlink family; reading them would
//! replace this table on new kernels (noted in the README).

/// What a device supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// Native XDP and redirect target.
    Full,
    /// Native XDP on receive, but redirected frames cannot be sent out of it.
    RxOnly,
    /// Generic (skb) mode only.
    GenericOnly,
    /// Not in the table.
    Unknown,
}

/// Drivers with native XDP and `ndo_xdp_xmit`.
const FULL: &[&str] = &[
    "i40e",
    "ice",
    "ixgbe",
    "igb",
    "igc",
    "mlx5_core",
    "bnxt_en",
    "virtio_net",
    "ena",
    "sfc",
    "qede",
    "gve",
    "hv_netvsc",
    "mvneta",
    "mvpp2",
    "stmmac",
    "fec",
    "fsl_enetc",
    "fsl_dpaa2_eth",
    "netsec",
    "atlantic",
];

/// Drivers with native XDP on receive but no redirect into them.
const RX_ONLY: &[&str] = &["mlx4_en", "nfp", "nicvf", "ixgbevf"];

/// Virtual link kinds.
fn kind_support(kind: &str) -> Support {
    match kind {
        "veth" | "tun" => Support::Full,
        // Native XDP on a bond needs every slave to support it (5.15+).
        "bond" => Support::Unknown,
        "vlan" | "macvlan" | "ipvlan" | "bridge" | "dummy" | "vxlan" | "geneve" | "gre"
        | "wireguard" => Support::GenericOnly,
        _ => Support::Unknown,
    }
}

/// Support of a device from its driver name, or its link kind when it has
/// no driver (virtual devices).
pub fn support(driver: Option<&str>, kind: Option<&str>) -> Support {
    match (driver, kind) {
        (Some(d), _) if FULL.contains(&d) => Support::Full,
        (Some(d), _) if RX_ONLY.contains(&d) => Support::RxOnly,
        (Some(_), Some(k)) | (None, Some(k)) => kind_support(k),
        (Some("e1000" | "e1000e" | "r8169" | "tg3" | "bnx2"), None) => Support::GenericOnly,
        _ => Support::Unknown,
    }
}
