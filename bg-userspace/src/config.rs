//! The agent's TOML configuration and its validation.
//!
//! Validation happens completely before anything touches the kernel, so a bad config is refused
//! with nothing applied. Every error names the field (`service[1].green[0]`) and what to do.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use bg_common::{Color, MAX_BACKENDS, MAX_SERVICES};
use serde::Deserialize;

/// Default control socket path.
pub const DEFAULT_SOCKET: &str = "/run/bg/bgctl.sock";
const MIN_FLOW_TABLE: u32 = 1024;
const MAX_FLOW_TABLE: u32 = 1 << 26;
const MAX_WEIGHT: u32 = 1000;
pub const DEFAULT_UDP_IDLE_SECS: u64 = 30;
pub const DEFAULT_CLOSING_SECS: u64 = 10;
/// An unconfirmed flow (no answer from its backend yet) idle this long is over.
pub const DEFAULT_UNCONFIRMED_SECS: u64 = 5;
pub const DEFAULT_NEW_FLOWS_PER_SEC: u32 = 50_000;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/bg";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9477";
pub const DEFAULT_WATCH_WINDOW_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for bg: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config field `{field}`: {message}")]
    Field { field: String, message: String },
}

fn field_err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        message: message.into(),
    }
}

/// XDP attach mode as written in the config.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native (driver) mode, falling back to generic with a logged warning.
    #[default]
    Auto,
    Native,
    Generic,
}

/// How a backend is checked.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A TCP connect to the backend's address and port.
    #[default]
    Tcp,
    /// An HTTP/1.1 GET of `path` that must answer `expect_status`.
    Http,
}

/// Health checking of every backend of both colors.
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub kind: HealthKind,
    /// Check this port of each backend's address instead of the backend's own port (a UDP
    /// service's backends are checked over TCP or HTTP, often on another port).
    pub port: Option<u16>,
    pub path: String,
    pub expect_status: u16,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    /// Successes in a row that make a backend healthy.
    pub rise: u32,
    /// Failures in a row that make a backend unhealthy.
    pub fall: u32,
    /// A color is healthy when at least this share of its backends is.
    pub healthy_share: f64,
}

/// What real traffic must see for a color to count as healthy (README "Connection signals"):
/// judged per service and color over the last `window`, from the data path's counters. A
/// threshold of 0 is off.
#[derive(Clone, Debug, PartialEq)]
pub struct Slo {
    pub window: std::time::Duration,
    /// Flows whose handshake was decided (answered, refused or unanswered) in the window
    /// below which nothing is judged: 1 failure in 2 flows trips nothing.
    pub min_flows: u64,
    /// The most of those flows that may fail (refused, or no answer in time).
    pub max_handshake_failure_share: f64,
    /// The most answered TCP flows the backends may reset.
    pub max_reset_share: f64,
    /// The slowest the 95th percentile of TCP handshakes (SYN to the backend's SYN-ACK, as
    /// seen by the gateway) may be.
    pub max_p95_handshake: std::time::Duration,
}

/// SLO defaults: they catch a color that fails most real connections (or answers them after a
/// second) and leave healthy traffic alone.
pub const DEFAULT_SLO_WINDOW_SECS: u64 = 5;
pub const DEFAULT_SLO_MIN_FLOWS: u64 = 20;
pub const DEFAULT_SLO_FAILURE_SHARE: f64 = 0.5;
pub const DEFAULT_SLO_RESET_SHARE: f64 = 0.5;
pub const DEFAULT_SLO_P95_MS: u64 = 1000;
/// The longest SLO window.
pub const MAX_SLO_WINDOW_SECS: u64 = 600;

/// How rewritten packets leave the gateway.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// `bpf_fib_lookup` + `XDP_REDIRECT`, falling back to the kernel when the neighbour is not
    /// resolved yet.
    #[default]
    Redirect,
    /// Always `XDP_PASS`: the kernel routes every rewritten packet.
    Kernel,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => bg_common::PROTO_TCP,
            Protocol::Udp => bg_common::PROTO_UDP,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interfaces: Vec<String>,
    #[serde(default)]
    xdp_mode: XdpModeSetting,
    pin_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    flow_table_size: Option<u32>,
    unconfirmed_table_size: Option<u32>,
    unconfirmed_timeout_secs: Option<u64>,
    initial_color: Option<String>,
    #[serde(default)]
    forwarding: Forwarding,
    udp_idle_timeout_secs: Option<u64>,
    closing_timeout_secs: Option<u64>,
    max_new_flows_per_sec: Option<u32>,
    state_dir: Option<PathBuf>,
    metrics_listen: Option<String>,
    /// Serve metrics on an address other than loopback (they describe the topology).
    #[serde(default)]
    metrics_allow_remote: bool,
    watch_window_secs: Option<u64>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    slo: RawSlo,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
    /// Fleet mode: several gateways switch as one through etcd (`crate::fleet`).
    fleet: Option<RawFleet>,
    /// The HTTP API for deploy pipelines (`crate::api`); off unless this section is present.
    api: Option<RawApi>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<String>,
    token_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    #[serde(default)]
    client_names: Vec<String>,
    public_url: Option<String>,
}

/// The HTTP API's settings. Files are read when the agent starts (`api::Listener::bind`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Api {
    pub listen: SocketAddr,
    /// A file holding the bearer token every request must carry.
    pub token_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// mTLS: a client certificate signed by one of these CAs is required.
    pub client_ca: Option<PathBuf>,
    /// mTLS: and, when not empty, valid for one of these DNS names (its subjectAltName).
    pub client_names: Vec<String>,
    /// The API's URL as clients reach it (behind a proxy), for operation URLs; None: from
    /// each request's Host.
    pub public_url: Option<String>,
}

pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:9478";

impl RawApi {
    fn validate(self) -> Result<Api, ConfigError> {
        let text = self.listen.as_deref().unwrap_or(DEFAULT_API_LISTEN);
        let listen: SocketAddr = text
            .parse()
            .map_err(|_| field_err("api.listen", format!("`{text}` is not address:port; e.g. \"{DEFAULT_API_LISTEN}\"")))?;
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(field_err("api", "give both `tls_cert` and `tls_key` (HTTPS), or neither")),
        };
        if self.client_ca.is_some() && tls.is_none() {
            return Err(field_err("api.client_ca", "mTLS needs HTTPS: give `tls_cert` and `tls_key` too"));
        }
        if self.token_file.is_none() && self.client_ca.is_none() {
            return Err(field_err(
                "api",
                "gives no way to authenticate: set `token_file` (a bearer token) or `client_ca` (mTLS), or both; \
                 the API switches live traffic and is never open",
            ));
        }
        if !self.client_names.is_empty() && self.client_ca.is_none() {
            return Err(field_err("api.client_names", "names client certificates: give `client_ca` (mTLS) too"));
        }
        for (i, n) in self.client_names.iter().enumerate() {
            if rustls_pki_types::DnsName::try_from(n.as_str()).is_err() {
                return Err(field_err(format!("api.client_names[{i}]"), format!("`{n}` is not a DNS name (what a client certificate's subjectAltName carries)")));
            }
        }
        let public_url = match self.public_url {
            None => None,
            Some(u) => {
                let rest = u.strip_prefix("https://").or_else(|| u.strip_prefix("http://"));
                let ok = rest.is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]/_".contains(&b)));
                if !ok {
                    return Err(field_err("api.public_url", format!("`{u}` must be http:// or https:// then host[:port][/path], e.g. \"https://gw1.example:9478\"")));
                }
                Some(u.trim_end_matches('/').to_owned())
            }
        };
        if !listen.ip().is_loopback() && tls.is_none() {
            return Err(field_err(
                "api.listen",
                format!("`{listen}` is not a loopback address: serve it over HTTPS (`tls_cert`, `tls_key`) so that the token is not sent in clear"),
            ));
        }
        Ok(Api { listen, token_file: self.token_file, tls, client_ca: self.client_ca, client_names: self.client_names, public_url })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFleet {
    name: String,
    gateway: Option<String>,
    etcd: Vec<String>,
    ack_timeout_secs: Option<u64>,
    lease_ttl_secs: Option<u64>,
    fence_after_secs: Option<u64>,
    fence_command: Option<String>,
    unfence_command: Option<String>,
    #[serde(default)]
    rollback_on_timeout: bool,
    history: Option<u32>,
    tls: Option<RawTls>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    domain: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<HealthKind>,
    port: Option<u16>,
    path: Option<String>,
    expect_status: Option<u16>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
    healthy_share: Option<f64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlo {
    window_secs: Option<u64>,
    min_flows: Option<u64>,
    max_handshake_failure_share: Option<f64>,
    max_reset_share: Option<f64>,
    max_p95_handshake_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    #[serde(default = "default_protocol")]
    protocol: Protocol,
    preview_vip: Option<String>,
    /// Overrides of the global `[health]` settings for this service's backends.
    health: Option<RawHealth>,
    /// Overrides of the global `[slo]` settings for this service.
    slo: Option<RawSlo>,
    blue: Vec<toml::Value>,
    green: Vec<toml::Value>,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeSetting,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    /// Established flows (one entry each).
    pub flow_table_size: u32,
    /// Flows not yet answered by their backend (SYNs, first datagrams, lost flows): a table
    /// of their own, so that floods churn it and never the established one.
    pub unconfirmed_table_size: u32,
    /// An unconfirmed flow idle this long is over.
    pub unconfirmed_timeout_secs: u64,
    pub initial_color: Color,
    pub forwarding: Forwarding,
    pub udp_idle_timeout_secs: u64,
    pub closing_timeout_secs: u64,
    /// New flows per second for the whole gateway before they are dropped; 0 = unlimited.
    pub max_new_flows_per_sec: u32,
    /// Where the persisted state (`state.json`) and the audit log (`audit.jsonl`) live.
    pub state_dir: PathBuf,
    /// The Prometheus endpoint, or None when disabled.
    pub metrics_listen: Option<SocketAddr>,
    /// After a flip, how long the agent watches the new color and rolls back (once) if it turns
    /// unhealthy; 0 disables.
    pub watch_window_secs: u64,
    pub health: Health,
    pub services: Vec<Service>,
    /// Fleet mode (None: this gateway switches on its own).
    pub fleet: Option<Fleet>,
    /// The HTTP API (None: off, the default).
    pub api: Option<Api>,
}

/// TLS to etcd: the CA that signs its certificates, and a client certificate for mTLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the server's certificate must carry (default: the endpoint's host).
    pub domain: Option<String>,
}

/// A fleet of gateways that switch as one, through etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fleet {
    /// Names the fleet's keys in etcd (`/bg/fleet/NAME/`).
    pub name: String,
    /// This gateway's id in the fleet (an agent needs one; a CLI-only host does not).
    pub gateway: Option<String>,
    pub endpoints: Vec<String>,
    pub tls: Option<Tls>,
    /// How long a flip waits for every live gateway to apply it.
    pub ack_timeout_secs: u64,
    /// A gateway whose agent has not renewed its lease this long is not live.
    pub lease_ttl_secs: u64,
    /// Cut off from etcd this long, the agent runs `fence_command` (once per cut).
    pub fence_after_secs: u64,
    pub fence_command: Option<String>,
    /// Run when etcd is reachable again after a fence.
    pub unfence_command: Option<String>,
    /// A flip some live gateway did not apply in time is rolled back fleet-wide.
    pub rollback_on_timeout: bool,
    /// Flips kept in the fleet's history in etcd.
    pub history: u32,
}

pub const DEFAULT_ACK_TIMEOUT_SECS: u64 = 5;
pub const DEFAULT_LEASE_TTL_SECS: u64 = 3;
pub const DEFAULT_FENCE_AFTER_SECS: u64 = 10;
pub const DEFAULT_FLEET_HISTORY: u32 = 100;

/// Letters, digits, '-' and '_', 1 to 63 of them: what goes into an etcd key of bg's.
fn is_key_word(s: &str) -> bool {
    (1..=63).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl RawFleet {
    pub(crate) fn validate(self) -> Result<Fleet, ConfigError> {
        if !is_key_word(&self.name) {
            return Err(field_err("fleet.name", format!("`{}` must be 1 to 63 letters, digits, '-' or '_'", self.name)));
        }
        if let Some(g) = self.gateway.as_deref().filter(|g| !is_key_word(g)) {
            return Err(field_err("fleet.gateway", format!("`{g}` must be 1 to 63 letters, digits, '-' or '_' (this gateway's id, unique in the fleet)")));
        }
        if self.etcd.is_empty() {
            return Err(field_err("fleet.etcd", "is empty; list the etcd endpoints, e.g. [\"http://10.0.0.5:2379\"]"));
        }
        for (i, e) in self.etcd.iter().enumerate() {
            let Some(rest) = e.strip_prefix("http://").or_else(|| e.strip_prefix("https://")) else {
                return Err(field_err(format!("fleet.etcd[{i}]"), format!("`{e}` must start with http:// or https://, e.g. \"http://10.0.0.5:2379\"")));
            };
            if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
                return Err(field_err(format!("fleet.etcd[{i}]"), format!("`{e}` must be scheme://host:port, e.g. \"http://10.0.0.5:2379\"")));
            }
            if e.starts_with("https://") && self.tls.is_none() {
                return Err(field_err(format!("fleet.etcd[{i}]"), format!("`{e}` is https but [fleet.tls] is not set; give its `ca` (and `cert`, `key` for mTLS)")));
            }
        }
        let range = |field: &str, v: Option<u64>, default: u64, lo: u64, hi: u64| -> Result<u64, ConfigError> {
            let v = v.unwrap_or(default);
            if !(lo..=hi).contains(&v) {
                return Err(field_err(format!("fleet.{field}"), format!("use {lo} to {hi} seconds")));
            }
            Ok(v)
        };
        // At most 20 s: a flip must answer within the control socket's client timeout (30 s).
        let ack_timeout_secs = range("ack_timeout_secs", self.ack_timeout_secs, DEFAULT_ACK_TIMEOUT_SECS, 1, 20)?;
        let lease_ttl_secs = range("lease_ttl_secs", self.lease_ttl_secs, DEFAULT_LEASE_TTL_SECS, 2, 600)?;
        let fence_after_secs = range("fence_after_secs", self.fence_after_secs, DEFAULT_FENCE_AFTER_SECS, 1, 86_400)?;
        if fence_after_secs < lease_ttl_secs {
            return Err(field_err(
                "fleet.fence_after_secs",
                format!("{fence_after_secs} s is shorter than lease_ttl_secs ({lease_ttl_secs} s): a gateway would fence itself while still counted live; use at least {lease_ttl_secs}"),
            ));
        }
        let history = self.history.unwrap_or(DEFAULT_FLEET_HISTORY);
        if !(1..=10_000).contains(&history) {
            return Err(field_err("fleet.history", "use 1 to 10000 flips"));
        }
        for (field, c) in [("fence_command", &self.fence_command), ("unfence_command", &self.unfence_command)] {
            if c.as_deref().is_some_and(|c| c.trim().is_empty()) {
                return Err(field_err(format!("fleet.{field}"), "is empty; give a command (run with sh -c) or leave it out"));
            }
        }
        let tls = match self.tls {
            None => None,
            Some(t) => {
                let identity = match (t.cert, t.key) {
                    (Some(c), Some(k)) => Some((c, k)),
                    (None, None) => None,
                    _ => return Err(field_err("fleet.tls", "give both `cert` and `key` (mTLS), or neither")),
                };
                Some(Tls { ca: t.ca, identity, domain: t.domain })
            }
        };
        Ok(Fleet {
            name: self.name,
            gateway: self.gateway,
            endpoints: self.etcd,
            tls,
            ack_timeout_secs,
            lease_ttl_secs,
            fence_after_secs,
            fence_command: self.fence_command,
            unfence_command: self.unfence_command,
            rollback_on_timeout: self.rollback_on_timeout,
            history,
        })
    }
}

impl Fleet {
    /// A fleet named on the command line (`bgctl fleet --etcd URL --fleet NAME`), with the
    /// defaults of a `[fleet]` section.
    pub fn from_endpoints(name: &str, etcd: Vec<String>) -> Result<Fleet, ConfigError> {
        RawFleet {
            name: name.to_owned(),
            gateway: None,
            etcd,
            ack_timeout_secs: None,
            lease_ttl_secs: None,
            fence_after_secs: None,
            fence_command: None,
            unfence_command: None,
            rollback_on_timeout: false,
            history: None,
            tls: None,
        }
        .validate()
        .map_err(|e| match e {
            ConfigError::Field { field, message } if field == "fleet.etcd" || field.starts_with("fleet.etcd[") => {
                field_err("--etcd", message)
            }
            ConfigError::Field { field, message } if field == "fleet.name" => field_err("--fleet", message),
            other => other,
        })
    }
}

/// A `[fleet]` section on its own (a CLI-only host's file needs nothing else).
pub fn parse_fleet_only(path: &Path) -> Result<Fleet, ConfigError> {
    #[derive(Deserialize)]
    struct OnlyFleet {
        fleet: Option<RawFleet>,
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let raw: OnlyFleet = toml::from_str(&text).map_err(|e| ConfigError::Syntax { path: path.to_owned(), message: e.to_string() })?;
    raw.fleet.ok_or_else(|| field_err("fleet", format!("{} has no [fleet] section; add one with name and etcd", path.display())))?.validate()
}

/// A backend with its Maglev weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendAddr {
    pub addr: SocketAddr,
    /// Relative share of new flows; 0 takes none (drained).
    pub weight: u32,
}

#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub vip: SocketAddr,
    /// A second VIP:port that always routes to the idle color (test green before the flip).
    pub preview_vip: Option<SocketAddr>,
    pub protocol: Protocol,
    /// How this service's backends are checked (global `[health]` with the service's
    /// overrides).
    pub health: Health,
    /// What this service's real traffic must see (global `[slo]` with the service's overrides).
    pub slo: Slo,
    pub blue: Vec<BackendAddr>,
    pub green: Vec<BackendAddr>,
}

impl Service {
    pub fn backends(&self, color: Color) -> &[BackendAddr] {
        match color {
            Color::Blue => &self.blue,
            Color::Green => &self.green,
        }
    }
}

pub fn parse_color(s: &str) -> Option<Color> {
    match s {
        "blue" => Some(Color::Blue),
        "green" => Some(Color::Green),
        _ => None,
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let at = inner
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                    format!(" (line {line}, column {column})")
                })
                .unwrap_or_default();
            // A value of the wrong kind names its field; broken TOML has none to name.
            if field.is_empty() || field == "." {
                ConfigError::Syntax { path: PathBuf::from("<config>"), message: inner.to_string() }
            } else {
                field_err(field, format!("{}{at}", inner.message().trim()))
            }
        })?;
        raw.validate()
    }
}

fn parse_addr(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = s.parse().map_err(|_| {
        field_err(
            field,
            format!("`{s}` is not an address:port; write it like \"10.1.0.2:8080\" or \"[fd00::2]:8080\""),
        )
    })?;
    if addr.port() == 0 {
        return Err(field_err(field, format!("`{s}` has port 0; give the real port")));
    }
    if let SocketAddr::V6(v6) = addr {
        if v6.scope_id() != 0 {
            return Err(field_err(
                field,
                format!("`{s}` has a scope id; bg forwards by routes, not by interface: give a global or unique-local address"),
            ));
        }
    }
    if let Some(what) = not_a_host(addr.ip()) {
        return Err(field_err(field, format!("`{s}` is {what}; give a routable unicast address of another host")));
    }
    Ok(addr)
}

/// Why `ip` cannot be a VIP or a backend behind a gateway, if it cannot.
fn not_a_host(ip: IpAddr) -> Option<&'static str> {
    match ip {
        _ if ip.is_unspecified() => Some("the unspecified address"),
        _ if ip.is_multicast() => Some("a multicast address"),
        _ if ip.is_loopback() => Some("a loopback address (it never leaves the host it is on)"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address (169.254.0.0/16 is not routed)"),
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => Some("a link-local address (fe80::/10 is not routed)"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Some("an IPv4-mapped IPv6 address (write the IPv4 address)"),
        _ => None,
    }
}

/// A backend is `"addr:port"` or `{ address = "addr:port", weight = N }`.
fn parse_backend(field: &str, v: &toml::Value) -> Result<BackendAddr, ConfigError> {
    let usage = "write a backend as \"10.1.0.2:8080\" or { address = \"10.1.0.2:8080\", weight = 2 }";
    match v {
        toml::Value::String(s) => Ok(BackendAddr { addr: parse_addr(field, s)?, weight: 1 }),
        toml::Value::Table(t) => {
            if let Some(k) = t.keys().find(|k| *k != "address" && *k != "weight") {
                return Err(field_err(format!("{field}.{k}"), format!("unknown key; {usage}")));
            }
            let addr = match t.get("address") {
                Some(toml::Value::String(s)) => parse_addr(&format!("{field}.address"), s)?,
                _ => return Err(field_err(format!("{field}.address"), format!("missing or not a string; {usage}"))),
            };
            let weight = match t.get("weight") {
                None => 1,
                Some(toml::Value::Integer(w)) if (0..=MAX_WEIGHT as i64).contains(w) => *w as u32,
                Some(other) => {
                    return Err(field_err(
                        format!("{field}.weight"),
                        format!("`{other}` is not a weight; use a whole number from 0 (no new flows) to {MAX_WEIGHT}"),
                    ))
                }
            };
            Ok(BackendAddr { addr, weight })
        }
        other => Err(field_err(field, format!("`{other}` is not a backend; {usage}"))),
    }
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        if self.interfaces.is_empty() {
            return Err(field_err(
                "interfaces",
                "is empty; list the client-facing and backend-facing interfaces, e.g. [\"eth0\", \"eth1\"]",
            ));
        }
        let mut seen = HashSet::new();
        for (i, name) in self.interfaces.iter().enumerate() {
            let field = format!("interfaces[{i}]");
            if name.is_empty() || name.len() > 15 || name.contains('/') || name.contains(char::is_whitespace) {
                return Err(field_err(
                    field,
                    format!("`{name}` is not a Linux interface name (1 to 15 characters, no '/' or spaces)"),
                ));
            }
            if !seen.insert(name.as_str()) {
                return Err(field_err(field, format!("`{name}` is listed twice; list it once")));
            }
        }
        let flow_table_size = self.flow_table_size.unwrap_or(bg_common::DEFAULT_FLOW_TABLE_SIZE);
        if !(MIN_FLOW_TABLE..=MAX_FLOW_TABLE).contains(&flow_table_size) {
            return Err(field_err(
                "flow_table_size",
                format!("{flow_table_size} is out of range; use {MIN_FLOW_TABLE} to {MAX_FLOW_TABLE} entries (one per established flow)"),
            ));
        }
        let unconfirmed_table_size = self.unconfirmed_table_size.unwrap_or((flow_table_size / 8).max(MIN_FLOW_TABLE));
        if !(MIN_FLOW_TABLE..=MAX_FLOW_TABLE).contains(&unconfirmed_table_size) {
            return Err(field_err(
                "unconfirmed_table_size",
                format!("{unconfirmed_table_size} is out of range; use {MIN_FLOW_TABLE} to {MAX_FLOW_TABLE} entries"),
            ));
        }
        let unconfirmed_timeout_secs = self.unconfirmed_timeout_secs.unwrap_or(DEFAULT_UNCONFIRMED_SECS);
        if !(1..=300).contains(&unconfirmed_timeout_secs) {
            return Err(field_err("unconfirmed_timeout_secs", "use 1 to 300 seconds"));
        }
        let initial_color = match &self.initial_color {
            None => Color::Blue,
            Some(s) => parse_color(s).ok_or_else(|| {
                field_err("initial_color", format!("`{s}` is not a color; use \"blue\" or \"green\""))
            })?,
        };
        if self.services.is_empty() {
            return Err(field_err(
                "service",
                "no [[service]] given; add one with name, vip, blue and green",
            ));
        }
        if self.services.len() > MAX_SERVICES as usize {
            return Err(field_err(
                "service",
                format!("{} services given; at most {MAX_SERVICES} are supported", self.services.len()),
            ));
        }

        // The global settings alone, so their errors name the global fields.
        self.slo.clone().validate(Protocol::Tcp)?;
        let global_health = self.health.clone();
        // Replies are mapped back to their VIP by the backend's address and port alone, so a
        // backend belongs to one service and one color: where each was first listed.
        let mut owners: std::collections::HashMap<(SocketAddr, Protocol), String> = std::collections::HashMap::new();
        let mut names = HashSet::new();
        let mut vips = HashSet::new();
        let mut services = Vec::with_capacity(self.services.len());
        for (i, s) in self.services.into_iter().enumerate() {
            let at = |f: &str| format!("service[{i}].{f}");
            if s.name.is_empty() || !s.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(field_err(
                    at("name"),
                    format!("`{}` must be non-empty letters, digits, '-' or '_'", s.name),
                ));
            }
            if !names.insert(s.name.clone()) {
                return Err(field_err(at("name"), format!("`{}` is used by two services; names must be unique", s.name)));
            }
            let vip = parse_addr(&at("vip"), &s.vip)?;
            if !vips.insert((vip, s.protocol)) {
                return Err(field_err(
                    at("vip"),
                    format!("{vip}/{} is already served by another service", s.protocol.name()),
                ));
            }
            let preview_vip = match &s.preview_vip {
                None => None,
                Some(p) => {
                    let p = parse_addr(&at("preview_vip"), p)?;
                    if p.is_ipv6() != vip.is_ipv6() {
                        return Err(field_err(at("preview_vip"), "must be of the same IP version as the vip"));
                    }
                    if !vips.insert((p, s.protocol)) {
                        return Err(field_err(
                            at("preview_vip"),
                            format!("{p}/{} is already served by another service", s.protocol.name()),
                        ));
                    }
                    Some(p)
                }
            };
            let mut colors = Vec::new();
            for (color, list) in [("blue", &s.blue), ("green", &s.green)] {
                if list.is_empty() {
                    return Err(field_err(
                        at(color),
                        format!("is empty; give {color} at least one backend address:port"),
                    ));
                }
                if list.len() > MAX_BACKENDS {
                    return Err(field_err(
                        at(color),
                        format!("has {} backends; at most {MAX_BACKENDS} are supported", list.len()),
                    ));
                }
                let mut parsed: Vec<BackendAddr> = Vec::with_capacity(list.len());
                for (j, b) in list.iter().enumerate() {
                    let field = format!("service[{i}].{color}[{j}]");
                    let backend = parse_backend(&field, b)?;
                    let addr = backend.addr;
                    if addr.is_ipv6() != vip.is_ipv6() {
                        return Err(field_err(
                            field,
                            format!("`{addr}` and the VIP {vip} are of different IP versions; bg does not translate between IPv4 and IPv6"),
                        ));
                    }
                    if addr.ip() == vip.ip() {
                        return Err(field_err(field, format!("`{addr}` is the VIP itself; a backend must be another host")));
                    }
                    if parsed.iter().any(|p| p.addr == addr) {
                        return Err(field_err(field, format!("`{addr}` is listed twice; list it once")));
                    }
                    if let Some(first) = owners.insert((addr, s.protocol), format!("service[{i}].{color}[{j}] ({} {color})", s.name)) {
                        return Err(field_err(
                            field,
                            format!(
                                "`{addr}` is already {first}: a backend address:port belongs to one service and one color \
                                 (bg maps its replies back to the VIP by that address alone); give this one another port or address"
                            ),
                        ));
                    }
                    parsed.push(backend);
                }
                if parsed.iter().all(|b| b.weight == 0) {
                    return Err(field_err(
                        at(color),
                        "every backend has weight 0; give at least one a positive weight",
                    ));
                }
                colors.push(parsed);
            }
            let green = colors.pop().unwrap_or_default();
            let blue = colors.pop().unwrap_or_default();
            let health = match s.health {
                None => global_health.clone().validate(),
                Some(o) => RawHealth {
                    kind: o.kind.or(global_health.kind),
                    port: o.port.or(global_health.port),
                    path: o.path.or(global_health.path.clone()),
                    expect_status: o.expect_status.or(global_health.expect_status),
                    interval_ms: o.interval_ms.or(global_health.interval_ms),
                    timeout_ms: o.timeout_ms.or(global_health.timeout_ms),
                    rise: o.rise.or(global_health.rise),
                    fall: o.fall.or(global_health.fall),
                    healthy_share: o.healthy_share.or(global_health.healthy_share),
                }
                .validate()
                .map_err(|e| match e {
                    ConfigError::Field { field, message } => field_err(format!("service[{i}].{field}"), message),
                    other => other,
                }),
            }?;
            let slo = self.slo.merged(s.slo.as_ref()).validate(s.protocol).map_err(|e| match e {
                ConfigError::Field { field, message } if s.slo.is_some() => field_err(format!("service[{i}].{field}"), message),
                other => other,
            })?;
            services.push(Service {
                name: s.name,
                vip,
                preview_vip,
                health,
                slo,
                protocol: s.protocol,
                blue,
                green,
            });
        }

        let udp_idle_timeout_secs = self.udp_idle_timeout_secs.unwrap_or(DEFAULT_UDP_IDLE_SECS);
        if !(1..=86_400).contains(&udp_idle_timeout_secs) {
            return Err(field_err("udp_idle_timeout_secs", "use 1 to 86400 seconds"));
        }
        let closing_timeout_secs = self.closing_timeout_secs.unwrap_or(DEFAULT_CLOSING_SECS);
        if !(1..=3_600).contains(&closing_timeout_secs) {
            return Err(field_err("closing_timeout_secs", "use 1 to 3600 seconds"));
        }
        let metrics_listen: Option<SocketAddr> = match self.metrics_listen.as_deref() {
            Some("off") => None,
            Some(a) => Some(a.parse().map_err(|_| {
                field_err("metrics_listen", format!("`{a}` is not address:port (or \"off\"); e.g. \"127.0.0.1:9477\""))
            })?),
            None => Some(DEFAULT_METRICS.parse().expect("valid default")),
        };
        if let Some(a) = metrics_listen.filter(|a| !a.ip().is_loopback() && !self.metrics_allow_remote) {
            return Err(field_err(
                "metrics_listen",
                format!(
                    "`{a}` is not a loopback address; the metrics describe your backends and traffic, so they stay on this \
                     host unless you set `metrics_allow_remote = true`"
                ),
            ));
        }
        let health = self.health.validate()?;
        // A backend at any VIP's address (another service's, or a preview's) would have its
        // packets taken for VIP traffic.
        let vip_ips: Vec<(IpAddr, String)> = services
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                std::iter::once((s.vip.ip(), format!("service[{i}].vip")))
                    .chain(s.preview_vip.map(|p| (p.ip(), format!("service[{i}].preview_vip"))))
            })
            .collect();
        for (i, s) in services.iter().enumerate() {
            for (color, list) in [("blue", &s.blue), ("green", &s.green)] {
                for (j, b) in list.iter().enumerate() {
                    if let Some((_, at)) = vip_ips.iter().find(|(ip, _)| *ip == b.addr.ip()) {
                        return Err(field_err(
                            format!("service[{i}].{color}[{j}]"),
                            format!("`{}` has the address of a VIP ({at}); a backend must be another host", b.addr),
                        ));
                    }
                }
            }
        }
        let watch_window_secs = self.watch_window_secs.unwrap_or(DEFAULT_WATCH_WINDOW_SECS);
        if watch_window_secs > MAX_WATCH_WINDOW_SECS {
            return Err(field_err("watch_window_secs", format!("use 0 (off) to {MAX_WATCH_WINDOW_SECS} seconds")));
        }
        let pin_dir = self.pin_dir.unwrap_or_else(|| PathBuf::from(bg_common::pin::DEFAULT_PIN_DIR));
        if !pin_dir.is_absolute() || pin_dir.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(field_err("pin_dir", format!("`{}` must be an absolute path without `..`", pin_dir.display())));
        }
        if pin_dir.components().eq(Path::new("/sys/fs/bpf").components()) {
            return Err(field_err(
                "pin_dir",
                "is the bpffs root; give bg a directory of its own under it, such as \"/sys/fs/bpf/bg\"",
            ));
        }
        let socket = self.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        if !socket.is_absolute() {
            return Err(field_err("socket", format!("`{}` must be an absolute path", socket.display())));
        }
        let state_dir = self.state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(field_err("state_dir", format!("`{}` must be an absolute path", state_dir.display())));
        }
        let kernel_bytes = flow_memory_bytes(flow_table_size, unconfirmed_table_size);
        if let Some(ram) = mem_total_bytes() {
            if kernel_bytes > ram / MAX_RAM_SHARE_DIVISOR {
                return Err(field_err(
                    "flow_table_size",
                    format!(
                        "{flow_table_size} entries (with unconfirmed_table_size {unconfirmed_table_size}) take about {} MiB of \
                         kernel memory, more than a quarter of this host's RAM ({} MiB); use a smaller table",
                        kernel_bytes >> 20,
                        ram >> 20
                    ),
                ));
            }
        }
        let fleet = match self.fleet {
            None => None,
            Some(f) => {
                let f = f.validate()?;
                if f.gateway.is_none() {
                    return Err(field_err("fleet.gateway", "is missing; an agent in a fleet needs this gateway's id, unique in the fleet (e.g. \"gw-1\")"));
                }
                Some(f)
            }
        };
        let api = self.api.map(RawApi::validate).transpose()?;
        if let (Some(a), Some(m)) = (&api, metrics_listen) {
            if a.listen == m {
                return Err(field_err("api.listen", format!("`{}` is also `metrics_listen`; give each its own port", a.listen)));
            }
        }
        Ok(Config {
            fleet,
            api,
            state_dir,
            metrics_listen,
            watch_window_secs,
            health,
            interfaces: self.interfaces,
            forwarding: self.forwarding,
            udp_idle_timeout_secs,
            closing_timeout_secs,
            max_new_flows_per_sec: self.max_new_flows_per_sec.unwrap_or(DEFAULT_NEW_FLOWS_PER_SEC),
            xdp_mode: self.xdp_mode,
            pin_dir,
            socket,
            flow_table_size,
            unconfirmed_table_size,
            unconfirmed_timeout_secs,
            initial_color,
            services,
        })
    }
}

/// The longest automatic-rollback window (a day).
pub const MAX_WATCH_WINDOW_SECS: u64 = 86_400;
/// The flow tables may take at most 1/4 of the host's RAM.
const MAX_RAM_SHARE_DIVISOR: u64 = 4;

/// Kernel memory of the flow tables (LRU maps are preallocated): per family, an element is the
/// kernel's header (hash node, LRU node, hash: 48 B) + key + `FlowEntry`, and each map has a
/// 16-byte bucket per entry rounded up to a power of two; the preview reply map is sized like
/// the unconfirmed tables.
pub fn flow_memory_bytes(flow_table_size: u32, unconfirmed_table_size: u32) -> u64 {
    let entry = std::mem::size_of::<bg_common::FlowEntry>() as u64;
    let per_flow = (48 + 16 + entry) + (48 + 40 + entry);
    let buckets = |n: u32| 16 * (n as u64).next_power_of_two();
    let preview = 48 + 40 + std::mem::size_of::<bg_common::PreviewReply>() as u64;
    (flow_table_size as u64 + unconfirmed_table_size as u64) * per_flow
        + 2 * (buckets(flow_table_size) + buckets(unconfirmed_table_size))
        + unconfirmed_table_size as u64 * preview
        + buckets(unconfirmed_table_size)
}

/// MemTotal from /proc/meminfo, when it can be read.
fn mem_total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl RawSlo {
    /// The global settings with a service's overrides.
    fn merged(&self, o: Option<&RawSlo>) -> RawSlo {
        let Some(o) = o else { return self.clone() };
        RawSlo {
            window_secs: o.window_secs.or(self.window_secs),
            min_flows: o.min_flows.or(self.min_flows),
            max_handshake_failure_share: o.max_handshake_failure_share.or(self.max_handshake_failure_share),
            max_reset_share: o.max_reset_share.or(self.max_reset_share),
            max_p95_handshake_ms: o.max_p95_handshake_ms.or(self.max_p95_handshake_ms),
        }
    }

    /// A UDP service has no handshakes: its failure share (flows without a reply) is off
    /// unless set, and its reset and latency thresholds do not apply.
    fn validate(self, protocol: Protocol) -> Result<Slo, ConfigError> {
        let window_secs = self.window_secs.unwrap_or(DEFAULT_SLO_WINDOW_SECS);
        if !(1..=MAX_SLO_WINDOW_SECS).contains(&window_secs) {
            return Err(field_err("slo.window_secs", format!("use 1 to {MAX_SLO_WINDOW_SECS} seconds")));
        }
        let min_flows = self.min_flows.unwrap_or(DEFAULT_SLO_MIN_FLOWS);
        if !(1..=1_000_000_000).contains(&min_flows) {
            return Err(field_err("slo.min_flows", "use 1 to 1000000000 flows (judging on fewer than about 20 trips on chance)"));
        }
        let tcp = protocol == Protocol::Tcp;
        let share = |field: &str, v: Option<f64>, default: f64| -> Result<f64, ConfigError> {
            let v = v.unwrap_or(default);
            if !(0.0..=1.0).contains(&v) {
                return Err(field_err(format!("slo.{field}"), "use a share from 0 (off) to 1, e.g. 0.5"));
            }
            Ok(v)
        };
        let max_handshake_failure_share =
            share("max_handshake_failure_share", self.max_handshake_failure_share, if tcp { DEFAULT_SLO_FAILURE_SHARE } else { 0.0 })?;
        let max_reset_share = share("max_reset_share", self.max_reset_share, if tcp { DEFAULT_SLO_RESET_SHARE } else { 0.0 })?;
        let p95 = self.max_p95_handshake_ms.unwrap_or(if tcp { DEFAULT_SLO_P95_MS } else { 0 });
        if p95 > 600_000 {
            return Err(field_err("slo.max_p95_handshake_ms", "use 0 (off) to 600000 ms"));
        }
        Ok(Slo {
            window: std::time::Duration::from_secs(window_secs),
            min_flows,
            max_handshake_failure_share,
            max_reset_share,
            max_p95_handshake: std::time::Duration::from_millis(p95),
        })
    }
}

impl RawHealth {
    fn validate(self) -> Result<Health, ConfigError> {
        let kind = self.kind.unwrap_or_default();
        if self.port == Some(0) {
            return Err(field_err("health.port", "port 0 cannot be checked; give the port the backends answer checks on"));
        }
        let path = self.path.unwrap_or_else(|| "/".to_owned());
        if !path.starts_with('/') || path.contains(char::is_whitespace) {
            return Err(field_err("health.path", format!("`{path}` must start with '/' and contain no spaces")));
        }
        let expect_status = self.expect_status.unwrap_or(200);
        if !(100..=599).contains(&expect_status) {
            return Err(field_err("health.expect_status", "use an HTTP status from 100 to 599"));
        }
        let interval_ms = self.interval_ms.unwrap_or(1000);
        if !(50..=600_000).contains(&interval_ms) {
            return Err(field_err("health.interval_ms", "use 50 to 600000 ms"));
        }
        let timeout_ms = self.timeout_ms.unwrap_or(interval_ms.min(1000));
        if timeout_ms == 0 || timeout_ms > interval_ms {
            return Err(field_err("health.timeout_ms", format!("use 1 to interval_ms ({interval_ms}) ms")));
        }
        let rise = self.rise.unwrap_or(2);
        let fall = self.fall.unwrap_or(3);
        for (f, v) in [("health.rise", rise), ("health.fall", fall)] {
            if !(1..=100).contains(&v) {
                return Err(field_err(f, "use 1 to 100 checks in a row"));
            }
        }
        let healthy_share = self.healthy_share.unwrap_or(1.0);
        if !(healthy_share > 0.0 && healthy_share <= 1.0) {
            return Err(field_err("health.healthy_share", "use a share above 0 and at most 1, e.g. 0.5"));
        }
        Ok(Health {
            kind,
            port: self.port,
            path,
            expect_status,
            interval: std::time::Duration::from_millis(interval_ms),
            timeout: std::time::Duration::from_millis(timeout_ms),
            rise,
            fall,
            healthy_share,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interfaces = ["gw-c", "gw-b"]
[[service]]
name = "web"
vip = "10.100.0.1:80"
blue = ["10.1.0.2:8080", "10.1.0.3:8080"]
green = ["10.2.0.2:8080"]
"#;

    fn err_of(text: &str) -> String {
        Config::parse(text).expect_err("config should be refused").to_string()
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.interfaces, ["gw-c", "gw-b"]);
        assert_eq!(c.initial_color, Color::Blue);
        assert_eq!(c.flow_table_size, bg_common::DEFAULT_FLOW_TABLE_SIZE);
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/bg"));
        assert_eq!(c.services[0].protocol, Protocol::Tcp);
        assert_eq!(c.services[0].blue.len(), 2);
        assert_eq!(c.services[0].green[0].addr, "10.2.0.2:8080".parse().unwrap());
        assert_eq!(c.services[0].green[0].weight, 1);
        assert_eq!(c.forwarding, Forwarding::Redirect);
        assert_eq!(c.max_new_flows_per_sec, DEFAULT_NEW_FLOWS_PER_SEC);
    }

    #[test]
    fn health_preview_and_agent_settings() {
        let c = Config::parse(&format!(
            "state_dir = \"/tmp/bgs\"\nmetrics_listen = \"off\"\nwatch_window_secs = 5\n{}\n[health]\nkind = \"http\"\npath = \"/healthz\"\ninterval_ms = 200\nrise = 1\nfall = 2\n",
            GOOD.replace("vip = \"10.100.0.1:80\"", "vip = \"10.100.0.1:80\"\npreview_vip = \"10.100.0.1:8080\"")
        ))
        .unwrap();
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.watch_window_secs, 5);
        assert_eq!(c.services[0].preview_vip, Some("10.100.0.1:8080".parse().unwrap()));
        assert_eq!((c.health.kind, c.health.path.as_str(), c.health.rise, c.health.fall), (HealthKind::Http, "/healthz", 1, 2));
        assert_eq!(c.health.timeout, std::time::Duration::from_millis(200));
        assert_eq!(c.services[0].health, c.health, "services inherit the global settings");
        let o = Config::parse(&GOOD.replace("name = \"web\"", "name = \"web\"\nhealth = { kind = \"tcp\", fall = 5 }")).unwrap();
        assert_eq!((o.services[0].health.kind, o.services[0].health.fall, o.services[0].health.rise), (HealthKind::Tcp, 5, 2));
        let e = err_of(&GOOD.replace("name = \"web\"", "name = \"web\"\nhealth = { rise = 0 }"));
        assert!(e.contains("service[0].health.rise"), "{e}");
        let defaults = Config::parse(GOOD).unwrap();
        assert_eq!(defaults.metrics_listen, Some("127.0.0.1:9477".parse().unwrap()));
        assert_eq!(defaults.health.kind, HealthKind::Tcp);
        for (extra, field) in [
            ("[health]\nfall = 0\n", "health.fall"),
            ("[health]\ninterval_ms = 100\ntimeout_ms = 500\n", "health.timeout_ms"),
            ("[health]\nhealthy_share = 1.5\n", "health.healthy_share"),
            ("[health]\npath = \"healthz\"\n", "health.path"),
            ("[health]\nkind = \"icmp\"\n", "config field `health.kind`: unknown variant `icmp`"),
        ] {
            let e = err_of(&format!("{GOOD}\n{extra}"));
            assert!(e.contains(field), "expected `{field}` in: {e}");
        }
        let e = err_of(&format!("metrics_listen = \"localhost\"\n{GOOD}"));
        assert!(e.contains("metrics_listen"), "{e}");
        let e = err_of(&GOOD.replace("vip = \"10.100.0.1:80\"", "vip = \"10.100.0.1:80\"\npreview_vip = \"10.100.0.1:80\""));
        assert!(e.contains("service[0].preview_vip"), "{e}");
    }

    #[test]
    fn weighted_backends_parse_and_bad_weights_are_named() {
        let c = Config::parse(&GOOD.replace(
            r#"green = ["10.2.0.2:8080"]"#,
            r#"green = [{ address = "10.2.0.2:8080", weight = 3 }, { address = "10.2.0.3:8080", weight = 0 }]"#,
        ))
        .unwrap();
        assert_eq!(c.services[0].green[0].weight, 3);
        assert_eq!(c.services[0].green[1].weight, 0);
        for (green, field) in [
            (r#"green = [{ address = "10.2.0.2:8080", weight = -1 }]"#, "service[0].green[0].weight"),
            (r#"green = [{ address = "10.2.0.2:8080", wieght = 2 }]"#, "service[0].green[0].wieght"),
            (r#"green = [{ weight = 2 }]"#, "service[0].green[0].address"),
            (r#"green = [{ address = "10.2.0.2:8080", weight = 0 }]"#, "service[0].green"),
            (r#"green = [8080]"#, "service[0].green[0]"),
        ] {
            let e = err_of(&GOOD.replace(r#"green = ["10.2.0.2:8080"]"#, green));
            assert!(e.contains(field), "expected `{field}` in: {e}");
        }
    }

    #[test]
    fn bad_backend_names_its_field() {
        let e = err_of(&GOOD.replace("\"10.2.0.2:8080\"", "\"10.2.0.2\""));
        assert!(e.contains("service[0].green[0]") && e.contains("address:port"), "{e}");
    }

    #[test]
    fn empty_color_is_refused() {
        let e = err_of(&GOOD.replace("green = [\"10.2.0.2:8080\"]", "green = []"));
        assert!(e.contains("service[0].green") && e.contains("at least one"), "{e}");
    }

    #[test]
    fn the_api_is_off_by_default_and_never_open() {
        assert_eq!(Config::parse(GOOD).unwrap().api, None, "off unless [api] is present");
        let c = Config::parse(&format!("{GOOD}\n[api]\ntoken_file = \"/etc/bg/api-token\"\n")).unwrap();
        let a = c.api.unwrap();
        assert_eq!(a.listen, "127.0.0.1:9478".parse().unwrap(), "loopback unless configured otherwise");
        assert_eq!((a.token_file.as_deref(), a.tls.is_none()), (Some(Path::new("/etc/bg/api-token")), true));
        for (api, field, says) in [
            ("", "config field `api`", "no way to authenticate"),
            ("listen = \"0.0.0.0:9478\"\ntoken_file = \"t\"", "`api.listen`", "HTTPS"),
            ("listen = \"localhost:9478\"\ntoken_file = \"t\"", "`api.listen`", "not address:port"),
            ("listen = \"127.0.0.1:9477\"\ntoken_file = \"t\"", "`api.listen`", "also `metrics_listen`"),
            ("client_ca = \"ca.pem\"", "`api.client_ca`", "needs HTTPS"),
            ("tls_cert = \"c.pem\"\ntoken_file = \"t\"", "config field `api`", "both `tls_cert` and `tls_key`"),
            ("token = \"abc\"", "api", "unknown field `token`"),
            ("token_file = \"t\"\npublic_url = \"gw1:9478\"", "`api.public_url`", "http:// or https://"),
            ("token_file = \"t\"\npublic_url = \"https://gw1/a b\"", "`api.public_url`", "http:// or https://"),
            ("token_file = \"t\"\nclient_names = [\"ci\"]", "`api.client_names`", "give `client_ca`"),
            ("tls_cert = \"c\"\ntls_key = \"k\"\nclient_ca = \"ca\"\nclient_names = [\"a b\"]", "`api.client_names[0]`", "not a DNS name"),
        ] {
            let e = err_of(&format!("{GOOD}\n[api]\n{api}\n"));
            assert!(e.contains(field) && e.contains(says), "[api] {api:?}: {e}");
        }
        // Off loopback with HTTPS (and mTLS alone) is fine.
        let c = Config::parse(&format!(
            "{GOOD}\n[api]\nlisten = \"[::]:9478\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nclient_ca = \"ca.pem\"\n"
        ))
        .unwrap();
        assert_eq!(c.api.unwrap().client_ca.as_deref(), Some(Path::new("ca.pem")));
    }

    #[test]
    fn unknown_field_is_named() {
        let e = err_of(&format!("colour = \"blue\"\n{GOOD}"));
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn missing_interfaces_is_named() {
        let e = err_of(&GOOD.replace("interfaces = [\"gw-c\", \"gw-b\"]", ""));
        assert!(e.contains("interfaces"), "{e}");
    }

    #[test]
    fn duplicate_vip_is_refused() {
        let second = &GOOD[GOOD.find("[[service]]").unwrap()..];
        let dup = format!("{GOOD}{}", second.replace("\"web\"", "\"web2\""));
        let e = err_of(&dup);
        assert!(e.contains("service[1].vip") && e.contains("already served"), "{e}");
    }

    #[test]
    fn a_backend_belongs_to_one_service_and_one_color() {
        // In both colors of one service.
        let e = err_of(&GOOD.replace("green = [\"10.2.0.2:8080\"]", "green = [\"10.1.0.3:8080\"]"));
        assert!(e.contains("service[0].green[0]") && e.contains("service[0].blue[1] (web blue)") && e.contains("one service and one color"), "{e}");
        // In two services.
        let second = "[[service]]\nname = \"api\"\nvip = \"10.100.0.2:80\"\nblue = [\"10.3.0.2:8080\"]\ngreen = [\"10.2.0.2:8080\"]\n";
        let e = err_of(&format!("{GOOD}{second}"));
        assert!(e.contains("service[1].green[0]") && e.contains("service[0].green[0] (web green)"), "{e}");
        // Another port of the same host, or the same address:port for another protocol: fine.
        Config::parse(&format!("{GOOD}{}", second.replace("10.2.0.2:8080", "10.2.0.2:8081"))).unwrap();
        Config::parse(&format!("{GOOD}{}", second.replace("name = \"api\"", "name = \"api\"\nprotocol = \"udp\""))).unwrap();
        // The defaults of the unconfirmed table: an eighth of the established one, at least 1024.
        let c = Config::parse(GOOD).unwrap();
        assert_eq!((c.unconfirmed_table_size, c.unconfirmed_timeout_secs), (8192, 5));
        let c = Config::parse(&format!("flow_table_size = 2048\n{GOOD}")).unwrap();
        assert_eq!(c.unconfirmed_table_size, 1024);
        let e = err_of(&format!("unconfirmed_timeout_secs = 0\n{GOOD}"));
        assert!(e.contains("unconfirmed_timeout_secs"), "{e}");
    }

    #[test]
    fn ipv6_services_parse_and_mixed_families_are_refused() {
        let v6 = GOOD
            .replace("10.100.0.1:80", "[fd00::100]:80")
            .replace("\"10.1.0.2:8080\", \"10.1.0.3:8080\"", "\"[fd00:1::2]:8080\"")
            .replace("\"10.2.0.2:8080\"", "\"[fd00:2::2]:8080\"");
        let c = Config::parse(&v6).unwrap();
        assert!(c.services[0].vip.is_ipv6());
        let e = err_of(&GOOD.replace("10.100.0.1:80", "[fd00::1]:80"));
        assert!(e.contains("service[0].blue[0]") && e.contains("different IP versions"), "{e}");
    }

    #[test]
    fn bad_values_name_their_fields() {
        for (from, to, field) in [
            ("interfaces = [\"gw-c\", \"gw-b\"]", "interfaces = [\"gw-c\", \"gw-c\"]", "interfaces[1]"),
            ("interfaces = [\"gw-c\", \"gw-b\"]", "interfaces = [\"an-interface-name-too-long\"]", "interfaces[0]"),
            ("name = \"web\"", "name = \"we b\"", "service[0].name"),
            ("10.100.0.1:80", "10.100.0.1:0", "service[0].vip"),
            ("\"10.1.0.3:8080\"", "\"10.1.0.2:8080\"", "service[0].blue[1]"),
            ("\"10.1.0.3:8080\"", "\"10.100.0.1:8080\"", "service[0].blue[1]"),
        ] {
            let e = err_of(&GOOD.replace(from, to));
            assert!(e.contains(field), "expected `{field}` in: {e}");
        }
        let e = err_of(&format!("flow_table_size = 10\n{GOOD}"));
        assert!(e.contains("flow_table_size"), "{e}");
        let e = err_of(&format!("initial_color = \"red\"\n{GOOD}"));
        assert!(e.contains("initial_color") && e.contains("\"blue\""), "{e}");
    }

    #[test]
    fn fleet_defaults_and_bad_values_name_their_field() {
        assert!(Config::parse(GOOD).unwrap().fleet.is_none(), "no [fleet]: a gateway on its own");
        let f = Config::parse(&format!("{GOOD}[fleet]\nname = \"edge\"\ngateway = \"gw-1\"\netcd = [\"http://10.0.0.5:2379\"]\n"))
            .unwrap()
            .fleet
            .unwrap();
        assert_eq!(
            (f.name.as_str(), f.gateway.as_deref(), f.ack_timeout_secs, f.lease_ttl_secs, f.fence_after_secs, f.history, f.rollback_on_timeout),
            ("edge", Some("gw-1"), 5, 3, 10, 100, false)
        );
        for (fleet, field) in [
            ("name = \"edge\"\netcd = [\"http://10.0.0.5:2379\"]", "fleet.gateway"),
            ("name = \"ed/ge\"\ngateway = \"g\"\netcd = [\"http://10.0.0.5:2379\"]", "fleet.name"),
            ("name = \"edge\"\ngateway = \"g 1\"\netcd = [\"http://10.0.0.5:2379\"]", "fleet.gateway"),
            ("name = \"edge\"\ngateway = \"g\"\netcd = []", "fleet.etcd"),
            ("name = \"edge\"\ngateway = \"g\"\netcd = [\"10.0.0.5:2379\"]", "fleet.etcd[0]"),
            ("name = \"edge\"\ngateway = \"g\"\netcd = [\"https://10.0.0.5:2379\"]", "fleet.etcd[0]"),
            ("name = \"edge\"\ngateway = \"g\"\netcd = [\"http://e:2379\"]\nlease_ttl_secs = 1", "fleet.lease_ttl_secs"),
            ("name = \"edge\"\ngateway = \"g\"\netcd = [\"http://e:2379\"]\nack_timeout_secs = 0", "fleet.ack_timeout_secs"),
            ("name = \"edge\"\ngateway = \"g\"\netcd = [\"http://e:2379\"]\nfence_command = \" \"", "fleet.fence_command"),
            ("name = \"edge\"\ngateway = \"g\"\netcd = [\"http://e:2379\"]\n[fleet.tls]\nca = \"/ca\"\ncert = \"/c\"", "fleet.tls"),
        ] {
            let e = Config::parse(&format!("{GOOD}[fleet]\n{fleet}\n")).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{fleet:?}: {e}");
        }
        // From the command line: the flags are named.
        let e = Fleet::from_endpoints("edge", vec!["10.0.0.5:2379".into()]).unwrap_err().to_string();
        assert!(e.contains("`--etcd`"), "{e}");
        assert!(Fleet::from_endpoints("edge", vec!["http://10.0.0.5:2379".into()]).unwrap().gateway.is_none());
    }

    #[test]
    fn slo_defaults_overrides_and_bad_values() {
        let c = Config::parse(GOOD).unwrap();
        let slo = &c.services[0].slo;
        assert_eq!(
            (slo.window.as_secs(), slo.min_flows, slo.max_handshake_failure_share, slo.max_reset_share, slo.max_p95_handshake.as_millis()),
            (5, 20, 0.5, 0.5, 1000),
            "the defaults the README states"
        );
        let udp = Config::parse(&format!("{GOOD}[[service]]\nname = \"dns\"\nvip = \"10.100.0.1:53\"\nprotocol = \"udp\"\nblue = [\"10.1.0.2:53\"]\ngreen = [\"10.2.0.2:53\"]\n")).unwrap();
        let u = &udp.services[1].slo;
        assert_eq!((u.max_handshake_failure_share, u.max_reset_share, u.max_p95_handshake.as_millis()), (0.0, 0.0, 0), "off for UDP unless set");
        let o = Config::parse(&format!("{}[slo]\nwindow_secs = 10\nmax_reset_share = 0\n", GOOD.replace("name = \"web\"", "name = \"web\"\nslo = { min_flows = 5 }"))).unwrap();
        let o = &o.services[0].slo;
        assert_eq!((o.window.as_secs(), o.min_flows, o.max_reset_share), (10, 5, 0.0), "global settings with the service's override");
        for (text, field) in [
            (format!("{GOOD}[slo]\nwindow_secs = 0\n"), "slo.window_secs"),
            (format!("{GOOD}[slo]\nmax_handshake_failure_share = 1.5\n"), "slo.max_handshake_failure_share"),
            (format!("{GOOD}[slo]\nmin_flows = 0\n"), "slo.min_flows"),
            (format!("{GOOD}[slo]\nmax_p95_handshake_ms = 600001\n"), "slo.max_p95_handshake_ms"),
            (format!("{GOOD}[slo]\nmax_reset = 0.5\n"), "max_reset"),
            (GOOD.replace("name = \"web\"", "name = \"web\"\nslo = { max_reset_share = -1 }"), "service[0].slo.max_reset_share"),
        ] {
            let e = err_of(&text);
            assert!(e.contains(field), "expected `{field}` in: {e}");
        }
    }

    /// Configs that parse as TOML but would give a wrong data plane: each refused, naming the
    /// field and what is wrong with it.
    #[test]
    fn cross_checks_name_the_field_and_the_reason() {
        let two = format!(
            "{GOOD}\n[[service]]\nname = \"api\"\nvip = \"10.100.0.2:80\"\npreview_vip = \"10.100.0.3:80\"\nblue = [\"10.1.0.9:80\"]\ngreen = [\"10.2.0.9:80\"]\n"
        );
        Config::parse(&two).expect("two services");
        let v6 = GOOD.replace("10.100.0.1:80", "[fd00::100]:80").replace("\"10.1.0.2:8080\", \"10.1.0.3:8080\"", "\"[fd00:1::2]:8080\"").replace("\"10.2.0.2:8080\"", "\"[fd00:2::2]:8080\"");
        Config::parse(&v6).expect("IPv6");
        let remote = Config::parse(&format!("metrics_listen = \"0.0.0.0:9477\"\nmetrics_allow_remote = true\n{GOOD}")).expect("opted in");
        assert_eq!(remote.metrics_listen, Some("0.0.0.0:9477".parse().unwrap()));
        let cases: &[(String, &str, &str)] = &[
            (two.replace("\"10.1.0.9:80\"", "\"10.100.0.1:8080\""), "service[1].blue[0]", "address of a VIP (service[0].vip)"),
            (two.replace("\"10.1.0.3:8080\"", "\"10.100.0.3:8080\""), "service[0].blue[1]", "address of a VIP (service[1].preview_vip)"),
            (GOOD.replace("\"10.1.0.3:8080\"", "\"127.0.0.1:8080\""), "service[0].blue[1]", "loopback"),
            (GOOD.replace("\"10.1.0.3:8080\"", "\"169.254.1.1:8080\""), "service[0].blue[1]", "link-local"),
            (GOOD.replace("\"10.1.0.3:8080\"", "\"0.0.0.0:8080\""), "service[0].blue[1]", "unspecified"),
            (GOOD.replace("\"10.1.0.3:8080\"", "\"224.0.0.1:8080\""), "service[0].blue[1]", "multicast"),
            (GOOD.replace("\"10.1.0.3:8080\"", "\"255.255.255.255:8080\""), "service[0].blue[1]", "broadcast"),
            (GOOD.replace("10.100.0.1:80", "127.0.0.2:80"), "service[0].vip", "loopback"),
            (v6.replace("\"[fd00:1::2]:8080\"", "\"[fe80::2%2]:8080\""), "service[0].blue[0]", "scope id"),
            (v6.replace("\"[fd00:1::2]:8080\"", "\"[fe80::2]:8080\""), "service[0].blue[0]", "link-local"),
            (v6.replace("\"[fd00:1::2]:8080\"", "\"[::ffff:10.1.0.2]:8080\""), "service[0].blue[0]", "IPv4-mapped"),
            (v6.replace("\"[fd00:1::2]:8080\"", "\"[::1]:8080\""), "service[0].blue[0]", "loopback"),
            (format!("pin_dir = \"/sys/fs/bpf\"\n{GOOD}"), "pin_dir", "bpffs root"),
            (format!("pin_dir = \"/sys/fs/bpf/\"\n{GOOD}"), "pin_dir", "bpffs root"),
            (format!("pin_dir = \"bg\"\n{GOOD}"), "pin_dir", "absolute"),
            (format!("pin_dir = \"/sys/fs/bpf/bg/../x\"\n{GOOD}"), "pin_dir", "`..`"),
            (format!("socket = \"bg.sock\"\n{GOOD}"), "socket", "absolute"),
            (format!("state_dir = \"var/lib/bg\"\n{GOOD}"), "state_dir", "absolute"),
            (format!("watch_window_secs = 9223372036854775807\n{GOOD}"), "watch_window_secs", "0 (off) to 86400"),
            (format!("watch_window_secs = 86401\n{GOOD}"), "watch_window_secs", "0 (off) to 86400"),
            (format!("udp_idle_timeout_secs = 0\n{GOOD}"), "udp_idle_timeout_secs", "1 to 86400"),
            (format!("closing_timeout_secs = 99999\n{GOOD}"), "closing_timeout_secs", "1 to 3600"),
            (format!("unconfirmed_timeout_secs = 0\n{GOOD}"), "unconfirmed_timeout_secs", "1 to 300"),
            (format!("unconfirmed_table_size = 100\n{GOOD}"), "unconfirmed_table_size", "out of range"),
            (format!("max_new_flows_per_sec = -1\n{GOOD}"), "max_new_flows_per_sec", ""),
            (format!("flow_table_size = 4294967296\n{GOOD}"), "flow_table_size", ""),
            (format!("metrics_listen = \"0.0.0.0:9477\"\n{GOOD}"), "metrics_listen", "metrics_allow_remote = true"),
            (format!("metrics_listen = \"[::]:9477\"\n{GOOD}"), "metrics_listen", "not a loopback address"),
        ];
        for (text, field, why) in cases {
            let e = err_of(text);
            assert!(e.contains(&format!("`{field}`")) && e.contains(why), "expected `{field}` and `{why}` in: {e}");
        }
    }

    /// The flow tables' kernel memory is estimated from the element layout; a table that needs
    /// more than a quarter of RAM is refused with both figures.
    #[test]
    fn flow_tables_larger_than_a_quarter_of_ram_are_refused() {
        // 65536 + 8192 entries: 2 x (136 + 160) B per entry, buckets and the preview map.
        let b = flow_memory_bytes(65536, 8192);
        assert!((20 << 20..30 << 20).contains(&b), "{} MiB", b >> 20);
        let ram = mem_total_bytes().expect("/proc/meminfo");
        let too_big = (1u32 << 26).min(((ram / 4 / 296) as u32).saturating_mul(2));
        if flow_memory_bytes(too_big, (too_big / 8).max(1024)) > ram / 4 {
            let e = err_of(&format!("flow_table_size = {too_big}\n{GOOD}"));
            assert!(e.contains("`flow_table_size`") && e.contains("quarter of this host's RAM"), "{e}");
        } else {
            // A host with more than 4 x the largest table's memory: the largest is accepted.
            Config::parse(&format!("flow_table_size = {too_big}\n{GOOD}")).expect("fits in a quarter of RAM");
        }
    }

    /// Fuzz (bounded: a few thousand cases per run): configs made by writing odd values into
    /// every field, and arbitrary bytes. Parsing never panics; an accepted config has every
    /// value in its stated range; a refusal is a message that names the config.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        const TOP: &[&str] = &[
            "interfaces", "xdp_mode", "forwarding", "pin_dir", "socket", "flow_table_size", "unconfirmed_table_size",
            "unconfirmed_timeout_secs", "max_new_flows_per_sec", "udp_idle_timeout_secs", "closing_timeout_secs",
            "initial_color", "state_dir", "metrics_listen", "metrics_allow_remote", "watch_window_secs",
        ];
        const HEALTH: &[&str] = &["kind", "port", "path", "expect_status", "interval_ms", "timeout_ms", "rise", "fall", "healthy_share"];
        const SERVICE: &[&str] = &["name", "vip", "preview_vip", "protocol", "blue", "green", "health", "slo"];

        /// Numbers at and around every stated bound.
        const BOUNDS: &[u64] = &[
            0, 1, 2, 49, 50, 99, 100, 101, 199, 200, 300, 301, 599, 600, 1000, 1001, 1023, 1024, 3600, 3601, 65535, 65536,
            86_400, 86_401, 600_000, 600_001, 1 << 26, (1 << 26) + 1, 4_294_967_295,
        ];

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => proptest::sample::select(BOUNDS).prop_map(|n| n.to_string()),
                1 => odd(),
            ]
        }

        fn odd() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("0".to_owned()), Just("-1".to_owned()), Just("1".to_owned()), Just("65536".to_owned()),
                Just("9223372036854775807".to_owned()), Just("-9223372036854775808".to_owned()), Just("4294967296".to_owned()),
                Just("1.5".to_owned()), Just("nan".to_owned()), Just("inf".to_owned()), Just("-0.0".to_owned()), Just("1e308".to_owned()),
                Just("true".to_owned()), Just("\"\"".to_owned()), Just("\"green\"".to_owned()), Just("\"/\"".to_owned()),
                Just("\"10.1.0.2:8080\"".to_owned()), Just("\"[::1]:80\"".to_owned()), Just("\"[fe80::1%1]:80\"".to_owned()),
                Just("\"0.0.0.0:0\"".to_owned()), Just("\"255.255.255.255:65535\"".to_owned()), Just("\"off\"".to_owned()),
                Just("[]".to_owned()), Just("[1]".to_owned()), Just("[\"a\", \"a\"]".to_owned()), Just("{}".to_owned()),
                Just("{ address = \"10.9.0.1:1\", weight = 4294967295 }".to_owned()), Just("[{ weight = 1 }]".to_owned()),
                Just("\"\\u0000\"".to_owned()), Just(format!("\"{}\"", "a".repeat(10_000))),
                "[a-z0-9:./\\[\\]%-]{0,40}".prop_map(|s| format!("\"{s}\"")),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_filter("TOML floats", |f| f.is_finite()).prop_map(|f| format!("{f:e}")),
            ]
        }

        /// A valid config with 1 to 4 fields set (or replaced) to odd values, each key once.
        fn mutated() -> impl Strategy<Value = String> {
            let edit = (0..3usize, 0..16usize, value());
            proptest::collection::vec(edit, 1..5).prop_map(|edits| {
                use std::collections::BTreeMap;
                let mut top: BTreeMap<&str, String> = BTreeMap::from([("interfaces", "[\"gw-c\", \"gw-b\"]".to_owned())]);
                let mut service: BTreeMap<&str, String> = BTreeMap::from([
                    ("name", "\"web\"".to_owned()),
                    ("vip", "\"10.100.0.1:80\"".to_owned()),
                    ("blue", "[\"10.1.0.2:8080\", \"10.1.0.3:8080\"]".to_owned()),
                    ("green", "[\"10.2.0.2:8080\"]".to_owned()),
                ]);
                let mut health: BTreeMap<&str, String> = BTreeMap::new();
                for (section, key, v) in edits {
                    match section {
                        0 => top.insert(TOP[key % TOP.len()], v),
                        1 => service.insert(SERVICE[key % SERVICE.len()], v),
                        _ => health.insert(HEALTH[key % HEALTH.len()], v),
                    };
                }
                let lines = |m: &BTreeMap<&str, String>| m.iter().map(|(k, v)| format!("{k} = {v}\n")).collect::<String>();
                format!("{}\n[[service]]\n{}\n[health]\n{}", lines(&top), lines(&service), lines(&health))
            })
        }

        fn holds(text: &str) {
            match Config::parse(text) {
                Ok(c) => {
                    assert!((MIN_FLOW_TABLE..=MAX_FLOW_TABLE).contains(&c.flow_table_size), "{text}");
                    assert!((MIN_FLOW_TABLE..=MAX_FLOW_TABLE).contains(&c.unconfirmed_table_size), "{text}");
                    assert!((1..=300).contains(&c.unconfirmed_timeout_secs) && c.watch_window_secs <= MAX_WATCH_WINDOW_SECS, "{text}");
                    assert!((1..=86_400).contains(&c.udp_idle_timeout_secs) && (1..=3_600).contains(&c.closing_timeout_secs), "{text}");
                    assert!(c.pin_dir.is_absolute() && c.socket.is_absolute() && c.state_dir.is_absolute(), "{text}");
                    for svc in &c.services {
                        assert!(not_a_host(svc.vip.ip()).is_none() && svc.vip.port() != 0, "{text}");
                        assert!(svc.health.timeout <= svc.health.interval && svc.health.healthy_share > 0.0 && svc.health.healthy_share <= 1.0, "{text}");
                        for b in svc.blue.iter().chain(&svc.green) {
                            assert!(not_a_host(b.addr.ip()).is_none() && b.addr.port() != 0 && b.weight <= MAX_WEIGHT, "{text}");
                        }
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.starts_with("config "), "a refusal names the config: {msg}");
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]
            #[test]
            fn odd_values_in_every_field_never_panic(text in mutated()) {
                holds(&text);
            }

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
                holds(&String::from_utf8_lossy(&bytes));
            }
        }
    }
}
