//! BENCHMARKS.md from one run's results.json, and the list of what must never happen.
//!
//! Every figure in the report is read from the results; a figure that is missing (a section
//! that failed or was not run) reads "not measured", and a target it decides reads "not
//! measured", never "met".

use serde_json::Value;

/// The `p` quantile of sorted `v` (0 when empty).
pub fn pct(v: &[u64], p: f64) -> u64 {
    v.get(((v.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0)
}

const CONTENDERS: [&str; 3] = ["bg", "nftables", "haproxy"];

/// Every error, reset, moved connection, SYN retransmit and listen drop any contender
/// counted, one line each (empty when there was none).
pub fn violations(all: &Value) -> Vec<String> {
    let r = &all["results"];
    let mut v = Vec::new();
    for which in CONTENDERS {
        let o = &r["cutover"]["contenders"][which];
        for key in ["errors", "resets", "moved_connections", "syn_retransmits"] {
            if let Some(n) = o[key].as_u64().filter(|n| *n > 0) {
                v.push(format!("{which} cutover: {n} {}", key.replace('_', " ")));
            }
        }
    }
    for run in r["network"]["runs"].as_array().into_iter().flatten() {
        let res = &run["result"];
        let who = format!("{} {} (wrk)", run["contender"].as_str().unwrap_or("?"), run["mode"].as_str().unwrap_or("?"));
        for key in ["syn_retransmits", "listen_drops", "rate_bound_drops"] {
            if let Some(n) = res[key].as_u64().filter(|n| *n > 0) {
                v.push(format!("{who}: {n} {}", key.replace('_', " ")));
            }
        }
        for key in ["socket_errors", "non_2xx"] {
            if let Some(text) = res[key].as_str().filter(|t| !t.is_empty()) {
                v.push(format!("{who}: {text}"));
            }
        }
    }
    v
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

fn fmt(v: &Value, digits: usize) -> String {
    num(v).map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "not measured".into())
}

fn us(v: &Value) -> String {
    num(v).map(|x| format!("{:.0}", x / 1000.0)).unwrap_or_else(|| "not measured".into())
}

/// max / min over `key` of the array's elements, when every element has it.
fn spread(arr: &Value, key: &str) -> Option<f64> {
    let v: Vec<f64> = arr.as_array()?.iter().map(|e| num(&e[key])).collect::<Option<_>>()?;
    if v.len() < 2 {
        return None;
    }
    let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    Some(hi / lo)
}

enum Verdict {
    Met,
    Missed,
    NotMeasured(String),
}

struct Row {
    what: String,
    wanted: String,
    got: String,
    verdict: Verdict,
}

/// A network contender's figures, or why they are not a result.
fn network_broken(n: &Value, mode: &str, which: &str) -> Option<String> {
    let m = &n["summary"][mode][which];
    if m.is_null() {
        return Some("not measured".into());
    }
    (m["broken_setup"] == true).then(|| format!("broken setup: {} SYN retransmits, {} listen drops", m["syn_retransmits"], m["listen_drops"]))
}

fn targets(all: &Value) -> Vec<Row> {
    let r = &all["results"];
    let p = &r["packet"];
    let n = &r["network"];
    let bg = &r["cutover"]["contenders"]["bg"];
    let mut rows = Vec::new();
    let mut row = |what: &str, wanted: &str, got: Option<(String, bool)>, missing: Option<String>| {
        let (got, verdict) = match (got, missing) {
            (_, Some(why)) => ("-".into(), Verdict::NotMeasured(why)),
            (Some((g, ok)), None) => (g, if ok { Verdict::Met } else { Verdict::Missed }),
            (None, None) => ("-".into(), Verdict::NotMeasured("not measured".into())),
        };
        rows.push(Row { what: what.into(), wanted: wanted.into(), got, verdict });
    };
    let above = |key: &str, floor_key: &str, limit: f64| -> Option<(String, bool)> {
        let x = num(&p[key])? - num(&p[floor_key])?;
        Some((format!("floor + {x:.0} ns"), x <= limit))
    };
    row("non-VIP pass", "floor + 5 ns", above("non_vip_ns", "floor_ns", 5.0), None);
    row("established flow (one flow, repeat mode)", "floor + 30 ns", above("established_ns", "floor_ns", 30.0), None);
    row("new flow", "floor + 150 ns", above("new_flow_ns", "floor_single_ns", 150.0), None);
    row(
        "flat over flow-table size (distinct flows)",
        "≤ 1.3×",
        spread(&p["by_table_size"], "distinct_flows_ns").map(|s| (format!("{s:.2}×"), s <= 1.3)),
        None,
    );
    row("flat over 1..256 backends", "≤ 1.3×", spread(&p["by_backends"], "new_flow_ns").map(|s| (format!("{s:.2}×"), s <= 1.3)), None);
    for mode in ["keepalive", "new_connection"] {
        let label = mode.replace('_', " ");
        let ratio = |w: &str| num(&n["summary"][mode][w]["ratio_to_direct"]);
        let broken = network_broken(n, mode, "bg").or_else(|| network_broken(n, mode, "direct"));
        row(&format!("{label} req/s vs direct"), "≥ 0.98×", ratio("bg").map(|b| (format!("{b:.3}×"), b >= 0.98)), broken.clone());
        let vs = ratio("bg").zip(ratio("nftables")).map(|(b, f)| (format!("{b:.3}× vs {f:.3}×"), b >= f));
        row(&format!("{label} req/s vs nftables"), "≥ nftables", vs, broken.or_else(|| network_broken(n, mode, "nftables")));
    }
    let ka = num(&n["summary"]["keepalive"]["bg"]["rps"]).zip(num(&n["summary"]["keepalive"]["haproxy"]["rps"])).map(|(b, h)| b / h);
    row(
        "keep-alive req/s vs HAProxy",
        "≥ 1.5×",
        ka.map(|k| (format!("{k:.2}×"), k >= 1.5)),
        network_broken(n, "keepalive", "haproxy").or_else(|| network_broken(n, "keepalive", "bg")),
    );
    let mw = num(&r["map_write"]["p50"]).map(|x| x / 1000.0);
    row("selector map write", "≤ 5 µs", mw.map(|m| (format!("{m:.1} µs (p50)"), m <= 5.0)), None);
    let rt = num(&bg["api"]["switch_ns"]["p50"]).map(|x| x / 1e6);
    row("flip over the control socket, health gate included", "≤ 1 ms", rt.map(|x| (format!("{x:.2} ms (p50)"), x <= 1.0)), None);
    let api_us = num(&bg["api"]["switch_ns"]["p50"]).map(|x| x / 1e3);
    row("flip over the control socket in the storm (issue 11)", "≤ 100 µs", api_us.map(|x| (format!("{x:.0} µs (p50)"), x <= 100.0)), None);
    let cli_ms = num(&bg["cli"]["switch_ns"]["p50"]).map(|x| x / 1e6);
    row("`bgctl flip` end to end", "≤ 3 ms", cli_ms.map(|x| (format!("{x:.2} ms (p50)"), x <= 3.0)), None);
    let m = &r["control"]["million_flows"];
    let flows = m["flows"].as_u64().map(|f| f.to_string()).unwrap_or_else(|| "1M".into());
    for (what, key) in [("`status`", "status"), ("a scrape", "scrape")] {
        let p50 = num(&m[key]["p50_us"]);
        row(&format!("{what} at {flows} flows, while flips run"), "< 1 ms", p50.map(|x| (format!("{x:.0} µs (p50), {} µs (p99)", m[key]["p99_us"]), x < 1000.0)), None);
    }
    let fg = num(&bg["api"]["first_new_on_new_color_ns"]["p50"]).map(|x| x / 1e6);
    row("first new connection on the new color after the flip returned", "≤ 1 ms", fg.map(|x| (format!("{x:.2} ms (p50)"), x <= 1.0)), None);
    let bad = ["errors", "resets", "moved_connections"].iter().map(|k| bg[*k].as_u64()).collect::<Option<Vec<u64>>>();
    let flips = bg["api"]["switches"].as_u64().zip(bg["cli"]["switches"].as_u64()).map(|(a, c)| a + c);
    row(
        &format!("errors/resets/moved over {} flips under load", flips.map(|f| f.to_string()).unwrap_or_else(|| "the".into())),
        "0",
        bad.map(|b| (format!("{}/{}/{}", b[0], b[1], b[2]), b.iter().all(|x| *x == 0))),
        None,
    );
    rows
}

/// Why the missed targets were missed, as far as this run's own figures show: one bullet per
/// cause, naming the targets it explains.
fn misses(all: &Value, rows: &[Row]) -> String {
    let r = &all["results"];
    let p = &r["packet"];
    let missed = |pred: &dyn Fn(&str) -> bool| -> Vec<String> {
        rows.iter().filter(|r| matches!(r.verdict, Verdict::Missed) && pred(&r.what)).map(|r| format!("{} ({}, wanted {})", r.what, r.got, r.wanted)).collect()
    };
    let mut bullets = Vec::new();
    let per_packet = missed(&|w| w.starts_with("non-VIP") || w.starts_with("established") || w.starts_with("new flow"));
    if !per_packet.is_empty() {
        bullets.push(format!(
            "**Per-packet costs**: {}. The floor in this run is {} ns per run in repeat mode and {} ns in single runs; the machine's noise sits in \
             every row. Beyond it, a non-VIP packet pays the header walk, the flow key and two probes of the address filter; an established packet \
             pays one LRU hash lookup (an IPv4 flow's key is 16 bytes), the incremental IP and L4 checksum updates, three per-CPU counters and, \
             on the default redirect path, the next hop cached in its entry (a coarse clock read, the MAC rewrite, `bpf_redirect`): {} ns of an \
             established packet in this run against the same with `forwarding = \"kernel\"` (no next hop at all). A new flow pays misses in the \
             established and unconfirmed tables, the service lookup, the rate window, Maglev, one LRU insert and a FIB lookup, all on cold \
             cache lines: single runs cross a syscall each, which is also why one hot flow costs more in single runs than in repeat mode. \
             Not done: batching the counters into one per-CPU value, a per-CPU LRU for the unconfirmed table.",
            per_packet.join("; "),
            fmt(&p["floor_ns"], 1),
            fmt(&p["floor_single_ns"], 1),
            num(&p["established_ns"]).zip(num(&p["established_kernel_forwarding_ns"])).map(|(a, b)| format!("{:.0}", a - b)).unwrap_or_else(|| "not measured".into())
        ));
    }
    let sweep = missed(&|w| w.starts_with("flat over flow-table"));
    if !sweep.is_empty() {
        let sizes: Vec<String> = p["by_table_size"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| format!("{} entries: {} ns (one flow: {} ns)", e["table_size"], fmt(&e["distinct_flows_ns"], 1), fmt(&e["one_flow_ns"], 1)))
            .collect();
        bullets.push(format!("**Flow-table size**: {}. Distinct flows miss the caches once the table outgrows them: {}.", sweep.join("; "), sizes.join("; ")));
    }
    let net = missed(&|w| w.contains("req/s"));
    if !net.is_empty() {
        let rounds = r["network"]["runs"].as_array().map(|a| a.iter().filter(|x| x["contender"] == "direct" && x["mode"] == "keepalive").count()).unwrap_or(0);
        bullets.push(format!(
            "**Requests/s**: {}. Client, gateway and backends share this machine's CPUs, so each contender's own cost is diluted by wrk's and \
             nginx's{}; on veth, native XDP also converts each locally generated skb into an XDP buffer before the program runs, a cost a physical \
             NIC does not have.",
            net.join("; "),
            if rounds > 1 { " (the per-round ratios above show how much of a difference is noise)" } else { "" }
        ));
    }
    let control = missed(&|w| w.contains("control socket") || w.contains("first new connection") || w.contains("map write") || w.contains("bgctl flip") || w.contains(" flows, while flips run"));
    if !control.is_empty() {
        let m = &all["results"]["control"]["million_flows"];
        bullets.push(format!(
            "**Control path**: {}. The flip's round trip includes connecting to the socket, the health gate, the selector write and the audit \
             line; the first new connection after it includes that connection's own handshake and request. Of a quiet flip's {} µs (p50, client), \
             the agent's own work is {} µs; a bare Unix-socket request and answer between two threads of the benchmark, at the same spacing, \
             takes {} µs (p50). The rest lies between the two processes (waking the agent's idle thread, the runtime's turn, the JSON both ways); \
             a floor between two processes was not measured. `bgctl flip` adds a process start: `bgctl --version` alone takes {} µs (p50) here.",
            control.join("; "),
            m["flip_quiet"]["p50_us"],
            m["flip_quiet_in_agent"]["p50_us"],
            m["unix_socket_floor"]["p50_us"],
            m["cli_start"]["p50_us"]
        ));
    }
    let rest = missed(&|w| w.starts_with("errors/") || w.starts_with("flat over 1..") || w.starts_with("keep-alive"));
    if !rest.is_empty() {
        bullets.push(format!("**Also missed**: {}; see the sections above.", rest.join("; ")));
    }
    if bullets.is_empty() {
        return String::new();
    }
    let mut s = String::from("## Where the misses come from\n\n");
    for b in bullets {
        s += &format!("- {b}\n");
    }
    s + "\n"
}

/// BENCHMARKS.md from one run's results.
pub fn markdown(all: &Value) -> String {
    let r = &all["results"];
    let p = &r["packet"];
    let mut s = format!(
        "# bg benchmarks\n\nRun: {} on {} CPUs, kernel {}{}. Reproduce: `cargo xtask bench` (as root; installs wrk, nginx-light, haproxy, nftables and socat when missing). \
         The machine is shared and noisy: read ratios within one run, not absolute numbers across runs. Every figure below was computed by this run; \
         what it did not compute reads \"not measured\".\n\n",
        all["meta"]["date"].as_str().unwrap_or("?"),
        all["meta"]["cpus"],
        all["meta"]["kernel"].as_str().unwrap_or("?"),
        if all["meta"]["smoke"] == true { " (SMOKE run: seconds, not meaningful)" } else { "" }
    );
    let rows = targets(all);
    s += "## Targets\n\n| target | wanted | this run | |\n|---|---|---|---|\n";
    for row in &rows {
        let v = match &row.verdict {
            Verdict::Met => "met".to_owned(),
            Verdict::Missed => "**missed**".to_owned(),
            Verdict::NotMeasured(why) if why == "not measured" => why.clone(),
            Verdict::NotMeasured(why) => format!("not measured ({why})"),
        };
        s += &format!("| {} | {} | {} | {v} |\n", row.what, row.wanted, row.got);
    }
    for (section, v) in r.as_object().into_iter().flatten() {
        if let Some(e) = v["error"].as_str() {
            s += &format!("\nSection `{section}` FAILED: {e}\n");
        }
    }

    s += "\n## Packet cost (BPF_PROG_TEST_RUN)\n\n";
    s += &format!("{}.\n\nMethod: {}.\n\n", p["scope"].as_str().unwrap_or("not measured"), p["method"].as_str().unwrap_or("not measured"));
    s += "| path | ns/packet | floor + X | target |\n|---|---|---|---|\n";
    s += &format!("| floor (trivial XDP_PASS, repeat mode) | {} | | |\n", fmt(&p["floor_ns"], 1));
    s += &format!("| floor (single runs) | {} | | |\n", fmt(&p["floor_single_ns"], 1));
    for (name, key, target, base) in [
        ("non-VIP pass", "non_vip_ns", "≤ floor + 5 ns", "floor_ns"),
        ("established flow (one flow)", "established_ns", "≤ floor + 30 ns", "floor_ns"),
        ("established flow, `forwarding = \"kernel\"` (no FIB lookup or redirect; comparison)", "established_kernel_forwarding_ns", "", "floor_ns"),
        ("reply (static reverse NAT, single runs)", "reply_ns", "", "floor_single_ns"),
        ("new flow (SYN, single runs)", "new_flow_ns", "≤ floor + 150 ns", "floor_single_ns"),
    ] {
        let x = num(&p[key]).zip(num(&p[base])).map(|(v, b)| format!("+{:.1}", v - b)).unwrap_or_else(|| "not measured".into());
        s += &format!("| {name} | {} | {x} | {target} |\n", fmt(&p[key], 1));
    }
    s += "\nFlow-table sweep (single runs, established packets; the table sized and filled as shown):\n\n";
    s += "| table size | entries present | flows timed | found their entry | distinct flows ns/packet | one flow ns/packet |\n|---|---|---|---|---|---|\n";
    for e in p["by_table_size"].as_array().into_iter().flatten() {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            e["table_size"], e["entries_present"], e["timed_flows"], e["found_their_entry"], fmt(&e["distinct_flows_ns"], 1), fmt(&e["one_flow_ns"], 1)
        );
    }
    s += "\n| backends per color | new flow ns/packet |\n|---|---|\n";
    for e in p["by_backends"].as_array().into_iter().flatten() {
        s += &format!("| {} | {} |\n", e["backends"], fmt(&e["new_flow_ns"], 1));
    }
    s += "\n![ns per packet against flow table size](bench-flowtable.png)\n\n";

    let n = &r["network"];
    s += "## Through the network\n\n";
    s += &format!(
        "Method: {}. Machine CPU is all busy CPU time of this host (client, gateway and backends share it) per 100k requests: a comparison, not the gateway alone. \
         A contender whose connections needed SYN retransmits or whose SYNs a backend dropped was not measured at its capacity: its row says \"broken setup\" instead of a ratio.\n\n",
        n["method"].as_str().unwrap_or("not measured")
    );
    for mode in ["keepalive", "new_connection"] {
        s += &format!(
            "### {}\n\n| switcher | req/s | ratio to direct | p50 µs | p99 µs | machine CPU s / 100k req | SYN retransmits | listen drops |\n|---|---|---|---|---|---|---|---|\n",
            mode.replace('_', " ")
        );
        for which in ["direct", "bg", "nftables", "haproxy"] {
            let m = &n["summary"][mode][which];
            let ratio = match network_broken(n, mode, which) {
                Some(why) => why,
                None => fmt(&m["ratio_to_direct"], 3),
            };
            s += &format!(
                "| {which} | {} | {ratio} | {} | {} | {} | {} | {} |\n",
                fmt(&m["rps"], 0),
                fmt(&m["p50_us"], 0),
                fmt(&m["p99_us"], 0),
                fmt(&m["machine_cpu_s_per_100k"], 2),
                m["syn_retransmits"],
                m["listen_drops"]
            );
        }
        s += "\n";
    }
    let runs = n["runs"].as_array().cloned().unwrap_or_default();
    let rounds = runs.iter().filter(|x| x["contender"] == "direct" && x["mode"] == "keepalive").count();
    if rounds > 1 {
        s += "Per round, bg / direct (same round):\n\n| round | keep-alive | new connection |\n|---|---|---|\n";
        for i in 0..rounds {
            let get = |w: &str, m: &str| -> f64 {
                runs.iter().filter(|x| x["contender"] == w && x["mode"] == m).nth(i).and_then(|x| x["result"]["rps"].as_f64()).unwrap_or(f64::NAN)
            };
            s += &format!("| {i} | {:.3} | {:.3} |\n", get("bg", "keepalive") / get("direct", "keepalive"), get("bg", "new_connection") / get("direct", "new_connection"));
        }
        s += "\n";
    }
    s += "![requests per second by switcher](bench-rps.png)\n\n";

    let c = &r["cutover"];
    s += "## Cutover\n\n";
    s += &format!("Method: {}.\n\n", c["method"].as_str().unwrap_or("not measured"));
    s += "Each contender is switched two ways. **CLI**: the command an operator runs, one process per switch (`bgctl flip`, `nft -f`, `socat` to HAProxy's runtime socket). \
          **API**: the contender's own interface called from inside the benchmark (bg's control socket, libnftables (the library `nft` is a front end to), \
          HAProxy's runtime socket), one connection or transaction per switch. bg's switch includes its health gate and audit line.\n\n";
    s += "| switcher | switch p50 µs (CLI) | p99 (CLI) | switch p50 µs (API) | p99 (API) | first new on new color p50 µs (CLI / API) | requests | errors | resets | moved | SYN retransmits |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    for which in CONTENDERS {
        let o = &c["contenders"][which];
        s += &format!(
            "| {which} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} |\n",
            us(&o["cli"]["switch_ns"]["p50"]),
            us(&o["cli"]["switch_ns"]["p99"]),
            us(&o["api"]["switch_ns"]["p50"]),
            us(&o["api"]["switch_ns"]["p99"]),
            us(&o["cli"]["first_new_on_new_color_ns"]["p50"]),
            us(&o["api"]["first_new_on_new_color_ns"]["p50"]),
            o["requests"],
            o["errors"],
            o["resets"],
            o["moved_connections"],
            o["syn_retransmits"]
        );
    }
    s += &format!(
        "\nbg's selector map write alone: p50 {} ns, p99 {} ns over {} writes.\n\n",
        fmt(&r["map_write"]["p50"], 0),
        fmt(&r["map_write"]["p99"], 0),
        r["map_write"]["n"]
    );
    s += "nftables switches with one transaction replacing the DNAT map element (conntrack keeps existing connections on their backend); HAProxy with its runtime \
          `set map` (TCP mode keeps existing connections). A moved connection is a keep-alive connection whose answers changed color. \
          nftables is driven through libnftables, its documented library API, which takes the same text as `nft` and sends one netlink batch; a raw-netlink client was not written for this benchmark.\n\n";
    let ctl = &r["control"];
    let m = &ctl["million_flows"];
    s += "## Control path at scale\n\n";
    s += &format!("Method: {}.\n\n", m["method"].as_str().unwrap_or("not measured"));
    s += &format!(
        "{} flows written in {} ms; the agent's sampler had counted them {} ms later (status then showed {} blue / {} green).\n\n",
        m["flows"], m["fill_ms"], m["sampler_caught_up_ms"], m["live_flows_in_status"][0], m["live_flows_in_status"][1]
    );
    s += "| request | p50 µs | p99 µs | max µs | n |\n|---|---|---|---|---|\n";
    for (what, key) in [
        ("flip, quiet (client)", "flip_quiet"),
        ("flip, quiet (in the agent)", "flip_quiet_in_agent"),
        ("flip, status and scrape loops running (client)", "flip_loaded"),
        ("flip, status and scrape loops running (in the agent)", "flip_loaded_in_agent"),
        ("`status` (no --count-flows)", "status"),
        ("GET /metrics", "scrape"),
    ] {
        let v = &m[key];
        s += &format!("| {what} | {} | {} | {} | {} |\n", v["p50_us"], v["p99_us"], v["max_us"], v["n"]);
    }
    let x = &ctl["max_config"];
    s += &format!("\n**Documented maximum** ({} services × {} backends × 2 colors). Method: {}.\n\n", x["services"], x["backends_per_color"], x["method"].as_str().unwrap_or("not measured"));
    s += "| step | figure |\n|---|---|\n";
    s += &format!("| start to first `status` answer | {} ms |\n| start to every backend up | {} ms |\n", x["start_to_answering_ms"], x["start_to_all_up_ms"]);
    s += &format!("| flip (client / in the agent) | {} µs / {} µs |\n| `status` | {} µs, {} bytes |\n", x["flip_client_us"], x["flip_in_agent_us"], x["status_us"], x["status_bytes"]);
    s += &format!(
        "| a host down: noticed after / republish / ring entries written | {} ms / {} µs / {} |\n| the host back: republish / ring entries written | {} µs / {} |\n\n",
        x["host_down"]["noticed_after_ms"], x["host_down"]["republish_us"], x["host_down"]["ring_entries_written"], x["host_back"]["republish_us"], x["host_back"]["ring_entries_written"]
    );
    s += &misses(all, &rows);
    s
}
