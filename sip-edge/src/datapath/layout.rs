//! The pinned map layout's version (issue #8, "Hardening", item 10): every
//! datapath records `MAP_LAYOUT_VERSION` of the sip-edge that created its
//! maps in `SETTINGS[0].layout_version`, written right after load; a loader
//! re-adopting pins and the CLI opening them read it first and refuse pins
//! of another (or no) version with an error that names the pin directory,
//! both versions and the way out, instead of misreading maps whose types
//! or meaning changed.
//!
//! Why a field of `SETTINGS` and not a map of its own: `SETTINGS` exists in
//! every pinned layout since the first release, its value has spare room
//! (the former padding, zero in older pins: "no version"), and the XDP
//! program never reads it, so the check costs the datapath nothing and adds
//! no map to keep alive. The check reads the map's value size from the
//! kernel before the value, so a future `Settings` of another size is
//! reported as another layout too, never decoded.

use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData};
use sip_edge_common::{map_names, Settings, MAP_LAYOUT_VERSION};

/// Pinned maps of another layout than this build's.
#[derive(Debug, thiserror::Error)]
#[error("the BPF maps pinned under {pin_dir} have map layout version {found}, this sip-edge needs version {expected}: they were created by another sip-edge build and are not used, since reading them could misread every pinhole. Stop the agent that created them and remove the pins (`rm -r {pin_dir}`, or let that agent exit once with `on_exit = \"remove\"`), then start again; calls carried by the old pins are cut")]
pub struct LayoutError {
    /// The pin directory.
    pub pin_dir: PathBuf,
    /// What was found, in words (`0` = pins made before versions existed).
    pub found: String,
    /// This build's `MAP_LAYOUT_VERSION`.
    pub expected: u32,
}

/// Records this build's layout version in a freshly loaded object's
/// `SETTINGS` (the loader calls it right after creating or re-adopting the
/// pins, so no pins exist without it for longer than that).
pub fn record(ebpf: &mut aya::Ebpf) -> Result<(), aya::maps::MapError> {
    let map = ebpf
        .map_mut(map_names::SETTINGS)
        .ok_or(aya::maps::MapError::InvalidName {
            name: map_names::SETTINGS.into(),
        })?;
    let mut arr: Array<&mut MapData, Settings> = Array::try_from(map)?;
    let mut s = arr.get(&0, 0)?;
    if s.layout_version != MAP_LAYOUT_VERSION {
        s.layout_version = MAP_LAYOUT_VERSION;
        arr.set(0, s, 0)?;
    }
    Ok(())
}

/// Whether any map of the datapath is pinned under `pin_dir`.
pub fn has_pins(pin_dir: &Path) -> bool {
    map_names::ALL.iter().any(|n| pin_dir.join(n).exists())
}

/// The layout version of the maps pinned under `pin_dir`: `Ok(())` when it
/// is this build's or nothing is pinned there.
pub fn check(pin_dir: &Path) -> Result<(), LayoutError> {
    if !has_pins(pin_dir) {
        return Ok(());
    }
    let mismatch = |found: String| LayoutError {
        pin_dir: pin_dir.to_owned(),
        found,
        expected: MAP_LAYOUT_VERSION,
    };
    let path = pin_dir.join(map_names::SETTINGS);
    if !path.exists() {
        return Err(mismatch(format!(
            "unknown (no {} map among the pins)",
            map_names::SETTINGS
        )));
    }
    let data = MapData::from_pin(&path)
        .map_err(|e| mismatch(format!("unreadable ({}: {e})", map_names::SETTINGS)))?;
    let size = data.info().map(|i| i.value_size()).unwrap_or(0);
    if size as usize != core::mem::size_of::<Settings>() {
        return Err(mismatch(format!(
            "unknown ({} values are {size} bytes, this build's {})",
            map_names::SETTINGS,
            core::mem::size_of::<Settings>()
        )));
    }
    let map = Map::from_map_data(data)
        .map_err(|e| mismatch(format!("unreadable ({}: {e})", map_names::SETTINGS)))?;
    let arr: Array<MapData, Settings> = Array::try_from(map)
        .map_err(|e| mismatch(format!("unreadable ({}: {e})", map_names::SETTINGS)))?;
    let s = arr
        .get(&0, 0)
        .map_err(|e| mismatch(format!("unreadable ({}: {e})", map_names::SETTINGS)))?;
    match s.layout_version {
        v if v == MAP_LAYOUT_VERSION => Ok(()),
        0 => Err(mismatch(
            "0 (none recorded: pins made by a sip-edge from before layout versions)".into(),
        )),
        v => Err(mismatch(v.to_string())),
    }
}
