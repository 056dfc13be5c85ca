//! Transparent mode across real network namespaces: pods made by the test (namespaces joined by
//! veth pairs on a bridge), `meshid init-iptables` and a sidecar (as UID 1337) in each, and
//! stock clients in pod A that call pod B's apps by IP and port, or by name, with no proxy
//! setting: HTTP, gRPC (a bidirectional stream among the rest), WebSocket and opaque TCP. A
//! capture on A's veth shows that nothing but TLS crosses. A pod whose sidecar is not running
//! fails closed; only a process under the sidecar's UID gets past its rules.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use crate::pods::{App, Net, Pod, contains, json_output, pcap_payloads};
use crate::support::run_ok;

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const PROXY_UID: u32 = 1337;

const HTTP: u16 = 8080;
const GRPC: u16 = 50051;
const WS: u16 = 8765;
const DB: u16 = 5432;
const BANNER: u16 = 3306;
const OUTSIDE_ALLOWED: u16 = 9998;
const OUTSIDE: u16 = 9999;
/// A port B's app serves on loopback only: private to the pod, whatever its rules capture.
const LOOPBACK_ONLY: u16 = 7070;

fn policy(gateway: &str) -> String {
    format!(
        "\
trust_domain: cluster.local
services:
  orders:
    id: {ORDERS}
    scopes: [orders:read, orders:rpc, orders:chat]
    routes:
      - {{ method: GET,  path: /orders, scope: orders:read }}
      - {{ method: POST, path: /meshid.test.Echo, scope: orders:rpc }}
      - {{ method: GET,  path: /ws, scope: orders:chat }}
    callers:
      frontend: [orders:read, orders:rpc, orders:chat]
    opaque_ports: [{DB}, {BANNER}]
  frontend:
    id: {FRONTEND}
passthrough:
  - {{ cidr: {gateway}/32, ports: [{OUTSIDE_ALLOWED}] }}
"
    )
}

/// Files only `ip netns exec` reads for one namespace (`/etc/netns/NS/hosts` is the pod's
/// `/etc/hosts`); removed when dropped.
struct NetnsEtc(PathBuf);

impl NetnsEtc {
    fn hosts(pod: &Pod, lines: &str) -> Self {
        let dir = PathBuf::from("/etc/netns").join(&pod.ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{lines}")).unwrap();
        NetnsEtc(dir)
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chown(path: &Path) {
    let ok = std::process::Command::new("chown")
        .args(["-R", &format!("{PROXY_UID}:{PROXY_UID}")])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown {path:?}");
}

fn with(mut cmd: Command, args: &[&str]) -> Command {
    cmd.args(args);
    cmd
}

async fn must(cmd: &mut Command) -> String {
    let out = cmd.output().await.expect("runs");
    assert!(
        out.status.success(),
        "{:?}: {}{}",
        cmd.as_std(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sidecar in `pod`, as the UID its rules exclude, once it says it is ready.
struct PodSidecar {
    _child: tokio::process::Child,
    log: PathBuf,
}

impl PodSidecar {
    async fn start(pod: &Pod, ca: SocketAddr, bundle: &Path, token: &str, work: &Path) -> Self {
        let cert_dir = work.join(format!("certs-{}", pod.name));
        std::fs::create_dir_all(&cert_dir).unwrap();
        chown(&cert_dir);
        let log = work.join(format!("sidecar-{}.log", pod.name));
        let child = pod
            .command_as(env!("CARGO_BIN_EXE_meshid"), PROXY_UID, PROXY_UID)
            .env("MESHID_JOIN_TOKEN", token)
            .env("MESHID_LOG", "info,meshid=debug")
            .args(["sidecar", "--ca", &ca.to_string(), "--ca-bundle"])
            .arg(bundle)
            .arg("--cert-dir")
            .arg(&cert_dir)
            .args(["--app", &format!("127.0.0.1:{HTTP}")])
            .args(["--inbound-addr", "[::]:15006"])
            .args(["--outbound-addr", "127.0.0.1:15001,[::1]:15001"])
            .args(["--detect-timeout", "1s"])
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("the sidecar starts");
        let s = PodSidecar { _child: child, log };
        for _ in 0..300 {
            let out = pod
                .command("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg("http://127.0.0.1:15000/ready")
                .output()
                .await
                .unwrap();
            if out.stdout == b"200" {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("sidecar in {} not ready: {}", pod.name, s.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

async fn metric(pod: &Pod, line_start: &str) -> u64 {
    let body = must(
        pod.command("curl")
            .args(["-s", "http://127.0.0.1:15000/metrics"]),
    )
    .await;
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn pods_call_each_other_by_ip_with_no_proxy_setting_and_only_tls_crosses() {
    let net = Net::new();
    let (a, b, c) = (net.pod("a"), net.pod("b"), net.pod("c"));
    let gateway = net.gateway.to_string();
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    // The CA, in the network's own namespace (no rules there).
    let data = work.path().join("ca");
    let policy_file = work.path().join("policy.yaml");
    std::fs::write(&policy_file, policy(&gateway)).unwrap();
    let ca_addr = SocketAddr::new(net.gateway.into(), 8443);
    let ca_log = work.path().join("ca.log");
    let _ca = net
        .meshid()
        .arg("ca")
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--policy")
        .arg(&policy_file)
        .args(["--grpc-addr", &ca_addr.to_string()])
        .args(["--http-addr", &format!("{gateway}:8444")])
        .args(["--admin-addr", "127.0.0.1:9090"])
        .args(["--san", &gateway])
        .stderr(std::fs::File::create(&ca_log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    a.wait_port(ca_addr, Duration::from_secs(30)).await;
    let bundle = work.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        run_ok(&["ca", "bundle", "--data-dir", data.to_str().unwrap()]).await,
    )
    .unwrap();
    let token = |id: &'static str| {
        let data = data.clone();
        async move {
            run_ok(&[
                "ca",
                "join-token",
                "--data-dir",
                data.to_str().unwrap(),
                "--spiffe-id",
                id,
                "--reusable",
            ])
            .await
            .trim()
            .to_owned()
        }
    };

    // Outside the mesh, in the network's namespace: one a passthrough rule allows, one not.
    let outside_app = |port: u16| {
        let mut cmd = net.command(crate::support::python());
        cmd.arg(crate::pods::apps_dir().join("http_echo.py"))
            .args([&gateway, &port.to_string()]);
        App::start(cmd)
    };
    let _allowed = outside_app(OUTSIDE_ALLOWED).await;
    let _outside = outside_app(OUTSIDE).await;

    // B's apps on every address of the pod, and its rules and sidecar.
    let _http = App::start(with(b.app("http_echo.py"), &["::", &HTTP.to_string()])).await;
    let _grpc = App::start(with(
        b.app("grpc_echo.py"),
        &["server", "::", &GRPC.to_string()],
    ))
    .await;
    let _ws = App::start(with(
        b.app("ws_echo.py"),
        &["server", "::", &WS.to_string()],
    ))
    .await;
    let _db = App::start(with(
        b.app("tcp_echo.py"),
        &["server", "::", &DB.to_string()],
    ))
    .await;
    let _banner = App::start(with(
        b.app("tcp_echo.py"),
        &["banner", "::", &BANNER.to_string(), "db-banner-marker"],
    ))
    .await;
    let _private = App::start(with(
        b.app("http_echo.py"),
        &["127.0.0.1", &LOOPBACK_ONLY.to_string()],
    ))
    .await;
    for pod in [&a, &b, &c] {
        must(pod.meshid().arg("init-iptables")).await;
    }
    let orders_token = token(ORDERS).await;
    let frontend_token = token(FRONTEND).await;
    let sb = PodSidecar::start(&b, ca_addr, &bundle, &orders_token, work.path()).await;
    let sa = PodSidecar::start(&a, ca_addr, &bundle, &frontend_token, work.path()).await;
    let _hosts = NetnsEtc::hosts(&a, &format!("{} orders\n", b.ip));

    let capture = net.capture(&a).await;
    let b_ip = b.ip.to_string();

    // HTTP by IP: B's app sees A's SPIFFE ID and the scopes of A's token.
    let seen = must(a.command("curl").args([
        "-sS",
        "--fail-with-body",
        &format!("http://{b_ip}:{HTTP}/orders/http-marker-1"),
    ]))
    .await;
    let seen: serde_json::Value = serde_json::from_str(&seen).unwrap_or_else(|_| panic!("{seen}"));
    assert_eq!(seen["headers"]["x-meshid-peer"][0], FRONTEND, "{seen}");
    assert!(
        seen["headers"]["x-meshid-scopes"][0]
            .as_str()
            .unwrap()
            .contains("orders:read"),
        "{seen}"
    );
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    // By name (the Host names the service: the handshake must prove exactly its ID), with a
    // request body.
    let seen = must(a.command("curl").args([
        "-sS",
        "--fail-with-body",
        "-X",
        "GET",
        "--data-binary",
        "http-marker-2-body",
        &format!("http://orders:{HTTP}/orders/by-name"),
    ]))
    .await;
    assert!(seen.contains(FRONTEND), "{seen}");
    // A route rule still applies: no route for DELETE.
    let refused = must(a.command("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "DELETE",
        &format!("http://{b_ip}:{HTTP}/orders/7"),
    ]))
    .await;
    assert_eq!(refused, "403");
    // What B serves on loopback only stays private: B's sidecar hands redirected connections
    // to the address the caller dialled, never to 127.0.0.1.
    let private = must(a.command("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{b_ip}:{LOOPBACK_ONLY}/orders/private"),
    ]))
    .await;
    assert_eq!(private, "502", "a loopback-only port of B answered");
    // IPv6.
    let seen = must(a.command("curl").args([
        "-sS",
        "-g",
        "--fail-with-body",
        &format!("http://[{}]:{HTTP}/orders/v6", b.ip6),
    ]))
    .await;
    assert!(seen.contains(FRONTEND), "{seen}");

    // gRPC from a stock client to a stock server: unary, both streams, a bidirectional
    // stream, trailers and a deadline; B's server sees A's identity.
    let grpc = json_output(a.app("grpc_echo.py").args([
        "client",
        &format!("{b_ip}:{GRPC}"),
        "20",
        "--marker",
        "grpc-marker",
    ]))
    .await;
    assert_eq!(grpc["ok"], true, "{grpc}");
    assert_eq!(grpc["metadata"]["x-meshid-peer"][0], FRONTEND, "{grpc}");

    // WebSocket.
    let ws = json_output(a.app("ws_echo.py").args([
        "client",
        &format!("ws://{b_ip}:{WS}/ws"),
        "20",
        "--marker",
        "ws-marker",
    ]))
    .await;
    assert_eq!(ws["ok"], true, "{ws}");
    assert!(ws["proxy"].is_null(), "no proxy setting: {ws}");
    assert_eq!(ws["headers"]["x-meshid-peer"][0], FRONTEND, "{ws}");

    // Opaque TCP to a port the policy declares opaque, and a server-first protocol.
    let tcp = json_output(a.app("tcp_echo.py").args([
        "client",
        &b_ip,
        &DB.to_string(),
        "1000000",
        "--marker",
        "tcp-marker",
    ]))
    .await;
    assert_eq!(tcp["ok"], true, "{tcp}");
    let banner = json_output(a.app("tcp_echo.py").args([
        "client",
        &b_ip,
        &BANNER.to_string(),
        "1000",
        "--banner",
    ]))
    .await;
    assert_eq!(banner["ok"], true, "{banner}");
    assert!(
        banner["banner"]
            .as_str()
            .unwrap_or_default()
            .contains("db-banner-marker"),
        "{banner}"
    );

    // Outside the mesh: what a passthrough rule allows goes through in plain TCP, the rest
    // is refused and counted.
    let seen = must(a.command("curl").args([
        "-sS",
        "--fail-with-body",
        &format!("http://{gateway}:{OUTSIDE_ALLOWED}/outside"),
    ]))
    .await;
    assert!(seen.contains("/outside"), "{seen}");
    let out = a
        .command("curl")
        .args(["-sS", &format!("http://{gateway}:{OUTSIDE}/outside")])
        .output()
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("not in the mesh"), "{body}");
    assert!(
        metric(
            &a,
            "meshid_requests_total{direction=\"outbound\",outcome=\"not_in_mesh\"}"
        )
        .await
            >= 1
    );

    // The capture: no byte of any request's plaintext crossed, and B's ports saw TLS.
    let pcap = capture.stop().await;
    let payloads = pcap_payloads(&pcap);
    for marker in [
        &b"http-marker-1"[..],
        b"http-marker-2-body",
        b"grpc-marker",
        b"ws-marker",
        b"tcp-marker",
        b"db-banner-marker",
        b"x-meshid-peer",
    ] {
        let hits: Vec<_> = payloads
            .iter()
            .filter(|(_, _, p)| contains(p, marker))
            .map(|(s, d, _)| (*s, *d))
            .collect();
        assert!(
            hits.is_empty(),
            "{} crossed in plaintext: {hits:?}",
            String::from_utf8_lossy(marker)
        );
    }
    for port in [HTTP, GRPC, WS, DB, BANNER] {
        let first = payloads
            .iter()
            .find(|(_, d, _)| d.ip() == std::net::IpAddr::V4(b.ip) && d.port() == port)
            .unwrap_or_else(|| panic!("no traffic to {b_ip}:{port} captured"));
        assert!(
            first.2.starts_with(&[0x16, 0x03]),
            "to port {port}: not a TLS handshake: {:?}",
            &first.2[..first.2.len().min(16)]
        );
    }
    // The allowed passthrough went in plain (the control: the capture does see plaintext).
    assert!(payloads.iter().any(|(_, _, p)| contains(p, b"/outside")));

    // Pod C has its rules but no sidecar: its calls fail closed.
    let out = c
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{b_ip}:{HTTP}/orders/1"),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        !out.status.success(),
        "a call from a pod without its sidecar got through"
    );
    let out = c
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{gateway}:{OUTSIDE}/"),
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "outside, without the sidecar");
    // Only a process under the sidecar's UID gets past the pod's own rules; B's rules still
    // require mutual TLS from it.
    let out = c
        .command_as("curl", PROXY_UID, PROXY_UID)
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{gateway}:{OUTSIDE}/uid-bypass"),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/uid-bypass"),
        "UID {PROXY_UID} bypasses the rules: {out:?}"
    );
    let out = c
        .command_as("curl", PROXY_UID, PROXY_UID)
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{b_ip}:{HTTP}/orders/1"),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("x-meshid-peer"),
        "plain HTTP reached B's app: {out:?}"
    );
    drop(sa);
    drop(sb);
}
