//! `bgctl agent`: owns the data plane and serves the control socket.
//!
//! Start-up applies nothing until the whole config is valid and every interface exists; if a
//! later step fails (load, attach, pin, socket), everything done so far is undone before the
//! error is returned. On SIGINT/SIGTERM the agent detaches the program, removes its pins and its
//! socket: in this version the agent owns the data plane for its lifetime.

use std::{
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use bg_common::Color;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};
use tracing::{info, warn};

use crate::{
    config::{parse_color, Config},
    control::{FlipResult, Request, Response, ServiceStatus, Status, MAX_LINE},
    dataplane::{require_embedded_object, Attachment, Dataplane},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

struct State {
    config: Config,
    /// A drain scheduled by the last flip: (color to end, deadline, generation of that flip).
    drain: Option<(Color, Instant, u64)>,
    last_drain_removed: Option<u64>,
    dp: Dataplane,
    attachments: Vec<Attachment>,
    active: Color,
    previous: Option<Color>,
    generation: u64,
    active_since: Instant,
}

/// Removes the pin directory and the socket when dropped, unless disarmed.
struct Cleanup {
    pin_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = self.pin_dir.take() {
            if let Err(e) = remove_pin_dir(&dir) {
                warn!(dir = %dir.display(), error = %e, "could not remove pinned maps");
            }
        }
        if let Some(sock) = self.socket.take() {
            let _ = std::fs::remove_file(sock);
        }
    }
}

/// Removes the files in a bg pin directory and the directory itself.
pub fn remove_pin_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                std::fs::remove_file(e?.path())?;
            }
            std::fs::remove_dir(dir)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) {
        // A custom location: it must already be on a bpffs.
        return Ok(());
    }
    let st = nix::sys::statfs::statfs(root).context("checking /sys/fs/bpf")?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        info!("mounting bpffs at /sys/fs/bpf");
        nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .context("mounting bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)")?;
    }
    Ok(())
}

fn check_interfaces(config: &Config) -> anyhow::Result<()> {
    for (i, name) in config.interfaces.iter().enumerate() {
        if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
            bail!(
                "config field `interfaces[{i}]`: interface `{name}` does not exist in this network \
                 namespace; check `ip link` and fix the name"
            );
        }
    }
    Ok(())
}

/// Refuses to start over a live agent; removes a stale socket left by a dead one.
fn claim_socket(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another bg agent is already serving {}; stop it first (or give this one another \
                 `socket` and `pin_dir`)",
                path.display()
            );
        }
        warn!(socket = %path.display(), "removing stale control socket");
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let object = require_embedded_object()?;
    check_interfaces(&config)?;
    claim_socket(&config.socket)?;
    ensure_bpffs(&config.pin_dir)?;
    if config.pin_dir.exists() {
        warn!(dir = %config.pin_dir.display(), "removing pinned state left by an agent that is no longer running");
        remove_pin_dir(&config.pin_dir)
            .with_context(|| format!("removing stale pins in {}", config.pin_dir.display()))?;
    }

    let mut dp = Dataplane::new(object, &config)?;

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.pin_dir)
        .with_context(|| format!("creating pin directory {}", config.pin_dir.display()))?;
    let mut cleanup = Cleanup {
        pin_dir: Some(config.pin_dir.clone()),
        socket: None,
    };
    dp.pin_maps(&config.pin_dir)?;
    let attachments = dp.attach(&config.interfaces, config.xdp_mode)?;
    for a in &attachments {
        info!(interface = %a.interface, mode = %a.mode, "XDP program attached");
    }

    let listener = UnixListener::bind(&config.socket)
        .with_context(|| format!("binding control socket {}", config.socket.display()))?;
    cleanup.socket = Some(config.socket.clone());
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o600))?;
    info!(
        socket = %config.socket.display(),
        active = config.initial_color.name(),
        services = config.services.len(),
        "bg agent ready"
    );

    let state = Arc::new(Mutex::new(State {
        active: config.initial_color,
        config,
        dp,
        attachments,
        previous: None,
        drain: None,
        last_drain_removed: None,
        generation: 1,
        active_since: Instant::now(),
    }));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => run_due_drain(&state),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, state).await {
                            warn!(error = %e, "control connection failed");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "accept on control socket failed"),
            },
            _ = term.recv() => { info!("SIGTERM: detaching, removing pins and socket"); break; }
            _ = int.recv() => { info!("SIGINT: detaching, removing pins and socket"); break; }
        }
    }
    drop(listener);
    // Pins and socket go now; the links are released when the process exits (or the last
    // in-flight control connection drops its handle), which detaches the program.
    drop(cleanup);
    info!("bg agent stopped");
    Ok(())
}

async fn serve(stream: UnixStream, state: Arc<Mutex<State>>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_LINE as u64 + 1)).lines();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await?? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(&state, req),
            Err(e) => Response::Error {
                message: format!(
                    "bad request ({e}); send one JSON object per line such as {{\"op\":\"status\"}}, \
                     {{\"op\":\"flip\",\"color\":\"green\"}}, {{\"op\":\"rollback\"}} or {{\"op\":\"stats\"}}"
                ),
            },
        };
        let mut out = serde_json::to_string(&response)?;
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
    }
    Ok(())
}

fn handle(state: &Mutex<State>, req: Request) -> Response {
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let result = match req {
        Request::Status => status(&st).map(Response::Status),
        Request::Stats => st.dp.counters().map(Response::Stats),
        Request::Flip { color, drain_secs } => match parse_color(&color) {
            Some(c) => flip(&mut st, c, drain_secs).map(Response::Flipped),
            None => Err(anyhow!("unknown color `{color}`; use `blue` or `green`")),
        },
        Request::Rollback => match st.previous {
            Some(prev) => flip(&mut st, prev, None).map(Response::Flipped),
            None => Err(anyhow!("nothing to roll back: the active color has not changed since the agent started")),
        },
    };
    result.unwrap_or_else(|e| Response::Error {
        message: format!("{e:#}"),
    })
}

/// Ends the drained color's remaining flows once its deadline has passed, unless another flip
/// happened since (then that flip's own drain setting rules).
fn run_due_drain(state: &Mutex<State>) {
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let Some((color, deadline, generation)) = st.drain else { return };
    if Instant::now() < deadline {
        return;
    }
    st.drain = None;
    if generation != st.generation {
        return;
    }
    match st.dp.remove_flows_of(color) {
        Ok(n) => {
            info!(color = color.name(), entries = n, "drain deadline reached: removed the remaining flow entries");
            st.last_drain_removed = Some(n);
        }
        Err(e) => warn!(color = color.name(), error = %e, "drain failed"),
    }
}

fn flip(st: &mut State, to: Color, drain_secs: Option<u64>) -> anyhow::Result<FlipResult> {
    let from = st.active;
    if from == to {
        return Ok(FlipResult {
            from: from.name().into(),
            to: to.name().into(),
            generation: st.generation,
            changed: false,
            switch_ns: 0,
            drain_secs: None,
        });
    }
    let t = Instant::now();
    st.dp.select(to)?;
    let switch_ns = t.elapsed().as_nanos() as u64;
    st.previous = Some(from);
    st.active = to;
    st.generation += 1;
    st.active_since = Instant::now();
    st.drain = drain_secs.map(|s| (from, Instant::now() + Duration::from_secs(s), st.generation));
    info!(from = from.name(), to = to.name(), generation = st.generation, switch_ns, drain_secs, "flipped");
    Ok(FlipResult {
        from: from.name().into(),
        to: to.name().into(),
        generation: st.generation,
        changed: true,
        switch_ns,
        drain_secs,
    })
}

fn backend_text(b: &crate::config::BackendAddr) -> String {
    if b.weight == 1 {
        b.addr.to_string()
    } else {
        format!("{} (weight {})", b.addr, b.weight)
    }
}

fn status(st: &State) -> anyhow::Result<Status> {
    let active = st.dp.active()?;
    Ok(Status {
        active: active.name().into(),
        previous: st.previous.map(|c| c.name().into()),
        generation: st.generation,
        active_for_secs: st.active_since.elapsed().as_secs(),
        services: st
            .config
            .services
            .iter()
            .map(|s| ServiceStatus {
                name: s.name.clone(),
                vip: s.vip.to_string(),
                protocol: s.protocol.name().into(),
                blue: s.blue.iter().map(backend_text).collect(),
                green: s.green.iter().map(backend_text).collect(),
            })
            .collect(),
        interfaces: st.attachments.clone(),
        flows: st.dp.flow_counts()?,
        flow_table_size: st.config.flow_table_size,
        pin_dir: st.config.pin_dir.display().to_string(),
        drain: st.drain.map(|(color, deadline, _)| crate::control::DrainStatus {
            color: color.name().into(),
            remaining_secs: deadline.saturating_duration_since(Instant::now()).as_secs(),
        }),
        last_drain_removed: st.last_drain_removed,
    })
}
