//! The blue/green topology the namespace tests and the demo run on:
//!
//! ```text
//!  client (10.0.0.2) ── gw-c ┤ gateway ├ gw-b ── blue  (10.1.0.2:8080, answers "blue")
//!                            │ bg XDP  ├ gw-g ── green (10.2.0.2:8080, answers "green")
//! ```
//! The VIP 10.100.0.1:80 exists only as a rewrite on the gateway. Every host routes through the
//! gateway; checksum offload is off on every veth so a wrong incremental checksum is caught by
//! the receiving kernel (its `InCsumErrors` counters are checked).

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{
    netns::{run, Netns, Proc},
    paths,
};

pub const VIP: &str = "10.100.0.1";
pub const VIP_PORT: u16 = 80;
pub const CLIENT: &str = "10.0.0.2";
pub const BLUE: &str = "10.1.0.2";
pub const GREEN: &str = "10.2.0.2";
pub const BACKEND_PORT: u16 = 8080;
pub const VIP6: &str = "fd00:100::1";
pub const CLIENT6: &str = "fd00:c::2";
pub const BLUE6: &str = "fd00:b::2";
pub const GREEN6: &str = "fd00:a::2";
/// The web service's preview port: always the idle color.
pub const PREVIEW_PORT: u16 = 8081;
/// A long-lived line-stream service (`bg-testsrv --echo`), same port on VIP and backends.
pub const ECHO_PORT: u16 = 7000;
/// A UDP service (`bg-testsrv --udp`, IPv4 and IPv6), same port on VIPs and backends; its
/// backends are health-checked over HTTP on `BACKEND_PORT`.
pub const UDP_PORT: u16 = 5353;

/// The backend servers, by color.
pub struct Backends {
    pub blue: Vec<Proc>,
    pub green: Vec<Proc>,
}

/// One HTTP/1.1 GET on a new connection (`Connection: close`); returns the body.
pub fn http_get(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).with_context(|| format!("connect {addr}"))?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    c.read_to_string(&mut answer).with_context(|| format!("read from {addr}"))?;
    let Some((head, body)) = answer.split_once("\r\n\r\n") else { bail!("no HTTP answer from {addr}: {answer:?}") };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{addr} answered {head:?}");
    }
    Ok(body.trim().to_owned())
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Answers per body ("blue", "green").
    pub answers: std::collections::BTreeMap<String, u64>,
    pub failures: Vec<String>,
}

/// Longest a `load` runs, whatever else happens (a failing test must still end).
pub const LOAD_LIMIT: Duration = Duration::from_secs(30);

/// New-connection HTTP GETs from the client namespace to `addr`, one every `gap`, until `stop`
/// is set, `max` requests are done or `LOAD_LIMIT` has passed (bounded every way).
pub fn load(t: &Topology, addr: std::net::SocketAddr, gap: Duration, max: u64, stop: &std::sync::atomic::AtomicBool) -> LoadResult {
    let _inside = crate::netns::InNetns::enter(&t.client).expect("enter the client namespace");
    let mut r = LoadResult::default();
    let until = Instant::now() + LOAD_LIMIT;
    for i in 0..max {
        if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > until {
            break;
        }
        match http_get(addr) {
            Ok(body) => *r.answers.entry(body).or_default() += 1,
            Err(e) => r.failures.push(format!("request {i}: {e:#}")),
        }
        std::thread::sleep(gap);
    }
    r
}

/// The VIP at `port`.
pub fn vip(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(VIP.parse().expect("VIP"), port)
}

pub struct Topology {
    /// Holds the agent config; the socket lives here too. Removed on drop.
    pub run_dir: PathBuf,
    pub client: Netns,
    pub gw: Netns,
    pub blue: Netns,
    pub green: Netns,
    /// Unique per topology: names the namespaces, the socket and the pin directory.
    pub tag: String,
}

fn sysctl(ns: &Netns, kv: &str) -> anyhow::Result<()> {
    ns.exec(&["sysctl", "-q", "-w", kv]).map(|_| ())
}

impl Topology {
    /// Builds the namespaces and links. `tag` must be unique among live topologies. The hosts'
    /// ends have GRO on, so native-mode XDP_REDIRECT can deliver into them.
    pub fn create(tag: &str) -> anyhow::Result<Topology> {
        Self::create_with(tag, true)
    }

    /// `create`, with the hosts' veth ends left as they come up (`gro: false`: GRO off, so
    /// nothing can be redirected into them), as in a container setup nobody tuned.
    pub fn create_with(tag: &str, gro: bool) -> anyhow::Result<Topology> {
        let run_dir = PathBuf::from(format!("/run/bg-test/{tag}"));
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let t = Topology {
            run_dir,
            client: Netns::new(&format!("{tag}-cl"))?,
            gw: Netns::new(&format!("{tag}-gw"))?,
            blue: Netns::new(&format!("{tag}-bl"))?,
            green: Netns::new(&format!("{tag}-gr"))?,
            tag: tag.to_owned(),
        };
        for (host, gw_if, host_addr, gw_addr, host6, gw6) in [
            (&t.client, "gw-c", CLIENT, "10.0.0.1", CLIENT6, "fd00:c::1"),
            (&t.blue, "gw-b", BLUE, "10.1.0.1", BLUE6, "fd00:b::1"),
            (&t.green, "gw-g", GREEN, "10.2.0.1", GREEN6, "fd00:a::1"),
        ] {
            t.gw.exec(&["ip", "link", "add", gw_if, "type", "veth", "peer", "name", "eth0", "netns", &host.name])?;
            t.gw.exec(&["ip", "addr", "add", &format!("{gw_addr}/24"), "dev", gw_if])?;
            t.gw.exec(&["ip", "-6", "addr", "add", &format!("{gw6}/64"), "dev", gw_if, "nodad"])?;
            t.gw.exec(&["ip", "link", "set", gw_if, "up"])?;
            host.exec(&["ip", "addr", "add", &format!("{host_addr}/24"), "dev", "eth0"])?;
            host.exec(&["ip", "-6", "addr", "add", &format!("{host6}/64"), "dev", "eth0", "nodad"])?;
            host.exec(&["ip", "link", "set", "eth0", "up"])?;
            host.exec(&["ip", "route", "add", "default", "via", gw_addr])?;
            host.exec(&["ip", "-6", "route", "add", "default", "via", gw6])?;
            // Full checksums on the wire, so a wrong rewrite cannot hide behind CHECKSUM_PARTIAL.
            // GRO on the receiving end lets native-mode XDP_REDIRECT deliver into this veth.
            host.exec(&["ethtool", "-K", "eth0", "tx", "off", "gro", if gro { "on" } else { "off" }])?;
            t.gw.exec(&["ethtool", "-K", gw_if, "tx", "off"])?;
        }
        sysctl(&t.gw, "net.ipv4.ip_forward=1")?;
        sysctl(&t.gw, "net.ipv6.conf.all.forwarding=1")?;
        for iface in ["all", "default", "gw-c", "gw-b", "gw-g"] {
            sysctl(&t.gw, &format!("net.ipv4.conf.{iface}.rp_filter=0"))?;
        }
        Ok(t)
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("bgctl.sock")
    }

    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.tag))
    }

    /// The agent config for this topology.
    pub fn config(&self) -> String {
        format!(
            r#"# bg agent config for the {tag} test topology
interfaces = ["gw-c", "gw-b", "gw-g"]
pin_dir = "{pin}"
socket = "{sock}"
state_dir = "{state}"
flow_table_size = 16384
watch_window_secs = 30

[health]
kind = "http"
path = "/"
interval_ms = 200
timeout_ms = 200
rise = 2
fall = 2

[[service]]
name = "web"
vip = "{VIP}:{VIP_PORT}"
preview_vip = "{VIP}:{PREVIEW_PORT}"
protocol = "tcp"
blue = ["{BLUE}:{BACKEND_PORT}"]
green = ["{GREEN}:{BACKEND_PORT}"]

[[service]]
name = "web6"
vip = "[{VIP6}]:{VIP_PORT}"
protocol = "tcp"
blue = ["[{BLUE6}]:{BACKEND_PORT}"]
green = ["[{GREEN6}]:{BACKEND_PORT}"]

[[service]]
name = "stream"
vip = "{VIP}:{ECHO_PORT}"
protocol = "tcp"
health = {{ kind = "tcp" }}
blue = ["{BLUE}:{ECHO_PORT}"]
green = ["{GREEN}:{ECHO_PORT}"]

[[service]]
name = "dns"
vip = "{VIP}:{UDP_PORT}"
protocol = "udp"
health = {{ port = {BACKEND_PORT} }}
blue = ["{BLUE}:{UDP_PORT}"]
green = ["{GREEN}:{UDP_PORT}"]

[[service]]
name = "dns6"
vip = "[{VIP6}]:{UDP_PORT}"
protocol = "udp"
health = {{ port = {BACKEND_PORT} }}
blue = ["[{BLUE6}]:{UDP_PORT}"]
green = ["[{GREEN6}]:{UDP_PORT}"]
"#,
            tag = self.tag,
            pin = self.pin_dir().display(),
            sock = self.socket().display(),
            state = self.run_dir.join("state").display(),
        )
    }

    /// Starts the backends: on each color an HTTP server (port 8080, IPv4 and IPv6), a
    /// line-stream echo server (port 7000) and a UDP server (port 5353, IPv4 and IPv6),
    /// answering with the color's name.
    pub fn start_backends(&self) -> anyhow::Result<Backends> {
        Ok(Backends { blue: self.start_color("blue")?, green: self.start_color("green")? })
    }

    /// Starts one color's servers.
    pub fn start_color(&self, color: &str) -> anyhow::Result<Vec<Proc>> {
        let srv = paths::testsrv();
        let mut procs = Vec::new();
        let all = [(&self.blue, BLUE, "blue"), (&self.green, GREEN, "green")];
        for (ns, addr, color) in all.into_iter().filter(|c| c.2 == color) {
            let mut cmd = ns.command(srv.to_str().unwrap());
            // [::] takes IPv4 too (IPV6_V6ONLY is off by default on Linux).
            cmd.args(["--listen", &format!("[::]:{BACKEND_PORT}"), "--body", color]);
            procs.push(Proc::spawn_ready(&format!("{color} HTTP server"), &mut cmd, "listening", Duration::from_secs(10))?);
            let mut cmd = ns.command(srv.to_str().unwrap());
            cmd.args(["--listen", &format!("{addr}:{ECHO_PORT}"), "--body", color, "--echo"]);
            procs.push(Proc::spawn_ready(&format!("{color} stream server"), &mut cmd, "listening", Duration::from_secs(10))?);
            let mut cmd = ns.command(srv.to_str().unwrap());
            cmd.args(["--listen", &format!("[::]:{UDP_PORT}"), "--body", color, "--udp"]);
            procs.push(Proc::spawn_ready(&format!("{color} UDP server"), &mut cmd, "listening", Duration::from_secs(10))?);
        }
        Ok(procs)
    }

    /// The agent config's path (written by `start_agent`).
    pub fn config_path(&self) -> PathBuf {
        self.run_dir.join("bg.toml")
    }

    /// Writes the config and starts `bgctl agent` in the gateway namespace; returns once the
    /// agent answers `status`.
    pub fn start_agent(&self) -> anyhow::Result<Proc> {
        self.start_agent_with(&[], None)
    }

    /// `start_agent` with extra arguments for `bgctl agent`, and its log (stderr) written to
    /// `log` instead of the test's output.
    pub fn start_agent_with(&self, extra: &[&str], log: Option<&std::path::Path>) -> anyhow::Result<Proc> {
        let cfg = self.config_path();
        if !cfg.exists() {
            std::fs::write(&cfg, self.config()).with_context(|| format!("writing {}", cfg.display()))?;
        }
        let mut cmd = self.gw.nsenter(paths::bgctl().to_str().unwrap());
        cmd.args(["agent", "--config", cfg.to_str().unwrap()]).args(extra);
        // Quiet by default; BG_LOG=info (or debug) shows the agents' logs in test output.
        cmd.env("BG_LOG", std::env::var("BG_LOG").unwrap_or_else(|_| "warn".into()));
        if let Some(log) = log {
            cmd.stderr(std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?);
        }
        let agent = Proc::spawn("bgctl agent", &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.bgctl(&["status"]).is_ok() {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!("the agent did not answer `bgctl status` within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `bgctl status --json --count-flows`, parsed (panics when the agent does not answer).
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_slice(&self.bgctl(&["status", "--json", "--count-flows"]).expect("status").stdout).expect("status JSON")
    }

    /// The last 100 audit events (`bgctl history`).
    pub fn history(&self) -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_slice(&self.bgctl(&["history", "--json", "-n", "100"]).expect("history").stdout).expect("history JSON");
        v["events"].as_array().expect("events").clone()
    }

    /// Polls `status` until `pred` holds; returns when it did (panics after `limit`, naming
    /// `what` and the last status).
    pub fn wait_until(&self, what: &str, limit: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> Instant {
        let start = Instant::now();
        loop {
            let s = self.status();
            if pred(&s) {
                return Instant::now();
            }
            assert!(start.elapsed() < limit, "{what} did not happen within {limit:?}: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the agent reports both colors healthy (their checks passed `rise` times).
    pub fn wait_healthy(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.bgctl(&["status", "--json"])?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            if v["health"].as_array().is_some_and(|h| h.iter().all(|c| c["healthy"] == true)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("blue and green did not both become healthy within 15 s: {}", v["health"]);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `bgctl agent --cleanup` for this topology: detach and remove the pins.
    pub fn cleanup(&self) -> anyhow::Result<Output> {
        run(self.gw.nsenter(paths::bgctl().to_str().unwrap()).args(["agent", "--cleanup", "--config", self.config_path().to_str().unwrap()]))
    }

    /// Runs `bgctl --socket <this topology's socket> ARGS`, failing on a non-zero exit.
    pub fn bgctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        run(Command::new(paths::bgctl()).arg("--socket").arg(self.socket()).args(args))
    }

    /// One HTTP GET from the client to the VIP on a new connection; returns the body.
    pub fn get_vip(&self) -> anyhow::Result<String> {
        let out = self.client.exec(&[
            "curl", "-sS", "--fail", "--max-time", "5", "--no-keepalive",
            &format!("http://{VIP}:{VIP_PORT}/"),
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// One HTTP GET from the client to the IPv6 VIP on a new connection; returns the body.
    pub fn get_vip6(&self) -> anyhow::Result<String> {
        let out = self.client.exec(&[
            "curl", "-sS", "-g", "--fail", "--max-time", "5",
            &format!("http://[{VIP6}]:{VIP_PORT}/"),
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// A counter from the `Tcp:` line of /proc/net/snmp in `ns` (e.g. `EstabResets`).
    pub fn tcp_counter(ns: &Netns, name: &str) -> anyhow::Result<u64> {
        ns.counter("snmp", "Tcp", name)
    }

    /// Sum of TCP/UDP checksum errors seen by the client and both backends.
    pub fn csum_errors(&self) -> anyhow::Result<u64> {
        Ok(self.client.csum_errors()? + self.blue.csum_errors()? + self.green.csum_errors()?)
    }
}

impl Drop for Topology {
    /// The data plane outlives its agent by design: remove the pins (which detaches it) and
    /// the run directory. The namespaces go with their own guards.
    fn drop(&mut self) {
        let _ = bg_userspace::dataplane::remove_pinned(&self.pin_dir());
        let _ = std::fs::remove_dir_all(&self.run_dir);
        // The shared parent goes too once the last topology is gone (fails harmlessly before).
        if let Some(parent) = self.run_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Services and backends per color at the documented maximum.
pub const MAX_SERVICES: usize = 64;
pub const MAX_PER_COLOR: usize = 256;
/// The port every backend of the maximum config is health-checked on.
pub const MAX_CHECK_PORT: u16 = 8081;

/// Backend `j` of `color` (1 blue, 2 green) in the maximum config.
pub fn max_backend(color: u8, j: usize) -> String {
    format!("10.{color}.{}.{}", 100 + j / 200, 1 + j % 200)
}

impl Topology {
    /// Sets up the documented maximum, 64 services × 256 backends × 2 colors, checked every
    /// 3 s with TCP connects (each color's host owns its 256 addresses and answers checks on
    /// `MAX_CHECK_PORT` with one accept-and-close server), and writes its config. Returns the
    /// check servers.
    pub fn setup_max_config(&self) -> anyhow::Result<Vec<Proc>> {
        let mut servers = Vec::new();
        for (ns, color, gw_if, host) in [(&self.blue, 1u8, "gw-b", BLUE), (&self.green, 2u8, "gw-g", GREEN)] {
            let batch = self.run_dir.join(format!("addrs-{color}"));
            let lines: String = (0..MAX_PER_COLOR).map(|j| format!("addr add {}/32 dev eth0\n", max_backend(color, j))).collect();
            std::fs::write(&batch, lines)?;
            ns.exec(&["ip", "-batch", batch.to_str().unwrap()])?;
            self.gw.exec(&["ip", "route", "add", &format!("10.{color}.100.0/23"), "via", host, "dev", gw_if])?;
            let mut cmd = ns.command(paths::testsrv().to_str().unwrap());
            cmd.args(["--listen", &format!("0.0.0.0:{MAX_CHECK_PORT}"), "--body", "x", "--accept-close"]);
            servers.push(Proc::spawn_ready("check target", &mut cmd, "listening", Duration::from_secs(10))?);
        }
        let head = self.config();
        let head = &head[..head.find("[health]").context("topology config layout")?];
        // Every 3 s (11k checks a second): the tests beside this one share the two CPUs.
        let mut config = format!("{head}[health]\nport = {MAX_CHECK_PORT}\ninterval_ms = 3000\n");
        for i in 0..MAX_SERVICES {
            let list = |color: u8| (0..MAX_PER_COLOR).map(|j| format!("\"{}:{}\"", max_backend(color, j), 9000 + i)).collect::<Vec<_>>().join(", ");
            config += &format!("\n[[service]]\nname = \"s{i}\"\nvip = \"10.100.1.{}:80\"\nblue = [{}]\ngreen = [{}]\n", i + 1, list(1), list(2));
        }
        std::fs::write(self.config_path(), config)?;
        Ok(servers)
    }
}
