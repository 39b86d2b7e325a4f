//! Builds the XDP object with aya-build (nightly, bpf-linker, BTF) into
//! OUT_DIR, where `datapath::loader` embeds it: the agent can never run an
//! object older than its own source tree.

use anyhow::anyhow;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("sip-edge has no parent directory"))?
        .join("sip-edge-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    if std::process::Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        println!(
            "cargo:warning=bpf-linker not found on PATH: run `cargo xtask setup` first (it installs bpf-linker, rust-src and LLVM 22)"
        );
    }
    // aya-build turns every line the nested cargo prints into a
    // `cargo:warning`; keep "Compiling ..." progress out of the host build
    // output so real warnings stand out (errors are still printed).
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
