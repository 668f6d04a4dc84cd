//! Embeds the XDP object built by `cargo xtask build-ebpf`, when it exists.
use std::path::PathBuf;

fn main() {
    println!("cargo:rustc-check-cfg=cfg(bg_embedded_object)");
    println!("cargo:rerun-if-env-changed=BG_EBPF_OBJECT");
    let path = match std::env::var_os("BG_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
            manifest.join("../target/bpfel-unknown-none/release/bg-ebpf")
        }
    };
    println!("cargo:rerun-if-changed={}", path.display());
    if path.is_file() {
        println!("cargo:rustc-cfg=bg_embedded_object");
        println!("cargo:rustc-env=BG_EBPF_OBJECT={}", path.canonicalize().unwrap().display());
    } else {
        println!(
            "cargo:warning=no XDP object at {}; bgctl will refuse to start an agent. Build with `cargo xtask build`.",
            path.display()
        );
    }
}
