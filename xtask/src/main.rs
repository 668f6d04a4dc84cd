//! `cargo xtask`: build, test and demo bg. Every command installs what it needs first
//! (idempotently, saying what it installs), so a fresh machine needs nothing but this repo.

mod demo;
mod prereq;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the BPF toolchain if missing and build the XDP object (bpfel-unknown-none).
    BuildEbpf,
    /// build-ebpf, then the release `bgctl` (with the object embedded) and the test helpers.
    Build,
    /// Everything CI runs: host unit tests, packet tests (BPF_PROG_TEST_RUN) and namespace tests.
    /// Needs root.
    Test,
    /// A self-contained demo in network namespaces: blue answers, flip, green answers, rollback.
    /// Needs root.
    Demo,
    /// Benchmarks: packet cost (test_run), cutover, and requests/s against direct routing,
    /// nftables DNAT and HAProxy; writes BENCHMARKS.md and its charts. Needs root.
    Bench {
        /// Seconds instead of minutes; results go to target/bench-smoke, not BENCHMARKS.md.
        #[arg(long)]
        smoke: bool,
    },
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn build_ebpf() -> anyhow::Result<()> {
    prereq::bpf_toolchain()?;
    eprintln!("xtask: building the XDP object (bg-ebpf, bpfel-unknown-none, nightly)");
    // RUSTUP_TOOLCHAIN is removed so bg-ebpf/rust-toolchain.toml (nightly) is honoured, and
    // the build runs in bg-ebpf/ so its .cargo/config.toml (target, build-std) applies.
    run(Command::new("cargo")
        .current_dir(root().join("bg-ebpf"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .args(["build", "--release"]))
}

fn build() -> anyhow::Result<()> {
    build_ebpf()?;
    eprintln!("xtask: building bgctl and the test helpers (release)");
    run(Command::new("cargo")
        .current_dir(root())
        .args(["build", "--release", "-p", "bg-userspace", "-p", "bg-tests", "--bins"]))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`cargo xtask {what}` needs root (it loads XDP programs and creates network namespaces); run it with sudo");
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    require_root("test")?;
    prereq::system_packages()?;
    prereq::bench_packages()?;
    build()?;
    eprintln!("xtask: running all tests (one cargo test run, release profile as built above)");
    let mut child = Command::new("cargo")
        .current_dir(root())
        .args([
            "test", "--release", "--no-fail-fast", "-p", "bg-common", "-p", "bg-userspace", "-p", "bg-tests",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    // Pass the output through and add up the harnesses' summary lines.
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().filter(|w| *w != "ok." && *w != "FAILED.");
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    match what {
                        "passed" => passed += n.parse::<u64>().unwrap_or(0),
                        "failed" => failed += n.parse::<u64>().unwrap_or(0),
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    // The benchmarks' smoke run: every benchmark for seconds, no thresholds (the machine is
    // noisy); it fails only if a benchmark cannot run.
    let smoke = bench(true);
    println!("all tests: {passed} passed, {failed} failed");
    smoke.context("the benchmark smoke run failed")?;
    if !status.success() || failed > 0 {
        bail!("tests failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn bench(smoke: bool) -> anyhow::Result<()> {
    prereq::bench_packages()?;
    let out = root().join(if smoke { "target/bench-smoke" } else { "target/bench" });
    eprintln!("xtask: running the benchmarks{} (results in {})", if smoke { " (smoke)" } else { "" }, out.display());
    let mut cmd = Command::new(root().join("target/release/bg-bench"));
    cmd.arg("--out").arg(&out);
    if smoke {
        cmd.arg("--smoke");
    }
    run(&mut cmd)?;
    if smoke {
        return Ok(());
    }
    prereq::matplotlib()?;
    run(Command::new("python3").arg(root().join("xtask/charts.py")).arg(out.join("results.json")).arg(root()))?;
    std::fs::copy(out.join("BENCHMARKS.md"), root().join("BENCHMARKS.md"))?;
    std::fs::copy(out.join("results.json"), root().join("bench-results.json"))?;
    eprintln!("xtask: BENCHMARKS.md, bench-results.json and the charts are updated");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Build => build(),
        Cmd::Test => test(),
        Cmd::Bench { smoke } => {
            require_root("bench")?;
            prereq::system_packages()?;
            build()?;
            bench(smoke)
        }
        Cmd::Demo => {
            require_root("demo")?;
            prereq::system_packages()?;
            build()?;
            demo::run()
        }
    }
}
