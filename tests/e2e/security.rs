//! The security review's findings, tried as an attacker inside the mesh would: path tricks
//! around route rules, forged identity headers at B's own inbound, anonymous directory reads,
//! slow clients on every port, and a CA or sidecar told to stop while clients hold it open.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_proto::pb;
use meshid_proto::tls::CertSlot;
use meshid_proto::verify::{PeerRule, SpiffeVerifier, TrustSource};
use meshid_proto::{TrustBundle, TrustDomain};
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::mesh::{direct, direct_as, shop, via_proxy};
use crate::support::{Ca, set_child_env};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

/// A token for frontend -> orders with `orders:read`, as frontend's sidecar would attach.
async fn frontend_token(ca: &Ca, cert_dir: &Path) -> String {
    let out = ca.token(cert_dir, "orders:read", &[]).await;
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The policy leaves `/healthz` open and gives frontend only `orders:read`; `POST /orders`
/// needs `orders:write`. No spelling of a path may get a request past a rule, and the app
/// receives exactly the path the rule was decided on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_never_get_past_a_route_rule() {
    let s = shop(&[]).await;
    let proxy = s.frontend.outbound;

    // Through A's outbound (A holds orders:read): dot segments and their encoded forms are
    // resolved before the rule, so POST /healthz/../orders is POST /orders and needs write.
    for path in [
        "/healthz/../orders",
        "/healthz/%2e%2e/orders",
        "/healthz/%2E%2e/orders",
        "/healthz/.%2e/orders",
        "/healthz/./../orders",
        "//healthz/..//orders",
    ] {
        let r = via_proxy(proxy, "POST", &format!("http://orders{path}"), &[]);
        assert_eq!(r.status, 403, "POST {path}: {}", r.body);
        assert!(
            r.headers.contains(r#"error="insufficient_scope""#),
            "POST {path}: {}",
            r.headers
        );
    }
    // A GET in those spellings is allowed (orders:read) and the app sees the canonical path.
    for (path, seen) in [
        ("/healthz/../orders", "/orders"),
        ("/healthz/%2e%2e/orders/7", "/orders/7"),
        ("//orders//7/./", "/orders/7/"),
        ("/%6frders?x=%2F..&y=1", "/orders?x=%2F..&y=1"),
    ] {
        let r = via_proxy(proxy, "GET", &format!("http://orders{path}"), &[]);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        assert_eq!(r.json()["target"], seen, "GET {path}");
    }
    // Spellings whose meaning depends on the reader: 400 before any rule, the app sees nothing.
    for (path, says) in [
        ("/healthz/..%2forders", "encoded '/'"),
        ("/healthz/..%2Forders", "encoded '/'"),
        ("/healthz%5c..%5corders", "encoded '/' or '\\'"),
        ("/../orders", "above the root"),
        ("/healthz/../../orders", "above the root"),
        ("/orders%00", "control character"),
        ("/healthz/..;/orders", "holds ';'"),
        ("/admin;x/orders", "holds ';'"),
        ("/healthz/%252e%252e/orders", "double-encoded"),
        ("/healthz/%c0%ae%c0%ae/orders", "not UTF-8"),
        ("/orders%zz", "malformed percent-escape"),
    ] {
        let r = via_proxy(proxy, "POST", &format!("http://orders{path}"), &[]);
        assert_eq!(r.status, 400, "POST {path}: {}", r.body);
        assert!(r.body.contains(says), "POST {path}: {}", r.body);
        assert!(
            r.body.starts_with("meshid: "),
            "answered by the sidecar: {}",
            r.body
        );
    }

    // Straight at B's inbound with A's certificate and no token: the open /healthz prefix
    // does not cover a path that resolves elsewhere.
    let cert = Some(s.frontend.cert_dir.as_path());
    for path in [
        "/healthz/../orders",
        "/healthz/%2e%2e/orders",
        "//healthz/..//orders",
    ] {
        let r = direct(s.orders.inbound, cert, path, &[]).unwrap();
        assert_eq!(r.status, 401, "GET {path} without a token: {}", r.body);
    }
    let r = direct(s.orders.inbound, cert, "/healthz/./", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["target"], "/healthz/");
    // ... and with A's token: read is allowed on the canonical path, write is not.
    let auth = format!(
        "Authorization: Bearer {}",
        frontend_token(&s.ca, &s.frontend.cert_dir).await
    );
    let r = direct(
        s.orders.inbound,
        cert,
        "/healthz/%2e%2e/orders/./7",
        &[&auth],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["target"], "/orders/7");
    let r = direct_as(
        s.orders.inbound,
        cert,
        "POST",
        "/healthz/../orders",
        &[&auth],
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    let r = direct_as(
        s.orders.inbound,
        cert,
        "POST",
        "/healthz%2F..%2Forders",
        &[&auth],
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let (_, metrics) = s.orders.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains(r#"direction="inbound",outcome="bad_path"}"#)
            && !metrics.contains(r#"direction="inbound",outcome="bad_path"} 0"#),
        "{metrics}"
    );
}

/// B's own inbound removes caller copies of the identity headers (not only A's outbound):
/// a real caller with a real token cannot claim to be someone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_removes_forged_identity_headers_itself() {
    let s = shop(&[]).await;
    let auth = format!(
        "Authorization: Bearer {}",
        frontend_token(&s.ca, &s.frontend.cert_dir).await
    );
    let r = direct(
        s.orders.inbound,
        Some(&s.frontend.cert_dir),
        "/orders",
        &[
            &auth,
            "x-meshid-peer: spiffe://cluster.local/ns/kube-system/sa/admin",
            "X-Meshid-Scopes: orders:write",
            // CGI/WSGI servers read these as X-Meshid-Peer / X-Meshid-Scopes.
            "x_meshid_peer: spiffe://cluster.local/ns/kube-system/sa/admin",
            "X_MESHID_SCOPES: orders:write",
            // Headers some frameworks serve another path or method by.
            "X-Original-URL: /admin",
            "X-Rewrite-URL: /admin",
            "X_Original_URL: /admin",
            "X-HTTP-Method-Override: DELETE",
            "X-Method-Override: DELETE",
        ],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = r.json();
    assert_eq!(seen["peer"], serde_json::json!([FRONTEND]));
    assert_eq!(seen["scopes"], serde_json::json!(["orders:read"]));
    assert_eq!(
        seen["authorization"], false,
        "the token stops at the sidecar"
    );
    let names: Vec<String> = seen["header_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    assert!(names.iter().any(|n| n == "x-meshid-peer"), "{names:?}");
    for forbidden in [
        "x_meshid_peer",
        "x_meshid_scopes",
        "x-original-url",
        "x_original_url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-method-override",
    ] {
        assert!(
            !names.iter().any(|n| n == forbidden),
            "{forbidden} reached the app: {names:?}"
        );
    }
    // A HEAD cannot slip past the GET rule to a more open one: it needs the token too.
    let r = direct_as(
        s.orders.inbound,
        Some(&s.frontend.cert_dir),
        "HEAD",
        "/orders",
        &[],
    );
    assert_eq!(r.unwrap().status, 401);
}

/// A TLS client for the tests: verifies the server as a SPIFFE ID of the trust domain and
/// presents the SVID in `client` when given.
pub(crate) async fn tls(
    addr: SocketAddr,
    bundle: &Path,
    client: Option<&Path>,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    try_tls(addr, bundle, client, alpn)
        .await
        .unwrap_or_else(|e| panic!("TLS to {addr}: {e}"))
}

/// [`tls`], or why the connection or handshake failed.
pub(crate) async fn try_tls(
    addr: SocketAddr,
    bundle: &Path,
    client: Option<&Path>,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let td = TrustDomain::parse("cluster.local").unwrap();
    let bundle = TrustBundle::from_pem(td.clone(), &std::fs::read(bundle).unwrap()).unwrap();
    let verifier = SpiffeVerifier::new(
        TrustSource::new(bundle).unwrap(),
        PeerRule::InTrustDomain(td),
    );
    let builder = rustls::ClientConfig::builder_with_provider(meshid_proto::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client {
        Some(dir) => {
            let chain =
                meshid_proto::pem::decode_certs(&std::fs::read(dir.join("svid.pem")).unwrap())
                    .unwrap();
            let key =
                rustls_pki_types::PrivateKeyDer::from_pem_file(dir.join("svid_key.pem")).unwrap();
            builder.with_client_cert_resolver(CertSlot::new(
                meshid_proto::tls::certified_key(chain, key).unwrap(),
            ))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Trickle `head` one byte every 100 ms for at most 8 s; how long until the server closed.
async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, head: &[u8]) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    for b in head.iter().cycle() {
        if started.elapsed() > Duration::from_secs(8) {
            return None;
        }
        if s.write_all(&[*b]).await.is_err() || s.flush().await.is_err() {
            return Some(started.elapsed());
        }
        // Closed by the server: a read that ends (or fails) at once.
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            _ => {}
        }
    }
    None
}

/// A connection that sends nothing at all; how long until the server closed it.
async fn silent(addr: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(8), tcp.read(&mut buf)).await {
        Ok(_) => Some(started.elapsed()),
        Err(_) => None,
    }
}

fn cut_off_in_time(port: &str, closed: Option<Duration>) {
    let closed = closed.unwrap_or_else(|| panic!("{port}: the slow client was never cut off"));
    // Timeouts of 1 s here; a little slack for a loaded machine.
    assert!(
        closed < Duration::from_millis(3500),
        "{port}: cut off only after {closed:?}"
    );
}

/// A slowloris client (TLS completed or not, then a request head one byte at a time) is cut
/// off within the timeout on every port of the CA and the sidecar, while others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_on_every_port_while_others_are_served() {
    set_child_env(&[
        ("MESHID_HANDSHAKE_TIMEOUT", "1s"),
        ("MESHID_HEADER_READ_TIMEOUT", "1s"),
    ]);
    let s = shop(&[]).await;
    let bundle = s.ca.bundle_file().await;
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let h2_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let frontend = Some(s.frontend.cert_dir.as_path());

    // Several at once, so that the well-behaved calls below run while they are held.
    let mut held = tokio::task::JoinSet::new();
    let plain = [
        ("CA admin", s.ca.admin_addr),
        ("sidecar outbound", s.frontend.outbound),
        ("sidecar admin", s.orders.admin),
    ];
    for (port, addr) in plain {
        held.spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            (port, "slow request head", trickle(tcp, head).await)
        });
    }
    for (port, addr) in [
        ("CA gRPC", s.ca.addr),
        ("CA HTTPS", s.ca.http_addr),
        ("sidecar inbound", s.orders.inbound),
    ] {
        held.spawn(async move { (port, "no TLS handshake", silent(addr).await) });
    }
    {
        let (addr, bundle) = (s.ca.addr, bundle.clone());
        held.spawn(async move {
            let t = tls(addr, &bundle, None, b"h2").await;
            (
                "CA gRPC",
                "slow HTTP/2 preface",
                trickle(t, h2_preface).await,
            )
        });
    }
    {
        let (addr, bundle) = (s.ca.http_addr, bundle.clone());
        held.spawn(async move {
            let t = tls(addr, &bundle, None, b"http/1.1").await;
            ("CA HTTPS", "slow request head", trickle(t, head).await)
        });
    }
    {
        let (addr, bundle, cert) = (
            s.orders.inbound,
            bundle.clone(),
            s.frontend.cert_dir.clone(),
        );
        held.spawn(async move {
            let t = tls(addr, &bundle, Some(&cert), b"http/1.1").await;
            (
                "sidecar inbound",
                "slow request head",
                trickle(t, head).await,
            )
        });
    }
    // Well-behaved clients are served meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.orders.admin_get("/ready").await.unwrap().0, 200);
    assert_eq!(
        direct(s.orders.inbound, frontend, "/healthz", &[])
            .unwrap()
            .status,
        200
    );

    let mut seen = 0;
    while let Some(r) = held.join_next().await {
        let (port, how, closed) = r.unwrap();
        cut_off_in_time(&format!("{port} ({how})"), closed);
        seen += 1;
    }
    assert_eq!(seen, 9);
    // Operators see what the bounds did, per listener.
    let counted = |metrics: &str, listener: &str, outcome: &str| {
        let want = format!(
            "meshid_listener_connections_total{{listener=\"{listener}\",outcome=\"{outcome}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(want.as_str()))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {want} in {metrics}"))
    };
    let (_, orders) = s.orders.admin_get("/metrics").await.unwrap();
    assert!(
        counted(&orders, "inbound", "header_timeout") >= 1,
        "{orders}"
    );
    assert!(
        counted(&orders, "inbound", "handshake_timeout") >= 1,
        "{orders}"
    );
    assert!(counted(&orders, "admin", "header_timeout") >= 1, "{orders}");
    let (_, ca) = crate::support::http_get(s.ca.admin_addr, "/metrics")
        .await
        .unwrap();
    assert!(counted(&ca, "ca-grpc", "header_timeout") >= 1, "{ca}");
    assert!(counted(&ca, "ca-https", "handshake_timeout") >= 1, "{ca}");
    // And served after.
    let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
}

/// WatchDirectory lists every service, SPIFFE ID, route and grant: an anonymous caller who
/// can reach the CA learns nothing from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_is_only_for_workloads_with_an_svid() {
    let s = shop(&[]).await;
    let bundle = s.ca.bundle_file().await;
    let td = TrustDomain::parse("cluster.local").unwrap();
    let bundle = TrustBundle::from_pem(td, &std::fs::read(bundle).unwrap()).unwrap();
    let mut anonymous = meshid::identity::client::CaClient::new(&s.ca.addr(), bundle)
        .unwrap()
        .connect(None)
        .await
        .unwrap();
    let err = anonymous
        .watch_directory(pb::WatchDirectoryRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("SVID"), "{}", err.message());
    // The sidecars, which present their SVIDs, have it.
    let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
}

/// SIGTERM (what Kubernetes sends) stops a CA within seconds even while every sidecar holds
/// watch streams open; the sidecars reconnect to its successor and the mesh keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_told_to_stop_exits_within_seconds_and_sidecars_reconnect() {
    let mut s = shop(&["--drain-timeout", "2s"]).await;
    // A's sidecar holds a token for B from this call on.
    let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let (addr, http_addr) = (s.ca.addr, s.ca.http_addr);
    let started = Instant::now();
    s.ca.terminate();
    let status = s.ca.exited_within(Duration::from_secs(6)).await;
    let took = started.elapsed();
    assert!(
        status.is_some_and(|st| st.success()),
        "CA still running (or failed) {took:?} after SIGTERM: {status:?}\n{}",
        s.ca.log()
    );
    assert!(s.ca.log().contains("CA stopped"), "{}", s.ca.log());
    // Traffic flows while the CA is away (identities, tokens and the directory are held).
    let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    // A successor on the same data directory and address: the streams come back.
    let work = s.ca.work.clone();
    let data = s.ca.data_dir.clone();
    let policy = work.join("policy.yaml");
    let next = Ca::start_on(
        data,
        work,
        addr,
        http_addr,
        &["--policy", policy.to_str().unwrap()],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = s.orders.log();
        if log.matches("service directory updated").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "B never reconnected: {log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        s.orders
            .log()
            .contains("stream ended by the CA; reconnecting"),
        "{}",
        s.orders.log()
    );
    let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    drop(next);
}

/// SIGTERM to a sidecar: the request in flight finishes, then the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_told_to_stop_finishes_requests_in_flight_then_exits() {
    let mut s = shop(&[]).await;
    let proxy = s.frontend.outbound;
    let in_flight = tokio::task::spawn_blocking(move || {
        via_proxy(proxy, "GET", "http://orders/orders?sleep_ms=1500", &[])
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    s.orders.terminate();
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "the call in flight completes: {}", r.body);
    let status = s.orders.exited_within(Duration::from_secs(8)).await;
    assert!(
        status.is_some_and(|st| st.success()),
        "sidecar still running {:?} after SIGTERM: {}",
        started.elapsed(),
        s.orders.log()
    );
    assert!(
        s.orders.log().contains("sidecar stopped"),
        "{}",
        s.orders.log()
    );
}

/// A callee started fresh under traffic answers its very first burst of concurrent calls:
/// it holds the issuer's JWKS before it says ready, and concurrent verifications share one
/// fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_callee_serves_its_first_burst_of_concurrent_calls() {
    let s = shop(&[]).await;
    let (_, ready) = s.orders.admin_get("/ready").await.unwrap();
    assert_eq!(ready.trim(), "ready");
    let proxy = s.frontend.outbound;
    let burst: Vec<_> = (0..24)
        .map(|i| {
            tokio::task::spawn_blocking(move || {
                via_proxy(proxy, "GET", &format!("http://orders/orders/{i}"), &[])
            })
        })
        .collect();
    for b in burst {
        let r = b.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(
        !s.orders.log().contains("not in the issuer's JWKS"),
        "{}",
        s.orders.log()
    );
}

/// Every span exported over OTLP, as text (names, attributes, events).
type Exported = Arc<std::sync::Mutex<String>>;

struct TextCollector(Exported);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for TextCollector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let text = format!("{:?}", request.into_inner());
        self.0.lock().unwrap().push_str(&text);
        Ok(tonic::Response::new(
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse {
                partial_success: None,
            },
        ))
    }
}

/// The base64 lines of every private key under `dir` (PEM files), the parts that would show
/// if a key leaked.
fn key_lines(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            key_lines(&path, out);
        } else if let Ok(text) = std::fs::read_to_string(&path)
            && text.contains("PRIVATE KEY-----")
        {
            out.extend(
                text.lines()
                    .filter(|l| !l.starts_with("-----") && l.len() >= 32)
                    .map(str::to_owned),
            );
        }
    }
}

/// One session with debug logging on the CA and both sidecars and OTLP export to a collector:
/// no join token, Kubernetes token, access token or private key used in it appears in any
/// log line, span or audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_a_span_or_the_audit_log() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let exported: Exported = Arc::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
                    TextCollector(exported.clone()),
                ),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    set_child_env(&[
        ("MESHID_LOG", "debug"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{otlp}")),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let mut s = shop(&[]).await;
    let mut secrets = vec![
        s.frontend.token.clone(),
        s.orders.token.clone(),
        s.reports.token.clone(),
    ];

    // Calls that carry every kind of secret: the sidecars' own tokens, a query the app may
    // treat as secret, an access token presented directly, a refused and a spent join token,
    // a Kubernetes token the CA refuses.
    let r = via_proxy(
        s.frontend.outbound,
        "GET",
        "http://orders/orders?api_key=QUERY-SECRET-7f3a",
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["target"], "/orders?api_key=QUERY-SECRET-7f3a");
    let access = frontend_token(&s.ca, &s.frontend.cert_dir).await;
    let auth = format!("Authorization: Bearer {access}");
    assert_eq!(
        direct(
            s.orders.inbound,
            Some(&s.frontend.cert_dir),
            "/orders",
            &[&auth]
        )
        .unwrap()
        .status,
        200
    );
    let mut forged = access.clone();
    forged.replace_range(forged.len() - 4.., "AAAA");
    let r = direct(
        s.orders.inbound,
        Some(&s.frontend.cert_dir),
        "/orders",
        &[&format!("Authorization: Bearer {forged}")],
    )
    .unwrap();
    assert_eq!(r.status, 401);
    let once = s.ca.join_token(FRONTEND, &[]).await;
    let (out, _) = s.ca.fetch(&once, "once").await;
    assert!(out.status.success());
    let (out, _) = s.ca.fetch(&once, "replayed").await;
    assert!(!out.status.success(), "a spent join token is refused");
    let unknown = "mjt.UNKNOWN-SECRET-0123456789abcdef0123456789abcdef";
    let (out, _) = s.ca.fetch(unknown, "unknown").await;
    assert!(!out.status.success());
    let k8s_token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6c2hvcDpvcmRlcnMifQ.K8S-SECRET-SIGNATURE";
    let k8s_file = s.ca.work.join("k8s-token");
    std::fs::write(&k8s_file, k8s_token).unwrap();
    let bundle = s.ca.bundle_file().await;
    let out = crate::support::run(&[
        "svid",
        "fetch",
        "--ca",
        &s.ca.addr(),
        "--ca-bundle",
        bundle.to_str().unwrap(),
        "--k8s-token-file",
        k8s_file.to_str().unwrap(),
        "--out",
        s.ca.work.join("k8s").to_str().unwrap(),
        "--timeout",
        "2s",
    ])
    .await;
    assert!(
        !out.status.success(),
        "Kubernetes attestation is not configured here"
    );
    secrets.extend([
        access.clone(),
        forged,
        once,
        unknown.to_owned(),
        k8s_token.to_owned(),
        "QUERY-SECRET-7f3a".to_owned(),
    ]);

    // Stop everything (spans are flushed at exit), then read what they left behind.
    for sc in [&s.frontend, &s.orders, &s.reports] {
        sc.terminate();
    }
    s.ca.terminate();
    assert!(s.ca.exited_within(Duration::from_secs(8)).await.is_some());
    for sc in [&mut s.frontend, &mut s.orders, &mut s.reports] {
        assert!(sc.exited_within(Duration::from_secs(8)).await.is_some());
    }
    let mut keys = Vec::new();
    key_lines(&s.ca.work, &mut keys);
    assert!(
        keys.len() > 20,
        "the test found the keys it must look for: {}",
        keys.len()
    );

    let logs = [
        ("CA log", s.ca.log()),
        ("frontend sidecar log", s.frontend.log()),
        ("orders sidecar log", s.orders.log()),
        ("reports sidecar log", s.reports.log()),
        (
            "audit log",
            std::fs::read_to_string(s.ca.data_dir.join("audit.log")).unwrap(),
        ),
        ("exported spans", exported.lock().unwrap().clone()),
    ];
    assert!(logs[0].1.contains("DEBUG"), "debug logging is on");
    assert!(
        logs[5].1.contains("\"inbound\"") && logs[5].1.contains("\"outbound\""),
        "spans were exported"
    );
    for (what, text) in &logs {
        assert!(!text.is_empty(), "{what} is empty");
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{what} holds a secret: {secret}"
            );
        }
        for line in &keys {
            assert!(
                !text.contains(line.as_str()),
                "{what} holds private key material"
            );
        }
        assert!(
            !text.contains("PRIVATE KEY"),
            "{what} mentions a private key PEM"
        );
        // Any JWT at all (header.payload of a token we did not think of).
        let jwt_like = text.match_indices("eyJ").any(|(i, _)| {
            text[i..]
                .split(|c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c)))
                .next()
                .is_some_and(|t| t.matches('.').count() >= 2 && t.len() > 60)
        });
        assert!(!jwt_like, "{what} holds something shaped like a JWT");
    }
}

/// A scoped call keeps working while the CA is away for longer than the point where the
/// token should be refreshed: the failed refresh keeps the token in use until shortly before
/// it expires. Lifetimes are scaled down here (15 s tokens: refreshed after 5 s, in use until
/// 13.5 s); the default-settings figure is the unit test
/// `with_default_tokens_a_ca_outage_of_over_six_minutes_costs_no_call`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_calls_outlive_a_failed_token_refresh_during_a_ca_outage() {
    let s = shop(&["--token-ttl", "15s"]).await;
    let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let fetched = Instant::now();
    let granted = |audit: Vec<serde_json::Value>| {
        audit
            .iter()
            .filter(|l| l["event"] == "token_grant" && l["outcome"] == "granted")
            .count()
    };
    let before = granted(s.ca.audit());
    let (addr, http_addr, work) = (s.ca.addr, s.ca.http_addr, s.ca.work.clone());
    let (data_dir, tmp) = s.ca.stop().await;
    // Past the refresh point (5 s) and well into the token's last third.
    let mut calls = 0;
    while fetched.elapsed() < Duration::from_secs(11) {
        let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]);
        assert_eq!(
            r.status,
            200,
            "call {calls} failed {:?} into the outage: {}\n{}",
            fetched.elapsed(),
            r.body,
            s.frontend.log()
        );
        calls += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        s.frontend.log().contains("the current token stays in use"),
        "a refresh was tried and failed: {}",
        s.frontend.log()
    );
    // The CA comes back: a new token is fetched and calls go on.
    let policy = work.join("policy.yaml");
    let ca = Ca::start_on(
        data_dir,
        work,
        addr,
        http_addr,
        &["--token-ttl", "15s", "--policy", policy.to_str().unwrap()],
    )
    .await
    .owning(tmp.unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        if granted(ca.audit()) > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new token after the CA returned"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Clients without a certificate have a connection quota of their own on the CA (a tenth of
/// `--max-connections`, at least 64): a flood of them cannot take the slots that renewals and
/// watch streams of the mesh's workloads need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_connections_cannot_take_the_slots_workloads_need() {
    let s = shop(&["--max-connections", "200"]).await;
    let token = s.ca.join_token(FRONTEND, &[]).await;
    let (out, dir) = s.ca.fetch(&token, "spare").await;
    assert!(out.status.success());
    let bundle = s.ca.bundle_file().await;
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(tls(s.ca.addr, &bundle, None, b"h2").await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut open = 0;
    for t in &mut held {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(50), t.read(&mut buf)).await {
            Err(_) => open += 1,
            Ok(Ok(n)) if n > 0 => open += 1, // the server's HTTP/2 settings, not a close
            Ok(_) => {}
        }
    }
    assert_eq!(open, 64, "anonymous connections held");
    // An authenticated renewal is served meanwhile.
    let out = crate::support::run(&[
        "svid",
        "renew",
        "--ca",
        &s.ca.addr(),
        "--cert-dir",
        dir.to_str().unwrap(),
    ])
    .await;
    assert!(
        out.status.success(),
        "renewal refused during the flood: {}",
        crate::support::stderr(&out)
    );
    let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
}
