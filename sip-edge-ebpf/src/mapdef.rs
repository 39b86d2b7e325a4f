//! The BTF map definition both XDP objects declare their maps with
//! (libbpf's `.maps` layout) and the thin helper wrappers around it.
//!
//! The maps are BTF-defined rather than aya-ebpf's legacy `maps`
//! definitions: the legacy ones carry no key/value BTF, so `bpftool map
//! dump` could only print hex. Accessors are the thin helper wrappers
//! aya-ebpf would provide.

use core::{ffi::c_void, ptr::NonNull};

use aya_ebpf::{
    bindings::{bpf_map_type, xdp_action::XDP_REDIRECT},
    helpers::{bpf_map_lookup_elem, bpf_map_update_elem, bpf_redirect_map},
};

/// A BTF map definition: every member is a pointer whose pointee encodes
/// the value in BTF (array length for integers, pointee type for key and
/// value). Never dereferenced; the loader replaces references to the static
/// with the map's fd.
#[repr(C)]
pub struct MapDef<const TYPE: usize, K, V, const MAX: usize, const FLAGS: usize = 0> {
    /// `BPF_MAP_TYPE_*`.
    r#type: *const [i32; TYPE],
    /// Key type.
    key: *const K,
    /// Value type.
    value: *const V,
    /// Default size.
    max_entries: *const [i32; MAX],
    /// `BPF_F_*` creation flags.
    map_flags: *const [i32; FLAGS],
}

// SAFETY: the members are BTF placeholders, never read or written.
unsafe impl<const TYPE: usize, K, V, const MAX: usize, const FLAGS: usize> Sync
    for MapDef<TYPE, K, V, MAX, FLAGS>
{
}

impl<const TYPE: usize, K, V, const MAX: usize, const FLAGS: usize> MapDef<TYPE, K, V, MAX, FLAGS> {
    /// The placeholder definition.
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    #[inline(always)]
    fn as_ptr(&self) -> *mut c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }

    /// `bpf_map_lookup_elem`: a pointer to the value, or `None`.
    #[inline(always)]
    pub fn get_ptr_mut(&self, key: &K) -> Option<*mut V> {
        // SAFETY: the helper only reads `size_of::<K>()` bytes of the key.
        let p = unsafe { bpf_map_lookup_elem(self.as_ptr(), core::ptr::from_ref(key).cast()) };
        NonNull::new(p.cast::<V>()).map(NonNull::as_ptr)
    }

    /// Same as `get_ptr_mut`, for reading.
    #[inline(always)]
    pub fn get_ptr(&self, key: &K) -> Option<*const V> {
        self.get_ptr_mut(key).map(|p| p.cast_const())
    }

    /// `bpf_map_update_elem` with `flags` (`BPF_ANY` = 0).
    #[inline(always)]
    pub fn insert(&self, key: &K, value: &V, flags: u64) -> Result<(), i64> {
        // SAFETY: the helper copies `size_of::<K>()` / `size_of::<V>()` bytes.
        let rc = unsafe {
            bpf_map_update_elem(
                self.as_ptr(),
                core::ptr::from_ref(key).cast(),
                core::ptr::from_ref(value).cast(),
                flags,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(rc)
        }
    }

    /// `bpf_redirect_map` (devmaps only): `Ok(XDP_REDIRECT)`, or on a miss
    /// `Err` carrying the action in the low bits of `flags`.
    #[inline(always)]
    pub fn redirect(&self, key: u32, flags: u64) -> Result<u32, u32> {
        // SAFETY: plain helper call on this map.
        let rc = unsafe { bpf_redirect_map(self.as_ptr(), key as u64, flags) };
        if rc == XDP_REDIRECT as i64 {
            Ok(XDP_REDIRECT)
        } else {
            Err(rc as u32)
        }
    }
}

pub const HASH: usize = bpf_map_type::BPF_MAP_TYPE_HASH as usize;
pub const ARRAY: usize = bpf_map_type::BPF_MAP_TYPE_ARRAY as usize;
pub const PERCPU_ARRAY: usize = bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY as usize;
pub const LRU_HASH: usize = bpf_map_type::BPF_MAP_TYPE_LRU_HASH as usize;
/// `BPF_F_MMAPABLE`: the agent maps the array into its memory and updates
/// single words with atomic instructions.
pub const MMAPABLE: usize = 1 << 10;
pub const DEVMAP_HASH: usize = bpf_map_type::BPF_MAP_TYPE_DEVMAP_HASH as usize;
