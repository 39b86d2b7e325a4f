//! Builds the XDP objects with aya-build into OUT_DIR, where `harness`
//! embeds the test and bench programs (`sip-edge-harness`); the datapath
//! object itself reaches the tests through the `sip-edge` crate.

use anyhow::anyhow;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("tests has no parent directory"))?
        .join("sip-edge-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    // Keep the nested cargo's progress out of the host build output (see
    // sip-edge/build.rs).
    std::env::set_var("CARGO_TERM_QUIET", "true");
    aya_build::build_ebpf(
        [Package {
            name: "sip-edge-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}
