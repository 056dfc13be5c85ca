//! The SPIFFE Workload API on the sidecar's unix socket, checked with clients that are not
//! ours: rust-spiffe (the `spiffe` crate), py-spiffe (the SPIFFE project's Python library) and
//! a stock grpcio client with raw method paths. Renewals, root and token-key rotations are
//! driven through the real CA with `meshid ca rotate`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use spiffe::{JwtSvid, TrustDomain, WorkloadApiClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::rotation::operator;
use crate::support::{Ca, Sidecar, SidecarPorts, echo_app, python};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const POLICY: &str = "\
trust_domain: cluster.local
services:
  web:
    id: spiffe://cluster.local/ns/shop/sa/web
";

struct Pod {
    ca: Ca,
    sidecar: Sidecar,
    socket: PathBuf,
}

/// A CA (no automatic rotation, renewals after a rotation within 2 s) and one sidecar serving
/// the Workload API at `<tmp>/run/agent.sock`, with `extra` sidecar flags.
async fn pod(extra: &[&str]) -> Pod {
    pod_with(&["--auto-rotate", "false", "--renew-window", "2s"], extra).await
}

/// [`pod`] with these CA flags.
async fn pod_with(ca_extra: &[&str], extra: &[&str]) -> Pod {
    let tmp = tempfile::tempdir().unwrap();
    // Other UIDs must reach the socket (the wrong-UID test runs a client as uid 4242).
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let policy = tmp.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let socket = tmp.path().join("run/agent.sock");
    let mut ca_args = vec!["--policy", policy.to_str().unwrap()];
    ca_args.extend_from_slice(ca_extra);
    let ca = Ca::start_in(tmp.path().join("ca"), tmp.path().to_path_buf(), &ca_args)
        .await
        .owning(tmp);
    let mut args = vec!["--workload-api-socket", socket.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut sidecar = Sidecar::start_with(
        &ca,
        "web",
        WEB,
        echo_app().await,
        SidecarPorts::new(),
        &[],
        &args,
    )
    .await;
    sidecar.ready().await;
    Pod {
        ca,
        sidecar,
        socket,
    }
}

fn endpoint(socket: &Path) -> String {
    format!("unix://{}", socket.display())
}

/// SHA-256 in lowercase hex, as the Python script prints it.
fn sha256(der: &[u8]) -> String {
    meshid_proto::bundle::cert_sha256(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The DER certificates of a PEM file.
fn pem_ders(path: &Path) -> Vec<Vec<u8>> {
    use base64::Engine;
    let text = std::fs::read_to_string(path).unwrap();
    text.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .map(|block| {
            let b64: String = block
                .split("-----END CERTIFICATE-----")
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap()
        })
        .collect()
}

/// The private key in `svid_key.pem` (PKCS#8 DER).
fn key_der(cert_dir: &Path) -> Vec<u8> {
    use base64::Engine;
    let text = std::fs::read_to_string(cert_dir.join("svid_key.pem")).unwrap();
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// `meshid ca rotate ARGS`, which must succeed.
async fn rotate(ca: &Ca, args: &[&str]) {
    let (ok, out) = operator(ca, "rotate", args).await;
    assert!(ok, "meshid ca rotate {args:?}: {out}");
}

/// The next item of `stream` that satisfies `want`, within 30 s.
async fn next_where<S, T, E>(stream: &mut S, what: &str, mut want: impl FnMut(&T) -> bool) -> T
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
    E: std::fmt::Debug,
{
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.next().await {
                Some(Ok(item)) if want(&item) => return item,
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{what}: the stream failed: {e:?}"),
                None => panic!("{what}: the stream ended"),
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{what}: not seen within 30 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_spiffe_gets_the_pods_svid_and_bundle_sees_both_change_on_renewal_and_rotation_and_validates_a_jwt_svid()
 {
    let p = pod(&[]).await;
    let client = WorkloadApiClient::connect_to(endpoint(&p.socket))
        .await
        .expect("rust-spiffe connects");
    let td = TrustDomain::new("cluster.local").unwrap();

    // The X.509-SVID is the sidecar's own: the same certificate and key it keeps on disk.
    let svid = client.fetch_x509_svid().await.expect("FetchX509SVID");
    assert_eq!(svid.spiffe_id().to_string(), WEB);
    let on_disk = pem_ders(&p.sidecar.cert_dir.join("svid.pem"));
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(chain, on_disk, "leaf and intermediate as in svid.pem");
    assert_eq!(
        svid.private_key().as_bytes(),
        key_der(&p.sidecar.cert_dir).as_slice(),
        "the key of svid_key.pem"
    );
    let roots = pem_ders(&p.ca.bundle_file().await);
    let bundles = client.fetch_x509_bundles().await.expect("FetchX509Bundles");
    let bundle = bundles.get(&td).expect("a bundle for cluster.local");
    let held: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(held, roots, "the CA's bundle");

    // Streams: a new root (prepared) reaches both; activated, it makes the sidecar renew, and
    // the new SVID arrives on the SVID stream.
    let mut contexts = client.stream_x509_contexts().await.unwrap();
    let mut bundle_stream = client.stream_x509_bundles().await.unwrap();
    let first = next_where(&mut contexts, "first X.509 context", |_| true).await;
    let first_leaf = first.default_svid().unwrap().leaf().as_bytes().to_vec();
    rotate(&p.ca, &["prepare", "--what", "root"]).await;
    let two_roots = |n: usize| n == 2;
    next_where(&mut contexts, "a context with the prepared root", |c| {
        c.bundle_set()
            .get(&td)
            .is_some_and(|b| two_roots(b.authorities().len()))
    })
    .await;
    next_where(&mut bundle_stream, "a bundle with the prepared root", |s| {
        s.get(&td).is_some_and(|b| two_roots(b.authorities().len()))
    })
    .await;
    // Activating the prepared root (and its intermediate) waits for every sidecar to
    // acknowledge the new bundle.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = operator(&p.ca, "rotate", &["activate", "--what", "root"]).await;
        if ok {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "activate: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let renewed = next_where(&mut contexts, "the renewed SVID", |c| {
        c.default_svid()
            .is_some_and(|s| s.leaf().as_bytes() != first_leaf.as_slice())
    })
    .await;
    let renewed = renewed.default_svid().unwrap();
    assert_eq!(renewed.spiffe_id().to_string(), WEB);
    assert_ne!(
        renewed.cert_chain()[1].as_bytes(),
        chain[1].as_slice(),
        "signed by the new intermediate"
    );
    // The app's SVID is the one the sidecar now presents (written to its cert directory).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pem_ders(&p.sidecar.cert_dir.join("svid.pem"))[0] != renewed.leaf().as_bytes() {
        assert!(
            std::time::Instant::now() < deadline,
            "svid.pem is not the streamed SVID"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A JWT-SVID, validated locally with rust-spiffe against the JWT bundle and by the API.
    let jwt = client
        .fetch_jwt_svid(["db", "audit"], None)
        .await
        .expect("FetchJWTSVID");
    assert_eq!(jwt.spiffe_id().to_string(), WEB);
    let jwt_bundles = client.fetch_jwt_bundles().await.expect("FetchJWTBundles");
    let local = JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["db"])
        .expect("rust-spiffe validates the JWT-SVID against the JWT bundle");
    assert_eq!(local.spiffe_id().to_string(), WEB);
    let mut aud = local.audience().to_vec();
    aud.sort();
    assert_eq!(aud, ["audit", "db"]);
    assert!(
        JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["someone-else"]).is_err(),
        "another audience is refused"
    );
    let validated = client
        .validate_jwt_token("audit", jwt.token())
        .await
        .expect("ValidateJWTSVID");
    assert_eq!(validated.spiffe_id().to_string(), WEB);
    let refused = client.validate_jwt_token("someone-else", jwt.token()).await;
    assert!(refused.is_err(), "ValidateJWTSVID checks the audience");
    // The same audiences again: the same JWT-SVID while most of its life is left.
    let again = client.fetch_jwt_svid(["audit", "db"], None).await.unwrap();
    assert_eq!(again.token(), jwt.token());

    // A new token-signing key joins the JWT bundle stream before it signs anything.
    let mut jwt_stream = client.stream_jwt_bundles().await.unwrap();
    let kids =
        |s: &spiffe::JwtBundleSet| s.get(&td).map(|b| b.jwt_authorities().count()).unwrap_or(0);
    let before = next_where(&mut jwt_stream, "the JWT bundle", |_| true).await;
    assert_eq!(kids(&before), 1);
    rotate(&p.ca, &["prepare", "--what", "token-key"]).await;
    next_where(&mut jwt_stream, "a JWT bundle with the prepared key", |s| {
        kids(s) == 2
    })
    .await;
    // The JWT-SVID issued before still validates against the bundle streamed now.
    let now_bundles = client.fetch_jwt_bundles().await.unwrap();
    assert!(JwtSvid::parse_and_validate(jwt.token(), &now_bundles, &["db"]).is_ok());
}

/// The README's Rust snippet, `examples/workload_api.rs`, as `cargo build --examples` (which
/// tests/run.sh runs first) leaves it next to this test binary.
fn example_binary() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let examples = deps.parent().unwrap().parent().unwrap().join("examples");
    let bin = examples.join("workload_api");
    assert!(
        bin.exists(),
        "{} is missing: build the examples first (cargo build --examples)",
        bin.display()
    );
    bin
}

#[tokio::test]
async fn the_readmes_rust_snippet_gets_the_pods_identity_through_spiffe_endpoint_socket() {
    let p = pod(&[]).await;
    let out = tokio::process::Command::new(example_binary())
        .env("SPIFFE_ENDPOINT_SOCKET", endpoint(&p.socket))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("X.509-SVID {WEB} (2 certificates)")),
        "{stdout}"
    );
    assert!(
        stdout.contains("bundle of cluster.local: 1 root(s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("JWT-SVID {WEB} for [\"db\"]")),
        "{stdout}"
    );
}

/// `python tests/interop/SCRIPT ARGS` with `env`: its stdout, which it must succeed with.
fn run_python(script: &str, args: &[&str], env: &[(&str, &str)], uid: Option<u32>) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop")
        .join(script);
    let mut cmd = match uid {
        // A client process of another user, as the kernel reports it to the sidecar.
        Some(uid) => {
            let mut c = std::process::Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                &python(),
            ]);
            c
        }
        None => std::process::Command::new(python()),
    };
    cmd.arg(&path).args(args).env("HOME", "/tmp");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("python runs");
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The stock grpcio client: the status code name and the rest of its line.
fn raw(socket: &Path, rpc: &str, extra: &[&str], uid: Option<u32>) -> (String, String) {
    let mut args = vec![socket.to_str().unwrap(), rpc];
    args.extend_from_slice(extra);
    let line = run_python("workload_api_raw.py", &args, &[], uid);
    let (code, rest) = line.split_once(' ').unwrap_or((&line, ""));
    (code.to_owned(), rest.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_through_spiffe_endpoint_socket_gets_the_same_answers_as_rust_spiffe() {
    let p = pod(&[]).await;
    let out = run_python(
        "workload_api_py_spiffe.py",
        &[],
        &[("SPIFFE_ENDPOINT_SOCKET", &endpoint(&p.socket))],
        None,
    );
    let py: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let client = WorkloadApiClient::connect_to(endpoint(&p.socket))
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let roots: Vec<String> = {
        let set = client.fetch_x509_bundles().await.unwrap();
        let mut r: Vec<String> = set
            .get(&td)
            .unwrap()
            .authorities()
            .iter()
            .map(|c| sha256(c.as_bytes()))
            .collect();
        r.sort();
        r
    };
    let kids: Vec<String> = {
        let set = client.fetch_jwt_bundles().await.unwrap();
        let mut k: Vec<String> = set
            .get(&td)
            .unwrap()
            .jwt_authorities()
            .map(|a| a.key_id().to_owned())
            .collect();
        k.sort();
        k
    };
    assert_eq!(py["spiffe_id"], WEB, "{py}");
    assert_eq!(py["leaf_sha256"], sha256(svid.leaf().as_bytes()), "{py}");
    assert_eq!(py["chain_len"], svid.cert_chain().len(), "{py}");
    assert_eq!(py["key_matches_leaf"], true, "{py}");
    assert_eq!(py["roots_sha256"], serde_json::json!(roots), "{py}");
    assert_eq!(py["jwt_spiffe_id"], WEB, "{py}");
    assert_eq!(py["jwt_audience"], serde_json::json!(["db"]), "{py}");
    assert_eq!(py["jwt_local_spiffe_id"], WEB, "{py}");
    assert_eq!(py["jwt_validated_spiffe_id"], WEB, "{py}");
    assert_eq!(py["jwt_kids"], serde_json::json!(kids), "{py}");
    assert_eq!(py["wrong_audience"], "InvalidTokenError", "{py}");
    // And the stock grpcio client, which sends the socket path as :authority as grpc-core
    // does, gets every RPC answered.
    for rpc in [
        "FetchX509SVID",
        "FetchX509Bundles",
        "FetchJWTBundles",
        "FetchJWTSVID",
    ] {
        let (code, rest) = raw(&p.socket, rpc, &[], None);
        assert_eq!(code, "OK", "{rpc}: {rest}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_ca_is_away_a_jwt_svid_still_valid_is_handed_out_but_never_an_expiring_one_or_to_a_revoked_workload()
 {
    let Pod {
        ca,
        sidecar,
        socket,
    } = pod_with(&["--token-ttl", "20s"], &[]).await;
    let _sidecar = sidecar;
    let client = WorkloadApiClient::connect_to(endpoint(&socket))
        .await
        .unwrap();
    let first = client.fetch_jwt_svid(["db"], None).await.unwrap();
    let got_at = std::time::Instant::now();
    // Past half its life, with the workload revoked: the CA's refusal is the answer, not the
    // JWT-SVID held.
    let (ok, out) = operator(&ca, "revoke", &["--spiffe-id", WEB]).await;
    assert!(ok, "{out}");
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(got_at.elapsed())).await;
    let refused = client.fetch_jwt_svid(["db"], None).await;
    let e = refused.expect_err("a revoked workload gets no JWT-SVID");
    assert!(format!("{e:?}").contains("PermissionDenied"), "{e:?}");
    let (ok, out) = operator(&ca, "unrevoke", &["--spiffe-id", WEB]).await;
    assert!(ok, "{out}");
    // Killed; its files (and the socket's directory) stay until the test ends. A new one
    // would be minted, but the CA is away: the one held, still valid, is handed out.
    let _files = ca.stop().await;
    let again = client
        .fetch_jwt_svid(["db"], None)
        .await
        .expect("the cached JWT-SVID");
    assert_eq!(again.token(), first.token());
    // Within 5 s of its expiry: not any more; the CA's absence is the answer.
    tokio::time::sleep(Duration::from_secs(16).saturating_sub(got_at.elapsed())).await;
    let refused = client.fetch_jwt_svid(["db"], None).await;
    let e = refused.expect_err("no JWT-SVID about to expire");
    assert!(format!("{e:?}").contains("Unavailable"), "{e:?}");
    // Other audiences never had one.
    assert!(client.fetch_jwt_svid(["audit"], None).await.is_err());
}

/// Wait until `stream` is closed by the other end (EOF or reset), within `limit`.
async fn closed_within(stream: &mut tokio::net::UnixStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_security_header_from_another_uid_or_with_garbage_are_refused_as_the_spec_says_and_the_api_keeps_serving()
 {
    let p = pod(&[
        "--workload-api-allowed-uids",
        "4242",
        "--header-read-timeout",
        "2s",
    ])
    .await;
    let s = &p.socket;
    let mode = std::fs::metadata(s).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o666
    );
    // The allowed UID: answered.
    let (code, rest) = raw(s, "FetchX509SVID", &[], Some(4242));
    assert_eq!(code, "OK", "{rest}");
    // No security header: InvalidArgument, before anything else is looked at.
    let (code, rest) = raw(s, "FetchX509SVID", &["--no-header"], Some(4242));
    assert_eq!(code, "INVALID_ARGUMENT", "{rest}");
    assert!(rest.contains("workload.spiffe.io"), "{rest}");
    // Root is not 4242: PermissionDenied on every RPC, with the reason.
    for rpc in [
        "FetchX509SVID",
        "FetchX509Bundles",
        "FetchJWTSVID",
        "FetchJWTBundles",
        "ValidateJWTSVID",
    ] {
        let (code, rest) = raw(s, rpc, &[], None);
        assert_eq!(code, "PERMISSION_DENIED", "{rpc}: {rest}");
        assert!(rest.contains("uid 0"), "{rest}");
    }
    // An RPC the API does not have: Unimplemented.
    let (code, _) = raw(s, "FetchX509SVIDv2", &[], Some(4242));
    assert_eq!(code, "UNIMPLEMENTED");
    // Bad arguments: an audience missing, a token that is not a JWT.
    let (code, rest) = raw(s, "ValidateJWTSVID", &[], Some(4242));
    assert_eq!(code, "INVALID_ARGUMENT", "{rest}");
    assert!(rest.contains("not a well-formed JWT"), "{rest}");

    // Garbage on the socket: the connection is closed.
    let mut garbage = tokio::net::UnixStream::connect(s).await.unwrap();
    garbage
        .write_all(
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage, not HTTP/2 at all\r\n\r\n",
        )
        .await
        .unwrap();
    assert!(closed_within(&mut garbage, Duration::from_secs(5)).await);
    // The HTTP/2 preface, then a HEADERS frame whose HPACK block is garbage.
    let mut bad_hpack = tokio::net::UnixStream::connect(s).await.unwrap();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend([0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // SETTINGS
    bytes.extend([
        0, 0, 6, 0x1, 0x4, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ]);
    bad_hpack.write_all(&bytes).await.unwrap();
    assert!(closed_within(&mut bad_hpack, Duration::from_secs(5)).await);
    // A client that connects and says nothing is closed after --header-read-timeout.
    let mut silent = tokio::net::UnixStream::connect(s).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(8)).await);

    // Still serving, and the refusals are counted by RPC and outcome.
    let (code, rest) = raw(s, "FetchJWTSVID", &[], Some(4242));
    assert_eq!(code, "OK", "{rest}");
    let (_, metrics) = p.sidecar.admin_get("/metrics").await.unwrap();
    for line in [
        "meshid_workload_api_calls_total{rpc=\"FetchX509SVID\",outcome=\"permission_denied\"} 1",
        "meshid_workload_api_calls_total{rpc=\"FetchX509SVID\",outcome=\"invalid_argument\"} 1",
        "meshid_workload_api_calls_total{rpc=\"FetchJWTSVID\",outcome=\"ok\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    // The private key went over the socket, never into the log.
    let key_pem = std::fs::read_to_string(p.sidecar.cert_dir.join("svid_key.pem")).unwrap();
    let log = p.sidecar.log();
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!log.contains(line), "key material in the sidecar log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_of_a_uid_not_allowed_get_a_few_connections_and_cannot_take_the_apps() {
    let p = pod(&["--workload-api-allowed-uids", "4242"]).await;
    // This test runs as root, which is not allowed: four connections, then no more.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::UnixStream::connect(&p.socket).await.unwrap());
    }
    let mut fifth = tokio::net::UnixStream::connect(&p.socket).await.unwrap();
    assert!(
        closed_within(&mut fifth, Duration::from_secs(2)).await,
        "a fifth connection of a UID not allowed is closed at once"
    );
    for c in &mut held {
        assert!(!closed_within(c, Duration::from_millis(200)).await);
    }
    // The allowed UID is served all the same.
    let (code, rest) = raw(&p.socket, "FetchX509SVID", &[], Some(4242));
    assert_eq!(code, "OK", "{rest}");
}

#[tokio::test]
async fn a_second_sidecar_on_a_socket_in_use_refuses_to_start_and_a_stale_socket_is_replaced() {
    let p = pod(&[]).await;
    // Another sidecar pointed at the same socket: refused, the first one keeps it.
    let mut second = Sidecar::start_with(
        &p.ca,
        "web2",
        WEB,
        echo_app().await,
        SidecarPorts::new(),
        &[],
        &["--workload-api-socket", p.socket.to_str().unwrap()],
    )
    .await;
    let status = second
        .exited_within(Duration::from_secs(20))
        .await
        .expect("the second sidecar exits");
    assert!(!status.success());
    assert!(
        second
            .log()
            .contains("another process is serving on this socket"),
        "{}",
        second.log()
    );
    let (code, rest) = raw(&p.socket, "FetchX509Bundles", &[], None);
    assert_eq!(code, "OK", "{rest}");
    // Stopped: the socket file goes with it.
    let Pod {
        ca,
        mut sidecar,
        socket,
    } = p;
    sidecar.terminate();
    sidecar
        .exited_within(Duration::from_secs(15))
        .await
        .expect("the sidecar stops on SIGTERM");
    assert!(!socket.exists(), "the socket is removed on exit");
    // A socket file left by a killed sidecar is taken over by the next one.
    let stale = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    drop(stale);
    let mut third = Sidecar::start_with(
        &ca,
        "web3",
        WEB,
        echo_app().await,
        SidecarPorts::new(),
        &[],
        &["--workload-api-socket", socket.to_str().unwrap()],
    )
    .await;
    third.ready().await;
    let (code, rest) = raw(&socket, "FetchX509SVID", &[], None);
    assert_eq!(code, "OK", "{rest}");
    // Bound in a private directory and renamed into place: nothing of it is left beside.
    let beside: Vec<_> = std::fs::read_dir(socket.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(beside, ["agent.sock"], "{beside:?}");
}
