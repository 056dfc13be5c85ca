//! OAuth 2.0 client credentials: the curl request from the README, independent verification
//! with PyJWT from the JWKS and metadata alone, every refusal with its RFC 6749 code, the gRPC
//! grant, the directory stream, and policy hot reload.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshid::identity::client::CaClient;
use meshid::identity::files;
use meshid_proto::directory::{Directory, Scope};
use meshid_proto::pb;
use meshid_proto::tls::CertSlot;
use meshid_proto::token::{StaticJwks, TokenVerifier};
use meshid_proto::{TrustBundle, TrustDomain};
use serde_json::Value;
use tonic::Code;

use crate::support::{Ca, python, run};

const POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/base/policy.yaml");
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

/// A CA running the shop policy (from a copy the test may edit), and SVIDs for some services.
async fn shop(extra: &[&str], who: &[(&str, &str)]) -> (Ca, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("policy.yaml");
    std::fs::copy(POLICY, &policy).unwrap();
    let mut args = vec!["--policy", policy.to_str().unwrap()];
    args.extend_from_slice(extra);
    let ca = Ca::start_in(tmp.path().join("ca"), tmp.path().to_path_buf(), &args)
        .await
        .owning(tmp);
    for (name, id) in who {
        let token = ca.join_token(id, &[]).await;
        let (out, _) = ca.fetch(&token, name).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (ca, policy)
}

struct Reply {
    status: u16,
    headers: String,
    body: Value,
}

/// curl against the CA's HTTPS port, as `who` (a cert directory name) or anonymously.
fn curl(ca: &Ca, who: Option<&str>, path: &str, args: &[&str]) -> Reply {
    let headers = ca.work.join("headers.txt");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "-", "-D"]).arg(&headers);
    cmd.arg("--cacert").arg(ca.work.join("bundle.pem"));
    if let Some(who) = who {
        cmd.arg("--cert").arg(ca.work.join(who).join("svid.pem"));
        cmd.arg("--key").arg(ca.work.join(who).join("svid_key.pem"));
    }
    cmd.args(args)
        .arg(format!("https://localhost:{}{path}", ca.http_addr.port()));
    let out = cmd.output().expect("curl runs");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let headers = std::fs::read_to_string(&headers).unwrap();
    let status = headers.split_whitespace().nth(1).unwrap().parse().unwrap();
    Reply {
        status,
        headers: headers.to_ascii_lowercase(),
        body: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
    }
}

fn pyjwt_verify(
    ca: &Ca,
    token: &str,
    who: &str,
    aud: &str,
    sub: &str,
    client_id: &str,
    scope: &str,
) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/verify_token.py");
    let metadata = format!(
        "https://localhost:{}/.well-known/oauth-authorization-server",
        ca.http_addr.port()
    );
    let out = Command::new(python())
        .arg(script)
        .args([
            &metadata,
            ca.work.join("bundle.pem").to_str().unwrap(),
            token,
        ])
        .arg(ca.work.join(who).join("svid.pem"))
        .args([aud, sub, client_id, scope])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "OK",
        "PyJWT refused the token: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn curl_gets_a_certificate_bound_token_that_pyjwt_verifies() {
    let (ca, _) = shop(&[], &[("frontend", FRONTEND)]).await;
    ca.bundle_file().await;
    // Exactly the README's request.
    let r = curl(
        &ca,
        Some("frontend"),
        "/token",
        &[
            "-d",
            "grant_type=client_credentials",
            "-d",
            "client_id=frontend",
            "-d",
            "scope=orders:read",
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.headers.contains("cache-control: no-store"),
        "{}",
        r.headers
    );
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["scope"], "orders:read");
    let expires_in = r.body["expires_in"].as_i64().unwrap();
    assert!((595..=600).contains(&expires_in), "expires_in {expires_in}");
    let token = r.body["access_token"].as_str().unwrap();
    pyjwt_verify(
        &ca,
        token,
        "frontend",
        ORDERS,
        FRONTEND,
        "frontend",
        "orders:read",
    );

    // The token never reaches the audit log; the grant does.
    let log = std::fs::read_to_string(ca.data_dir.join("audit.log")).unwrap();
    assert!(!log.contains(token));
    let last = ca.audit().pop().unwrap();
    assert_eq!(last["event"], "token_grant");
    assert_eq!(last["outcome"], "granted");
    assert_eq!(last["audience"], ORDERS);
    assert_eq!(last["scope_granted"], "orders:read");

    // `meshid token` does the same from the command line.
    let dir = ca.work.join("frontend");
    let out = run(&[
        "token",
        "--ca-http",
        &format!("localhost:{}", ca.http_addr.port()),
        "--ca-bundle",
        ca.work.join("bundle.pem").to_str().unwrap(),
        "--cert",
        dir.join("svid.pem").to_str().unwrap(),
        "--key",
        dir.join("svid_key.pem").to_str().unwrap(),
        "--scope",
        "orders:read",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    pyjwt_verify(
        &ca,
        token.trim(),
        "frontend",
        ORDERS,
        FRONTEND,
        "frontend",
        "orders:read",
    );
    let out = run(&[
        "token",
        "--ca-http",
        &format!("localhost:{}", ca.http_addr.port()),
        "--ca-bundle",
        ca.work.join("bundle.pem").to_str().unwrap(),
        "--cert",
        dir.join("svid.pem").to_str().unwrap(),
        "--key",
        dir.join("svid_key.pem").to_str().unwrap(),
        "--scope",
        "orders:write",
    ])
    .await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid_scope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metadata_and_jwks_describe_the_issuer() {
    let (ca, _) = shop(&["--token-alg", "EdDSA"], &[("frontend", FRONTEND)]).await;
    ca.bundle_file().await;
    let meta = curl(&ca, None, "/.well-known/oauth-authorization-server", &[]);
    assert_eq!(meta.status, 200);
    let iss = format!("https://localhost:{}", ca.http_addr.port());
    assert_eq!(meta.body["issuer"], iss.as_str());
    assert_eq!(meta.body["token_endpoint"], format!("{iss}/token"));
    assert_eq!(
        meta.body["tls_client_certificate_bound_access_tokens"],
        true
    );
    assert_eq!(
        meta.body["grant_types_supported"],
        serde_json::json!(["client_credentials"])
    );
    let jwks = curl(&ca, None, "/.well-known/jwks.json", &[]);
    let key = &jwks.body["keys"][0];
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["alg"], "EdDSA");
    assert!(key.get("d").is_none(), "never a private part in the JWKS");
    let r = curl(
        &ca,
        Some("frontend"),
        "/token",
        &[
            "-d",
            "grant_type=client_credentials",
            "-d",
            "scope=orders:read",
        ],
    );
    pyjwt_verify(
        &ca,
        r.body["access_token"].as_str().unwrap(),
        "frontend",
        ORDERS,
        FRONTEND,
        "frontend",
        "orders:read",
    );
}

#[tokio::test]
async fn refusals_carry_their_rfc6749_code() {
    let stranger = "spiffe://cluster.local/ns/other/sa/stranger";
    let (ca, _) = shop(&[], &[("frontend", FRONTEND), ("stranger", stranger)]).await;
    ca.bundle_file().await;
    let cases: &[(Option<&str>, &[&str], u16, &str)] = &[
        (
            None,
            &[
                "-d",
                "grant_type=client_credentials",
                "-d",
                "scope=orders:read",
            ],
            401,
            "invalid_client",
        ),
        (
            Some("frontend"),
            &[
                "-d",
                "grant_type=client_credentials",
                "-d",
                "client_id=billing",
                "-d",
                "scope=orders:read",
            ],
            401,
            "invalid_client",
        ),
        (
            Some("frontend"),
            &[
                "-d",
                "grant_type=client_credentials",
                "-d",
                "scope=orders:write",
            ],
            400,
            "invalid_scope",
        ),
        (
            Some("frontend"),
            &[
                "-d",
                "grant_type=client_credentials",
                "-d",
                "scope=orders:read billing:charge",
            ],
            400,
            "invalid_scope",
        ),
        (
            Some("frontend"),
            &["-d", "grant_type=client_credentials"],
            400,
            "invalid_scope",
        ),
        (
            Some("frontend"),
            &["-d", "grant_type=password", "-d", "scope=orders:read"],
            400,
            "unsupported_grant_type",
        ),
        (
            Some("frontend"),
            &["-d", "scope=orders:read"],
            400,
            "invalid_request",
        ),
        (
            Some("frontend"),
            &[
                "-d",
                "grant_type=client_credentials",
                "-d",
                "scope=orders:read",
                "-d",
                "scope=orders:read",
            ],
            400,
            "invalid_request",
        ),
        (
            Some("frontend"),
            &["-H", "content-type: application/json", "--data-raw", "{}"],
            400,
            "invalid_request",
        ),
        (
            Some("stranger"),
            &[
                "-d",
                "grant_type=client_credentials",
                "-d",
                "scope=orders:read",
            ],
            400,
            "unauthorized_client",
        ),
    ];
    for (who, args, status, code) in cases {
        let r = curl(&ca, *who, "/token", args);
        assert_eq!(
            (r.status, r.body["error"].as_str().unwrap_or("")),
            (*status, *code),
            "{args:?}: {}",
            r.body
        );
        assert!(
            !r.body["error_description"]
                .as_str()
                .unwrap_or("")
                .is_empty(),
            "a description says why"
        );
        assert!(r.headers.contains("cache-control: no-store"));
    }
    let refused = ca
        .audit()
        .iter()
        .filter(|l| l["event"] == "token_grant" && l["outcome"] == "refused")
        .count();
    assert_eq!(refused, cases.len(), "one audit line per refusal");
    // And the CA still grants.
    let r = curl(
        &ca,
        Some("frontend"),
        "/token",
        &[
            "-d",
            "grant_type=client_credentials",
            "-d",
            "scope=orders:read",
        ],
    );
    assert_eq!(r.status, 200);

    // The CA's /metrics counts grants, denials by RFC 6749 code, and issuances.
    let out = Command::new("curl")
        .args(["-sS", &format!("http://{}/metrics", ca.admin_addr)])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    for line in [
        r#"meshid_ca_token_denials_total{reason="invalid_scope"} 3"#,
        r#"meshid_ca_token_denials_total{reason="invalid_client"} 2"#,
        r#"meshid_ca_token_denials_total{reason="invalid_request"} 3"#,
        r#"meshid_ca_token_denials_total{reason="unsupported_grant_type"} 1"#,
        r#"meshid_ca_token_denials_total{reason="unauthorized_client"} 1"#,
        r#"meshid_ca_token_grants_total{audience_kind="service"} 1"#,
        r#"meshid_ca_svid_issued_total{attestation="join_token"} 2"#,
        "meshid_ca_policy_sequence 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("meshid_ca_intermediate_expiry_seconds "),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_token_endpoint_is_rate_limited_per_client() {
    let (ca, _) = shop(&["--token-rate-limit", "2"], &[("frontend", FRONTEND)]).await;
    ca.bundle_file().await;
    let form = [
        "-d",
        "grant_type=client_credentials",
        "-d",
        "scope=orders:read",
    ];
    let statuses: Vec<Reply> = (0..5)
        .map(|_| curl(&ca, Some("frontend"), "/token", &form))
        .collect();
    let limited = statuses
        .iter()
        .find(|r| r.status == 429)
        .expect("a 429 within 5 quick requests at 2/s");
    assert!(
        limited.headers.contains("retry-after: 1"),
        "{}",
        limited.headers
    );
    assert!(statuses[0].status == 200);
}

async fn client_as(ca: &Ca, who: &str) -> pb::ca_client::CaClient<tonic::transport::Channel> {
    let dir = ca.work.join(who);
    let svid = files::read(&dir, TrustDomain::parse("cluster.local").unwrap()).unwrap();
    let key =
        rustls_pki_types::pem::PemObject::from_pem_slice(svid.key_pem.expose().as_bytes()).unwrap();
    let ck = meshid_proto::tls::certified_key(svid.chain.clone(), key).unwrap();
    CaClient::new(&ca.addr(), svid.bundle.clone())
        .unwrap()
        .connect(Some(CertSlot::new(ck)))
        .await
        .unwrap()
}

#[tokio::test]
async fn sidecars_get_tokens_and_the_directory_over_grpc() {
    let (ca, _) = shop(&[], &[("frontend", FRONTEND)]).await;
    let mut c = client_as(&ca, "frontend").await;
    let t = c
        .issue_token(pb::IssueTokenRequest {
            scope: "orders:read".into(),
            audience: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.token_type, "Bearer");

    // The sidecar-side verifier accepts it with the CA's JWKS, bound to frontend's certificate.
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(
        &c.get_jwks(pb::GetJwksRequest {})
            .await
            .unwrap()
            .into_inner()
            .json,
    )
    .unwrap();
    let mut dirs = c
        .watch_directory(pb::WatchDirectoryRequest {})
        .await
        .unwrap()
        .into_inner();
    let dir = Directory::try_from(dirs.message().await.unwrap().unwrap()).unwrap();
    assert_eq!(dir.service("orders").unwrap().id.to_string(), ORDERS);
    assert_eq!(dir.service("orders").unwrap().routes.len(), 3);
    let verifier = TokenVerifier::new(dir.token_issuer.clone(), ORDERS, Arc::new(StaticJwks(jwks)));
    let leaf =
        meshid_proto::pem::decode_certs(&std::fs::read(ca.work.join("frontend/svid.pem")).unwrap())
            .unwrap();
    let read = Scope::parse("orders:read").unwrap();
    let v = verifier
        .verify(&t.access_token, &leaf[0], Some(&read), SystemTime::now())
        .await
        .unwrap();
    assert_eq!(v.claims.sub, FRONTEND);

    let err = c
        .issue_token(pb::IssueTokenRequest {
            scope: "orders:write".into(),
            audience: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().starts_with("invalid_scope"),
        "{}",
        err.message()
    );

    // Without a client certificate there is no caller to grant to.
    let pem = std::fs::read(ca.bundle_file().await).unwrap();
    let bundle = TrustBundle::from_pem(TrustDomain::parse("cluster.local").unwrap(), &pem).unwrap();
    let mut anon = CaClient::new(&ca.addr(), bundle)
        .unwrap()
        .connect(None)
        .await
        .unwrap();
    let err = anon
        .issue_token(pb::IssueTokenRequest {
            scope: "orders:read".into(),
            audience: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

/// Poll the token endpoint until `scope` gets `status`, or fail after 15 s.
async fn until_status(ca: &Ca, scope: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = curl(
            ca,
            Some("frontend"),
            "/token",
            &[
                "-d",
                "grant_type=client_credentials",
                "-d",
                &format!("scope={scope}"),
            ],
        );
        if r.status == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{scope} still answers {} after 15 s: {}",
            r.status,
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn policy_changes_apply_and_bad_ones_are_refused_with_the_line() {
    let (ca, policy) = shop(&[], &[("frontend", FRONTEND)]).await;
    ca.bundle_file().await;
    let mut c = client_as(&ca, "frontend").await;
    let mut dirs = c
        .watch_directory(pb::WatchDirectoryRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = dirs.message().await.unwrap().unwrap();
    until_status(&ca, "orders:write", 400).await;

    // A good change: frontend may now write orders. Applied without a restart, and streamed.
    let text = std::fs::read_to_string(&policy).unwrap();
    let granted = text.replace(
        "frontend: [orders:read]",
        "frontend: [orders:read, orders:write]",
    );
    assert_ne!(granted, text);
    std::fs::write(&policy, &granted).unwrap();
    until_status(&ca, "orders:write", 200).await;
    let second = dirs.message().await.unwrap().unwrap();
    assert_eq!(second.sequence, first.sequence + 1);

    // A bad change (an unknown caller) that would also revoke frontend's write scope: refused
    // with its line, and the last good policy stays (so orders:write is still granted; had the
    // broken policy been applied, it would not be).
    let broken = granted
        .replace(
            "billing:  [orders:read, orders:write]",
            "biling:  [orders:read]",
        )
        .replace(
            "frontend: [orders:read, orders:write]",
            "frontend: [orders:read]",
        );
    assert_ne!(broken, granted);
    std::fs::write(&policy, &broken).unwrap();
    let line = broken.lines().position(|l| l.contains("biling:")).unwrap() + 1;
    let deadline = Instant::now() + Duration::from_secs(15);
    // (A plain write is not atomic: the CA may first see a half-written file, refuse that
    // too, and keep the last good policy; what matters is the refusal naming the line.)
    let want = format!(
        "policy refused, the last good policy stays in force: line {line}: service orders: caller"
    );
    let log = loop {
        let log = ca.log();
        if log.contains(&want) {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal naming line {line} logged: {log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(log.contains("ERROR"), "{log}");
    until_status(&ca, "orders:write", 200).await;
    // ... and no new directory went out to the sidecars.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), dirs.message())
            .await
            .is_err(),
        "a refused policy was streamed to the sidecars"
    );

    // Kubernetes-style update: the file is a symlink into a directory that is swapped whole.
    let data = ca.work.join("..2026_v2");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("policy.yaml"), &text).unwrap();
    std::fs::remove_file(&policy).unwrap();
    let tmp_link = ca.work.join("..data_tmp");
    std::os::unix::fs::symlink("..2026_v2", &tmp_link).unwrap();
    std::fs::rename(&tmp_link, ca.work.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.yaml", &policy).unwrap();
    until_status(&ca, "orders:write", 400).await;
}
