//! Rotating the CA under traffic: root, intermediate and token key through prepare → activate
//! → retire (by command, and by the automatic schedule), with requests flowing through a real
//! sidecar pair the whole time, over keep-alive connections, new connections, and one
//! streaming response that stays open throughout. Also: retire refused while an old-chain SVID
//! is live, revocation, and recovery from an expired intermediate, an expired root and an SVID
//! that expired while the CA was away.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Ca, Sidecar, SidecarPorts, openssl_verify, run};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

pub(crate) const POLICY: &str = "\
trust_domain: cluster.local
services:
  orders:
    id: spiffe://cluster.local/ns/shop/sa/orders
    scopes: [orders:read]
    routes:
      - { method: GET, path: /orders, scope: orders:read }
      - { method: GET, path: /stream, scope: orders:read }
    opaque_ports: [OPAQUE_PORT]
    callers:
      frontend: [orders:read]
  frontend:
    id: spiffe://cluster.local/ns/shop/sa/frontend
";

/// The orders app: `/orders` answers at once; `/stream` sends a line every 100 ms until
/// `stop` is set, then ends its body.
pub(crate) async fn orders_app(stop: Arc<AtomicBool>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let stop = stop.clone();
                    async move {
                        let _: &hyper::Request<hyper::body::Incoming> = &req;
                        type Frames = std::pin::Pin<
                            Box<
                                dyn futures::Stream<
                                        Item = Result<hyper::body::Frame<Bytes>, std::io::Error>,
                                    > + Send,
                            >,
                        >;
                        let frames: Frames = if req.uri().path() == "/stream" {
                            Box::pin(futures::stream::unfold(0u64, move |n| {
                                let stop = stop.clone();
                                async move {
                                    if stop.load(Ordering::Relaxed) {
                                        return None;
                                    }
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    let line = Bytes::from(format!("tick {n}\n"));
                                    Some((Ok(hyper::body::Frame::data(line)), n + 1))
                                }
                            }))
                        } else {
                            Box::pin(futures::stream::once(async {
                                Ok(hyper::body::Frame::data(Bytes::from_static(b"orders\n")))
                            }))
                        };
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(StreamBody::new(
                            frames,
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// What the traffic saw.
#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    new_connections: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Counts {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap();
        if e.len() < 20 {
            e.push(what);
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// An HTTP/1.1 connection to the frontend's outbound proxy (the app's view: HTTP_PROXY).
async fn proxy_conn(proxy: SocketAddr) -> Result<Sender, String> {
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

async fn get(send: &mut Sender, path: &str) -> Result<(u16, Bytes), String> {
    let req = hyper::Request::get(format!("http://orders{path}"))
        .header("host", "orders")
        .body(Empty::new())
        .unwrap();
    send.ready().await.map_err(|e| format!("ready: {e}"))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// Requests through the sidecar pair until `stop`: two keep-alive connections, one client
/// that opens a new connection per request, and one streaming response open throughout.
pub(crate) struct Traffic {
    /// Whether the streaming response is part of it (and must stay open throughout).
    streaming: bool,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    stream_stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stream: tokio::task::JoinHandle<Result<u64, String>>,
}

impl Traffic {
    pub(crate) fn start(proxy: SocketAddr, stream_stop: Arc<AtomicBool>) -> Traffic {
        Self::start_with(proxy, Some(stream_stop))
    }

    /// Requests only, no streaming response.
    pub(crate) fn requests_only(proxy: SocketAddr) -> Traffic {
        Self::start_with(proxy, None)
    }

    fn start_with(proxy: SocketAddr, stream_stop: Option<Arc<AtomicBool>>) -> Traffic {
        let streaming = stream_stop.is_some();
        let stream_stop = stream_stop.unwrap_or_default();
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let (counts, stop) = (counts.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut send = None;
                while !stop.load(Ordering::Relaxed) {
                    if send.is_none() {
                        match proxy_conn(proxy).await {
                            Ok(s) => send = Some(s),
                            Err(e) => {
                                counts.fail(format!("keep-alive {e}"));
                                continue;
                            }
                        }
                    }
                    // Paced (about 300 requests/s per client): other tests share the cores.
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    let s = send.as_mut().unwrap();
                    match get(s, "/orders").await {
                        Ok((200, _)) => {
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((status, body)) => counts.fail(format!(
                            "keep-alive {status}: {}",
                            String::from_utf8_lossy(&body)
                        )),
                        Err(e) => {
                            counts.fail(format!("keep-alive {e}"));
                            send = None;
                        }
                    }
                }
            }));
        }
        {
            let (counts, stop) = (counts.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    let result = match proxy_conn(proxy).await {
                        Ok(mut s) => get(&mut s, "/orders").await,
                        Err(e) => Err(e),
                    };
                    counts.new_connections.fetch_add(1, Ordering::Relaxed);
                    match result {
                        Ok((200, _)) => {
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((status, body)) => counts.fail(format!(
                            "new connection {status}: {}",
                            String::from_utf8_lossy(&body)
                        )),
                        Err(e) => counts.fail(format!("new connection {e}")),
                    }
                }
            }));
        }
        let stream = tokio::spawn(async move {
            if !streaming {
                return Ok(0);
            }
            let mut send = proxy_conn(proxy).await?;
            let req = hyper::Request::get("http://orders/stream")
                .header("host", "orders")
                .body(Empty::new())
                .unwrap();
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| format!("stream request: {e}"))?;
            if resp.status() != 200 {
                return Err(format!("stream answered {}", resp.status()));
            }
            let mut body = resp.into_body();
            let mut lines = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("stream broke after {lines} lines: {e}"))?;
                if let Some(data) = frame.data_ref() {
                    lines += data.iter().filter(|b| **b == b'\n').count() as u64;
                }
            }
            Ok(lines)
        });
        Traffic {
            streaming,
            counts,
            stop,
            stream_stop,
            tasks,
            stream,
        }
    }

    /// Requests failed so far.
    pub(crate) fn counts_failed(&self) -> u64 {
        self.counts.failed.load(Ordering::Relaxed)
    }

    pub(crate) fn total(&self) -> u64 {
        self.counts.ok.load(Ordering::Relaxed) + self.counts.failed.load(Ordering::Relaxed)
    }

    /// Keep going until at least `n` requests were made, then stop everything; returns
    /// (requests ok, requests failed with the first failures, lines the stream carried).
    pub(crate) async fn finish(self, n: u64, started: Instant) -> (u64, u64, Vec<String>, u64) {
        while self.total() < n {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.stream_stop.store(true, Ordering::Relaxed);
        let lines = tokio::time::timeout(Duration::from_secs(10), self.stream)
            .await
            .expect("the streaming response ends once the app ends it")
            .unwrap()
            .unwrap_or_else(|e| panic!("the streaming response failed: {e}"));
        // One line per 100 ms for the whole run: the stream was open through every step.
        let open_for = started.elapsed().as_millis() as u64;
        assert!(
            !self.streaming || lines * 100 >= open_for / 2,
            "the stream carried {lines} lines over {open_for} ms"
        );
        let errors = self.counts.errors.lock().unwrap().clone();
        eprintln!(
            "traffic: {} ok, {} failed, {} on new connections, {lines} stream lines over {open_for} ms",
            self.counts.ok.load(Ordering::Relaxed),
            self.counts.failed.load(Ordering::Relaxed),
            self.counts.new_connections.load(Ordering::Relaxed),
        );
        (
            self.counts.ok.load(Ordering::Relaxed),
            self.counts.failed.load(Ordering::Relaxed),
            errors,
            lines,
        )
    }
}

/// A CA, the orders sidecar in front of [`orders_app`], and the frontend sidecar that calls it.
pub(crate) struct Pair {
    pub ca: Ca,
    pub frontend: Sidecar,
    pub orders: Sidecar,
    pub stream_stop: Arc<AtomicBool>,
    /// The orders app (behind the orders sidecar).
    pub orders_app: SocketAddr,
    /// The policy file the CA watches.
    pub policy: std::path::PathBuf,
    /// The orders pod's opaque TCP port (an echo).
    opaque_port: u16,
}

/// A TCP echo on loopback (the orders pod's opaque port): its port.
async fn tcp_echo() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

pub(crate) async fn pair(ca_args: &[&str]) -> Pair {
    pair_in(None, ca_args).await
}

/// [`pair`] with the CA's data directory at `data_dir` (a file system of the test's own).
pub(crate) async fn pair_in(data_dir: Option<&Path>, ca_args: &[&str]) -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("policy.yaml");
    let opaque_port = tcp_echo().await;
    std::fs::write(
        &policy,
        POLICY.replace("OPAQUE_PORT", &opaque_port.to_string()),
    )
    .unwrap();
    let mut args = vec!["--policy", policy.to_str().unwrap()];
    args.extend_from_slice(ca_args);
    let data_dir = data_dir.map_or_else(|| tmp.path().join("ca"), Path::to_path_buf);
    let ca = Ca::start_in(data_dir, tmp.path().to_path_buf(), &args)
        .await
        .owning(tmp);
    let stream_stop = Arc::new(AtomicBool::new(false));
    let orders_ports = SidecarPorts::new();
    let route = vec![format!("orders={}", orders_ports.inbound)];
    let app = orders_app(stream_stop.clone()).await;
    let mut orders = Sidecar::start(&ca, "orders", ORDERS, app, orders_ports, &[]).await;
    let frontend_app = orders_app(Arc::new(AtomicBool::new(true))).await;
    let mut frontend = Sidecar::start(
        &ca,
        "frontend",
        FRONTEND,
        frontend_app,
        SidecarPorts::new(),
        &route,
    )
    .await;
    orders.ready().await;
    frontend.ready().await;
    Pair {
        ca,
        frontend,
        orders,
        stream_stop,
        orders_app: app,
        policy,
        opaque_port,
    }
}

/// `meshid ca rotate ARGS --data-dir D`: (exit ok, stdout + stderr).
async fn rotate(ca: &Ca, args: &[&str]) -> (bool, String) {
    operator(ca, "rotate", args).await
}

/// `meshid ca VERB ARGS --data-dir D` (an operator command of the running CA).
pub(crate) async fn operator(ca: &Ca, verb: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["ca", verb];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--data-dir", ca.data_dir()]);
    let out = run(&all).await;
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn status(ca: &Ca) -> Value {
    let (ok, out) = rotate(ca, &["status", "--json"]).await;
    assert!(ok, "status: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
}

/// The authority and token key in state `state`.
fn in_state<'a>(status: &'a Value, list: &str, state: &str) -> Vec<&'a Value> {
    status[list]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == state)
        .collect()
}

/// Retire `what`, retrying while the CA says it is not safe yet (renewals under way).
async fn retire(ca: &Ca, what: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (ok, out) = rotate(ca, &["retire", "--what", what]).await;
        if ok {
            return out;
        }
        assert!(
            out.contains("wait") || out.contains("live") || out.contains("acknowledg"),
            "retire {what} failed otherwise than by waiting: {out}"
        );
        assert!(
            Instant::now() < deadline,
            "retire {what} still refused after {within:?}: {out}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn short_sha(der: &[u8]) -> String {
    meshid_proto::bundle::cert_sha256(der)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn certs_in(pem: &[u8]) -> Vec<Vec<u8>> {
    meshid_proto::pem::decode_certs(pem)
        .unwrap()
        .into_iter()
        .map(|c| c.to_vec())
        .collect()
}

/// The JWKS the CA publishes, with a stock client (curl), trusting the bundle.
fn jwks(ca: &Ca, bundle: &Path) -> Vec<String> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(bundle)
        .arg(format!(
            "https://localhost:{}/.well-known/jwks.json",
            ca.http_addr.port()
        ))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "JWKS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// After a full rotation: the bundle holds only `root_sha`, the SVID of each sidecar chains
/// to it (openssl), each sidecar's own bundle.pem is that bundle, the JWKS holds only `kid`.
async fn check_rotated(p: &Pair, root_sha: &str, kid: &str) {
    let bundle = p.ca.bundle_file().await;
    let roots = certs_in(&std::fs::read(&bundle).unwrap());
    assert_eq!(roots.len(), 1, "the bundle holds only the new root");
    assert_eq!(short_sha(&roots[0]), root_sha);
    for s in [&p.frontend, &p.orders] {
        // The sidecar writes the bundle it follows beside its SVID.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let theirs = certs_in(&std::fs::read(s.cert_dir.join("bundle.pem")).unwrap());
            if theirs == roots {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}'s bundle.pem holds {} roots, not the new one",
                s.name,
                theirs.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        openssl_verify(&s.cert_dir.join("svid.pem"), &bundle)
            .unwrap_or_else(|e| panic!("{}'s SVID does not chain to the new root: {e}", s.name));
    }
    assert_eq!(jwks(&p.ca, &bundle), vec![kid.to_owned()]);
}

const FAST: &[&str] = &[
    "--svid-ttl",
    "1m",
    "--token-ttl",
    "5s",
    "--renew-window",
    "2s",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_intermediate_and_token_key_rotate_by_command_under_traffic_without_a_failed_request()
{
    let mut args = FAST.to_vec();
    args.extend_from_slice(&["--auto-rotate", "false"]);
    let p = pair(&args).await;
    let before = status(&p.ca).await;
    let old_root = in_state(&before, "authorities", "active")[0]["root_sha256"].clone();
    let old_kid = in_state(&before, "token_keys", "active")[0]["kid"].clone();
    let started = Instant::now();
    let traffic = Traffic::start(p.frontend.outbound, p.stream_stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The root: the new one joins the bundle, then signs, then the old one leaves.
    let (ok, out) = rotate(&p.ca, &["prepare", "--what", "root"]).await;
    assert!(ok, "prepare root: {out}");
    let mid = status(&p.ca).await;
    let prepared = in_state(&mid, "authorities", "prepared");
    assert_eq!(prepared.len(), 1, "{mid}");
    let new_root = prepared[0]["root_sha256"].clone();
    assert_ne!(new_root, old_root);
    // Both sidecars trust both roots before anything is signed under the new one.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ok, out) = rotate(&p.ca, &["activate", "--what", "root"]).await;
        if ok {
            break;
        }
        assert!(out.contains("acknowledged"), "activate root: {out}");
        assert!(Instant::now() < deadline, "activate root: {out}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = retire(&p.ca, "root", Duration::from_secs(60)).await;
    assert!(out.contains("retire"), "{out}");

    // The intermediate, under the new root.
    let (ok, out) = rotate(&p.ca, &["prepare", "--what", "intermediate"]).await;
    assert!(ok, "prepare intermediate: {out}");
    let (ok, out) = rotate(&p.ca, &["activate", "--what", "intermediate"]).await;
    assert!(ok, "activate intermediate: {out}");
    retire(&p.ca, "intermediate", Duration::from_secs(60)).await;

    // The token key: the new one is in the JWKS (and every verifier) before it signs; the old
    // one leaves once every token it signed has expired.
    let (ok, out) = rotate(&p.ca, &["prepare", "--what", "token-key"]).await;
    assert!(ok, "prepare token-key: {out}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, out) = rotate(&p.ca, &["activate", "--what", "token-key"]).await;
    assert!(ok, "activate token-key: {out}");
    let (ok, out) = rotate(&p.ca, &["retire", "--what", "token-key"]).await;
    assert!(
        !ok && out.contains("token"),
        "retire token-key is refused while tokens it signed may be live: {out}"
    );
    retire(&p.ca, "token-key", Duration::from_secs(120)).await;

    let (ok, failed, errors, lines) = traffic.finish(10_000, started).await;
    eprintln!("CA log:\n{}", p.ca.log());
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during the rotation: {errors:#?}",
        ok + failed
    );
    assert!(lines > 0);

    let after = status(&p.ca).await;
    let active = in_state(&after, "authorities", "active");
    assert_eq!(active.len(), 1);
    assert_eq!(active[0]["root_sha256"], new_root, "{after}");
    assert!(in_state(&after, "authorities", "old").is_empty(), "{after}");
    let kid = in_state(&after, "token_keys", "active")[0]["kid"].clone();
    assert_ne!(kid, old_kid);
    assert!(in_state(&after, "token_keys", "old").is_empty(), "{after}");
    check_rotated(&p, new_root.as_str().unwrap(), kid.as_str().unwrap()).await;
    // Nothing restarted: each sidecar renewed in place (twice at least: new root, new
    // intermediate), and the log says when.
    for s in [&p.frontend, &p.orders] {
        let renewals = metric(s, "meshid_svid_renewals_total").await;
        assert!(renewals >= 2.0, "{} renewed {renewals} times", s.name);
        assert!(
            s.log().contains("renewing within"),
            "{} did not say it renews for the rotation: {}",
            s.name,
            s.log()
        );
    }
}

/// A sample of a sidecar's metrics.
pub(crate) async fn metric(s: &Sidecar, name: &str) -> f64 {
    let (_, body) = s.admin_get("/metrics").await.expect("metrics answer");
    crate::support::sample(&body, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_automatic_schedule_rotates_root_and_token_key_under_traffic_with_no_command() {
    // Two-minute authorities and a one-minute token key: the schedule prepares at half-life,
    // activates a sixth before the end, and retires when it is safe, while traffic flows.
    let mut args = FAST.to_vec();
    args.extend_from_slice(&[
        "--root-ttl",
        "2m",
        "--intermediate-ttl",
        "2m",
        "--token-key-ttl",
        "1m",
    ]);
    let p = pair(&args).await;
    let before = status(&p.ca).await;
    assert_eq!(before["auto"], true, "automatic rotation is on by default");
    let old_root = in_state(&before, "authorities", "active")[0]["root_sha256"].clone();
    let old_kid = in_state(&before, "token_keys", "active")[0]["kid"].clone();
    let started = Instant::now();
    let traffic = Traffic::start(p.frontend.outbound, p.stream_stop.clone());

    // On 2-minute lifetimes the schedule never rests (a new authority every minute, a new
    // token key every 30 s): wait until the first root and the first token key are retired.
    let gone = |st: &Value, list: &str, field: &str, value: &Value| {
        st[list]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| &a[field] == value)
            .all(|a| a["state"] == "retired")
    };
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let now = status(&p.ca).await;
        if gone(&now, "authorities", "root_sha256", &old_root)
            && gone(&now, "token_keys", "kid", &old_kid)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the schedule did not rotate within 4 minutes: {now}\n{}",
            p.ca.log()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (ok, failed, errors, _) = traffic.finish(10_000, started).await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during the automatic rotation: {errors:#?}",
        ok + failed
    );
    let log = p.ca.log();
    for step in [
        "automatic rotation: prepare root",
        "automatic rotation: activate root",
        "automatic rotation: retire root",
        "automatic rotation: prepare token-key",
        "automatic rotation: activate token-key",
        "automatic rotation: retire token-key",
    ] {
        assert!(
            log.contains(step),
            "the CA log does not say {step:?}: {log}"
        );
    }
    // The first root left the bundle and the first key the JWKS; the SVIDs chain to the
    // bundle in force (the schedule may be mid-step: try again on a race).
    let bundle = p.ca.bundle_file().await;
    let roots: Vec<String> = certs_in(&std::fs::read(&bundle).unwrap())
        .iter()
        .map(|r| short_sha(r))
        .collect();
    assert!(!roots.contains(&old_root.as_str().unwrap().to_owned()));
    assert!(!jwks(&p.ca, &bundle).contains(&old_kid.as_str().unwrap().to_owned()));
    for s in [&p.frontend, &p.orders] {
        let mut tries = 0;
        while let Err(e) = openssl_verify(&s.cert_dir.join("svid.pem"), &p.ca.bundle_file().await) {
            tries += 1;
            assert!(
                tries < 10,
                "{}'s SVID does not chain to the bundle: {e}",
                s.name
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_is_refused_while_an_svid_of_the_old_chain_is_live_and_status_says_who_holds_it() {
    let p = pair(&["--auto-rotate", "false", "--renew-window", "2s"]).await;
    // A one-shot SVID (a batch job's, say) that nobody renews, under the current root.
    const JOB: &str = "spiffe://cluster.local/ns/batch/sa/report-job";
    let token = p.ca.join_token(JOB, &[]).await;
    let (out, _) = p.ca.fetch(&token, "job").await;
    assert!(out.status.success(), "{}", crate::support::stderr(&out));

    let (ok, out) = rotate(&p.ca, &["prepare", "--what", "root"]).await;
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !rotate(&p.ca, &["activate", "--what", "root"]).await.0 {
        assert!(Instant::now() < deadline, "activate root");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The sidecars renew within the window; the job's SVID stays live under the old chain.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (ok, out) = rotate(&p.ca, &["retire", "--what", "root"]).await;
    assert!(!ok, "retire must be refused: {out}");
    assert!(out.contains("live SVID"), "{out}");
    assert!(out.contains(JOB), "the refusal names the holder: {out}");
    assert!(
        !out.contains(FRONTEND) && !out.contains(ORDERS),
        "the sidecars renewed: {out}"
    );

    let (ok, text) = rotate(&p.ca, &["status"]).await;
    assert!(ok, "{text}");
    let old = text
        .lines()
        .find(|l| l.contains(" old "))
        .unwrap_or_else(|| panic!("status shows no old authority: {text}"));
    assert!(old.contains("live SVIDs: 1"), "{text}");
    assert!(
        text.contains(&format!("still held by: {JOB}")),
        "status names who still holds an old-chain SVID: {text}"
    );
    // The mesh is unaffected, and --force overrides, loudly (log and audit).
    let reply = crate::mesh::via_proxy(p.frontend.outbound, "GET", "http://orders/orders", &[]);
    assert_eq!(reply.status, 200, "{reply:?}");
    let (ok, out) = rotate(&p.ca, &["retire", "--what", "root", "--force"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("FORCED"), "{out}");
    assert!(p.ca.log().contains("FORCED"), "{}", p.ca.log());
    assert!(
        p.ca.audit().iter().any(|r| r["event"] == "ca_rotation"
            && r["outcome"] == "retire"
            && r["reason"]
                .as_str()
                .is_some_and(|m| m.ends_with("(forced)"))),
        "{:?}",
        p.ca.audit()
    );
    let reply = crate::mesh::via_proxy(p.frontend.outbound, "GET", "http://orders/orders", &[]);
    assert_eq!(reply.status, 200, "{reply:?}");
    // The operator credential lives as long as the CA: none is left behind once it stops.
    let mut ca = p.ca;
    assert!(ca.data_dir.join("admin.token").exists());
    ca.terminate();
    assert!(ca.exited_within(Duration::from_secs(15)).await.is_some());
    assert!(!ca.data_dir.join("admin.token").exists());
    let (ok, out) = rotate(&ca, &["status"]).await;
    assert!(!ok && out.contains("is it running"), "{out}");
}

/// Call orders through the frontend's sidecar until the answer is `want` (or 20 s pass);
/// returns how long that took and the last reply.
async fn until_status(p: &Pair, want: u16, within: Duration) -> (Duration, crate::mesh::Reply) {
    let start = Instant::now();
    loop {
        let proxy = p.frontend.outbound;
        let reply = tokio::task::spawn_blocking(move || {
            crate::mesh::via_proxy(proxy, "GET", "http://orders/orders", &[])
        })
        .await
        .unwrap();
        if reply.status == want || start.elapsed() > within {
            return (start.elapsed(), reply);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_workload_is_refused_by_every_sidecar_within_seconds_and_gets_nothing_from_the_ca()
 {
    let p = pair(&["--auto-rotate", "false"]).await;
    let (_, reply) = until_status(&p, 200, Duration::from_secs(5)).await;
    assert_eq!(reply.status, 200, "{reply:?}");

    // An opaque TCP tunnel open before the revocation (CONNECT through the frontend's sidecar).
    let mut tunnel = tokio::net::TcpStream::connect(p.frontend.outbound)
        .await
        .unwrap();
    let target = format!("orders:{}", p.opaque_port);
    tunnel
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tunnel.read(&mut b).await.unwrap(), 1, "{head:?}");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tunnel.write_all(b"ping\n").await.unwrap();
    let mut echo = [0u8; 5];
    tunnel.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping\n");

    let (ok, out) = operator(
        &p.ca,
        "revoke",
        &[
            "--spiffe-id",
            FRONTEND,
            "--reason",
            "key leaked in a core dump",
        ],
    )
    .await;
    assert!(ok, "{out}");
    // The open tunnel is closed by the callee's sidecar within seconds.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut rest))
        .await
        .expect("the revoked caller's open tunnel is closed")
        .ok();
    assert!(
        p.orders.log().contains("open tunnel to port"),
        "{}",
        p.orders.log()
    );
    let (took, reply) = until_status(&p, 403, Duration::from_secs(20)).await;
    assert_eq!(reply.status, 403, "still served after {took:?}: {reply:?}");
    assert!(took < Duration::from_secs(5), "refused only after {took:?}");
    assert!(reply.body.contains("revoked"), "{reply:?}");
    assert!(
        p.orders.log().contains("its identity is revoked"),
        "{}",
        p.orders.log()
    );
    let refused = metric(
        &p.orders,
        "meshid_requests_total{direction=\"inbound\",outcome=\"revoked\"}",
    )
    .await;
    assert!(refused >= 1.0);

    // The CA renews nothing, issues nothing, grants nothing for it.
    let copy = p.ca.work.join("frontend-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["svid.pem", "svid_key.pem", "bundle.pem"] {
        std::fs::copy(p.frontend.cert_dir.join(f), copy.join(f)).unwrap();
    }
    let out = run(&[
        "svid",
        "renew",
        "--ca",
        &p.ca.addr(),
        "--cert-dir",
        copy.to_str().unwrap(),
        "--timeout",
        "3s",
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        crate::support::stderr(&out).contains("revoked"),
        "{}",
        crate::support::stderr(&out)
    );
    let out = p.ca.token(&copy, "orders:read", &[]).await;
    assert!(
        !out.status.success(),
        "a token was granted to a revoked workload"
    );
    let token = p.ca.join_token(FRONTEND, &[]).await;
    let (out, _) = p.ca.fetch(&token, "frontend-again").await;
    assert!(!out.status.success(), "a revoked identity attested again");
    assert!(crate::support::stderr(&out).contains("revoked"));

    // Status and audit say so; unrevoke restores it within seconds.
    let st = status(&p.ca).await;
    assert_eq!(st["revocations"][0]["value"], FRONTEND, "{st}");
    assert!(p.ca.audit().iter().any(|r| r["event"] == "revocation"
        && r["outcome"] == "revoked"
        && r["spiffe_id"] == FRONTEND
        && r["reason"] == "key leaked in a core dump"));
    let (ok, out) = operator(&p.ca, "unrevoke", &["--spiffe-id", FRONTEND]).await;
    assert!(ok, "{out}");
    let (took, reply) = until_status(&p, 200, Duration::from_secs(20)).await;
    assert_eq!(reply.status, 200, "still refused after {took:?}: {reply:?}");

    // One certificate, by its serial as openssl prints it (colons, upper case): refused, and
    // only that certificate. A second SVID of the frontend's identity (a one-shot `svid
    // fetch`) calls the orders sidecar directly.
    let token = p.ca.join_token(FRONTEND, &[]).await;
    let (out, job) = p.ca.fetch(&token, "frontend-job").await;
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let direct = |dir: std::path::PathBuf| {
        let inbound = p.orders.inbound;
        tokio::task::spawn_blocking(move || {
            crate::mesh::direct(inbound, Some(&dir), "/orders", &[]).unwrap()
        })
    };
    let reply = direct(job.clone()).await.unwrap();
    assert_eq!(
        reply.status, 401,
        "no token yet, but not revoked: {reply:?}"
    );
    let openssl_form = |serial: &str| {
        serial
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).to_uppercase())
            .collect::<Vec<_>>()
            .join(":")
    };
    let job_serial = serial_of(&job.join("svid.pem")).await;
    let (ok, out) = operator(&p.ca, "revoke", &["--serial", &openssl_form(&job_serial)]).await;
    assert!(ok, "{out}");
    let start = Instant::now();
    loop {
        let reply = direct(job.clone()).await.unwrap();
        if reply.status == 403 {
            assert!(
                reply.body.contains("its certificate is revoked"),
                "{reply:?}"
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{reply:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, reply) = until_status(&p, 200, Duration::from_secs(1)).await;
    assert_eq!(
        reply.status, 200,
        "the sidecar's own certificate is not revoked"
    );

    // The sidecar's own certificate (a leaked key): it attests again by itself for a new key
    // and serial, and its calls go through again.
    let svid = p.frontend.cert_dir.join("svid.pem");
    let old_serial = serial_of(&svid).await;
    let (ok, out) = operator(&p.ca, "revoke", &["--serial", &old_serial]).await;
    assert!(ok, "{out}");
    let start = Instant::now();
    loop {
        let now = serial_of(&svid).await;
        if now != old_serial {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the frontend kept its revoked certificate: {}",
            p.frontend.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (took, reply) = until_status(&p, 200, Duration::from_secs(20)).await;
    assert_eq!(reply.status, 200, "after {took:?}: {reply:?}");
    assert!(p.frontend.log().contains("its certificate is revoked"));
    let (ok, out) = operator(&p.ca, "revoke", &["--serial", "not-hex"]).await;
    assert!(!ok && out.contains("serial"), "{out}");
}

/// The intermediate (and, with `root`, the root too) expires while the CA is down and the
/// SVIDs with it; the CA starts anyway, says what to run, and after that one command the
/// sidecars attest again by themselves (given the new root through their --ca-bundle file).
async fn recovers_after_expiry(root: bool) {
    let root_ttl = if root { "2m" } else { "10m" };
    let args = [
        "--auto-rotate",
        "false",
        "--svid-ttl",
        "1m",
        "--root-ttl",
        root_ttl,
        "--intermediate-ttl",
        "2m",
    ];
    let p = pair(&args).await;
    let (_, reply) = until_status(&p, 200, Duration::from_secs(5)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let st = status(&p.ca).await;
    let left = in_state(&st, "authorities", "active")[0]["intermediate_expires_in_seconds"]
        .as_i64()
        .unwrap();
    let Pair {
        ca,
        frontend,
        orders,
        stream_stop,
        orders_app,
        policy,
        opaque_port,
    } = p;
    let (addr, http_addr, work) = (ca.addr, ca.http_addr, ca.work.clone());
    let (data_dir, tmp) = ca.stop().await;
    tokio::time::sleep(Duration::from_secs(left as u64 + 2)).await;

    // Expired: the CA starts, says so and prints the command that recovers.
    let mut again = vec!["--policy", policy.to_str().unwrap()];
    again.extend_from_slice(&args);
    let ca = Ca::start_on(data_dir, work.clone(), addr, http_addr, &again).await;
    let ca = match tmp {
        Some(tmp) => ca.owning(tmp),
        None => ca,
    };
    let p = Pair {
        ca,
        frontend,
        orders,
        stream_stop,
        orders_app,
        policy,
        opaque_port,
    };
    let what = if root { "root" } else { "intermediate" };
    let command = format!("meshid ca rotate recover --what {what}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.ca.log().contains(&command) {
        assert!(
            Instant::now() < deadline,
            "no recovery command: {}",
            p.ca.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        crate::support::http_get(p.ca.admin_addr, "/healthz")
            .await
            .map(|r| r.0),
        Some(200)
    );
    let (_, reply) = until_status(&p, 200, Duration::from_secs(1)).await;
    assert_ne!(
        reply.status, 200,
        "the SVIDs expired: the mesh is down until recovery"
    );

    let (ok, out) = rotate(&p.ca, &["recover", "--what", what]).await;
    assert!(ok, "recover: {out}");
    if root {
        // The operator hands the new root to the sidecars (the bundle ConfigMap does this in
        // Kubernetes): they follow their --ca-bundle file.
        p.ca.bundle_file().await;
    }
    let (took, reply) = until_status(&p, 200, Duration::from_secs(60)).await;
    assert_eq!(
        reply.status,
        200,
        "not recovered after {took:?}: {reply:?}\nfrontend: {}\norders: {}",
        p.frontend.log(),
        p.orders.log()
    );
    let bundle = p.ca.bundle_file().await;
    for s in [&p.frontend, &p.orders] {
        assert!(s.log().contains("attesting again"), "{}", s.log());
        openssl_verify(&s.cert_dir.join("svid.pem"), &bundle)
            .unwrap_or_else(|e| panic!("{}: {e}", s.name));
    }
    if root {
        assert!(
            p.frontend.log().contains("brought new roots")
                || p.orders.log().contains("brought new roots"),
            "the new root came through the --ca-bundle file"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_intermediate_is_recovered_with_one_command_and_sidecars_attest_again() {
    recovers_after_expiry(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_root_is_recovered_with_one_command_and_the_new_bundle_file() {
    recovers_after_expiry(true).await;
}

async fn curl(cmd: &mut tokio::process::Command) -> (u16, String) {
    let out = cmd.output().await.expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[tokio::test]
async fn the_operator_api_answers_loopback_callers_only_even_on_a_port_open_to_the_network() {
    // The CA's pod binds its admin port to every address (the Kubernetes manifest does, for
    // the kubelet's probes and the scraper); another pod knows the credential.
    let net = crate::pods::Net::new();
    let ca_pod = net.pod("ca");
    let other = net.pod("other");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ca");
    let _ca = ca_pod
        .meshid()
        .args(["ca", "serve", "--data-dir"])
        .arg(&data)
        .args(["--grpc-addr", "0.0.0.0:8443", "--http-addr", "0.0.0.0:8444"])
        .args(["--admin-addr", "0.0.0.0:9090"])
        .stderr(std::fs::File::create(tmp.path().join("ca.log")).unwrap())
        .spawn()
        .unwrap();
    ca_pod
        .wait_port(ca_pod.addr(9090), Duration::from_secs(20))
        .await;
    let credential = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let bearer = format!("Authorization: Bearer {}", credential.trim());
    let url = |host: &str, path: &str| format!("http://{host}:9090{path}");
    let remote = ca_pod.ip.to_string();

    let (code, body) = curl(other.command("curl").args([
        "-sS",
        "-w",
        "\n%{http_code}",
        "-X",
        "POST",
        "-H",
        &bearer,
        &url(&remote, "/rotation/prepare?what=root"),
    ]))
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("loopback only"), "{body}");
    // The probes stay open to the network; nothing was prepared.
    let (code, _) = curl(other.command("curl").args([
        "-sS",
        "-w",
        "\n%{http_code}",
        &url(&remote, "/healthz"),
    ]))
    .await;
    assert_eq!(code, 200);

    // In the CA's pod (kubectl exec): no credential, 401; a misspelt parameter is refused,
    // not taken for a default; the command works.
    let (code, body) = curl(ca_pod.command("curl").args([
        "-sS",
        "-w",
        "\n%{http_code}",
        &url("127.0.0.1", "/rotation"),
    ]))
    .await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = curl(ca_pod.command("curl").args([
        "-sS",
        "-w",
        "\n%{http_code}",
        "-X",
        "POST",
        "-H",
        &bearer,
        &url(
            "127.0.0.1",
            "/rotation/recover?What=intermediate&force=true",
        ),
    ]))
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("unknown parameter"), "{body}");
    let out = ca_pod
        .meshid()
        .args(["ca", "rotate", "status", "--json", "--data-dir"])
        .arg(&data)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        in_state(&st, "authorities", "prepared").is_empty(),
        "the refused calls changed nothing: {st}"
    );
    assert_eq!(st["authorities"].as_array().unwrap().len(), 1, "{st}");
}

/// A certificate's serial as `meshid inspect` prints it.
async fn serial_of(svid: &Path) -> String {
    let inspect = crate::support::run_ok(&["inspect", svid.to_str().unwrap()]).await;
    inspect
        .lines()
        .find_map(|l| l.trim().strip_prefix("serial:"))
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tainted_authority_has_every_svid_it_signed_renewed_at_once() {
    // A one-hour renewal window: without the taint, renewals would spread over an hour.
    let p = pair(&["--auto-rotate", "false", "--renew-window", "1h"]).await;
    let (ok, out) = rotate(&p.ca, &["prepare", "--what", "intermediate"]).await;
    assert!(ok, "{out}");
    let (ok, out) = rotate(&p.ca, &["activate", "--what", "intermediate"]).await;
    assert!(ok, "{out}");
    let st = status(&p.ca).await;
    let old = in_state(&st, "authorities", "old")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (ok, out) = rotate(&p.ca, &["taint", "--authority", &old]).await;
    assert!(ok, "{out}");
    assert!(out.contains("tainted"), "{out}");
    let start = Instant::now();
    loop {
        let st = status(&p.ca).await;
        let tainted = st["authorities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == old.as_str())
            .unwrap()
            .clone();
        assert_eq!(tainted["tainted"], true);
        if tainted["live_svids"] == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "SVIDs of the tainted authority still live after 20 s: {st}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    retire(&p.ca, "intermediate", Duration::from_secs(10)).await;
    let (_, reply) = until_status(&p, 200, Duration::from_secs(5)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    // Only an old authority can be tainted.
    let st = status(&p.ca).await;
    let active = in_state(&st, "authorities", "active")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (ok, out) = rotate(&p.ca, &["taint", "--authority", &active]).await;
    assert!(!ok && out.contains("only an old authority"), "{out}");
}
