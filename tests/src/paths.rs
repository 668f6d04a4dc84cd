//! Where the built artifacts are. `cargo xtask` builds them before anything here runs.

use std::path::PathBuf;

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn existing(path: PathBuf, how: &str) -> PathBuf {
    assert!(path.is_file(), "{} is missing: {how}", path.display());
    path
}

/// The XDP object (`BG_EBPF_OBJECT` overrides).
pub fn ebpf_object() -> PathBuf {
    let p = std::env::var_os("BG_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("bpfel-unknown-none/release/bg-ebpf"));
    existing(p, "run `cargo xtask build-ebpf` (or `cargo xtask test`)")
}

/// The release `bgctl` with the object embedded (`BGCTL` overrides).
pub fn bgctl() -> PathBuf {
    let p = std::env::var_os("BGCTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release/bgctl"));
    existing(p, "run `cargo xtask build` (or `cargo xtask test`)")
}

/// The tiny HTTP server the backends run.
pub fn testsrv() -> PathBuf {
    existing(target_dir().join("release/bg-testsrv"), "run `cargo xtask build`")
}

/// The `variant` build of the XDP object (same behaviour, other instructions), for the upgrade
/// test.
pub fn ebpf_variant_object() -> PathBuf {
    existing(target_dir().join("bpfel-unknown-none/release/bg-ebpf-variant"), "run `cargo xtask test`")
}
