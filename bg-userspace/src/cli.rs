//! Command-line interface: parsing and the output of each command.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use crate::{
    config::Config,
    control::{call, FlipResult, Request, Response, Status},
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
    /// Load and attach the XDP program and serve the control socket (runs until SIGTERM).
    Agent {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print what it would apply, without touching the kernel.
    CheckConfig {
        /// The TOML config file.
        config: PathBuf,
    },
    /// Show the active color, generation, backends, attachments and live flows.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Send new flows to COLOR (live flows stay where they are).
    Flip {
        /// `blue` or `green`.
        color: String,
        /// End the previous color's remaining flows after SECS seconds: their entries are
        /// removed, and their next packet is answered with a TCP RST by the active color.
        #[arg(long, value_name = "SECS")]
        drain: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Undo the last flip.
    Rollback {
        #[arg(long)]
        json: bool,
    },
    /// Packet counters of the XDP program, per reason.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

fn socket_or_default(cli: &Option<PathBuf>) -> PathBuf {
    cli.clone()
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_SOCKET))
}

pub fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent { config } => {
            let mut config = Config::load(&config)?;
            if let Some(s) = cli.socket {
                config.socket = s;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(crate::agent::run(config))
        }
        Command::CheckConfig { config } => {
            let c = Config::load(&config)?;
            println!(
                "{}: ok: {} service(s) on {}; starts on {}",
                config.display(),
                c.services.len(),
                c.interfaces.join(", "),
                c.initial_color.name()
            );
            Ok(())
        }
        Command::Status { json } => {
            let r = call(&socket_or_default(&cli.socket), &Request::Status)?;
            output(r, json)
        }
        Command::Flip { color, drain, json } => {
            if color != "blue" && color != "green" {
                bail!("unknown color `{color}`; use `blue` or `green`");
            }
            let r = call(&socket_or_default(&cli.socket), &Request::Flip { color, drain_secs: drain })?;
            output(r, json)
        }
        Command::Rollback { json } => {
            let r = call(&socket_or_default(&cli.socket), &Request::Rollback)?;
            output(r, json)
        }
        Command::Stats { json } => {
            let r = call(&socket_or_default(&cli.socket), &Request::Stats)?;
            output(r, json)
        }
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
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    match r {
        Response::Status(s) => print_status(&s),
        Response::Flipped(f) => print_flip(&f),
        Response::Stats(c) => {
            println!("{:<24} {:>14} {:>16} {:>10}", "color", "packets", "bytes", "new flows");
            for (name, s) in ["blue", "green"].iter().zip(c.colors) {
                println!("{name:<24} {:>14} {:>16} {:>10}", s.packets, s.bytes, s.new_flows);
            }
            println!();
            for (name, n) in c.reasons.iter().chain(&c.forwarding) {
                println!("{name:<24} {n:>14}");
            }
        }
        Response::Error { .. } => unreachable!(),
    }
    Ok(())
}

fn print_flip(f: &FlipResult) {
    if f.changed {
        println!(
            "flipped {} -> {}: new flows go to {} (generation {}, switch took {:.1} us)",
            f.from,
            f.to,
            f.to,
            f.generation,
            f.switch_ns as f64 / 1000.0
        );
        if let Some(s) = f.drain_secs {
            println!("{}'s remaining flows will be ended in {s} s", f.from);
        }
    } else {
        println!("{} is already active (generation {}); nothing changed", f.to, f.generation);
    }
}

fn print_status(s: &Status) {
    println!(
        "active: {} (generation {}, for {}s){}",
        s.active,
        s.generation,
        s.active_for_secs,
        s.previous
            .as_ref()
            .map(|p| format!("; rollback goes to {p}"))
            .unwrap_or_default()
    );
    println!(
        "live flows: blue {}, green {} (table: {} of {} entries in use, {} expired, {} evicted so far)",
        s.flows.flows[0], s.flows.flows[1], s.flows.entries, s.flow_table_size, s.flows.expired, s.flows.evicted
    );
    if let Some(d) = &s.drain {
        println!("draining: {}'s remaining flows end in {} s", d.color, d.remaining_secs);
    }
    if let Some(n) = s.last_drain_removed {
        println!("last drain removed {n} flow entries");
    }
    for svc in &s.services {
        println!("service {} {}/{}", svc.name, svc.vip, svc.protocol);
        for (color, list) in [("blue", &svc.blue), ("green", &svc.green)] {
            let mark = if color == s.active { "*" } else { " " };
            println!("  {mark} {color:<5} {}", list.join(", "));
        }
    }
    let ifs: Vec<String> = s
        .interfaces
        .iter()
        .map(|a| format!("{} ({})", a.interface, a.mode))
        .collect();
    println!("interfaces: {}", ifs.join(", "));
    println!("pinned maps: {}", s.pin_dir);
}
