//! The mesh end to end: a CA, sidecars for frontend (A) and orders (B), tiny HTTP apps, all on
//! loopback. A's app calls B by name through its sidecar with plain HTTP; B's sidecar checks
//! the caller, the route, the token and its binding before B's app sees anything.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Ca, Sidecar, SidecarPorts, echo_app, set_child_env};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const BILLING: &str = "spiffe://cluster.local/ns/shop/sa/billing";
const REPORTS: &str = "spiffe://cluster.local/ns/shop/sa/reports";

pub(crate) const POLICY: &str = "\
trust_domain: cluster.local
services:
  orders:
    id: spiffe://cluster.local/ns/shop/sa/orders
    scopes: [orders:read, orders:write]
    routes:
      - { method: GET,  path: /orders, scope: orders:read }
      - { method: POST, path: /orders, scope: orders:write }
      - { path: /healthz }
    callers:
      frontend: [orders:read]
      billing:  [orders:read]
  frontend:
    id: spiffe://cluster.local/ns/shop/sa/frontend
  billing:
    id: spiffe://cluster.local/ns/shop/sa/billing
  reports:
    id: spiffe://cluster.local/ns/shop/sa/reports
";

pub(crate) struct Shop {
    pub ca: Ca,
    pub frontend: Sidecar,
    pub orders: Sidecar,
    pub reports: Sidecar,
}

pub(crate) async fn shop(ca_args: &[&str]) -> Shop {
    shop_with(POLICY, ca_args, &[]).await
}

/// [`shop`] with another policy (written to `policy.yaml` in the CA's work directory), and
/// more flags for the orders sidecar.
pub(crate) async fn shop_with(policy_text: &str, ca_args: &[&str], orders_args: &[&str]) -> Shop {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("policy.yaml");
    std::fs::write(&policy, policy_text).unwrap();
    let mut args = vec!["--policy", policy.to_str().unwrap()];
    args.extend_from_slice(ca_args);
    let ca = Ca::start_in(tmp.path().join("ca"), tmp.path().to_path_buf(), &args)
        .await
        .owning(tmp);
    let (orders_ports, frontend_ports, reports_ports) = (
        SidecarPorts::new(),
        SidecarPorts::new(),
        SidecarPorts::new(),
    );
    let route = vec![format!("orders={}", orders_ports.inbound)];
    let mut orders = Sidecar::start_with(
        &ca,
        "orders",
        ORDERS,
        echo_app().await,
        orders_ports,
        &[],
        orders_args,
    )
    .await;
    let mut frontend = Sidecar::start(
        &ca,
        "frontend",
        FRONTEND,
        echo_app().await,
        frontend_ports,
        &route,
    )
    .await;
    let mut reports = Sidecar::start(
        &ca,
        "reports",
        REPORTS,
        echo_app().await,
        reports_ports,
        &route,
    )
    .await;
    orders.ready().await;
    frontend.ready().await;
    reports.ready().await;
    Shop {
        ca,
        frontend,
        orders,
        reports,
    }
}

#[derive(Debug)]
pub(crate) struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|_| panic!("not JSON ({}): {}", self.status, self.body))
    }
}

/// The app's view: plain HTTP through its sidecar's outbound proxy (HTTP_PROXY style).
pub(crate) fn via_proxy(proxy: SocketAddr, method: &str, url: &str, headers: &[&str]) -> Reply {
    let mut cmd = Command::new("curl");
    // --path-as-is: the path goes out exactly as written (path-trick tests depend on it).
    cmd.args([
        "-sS",
        "--path-as-is",
        "-D",
        "-",
        "-X",
        method,
        "-x",
        &format!("http://{proxy}"),
        url,
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    reply(cmd)
}

fn reply(mut cmd: Command) -> Reply {
    let out = cmd.stdin(Stdio::null()).output().expect("curl runs");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    reply_from(&out.stdout)
}

/// A client talking TLS straight to a sidecar's inbound port, with the given identity (or none).
pub(crate) fn direct(
    inbound: SocketAddr,
    cert_dir: Option<&Path>,
    path: &str,
    headers: &[&str],
) -> Result<Reply, String> {
    direct_as(inbound, cert_dir, "GET", path, headers)
}

/// [`direct`] with another method.
pub(crate) fn direct_as(
    inbound: SocketAddr,
    cert_dir: Option<&Path>,
    method: &str,
    path: &str,
    headers: &[&str],
) -> Result<Reply, String> {
    let mut cmd = Command::new("curl");
    if method == "HEAD" {
        // -X HEAD would wait for the body its Content-Length announces.
        cmd.arg("-I");
    } else {
        cmd.args(["-X", method]);
    }
    // -k: this client does not check the server (URI-SAN only); the server checks the client.
    cmd.args([
        "-sS",
        "-k",
        "--path-as-is",
        "-D",
        "-",
        &format!("https://{inbound}{path}"),
    ]);
    if let Some(dir) = cert_dir {
        cmd.arg("--cert")
            .arg(dir.join("svid.pem"))
            .arg("--key")
            .arg(dir.join("svid_key.pem"));
    }
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.stdin(Stdio::null()).output().expect("curl runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(reply_from(&out.stdout))
}

fn reply_from(stdout: &[u8]) -> Reply {
    let mut text = String::from_utf8_lossy(stdout).into_owned();
    // Skip interim responses (curl sends Expect: 100-continue with a large body).
    while text.starts_with("HTTP/1.1 1") {
        text = text
            .split_once("\r\n\r\n")
            .map(|(_, rest)| rest.to_owned())
            .unwrap_or_default();
    }
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Reply {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_b_by_name_and_b_sees_who_called_with_which_scopes() {
    // These sidecars run on two threads (--workers); the other mesh tests use the default one.
    set_child_env(&[("MESHID_WORKERS", "2")]);
    let s = shop(&[]).await;
    let r = via_proxy(
        s.frontend.outbound,
        "GET",
        "http://orders/orders?id=7",
        &[
            "x-meshid-peer: spiffe://cluster.local/ns/kube-system/sa/admin",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = r.json();
    assert_eq!(
        seen["peer"],
        serde_json::json!([FRONTEND]),
        "B sees A's real identity, and only it"
    );
    assert_eq!(seen["scopes"], serde_json::json!(["orders:read"]));
    assert_eq!(
        seen["authorization"], false,
        "the token stops at B's sidecar"
    );
    assert_eq!(seen["path"], "/orders");
    assert_eq!(
        seen["traceparent"],
        serde_json::json!(["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]),
        "W3C trace context passes through"
    );

    // Host-header routing works too (an app that does not use absolute-form).
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-D",
        "-",
        "-H",
        "Host: orders",
        &format!("http://{}/orders", s.frontend.outbound),
    ]);
    let r = reply(cmd);
    assert_eq!(r.status, 200, "{}", r.body);

    // A request body streams through both sidecars.
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-D",
        "-",
        "-x",
        &format!("http://{}", s.frontend.outbound),
        "-X",
        "GET",
        "--data-binary",
        "@-",
        "http://orders/orders",
    ]);
    let big = vec![b'x'; 3 * 1024 * 1024];
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&big).unwrap();
    let out = child.wait_with_output().unwrap();
    let r = reply_from(&out.stdout);
    assert_eq!(r.json()["body_bytes"], big.len());

    // A scope frontend does not hold: 403 insufficient_scope. A path no route covers: 403.
    let r = via_proxy(s.frontend.outbound, "POST", "http://orders/orders", &[]);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.headers
            .contains(r#"www-authenticate: bearer realm="meshid", error="insufficient_scope""#),
        "{}",
        r.headers
    );
    assert!(
        r.headers.contains(r#"scope="orders:write""#),
        "{}",
        r.headers
    );
    let r = via_proxy(s.frontend.outbound, "GET", "http://orders/admin", &[]);
    assert_eq!(r.status, 403);
    assert!(r.body.contains("no route"), "{}", r.body);

    // A caller the policy does not name.
    let r = via_proxy(s.reports.outbound, "GET", "http://orders/healthz", &[]);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.body.contains(&format!("{REPORTS} may not call orders")),
        "{}",
        r.body
    );

    // An unknown service is refused by A's own sidecar.
    let r = via_proxy(s.frontend.outbound, "GET", "http://nosuch/", &[]);
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(
        r.body.trim_end(),
        "meshid: the request names no service of the mesh directory"
    );

    let (_, metrics) = s.orders.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains(r#"meshid_requests_total{direction="inbound",outcome="allowed"} "#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"outcome="caller_not_allowed"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"outcome="insufficient_scope"} 1"#),
        "{metrics}"
    );
    let expiry: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("meshid_svid_expiry_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (3000..=3600).contains(&expiry),
        "seconds to SVID expiry: {expiry}"
    );
    let (_, front) = s.frontend.admin_get("/metrics").await.unwrap();
    assert!(front.contains("meshid_token_cache_hits_total "), "{front}");
    let hits: u64 = front
        .lines()
        .find_map(|l| l.strip_prefix("meshid_token_cache_hits_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(hits >= 2, "later calls reuse the cached token: {front}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_refuses_what_does_not_come_through_the_mesh() {
    let s = shop(&[]).await;
    let orders = s.orders.inbound;

    // B's count of refused TLS handshakes, once it reaches `want` (B counts a refusal just
    // after sending its alert, so curl may be back a moment earlier).
    async fn tls_refused_reaches(orders: &Sidecar, want: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, m) = orders.admin_get("/metrics").await.unwrap();
            let n = m
                .lines()
                .find_map(|l| {
                    l.strip_prefix(
                        r#"meshid_requests_total{direction="inbound",outcome="tls_refused"} "#,
                    )
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if n >= want || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // curl's exit for a TLS session the server ended: 35 (handshake), 55/56 (send/receive
    // after B's alert). Not 7 (nothing listening) or 28 (timeout).
    let tls_failure = |err: &str| {
        ["curl: (35)", "curl: (55)", "curl: (56)"]
            .iter()
            .any(|c| err.starts_with(c))
    };

    // No client certificate: the TLS handshake fails, and B counts a TLS refusal.
    let err = direct(orders, None, "/healthz", &[]).expect_err("no client certificate, no entry");
    assert!(tls_failure(&err), "{err}");
    assert_eq!(tls_refused_reaches(&s.orders, 1).await, 1, "{err}");

    // A certificate from another CA: refused at the handshake too.
    let other = Ca::start(&[]).await;
    let token = other.join_token(FRONTEND, &[]).await;
    let (out, foreign) = other.fetch(&token, "foreign").await;
    assert!(out.status.success());
    let err = direct(orders, Some(&foreign), "/healthz", &[])
        .expect_err("a foreign CA's SVID must not get in");
    assert!(tls_failure(&err), "{err}");
    assert_eq!(tls_refused_reaches(&s.orders, 2).await, 2, "{err}");

    // A valid certificate of an allowed caller, but no token: 401.
    let r = direct(orders, Some(&s.frontend.cert_dir), "/orders", &[]).unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.headers
            .contains(r#"www-authenticate: bearer realm="meshid""#),
        "{}",
        r.headers
    );
    // /healthz needs no token, mTLS only.
    assert_eq!(
        direct(orders, Some(&s.frontend.cert_dir), "/healthz", &[])
            .unwrap()
            .status,
        200
    );

    // A's token replayed over a third identity's connection: the binding does not match.
    let billing_token = s.ca.join_token(BILLING, &[]).await;
    let (out, billing) = s.ca.fetch(&billing_token, "billing").await;
    assert!(out.status.success());
    let out = s.ca.token(&s.frontend.cert_dir, "orders:read", &[]).await;
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let stolen = String::from_utf8(out.stdout).unwrap();
    let auth = format!("Authorization: Bearer {}", stolen.trim());
    let r = direct(orders, Some(&billing), "/orders", &[&auth]).unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.headers.contains(r#"error="invalid_token""#),
        "{}",
        r.headers
    );
    assert!(
        r.body.contains("bound to another certificate"),
        "{}",
        r.body
    );
    // The same token from its owner works, so the refusal above was the binding alone.
    assert_eq!(
        direct(orders, Some(&s.frontend.cert_dir), "/orders", &[&auth])
            .unwrap()
            .status,
        200
    );

    // A tampered token: 401 invalid_token.
    let mut forged = stolen.trim().to_owned();
    forged.replace_range(forged.len() - 4.., "AAAA");
    let r = direct(
        orders,
        Some(&s.frontend.cert_dir),
        "/orders",
        &[&format!("Authorization: Bearer {forged}")],
    )
    .unwrap();
    assert_eq!(r.status, 401);
    assert!(
        r.headers.contains(r#"error="invalid_token""#),
        "{}",
        r.headers
    );
    assert!(s.orders.log().contains("refused"), "refusals are logged");
    let (_, metrics) = s.orders.admin_get("/metrics").await.unwrap();
    for outcome in [
        "tls_refused",
        "no_token",
        "token_cnf_mismatch",
        "invalid_token",
    ] {
        assert!(
            metrics.contains(&format!(r#"direction="inbound",outcome="{outcome}"}}"#)),
            "{outcome}: {metrics}"
        );
    }
}

/// The serial of the certificate a sidecar's inbound port presents to a new connection.
fn served_serial(inbound: SocketAddr, client: &Path) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &inbound.to_string(), "-cert"])
        .arg(client.join("svid.pem"))
        .arg("-key")
        .arg(client.join("svid_key.pem"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a server certificate");
    let end = text.find("-----END CERTIFICATE-----").unwrap() + 25;
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text[start..end].as_bytes())
        .unwrap();
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout)
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_cert_files_serve_new_connections_and_open_ones_keep_working() {
    let s = shop(&[]).await;
    // An open keep-alive connection through A's sidecar to B.
    let keepalive = KeepAlive::open(s.frontend.outbound).await;
    assert_eq!(keepalive.get("http://orders/healthz").await, 200);
    let before = served_serial(s.orders.inbound, &s.frontend.cert_dir);

    // cert-manager style: a new SVID for the same identity lands in B's cert directory.
    let token = s.ca.join_token(ORDERS, &[]).await;
    let (out, fresh) = s.ca.fetch(&token, "orders-new").await;
    assert!(out.status.success());
    let new_serial = {
        let pem = std::fs::read(fresh.join("svid.pem")).unwrap();
        let der = meshid_proto::pem::decode_certs(&pem).unwrap();
        meshid_proto::svid::inspect(&der[0])
            .unwrap()
            .serial
            .to_uppercase()
    };
    for f in ["svid_key.pem", "svid.pem"] {
        let tmp = s.orders.cert_dir.join(format!(".{f}.new"));
        std::fs::copy(fresh.join(f), &tmp).unwrap();
        std::fs::rename(&tmp, s.orders.cert_dir.join(f)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let started = Instant::now();
    loop {
        let now = served_serial(s.orders.inbound, &s.frontend.cert_dir);
        if now == format!("serial={new_serial}") {
            break;
        }
        assert_ne!(now, "", "no certificate served");
        assert!(
            Instant::now() < deadline,
            "still serving {now} (was {before}), want {new_serial}: {}",
            s.orders.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("replaced certificate served after {:?}", started.elapsed());
    assert_eq!(
        keepalive.get("http://orders/healthz").await,
        200,
        "the open connection keeps working"
    );
    assert_eq!(
        via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]).status,
        200
    );

    // A bad file is refused and the last good certificate stays.
    std::fs::write(s.orders.cert_dir.join("svid.pem"), "not a certificate").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s
        .orders
        .log()
        .contains("replaced certificate files refused")
    {
        assert!(
            Instant::now() < deadline,
            "no refusal logged: {}",
            s.orders.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        served_serial(s.orders.inbound, &s.frontend.cert_dir),
        format!("serial={new_serial}")
    );
    assert_eq!(
        via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]).status,
        200
    );
}

/// One HTTP/1.1 connection to a proxy, kept open across requests.
struct KeepAlive {
    sender: tokio::sync::Mutex<
        hyper::client::conn::http1::SendRequest<http_body_util::Empty<hyper::body::Bytes>>,
    >,
}

impl KeepAlive {
    async fn open(proxy: SocketAddr) -> Arc<Self> {
        let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        Arc::new(Self {
            sender: tokio::sync::Mutex::new(sender),
        })
    }

    async fn get(&self, url: &str) -> u16 {
        use http_body_util::BodyExt;
        let req = hyper::Request::get(url)
            .header("host", "orders")
            .body(http_body_util::Empty::new())
            .unwrap();
        let mut sender = self.sender.lock().await;
        let resp = sender
            .send_request(req)
            .await
            .expect("the kept-alive connection still works");
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        status
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_svid_and_the_mesh_survives_a_ca_outage() {
    // A CA with short SVIDs, so renewals happen within the test.
    let s = shop(&["--svid-ttl", "1m"]).await;
    assert_eq!(
        via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]).status,
        200
    );

    // The CA goes away: traffic keeps flowing on the current SVIDs and cached tokens.
    let late_token = s.ca.join_token(BILLING, &["--reusable"]).await;
    let (ca_addr, http_addr, work) = (s.ca.addr, s.ca.http_addr, s.ca.work.clone());
    let (data_dir, tmp) = s.ca.stop().await;
    assert_eq!(
        via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]).status,
        200
    );

    // A new sidecar started now is not ready: no SVID yet.
    let mut late = Sidecar::spawn(
        &ca_addr.to_string(),
        &work.join("bundle.pem"),
        &work,
        "late",
        &late_token,
        echo_app().await,
        SidecarPorts::new(),
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        if let Some((503, body)) = late.admin_get("/ready").await {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "/ready never answered 503: {}",
            late.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.contains("svid"), "{body}");
    assert_eq!(late.admin_get("/healthz").await.unwrap().0, 200);

    // The CA comes back on the same data directory and ports: renewals resume.
    let before = (renewals(&s.orders).await, renewals(&s.frontend).await);
    let policy = work.join("policy.yaml");
    let args = ["--svid-ttl", "1m", "--policy", policy.to_str().unwrap()];
    let ca = Ca::start_on(data_dir, work.clone(), ca_addr, http_addr, &args)
        .await
        .owning(tmp.unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while renewals(&s.orders).await <= before.0 || renewals(&s.frontend).await <= before.1 {
        assert!(
            Instant::now() < deadline,
            "no renewal within 60 s of the CA's return: {}",
            s.orders.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]);
    assert_eq!(
        r.status,
        200,
        "{}\n--- frontend:\n{}\n--- orders:\n{}",
        r.body,
        s.frontend.log(),
        s.orders.log()
    );
    // And the late sidecar gets its SVID and becomes ready by itself.
    late.ready().await;
    let audit = ca.audit();
    assert!(
        audit
            .iter()
            .any(|l| l["event"] == "x509_svid_renew" && l["spiffe_id"] == ORDERS)
    );
    drop(s.reports);
}

async fn renewals(s: &Sidecar) -> u64 {
    let (_, m) = s.admin_get("/metrics").await.unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix("meshid_svid_renewals_total "))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn bad_sidecar_flags_are_refused_with_what_and_why() {
    let ca = Ca::start(&[]).await;
    let bundle = ca.bundle_file().await;
    let token = ca.join_token(ORDERS, &["--reusable"]).await;
    let cert_dir = ca.work.join("flags-sidecar");
    let (addr, bundle, cert_dir) = (
        ca.addr(),
        bundle.to_str().unwrap().to_owned(),
        cert_dir.to_str().unwrap().to_owned(),
    );
    // Exit 2: clap's usage error; exit 1: refused once parsed.
    for (extra, says, code) in [
        (["--workers", "0"], "invalid value '0' for '--workers", 2),
        (
            ["--workers", "many"],
            "invalid value 'many' for '--workers",
            2,
        ),
        (
            ["--route", "orders"],
            r#"--route "orders" must be NAME=HOST:PORT"#,
            1,
        ),
    ] {
        let mut args = vec![
            "sidecar",
            "--ca",
            &addr,
            "--ca-bundle",
            &bundle,
            "--join-token",
            &token,
            "--cert-dir",
            &cert_dir,
            "--app",
            "127.0.0.1:9",
        ];
        args.extend(extra);
        let out = crate::support::run(&args).await;
        let err = crate::support::stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
        assert!(!err.contains(&token), "the join token leaked: {err}");
    }
}
