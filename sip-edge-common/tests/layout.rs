//! Layout and naming invariants the kernel relies on.

use sip_edge_common::{map_names, Reason, REASON_COUNT, XDP_PROG_NAME};

#[test]
fn map_and_program_names_fit_bpf_obj_name() {
    // BPF_OBJ_NAME_LEN is 16 including the NUL.
    for name in map_names::ALL.iter().chain([XDP_PROG_NAME].iter()) {
        assert!(name.len() <= 15, "{name} is longer than 15 bytes");
    }
}

#[test]
fn reason_discriminants_are_dense_and_names_unique() {
    let mut names = std::collections::HashSet::new();
    for (i, r) in Reason::ALL.iter().enumerate() {
        assert_eq!(*r as u32, i as u32, "{r:?} out of order");
        assert!(names.insert(r.name()), "duplicate name {}", r.name());
    }
    assert_eq!(Reason::ALL.len() as u32, REASON_COUNT);
}

#[cfg(feature = "user")]
#[test]
fn addr_round_trip() {
    use sip_edge_common::{addr_from_ip, ip_from_addr};
    for ip in ["198.51.100.7", "2001:db8::1"] {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        let (fam, a) = addr_from_ip(ip);
        assert_eq!(ip_from_addr(fam, &a), Some(ip));
    }
}
