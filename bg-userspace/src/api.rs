//! The HTTP API (config `[api]`, off by default): what deploy pipelines call.
//!
//! One implementation, two transports: every request here becomes a control-socket `Request`
//! and goes through `agent::answer`, the socket's own path (the same gate, the same audit
//! log, fleet mode included). A switch is answered at once with `202 Accepted` and an
//! operation's URL (`Location`), which says `pending`, then `done` or `failed` with the
//! figures: Spinnaker's webhook stage polls it. Flagger's webhooks get answers of their own
//! (`/v1/flagger/...`): a 2xx lets the rollout go on, anything else holds it.
//!
//! Every request needs the bearer token (`token_file`) and/or a client certificate signed
//! by `client_ca` (mTLS, checked in the TLS handshake). Bodies are at most `MAX_BODY`, at
//! most `MAX_CONNECTIONS` are served at once, and a client has `HEADER_TIMEOUT` to send a
//! request's headers.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{anyhow, bail, Context};
use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, Path as UrlPath, Request as HttpRequest, State as Shared},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response as HttpResponse},
    routing::{get, post},
    Extension, Json, Router,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{
    agent::{Actor, State},
    config::{self, parse_color},
    control::{FlipResult, Request, Response},
};

/// Largest request body.
pub const MAX_BODY: usize = 64 << 10;
/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Operations kept for `GET /v1/operations/{id}` (the oldest finished one goes first).
pub const KEPT_OPERATIONS: usize = 256;
/// Switches accepted and not finished yet; more are answered 429.
pub const MAX_PENDING: usize = 16;
/// How long a client has for its TLS handshake, and for a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection is kept, whatever it does (a fleet switch takes 45 s at most).
pub const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(120);
/// The shortest bearer token accepted.
pub const MIN_TOKEN: usize = 16;

/// The API's socket, bound, and what it checks, read: everything that can fail at start.
pub struct Listener {
    tcp: TcpListener,
    addr: SocketAddr,
    token: Option<Arc<[u8]>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    client_names: Arc<[String]>,
    public_url: Option<String>,
}

impl Listener {
    /// Reads the token and the TLS files and binds `api.listen`; any error names the field.
    pub async fn bind(api: &config::Api) -> anyhow::Result<Listener> {
        let token = api.token_file.as_deref().map(read_token).transpose()?.map(Arc::from);
        let tls = match &api.tls {
            None => None,
            Some((cert, key)) => Some(tls_acceptor(cert, key, api.client_ca.as_deref())?),
        };
        let tcp = TcpListener::bind(api.listen)
            .await
            .with_context(|| format!("config field `api.listen`: binding {} for the HTTP API", api.listen))?;
        Ok(Listener { addr: tcp.local_addr()?, tcp, token, tls, client_names: api.client_names.clone().into(), public_url: api.public_url.clone() })
    }

    /// Serves the API on `runtime` (not the agent's decision thread: handshakes and bodies
    /// there would delay its tick) until the agent exits.
    pub fn serve(self, state: Arc<Mutex<State>>, runtime: &tokio::runtime::Handle) -> tokio::task::JoinHandle<()> {
        let app = App {
            state,
            ops: Arc::new(Mutex::new(Operations::new())),
            switches: Arc::new(tokio::sync::Mutex::new(())),
            refusals: Arc::new(RateLimitedLog::default()),
            token: self.token,
            scheme: if self.tls.is_some() { "https" } else { "http" },
            public_url: self.public_url.clone(),
            addr: self.addr,
        };
        let router = Router::new()
            .route("/v1/status", get(status))
            .route("/v1/flip", post(flip))
            .route("/v1/rollback", post(rollback))
            .route("/v1/operations/{id}", get(operation))
            .route("/v1/flagger/gate", post(flagger_gate))
            .route("/v1/flagger/promote", post(flagger_promote))
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(app.clone(), authorize))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(app.clone());
        info!(listen = %self.addr, tls = self.tls.is_some(), token = app.token.is_some(), "HTTP API listening");
        let (tcp, tls, names) = (self.tcp, self.tls, self.client_names);
        let refusals = app.refusals.clone();
        runtime.spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
            loop {
                let (stream, from) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "accept on the HTTP API failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    refusals.warn(&format!("HTTP API connection from {from} closed: {MAX_CONNECTIONS} already open"));
                    continue;
                };
                let (router, tls, names) = (router.clone(), tls.clone(), names.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    // However it behaves, a client has the connection this long at most.
                    let served = tokio::time::timeout(MAX_CONNECTION_LIFE, async move {
                        match tls {
                            None => connection(stream, router.layer(Extension(Peer { cert: None, from, named: true }))).await,
                            Some(acceptor) => {
                                if !speaks_tls(&stream).await {
                                    return;
                                }
                                match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                                    Ok(Ok(stream)) => {
                                        let first = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
                                        let named = names.is_empty() || first.is_some_and(|c| named(c, &names));
                                        let cert = first.map(|c| fingerprint(c));
                                        connection(stream, router.layer(Extension(Peer { cert, from, named }))).await
                                    }
                                    Ok(Err(e)) => debug!(%from, error = %e, "HTTP API TLS handshake failed"),
                                    Err(_) => debug!(%from, "HTTP API TLS handshake timed out"),
                                }
                            }
                        }
                    });
                    if served.await.is_err() {
                        debug!(%from, "HTTP API connection closed after {MAX_CONNECTION_LIFE:?}");
                    }
                });
            }
        })
    }
}

/// A client on the HTTPS port that sends something other than a TLS handshake (plain HTTP)
/// is told so, and closed.
async fn speaks_tls(stream: &tokio::net::TcpStream) -> bool {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == 0x16 => true,
        Ok(Ok(1)) => {
            let body = "this port speaks HTTPS only; use https://\n";
            let answer = format!("HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.writable()).await;
            let _ = stream.try_write(answer.as_bytes());
            false
        }
        _ => false,
    }
}

/// A warning that an attacker could repeat at will: logged at most once a second, with how
/// many were left out.
#[derive(Default)]
struct RateLimitedLog {
    last: Mutex<Option<Instant>>,
    skipped: std::sync::atomic::AtomicU64,
}

impl RateLimitedLog {
    fn warn(&self, what: &str) {
        let mut last = crate::lock(&self.last);
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            self.skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        let skipped = self.skipped.swap(0, std::sync::atomic::Ordering::Relaxed);
        warn!(skipped, "{what}");
    }
}

async fn connection<S>(stream: S, router: Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), hyper_util::service::TowerToHyperService::new(router))
        .await;
    if let Err(e) = served {
        debug!(error = %e, "HTTP API connection ended");
    }
}

/// A secret's file (the token, the TLS key) must not be readable by every user.
fn not_world_readable(field: &str, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata(path).with_context(|| format!("{field}: {}", path.display()))?.mode();
    if mode & 0o004 != 0 {
        bail!("{field}: {} is readable by every user (mode {:o}); `chmod o-r` it: it lets its holder switch live traffic", path.display(), mode & 0o777);
    }
    Ok(())
}

/// The token in `path`: its first line, trimmed; the file must not be readable by everyone.
fn read_token(path: &Path) -> anyhow::Result<Vec<u8>> {
    let field = "config field `api.token_file`";
    not_world_readable(field, path)?;
    let text = std::fs::read_to_string(path).with_context(|| format!("{field}: reading {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.len() < MIN_TOKEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!(
            "{field}: {} must hold a token of at least {MIN_TOKEN} printable characters without spaces on its first line \
             (e.g. `openssl rand -hex 32 > {}`)",
            path.display(),
            path.display()
        );
    }
    Ok(token.as_bytes().to_vec())
}

fn tls_acceptor(cert: &Path, key_file: &Path, client_ca: Option<&Path>) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("config field `api.tls_cert`: {}: {e}", cert.display()))?;
    if certs.is_empty() {
        bail!("config field `api.tls_cert`: {} holds no PEM certificate", cert.display());
    }
    not_world_readable("config field `api.tls_key`", key_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| anyhow!("config field `api.tls_key`: {}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let field = "config field `api.client_ca`";
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| anyhow!("{field}: {}: {e}", ca.display()))? {
                let c = c.map_err(|e| anyhow!("{field}: {}: {e}", ca.display()))?;
                roots.add(c).map_err(|e| anyhow!("{field}: {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                bail!("{field}: {} holds no PEM certificate", ca.display());
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| anyhow!("{field}: {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .map_err(|e| anyhow!("config fields `api.tls_cert`/`api.tls_key`: {} with {}: {e}", cert.display(), key_file.display()))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}

/// Whether a client certificate is valid for one of `names` (its subjectAltName DNS names).
fn named(cert: &rustls_pki_types::CertificateDer<'_>, names: &[String]) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else { return false };
    names.iter().any(|n| {
        rustls_pki_types::ServerName::try_from(n.as_str()).is_ok_and(|name| ee.verify_is_valid_for_subject_name(&name).is_ok())
    })
}

/// A client certificate as the audit log names it: the first 8 bytes of its SHA-256.
fn fingerprint(cert: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, cert);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone)]
struct App {
    state: Arc<Mutex<State>>,
    ops: Arc<Mutex<Operations>>,
    token: Option<Arc<[u8]>>,
    scheme: &'static str,
    /// `api.public_url`: the base of operation URLs instead of the request's Host.
    public_url: Option<String>,
    addr: SocketAddr,
    /// Switches run one at a time, in the order they were accepted (a fair lock).
    switches: Arc<tokio::sync::Mutex<()>>,
    refusals: Arc<RateLimitedLog>,
}

/// Who is at the other end of a connection.
#[derive(Clone)]
struct Peer {
    /// mTLS: the client certificate's fingerprint.
    cert: Option<String>,
    from: SocketAddr,
    /// Its certificate carries one of `api.client_names` (true when none are configured).
    named: bool,
}

impl Peer {
    fn actor(&self) -> Actor {
        let ip = self.from.ip();
        Actor::Api(match &self.cert {
            Some(fp) => format!("api client certificate sha256:{fp} from {ip}").into(),
            None => format!("api (bearer token) from {ip}").into(),
        })
    }
}

/// Compares SHA-256 digests without an early exit: the time taken says nothing about the
/// token, its length included.
fn same(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (ring::digest::digest(&ring::digest::SHA256, a), ring::digest::digest(&ring::digest::SHA256, b));
    a.as_ref().iter().zip(b.as_ref()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How a request was authenticated, for its handler.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Authn {
    /// The bearer token (or none is configured: mTLS did it in the handshake).
    Verified,
    /// A Flagger webhook without an Authorization header: its `metadata.token` must match.
    TokenInBody,
}

/// `Bearer <token>` (the scheme in any case, RFC 7235) -> the token.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A request refused for who sent it: warned (rate-limited) and the connection closed; a 401
/// says which scheme would do.
fn refuse(app: &App, peer: &Peer, path: &str, code: StatusCode, refusal: &str) -> HttpResponse {
    app.refusals.warn(&format!("HTTP API request from {} to {path} refused: {refusal}", peer.from));
    let mut r = (code, [(header::CONNECTION, "close")], Json(json!({ "error": refusal }))).into_response();
    if code == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
    }
    r
}

fn unauthorized(app: &App, peer: &Peer, path: &str, refusal: &str) -> HttpResponse {
    refuse(app, peer, path, StatusCode::UNAUTHORIZED, refusal)
}

async fn authorize(Shared(app): Shared<App>, Extension(peer): Extension<Peer>, mut req: HttpRequest, next: Next) -> HttpResponse {
    let path = req.uri().path().to_owned();
    if !peer.named {
        let refusal = "this client certificate is valid for none of the agent's `api.client_names` (subjectAltName DNS names)";
        return refuse(&app, &peer, &path, StatusCode::FORBIDDEN, refusal);
    }
    let mut authn = Authn::Verified;
    if let Some(token) = &app.token {
        let given = req.headers().get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
        let refusal = match given.map(bearer) {
            // Flagger sends no headers of its own: its webhooks carry the token in metadata.
            None if path.starts_with("/v1/flagger/") => {
                authn = Authn::TokenInBody;
                None
            }
            None => Some("missing `Authorization: Bearer <token>` (the token is in the agent's `api.token_file`)"),
            Some(None) => Some("the Authorization header is not `Bearer <token>`"),
            Some(Some(t)) if !same(t.as_bytes(), token) => Some("the bearer token is wrong"),
            Some(Some(_)) => None,
        };
        if let Some(refusal) = refusal {
            return unauthorized(&app, &peer, &path, refusal);
        }
    }
    // A browser can be made to send a cross-site POST, but not one of JSON: only JSON is taken.
    if req.method() == axum::http::Method::POST {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send the body as `Content-Type: application/json` (`{}` when it is empty)");
        }
    }
    req.extensions_mut().insert(authn);
    next.run(req).await
}

fn error(code: StatusCode, message: impl Into<String>) -> HttpResponse {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

async fn not_found() -> HttpResponse {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; there are GET /v1/status, POST /v1/flip, POST /v1/rollback, GET /v1/operations/{id}, \
         POST /v1/flagger/gate and POST /v1/flagger/promote",
    )
}

/// A JSON body; an empty one is `{}`.
fn body<T: DeserializeOwned>(bytes: &Bytes, example: &str) -> Result<T, HttpResponse> {
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    serde_json::from_slice(text).map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad request body ({e}); send JSON such as {example}")))
}

/// A drain as JSON: seconds, or a duration such as "30s" or "5m".
fn drain_secs(v: Option<&Value>) -> Result<Option<u64>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| format!("drain {n} is not a whole number of seconds")),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map(Some).map_err(|_| format!("drain `{s}` is out of range"))
        }
        Some(Value::String(s)) => match humantime::parse_duration(s) {
            Ok(d) if d.subsec_nanos() != 0 => Err(format!("drain `{s}` is not a whole number of seconds; e.g. \"30s\"")),
            Ok(d) => Ok(Some(d.as_secs())),
            Err(e) => Err(format!("drain `{s}` is not a duration ({e}); e.g. \"30s\", \"5m\" or 30")),
        },
        Some(other) => Err(format!("drain {other} is not a duration; give seconds (30) or a duration (\"30s\")")),
    }
}

async fn status(Shared(app): Shared<App>, Extension(peer): Extension<Peer>) -> HttpResponse {
    match crate::agent::answer(&app.state, Request::Status { count_flows: false }, peer.actor()).await {
        Response::Status(s) => Json(s).into_response(),
        Response::Error { message } => error(StatusCode::INTERNAL_SERVER_ERROR, message),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "the agent answered a status request with something else"),
    }
}

const FLIP_EXAMPLE: &str = r#"{"color":"green"} or {"color":"green","percent":10,"drain":"30s","force":false}"#;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlipBody {
    color: String,
    #[serde(default)]
    percent: Option<u32>,
    #[serde(default)]
    drain: Option<Value>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    dry_run: bool,
}

async fn flip(Shared(app): Shared<App>, Extension(peer): Extension<Peer>, headers: HeaderMap, bytes: Bytes) -> HttpResponse {
    let b: FlipBody = match body(&bytes, FLIP_EXAMPLE) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(to) = parse_color(&b.color) else {
        return error(StatusCode::BAD_REQUEST, format!("unknown color `{}`; use \"blue\" or \"green\"", b.color));
    };
    let drain_secs = match drain_secs(b.drain.as_ref()) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if let Err(e) = crate::decisions::check_arguments(&crate::decisions::FlipRequest { to, percent: b.percent, drain_secs, force: b.force }) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let req = Request::Flip { color: b.color, drain_secs, percent: b.percent, force: b.force, dry_run: b.dry_run };
    if b.dry_run {
        // Nothing changes: answered at once.
        return match crate::agent::answer(&app.state, req, peer.actor()).await {
            Response::DryRun(d) => Json(d).into_response(),
            Response::Error { message } => error(StatusCode::BAD_REQUEST, message),
            _ => error(StatusCode::INTERNAL_SERVER_ERROR, "the agent answered a dry run with something else"),
        };
    }
    start(app, peer, &headers, "flip", req)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    force: bool,
}

async fn rollback(Shared(app): Shared<App>, Extension(peer): Extension<Peer>, headers: HeaderMap, bytes: Bytes) -> HttpResponse {
    match body::<RollbackBody>(&bytes, r#"{} or {"force":true}"#) {
        Ok(b) => start(app, peer, &headers, "rollback", Request::Rollback { force: b.force }),
        Err(r) => r,
    }
}

/// Accepts a switch: it runs in the background, its operation says how it went.
fn start(app: App, peer: Peer, headers: &HeaderMap, kind: &'static str, req: Request) -> HttpResponse {
    // The URL as the client reached us (a Host header of URL characters), else our address.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)))
        .map(str::to_owned)
        .unwrap_or_else(|| app.addr.to_string());
    let base = match &app.public_url {
        Some(u) => format!("{u}/v1/operations/"),
        None => format!("{}://{host}/v1/operations/", app.scheme),
    };
    let request = serde_json::to_value(&req).unwrap_or(Value::Null);
    let op = match crate::lock(&app.ops).begin(kind, request, &base) {
        Ok(op) => op,
        Err(e) => return error(StatusCode::TOO_MANY_REQUESTS, e),
    };
    let (id, url) = (op.id.clone(), op.status_url.clone());
    tokio::spawn(async move {
        let answer = run_switch(&app, req, peer.actor()).await;
        crate::lock(&app.ops).finish(&id, answer);
    });
    (StatusCode::ACCEPTED, [(header::LOCATION, url)], Json(op)).into_response()
}

/// One switch, after the ones accepted before it, on a task of its own: a client that goes
/// away cannot cut it short, and a panic is a failed switch, not one pending for ever.
async fn run_switch(app: &App, req: Request, who: Actor) -> Response {
    let (state, switches) = (app.state.clone(), app.switches.clone());
    let task = tokio::spawn(async move {
        let _turn = switches.lock().await;
        crate::agent::answer(&state, req, who).await
    });
    task.await.unwrap_or_else(|e| Response::Error { message: format!("the switch's task failed: {e}") })
}

/// A fleet switch that some live gateway did not apply is not a success for a pipeline,
/// whatever else it did (`bgctl flip` exits 1 on it too).
fn incomplete(r: &FlipResult) -> Option<String> {
    let f = r.fleet.as_ref().filter(|f| !f.complete)?;
    let lagging: Vec<&str> = f.lagging.iter().map(|l| l.gateway.as_str()).chain(f.lost.iter().map(String::as_str)).collect();
    Some(match (&f.rolled_back, &f.error) {
        (Some(back), _) => format!("not applied by every live gateway in time ({}); the fleet was rolled back: {back}", lagging.join(", ")),
        (None, Some(e)) => format!("written to the fleet, but its acknowledgements are unknown: {e}"),
        (None, None) => format!("written to the fleet, but not applied in time by: {}", lagging.join(", ")),
    })
}

async fn operation(Shared(app): Shared<App>, UrlPath(id): UrlPath<String>) -> HttpResponse {
    match crate::lock(&app.ops).get(&id) {
        Some(op) => Json(op).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!(
                "no operation `{id}`: the agent keeps its last {KEPT_OPERATIONS} in memory, and none from before it restarted \
                 (`bgctl history` has every switch)"
            ),
        ),
    }
}

/// What Flagger sends to a webhook. bg reads `metadata.color` (and `metadata.drain`).
#[derive(Deserialize)]
struct FlaggerHook {
    name: String,
    namespace: String,
    #[serde(default)]
    phase: String,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

const FLAGGER_EXAMPLE: &str = r#"Flagger's payload, {"name":"web","namespace":"prod","phase":"Promoting","metadata":{"color":"green"}}"#;

fn flagger(app: &App, peer: &Peer, authn: Authn, path: &str, bytes: &Bytes) -> Result<(FlaggerHook, String), HttpResponse> {
    let hook: FlaggerHook = body(bytes, FLAGGER_EXAMPLE)?;
    if authn == Authn::TokenInBody {
        let token = app.token.as_deref().expect("a token is configured");
        match hook.metadata.get("token") {
            None => return Err(unauthorized(app, peer, path, "missing `Authorization: Bearer <token>`, or the webhook's metadata.token")),
            Some(t) if !same(t.trim().as_bytes(), token) => return Err(unauthorized(app, peer, path, "the webhook's metadata.token is wrong")),
            Some(_) => {}
        }
    }
    let color = hook.metadata.get("color").cloned().unwrap_or_default();
    if parse_color(&color).is_none() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!(
                "the webhook's metadata.color is {}; set it to \"blue\" or \"green\" in the Canary's webhook (metadata: {{color: green}})",
                if color.is_empty() { "missing".to_owned() } else { format!("`{color}`") }
            ),
        ));
    }
    Ok((hook, color))
}

/// For pre-rollout and confirm-rollout hooks: 200 when a flip to `metadata.color` would pass
/// the health gate now (a dry run), 412 with what fails otherwise.
async fn flagger_gate(Shared(app): Shared<App>, Extension(peer): Extension<Peer>, Extension(authn): Extension<Authn>, bytes: Bytes) -> HttpResponse {
    let (hook, color) = match flagger(&app, &peer, authn, "/v1/flagger/gate", &bytes) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let req = Request::Flip { color, drain_secs: None, percent: None, force: false, dry_run: true };
    match crate::agent::answer(&app.state, req, peer.actor()).await {
        // Not healthy is a hold, also when the color is already active (the dry run's outcome
        // is then "unchanged").
        Response::DryRun(d) if !d.healthy || d.outcome == "refused" => {
            info!(canary = %hook.name, namespace = %hook.namespace, phase = %hook.phase, to = %d.to, "Flagger gate: not healthy");
            (StatusCode::PRECONDITION_FAILED, Json(json!({ "error": format!("{} is not healthy", d.to), "failing": d.failing }))).into_response()
        }
        Response::DryRun(d) => Json(d).into_response(),
        Response::Error { message } => error(StatusCode::BAD_REQUEST, message),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "the agent answered a dry run with something else"),
    }
}

/// For a confirm-promotion hook: flips to `metadata.color` and answers 200 once it is the
/// active color (at once when it already is: Flagger calls again until it gets a 2xx); 409
/// with the reason when the gate refuses.
async fn flagger_promote(Shared(app): Shared<App>, Extension(peer): Extension<Peer>, Extension(authn): Extension<Authn>, bytes: Bytes) -> HttpResponse {
    let (hook, color) = match flagger(&app, &peer, authn, "/v1/flagger/promote", &bytes) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let drain_secs = match drain_secs(hook.metadata.get("drain").map(|d| Value::String(d.clone())).as_ref()) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("metadata.{e}")),
    };
    let req = Request::Flip { color, drain_secs, percent: None, force: false, dry_run: false };
    match run_switch(&app, req, peer.actor()).await {
        Response::Flipped(r) => match incomplete(&r) {
            Some(why) => (StatusCode::CONFLICT, Json(json!({ "error": why, "result": r }))).into_response(),
            None => {
                info!(canary = %hook.name, namespace = %hook.namespace, to = %r.to, changed = r.changed, "Flagger promotion");
                Json(r).into_response()
            }
        },
        Response::Error { message } => error(StatusCode::CONFLICT, message),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "the agent answered a flip with something else"),
    }
}

/// An accepted switch and how it went.
#[derive(Clone, Debug, Serialize)]
pub struct Operation {
    pub id: String,
    /// "flip" or "rollback".
    pub kind: &'static str,
    /// "pending", then "done" or "failed".
    pub status: &'static str,
    pub status_url: String,
    /// The request as the control socket would take it.
    pub request: Value,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
    /// Done: the switch's figures (as `bgctl flip --json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<FlipResult>,
    /// Failed: why (a refusal by the gate says what fails).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    started: Instant,
}

/// The last `KEPT_OPERATIONS` operations, oldest first.
struct Operations {
    /// Tells this agent's ids from an earlier one's.
    tag: u32,
    next: u64,
    list: VecDeque<Operation>,
}

impl Operations {
    fn new() -> Operations {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        Operations { tag: (nanos as u32) ^ std::process::id(), next: 1, list: VecDeque::new() }
    }

    fn begin(&mut self, kind: &'static str, request: Value, base: &str) -> Result<Operation, String> {
        if self.list.iter().filter(|o| o.status == "pending").count() >= MAX_PENDING {
            return Err(format!("{MAX_PENDING} switches are still pending; wait for them (GET their status_url) and retry"));
        }
        if self.list.len() >= KEPT_OPERATIONS {
            if let Some(i) = self.list.iter().position(|o| o.status != "pending") {
                self.list.remove(i);
            }
        }
        let id = format!("{:08x}-{}", self.tag, self.next);
        self.next += 1;
        let op = Operation {
            status_url: format!("{base}{id}"),
            id,
            kind,
            status: "pending",
            request,
            created_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            finished_at: None,
            took_ms: None,
            result: None,
            error: None,
            started: Instant::now(),
        };
        self.list.push_back(op.clone());
        Ok(op)
    }

    fn finish(&mut self, id: &str, answer: Response) {
        let Some(op) = self.list.iter_mut().find(|o| o.id == id) else { return };
        match answer {
            Response::Flipped(r) => {
                match incomplete(&r) {
                    Some(why) => {
                        op.status = "failed";
                        op.error = Some(why);
                    }
                    None => op.status = "done",
                }
                op.result = Some(r);
            }
            Response::Error { message } => {
                op.status = "failed";
                op.error = Some(message);
            }
            other => {
                op.status = "failed";
                op.error = Some(format!("the agent answered with something else: {}", serde_json::to_string(&other).unwrap_or_default()));
            }
        }
        op.finished_at = Some(humantime::format_rfc3339_millis(SystemTime::now()).to_string());
        op.took_ms = Some(op.started.elapsed().as_millis() as u64);
    }

    fn get(&self, id: &str) -> Option<Operation> {
        self.list.iter().find(|o| o.id == id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flipped() -> Response {
        Response::Flipped(FlipResult::unchanged(bg_common::Color::Blue, 3, 10))
    }

    #[test]
    fn operations_go_pending_then_done_or_failed() {
        let mut ops = Operations::new();
        let a = ops.begin("flip", json!({}), "http://h/v1/operations/").unwrap();
        let b = ops.begin("rollback", json!({}), "http://h/v1/operations/").unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(a.status_url, format!("http://h/v1/operations/{}", a.id));
        assert_eq!(ops.get(&a.id).unwrap().status, "pending");
        ops.finish(&a.id, flipped());
        ops.finish(&b.id, Response::Error { message: "refused: green not healthy".into() });
        let (a, b) = (ops.get(&a.id).unwrap(), ops.get(&b.id).unwrap());
        assert_eq!((a.status, a.result.unwrap().generation), ("done", 3));
        assert_eq!((b.status, b.error.as_deref()), ("failed", Some("refused: green not healthy")));
        assert!(ops.get("nope").is_none());
    }

    #[test]
    fn pending_operations_are_capped_and_never_evicted() {
        let mut ops = Operations::new();
        let first = ops.begin("flip", json!({}), "").unwrap();
        for _ in 1..MAX_PENDING {
            ops.begin("flip", json!({}), "").unwrap();
        }
        assert!(ops.begin("flip", json!({}), "").unwrap_err().contains("pending"));
        // Finished ones make room; the store keeps KEPT_OPERATIONS and drops finished ones first.
        let ids: Vec<String> = ops.list.iter().skip(1).map(|o| o.id.clone()).collect();
        for id in &ids {
            ops.finish(id, flipped());
        }
        for _ in 0..KEPT_OPERATIONS * 2 {
            let op = ops.begin("flip", json!({}), "").unwrap();
            ops.finish(&op.id, flipped());
        }
        assert_eq!(ops.list.len(), KEPT_OPERATIONS);
        assert_eq!(ops.get(&first.id).unwrap().status, "pending", "a pending operation was evicted");
    }

    #[test]
    fn drains_are_seconds_or_durations() {
        assert_eq!(drain_secs(None), Ok(None));
        assert_eq!(drain_secs(Some(&json!(30))), Ok(Some(30)));
        assert_eq!(drain_secs(Some(&json!("2m"))), Ok(Some(120)));
        assert_eq!(drain_secs(Some(&json!("30"))), Ok(Some(30)), "Flagger's metadata values are strings");
        assert!(drain_secs(Some(&json!("1500ms"))).unwrap_err().contains("whole number of seconds"));
        assert!(drain_secs(Some(&json!("99999999999999999999999"))).unwrap_err().contains("out of range"));
        assert!(drain_secs(Some(&json!(-1))).unwrap_err().contains("whole number"));
        assert!(drain_secs(Some(&json!("soon"))).unwrap_err().contains("not a duration"));
        assert!(drain_secs(Some(&json!([1]))).unwrap_err().contains("not a duration"));
    }

    #[test]
    fn the_bearer_scheme_is_any_case() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer\tabc "), Some("abc"));
        assert_eq!(bearer("BEARER abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcdeg"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!same(b"", b"x"));
    }
}
