//! The Debian package (`cargo xtask deb`) as an operator meets it: installed with dpkg, its
//! agent run the way its systemd unit says (the unit's user, only the unit's capabilities,
//! no new privileges; the `+` step as root), serving real traffic through a flip, then
//! purged, leaving nothing behind. Needs root; installs into this host (and purges, also
//! when the test fails).

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use bg_tests::{netns::Proc, topology::Topology};

const TOKEN: &str = "9a8b7c6d5e4f30211203f4e5d6c7b8a9";

fn deb() -> PathBuf {
    let p = std::env::var_os("BG_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debian/bg.deb")));
    assert!(p.exists(), "no package at {}: build it with `cargo xtask deb` (cargo xtask test does)", p.display());
    p
}

fn sh(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

/// dpkg knows the package, in any state (installed, half-configured, config files left).
fn known() -> bool {
    Command::new("dpkg-query").args(["-W", "bg"]).output().is_ok_and(|o| o.status.success())
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "bg"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// The modes `--prepare` widens on the host (search on bpffs, tracefs's root listable, the
/// tracepoint id's group), as they were: put back when the test ends, whatever happened.
struct HostModes(Vec<(PathBuf, u32, u32)>);

const WIDENED: &[&str] = &[
    "/sys/fs/bpf",
    "/sys/kernel/tracing",
    "/sys/kernel/tracing/events",
    "/sys/kernel/tracing/events/xdp",
    "/sys/kernel/tracing/events/xdp/xdp_redirect_err",
    "/sys/kernel/tracing/events/xdp/xdp_redirect_err/id",
];

impl HostModes {
    fn save() -> HostModes {
        HostModes(
            WIDENED.iter().filter_map(|p| std::fs::metadata(p).ok().map(|m| (PathBuf::from(p), m.mode() & 0o7777, m.gid()))).collect(),
        )
    }
}

/// Purges the package (in whatever state dpkg has it), restores the host's modes and
/// unmounts a tracefs the test's run mounted, on drop.
struct Package {
    modes: HostModes,
    tracefs_was_mounted: bool,
}

impl Drop for Package {
    fn drop(&mut self) {
        if known() {
            let _ = Command::new("dpkg").args(["--purge", "bg"]).output();
        }
        if !self.tracefs_was_mounted && Path::new("/sys/kernel/tracing/events").exists() {
            let _ = nix::mount::umount("/sys/kernel/tracing");
        }
        for (p, mode, gid) in &self.modes.0 {
            let _ = nix::unistd::chown(p, None, Some(nix::unistd::Gid::from_raw(*gid)));
            let _ = std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(*mode));
        }
    }
}

/// `Key=value` lines of the unit's [Service] section.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_owned).collect()
}

/// A capability name as setpriv and /proc/PID/status know it: (name, bit).
fn capability(name: &str) -> (String, u32) {
    let bit = match name {
        "CAP_NET_ADMIN" => 12,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("the test does not know {other}'s bit; add it"),
    };
    (name.trim_start_matches("CAP_").to_ascii_lowercase(), bit)
}

/// The generation in the pinned state file the agent wrote (the state directory is bg's).
fn persisted_generation() -> u64 {
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string("/var/lib/bg/state.json").unwrap()).unwrap();
    state["generation"].as_u64().expect("generation in state.json")
}

fn proc_status(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status")).trim().to_owned()
}

#[test]
fn the_package_installs_runs_its_agent_with_only_the_units_capabilities_serves_traffic_and_purges_clean() {
    let deb = deb();
    if known() {
        // A run that was killed before its guard could purge.
        sh(Command::new("dpkg").args(["--purge", "bg"]));
    }
    assert!(
        nix::unistd::User::from_name("bg").unwrap().is_none(),
        "this host has a user `bg` that the package did not make; the test would remove it"
    );
    for dir in ["/etc/bg", "/var/lib/bg", "/run/bg"] {
        assert!(!Path::new(dir).exists(), "{dir} exists but no bg package is installed: a bg installed by hand? The test would overwrite it");
    }
    let package = Package { modes: HostModes::save(), tracefs_was_mounted: Path::new("/sys/kernel/tracing/events").exists() };
    sh(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(installed());

    // What it installed.
    let bg = nix::unistd::User::from_name("bg").unwrap().expect("the package made the user bg");
    assert_eq!(bg.shell, Path::new("/usr/sbin/nologin"));
    assert!(bg.uid.as_raw() < 1000, "a system user: {}", bg.uid);
    let conffiles = String::from_utf8_lossy(&sh(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "bg"])).stdout).into_owned();
    assert!(conffiles.contains("/etc/bg/bg.toml"), "the sample config is a conffile: {conffiles}");
    let check = sh(Command::new("/usr/bin/bgctl").args(["check-config", "/etc/bg/bg.toml"]));
    assert!(String::from_utf8_lossy(&check.stdout).contains("ok"), "the sample config is valid");
    let man = sh(Command::new("sh").args(["-c", "zcat /usr/share/man/man8/bgctl.8.gz"]));
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(man.starts_with(".ie") || man.contains(".TH bgctl 8"), "a man page: {}", &man[..man.len().min(200)]);
    assert!(man.contains("flip"), "it documents the commands");
    for (file, marker) in [
        ("/usr/share/bash-completion/completions/bgctl", "_bgctl()"),
        ("/usr/share/zsh/vendor-completions/_bgctl", "#compdef bgctl"),
        ("/usr/share/fish/vendor_completions.d/bgctl.fish", "complete -c bgctl"),
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.contains(marker), "{file} is a completion script");
    }
    let unit_path = "/usr/lib/systemd/system/bg-agent.service";
    let unit = std::fs::read_to_string(unit_path).expect("the unit");
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let out = Command::new("systemd-analyze").args(["verify", unit_path]).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !said.contains("bg-agent.service:"), "systemd-analyze verify: {said}");
    }

    // The unit's terms, run the way systemd would (there is no systemd here).
    let user = unit_values(&unit, "User");
    assert_eq!(user, ["bg"], "a dedicated user");
    assert_eq!(unit_values(&unit, "NoNewPrivileges"), ["yes"]);
    let ambient: Vec<String> = unit_values(&unit, "AmbientCapabilities").join(" ").split_whitespace().map(str::to_owned).collect();
    let bounding: Vec<String> = unit_values(&unit, "CapabilityBoundingSet").join(" ").split_whitespace().map(str::to_owned).collect();
    assert_eq!(ambient, bounding, "the bounding set is the ambient set: nothing more can be gained");
    assert!(ambient.contains(&"CAP_BPF".into()) && ambient.contains(&"CAP_NET_ADMIN".into()), "{ambient:?}");
    assert!(!ambient.contains(&"CAP_SYS_ADMIN".into()), "no CAP_SYS_ADMIN: {ambient:?}");
    for key in ["ProtectSystem", "ProtectHome", "PrivateTmp", "ProtectKernelModules", "RestrictNamespaces", "RestrictAddressFamilies"] {
        assert_eq!(unit_values(&unit, key).len(), 1, "hardening: {key}");
    }
    let pre = unit_values(&unit, "ExecStartPre");
    let start = unit_values(&unit, "ExecStart");
    assert_eq!((pre.len(), start.len()), (1, 1), "{pre:?} {start:?}");
    let pre = pre[0].strip_prefix('+').expect("the preparation runs with full privileges (+)").to_owned();

    let t = Topology::create(&bg_tests::run::tag("p")).unwrap();
    // The operator's config: this topology's, with the unit's runtime and state directories.
    let config: String = t
        .config()
        .lines()
        .map(|l| match l {
            l if l.starts_with("socket = ") => "socket = \"/run/bg/bgctl.sock\"".to_owned(),
            l if l.starts_with("state_dir = ") => "state_dir = \"/var/lib/bg\"".to_owned(),
            l => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    // With the HTTP API on, its token made as root makes it: 0600 root's at first.
    bg_tests::http::write_token(Path::new("/etc/bg/api-token"), TOKEN);
    std::fs::write("/etc/bg/bg.toml", format!("{config}\n[api]\ntoken_file = \"/etc/bg/api-token\"\n")).unwrap();
    // RuntimeDirectory=bg, StateDirectory=bg: made by systemd, owned by the unit's user.
    for dir in ["/run/bg", "/var/lib/bg"] {
        std::fs::create_dir_all(dir).unwrap();
        nix::unistd::chown(dir, Some(bg.uid), Some(bg.gid)).unwrap();
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    }
    // The + step says bg could not read it, and how to fix that; then it passes.
    let out = Command::new("sh").args(["-c", &pre]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("api.token_file") && err.contains("not readable by user bg") && err.contains("chgrp bg"), "{err}");
    sh(Command::new("chgrp").args(["bg", "/etc/bg/api-token"]));
    std::fs::set_permissions("/etc/bg/api-token", std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    sh(Command::new("sh").args(["-c", &pre]));
    let _backends = t.start_backends().unwrap();
    let caps: Vec<(String, u32)> = ambient.iter().map(|c| capability(c)).collect();
    let set = format!("-all,{}", caps.iter().map(|(n, _)| format!("+{n}")).collect::<Vec<_>>().join(","));
    let log_path = t.run_dir.join("agent.log");
    let mut cmd = t.gw.nsenter("setpriv");
    cmd.args(["--reuid=bg", "--regid=bg", "--init-groups", &format!("--inh-caps={set}"), &format!("--ambient-caps={set}"), &format!("--bounding-set={set}"), "--no-new-privs", "--"])
        .args(start[0].split_whitespace())
        .env("BG_LOG", "info")
        .stderr(std::fs::File::create(&log_path).unwrap());
    let mut agent = Proc::spawn("the packaged agent", &mut cmd).unwrap();
    let bgctl = |args: &[&str]| Command::new("/usr/bin/bgctl").args(["--socket", "/run/bg/bgctl.sock"]).args(args).output().unwrap();
    let status = || -> serde_json::Value { serde_json::from_slice(&bgctl(&["status", "--json"]).stdout).unwrap_or_default() };
    let started = Instant::now();
    while !status()["health"].as_array().is_some_and(|h| h.len() == 2 && h.iter().all(|c| c["healthy"] == true)) {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(20), "the packaged agent did not serve a healthy status within 20 s: {log}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // It runs as bg with exactly the unit's capabilities, and nothing it could gain.
    let pid = agent.pid();
    let want = format!("{:016x}", caps.iter().fold(0u64, |m, (_, b)| m | 1 << b));
    assert!(proc_status(pid, "Uid").split_whitespace().all(|u| u == bg.uid.to_string()), "uid: {}", proc_status(pid, "Uid"));
    for field in ["CapEff", "CapPrm", "CapAmb", "CapBnd"] {
        assert_eq!(proc_status(pid, field), want, "{field} of the agent");
    }
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");

    // It serves traffic, flips, and watches its redirects (tracefs readable after the + step).
    assert_eq!(t.get_vip().unwrap(), "blue");
    let out = bgctl(&["flip", "green"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(t.get_vip().unwrap(), "green", "new connections go to green through the packaged agent");
    // Its HTTP API answers, with the token bg read.
    let out = t.gw.exec(&["curl", "-sS", "--fail", "-H", &format!("Authorization: Bearer {TOKEN}"), "http://127.0.0.1:9478/v1/status"]).unwrap();
    let api: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(api["active"], "green", "{api}");
    assert_eq!(t.csum_errors().unwrap(), 0);
    let log = std::fs::read_to_string(&log_path).unwrap();
    for bad in ["cannot watch XDP redirects", "Permission denied", "EPERM", "ERROR"] {
        assert!(!log.contains(bad), "the agent without root logged `{bad}`: {log}");
    }
    assert!(std::fs::read_dir(t.pin_dir()).unwrap().count() > 0, "its data plane is pinned");
    let owner = std::fs::metadata(t.pin_dir()).unwrap().uid();
    assert_eq!(owner, bg.uid.as_raw(), "pin_dir is bg's");
    let status_before_stop = status()["generation"].as_u64().unwrap();
    assert!(agent.stop(Duration::from_secs(10)), "the agent stops on SIGTERM");
    assert_eq!(t.get_vip().unwrap(), "green", "the data plane outlives its agent");
    let generation = persisted_generation();
    assert_eq!(status_before_stop, generation, "state.json holds the generation status showed");

    // The + step runs as root at every start: a link the agent's user planted in its own
    // pin_dir is not followed; pins an agent run as root left are migrated, links skipped.
    let target = t.run_dir.join("root-file");
    std::fs::write(&target, "root's").unwrap();
    let link = t.pin_dir().join("planted");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    nix::unistd::fchownat(None, &link, Some(bg.uid), Some(bg.gid), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).unwrap();
    sh(Command::new("sh").args(["-c", &pre]));
    assert_eq!(std::fs::metadata(&target).unwrap().uid(), 0, "the + step followed a link planted in bg's pin_dir");
    sh(Command::new("chown").arg("-R").arg("root:root").arg(t.pin_dir()));
    nix::unistd::fchownat(None, &link, Some(nix::unistd::Uid::from_raw(0)), Some(nix::unistd::Gid::from_raw(0)), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).unwrap();
    sh(Command::new("sh").args(["-c", &pre]));
    assert_eq!(std::fs::metadata(&target).unwrap().uid(), 0, "the migration followed a link");
    for e in std::fs::read_dir(t.pin_dir()).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        if m.file_type().is_file() {
            assert_eq!(m.uid(), bg.uid.as_raw(), "pin {} migrated to bg", e.path().display());
        }
    }
    assert_eq!(std::fs::metadata(t.pin_dir()).unwrap().uid(), bg.uid.as_raw());
    std::fs::remove_file(&link).unwrap();

    // Restarted as bg, the agent adopts the data plane: same color, same generation.
    let mut cmd = t.gw.nsenter("setpriv");
    cmd.args(["--reuid=bg", "--regid=bg", "--init-groups", &format!("--inh-caps={set}"), &format!("--ambient-caps={set}"), &format!("--bounding-set={set}"), "--no-new-privs", "--"])
        .args(start[0].split_whitespace())
        .env("BG_LOG", "warn");
    let mut agent = Proc::spawn("the packaged agent, again", &mut cmd).unwrap();
    let started = Instant::now();
    while status()["adopted"] != true {
        assert!(started.elapsed() < Duration::from_secs(20), "the restarted agent did not adopt the data plane: {}", status());
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = status();
    assert_eq!((s["active"].as_str(), s["generation"].as_u64()), (Some("green"), Some(generation)), "{s}");
    // An upgrade (the same package again) while it runs leaves the data plane alone.
    sh(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(std::fs::read_dir(t.pin_dir()).unwrap().count() > 0, "an upgrade removed the data plane");
    assert_eq!(t.get_vip().unwrap(), "green");
    assert_eq!(status()["generation"].as_u64(), Some(generation));
    assert!(agent.stop(Duration::from_secs(10)));

    // Purged: the data plane (prerm's cleanup), the files, the state, the user, all gone.
    let out = sh(Command::new("dpkg").args(["--purge", "bg"]));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!said.contains("could not"), "{said}");
    assert!(!installed());
    assert!(!t.pin_dir().exists() || std::fs::read_dir(t.pin_dir()).unwrap().count() == 0, "the data plane was removed");
    assert!(t.get_vip().is_err(), "nothing forwards to the VIP any more");
    for gone in [
        "/usr/bin/bgctl",
        "/etc/bg",
        "/var/lib/bg",
        "/run/bg",
        unit_path,
        "/usr/share/man/man8/bgctl.8.gz",
        "/usr/share/bash-completion/completions/bgctl",
        "/usr/share/doc/bg",
        "/etc/systemd/system/bg-agent.service",
        "/var/lib/systemd/deb-systemd-helper-masked/bg-agent.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/bg-agent.service.dsh-also",
    ] {
        assert!(std::fs::symlink_metadata(gone).is_err(), "{gone} is left after the purge");
    }
    assert!(nix::unistd::User::from_name("bg").unwrap().is_none(), "the user bg is left");
    assert!(nix::unistd::Group::from_name("bg").unwrap().is_none(), "the group bg is left");
    drop(package);
}
