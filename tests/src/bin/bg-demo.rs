//! `cargo xtask demo` runs this: the whole story in network namespaces, then everything
//! removed again. `bg-demo sweep PREFIX` removes what a killed run left (xtask calls it after
//! every run: xtask itself builds without bg's crates, so a fresh machine can build it before
//! anything is installed).

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
        let body = t.get_vip()?;
        println!("    curl http://{VIP}:{VIP_PORT}/  (new connection {i}) -> {body}");
        if body != expect {
            bail!("expected {expect} to answer, got {body:?}");
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] | ["demo"] => demo(),
        ["fleet"] => fleet(),
        ["sweep", prefix] => {
            for line in bg_tests::run::sweep(prefix) {
                println!("{line}");
            }
            Ok(())
        }
        _ => bail!("usage: bg-demo [demo] | bg-demo fleet | bg-demo sweep PREFIX"),
    }
}

fn demo() -> anyhow::Result<()> {
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

/// `cargo xtask demo --fleet`: three gateways behind an ECMP router switch as one through etcd.
fn fleet() -> anyhow::Result<()> {
    use bg_tests::fleet::{etcd_url, FleetTopology, GATEWAYS};
    let tag = bg_tests::run::tag("fdemo");
    step(&format!(
        "creating namespaces {tag}-{{cl,rt,sw,bl,gr,g0,g1,g2}}: a client, a router with an ECMP route to the VIP {VIP} \
         over three gateways, a LAN with etcd ({}) and blue and green backends that route back through g0",
        etcd_url()
    ));
    let mut t = FleetTopology::create(&tag)?;
    t.start_etcd()?;
    println!("    etcd (Debian's etcd-server) answering at {}", etcd_url());
    let _backends = t.start_backends()?;
    step("starting an agent on each gateway (same config but for [fleet] gateway = ...)");
    println!("{}", t.config(0).lines().skip_while(|l| !l.starts_with("[fleet]")).map(|l| format!("    | {l}")).collect::<Vec<_>>().join("\n"));
    let _agents = (0..GATEWAYS).map(|i| t.start_agent(i)).collect::<anyhow::Result<Vec<_>>>()?;
    t.wait_healthy()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !t.fleet_status()["gateways"].as_array().is_some_and(|g| g.len() == GATEWAYS && g.iter().all(|g| g["health"].as_array().is_some_and(|h| h.iter().all(|v| v["healthy"] == true)))) {
        if std::time::Instant::now() > deadline {
            bail!("the gateways did not all report both colors healthy in etcd within 10 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let fleet = |args: &[&str]| -> anyhow::Result<()> {
        println!("    $ bgctl fleet --etcd {} --fleet {tag} {}", etcd_url(), args.join(" "));
        show(t.fleet_cli(&t.sw, args)?);
        Ok(())
    };
    let through_all = |expect: &str| -> anyhow::Result<()> {
        for only in 0..GATEWAYS {
            t.route_via(Some(only))?;
            let out = t.client.exec(&["curl", "-sS", "--fail", "--max-time", "5", &format!("http://{VIP}:{VIP_PORT}/")])?;
            let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            println!("    through g{only} only: curl http://{VIP}:{VIP_PORT}/ -> {body}");
            if body != expect {
                bail!("expected {expect} through g{only}, got {body:?}");
            }
        }
        t.route_via(None)
    };
    step("the fleet as etcd holds it (from the etcd host: only bgctl there, no agent)");
    fleet(&["status"])?;
    through_all("blue")?;
    step("bgctl flip green on g1: written to etcd with a compare-and-swap, returned once all three applied it");
    show(t.bgctl(1, &["flip", "green"])?);
    through_all("green")?;
    step("g2's agent killed (SIGKILL); its data plane keeps its last state; the fleet flips without it");
    let mut agents = _agents;
    if let Some(c) = agents[2].child.as_mut() {
        c.kill()?;
        c.wait()?;
    }
    std::thread::sleep(Duration::from_secs(3));
    fleet(&["rollback"])?;
    through_all_but_one(&t, "blue", 2, "green")?;
    step("g2's agent restarted: it reads the fleet's state before answering anything");
    agents[2] = t.start_agent(2)?;
    show(t.bgctl(2, &["status"])?);
    through_all("blue")?;
    step("the fleet's history in etcd");
    fleet(&["history"])?;
    println!("\n    done: the fleet switched as one, a dead agent was reported and left serving, and caught up on restart");
    drop(agents);
    t.kill_etcd();
    Ok(())
}

/// Through each gateway in turn: `expect`, but `other` through gateway `odd`.
fn through_all_but_one(t: &bg_tests::fleet::FleetTopology, expect: &str, odd: usize, other: &str) -> anyhow::Result<()> {
    for only in 0..bg_tests::fleet::GATEWAYS {
        t.route_via(Some(only))?;
        let out = t.client.exec(&["curl", "-sS", "--fail", "--max-time", "5", &format!("http://{VIP}:{VIP_PORT}/")])?;
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let want = if only == odd { other } else { expect };
        println!("    through g{only} only: curl http://{VIP}:{VIP_PORT}/ -> {body}{}", if only == odd { "   (its agent is dead: last applied state)" } else { "" });
        if body != want {
            bail!("expected {want} through g{only}, got {body:?}");
        }
    }
    t.route_via(None)
}
