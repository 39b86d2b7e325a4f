//! Loads the XDP object embedded at build time (aya-build writes it to
//! OUT_DIR) through the verifier, with map sizes from the config and maps
//! pinned by name under the pin directory so a restarted agent re-adopts
//! them instead of starting empty.

use std::path::Path;

use aya::{programs::Xdp, Ebpf, EbpfLoader};
use sip_edge_common::{map_names, XDP_PROG_NAME};

/// The datapath object, built from `sip-edge-ebpf` by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sip-edge"));

/// Errors of loading the datapath.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The object could not be parsed or a map could not be created/opened.
    #[error("loading the XDP object failed (is bpffs mounted at /sys/fs/bpf and are you root?): {source}")]
    Object {
        /// aya's error (boxed: it is large and errors travel far).
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// Creating or re-adopting the pinned maps failed.
    #[error("loading the XDP object with maps pinned under {dir} failed: {source}; if the pins come from an older sip-edge with another map layout, stop it and remove them (`rm -r {dir}`, or run the old agent with on_exit = \"remove\")")]
    Adopt {
        /// The pin directory.
        dir: std::path::PathBuf,
        /// aya's error (boxed: it is large and errors travel far).
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// The pins have another map layout version (`datapath::layout`).
    #[error(transparent)]
    Layout(#[from] super::layout::LayoutError),
    /// Writing the layout version into the new pins failed.
    #[error("recording the map layout version in the maps pinned under {dir} failed: {source}")]
    RecordLayout {
        /// The pin directory.
        dir: std::path::PathBuf,
        /// aya's error.
        #[source]
        source: aya::maps::MapError,
    },
    /// The program is missing from the object (build mismatch).
    #[error(
        "program {name} not found in the embedded object; rebuild with `cargo xtask build-ebpf`"
    )]
    MissingProgram {
        /// Program name.
        name: &'static str,
    },
    /// The verifier or the kernel rejected the program.
    #[error("the kernel rejected program {name}: {source}")]
    Verifier {
        /// Program name.
        name: &'static str,
        /// aya's error (carries the verifier log; boxed: it is large).
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
}

/// Map sizes chosen by configuration.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Entries of `PINHOLES` and of `PH_STATE` (one state slot per rule).
    pub max_pinholes: u32,
    /// Entries of `PH_DST` and `PH_DST_COLD` (see `DatapathSettings::dst_slots`).
    pub dst_slots: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            max_pinholes: 65536,
            dst_slots: 65536,
        }
    }
}

/// Load the embedded object and run the XDP program through the verifier,
/// without attaching it. With `pin_dir`, maps are pinned there by name (an
/// existing pin is reused, so its contents survive).
pub fn load(sizes: MapSizes, pin_dir: Option<&Path>) -> Result<Ebpf, LoadError> {
    // Before aya opens any pin: maps of another layout are refused with
    // an explanation, never re-adopted and misread.
    if let Some(dir) = pin_dir {
        super::layout::check(dir)?;
    }
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(map_names::PINHOLES, sizes.max_pinholes)
        .map_max_entries(map_names::PH_STATE, sizes.max_pinholes)
        .map_max_entries(map_names::PH_DST, sizes.dst_slots.max(1))
        .map_max_entries(map_names::PH_DST_COLD, sizes.dst_slots.max(1));
    // Pin explicitly by path rather than through the object's pinning
    // attribute: with no pin dir (tests, benchmarks) aya would otherwise pin
    // into /sys/fs/bpf itself and share state between unrelated runs.
    if let Some(dir) = pin_dir {
        for name in map_names::ALL {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(|source| match pin_dir {
        // Re-adopting pins made by a build whose map layout differs fails
        // here; say how to get out of it rather than only what failed.
        Some(dir) => LoadError::Adopt {
            dir: dir.to_owned(),
            source: Box::new(source),
        },
        None => LoadError::Object {
            source: Box::new(source),
        },
    })?;
    if let Some(dir) = pin_dir {
        super::layout::record(&mut ebpf).map_err(|source| LoadError::RecordLayout {
            dir: dir.to_owned(),
            source,
        })?;
    }
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
    prog.load().map_err(|source| LoadError::Verifier {
        name: XDP_PROG_NAME,
        source: Box::new(source),
    })?;
    Ok(ebpf)
}
