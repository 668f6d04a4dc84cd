//! The HTTP API as deploy pipelines drive it (network tier, real servers, real agent, curl as
//! the client): Spinnaker's webhook stage (POST, then poll the Location URL until a status),
//! Flagger's webhooks (a 2xx proceeds), the token, mTLS, and bad input. Needs root.

use std::{os::unix::fs::PermissionsExt, path::PathBuf, time::Duration};

use bg_tests::{
    http::{self, Reply},
    netns::Proc,
    paths,
    topology::{Backends, Topology},
};
use serde_json::Value;

const TOKEN: &str = "3f1c9a7e5b2d4c6e8a0b1d3f5e7c9a2b";
const API: &str = "http://127.0.0.1:9478";

fn tag() -> String {
    bg_tests::run::tag("h")
}

/// A topology whose agent config has an `[api]` section of `api` lines appended, `{dir}` in
/// them standing for the topology's run directory; the token file `{dir}/api-token` is
/// written first (mode 0600).
fn with_api(api: &str) -> Topology {
    let t = Topology::create(&tag()).unwrap();
    http::write_token(&token_path(&t), TOKEN);
    let api = api.replace("{dir}", t.run_dir.to_str().unwrap());
    std::fs::write(t.config_path(), format!("{}\n[api]\n{api}\n", t.config())).unwrap();
    t
}

const WITH_TOKEN: &str = "token_file = \"{dir}/api-token\"";

fn token_path(t: &Topology) -> PathBuf {
    t.run_dir.join("api-token")
}

/// curl in the gateway's namespace, where the API listens on loopback.
fn curl(t: &Topology, method: &str, url: &str, body: Option<&str>, extra: &[&str]) -> Reply {
    http::curl(&t.gw, method, url, body, extra)
}

fn bearer() -> String {
    format!("Authorization: Bearer {TOKEN}")
}

/// An authorized call.
fn call(t: &Topology, method: &str, path: &str, body: Option<&str>) -> Reply {
    curl(t, method, &format!("{API}{path}"), body, &["-H", &bearer()])
}

fn spinnaker_stage(t: &Topology, path: &str, payload: &str) -> Value {
    http::spinnaker_stage(&t.gw, API, TOKEN, path, payload)
}

/// `with_api(WITH_TOKEN)` with the backends and the agent up, both colors healthy.
fn up() -> (Topology, Backends, Proc) {
    let t = with_api(WITH_TOKEN);
    let backends = t.start_backends().unwrap();
    let agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    (t, backends, agent)
}

#[test]
fn a_spinnaker_webhook_stage_flips_and_rolls_back_and_a_refusal_fails_the_stage() {
    let (t, mut backends, _agent) = up();
    assert_eq!(t.get_vip().unwrap(), "blue");
    let before = t.status()["generation"].as_u64().unwrap();

    let op = spinnaker_stage(&t, "/v1/flip", r#"{"color":"green","drain":"20s"}"#);
    assert_eq!(op["status"], "done", "{op}");
    assert_eq!(op["kind"], "flip");
    let r = &op["result"];
    assert_eq!((r["from"].as_str(), r["to"].as_str(), r["changed"].as_bool()), (Some("blue"), Some("green"), Some(true)), "{op}");
    assert_eq!(r["generation"].as_u64(), Some(before + 1), "{op}");
    assert_eq!(r["drain_secs"].as_u64(), Some(20), "the drain as asked: {op}");
    assert!(op["took_ms"].is_u64() && op["finished_at"].is_string(), "{op}");
    assert_eq!(t.get_vip().unwrap(), "green", "new connections go to green");

    // What Argo Rollouts' web metric reads, and the socket says the same.
    let s = call(&t, "GET", "/v1/status", None);
    assert_eq!(s.code, 200);
    assert_eq!((s.body["active"].as_str(), s.body["generation"].as_u64()), (Some("green"), Some(before + 1)), "{}", s.body);
    assert_eq!(s.body["health"][1]["color"], "green");
    assert_eq!(s.body["health"][1]["healthy"], true);
    assert_eq!(s.body["drain"]["color"], "blue", "the drain shows: {}", s.body);
    let last = t.history().last().unwrap().clone();
    assert_eq!((last["event"].as_str(), last["to"].as_str(), last["uid"].as_str()), (Some("flip"), Some("green"), Some("api (bearer token) from 127.0.0.1")), "{last}");

    let op = spinnaker_stage(&t, "/v1/rollback", "{}");
    assert_eq!((op["status"].as_str(), op["kind"].as_str(), op["result"]["to"].as_str()), (Some("done"), Some("rollback"), Some("blue")), "{op}");
    assert_eq!(t.get_vip().unwrap(), "blue");

    // Green dies: the stage's flip fails (a terminal status), nothing moves.
    for p in &mut backends.green {
        p.stop(Duration::from_secs(3));
    }
    t.wait_until("green down", Duration::from_secs(6), |s| s["health"][1]["healthy"] == false);
    let gen = t.status()["generation"].clone();
    let op = spinnaker_stage(&t, "/v1/flip", r#"{"color":"green"}"#);
    assert_eq!(op["status"], "failed", "{op}");
    let err = op["error"].as_str().unwrap();
    assert!(err.contains("refused: green is not healthy") && err.contains("--force"), "{op}");
    assert!(op.get("result").is_none(), "{op}");
    assert_eq!(t.status()["generation"], gen, "a refused flip changes nothing");
    assert_eq!(t.get_vip().unwrap(), "blue");
    let last = t.history().last().unwrap().clone();
    assert_eq!((last["event"].as_str(), last["uid"].as_str()), (Some("refused"), Some("api (bearer token) from 127.0.0.1")), "{last}");
}

#[test]
fn flagger_webhooks_gate_and_promote_and_hold_the_rollout_when_unhealthy() {
    let (t, mut backends, _agent) = up();
    // Flagger's payload as its webhooks send it; metadata is the Canary's.
    let hook = |phase: &str, color: &str| {
        format!(r#"{{"name":"web","namespace":"prod","phase":"{phase}","checksum":"85d557f47b","metadata":{{"color":"{color}","type":"confirm-promotion"}}}}"#)
    };
    let r = call(&t, "POST", "/v1/flagger/gate", Some(&hook("Progressing", "green")));
    assert_eq!(r.code, 200, "green is healthy: the rollout may go on: {}", r.body);
    assert_eq!((r.body["outcome"].as_str(), r.body["to"].as_str()), (Some("switch"), Some("green")), "{}", r.body);
    assert_eq!(t.get_vip().unwrap(), "blue", "a gate changes nothing");

    let r = call(&t, "POST", "/v1/flagger/promote", Some(&hook("Promoting", "green")));
    assert_eq!(r.code, 200, "{}", r.body);
    assert_eq!((r.body["to"].as_str(), r.body["changed"].as_bool()), (Some("green"), Some(true)), "{}", r.body);
    assert_eq!(t.get_vip().unwrap(), "green", "promoted: new connections go to green");
    let gen = t.status()["generation"].clone();
    // Flagger calls again until it gets a 2xx: a repeat changes nothing and still proceeds.
    let r = call(&t, "POST", "/v1/flagger/promote", Some(&hook("Promoting", "green")));
    assert_eq!((r.code, r.body["changed"].as_bool()), (200, Some(false)), "{}", r.body);
    assert_eq!(t.status()["generation"], gen, "a repeated promotion is not a second switch");

    // Blue is the way back; with it down, its gate and its promotion hold the rollout.
    for p in &mut backends.blue {
        p.stop(Duration::from_secs(3));
    }
    t.wait_until("blue down", Duration::from_secs(6), |s| s["health"][0]["healthy"] == false);
    let r = call(&t, "POST", "/v1/flagger/gate", Some(&hook("Progressing", "blue")));
    assert_eq!(r.code, 412, "{}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("blue is not healthy"), "{}", r.body);
    assert!(!r.body["failing"].as_array().unwrap().is_empty(), "says what fails: {}", r.body);
    let r = call(&t, "POST", "/v1/flagger/promote", Some(&hook("Promoting", "blue")));
    assert_eq!(r.code, 409, "{}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("refused: blue is not healthy"), "{}", r.body);
    assert_eq!(t.status()["generation"], gen);
    assert_eq!(t.get_vip().unwrap(), "green");

    // Flagger sends no headers of its own: the token may come in the webhook's metadata.
    let with_token = |token: &str| {
        format!(r#"{{"name":"web","namespace":"prod","phase":"Promoting","metadata":{{"color":"green","token":"{token}"}}}}"#)
    };
    let r = curl(&t, "POST", &format!("{API}/v1/flagger/promote"), Some(&with_token(TOKEN)), &[]);
    assert_eq!((r.code, r.body["to"].as_str()), (200, Some("green")), "{}", r.body);
    for (token, says) in [("3f1c9a7e5b2d4c6e8a0b1d3f5e7c9a2c", "metadata.token is wrong"), ("", "metadata.token is wrong")] {
        let r = curl(&t, "POST", &format!("{API}/v1/flagger/promote"), Some(&with_token(token)), &[]);
        assert_eq!(r.code, 401, "{}", r.body);
        assert!(r.body["error"].as_str().unwrap().contains(says), "{}", r.body);
    }
    let r = curl(&t, "POST", &format!("{API}/v1/flagger/gate"), Some(r#"{"name":"web","namespace":"prod","metadata":{"color":"green"}}"#), &[]);
    assert_eq!(r.code, 401, "no token at all: {}", r.body);
    assert_eq!(t.status()["generation"], gen);

    // A Canary whose webhook lacks metadata.color is told what to set.
    let r = call(&t, "POST", "/v1/flagger/promote", Some(r#"{"name":"web","namespace":"prod","phase":"Promoting","metadata":{}}"#));
    assert_eq!(r.code, 400);
    assert!(r.body["error"].as_str().unwrap().contains("metadata.color is missing"), "{}", r.body);
}

#[test]
fn the_api_refuses_a_missing_or_wrong_token_and_names_bad_input_changing_nothing() {
    let (t, _backends, _agent) = up();
    let before = t.status();

    for (extra, says) in [
        (vec![], "missing `Authorization: Bearer <token>`"),
        (vec!["-H".to_owned(), "Authorization: Bearer 3f1c9a7e5b2d4c6e8a0b1d3f5e7c9a2c".to_owned()], "the bearer token is wrong"),
        (vec!["-H".to_owned(), format!("Authorization: Bearer {TOKEN}x")], "the bearer token is wrong"),
        (vec!["-H".to_owned(), format!("Authorization: Basic {TOKEN}")], "is not `Bearer <token>`"),
    ] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        for (method, path, body) in [("POST", "/v1/flip", Some(r#"{"color":"green"}"#)), ("GET", "/v1/status", None), ("POST", "/v1/flagger/promote", Some(r#"{"name":"a","namespace":"b","metadata":{"color":"green"}}"#))] {
            let r = curl(&t, method, &format!("{API}{path}"), body, &extra);
            assert_eq!(r.code, 401, "{method} {path} with {extra:?}: {}", r.body);
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
            assert!(r.body["error"].as_str().unwrap().contains(says), "{extra:?}: {}", r.body);
        }
    }
    for (method, path, body, code, says) in [
        ("POST", "/v1/flip", r#"{"color":"green","percent":100}"#, 400, "--percent 100 is out of range"),
        ("POST", "/v1/flip", r#"{"color":"green","percent":10,"drain":30}"#, 400, "nothing to drain"),
        ("POST", "/v1/flip", r#"{"color":"green","drain":"1500ms"}"#, 400, "not a whole number of seconds"),
        ("POST", "/v1/flip", r#"{"color":"green","drain":"90000"}"#, 400, "--drain 90000 is out of range"),
        ("POST", "/v1/flip", r#"{"colour":"green"}"#, 400, "unknown field `colour`"),
        ("POST", "/v1/flip", r#"{"color":"purple"}"#, 400, "unknown color `purple`"),
        ("POST", "/v1/flip", r#"{"color":"green","drain":"soon"}"#, 400, "drain `soon` is not a duration"),
        ("POST", "/v1/flip", r#"{"color":"green","drain":-3}"#, 400, "not a whole number of seconds"),
        ("POST", "/v1/flip", r#"{"color":"green""#, 400, "bad request body"),
        ("POST", "/v1/flip", "", 400, "missing field `color`"),
        ("POST", "/v1/rollback", r#"{"forced":true}"#, 400, "unknown field `forced`"),
        ("GET", "/v1/operations/0000-1", "", 404, "no operation `0000-1`"),
        ("GET", "/v1/flips", "", 404, "no such endpoint"),
    ] {
        let r = call(&t, method, path, (method == "POST").then_some(body));
        assert_eq!(r.code, code, "{method} {path} {body}: {}", r.body);
        assert!(r.body["error"].as_str().unwrap_or("").contains(says), "{method} {path} {body}: {}", r.body);
    }
    let r = call(&t, "GET", "/v1/flip", None);
    assert_eq!(r.code, 405, "GET on a POST endpoint");
    // Without the token, nothing answers but 401: not even whether a path exists.
    for (method, path) in [("GET", "/v1/flip"), ("GET", "/v1/nope"), ("GET", "/v1/operations/0000-1"), ("POST", "/v1/rollback")] {
        let r = curl(&t, method, &format!("{API}{path}"), Some("{}"), &[]);
        assert_eq!(r.code, 401, "{method} {path}: {}", r.body);
    }
    // Only JSON is taken (a browser can be made to POST a form across sites, not JSON).
    let r = curl(&t, "POST", &format!("{API}/v1/flip"), None, &["-H", &bearer(), "-H", "Content-Type: text/plain", "--data-raw", r#"{"color":"green"}"#]);
    assert_eq!(r.code, 415, "{}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("application/json"), "{}", r.body);
    // A dry run answers at once and changes nothing.
    let r = call(&t, "POST", "/v1/flip", Some(r#"{"color":"green","dry_run":true}"#));
    assert_eq!((r.code, r.body["outcome"].as_str(), r.body["to"].as_str()), (200, Some("switch"), Some("green")), "{}", r.body);
    // A body over the limit is refused before it is read whole.
    let big = format!(r#"{{"color":"green","pad":"{}"}}"#, "x".repeat(bg_userspace::api::MAX_BODY));
    let file = t.run_dir.join("big.json");
    std::fs::write(&file, big).unwrap();
    let r = curl(&t, "POST", &format!("{API}/v1/flip"), None, &["-H", &bearer(), "-H", "Content-Type: application/json", "--data-binary", &format!("@{}", file.display())]);
    assert_eq!(r.code, 413, "{}", r.body);

    let after = t.status();
    assert_eq!((after["active"].clone(), after["generation"].clone()), (before["active"].clone(), before["generation"].clone()));
    assert!(t.history().iter().all(|e| e["event"] != "flip" && e["event"] != "refused"), "nothing reached the gate");
    assert_eq!(t.get_vip().unwrap(), "blue");
}

#[test]
fn over_mtls_the_api_wants_a_client_certificate_signed_by_its_ca() {
    let t = Topology::create(&tag()).unwrap();
    let dir = t.run_dir.join("tls");
    bg_tests::tls::make_certs(
        &dir,
        &[
            ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
            ("pipeline", "subjectAltName=DNS:deploy.ci.example\nextendedKeyUsage=clientAuth\n"),
            // Signed by the same CA, but not a name the agent lets switch.
            ("intern", "subjectAltName=DNS:laptop.example\nextendedKeyUsage=clientAuth\n"),
        ],
    )
    .unwrap();
    // A second CA's client: a certificate, but not one this API trusts.
    let other = t.run_dir.join("other");
    bg_tests::tls::make_certs(&other, &[("stranger", "extendedKeyUsage=clientAuth\n")]).unwrap();
    let d = dir.display();
    std::fs::write(
        t.config_path(),
        format!(
            "{}\n[api]\ntls_cert = \"{d}/server.pem\"\ntls_key = \"{d}/server.key\"\nclient_ca = \"{d}/ca.pem\"\nclient_names = [\"deploy.ci.example\"]\npublic_url = \"https://bg.example/gw1/\"\n",
            t.config()
        ),
    )
    .unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let url = "https://127.0.0.1:9478/v1/flip";
    let ca = format!("{d}/ca.pem");
    let (cert, key) = (format!("{d}/pipeline.pem"), format!("{d}/pipeline.key"));
    let r = curl(&t, "POST", url, Some(r#"{"color":"green"}"#), &["--cacert", &ca, "--cert", &cert, "--key", &key]);
    assert_eq!(r.code, 202, "{}", r.body);
    // Behind a proxy: operation URLs on api.public_url, not the Host the request came with.
    let location = r.header("location").unwrap();
    assert_eq!(location, format!("https://bg.example/gw1/v1/operations/{}", r.body["id"].as_str().unwrap()), "{}", r.body);
    t.wait_until("green active", Duration::from_secs(5), |s| s["active"] == "green");
    assert_eq!(t.get_vip().unwrap(), "green");
    let last = t.history().last().unwrap().clone();
    let who = last["uid"].as_str().unwrap();
    assert!(who.starts_with("api client certificate sha256:") && who.ends_with(" from 127.0.0.1"), "{last}");

    let gen = t.status()["generation"].clone();
    let (scert, skey) = (format!("{}/stranger.pem", other.display()), format!("{}/stranger.key", other.display()));
    for extra in [vec!["--cacert", &ca], vec!["--cacert", &ca, "--cert", &scert, "--key", &skey]] {
        let mut args = vec!["curl", "-sS", "--max-time", "10", "-X", "POST", "--data-raw", r#"{"color":"blue"}"#];
        args.extend(extra.iter().copied());
        args.push(url);
        let out = t.gw.command("curl").args(&args[1..]).output().unwrap();
        // 56: the server ended the handshake (TLS 1.3 alerts arrive on the first read), 35: a
        // TLS error; not 7/28 (nothing listening, a timeout).
        let code = out.status.code();
        assert!(matches!(code, Some(35 | 56)), "a client without a trusted certificate: curl exit {code:?} ({extra:?}): {}", String::from_utf8_lossy(&out.stderr));
    }
    // The CA's other client is let in by TLS and refused by name, on every path.
    let (icert, ikey) = (format!("{d}/intern.pem"), format!("{d}/intern.key"));
    for (method, path) in [("POST", "/v1/flip"), ("GET", "/v1/status"), ("GET", "/v1/nope")] {
        let r = curl(&t, method, &format!("https://127.0.0.1:9478{path}"), Some(r#"{"color":"blue"}"#), &["--cacert", &ca, "--cert", &icert, "--key", &ikey]);
        assert_eq!(r.code, 403, "{method} {path}: {}", r.body);
        assert!(r.body["error"].as_str().unwrap().contains("api.client_names"), "{}", r.body);
    }
    // Plain HTTP on the TLS port is told to use HTTPS.
    let out = t.gw.exec(&["curl", "-sS", "--max-time", "5", "-i", "http://127.0.0.1:9478/v1/status"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 400") && text.contains("speaks HTTPS only"), "{text}");
    assert_eq!(t.status()["generation"], gen);
    // The trusted client still gets through after all that.
    let r = curl(&t, "GET", "https://127.0.0.1:9478/v1/status", None, &["--cacert", &ca, "--cert", &cert, "--key", &key]);
    assert_eq!((r.code, r.body["active"].as_str()), (200, Some("green")), "{}", r.body);
}

/// `bgctl agent` for this topology, killed after 30 s if it does start after all.
fn start_bounded(t: &Topology) -> std::process::Output {
    let mut cmd = t.gw.nsenter("timeout");
    cmd.args(["30", paths::bgctl().to_str().unwrap(), "agent", "--config", t.config_path().to_str().unwrap()]);
    cmd.output().unwrap()
}

#[test]
fn a_bad_api_section_stops_the_start_with_nothing_loaded() {
    let t = with_api(WITH_TOKEN);
    std::fs::set_permissions(token_path(&t), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = start_bounded(&t);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("api.token_file") && err.contains("readable by every user") && err.contains("chmod o-r"), "{err}");
    assert!(!t.pin_dir().exists(), "nothing was pinned");

    // A short token, then a port someone holds.
    std::fs::write(token_path(&t), "short\n").unwrap();
    std::fs::set_permissions(token_path(&t), std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = start_bounded(&t);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("at least 16 printable characters"), "{err}");
    std::fs::write(token_path(&t), format!("{TOKEN}\n")).unwrap();
    let mut hold = t.gw.command("python3");
    hold.args(["-c", "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',9478)); s.listen(); print('listening', flush=True); time.sleep(30)"]);
    let holder = Proc::spawn_ready("port holder", &mut hold, "listening", Duration::from_secs(5)).unwrap();
    let out = start_bounded(&t);
    drop(holder);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("api.listen") && err.contains("127.0.0.1:9478"), "{err}");
    assert!(!t.pin_dir().exists(), "nothing was pinned");
}
