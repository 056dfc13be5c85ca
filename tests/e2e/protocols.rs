//! Every protocol apps speak, through the explicit proxy on loopback, with stock clients and
//! servers (Python grpcio, websockets, curl, raw sockets): HTTP/1.1 with a large chunked upload,
//! gRPC (all four kinds of call, trailers, deadlines) and WebSocket over the `CONNECT` tunnels
//! those clients make, opaque TCP to a port the policy declares opaque, and passthrough to a
//! destination outside the mesh. Each callee's app sees the caller's SPIFFE ID and scopes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::pods::{App, apps_dir, json_output};
use crate::support::{Ca, Sidecar, SidecarPorts, free_addr, python};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const REPORTS: &str = "spiffe://cluster.local/ns/shop/sa/reports";

fn policy(db_port: u16, outside_port: u16) -> String {
    format!(
        "\
trust_domain: cluster.local
services:
  orders:
    id: spiffe://cluster.local/ns/shop/sa/orders
    scopes: [orders:read, orders:write]
    routes:
      - {{ method: GET,  path: /orders, scope: orders:read }}
      - {{ method: POST, path: /upload, scope: orders:write }}
    callers:
      frontend: [orders:read, orders:write]
  echo:
    id: spiffe://cluster.local/ns/shop/sa/echo
    scopes: [echo:call]
    routes:
      - {{ method: POST, path: /meshid.test.Echo, scope: echo:call }}
    callers:
      frontend: [echo:call]
  chat:
    id: spiffe://cluster.local/ns/shop/sa/chat
    scopes: [chat:join]
    routes:
      - {{ method: GET, path: /ws, scope: chat:join }}
    callers:
      frontend: [chat:join]
  db:
    id: spiffe://cluster.local/ns/shop/sa/db
    opaque_ports: [{db_port}]
    callers:
      frontend: []
  frontend:
    id: {FRONTEND}
  reports:
    id: {REPORTS}
passthrough:
  - {{ cidr: 127.0.0.1/32, ports: [{outside_port}] }}
"
    )
}

fn app(script: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(apps_dir().join(script)).args(args);
    cmd
}

/// A client app (Python) run with these environment variables; its JSON result.
async fn client(script: &str, args: &[&str], env: &[(&str, String)]) -> serde_json::Value {
    let mut cmd = app(script, args);
    for v in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "grpc_proxy",
        "no_proxy",
        "NO_PROXY",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(60), json_output(&mut cmd))
        .await
        .unwrap_or_else(|_| panic!("{script} {args:?} did not finish within 60 s"))
}

/// `CONNECT target` through `proxy`: the status line and, on 200, the open tunnel.
async fn connect(proxy: SocketAddr, target: &str) -> (String, Option<TcpStream>, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Read the response head byte by byte: the tunnel's bytes follow it directly.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("a CONNECT answer within 10 s")
            .unwrap();
        assert!(n == 1, "closed before the end of the head: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.lines().next().unwrap_or_default().to_owned();
    if status.contains(" 200") {
        (status, Some(s), head)
    } else {
        let length = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut body))
            .await
            .expect("the refusal's body")
            .unwrap();
        let body = String::from_utf8_lossy(&body).into_owned();
        (status, None, body)
    }
}

/// Write `n` bytes through `s` and read them back.
async fn echo_through(s: &mut TcpStream, n: usize) {
    let data: Vec<u8> = (0..n).map(|i| (i * 7 + i / 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&data).await.unwrap();
    };
    let read = async {
        let mut back = vec![0u8; n];
        r.read_exact(&mut back).await.unwrap();
        back
    };
    let ((), back) =
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
            .await
            .expect("the echo within 30 s");
    assert!(back == data, "the echo differs from what was sent");
}

fn sha256_hex(data: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn metric(sidecar: &Sidecar, line_start: &str) -> u64 {
    let (_, body) = sidecar.admin_get("/metrics").await.expect("metrics");
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn every_protocol_crosses_the_explicit_proxy() {
    let ports: Vec<u16> = (0..6).map(|_| free_addr().port()).collect();
    let [
        http_port,
        grpc_port,
        ws_port,
        db_port,
        outside_port,
        banner_port,
    ] = ports[..]
    else {
        unreachable!()
    };
    let p = |port: u16| port.to_string();
    let _http = App::start(app("http_echo.py", &["127.0.0.1", &p(http_port)])).await;
    let _grpc = App::start(app("grpc_echo.py", &["server", "127.0.0.1", &p(grpc_port)])).await;
    let _ws = App::start(app("ws_echo.py", &["server", "127.0.0.1", &p(ws_port)])).await;
    let _db = App::start(app("tcp_echo.py", &["server", "127.0.0.1", &p(db_port)])).await;
    let _outside = App::start(app(
        "tcp_echo.py",
        &["server", "127.0.0.1", &p(outside_port)],
    ))
    .await;
    let _banner = App::start(app(
        "tcp_echo.py",
        &["banner", "127.0.0.1", &p(banner_port), "outside-banner"],
    ))
    .await;

    let tmp = tempfile::tempdir().unwrap();
    let policy_file = tmp.path().join("policy.yaml");
    std::fs::write(&policy_file, policy(db_port, outside_port)).unwrap();
    let ca = Ca::start_in(
        tmp.path().join("ca"),
        tmp.path().to_path_buf(),
        &["--policy", policy_file.to_str().unwrap()],
    )
    .await
    .owning(tmp);
    let local = |port: u16| -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], port)) };
    let callees = [
        ("orders", http_port),
        ("echo", grpc_port),
        ("chat", ws_port),
        ("db", db_port),
    ];
    let mut routes = Vec::new();
    let mut sidecars = Vec::new();
    for (name, port) in callees {
        let ports = SidecarPorts::new();
        routes.push(format!("{name}={}", ports.inbound));
        let id = format!("spiffe://cluster.local/ns/shop/sa/{name}");
        sidecars.push(Sidecar::start(&ca, name, &id, local(port), ports, &[]).await);
    }
    let mut frontend = Sidecar::start(
        &ca,
        "frontend",
        FRONTEND,
        free_addr(),
        SidecarPorts::new(),
        &routes,
    )
    .await;
    let mut reports = Sidecar::start(
        &ca,
        "reports",
        REPORTS,
        free_addr(),
        SidecarPorts::new(),
        &routes,
    )
    .await;
    for s in sidecars.iter_mut() {
        s.ready().await;
    }
    frontend.ready().await;
    reports.ready().await;
    let proxy = format!("http://{}", frontend.outbound);

    // HTTP/1.1: an 8 MiB chunked upload, streamed through both sidecars.
    let upload = ca.work.join("upload.bin");
    let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&upload, &data).unwrap();
    let out = curl(&[
        "-x",
        &proxy,
        "-T",
        upload.to_str().unwrap(),
        "-X",
        "POST",
        "-H",
        "Transfer-Encoding: chunked",
        "http://orders/upload",
    ]);
    let seen: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!(seen["body_len"], data.len(), "{seen}");
    assert_eq!(seen["body_sha256"], sha256_hex(&data), "{seen}");
    assert_eq!(seen["headers"]["x-meshid-peer"][0], FRONTEND, "{seen}");
    assert!(
        seen["headers"]["x-meshid-scopes"][0]
            .as_str()
            .unwrap()
            .contains("orders:write"),
        "{seen}"
    );

    // gRPC, as grpcio does it through a proxy: CONNECT, then HTTP/2 inside. All four kinds of
    // call, a status and its details in the trailers, trailing metadata, a deadline.
    let grpc = client(
        "grpc_echo.py",
        &[
            "client",
            &format!("echo:{grpc_port}"),
            "20",
            "--marker",
            "grpc-marker",
        ],
        &[("grpc_proxy", proxy.clone())],
    )
    .await;
    assert_eq!(grpc["ok"], true, "{grpc}");
    let md = &grpc["metadata"];
    assert_eq!(md["x-meshid-peer"][0], FRONTEND, "{grpc}");
    assert!(
        md["x-meshid-scopes"][0]
            .as_str()
            .unwrap_or_default()
            .contains("echo:call"),
        "{grpc}"
    );
    assert!(
        md.get("authorization").is_none(),
        "the token stops at the sidecar: {grpc}"
    );

    // WebSocket, as the websockets library does it through a proxy (CONNECT, then the upgrade).
    let ws = client(
        "ws_echo.py",
        &["client", "ws://chat/ws", "50", "--marker", "ws-marker"],
        &[("http_proxy", proxy.clone())],
    )
    .await;
    assert_eq!(ws["ok"], true, "{ws}");
    assert!(
        ws["proxy"]
            .as_str()
            .unwrap_or_default()
            .contains(&frontend.outbound.to_string()),
        "{ws}"
    );
    assert_eq!(ws["path"], "/ws", "{ws}");
    assert_eq!(ws["headers"]["x-meshid-peer"][0], FRONTEND, "{ws}");
    assert!(
        ws["headers"]["x-meshid-scopes"][0]
            .as_str()
            .unwrap_or_default()
            .contains("chat:join"),
        "{ws}"
    );

    // Opaque TCP to db's opaque port: 1 MiB each way.
    let (status, tunnel, _) = connect(frontend.outbound, &format!("db:{db_port}")).await;
    assert!(status.contains(" 200"), "{status}");
    echo_through(&mut tunnel.unwrap(), 1 << 20).await;
    assert!(
        metric(
            &sidecars[3],
            "meshid_requests_total{direction=\"inbound\",outcome=\"tunnel_allowed\"}"
        )
        .await
            >= 1
    );

    // reports may not call db: the tunnel is refused by db's sidecar, and reports' app is told.
    let (status, tunnel, body) = connect(reports.outbound, &format!("db:{db_port}")).await;
    assert!(status.contains(" 403"), "{status} {body}");
    assert!(tunnel.is_none());
    assert!(body.contains("may not call"), "{body}");
    // A tunnel to a port that is not opaque carries HTTP only (checked per request, below):
    // other bytes end it, and never reach an app.
    let (status, tunnel, _) = connect(frontend.outbound, "db:9").await;
    assert!(status.contains(" 200"), "{status}");
    let mut t = tunnel.unwrap();
    t.write_all(b"\x16\x03\x01\x00\x05hello-not-http")
        .await
        .unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut back))
        .await
        .expect("the tunnel is closed")
        .unwrap();
    assert!(
        !crate::pods::contains(&back, b"hello-not-http"),
        "{}",
        String::from_utf8_lossy(&back)
    );
    // A tunnel to orders' HTTP port carries HTTP only, checked per request: a request without
    // the route's scope is refused inside the tunnel as anywhere else.
    let (status, tunnel, _) = connect(frontend.outbound, "orders:80").await;
    assert!(status.contains(" 200"), "{status}");
    let mut t = tunnel.unwrap();
    t.write_all(b"DELETE /orders HTTP/1.1\r\nHost: orders\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), t.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("no route"), "{answer}");

    // Outside the mesh: only what a passthrough rule allows.
    let (status, tunnel, _) =
        connect(frontend.outbound, &format!("127.0.0.1:{outside_port}")).await;
    assert!(status.contains(" 200"), "{status}");
    echo_through(&mut tunnel.unwrap(), 64 << 10).await;
    let (status, _, body) = connect(frontend.outbound, &format!("127.0.0.1:{banner_port}")).await;
    assert!(status.contains(" 403"), "{status} {body}");
    assert!(body.contains("not a service of the mesh"), "{body}");
    assert!(
        metric(
            &frontend,
            "meshid_requests_total{direction=\"outbound\",outcome=\"not_in_mesh\"}"
        )
        .await
            >= 1
    );
    assert!(
        metric(
            &frontend,
            "meshid_requests_total{direction=\"outbound\",outcome=\"passthrough\"}"
        )
        .await
            >= 1
    );
}

fn curl(args: &[&str]) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail-with-body", "--max-time", "60"])
        .args(args)
        .output()
        .expect("curl runs");
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?}: {body}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    body
}
