//! Embeds the XDP object built by `cargo xtask build-ebpf`.
//!
//! `BG_EBPF_OBJECT` names it (xtask always sets it; a missing file is then an error, so a
//! bgctl without its data plane is never built by accident). Without it, the object is looked
//! for in this build's own target directory (found from `OUT_DIR`, so `CARGO_TARGET_DIR` and
//! `build.target-dir` are honoured); when it is absent there, bgctl is built without it and
//! refuses to start an agent, saying how to build it.
use std::path::PathBuf;

/// The target directory this build writes into: the nearest ancestor of `OUT_DIR` holding the
/// `CACHEDIR.TAG` cargo puts at the root of every target directory.
fn target_dir_from_out_dir() -> Option<PathBuf> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR")?);
    out.ancestors().find(|p| p.join("CACHEDIR.TAG").is_file()).map(PathBuf::from)
}

fn main() {
    println!("cargo:rustc-check-cfg=cfg(bg_embedded_object)");
    println!("cargo:rerun-if-env-changed=BG_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let explicit = std::env::var_os("BG_EBPF_OBJECT").map(PathBuf::from);
    let path = match &explicit {
        Some(p) => p.clone(),
        None => target_dir_from_out_dir()
            .expect("OUT_DIR lies inside cargo's target directory")
            .join("bpfel-unknown-none/release/bg-ebpf"),
    };
    println!("cargo:rerun-if-changed={}", path.display());
    if path.is_file() {
        println!("cargo:rustc-cfg=bg_embedded_object");
        println!("cargo:rustc-env=BG_EBPF_OBJECT={}", path.canonicalize().unwrap().display());
    } else if explicit.is_some() {
        panic!(
            "BG_EBPF_OBJECT={} does not exist; build the XDP object first (`cargo xtask build-ebpf`) or unset BG_EBPF_OBJECT",
            path.display()
        );
    } else {
        println!(
            "cargo:warning=no XDP object at {}; bgctl will refuse to start an agent. Build with `cargo xtask build`.",
            path.display()
        );
    }
}
