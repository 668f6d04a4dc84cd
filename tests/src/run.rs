//! Names for what a test run creates, and the sweep that removes them.
//!
//! Everything a test, the demo or the benchmarks create on the host (network namespaces, bpffs
//! pin directories, run directories under `/run/bg-test`) is named `<prefix><kind><n>`. The
//! prefix is `BG_TEST_RUN` when `cargo xtask` sets it (one per xtask invocation), else one per
//! process. Guards remove these on drop; [`sweep`] removes whatever a killed run left behind,
//! including the processes still running inside its namespaces.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

/// The prefix of every name this process creates. Ends with `-`, so one run's prefix is never
/// the prefix of another's (`bgx12-` vs `bgx123-`).
pub fn prefix() -> String {
    match std::env::var("BG_TEST_RUN") {
        Ok(p) if !p.is_empty() => p,
        _ => format!("bgp{}-", std::process::id()),
    }
}

/// A fresh name for a test object of `kind` (a few letters: `t`, `a`, `fwd`, ...).
pub fn tag(kind: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{}{kind}{}", prefix(), N.fetch_add(1, Ordering::Relaxed))
}

/// Where bg's tests keep configs and sockets.
pub const RUN_ROOT: &str = "/run/bg-test";
/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

fn lines(cmd: &mut Command) -> Vec<String> {
    cmd.stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn entries_with_prefix(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes every namespace (after killing the processes inside it), pin directory and run
/// directory whose name starts with `prefix`. Returns what it removed, one line each; empty
/// when the run cleaned up after itself.
pub fn sweep(prefix: &str) -> Vec<String> {
    assert!(prefix.len() >= 4 && prefix.ends_with('-'), "refusing to sweep with the broad prefix {prefix:?}");
    let mut removed = Vec::new();
    let namespaces: Vec<String> = lines(Command::new("ip").args(["netns", "list"]))
        .into_iter()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n.starts_with(prefix))
        .collect();
    for ns in namespaces {
        for pid in lines(Command::new("ip").args(["netns", "pids", &ns])) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                removed.push(format!("process {pid} in namespace {ns}"));
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        removed.push(format!("namespace {ns}"));
    }
    for dir in entries_with_prefix(Path::new(BPFFS), prefix) {
        let _ = bg_userspace::dataplane::remove_pinned(&dir);
        removed.push(format!("pins {}", dir.display()));
    }
    for dir in entries_with_prefix(Path::new(RUN_ROOT), prefix) {
        let _ = std::fs::remove_dir_all(&dir);
        removed.push(format!("run directory {}", dir.display()));
    }
    let _ = std::fs::remove_dir(RUN_ROOT); // only when empty
    removed
}

/// A bpffs directory for pinned maps, removed (with everything pinned in it) on drop.
pub struct PinDir(pub std::path::PathBuf);

impl PinDir {
    /// `/sys/fs/bpf/<tag>`, mounting bpffs first if the machine has none (as the agent does).
    pub fn new(kind: &str) -> anyhow::Result<PinDir> {
        bg_userspace::agent::ensure_bpffs(Path::new(BPFFS))?;
        let dir = Path::new(BPFFS).join(tag(kind));
        std::fs::create_dir_all(&dir)?;
        Ok(PinDir(dir))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = bg_userspace::dataplane::remove_pinned(&self.0);
    }
}
