//! Network namespaces and processes that are removed on drop, also when a test panics.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    os::fd::AsFd,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// Runs a command and fails with its stderr if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// `ip` with arguments.
pub fn ip(args: &[&str]) -> anyhow::Result<Output> {
    run(Command::new("ip").args(args))
}

/// A network namespace deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        // A namespace of the same name can only be a leftover of a crashed run of this process id.
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.to_owned() };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A command run inside the namespace with `nsenter --net`, which keeps the host's /sys
    /// (so /sys/fs/bpf stays visible, unlike `ip netns exec`).
    pub fn nsenter(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name)).arg(program);
        c
    }

    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<Output> {
        run(self.command(argv[0]).args(&argv[1..]))
    }

    /// A counter from /proc/net/snmp or /proc/net/netstat in this namespace: `group` is the
    /// line prefix (`Tcp`, `Udp`, `TcpExt`), `name` the column (`EstabResets`).
    pub fn counter(&self, file: &str, group: &str, name: &str) -> anyhow::Result<u64> {
        let out = self.exec(&["cat", &format!("/proc/net/{file}")])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let prefix = format!("{group}:");
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
        let (Some(names), Some(values)) = (lines.first(), lines.get(1)) else {
            bail!("no {group} lines in /proc/net/{file}");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
            .with_context(|| format!("no {group} counter {name} in /proc/net/{file}"))
    }

    /// The kernel's checksum-error counters in this namespace: TCP (both families) and UDP
    /// `InCsumErrors`, and `Udp6InCsumErrors`/`Icmp6InCsumErrors`.
    pub fn csum_errors(&self) -> anyhow::Result<u64> {
        let mut total = self.counter("snmp", "Tcp", "InCsumErrors")? + self.counter("snmp", "Udp", "InCsumErrors")?;
        let six = self.exec(&["cat", "/proc/net/snmp6"])?;
        for line in String::from_utf8_lossy(&six.stdout).lines() {
            let mut words = line.split_whitespace();
            if let (Some(name @ ("Udp6InCsumErrors" | "Icmp6InCsumErrors")), Some(v)) = (words.next(), words.next()) {
                total += v.parse::<u64>().with_context(|| name.to_owned())?;
            }
        }
        Ok(total)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Proc> {
        let child = cmd.spawn().with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc { name: name.to_owned(), child: Some(child) })
    }

    /// Spawns with stdout piped and waits for a line containing `ready` (up to `timeout`).
    pub fn spawn_ready(name: &str, cmd: &mut Command, ready: &str, timeout: Duration) -> anyhow::Result<Proc> {
        cmd.stdout(Stdio::piped());
        let mut p = Proc::spawn(name, cmd)?;
        let stdout = p.child.as_mut().unwrap().stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let want = ready.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains(&want) {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(timeout)
            .with_context(|| format!("{name} did not become ready within {timeout:?}"))?;
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends SIGTERM and waits up to `grace` before SIGKILL. Returns whether it exited by itself.
    pub fn stop(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// Moves the calling thread into a namespace; returns it to its original one on drop. Sockets
/// the thread opens meanwhile belong to that namespace, and BPF_PROG_TEST_RUN's FIB lookups see
/// its routes.
pub struct InNetns(File);

impl InNetns {
    pub fn enter(ns: &Netns) -> anyhow::Result<InNetns> {
        use nix::sched::{setns, CloneFlags};
        let original = File::open("/proc/thread-self/ns/net")?;
        let target = File::open(format!("/run/netns/{}", ns.name))?;
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET).context("setns into the test namespace")?;
        Ok(InNetns(original))
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        let _ = nix::sched::setns(self.0.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
    }
}
