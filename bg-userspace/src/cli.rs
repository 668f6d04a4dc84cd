//! Command-line interface: parsing and the output of each command.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::{
    config::Config,
    control::{call, FlipResult, Request, Response, Status},
    dataplane::Counters,
};

#[derive(Debug, Parser)]
#[command(name = "bgctl", version, about = "bg: kernel-level blue/green traffic switching (XDP)")]
pub struct Cli {
    /// Control socket of the agent [default: the config's `socket`, else /run/bg/bgctl.sock].
    #[arg(long, global = true, env = "BG_SOCKET")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach the XDP program (or adopt the pinned one) and serve the control socket
    /// until SIGTERM; the data plane stays when the agent stops.
    Agent {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Instead of running: detach bg and remove its pinned maps and links (live flows'
        /// state is lost; the state directory with the audit log is kept).
        #[arg(long)]
        cleanup: bool,
        /// Load this XDP object (a `cargo xtask build-ebpf` output) instead of the one built
        /// into bgctl: an upgrade of the data plane alone, through the pinned links.
        #[arg(long, value_name = "FILE")]
        xdp_object: Option<PathBuf>,
        /// Instead of running (as root): ready the host for an agent that runs as `--user` with
        /// only its capabilities (bpffs mounted, pin_dir that user's with root's pins migrated,
        /// tracefs's xdp_redirect_err id readable; the state and socket directories and the
        /// files it reads checked). The package's systemd unit runs this first.
        #[arg(long, conflicts_with = "cleanup", requires = "user")]
        prepare: bool,
        /// The user the agent runs as, for --prepare and --cleanup run as root (the package's
        /// unit runs it as `bg`).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
    },
    /// Validate a config file and print what it would apply, without touching the kernel.
    CheckConfig {
        /// The TOML config file.
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show the active color, generation, health, canary, backends, attachments and live flows.
    Status {
        #[arg(long)]
        json: bool,
        /// Walk the flow tables for this answer (O(flows): seconds at a million) instead of
        /// showing the agent's last sample (a few seconds old at most).
        #[arg(long)]
        count_flows: bool,
    },
    /// Send new flows to COLOR (live flows stay where they are). Refused if COLOR is unhealthy.
    Flip {
        #[command(flatten)]
        flip: FlipArgs,
        /// Run the gate (health, and the SLOs on COLOR's recent preview or canary traffic) and
        /// say what would happen: the selector it would write, the live flows that stay where
        /// they are. Changes nothing; exits 1 when the flip would be refused.
        #[arg(long)]
        dry_run: bool,
    },
    /// Undo the last switch: cancel a canary, or flip back to the previous color.
    Rollback {
        /// Roll back even though the previous color fails its health checks.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Packet counters of the XDP program: per color, per reason, per forwarding outcome.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Every backend with its health (all pages), optionally of one color or in one state.
    Backends {
        /// `blue` or `green`.
        #[arg(long)]
        color: Option<String>,
        /// `up`, `down` or `unknown`.
        #[arg(long, value_parser = ["up", "down", "unknown"])]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The audit log: every flip, rollback, refusal and automatic action.
    History {
        /// How many of the latest events.
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (e.g. `bgctl completions bash >
    /// /usr/share/bash-completion/completions/bgctl`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print bgctl's man page, roff (e.g. `bgctl man > /usr/share/man/man8/bgctl.8`).
    Man,
    /// A fleet of gateways through etcd, from any host that reaches it (no agent needed here):
    /// the fleet's state, and switches of the whole fleet.
    Fleet {
        /// A config file with a [fleet] section (an agent's, or one with only [fleet]).
        #[arg(long, short, conflicts_with_all = ["etcd", "name"])]
        config: Option<PathBuf>,
        /// etcd endpoints, comma-separated (instead of --config), e.g. http://10.0.0.5:2379.
        #[arg(long, env = "BG_ETCD", value_delimiter = ',')]
        etcd: Vec<String>,
        /// The fleet's name (with --etcd).
        #[arg(long = "fleet", env = "BG_FLEET", value_name = "NAME")]
        name: Option<String>,
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// A live view during a cutover: new flows/s and live flows per color, health, generation,
    /// and the connection signals (handshakes failed, resets, handshake p50/p95) per service.
    Watch {
        /// Refresh interval in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stop after this many refreshes (default: until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
        /// One JSON object per refresh (status and counters) instead of the screen.
        #[arg(long)]
        json: bool,
    },
}

/// What a flip asks, on one gateway or of a fleet.
#[derive(Debug, Args)]
pub struct FlipArgs {
    /// `blue` or `green`.
    pub color: String,
    /// A canary: send only this share (1..99) of new flows to COLOR; `flip COLOR` without
    /// it completes the move, `rollback` undoes it.
    #[arg(long, value_name = "PERCENT")]
    pub percent: Option<u32>,
    /// End the previous color's remaining flows after SECS seconds: their entries are
    /// removed, and their next packet is answered with a TCP RST by the active color.
    #[arg(long, value_name = "SECS")]
    pub drain: Option<u64>,
    /// Flip even though COLOR fails its health checks or SLOs (recorded as forced); turns
    /// automatic rollback off for this switch.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

impl FlipArgs {
    /// The request, with its color and share checked.
    fn request(&self) -> anyhow::Result<crate::decisions::FlipRequest> {
        let to = crate::config::parse_color(&self.color).with_context(|| format!("unknown color `{}`; use `blue` or `green`", self.color))?;
        if let Some(p) = self.percent.filter(|p| !(1..=99).contains(p)) {
            bail!("--percent {p} is out of range; use 1 to 99 (a plain flip moves 100%)");
        }
        Ok(crate::decisions::FlipRequest { to, percent: self.percent, drain_secs: self.drain, force: self.force })
    }
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// The fleet's desired state, each live gateway's applied revision and health view, and
    /// the members without a live agent.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Flip (or canary) the whole fleet; returns once every live gateway applied it.
    Flip {
        #[command(flatten)]
        flip: FlipArgs,
    },
    /// Undo the fleet's last switch.
    Rollback {
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// The fleet's last switches, as kept in etcd.
    History {
        #[arg(long)]
        json: bool,
    },
}

/// Appends a line to a command's human output (`output` prints it, painted).
macro_rules! w {
    ($o:expr, $($t:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($o, $($t)*);
    }};
}

/// Whether human output shows colors: stdout is a terminal and `NO_COLOR` is not set
/// (no-color.org).
fn colors_on() -> bool {
    use std::io::IsTerminal;
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()))
}

/// `text` with the words blue and green in their colors when `colors_on`, else as it is.
pub fn paint(text: &str) -> String {
    if colors_on() { paint_words(text) } else { text.to_owned() }
}

/// The words `blue` and `green` (whole words only) wrapped in ANSI bold blue and green.
pub fn paint_words(text: &str) -> String {
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    let mut out = String::with_capacity(text.len() + 64);
    let mut rest = text;
    let mut prev: Option<char> = None;
    while !rest.is_empty() {
        let hit = [("blue", "\x1b[1;34m"), ("green", "\x1b[1;32m")].into_iter().find(|(w, _)| {
            rest.starts_with(w) && !prev.is_some_and(word) && !rest[w.len()..].chars().next().is_some_and(word)
        });
        if let Some((w, code)) = hit {
            out.push_str(code);
            out.push_str(w);
            out.push_str("\x1b[0m");
            rest = &rest[w.len()..];
            prev = w.chars().last();
            continue;
        }
        let c = rest.chars().next().expect("not empty");
        out.push(c);
        prev = Some(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn socket_or_default(cli: &Option<PathBuf>) -> PathBuf {
    cli.clone().unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_SOCKET))
}

pub fn execute(cli: Cli) -> anyhow::Result<()> {
    let socket = socket_or_default(&cli.socket);
    match cli.command {
        Command::Agent { config, cleanup, xdp_object, prepare, user } => {
            let mut config = Config::load(&config)?;
            if let Some(s) = cli.socket {
                config.socket = s;
            }
            if cleanup {
                return crate::agent::cleanup(&config, user.as_deref());
            }
            if prepare {
                return crate::agent::prepare(&config, user.as_deref().unwrap_or_default());
            }
            // Two runtimes: the control socket, the tick and the decisions on this thread (an
            // accepted connection is served where it was accepted: no thread to wake, and no
            // health check in the queue before it); health checks and scrapes on two workers.
            let background = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("bg-checks")
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let control = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
            control.block_on(crate::agent::run(config, xdp_object.as_deref(), background.handle().clone()))
        }
        Command::CheckConfig { config, json } => {
            let c = Config::load(&config)?;
            if json {
                let services: Vec<_> = c
                    .services
                    .iter()
                    .map(|s| serde_json::json!({"name": s.name, "vip": s.vip.to_string(), "protocol": s.protocol.name(),
                        "preview_vip": s.preview_vip.map(|p| p.to_string()),
                        "blue": s.blue.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>(),
                        "green": s.green.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>()}))
                    .collect();
                println!("{}", serde_json::json!({"ok": true, "interfaces": c.interfaces, "initial_color": c.initial_color.name(), "services": services}));
                return Ok(());
            }
            println!(
                "{}: ok: {} service(s) on {}; starts on {}",
                config.display(),
                c.services.len(),
                c.interfaces.join(", "),
                c.initial_color.name()
            );
            Ok(())
        }
        Command::Status { json, count_flows } => output(call(&socket, &Request::Status { count_flows })?, json),
        Command::Flip { flip, dry_run } => {
            let r = flip.request()?;
            output(call(&socket, &Request::Flip { color: flip.color, drain_secs: r.drain_secs, percent: r.percent, force: r.force, dry_run })?, flip.json)
        }
        Command::Rollback { force, json } => output(call(&socket, &Request::Rollback { force })?, json),
        Command::Stats { json } => output(call(&socket, &Request::Stats)?, json),
        Command::Backends { color, state, json } => backends(&socket, color, state, json),
        Command::History { limit, json } => output(call(&socket, &Request::History { limit: Some(limit) })?, json),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "bgctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => std::io::Write::write_all(&mut std::io::stdout(), &man_page()?).context("writing the man page"),
        Command::Fleet { config, etcd, name, command } => fleet(config, etcd, name, command),
        Command::Watch { interval_ms, count, json } => watch(&socket, Duration::from_millis(interval_ms.max(100)), count, json),
    }
}

/// bgctl(8): one page with every command's synopsis and options (not pages of their own a
/// package would have to ship), then the files, exit status, examples and the HTTP API.
pub fn man_page() -> anyhow::Result<Vec<u8>> {
    let top = Cli::command();
    let man = clap_mangen::Man::new(top.clone()).section("8");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    out.extend_from_slice(b".SH COMMANDS\n");
    fn commands(out: &mut Vec<u8>, cmd: &clap::Command, path: &str) -> anyhow::Result<()> {
        for sub in cmd.get_subcommands().filter(|c| c.get_name() != "help") {
            let name = format!("{path} {}", sub.get_name());
            if sub.has_subcommands() {
                commands(out, sub, &name)?;
                continue;
            }
            out.extend_from_slice(format!(".SS \"{name}\"\n").as_bytes());
            let page = clap_mangen::Man::new(sub.clone().bin_name(name.clone()));
            let mut part = Vec::new();
            page.render_description_section(&mut part)?;
            page.render_synopsis_section(&mut part)?;
            page.render_options_section(&mut part)?;
            // Their sections become paragraphs of this command's subsection.
            for line in String::from_utf8_lossy(&part).lines() {
                match line {
                    ".SH DESCRIPTION" | ".SH SYNOPSIS" => out.extend_from_slice(b".PP\n"),
                    l if l.starts_with(".SH ") => out.extend_from_slice(b".PP\nOptions:\n"),
                    l => {
                        out.extend_from_slice(l.as_bytes());
                        out.push(b'\n');
                    }
                }
            }
        }
        Ok(())
    }
    commands(&mut out, &top, "bgctl")?;
    out.extend_from_slice(MAN_TAIL.as_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

const MAN_TAIL: &str = r#".SH FILES
.TP
\fI/etc/bg/bg.toml\fR
The agent's configuration (\fBbgctl check\-config\fR validates it).
.TP
\fI/run/bg/bgctl.sock\fR
The control socket (mode 0600; root or the agent's own user).
.TP
\fI/var/lib/bg/state.json\fR, \fI/var/lib/bg/audit.jsonl\fR
The persisted switch state, and the audit log (\fBbgctl history\fR).
.TP
\fI/sys/fs/bpf/bg\fR
The pinned data plane: maps and one XDP link per interface. It outlives the agent;
\fBbgctl agent \-\-cleanup\fR removes it.
.TP
\fIbg\-agent.service\fR
The systemd unit: the agent as user \fBbg\fR with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON only.
.SH EXIT STATUS
0 when the command did what it was asked (a flip to the color already active included);
1 when it was refused or failed (an unhealthy color, no agent, a fleet switch not applied
everywhere), with the reason on standard error; 2 for a command line clap cannot parse.
.SH EXAMPLES
.nf
bgctl flip green \-\-dry\-run       # what the gate says; nothing changes
bgctl flip green \-\-drain 60      # new flows to green; blue's remaining flows end in 60 s
bgctl flip green \-\-percent 10    # a canary: 10% of new flows to green
bgctl rollback
bgctl status \-\-json | jq .active
bgctl fleet \-\-config /etc/bg/bg.toml flip green
curl \-H "Authorization: Bearer $TOKEN" \-H "Content\-Type: application/json" \\
     \-d '{"color":"green"}' http://127.0.0.1:9478/v1/flip
.fi
.SH HTTP API
With an [api] section the agent also serves GET /v1/status, POST /v1/flip, POST /v1/rollback
(202 and an operation URL), GET /v1/operations/ID and Flagger's /v1/flagger/gate and
/v1/flagger/promote, behind a bearer token and/or mTLS.
.SH SEE ALSO
/usr/share/doc/bg/README.md
"#;

fn fleet(config: Option<PathBuf>, etcd: Vec<String>, name: Option<String>, command: FleetCommand) -> anyhow::Result<()> {
    let fleet = match (config, name) {
        (Some(c), _) => crate::config::parse_fleet_only(&c)?,
        (None, Some(n)) => crate::config::Fleet::from_endpoints(&n, etcd)?,
        (None, None) => bail!("say which fleet: --config FILE (with a [fleet] section), or --etcd URL --fleet NAME"),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        match command {
            FleetCommand::Status { json } => {
                let s = crate::fleet::status(&fleet).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    let mut o = String::new();
                    print_fleet_status(&mut o, &s);
                    print!("{}", paint(&o));
                }
                Ok(())
            }
            FleetCommand::History { json } => {
                let h = crate::fleet::history(&fleet).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&serde_json::json!({"events": h}))?);
                } else {
                    let mut o = String::new();
                    for d in &h {
                        w!(o, "generation {:>4}  {:<16} active {:<5} canary {:>3}%  by {}: {}", d.generation, plain(&d.event), plain(&d.active),
                            d.canary_permille / 10, plain(&d.who), plain(&d.reason));
                    }
                    print!("{}", paint(&o));
                }
                Ok(())
            }
            FleetCommand::Flip { flip } => fleet_switch(&fleet, crate::fleet::Op::Flip(flip.request()?), flip.json).await,
            FleetCommand::Rollback { force, json } => fleet_switch(&fleet, crate::fleet::Op::Rollback { force }, json).await,
        }
    })
}

async fn fleet_switch(fleet: &crate::config::Fleet, op: crate::fleet::Op, json: bool) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    let who = format!("bgctl (uid {}) on host {host}", nix::unistd::getuid());
    let outcome = crate::fleet::switch(fleet, op, &who, "requested", None, None).await;
    let r = match outcome {
        Ok(o) => Response::Flipped(crate::agent::fleet_flip_result(o, None, started)),
        Err(e) => Response::Error { message: format!("{e:#}") },
    };
    output(r, json)
}

/// Text from etcd (anyone with write access there wrote it) without control characters: no
/// escape sequence reaches the terminal.
fn plain(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn print_fleet_status(o: &mut String, s: &crate::fleet::FleetView) {
    match &s.desired {
        None => w!(o, "fleet {}: no desired state yet (no agent has joined)", s.fleet),
        Some(d) => {
            w!(o, "fleet {}: active {} (generation {}, revision {}){}", s.fleet, d.active, d.generation, s.revision,
                d.previous.as_ref().map(|p| format!("; rollback goes to {p}")).unwrap_or_default());
            if d.canary_permille != 0 {
                let other = if d.active == "blue" { "green" } else { "blue" };
                w!(o, "canary: {}% of new flows go to {other}", d.canary_permille / 10);
            }
            w!(o, "last switch: {} by {}: {}", plain(&d.event), plain(&d.who), plain(&d.reason));
        }
    }
    w!(o, "live gateways: {}", s.gateways.len());
    for g in &s.gateways {
        let health: Vec<String> = g.health.iter().map(|v| format!("{} {}", v.color, if v.healthy { "healthy" } else { "UNHEALTHY" })).collect();
        let lag = if g.revision < s.revision { format!(" LAGGING (applied revision {})", g.revision) } else { String::new() };
        w!(o, "  {:<16} generation {:>4}, active {}, canary {}%, selector {:#x}; {}{lag}", g.gateway, g.generation, g.active, g.canary_permille / 10, g.selector, health.join(", "));
    }
    if !s.down.is_empty() {
        w!(o, "members without a live agent: {}", s.down.join(", "));
    }
}

/// Prints a response; an error response becomes a non-zero exit.
fn output(r: Response, json: bool) -> anyhow::Result<()> {
    if let Response::Error { message } = &r {
        if json {
            println!("{}", serde_json::to_string(&r)?);
        }
        bail!("{message}");
    }
    // A dry run that would be refused exits 1, after saying so.
    let refused = matches!(&r, Response::DryRun(d) if d.outcome == "refused");
    let incomplete = match &r {
        Response::Flipped(FlipResult { fleet: Some(f), .. }) if !f.complete => Some(f.clone()),
        _ => None,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let mut text = String::new();
        print_response(&mut text, r);
        print!("{}", paint(&text));
    }
    if refused {
        bail!("dry run: the flip would be refused (nothing was changed)");
    }
    if let Some(f) = incomplete {
        if let Some(e) = f.error {
            bail!("{e}");
        }
        let mut not: Vec<String> = f.lagging.iter().map(|l| l.gateway.clone()).collect();
        not.extend(f.lost.iter().cloned());
        bail!(
            "the switch was written to the fleet (revision {}) but not applied by every live gateway in time: {}{}",
            f.revision,
            not.join(", "),
            f.rolled_back.map(|r| format!("; {r}")).unwrap_or_default()
        );
    }
    Ok(())
}

fn print_response(o: &mut String, r: Response) {
    match r {
        Response::DryRun(d) => print_dry_run(o, &d),
        Response::Status(s) => print_status(o, &s),
        Response::Flipped(f) => print_flip(o, &f),
        Response::Stats(c) => print_stats(o, &c),
        Response::History { events } => print_history(o, &events),
        Response::Backends { backends, .. } => print_backends(o, &backends),
        Response::Error { .. } => unreachable!(),
    }
}

fn print_dry_run(o: &mut String, d: &crate::control::DryRun) {
    let what = match d.percent {
        Some(p) => format!("a canary of {p}% to {}", d.to),
        None => format!("a flip {} -> {}", d.from, d.to),
    };
    let sel = |s: &crate::control::SelectorView| format!("active {}, canary {:.1}% (value {:#x})", s.active, s.canary_percent, s.value);
    match d.outcome.as_str() {
        "switch" => w!(o, "dry run: {what} would pass the gate (generation {})", d.generation),
        "refused" => w!(o, "dry run: {what} would be REFUSED: {}", d.failing.join("; ")),
        _ => w!(o, "dry run: {what} would change nothing ({} is already so)", d.to),
    }
    w!(o, "  selector now:   {}", sel(&d.selector_now));
    w!(o, "  selector after: {}", sel(&d.selector_after));
    let age = d.live_flows_age_ms.map(|a| format!(" (counted {a} ms ago)")).unwrap_or_default();
    w!(o, "  live flows stay where they are: blue {}, green {}{age}", d.live_flows[0], d.live_flows[1]);
    w!(o, "  automatic rollback: {}", d.auto_rollback);
    for f in &d.signals {
        w!(o, "  {}", signal_line(f));
    }
    w!(o, "  nothing was changed");
}

/// A pending drain as a progress line: `draining blue [########............] 18 s of 30 s
/// left, 57 live flows`.
pub fn drain_progress(d: &crate::control::DrainStatus, flows: &[u64; 2]) -> String {
    const WIDTH: u64 = 20;
    let live = flows[crate::config::parse_color(&d.color).map_or(0, |c| c as usize)];
    let total = d.total_secs.max(d.remaining_secs).max(1);
    let done = ((total - d.remaining_secs.min(total)) * WIDTH / total) as usize;
    format!(
        "draining {} [{}{}] {} s of {} s left, {live} live flows",
        d.color,
        "#".repeat(done),
        ".".repeat(WIDTH as usize - done),
        d.remaining_secs,
        total
    )
}

/// One (service, color)'s figures of the last window, in a line.
pub fn signal_line(f: &crate::signals::Figures) -> String {
    let share = |x: Option<f64>| x.map(|v| format!("{:.0}%", v * 100.0)).unwrap_or_else(|| "-".into());
    let ms = |x: Option<f64>| x.map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "-".into());
    let verdict = match (&f.breach, f.judged) {
        (Some(_), _) => "BREACH",
        (None, true) => "within SLO",
        (None, false) => "too few flows to judge",
    };
    format!(
        "{:<10} {:<5} last {:.0} s: {} new, {} answered, {} refused, {} unanswered ({} failed), {} reset ({}), handshake p50 {} p95 {}: {verdict}",
        f.service,
        f.color,
        f.secs,
        f.new_flows,
        f.answered,
        f.refused,
        f.no_answer,
        share(f.failure_share),
        f.resets,
        share(f.reset_share),
        ms(f.p50_ms),
        ms(f.p95_ms)
    )
}

/// Fetches every page of the backend list (each answer stays under the protocol's line limit).
fn backends(socket: &std::path::Path, color: Option<String>, state: Option<String>, json: bool) -> anyhow::Result<()> {
    let state: Option<crate::health::State> = state.map(|s| serde_json::from_value(serde_json::json!(s))).transpose()?;
    let mut all = Vec::new();
    loop {
        let req = Request::Backends { color: color.clone(), state, offset: all.len(), limit: None };
        match call(socket, &req)? {
            Response::Backends { total, backends, .. } => {
                let done = backends.is_empty() || all.len() + backends.len() >= total;
                all.extend(backends);
                if done {
                    break;
                }
            }
            Response::Error { message } => bail!("{message}"),
            other => bail!("the agent answered {other:?} to a backends request"),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        let mut text = String::new();
        print_backends(&mut text, &all);
        print!("{}", paint(&text));
    }
    Ok(())
}

fn print_backends(o: &mut String, list: &[crate::control::BackendStatus]) {
    for b in list {
        w!(o, "{:<10} {:<28} weight {:<4} {:<8} {}", b.service, b.backend, b.weight, format!("{:?}", b.state).to_lowercase(), b.last);
    }
}

fn print_stats(o: &mut String, c: &Counters) {
    w!(o, "{:<24} {:>14} {:>16} {:>10}", "color", "packets", "bytes", "new flows");
    for (name, s) in ["blue", "green"].iter().zip(c.colors) {
        w!(o, "{name:<24} {:>14} {:>16} {:>10}", s.packets, s.bytes, s.new_flows);
    }
    w!(o, "");
    for (name, n) in c.reasons.iter().chain(&c.forwarding) {
        w!(o, "{name:<24} {n:>14}");
    }
}

fn print_history(o: &mut String, events: &[serde_json::Value]) {
    for e in events {
        let s = |k: &str| e[k].as_str().map(str::to_owned).unwrap_or_else(|| if e[k].is_null() { "-".into() } else { e[k].to_string() });
        w!(o, 
            "{}  {:<22} {:>5} -> {:<5} gen {:<4} by {:<6} {}",
            s("time"),
            s("event"),
            s("from"),
            s("to"),
            s("generation"),
            s("uid"),
            s("reason")
        );
    }
}

fn print_flip(o: &mut String, f: &FlipResult) {
    if !f.changed {
        w!(o, "{} is already active (generation {}); nothing changed", f.to, f.generation);
        return;
    }
    let took = match &f.fleet {
        Some(fl) => format!("generation {}, fleet {}: {:.1} ms from request to every live gateway's ack", f.generation, fl.fleet, f.total_ns as f64 / 1e6),
        None => format!(
            "generation {}, switched in {:.1} us, {:.2} ms from request incl. health gate",
            f.generation,
            f.switch_ns as f64 / 1000.0,
            f.total_ns as f64 / 1e6
        ),
    };
    match f.percent {
        Some(0) => w!(o, "canary cancelled: all new flows go to {} ({took})", f.to),
        Some(p) => w!(o, "canary: {p}% of new flows go to {}, the rest stays on {} ({took})", f.to, f.from),
        None => w!(o, "flipped {} -> {}: new flows go to {} ({took})", f.from, f.to, f.to),
    }
    if f.forced {
        w!(o, "FORCED past a failing health gate (recorded in the audit log)");
    }
    if !f.auto_rollback.is_empty() {
        w!(o, "automatic rollback: {}", f.auto_rollback);
    }
    if let Some(s) = f.drain_secs {
        w!(o, "{}'s remaining flows will be ended in {s} s", f.from);
    }
    if let Some(fl) = &f.fleet {
        let acks: Vec<String> = fl.acks.iter().map(|a| format!("{} {:.1} ms", a.gateway, a.apply_ms)).collect();
        w!(o, "applied by {} gateway(s) (revision {}): {}", fl.acks.len(), fl.revision, acks.join(", "));
        for l in &fl.lagging {
            w!(o, "NOT applied in time by {} (still at revision {})", l.gateway, l.applied_revision);
        }
        if !fl.lost.is_empty() {
            w!(o, "lost during the switch (lease expired before acking): {}", fl.lost.join(", "));
        }
        if !fl.down.is_empty() {
            w!(o, "members without a live agent (not waited for): {}", fl.down.join(", "));
        }
        if let Some(r) = &fl.rolled_back {
            w!(o, "rollback_on_timeout: {r}");
        }
        if let Some(e) = &fl.error {
            w!(o, "{e}");
        }
    }
}

fn print_status(o: &mut String, s: &Status) {
    w!(o, 
        "active: {} (generation {}, for {}s){}",
        s.active,
        s.generation,
        s.active_for_secs,
        s.previous.as_ref().map(|p| format!("; rollback goes to {p}")).unwrap_or_default()
    );
    if let Some(c) = &s.canary {
        w!(o, "canary: {:.1}% of new flows go to {}", c.percent, c.color);
    }
    if let Some(f) = &s.fleet {
        let etcd = if f.etcd == "up" { format!("etcd up for {} s", f.etcd_for_secs) } else { format!("etcd DOWN for {} s", f.etcd_for_secs) };
        w!(o, "fleet {}: gateway {}, {etcd}, applied revision {}{}", f.name, f.gateway, f.applied_revision,
            if f.fenced { format!("; FENCED (cut off longer than fence_after_secs = {})", f.fence_after_secs) } else { String::new() });
        if let Some(e) = f.last_error.as_ref().filter(|_| f.etcd != "up") {
            w!(o, "  last etcd error: {e}");
        }
    }
    if let Some(w) = &s.watch {
        if w.canary {
            w!(o, "watching {}: the canary ends if it turns unhealthy (backends or SLO)", w.color);
        } else {
            w!(o, "watching {}: automatic rollback if it turns unhealthy (backends or SLO) in the next {} s", w.color, w.remaining_secs);
        }
    }
    w!(o, 
        "live flows: blue {}, green {} (established: {} of {} entries, {} evicted so far; unconfirmed: {} of {}; {} expired)",
        s.flows.flows[0], s.flows.flows[1], s.flows.entries, s.flow_table_size, s.flows.evicted, s.flows.unconfirmed_entries,
        s.unconfirmed_table_size, s.flows.expired
    );
    if let Some(d) = &s.drain {
        w!(o, "draining: {}'s remaining flows end in {} s", d.color, d.remaining_secs);
        w!(o, "  {}", drain_progress(d, &s.flows.flows));
    }
    if let Some(n) = s.last_drain_removed {
        w!(o, "last drain removed {n} flow entries");
    }
    for h in &s.health {
        let mark = if h.color == s.active { "*" } else { " " };
        let verdict = if h.all_down {
            "ALL BACKENDS OF A SERVICE DOWN"
        } else if h.healthy {
            "healthy"
        } else {
            "NOT healthy"
        };
        w!(o, "{mark} {} ({verdict}): {} up, {} down, {} unknown", h.color, h.up, h.down, h.unknown);
        for b in &h.slo_breaches {
            w!(o, "    SLO BREACH: {b}");
        }
        for b in &h.backends {
            w!(o, "    {:<10} {:<28} {:<8} {}", b.service, b.backend, format!("{:?}", b.state).to_lowercase(), b.last);
        }
        if h.backends_not_listed > 0 {
            w!(o, "    ... and {} more not up (`bgctl backends --color {} --state down`)", h.backends_not_listed, h.color);
        }
    }
    if !s.signals.is_empty() {
        w!(o, "connection signals (last SLO window, services with traffic):");
        for f in &s.signals {
            w!(o, "  {}", signal_line(f));
        }
        if s.signals_not_listed > 0 {
            w!(o, "  ... and {} more with traffic (`/metrics` has every one: bg_slo_*)", s.signals_not_listed);
        }
    }
    for svc in &s.services {
        let preview = svc.preview_vip.as_ref().map(|p| format!(" (preview {p} -> idle color)")).unwrap_or_default();
        w!(o, "service {} {}/{}{preview}: {} blue, {} green backends", svc.name, svc.vip, svc.protocol, svc.blue, svc.green);
    }
    let ifs: Vec<String> = s.interfaces.iter().map(|a| format!("{} ({})", a.interface, a.mode)).collect();
    w!(o, "interfaces: {}", ifs.join(", "));
    for e in &s.egress {
        let errors = if e.redirect_errors > 0 { format!(", {} failed redirects", e.redirect_errors) } else { String::new() };
        w!(o, "  out by {:<10} {:<8} {}{errors}", e.interface, e.path, e.why);
    }
    w!(o, "pinned: {}{}", s.pin_dir, if s.adopted { " (adopted from an earlier agent)" } else { "" });
}

/// Redraws a small dashboard in place until Ctrl-C (or `count` refreshes).
fn watch(socket: &std::path::Path, every: Duration, count: Option<u64>, json: bool) -> anyhow::Result<()> {
    let mut last: Option<(std::time::Instant, [u64; 2])> = None;
    let mut n = 0;
    loop {
        let Response::Status(s) = call(socket, &Request::Status { count_flows: false })? else { bail!("the agent did not answer status") };
        let Response::Stats(c) = call(socket, &Request::Stats)? else { bail!("the agent did not answer stats") };
        let now = std::time::Instant::now();
        let new = [c.colors[0].new_flows, c.colors[1].new_flows];
        let rate = |i: usize| match last {
            Some((t, prev)) => (new[i] - prev[i]) as f64 / now.duration_since(t).as_secs_f64(),
            None => 0.0,
        };
        if json {
            println!("{}", serde_json::json!({"status": s, "stats": c, "new_flows_per_sec": [rate(0), rate(1)]}));
            last = Some((now, new));
            n += 1;
            if count.is_some_and(|c| n >= c) {
                return Ok(());
            }
            std::thread::sleep(every);
            continue;
        }
        let mut screen = String::from("\x1b[H\x1b[2J");
        screen += &format!("bg watch  (every {} ms, Ctrl-C to stop)\n\n", every.as_millis());
        screen += &format!("active {}  generation {}", s.active, s.generation);
        if let Some(cn) = &s.canary {
            screen += &format!("  canary {:.1}% -> {}", cn.percent, cn.color);
        }
        if let Some(w) = &s.watch {
            if w.canary {
                screen += &format!("  watching {} (while the canary runs)", w.color);
            } else {
                screen += &format!("  watching {} ({} s left)", w.color, w.remaining_secs);
            }
        }
        screen += "\n";
        if let Some(d) = &s.drain {
            screen += &format!("{}\n", drain_progress(d, &s.flows.flows));
        }
        screen += "\n";
        screen += &format!("{:<7} {:>12} {:>12} {:>10}  health\n", "color", "new flows/s", "live flows", "packets");
        for (i, h) in s.health.iter().enumerate() {
            let up = h.up;
            screen += &format!(
                "{:<7} {:>12.1} {:>12} {:>10}  {} ({up}/{} up)\n",
                h.color,
                rate(i),
                s.flows.flows[i],
                c.colors[i].packets,
                if h.healthy { "healthy" } else { "NOT healthy" },
                h.up + h.down + h.unknown
            );
        }
        // The connection signals of the last SLO window, for the services with traffic.
        let busy: Vec<_> = s.signals.iter().filter(|f| f.busy()).collect();
        if !busy.is_empty() {
            screen += "\nconnection signals (last SLO window):\n";
            for f in busy {
                screen += &format!("  {}\n", signal_line(f));
            }
        }
        for h in &s.health {
            for b in &h.slo_breaches {
                screen += &format!("SLO BREACH: {b}\n");
            }
        }
        print!("{}", paint(&screen));
        use std::io::Write;
        std::io::stdout().flush()?;
        last = Some((now, new));
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_progress_line_fills_as_the_deadline_nears() {
        let d = |left, total| crate::control::DrainStatus { color: "blue".into(), remaining_secs: left, total_secs: total };
        assert_eq!(drain_progress(&d(30, 30), &[57, 9]), "draining blue [....................] 30 s of 30 s left, 57 live flows");
        assert_eq!(drain_progress(&d(15, 30), &[3, 9]), "draining blue [##########..........] 15 s of 30 s left, 3 live flows");
        assert_eq!(drain_progress(&d(0, 30), &[0, 9]), "draining blue [####################] 0 s of 30 s left, 0 live flows");
        // From an older agent (no total): as long as what is left.
        assert_eq!(drain_progress(&d(5, 0), &[1, 9]), "draining blue [....................] 5 s of 5 s left, 1 live flows");
    }

    #[test]
    fn only_whole_words_are_painted() {
        assert_eq!(paint_words("blue -> green"), "\x1b[1;34mblue\x1b[0m -> \x1b[1;32mgreen\x1b[0m");
        assert_eq!(paint_words("bluegreen blue-1 greenish"), "bluegreen blue-1 greenish");
        assert_eq!(paint_words("(green)"), "(\x1b[1;32mgreen\x1b[0m)");
    }
}
