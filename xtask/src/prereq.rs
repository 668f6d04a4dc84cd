//! Installs what the build and tests need, only when missing, and says so.
//! Versions are the ones known to work on this machine kind (shared/TOOLCHAIN.md).

use std::process::{Command, Stdio};

use anyhow::Context;

use crate::run;

/// bpf-linker 0.10.x loads rustc's own libLLVM; newer releases want a system LLVM this machine
/// does not have.
const BPF_LINKER_VERSION: &str = "0.10.3";

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

pub fn bpf_toolchain() -> anyhow::Result<()> {
    let has_nightly = quiet_ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]));
    if !has_nightly {
        eprintln!("xtask: installing the nightly Rust toolchain (needed for -Z build-std=core)");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for nightly (needed to build core for bpfel-unknown-none)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !linker_ok {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (cargo install --locked, about a minute)");
        run(Command::new("cargo")
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked"]))?;
    }
    Ok(())
}

/// cargo-deb, which builds the Debian package (`cargo xtask deb`).
const CARGO_DEB_VERSION: &str = "3.8.0";

pub fn cargo_deb() -> anyhow::Result<()> {
    let ok = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION))
        .unwrap_or(false);
    if !ok {
        eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (cargo install --locked, a few minutes)");
        run(Command::new("cargo").env_remove("RUSTUP_TOOLCHAIN").args(["install", &format!("cargo-deb@{CARGO_DEB_VERSION}"), "--locked"]))?;
    }
    // It packs with dpkg-deb (and strips with binutils' strip when present).
    install_missing(&[("dpkg-deb", "dpkg")])
}

/// Debian packages the tests and the demo use: (command to look for, package).
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("curl", "curl"),
    ("nsenter", "util-linux"),
    ("sysctl", "procps"),
    // The fleet tests make a CA and certificates for etcd over mutual TLS.
    ("openssl", "openssl"),
    // Fleet mode's tests and demo start their own etcd.
    ("etcd", "etcd-server"),
    // The dashboard's test evaluates every expression on a real Prometheus scraping an agent.
    ("prometheus", "prometheus"),
];

/// What building bgctl needs: the etcd client compiles its protobufs with `protoc`.
const BUILD_PACKAGES: &[(&str, &str)] = &[("protoc", "protobuf-compiler")];

pub fn build_packages() -> anyhow::Result<()> {
    install_missing(BUILD_PACKAGES)
}

/// What the benchmarks drive and compare against: (command, package).
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("wrk", "wrk"),
    ("nginx", "nginx-light"),
    ("haproxy", "haproxy"),
    ("nft", "nftables"),
    ("socat", "socat"),
    ("nstat", "iproute2"),
    ("setpriv", "util-linux"),
];

pub fn system_packages() -> anyhow::Result<()> {
    install_missing(PACKAGES)
}

pub fn bench_packages() -> anyhow::Result<()> {
    install_missing(BENCH_PACKAGES)
}

/// matplotlib for the charts (PyPI), into the user site of the machine's python3.
pub fn matplotlib() -> anyhow::Result<()> {
    if quiet_ok(Command::new("python3").args(["-c", "import matplotlib"])) {
        return Ok(());
    }
    eprintln!("xtask: installing matplotlib (pip) for the benchmark charts");
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "matplotlib"]))
}

fn install_missing(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = packages
        .iter()
        .filter(|(cmd, _)| !quiet_ok(Command::new("sh").args(["-c", &format!("command -v {cmd}")])))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq"])
        .args(&missing))
}
