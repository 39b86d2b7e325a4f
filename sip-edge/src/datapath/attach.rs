//! Datapath lifecycle: load (re-adopting pinned maps), write the
//! configuration maps, attach the program to every configured interface as a
//! pinned bpf_link, and on exit keep or remove all of it.
//!
//! Links are pinned as `<pin_dir>/link_<ifname>`. A restarted agent finds
//! the pin and swaps its freshly loaded program into the existing link
//! (`bpf_link_update`, atomic), so forwarding never stops across a restart.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        Xdp, XdpMode as AyaXdpMode,
    },
    Ebpf,
};
use sip_edge_common::{map_names, XDP_PROG_NAME};
use tracing::{info, warn};

use super::{
    loader::{self, LoadError, MapSizes},
    maps::{DatapathIface, DatapathMaps, DatapathSettings, MapsError},
};
use crate::config::{Config, DefaultPolicy, XdpMode};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Errors of bringing the datapath up or down.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The pin directory is not on a BPF filesystem.
    #[error(
        "{dir} is not on bpffs; mount it with `mount -t bpf bpf /sys/fs/bpf` (or set pin_dir)"
    )]
    NotBpffs {
        /// The directory.
        dir: PathBuf,
    },
    /// Creating or removing a pin path failed.
    #[error("{op} {path}: {source}")]
    Fs {
        /// What was attempted.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Loading failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A map operation failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// An interface does not exist.
    #[error("interface {name} not found (check [[interface]] name; `ip link` lists them)")]
    NoInterface {
        /// The configured name.
        name: String,
    },
    /// Attaching failed.
    #[error("attaching XDP to {name} in {mode:?} mode failed: {source}; {hint}")]
    Attach {
        /// Interface.
        name: String,
        /// Mode tried.
        mode: XdpMode,
        /// aya's error.
        #[source]
        source: aya::programs::ProgramError,
        /// What to try next.
        hint: &'static str,
    },
    /// Re-adopting a pinned link failed.
    #[error("re-adopting pinned link {path}: {reason}; remove it (`rm {path}`) to attach afresh")]
    Adopt {
        /// The pin.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

fn fs_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AttachError + 'a {
    move |source| AttachError::Fs {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Whether `dir` (or its nearest existing ancestor) is on bpffs.
pub fn is_bpffs(dir: &Path) -> bool {
    let mut p = Some(dir);
    while let Some(d) = p {
        if d.exists() {
            let Ok(c) = CString::new(d.as_os_str().as_encoded_bytes()) else {
                return false;
            };
            // SAFETY: statfs with a valid C string and an out-struct we own.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
                return false;
            }
            return st.f_type as i64 == BPF_FS_MAGIC;
        }
        p = d.parent();
    }
    false
}

/// The link pin of interface `name`.
pub fn link_pin(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(format!("link_{name}"))
}

/// ifindex of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// A running datapath.
pub struct Datapath {
    /// Keeps the loaded program alive while the agent runs.
    _ebpf: Ebpf,
    /// The maps (the map writer).
    pub maps: DatapathMaps,
    pin_dir: PathBuf,
    link_pins: Vec<PathBuf>,
    /// Interfaces whose existing link was re-adopted rather than created.
    pub adopted: Vec<String>,
}

/// The datapath settings a config asks for.
pub fn settings_from(cfg: &Config) -> Result<DatapathSettings, AttachError> {
    let mut ifaces = Vec::new();
    for i in &cfg.interfaces {
        let ifindex = ifindex(&i.name).ok_or_else(|| AttachError::NoInterface {
            name: i.name.clone(),
        })?;
        ifaces.push(DatapathIface {
            ifindex,
            role: i.role.code(),
        });
    }
    let mut pass_ports = cfg.signalling.ports.clone();
    pass_ports.extend(&cfg.signalling.admin_ports);
    Ok(DatapathSettings {
        ifaces,
        edge_addrs: cfg
            .addresses
            .internal
            .iter()
            .chain(&cfg.addresses.public)
            .copied()
            .collect(),
        media_ports: cfg
            .media_ranges()
            .iter()
            .map(|r| (r.start, r.end))
            .collect(),
        pass_ports,
        default_policy: match cfg.policy.default {
            DefaultPolicy::Pass => sip_edge_common::POLICY_PASS,
            DefaultPolicy::Drop => sip_edge_common::POLICY_DROP,
        },
    })
}

impl Datapath {
    /// Load, configure and attach per `cfg`, re-adopting whatever an earlier
    /// run left pinned.
    pub fn start(cfg: &Config) -> Result<Datapath, AttachError> {
        let pin_dir = cfg.pin_dir.clone();
        if !is_bpffs(&pin_dir) {
            return Err(AttachError::NotBpffs { dir: pin_dir });
        }
        std::fs::create_dir_all(&pin_dir).map_err(fs_err("create", &pin_dir))?;
        let settings = settings_from(cfg)?;
        let mut ebpf = loader::load(
            MapSizes {
                max_pinholes: cfg.limits.max_pinholes,
                dst_slots: settings.dst_slots(),
            },
            Some(&pin_dir),
        )?;
        let mut maps = DatapathMaps::from_ebpf_pinned(&mut ebpf, &pin_dir)?;
        if maps.capacity() != cfg.limits.max_pinholes {
            warn!(
                pinned = maps.capacity(),
                configured = cfg.limits.max_pinholes,
                "re-adopted pinhole table keeps its size; remove the pins (on_exit = \"remove\") to resize"
            );
        }
        maps.apply_settings(&settings)?;
        let prog: &mut Xdp = ebpf
            .program_mut(XDP_PROG_NAME)
            .ok_or(LoadError::MissingProgram {
                name: XDP_PROG_NAME,
            })?
            .try_into()
            .map_err(|source| LoadError::Verifier {
                name: XDP_PROG_NAME,
                source: Box::new(source),
            })?;
        let mut link_pins = Vec::new();
        let mut adopted = Vec::new();
        for (iface, dp) in cfg.interfaces.iter().zip(&settings.ifaces) {
            let pin = link_pin(&pin_dir, &iface.name);
            if pin.exists() {
                adopt_link(prog, &pin)?;
                info!(interface = %iface.name, "re-adopted pinned XDP link (program replaced atomically)");
                adopted.push(iface.name.clone());
            } else {
                attach_and_pin(prog, &iface.name, dp.ifindex, cfg.xdp.mode, &pin)?;
                info!(interface = %iface.name, mode = ?cfg.xdp.mode, "attached XDP");
            }
            link_pins.push(pin);
        }
        Ok(Datapath {
            _ebpf: ebpf,
            maps,
            pin_dir,
            link_pins,
            adopted,
        })
    }

    /// Detach and remove every pin (config `on_exit = "remove"`).
    pub fn remove(self) -> Result<(), AttachError> {
        let Datapath {
            _ebpf,
            maps,
            pin_dir,
            link_pins,
            ..
        } = self;
        drop(maps);
        drop(_ebpf);
        remove_pins(&pin_dir, &link_pins)
    }
}

/// Remove the given link pins, every map pin and the directory if empty.
pub fn remove_pins(pin_dir: &Path, link_pins: &[PathBuf]) -> Result<(), AttachError> {
    for p in link_pins {
        if p.exists() {
            std::fs::remove_file(p).map_err(fs_err("remove", p))?;
        }
    }
    for name in map_names::ALL {
        let p = pin_dir.join(name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(fs_err("remove", &p))?;
        }
    }
    // Only if nothing else lives there.
    let _ = std::fs::remove_dir(pin_dir);
    // The map writer lock goes with the maps it guarded.
    let _ = std::fs::remove_file(super::writer::writer_lock_path(pin_dir));
    Ok(())
}

fn attach_and_pin(
    prog: &mut Xdp,
    name: &str,
    ifindex: u32,
    mode: XdpMode,
    pin: &Path,
) -> Result<(), AttachError> {
    let flags = match mode {
        XdpMode::Native => AyaXdpMode::Driver,
        XdpMode::Skb => AyaXdpMode::Skb,
    };
    let id = prog.attach_to_if_index(ifindex, flags).map_err(|source| AttachError::Attach {
        name: name.to_owned(),
        mode,
        hint: match mode {
            XdpMode::Native => "the driver may lack native XDP: try [xdp] mode = \"skb\"; if another XDP program is attached, `bpftool net show` lists it",
            XdpMode::Skb => "if another XDP program is attached, `bpftool net show` lists it",
        },
        source,
    })?;
    let link = prog.take_link(id).map_err(|source| AttachError::Attach {
        name: name.to_owned(),
        mode,
        hint: "internal error",
        source,
    })?;
    let fd: FdLink = link.try_into().map_err(|e| AttachError::Adopt {
        path: pin.to_owned(),
        reason: format!(
            "kernel attached XDP through netlink, not bpf_link, so it cannot be pinned: {e}"
        ),
    })?;
    // Dropping the returned PinnedLink closes our fd; the pin keeps the link.
    fd.pin(pin).map_err(|e| AttachError::Adopt {
        path: pin.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(())
}

fn adopt_link(prog: &mut Xdp, pin: &Path) -> Result<(), AttachError> {
    let adopt = |reason: String| AttachError::Adopt {
        path: pin.to_owned(),
        reason,
    };
    let pinned = PinnedLink::from_pin(pin).map_err(|e| adopt(e.to_string()))?;
    let fd: FdLink = pinned.into();
    let link = XdpLink::try_from(fd).map_err(|e| adopt(e.to_string()))?;
    let id = prog
        .attach_to_link(link)
        .map_err(|e| adopt(e.to_string()))?;
    // The pin still names the same link; let go of our handle only.
    let _ = prog.take_link(id).map_err(|e| adopt(e.to_string()))?;
    Ok(())
}
