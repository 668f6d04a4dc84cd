//! `cargo xtask demo`: the whole story in network namespaces, then everything removed again.

use std::time::Duration;

use anyhow::bail;
use bg_tests::topology::{Topology, BLUE, CLIENT, GREEN, VIP, VIP_PORT};

fn step(title: &str) {
    println!("\n==> {title}");
}

fn show(out: std::process::Output) {
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

fn requests(t: &Topology, n: usize, expect: &str) -> anyhow::Result<()> {
    for i in 1..=n {
        if crate::interrupted() {
            bail!("interrupted");
        }
        let body = t.get_vip()?;
        println!("    curl http://{VIP}:{VIP_PORT}/  (new connection {i}) -> {body}");
        if body != expect {
            bail!("expected {expect} to answer, got {body:?}");
        }
    }
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    let tag = bg_tests::run::tag("demo");
    step(&format!(
        "creating namespaces {tag}-{{cl,gw,bl,gr}}: client {CLIENT}, gateway, blue {BLUE}, green {GREEN}; VIP {VIP}:{VIP_PORT}"
    ));
    let t = Topology::create(&tag)?;
    let _backends = t.start_backends()?;
    println!("    blue and green HTTP servers listening on :8080");

    step("starting the agent on the gateway: bgctl agent --config bg.toml");
    println!("{}", t.config().lines().map(|l| format!("    | {l}")).collect::<Vec<_>>().join("\n"));
    let mut agent = t.start_agent()?;
    t.wait_healthy()?;

    step("bgctl status");
    show(t.bgctl(&["status"])?);

    step("requests to the VIP are answered by blue");
    requests(&t, 3, "blue")?;

    step("bgctl flip green");
    show(t.bgctl(&["flip", "green"])?);
    requests(&t, 3, "green")?;

    step("bgctl rollback");
    show(t.bgctl(&["rollback"])?);
    requests(&t, 3, "blue")?;

    step("bgctl status");
    show(t.bgctl(&["status"])?);
    step("bgctl stats");
    show(t.bgctl(&["stats"])?);

    let errors = t.csum_errors()?;
    println!("\n    TCP/UDP checksum errors seen by client and backends: {errors}");
    if errors != 0 {
        bail!("the kernels counted {errors} checksum errors: a rewrite produced a bad checksum");
    }

    step("bgctl history");
    show(t.bgctl(&["history"])?);

    step("stopping the agent (SIGTERM): the data plane stays and keeps serving");
    if !agent.stop(Duration::from_secs(5)) {
        bail!("the agent did not stop within 5 s of SIGTERM");
    }
    requests(&t, 1, "blue")?;
    step("bgctl agent --cleanup, then removing namespaces and processes");
    show(t.cleanup()?);
    println!("    done: blue answered, the flip moved new connections to green, rollback moved them back");
    Ok(())
}
