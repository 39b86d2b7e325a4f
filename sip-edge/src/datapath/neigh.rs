//! Neighbour resolution for next hops the datapath met unresolved.
//!
//! `bpf_fib_lookup` cannot trigger ARP/NDP itself. The XDP program drops a
//! packet whose next hop has no neighbour entry and records the next hop in
//! `NEIGH_MISS`; the agent polls that map and asks the kernel to resolve each
//! entry with an `RTM_NEWNEIGH` request carrying `NTF_USE`, which makes the
//! kernel send a solicitation (net/core/neighbour.c, neigh_add → neigh_event_send)
//! without setting any state itself. Only the first packets of a flow are
//! lost; the flow is never black-holed for good.
//!
//! Written by hand rather than with an rtnetlink crate: it is one fixed
//! request on a blocking socket, and the async netlink stacks would add a
//! second runtime-facing dependency tree for it.

use std::{io, mem::size_of, net::IpAddr};

/// Errors of a resolution request.
#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    /// The netlink socket could not be opened or used.
    #[error("netlink {op}: {source}")]
    Socket {
        /// The call.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel answered with an error.
    #[error("kernel refused to resolve {addr} on ifindex {ifindex}: {source}")]
    Refused {
        /// Next hop.
        addr: IpAddr,
        /// Interface.
        ifindex: u32,
        /// errno from the ack.
        #[source]
        source: io::Error,
    },
}

const NTF_USE: u8 = 0x01;
const NDA_DST: u16 = 1;

#[repr(C)]
struct NdMsg {
    family: u8,
    pad1: u8,
    pad2: u16,
    ifindex: i32,
    state: u16,
    flags: u8,
    kind: u8,
}

/// Ask the kernel to resolve `addr` on `ifindex` (fire and confirm).
pub fn resolve(ifindex: u32, addr: IpAddr) -> Result<(), NeighError> {
    let (family, bytes): (u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let hdr_len = size_of::<libc::nlmsghdr>();
    let nd_len = size_of::<NdMsg>();
    let attr_len = 4 + bytes.len();
    let total = hdr_len + nd_len + attr_len;
    let mut buf = vec![0u8; total];
    let hdr = libc::nlmsghdr {
        nlmsg_len: total as u32,
        nlmsg_type: libc::RTM_NEWNEIGH,
        nlmsg_flags: (libc::NLM_F_REQUEST
            | libc::NLM_F_ACK
            | libc::NLM_F_CREATE
            | libc::NLM_F_REPLACE) as u16,
        nlmsg_seq: 1,
        nlmsg_pid: 0,
    };
    let nd = NdMsg {
        family,
        pad1: 0,
        pad2: 0,
        ifindex: ifindex as i32,
        state: libc::NUD_NONE,
        flags: NTF_USE,
        kind: 0,
    };
    // SAFETY: both are plain #[repr(C)] structs copied into a buffer sized for them.
    unsafe {
        std::ptr::copy_nonoverlapping(&hdr as *const _ as *const u8, buf.as_mut_ptr(), hdr_len);
        std::ptr::copy_nonoverlapping(
            &nd as *const _ as *const u8,
            buf.as_mut_ptr().add(hdr_len),
            nd_len,
        );
    }
    let a = hdr_len + nd_len;
    buf[a..a + 2].copy_from_slice(&(attr_len as u16).to_ne_bytes());
    buf[a + 2..a + 4].copy_from_slice(&NDA_DST.to_ne_bytes());
    buf[a + 4..].copy_from_slice(&bytes);

    // SAFETY: plain socket(2) call; the fd is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(NeighError::Socket {
            op: "socket",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a correctly sized timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            size_of::<libc::timeval>() as u32,
        );
    }
    // SAFETY: buf is valid for `total` bytes; a zeroed sockaddr_nl addresses the kernel.
    let sent = unsafe {
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr() as *const libc::c_void,
            total,
            0,
            &sa as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(NeighError::Socket {
            op: "sendto",
            source: io::Error::last_os_error(),
        });
    }
    let mut ack = [0u8; 512];
    // SAFETY: ack is a valid writable buffer of its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            ack.as_mut_ptr() as *mut libc::c_void,
            ack.len(),
            0,
        )
    };
    if n < 0 {
        return Err(NeighError::Socket {
            op: "recv",
            source: io::Error::last_os_error(),
        });
    }
    let n = n as usize;
    if n >= hdr_len + 4 {
        let ty = u16::from_ne_bytes([ack[4], ack[5]]);
        if ty == libc::NLMSG_ERROR as u16 {
            let errno = i32::from_ne_bytes([
                ack[hdr_len],
                ack[hdr_len + 1],
                ack[hdr_len + 2],
                ack[hdr_len + 3],
            ]);
            if errno != 0 {
                return Err(NeighError::Refused {
                    addr,
                    ifindex,
                    source: io::Error::from_raw_os_error(-errno),
                });
            }
        }
    }
    Ok(())
}
