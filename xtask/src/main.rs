//! `cargo xtask`: build, test and demo bg. Every command installs what it needs first
//! (idempotently, saying what it installs), so a fresh machine needs nothing but this repo.

mod prereq;

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
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
    Demo {
        /// The fleet demo instead: three gateways behind an ECMP router, switched as one
        /// through etcd.
        #[arg(long)]
        fleet: bool,
    },
    /// The Debian package (cargo-deb): bgctl, the systemd unit (the agent as user `bg` with
    /// CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON only), a sample config, the man page, the
    /// completions; written to target/debian/bg.deb.
    Deb,
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

/// Cargo's target directory: `CARGO_TARGET_DIR` if set (made absolute against the directory
/// xtask was started in, as cargo itself reads it), else `target/` in the workspace. `main`
/// exports the absolute path, so every cargo, test and build script below agrees on it.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                std::env::current_dir().expect("current directory").join(d)
            }
        }
        _ => root().join("target"),
    }
}

/// The XDP object `build-ebpf` produces.
pub fn ebpf_object() -> PathBuf {
    target_dir().join("bpfel-unknown-none/release/bg-ebpf")
}

/// Set by the Ctrl-C/SIGTERM handler.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Process group of the child that is running now (0: none); the handler kills it.
static CHILD_GROUP: AtomicI32 = AtomicI32::new(0);

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Starts `cmd` in its own process group, registered so that Ctrl-C kills the whole group
/// (cargo, the test binaries and everything they started), not just xtask.
pub fn spawn(cmd: &mut Command) -> anyhow::Result<Child> {
    if interrupted() {
        bail!("interrupted");
    }
    let child = cmd.process_group(0).spawn().with_context(|| format!("starting {cmd:?}"))?;
    CHILD_GROUP.store(child.id() as i32, Ordering::SeqCst);
    Ok(child)
}

fn wait(mut child: Child) -> anyhow::Result<ExitStatus> {
    let status = child.wait();
    CHILD_GROUP.store(0, Ordering::SeqCst);
    Ok(status?)
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = wait(spawn(cmd)?)?;
    if interrupted() {
        bail!("interrupted");
    }
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn on_interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let group = CHILD_GROUP.load(Ordering::SeqCst);
    eprintln!("\nxtask: interrupted; stopping {} and removing what this run created", if group != 0 { "the running command" } else { "" });
    if group != 0 {
        // SAFETY: kill has no memory preconditions; a negative pid names the process group.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    }
}

/// Removes every namespace, pin and process this xtask run's prefix names. Returns what was
/// left (nothing, when every guard did its job).
fn sweep() -> Vec<String> {
    // bg-demo holds the sweep (bg-tests' `run::sweep`); not built yet, nothing was created.
    let bin = target_dir().join("release/bg-demo");
    let prefix = std::env::var("BG_TEST_RUN").unwrap_or_default();
    if !bin.exists() || prefix.is_empty() {
        return Vec::new();
    }
    match Command::new(bin).args(["sweep", &prefix]).stderr(Stdio::inherit()).output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect(),
        Err(e) => vec![format!("(the sweep could not run: {e})")],
    }
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

/// The `variant` build of the XDP object the upgrade test swaps in: same behaviour, other
/// instructions. Built first and copied aside, so the default build that follows is the one
/// `target/.../bg-ebpf` (and bgctl) holds.
pub fn ebpf_variant_object() -> PathBuf {
    target_dir().join("bpfel-unknown-none/release/bg-ebpf-variant")
}

fn build_ebpf_variant() -> anyhow::Result<()> {
    prereq::bpf_toolchain()?;
    eprintln!("xtask: building the XDP object's test variant (--features variant)");
    run(Command::new("cargo")
        .current_dir(root().join("bg-ebpf"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .args(["build", "--release", "--features", "variant"]))?;
    std::fs::copy(ebpf_object(), ebpf_variant_object()).context("copying the variant object aside")?;
    Ok(())
}

fn build() -> anyhow::Result<()> {
    build_ebpf()?;
    prereq::build_packages()?;
    eprintln!("xtask: building bgctl and the test helpers (release)");
    // The object's path is given explicitly: bgctl's build script refuses to build without it.
    run(Command::new("cargo")
        .current_dir(root())
        .env("BG_EBPF_OBJECT", ebpf_object())
        .args(["build", "--release", "-p", "bg-userspace", "-p", "bg-tests", "--bins"]))
}

/// Where `cargo xtask deb` writes the package.
pub fn deb_path() -> PathBuf {
    target_dir().join("debian/bg.deb")
}

fn deb() -> anyhow::Result<PathBuf> {
    build()?;
    prereq::cargo_deb()?;
    // The man page and the completions, made by the bgctl just built (clap_mangen, clap_complete).
    let extra = target_dir().join("deb-extra");
    std::fs::create_dir_all(&extra)?;
    let bgctl = target_dir().join("release/bgctl");
    let made = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let out = Command::new(&bgctl).args(args).output().with_context(|| format!("running bgctl {args:?}"))?;
        if !out.status.success() {
            bail!("bgctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out.stdout)
    };
    for (shell, file) in [("bash", "bgctl.bash"), ("zsh", "_bgctl"), ("fish", "bgctl.fish")] {
        std::fs::write(extra.join(file), made(&["completions", shell])?)?;
    }
    std::fs::write(extra.join("bgctl.8"), made(&["man"])?)?;
    run(Command::new("gzip").args(["-9", "-n", "-f"]).arg(extra.join("bgctl.8")))?;
    let out = deb_path();
    std::fs::create_dir_all(out.parent().unwrap())?;
    eprintln!("xtask: packaging bg (cargo deb)");
    run(Command::new("cargo")
        .current_dir(root())
        .env("BG_EBPF_OBJECT", ebpf_object())
        .args(["deb", "-p", "bg-userspace", "--no-build", "-o"])
        .arg(&out))?;
    Ok(out)
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`cargo xtask {what}` needs root (it loads XDP programs and creates network namespaces); run it with sudo");
    }
    Ok(())
}

/// What the test harnesses reported, summed over every `test result:` line.
#[derive(Default, Debug)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
    measured: u64,
    filtered: u64,
    harnesses: u64,
}

impl Tally {
    /// Adds one libtest summary line: `test result: ok. 14 passed; 0 failed; 0 ignored;
    /// 0 measured; 0 filtered out; finished in 0.01s`.
    fn add(&mut self, line: &str) -> bool {
        let Some(rest) = line.strip_prefix("test result: ") else { return false };
        self.harnesses += 1;
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().filter(|w| *w != "ok." && *w != "FAILED.").collect();
            let (Some(n), Some(what)) = (words.first().and_then(|n| n.parse::<u64>().ok()), words.get(1)) else { continue };
            match *what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                "measured" => self.measured += n,
                "filtered" => self.filtered += n,
                _ => {}
            }
        }
        true
    }
}

fn test() -> anyhow::Result<()> {
    require_root("test")?;
    prereq::system_packages()?;
    prereq::bench_packages()?;
    build_ebpf_variant()?;
    // The package test installs this (it builds everything else too).
    let package = deb()?;
    eprintln!("xtask: running all tests (one cargo test run, release profile as built above)");
    let mut child = spawn(
        Command::new("cargo")
            .current_dir(root())
            .env("BG_EBPF_OBJECT", ebpf_object())
            .env("BG_DEB", &package)
            .args(["test", "--release", "--no-fail-fast", "-p", "bg-common", "-p", "bg-userspace", "-p", "bg-tests"])
            .stdout(Stdio::piped()),
    )?;
    // Pass the output through and add up the harnesses' summary lines.
    let mut tally = Tally::default();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        tally.add(&line);
    }
    let status = wait(child)?;
    let left_by_tests = sweep();
    // The benchmarks' smoke run: every benchmark for seconds. Timings have no thresholds (the
    // machine is noisy), but an error, a reset or a moved connection is a correctness failure.
    let smoke = if interrupted() { Err(anyhow::anyhow!("interrupted")) } else { bench(true) };
    let left_by_bench = sweep();

    let mut problems = Vec::new();
    if interrupted() {
        let left = [left_by_tests.clone(), left_by_bench.clone()].concat();
        problems.push(format!("interrupted (removed: {})", if left.is_empty() { "nothing was left".to_owned() } else { left.join(", ") }));
    }
    if !status.success() {
        problems.push(format!("cargo test exited with {status}"));
    }
    if tally.failed > 0 {
        problems.push(format!("{} failed", tally.failed));
    }
    if tally.ignored > 0 || tally.filtered > 0 {
        problems.push(format!("{} ignored and {} filtered out: every test must run", tally.ignored, tally.filtered));
    }
    if tally.passed == 0 {
        problems.push("no test ran".into());
    }
    for (who, left) in [("the tests", &left_by_tests), ("the benchmarks", &left_by_bench)] {
        if !left.is_empty() && !interrupted() {
            problems.push(format!("{who} left behind (now removed): {}", left.join(", ")));
        }
    }
    let smoke_line = match &smoke {
        Ok(s) => s.clone(),
        Err(e) => {
            problems.push(format!("benchmark smoke run: {e:#}"));
            "FAILED".to_owned()
        }
    };
    // The closing line comes last, after everything that can change the verdict.
    println!(
        "all tests: {} passed, {} failed, {} ignored, {} filtered out ({} harnesses); benchmark smoke: {smoke_line}; {}",
        tally.passed,
        tally.failed,
        tally.ignored,
        tally.filtered,
        tally.harnesses,
        if problems.is_empty() { "PASSED".to_owned() } else { format!("FAILED: {}", problems.join("; ")) }
    );
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// Runs the benchmarks; returns a one-line verdict of the correctness counters they saw.
fn bench(smoke: bool) -> anyhow::Result<String> {
    prereq::bench_packages()?;
    let out = target_dir().join(if smoke { "bench-smoke" } else { "bench" });
    eprintln!("xtask: running the benchmarks{} (results in {})", if smoke { " (smoke)" } else { "" }, out.display());
    let mut cmd = Command::new(target_dir().join("release/bg-bench"));
    cmd.arg("--out").arg(&out);
    if smoke {
        cmd.arg("--smoke");
    }
    // bg-bench exits non-zero when a section fails or counts an error, reset, moved
    // connection or SYN retransmit; its last line says which.
    run(&mut cmd)?;
    let verdict = std::fs::read_to_string(out.join("verdict.txt")).unwrap_or_default().trim().to_owned();
    if smoke {
        return Ok(verdict);
    }
    prereq::matplotlib()?;
    run(Command::new("python3").arg(root().join("xtask/charts.py")).arg(out.join("results.json")).arg(root()))?;
    std::fs::copy(out.join("BENCHMARKS.md"), root().join("BENCHMARKS.md"))?;
    std::fs::copy(out.join("results.json"), root().join("bench-results.json"))?;
    eprintln!("xtask: BENCHMARKS.md, bench-results.json and the charts are updated");
    Ok(verdict)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One prefix for everything this invocation creates, so a sweep can find it all.
    if std::env::var_os("BG_TEST_RUN").is_none() {
        std::env::set_var("BG_TEST_RUN", format!("bgx{}-", std::process::id()));
    }
    std::env::set_var("CARGO_TARGET_DIR", target_dir());
    ctrlc::set_handler(on_interrupt).context("installing the Ctrl-C handler")?;
    let result = dispatch(cli);
    if interrupted() {
        let left = sweep();
        eprintln!("xtask: interrupted; removed {}", if left.is_empty() { "nothing (all clean)".to_owned() } else { left.join(", ") });
        std::process::exit(130);
    }
    result
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Build => build(),
        Cmd::Test => test(),
        Cmd::Deb => deb().map(|p| println!("{}", p.display())),
        Cmd::Bench { smoke } => {
            require_root("bench")?;
            prereq::system_packages()?;
            build()?;
            let verdict = bench(smoke);
            let left = sweep();
            if !left.is_empty() {
                eprintln!("xtask: the benchmarks left behind (now removed): {}", left.join(", "));
            }
            println!("benchmarks: {}", verdict?);
            Ok(())
        }
        Cmd::Demo { fleet } => {
            require_root("demo")?;
            prereq::system_packages()?;
            build()?;
            let r = run(Command::new(target_dir().join("release/bg-demo")).arg(if fleet { "fleet" } else { "demo" }));
            sweep();
            r
        }
    }
}
