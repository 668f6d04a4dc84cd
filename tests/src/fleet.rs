//! A fleet: three gateways behind an ECMP router, one etcd, return paths asymmetric.
//!
//! ```text
//!                        ┌ g0 ── uplink │ gw0 │ lan ┐
//!  client ── router ─────┼ g1 ── uplink │ gw1 │ lan ┼── br0 (ns sw: etcd 10.60.0.100:2379)
//!  10.0.0.2  ECMP to VIP └ g2 ── uplink │ gw2 │ lan ┘     ├─ blue  10.60.0.2 (default via gw0)
//!            (L4 hash)                                └─ green 10.60.0.3 (default via gw0)
//! ```
//! The router spreads the VIP 10.100.0.1 over the three gateways by a hash of the 5-tuple. The
//! backends' one route back to the client goes through gw0, so a flow that came in through gw1
//! or gw2 has its replies rewritten back to the VIP by gw0, which holds no state for it. Each
//! gateway reaches etcd over its LAN port; a partition is an nftables rule in its namespace.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{
    netns::{run, Netns, Proc},
    paths,
    topology::{BACKEND_PORT, ECHO_PORT, VIP, VIP_PORT},
};

pub const GATEWAYS: usize = 3;
pub const ETCD: &str = "10.60.0.100";
pub const ETCD_PORT: u16 = 2379;
pub const BLUE: &str = "10.60.0.2";
pub const GREEN: &str = "10.60.0.3";
/// Each color's second backend (a second address on the same host): with two backends a
/// color's Maglev table decides between them, so a gateway with another table would send a
/// moved flow to the backend that does not know it.
pub const BLUE2: &str = "10.60.0.4";
pub const GREEN2: &str = "10.60.0.5";
pub const CLIENT: &str = "10.0.0.2";

pub fn etcd_url() -> String {
    format!("http://{ETCD}:{ETCD_PORT}")
}

/// Gateway `i`'s LAN address.
pub fn lan(i: usize) -> String {
    format!("10.60.0.{}", 11 + i)
}

pub struct FleetTopology {
    /// Stopped first (fields drop in order), before the namespaces go: one etcd, or a
    /// cluster's members.
    etcd: Vec<Proc>,
    /// The endpoints the agents and the CLI are given.
    endpoints: Vec<String>,
    /// Mutual TLS to etcd: the directory with the CA, etcd's and the gateways' certificates.
    tls: Option<PathBuf>,
    /// Lines added to each gateway's `[fleet]` section at its next start.
    fleet_extra: Vec<std::sync::Mutex<String>>,
    pub run_dir: PathBuf,
    pub tag: String,
    pub client: Netns,
    pub router: Netns,
    pub sw: Netns,
    pub blue: Netns,
    pub green: Netns,
    pub gws: Vec<Netns>,
}

fn sysctl(ns: &Netns, kv: &str) -> anyhow::Result<()> {
    ns.exec(&["sysctl", "-q", "-w", kv]).map(|_| ())
}

/// A veth pair: `a_if` in `a` with `a_addr`, `b_if` in `b` (address optional), both up, with
/// full checksums on the wire and GRO on at both ends (native XDP_REDIRECT can deliver).
fn link(a: &Netns, a_if: &str, a_addr: Option<&str>, b: &Netns, b_if: &str, b_addr: Option<&str>) -> anyhow::Result<()> {
    a.exec(&["ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name])?;
    for (ns, ifn, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        if let Some(addr) = addr {
            ns.exec(&["ip", "addr", "add", addr, "dev", ifn])?;
        }
        ns.exec(&["ethtool", "-K", ifn, "tx", "off", "gro", "on"])?;
        ns.exec(&["ip", "link", "set", ifn, "up"])?;
    }
    Ok(())
}

impl FleetTopology {
    pub fn create(tag: &str) -> anyhow::Result<FleetTopology> {
        let run_dir = PathBuf::from(format!("{}/{tag}", crate::run::RUN_ROOT));
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let t = FleetTopology {
            etcd: Vec::new(),
            endpoints: vec![etcd_url()],
            tls: None,
            fleet_extra: (0..GATEWAYS).map(|_| Default::default()).collect(),
            run_dir,
            client: Netns::new(&format!("{tag}-cl"))?,
            router: Netns::new(&format!("{tag}-rt"))?,
            sw: Netns::new(&format!("{tag}-sw"))?,
            blue: Netns::new(&format!("{tag}-bl"))?,
            green: Netns::new(&format!("{tag}-gr"))?,
            gws: (0..GATEWAYS).map(|i| Netns::new(&format!("{tag}-g{i}"))).collect::<anyhow::Result<_>>()?,
            tag: tag.to_owned(),
        };
        link(&t.client, "eth0", Some(&format!("{CLIENT}/24")), &t.router, "c", Some("10.0.0.1/24"))?;
        t.client.exec(&["ip", "route", "add", "default", "via", "10.0.0.1"])?;
        t.sw.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        t.sw.exec(&["ip", "addr", "add", &format!("{ETCD}/24"), "dev", "br0"])?;
        t.sw.exec(&["ip", "link", "set", "br0", "up"])?;
        let mut nexthops = vec!["ip", "route", "add", VIP];
        let vias: Vec<(String, String)> = (0..GATEWAYS).map(|i| (format!("10.50.{}.2", i + 1), format!("g{i}"))).collect();
        for (i, gw) in t.gws.iter().enumerate() {
            link(&t.router, &format!("g{i}"), Some(&format!("10.50.{}.1/24", i + 1)), gw, "uplink", Some(&format!("10.50.{}.2/24", i + 1)))?;
            gw.exec(&["ip", "route", "add", "default", "via", &format!("10.50.{}.1", i + 1)])?;
            link(gw, "lan", Some(&format!("{}/24", lan(i))), &t.sw, &format!("p{i}"), None)?;
            t.sw.exec(&["ip", "link", "set", &format!("p{i}"), "master", "br0"])?;
            sysctl(gw, "net.ipv4.ip_forward=1")?;
            for iface in ["all", "default", "uplink", "lan"] {
                sysctl(gw, &format!("net.ipv4.conf.{iface}.rp_filter=0"))?;
            }
        }
        for (via, dev) in &vias {
            nexthops.extend(["nexthop", "via", via.as_str(), "dev", dev.as_str()]);
        }
        t.router.exec(&nexthops)?;
        sysctl(&t.router, "net.ipv4.ip_forward=1")?;
        // Hash on the 5-tuple: each client port picks a gateway.
        sysctl(&t.router, "net.ipv4.fib_multipath_hash_policy=1")?;
        for iface in ["all", "default"] {
            sysctl(&t.router, &format!("net.ipv4.conf.{iface}.rp_filter=0"))?;
        }
        for (host, addr, addr2, port) in [(&t.blue, BLUE, BLUE2, "pb"), (&t.green, GREEN, GREEN2, "pg")] {
            link(host, "eth0", Some(&format!("{addr}/24")), &t.sw, port, None)?;
            host.exec(&["ip", "addr", "add", &format!("{addr2}/24"), "dev", "eth0"])?;
            t.sw.exec(&["ip", "link", "set", port, "master", "br0"])?;
            // The one way back to the client: through gw0, whichever gateway a flow came in by.
            host.exec(&["ip", "route", "add", "default", "via", &lan(0)])?;
        }
        Ok(t)
    }

    /// Starts a one-node etcd in the switch namespace (data under the run directory: a restart
    /// keeps the fleet's keys) and waits until it answers.
    pub fn start_etcd(&mut self) -> anyhow::Result<()> {
        self.start_etcd_members(1)
    }

    /// A three-node etcd cluster in the switch namespace (members at 10.60.0.100, .101, .102);
    /// the agents and the CLI are given all three endpoints.
    pub fn start_etcd_cluster(&mut self) -> anyhow::Result<()> {
        for n in 1..3 {
            self.sw.exec(&["ip", "addr", "add", &format!("10.60.0.{}/24", 100 + n), "dev", "br0"])?;
        }
        self.endpoints = (0..3).map(|n| format!("http://10.60.0.{}:{ETCD_PORT}", 100 + n)).collect();
        self.start_etcd_members(3)
    }

    /// A one-node etcd that speaks only mutual TLS (a test CA signs etcd's certificate, for its
    /// address, and the gateways' client certificate); the agents and the CLI get `[fleet.tls]`.
    pub fn start_etcd_tls(&mut self) -> anyhow::Result<()> {
        let dir = self.run_dir.join("tls");
        let etcd = format!("subjectAltName=IP:{ETCD}\nextendedKeyUsage=serverAuth,clientAuth\n");
        crate::tls::make_certs(&dir, &[("etcd", &etcd), ("gateway", "extendedKeyUsage=clientAuth\n")])?;
        self.endpoints = vec![format!("https://{ETCD}:{ETCD_PORT}")];
        self.tls = Some(dir);
        std::fs::write(self.cli_config(), format!("[fleet]\nname = \"{}\"\netcd = [\"{}\"]\n{}", self.tag, self.endpoints[0], self.tls_section()))?;
        self.start_etcd_members(1)
    }

    /// `[fleet.tls]` for the agents and the CLI (empty without TLS).
    fn tls_section(&self) -> String {
        match &self.tls {
            None => String::new(),
            Some(d) => format!(
                "[fleet.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                d.join("ca.pem").display(),
                d.join("gateway.pem").display(),
                d.join("gateway.key").display()
            ),
        }
    }

    /// The CLI host's config with TLS: only a `[fleet]` section.
    pub fn cli_config(&self) -> PathBuf {
        self.run_dir.join("cli.toml")
    }

    /// The TLS directory (with `ca.pem`), when etcd speaks TLS.
    pub fn tls_dir(&self) -> Option<&PathBuf> {
        self.tls.as_ref()
    }

    fn start_etcd_members(&mut self, members: usize) -> anyhow::Result<()> {
        let peer = |n: usize| if members == 1 { "http://127.0.0.1:2380".to_owned() } else { format!("http://10.60.0.{}:2380", 100 + n) };
        let cluster: Vec<String> = (0..members).map(|n| format!("n{n}={}", peer(n))).collect();
        for n in 0..members {
            let data = self.run_dir.join(format!("etcd-n{n}"));
            let url = if members == 1 { self.endpoints[0].clone() } else { self.endpoints[n].clone() };
            let mut cmd = self.sw.command("etcd");
            if let Some(d) = &self.tls {
                cmd.arg("--cert-file").arg(d.join("etcd.pem")).arg("--key-file").arg(d.join("etcd.key"));
                cmd.arg("--trusted-ca-file").arg(d.join("ca.pem")).arg("--client-cert-auth");
            }
            cmd.args(["--name", &format!("n{n}"), "--data-dir", data.to_str().unwrap()])
                .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
                .args(["--listen-peer-urls", &peer(n), "--initial-advertise-peer-urls", &peer(n)])
                .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-token", &self.tag, "--log-level", "error"])
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(self.run_dir.join(format!("etcd-n{n}.log")))?);
            self.etcd.push(Proc::spawn("etcd", &mut cmd)?);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.fleet_cli(&self.sw, &["status", "--json"]).is_err() {
            if Instant::now() > deadline {
                bail!("etcd did not answer within 20 s (log: {})", self.run_dir.join("etcd.log").display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Kills etcd, every member (SIGKILL: as a crash would).
    pub fn kill_etcd(&mut self) {
        for mut p in std::mem::take(&mut self.etcd) {
            kill(&mut p);
        }
    }

    /// Kills one member of the etcd cluster.
    pub fn kill_etcd_member(&mut self, n: usize) {
        kill(&mut self.etcd[n]);
    }

    /// On each color's host an HTTP server (8080) and a line-stream echo server (7000),
    /// answering with the color's name.
    pub fn start_backends(&self) -> anyhow::Result<Vec<Proc>> {
        let srv = paths::testsrv();
        let mut procs = Vec::new();
        for (ns, addr, color) in [(&self.blue, BLUE, "blue"), (&self.blue, BLUE2, "blue"), (&self.green, GREEN, "green"), (&self.green, GREEN2, "green")] {
            let mut cmd = ns.command(srv.to_str().unwrap());
            cmd.args(["--listen", &format!("{addr}:{BACKEND_PORT}"), "--body", color]);
            procs.push(Proc::spawn_ready(&format!("{color} HTTP server"), &mut cmd, "listening", Duration::from_secs(10))?);
            let mut cmd = ns.command(srv.to_str().unwrap());
            cmd.args(["--listen", &format!("{addr}:{ECHO_PORT}"), "--body", color, "--echo"]);
            procs.push(Proc::spawn_ready(&format!("{color} stream server"), &mut cmd, "listening", Duration::from_secs(10))?);
        }
        Ok(procs)
    }

    pub fn socket(&self, i: usize) -> PathBuf {
        self.run_dir.join(format!("g{i}.sock"))
    }

    pub fn pin_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("{}/{}-g{i}", crate::run::BPFFS, self.tag))
    }

    /// The file gateway `i`'s fence hook creates (and its unfence hook removes).
    pub fn fence_mark(&self, i: usize) -> PathBuf {
        self.run_dir.join(format!("fenced-gw{i}"))
    }

    pub fn config_path(&self, i: usize) -> PathBuf {
        self.run_dir.join(format!("g{i}.toml"))
    }

    /// Gateway `i`'s config: both services, the fleet (2 s leases, fenced after 3 s cut off).
    pub fn config(&self, i: usize) -> String {
        self.config_with(i, "")
    }

    /// `config`, with `fleet_extra` (lines) added to its `[fleet]` section.
    pub fn config_with(&self, i: usize, fleet_extra: &str) -> String {
        format!(
            r#"interfaces = ["uplink", "lan"]
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
blue = ["{BLUE}:{BACKEND_PORT}", "{BLUE2}:{BACKEND_PORT}"]
green = ["{GREEN}:{BACKEND_PORT}", "{GREEN2}:{BACKEND_PORT}"]

[[service]]
name = "stream"
vip = "{VIP}:{ECHO_PORT}"
health = {{ kind = "tcp" }}
blue = ["{BLUE}:{ECHO_PORT}", "{BLUE2}:{ECHO_PORT}"]
green = ["{GREEN}:{ECHO_PORT}", "{GREEN2}:{ECHO_PORT}"]

[fleet]
name = "{tag}"
gateway = "gw{i}"
etcd = [{etcd}]
lease_ttl_secs = 2
ack_timeout_secs = 5
fence_after_secs = 3
fence_command = "touch {mark}"
unfence_command = "rm -f {mark}"
{fleet_extra}{tls}"#,
            pin = self.pin_dir(i).display(),
            sock = self.socket(i).display(),
            state = self.run_dir.join(format!("state-g{i}")).display(),
            tag = self.tag,
            etcd = self.endpoints.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", "),
            mark = self.fence_mark(i).display(),
            tls = self.tls_section(),
        )
    }

    /// Starts gateway `i`'s agent; returns once it answers `status`.
    pub fn start_agent(&self, i: usize) -> anyhow::Result<Proc> {
        self.start_agent_first_status(i).map(|(p, _)| p)
    }

    /// Restarts gateway `i`'s agent (stopped by the caller) with `fleet_extra` in its `[fleet]`.
    pub fn start_agent_with(&self, i: usize, fleet_extra: &str) -> anyhow::Result<Proc> {
        *self.fleet_extra[i].lock().unwrap() = fleet_extra.to_owned();
        self.start_agent(i)
    }

    /// `start_agent`, with the first status the agent answered.
    pub fn start_agent_first_status(&self, i: usize) -> anyhow::Result<(Proc, serde_json::Value)> {
        let cfg = self.config_path(i);
        std::fs::write(&cfg, self.config_with(i, &self.fleet_extra[i].lock().unwrap()))?;
        let mut cmd = self.gws[i].nsenter(paths::bgctl().to_str().unwrap());
        cmd.args(["agent", "--config", cfg.to_str().unwrap()]);
        cmd.env("BG_LOG", std::env::var("BG_LOG").unwrap_or_else(|_| "warn".into()));
        let agent = Proc::spawn(&format!("gw{i} agent"), &mut cmd)?;
        // Asked in-process, a millisecond apart: the first answer the agent gives.
        let deadline = Instant::now() + Duration::from_secs(20);
        let request = bg_userspace::control::Request::Status { count_flows: false };
        loop {
            if let Ok(r) = bg_userspace::control::call(&self.socket(i), &request) {
                return Ok((agent, serde_json::to_value(r)?));
            }
            if Instant::now() > deadline {
                bail!("gw{i}'s agent did not answer `bgctl status` within 20 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `bgctl --socket <gateway i's> ARGS` (fails on a non-zero exit).
    pub fn bgctl(&self, i: usize, args: &[&str]) -> anyhow::Result<Output> {
        run(Command::new(paths::bgctl()).arg("--socket").arg(self.socket(i)).args(args))
    }

    /// `bgctl status --json` of gateway `i`.
    pub fn status(&self, i: usize) -> serde_json::Value {
        serde_json::from_slice(&self.bgctl(i, &["status", "--json"]).expect("status").stdout).expect("status JSON")
    }

    /// The command `bgctl fleet --etcd URL --fleet TAG ARGS` in `ns` (a host with only the CLI
    /// and etcd access), not yet run.
    pub fn fleet_command(&self, ns: &Netns, args: &[&str]) -> Command {
        let mut cmd = ns.nsenter(paths::bgctl().to_str().unwrap());
        match &self.tls {
            // TLS settings come from a file: only a [fleet] section.
            Some(_) => cmd.args(["fleet", "--config", self.cli_config().to_str().unwrap()]).args(args),
            None => cmd.args(["fleet", "--etcd", &self.endpoints.join(","), "--fleet", &self.tag]).args(args),
        };
        cmd
    }

    /// `fleet_command`, run (fails on a non-zero exit).
    pub fn fleet_cli(&self, ns: &Netns, args: &[&str]) -> anyhow::Result<Output> {
        run(&mut self.fleet_command(ns, args))
    }

    /// `bgctl fleet status --json`, from the switch namespace.
    pub fn fleet_status(&self) -> serde_json::Value {
        serde_json::from_slice(&self.fleet_cli(&self.sw, &["status", "--json"]).expect("fleet status").stdout).expect("fleet status JSON")
    }

    /// Waits until every gateway reports both colors healthy.
    pub fn wait_healthy(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        for i in 0..GATEWAYS {
            loop {
                let s = self.status(i);
                if s["health"].as_array().is_some_and(|h| h.iter().all(|c| c["healthy"] == true)) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("gw{i} did not see both colors healthy within 20 s: {}", s["health"]);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Polls `what` until `pred` holds (panics after `limit` with the last value).
    pub fn wait_for(&self, what: &str, limit: Duration, mut pred: impl FnMut() -> Option<serde_json::Value>) -> Duration {
        let start = Instant::now();
        loop {
            if pred().is_some() {
                return start.elapsed();
            }
            assert!(start.elapsed() < limit, "{what} did not happen within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Cuts gateway `i` off from etcd (both directions), with nftables in its namespace.
    pub fn cut(&self, i: usize) -> anyhow::Result<()> {
        let rules = format!(
            "table inet bg_cut {{\n chain o {{ type filter hook output priority 0; ip daddr {ETCD} drop; }}\n \
             chain i {{ type filter hook input priority 0; ip saddr {ETCD} drop; }}\n}}\n"
        );
        let path = self.run_dir.join(format!("cut-g{i}.nft"));
        std::fs::write(&path, rules)?;
        self.gws[i].exec(&["nft", "-f", path.to_str().unwrap()]).map(|_| ())
    }

    /// Compacts etcd's history up to its current revision (etcd's JSON gateway, from the switch
    /// namespace): a watch from an older revision can no longer be resumed.
    pub fn compact_etcd(&self) -> anyhow::Result<i64> {
        let url = etcd_url();
        let out = self.sw.exec(&["curl", "-sS", "--fail", "-X", "POST", &format!("{url}/v3/kv/range"), "-d", r#"{"key":"AA=="}"#])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let rev: i64 = v["header"]["revision"].as_str().context("etcd's revision")?.parse()?;
        let body = format!(r#"{{"revision":"{rev}","physical":true}}"#);
        self.sw.exec(&["curl", "-sS", "--fail", "-X", "POST", &format!("{url}/v3/kv/compaction"), "-d", &body])?;
        Ok(rev)
    }

    /// Gateway `i`'s Maglev tables and backend sets, as pinned (raw).
    pub fn tables(&self, i: usize) -> anyhow::Result<(Vec<u32>, Vec<Vec<u8>>)> {
        use aya::maps::{Array, Map, MapData};
        let dir = self.pin_dir(i);
        let rings = Map::Array(MapData::from_pin(dir.join(bg_common::pin::MAP_RINGS))?);
        let rings: Array<&MapData, u32> = Array::try_from(&rings)?;
        let rings = rings.iter().collect::<Result<Vec<u32>, _>>()?;
        let sets = Map::Array(MapData::from_pin(dir.join(bg_common::pin::MAP_BACKEND_SETS))?);
        let sets: Array<&MapData, bg_common::BackendSet> = Array::try_from(&sets)?;
        let sets = sets.iter().map(|s| s.map(|s| bytemuck::bytes_of(&s).to_vec())).collect::<Result<Vec<_>, _>>()?;
        Ok((rings, sets))
    }

    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        self.gws[i].exec(&["nft", "delete", "table", "inet", "bg_cut"]).map(|_| ())
    }

    /// Sends all VIP traffic through gateway `i` only (None: ECMP over all three again).
    pub fn route_via(&self, only: Option<usize>) -> anyhow::Result<()> {
        let mut args = vec!["ip".to_owned(), "route".into(), "replace".into(), VIP.into()];
        for i in (0..GATEWAYS).filter(|i| only.is_none_or(|o| o == *i)) {
            args.extend(["nexthop".into(), "via".into(), format!("10.50.{}.2", i + 1), "dev".into(), format!("g{i}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.router.exec(&args).map(|_| ())
    }
}

impl Drop for FleetTopology {
    fn drop(&mut self) {
        self.kill_etcd();
        for i in 0..GATEWAYS {
            let _ = bg_userspace::dataplane::remove_pinned(&self.pin_dir(i));
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
        let _ = std::fs::remove_dir(crate::run::RUN_ROOT);
    }
}


/// SIGKILL, then reaped.
pub fn kill(p: &mut Proc) {
    if let Some(c) = p.child.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}
