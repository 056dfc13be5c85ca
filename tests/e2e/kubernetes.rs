//! Kubernetes attestation. No API server can run here, so TokenReview goes to a fake that
//! speaks the real wire format (HTTPS, `authentication.k8s.io/v1` TokenReview JSON, bearer
//! authentication of the caller); offline validation uses a JWKS and tokens shaped exactly
//! like the kubelet's projected ServiceAccount tokens.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::json;

use crate::support::{Ca, run, stderr};

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
use crate::fake_k8s::{CA_CREDENTIAL, Tokens};

async fn fetch_with_k8s_token(ca: &Ca, name: &str, token: &str) -> (std::process::Output, PathBuf) {
    let bundle = ca.bundle_file().await;
    let token_file = ca.work.join(format!("{name}.token"));
    std::fs::write(&token_file, token).unwrap();
    let out_dir = ca.work.join(name);
    let out = run(&[
        "svid",
        "fetch",
        "--ca",
        &ca.addr(),
        "--ca-bundle",
        bundle.to_str().unwrap(),
        "--k8s-token-file",
        token_file.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--timeout",
        "5s",
    ])
    .await;
    (out, out_dir)
}

#[tokio::test]
async fn tokenreview_attests_service_accounts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tokens = Tokens::new();
    tokens.insert(
        "good".into(),
        (
            "system:serviceaccount:shop:orders".into(),
            vec!["meshid-ca".into()],
        ),
    );
    tokens.insert(
        "other-aud".into(),
        (
            "system:serviceaccount:shop:orders".into(),
            vec!["https://kubernetes.default.svc".into()],
        ),
    );
    tokens.insert(
        "a-node".into(),
        ("system:node:worker-1".into(), vec!["meshid-ca".into()]),
    );
    let api = crate::fake_k8s::start(tmp.path(), tokens).await;
    let credential = tmp.path().join("ca-token");
    std::fs::write(&credential, format!("{CA_CREDENTIAL}\n")).unwrap();
    let ca = Ca::start_in(
        tmp.path().join("ca"),
        tmp.path().to_path_buf(),
        &[
            "--k8s-api",
            &format!("https://127.0.0.1:{}", api.addr.port()),
            "--k8s-api-ca",
            api.ca_pem.to_str().unwrap(),
            "--k8s-api-token-file",
            credential.to_str().unwrap(),
        ],
    )
    .await;

    let (out, dir) = fetch_with_k8s_token(&ca, "good", "good").await;
    assert!(out.status.success(), "{}", stderr(&out));
    let info = meshid_proto::svid::inspect(
        &meshid_proto::pem::decode_certs(&std::fs::read(dir.join("svid.pem")).unwrap()).unwrap()[0],
    )
    .unwrap();
    assert_eq!(info.spiffe_id.to_string(), ORDERS);
    assert_eq!(ca.audit().last().unwrap()["attestation"], "k8s_sat");

    let (out, _) = fetch_with_k8s_token(&ca, "aud", "other-aud").await;
    assert!(
        stderr(&out).contains("Unauthenticated")
            && stderr(&out).contains("audience is not meshid-ca"),
        "{}",
        stderr(&out)
    );
    let (out, _) = fetch_with_k8s_token(&ca, "bad", "forged.token.value").await;
    assert!(
        stderr(&out).contains("Unauthenticated") && stderr(&out).contains("invalid bearer token"),
        "{}",
        stderr(&out)
    );
    let (out, _) = fetch_with_k8s_token(&ca, "node", "a-node").await;
    assert!(
        stderr(&out).contains("is not a service account"),
        "{}",
        stderr(&out)
    );

    // The CA's own credential is wrong: the API server answers 401 and the caller is told to retry.
    std::fs::write(&credential, "stale").unwrap();
    let (out, _) = fetch_with_k8s_token(&ca, "stale", "good").await;
    assert!(
        stderr(&out).contains("Unavailable") && stderr(&out).contains("Kubernetes API unavailable"),
        "{}",
        stderr(&out)
    );
    let log = std::fs::read_to_string(ca.data_dir.join("audit.log")).unwrap();
    assert!(
        !log.contains("other-aud") && !log.contains("forged.token.value"),
        "tokens never reach the audit log"
    );
}

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

fn sa_token(key: &KeyPair, kid: &str, iss: &str, aud: &str, exp_offset: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = json!({
        "aud": [aud], "exp": now + exp_offset, "iat": now - 10, "nbf": now - 10, "iss": iss,
        "sub": "system:serviceaccount:shop:orders",
        "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "orders", "uid": "5f2b"}, "pod": {"name": "orders-0", "uid": "9a1c"}},
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()),
    )
    .unwrap()
}

#[tokio::test]
async fn offline_jwks_attests_service_accounts() {
    let tmp = tempfile::tempdir().unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let point = key.public_key_raw(); // 0x04 || X || Y
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
                                "x": b64(&point[1..33]), "y": b64(&point[33..65])}]});
    let jwks_file = tmp.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    let ca = Ca::start_in(
        tmp.path().join("ca"),
        tmp.path().to_path_buf(),
        &[
            "--k8s-jwks",
            jwks_file.to_str().unwrap(),
            "--k8s-issuer",
            ISSUER,
        ],
    )
    .await;

    let (out, _) =
        fetch_with_k8s_token(&ca, "good", &sa_token(&key, "k1", ISSUER, "meshid-ca", 600)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(ORDERS));

    let cases = [
        (
            "aud",
            sa_token(&key, "k1", ISSUER, "https://kubernetes.default.svc", 600),
            "audience is not meshid-ca",
        ),
        (
            "expired",
            sa_token(&key, "k1", ISSUER, "meshid-ca", -600),
            "token expired",
        ),
        (
            "issuer",
            sa_token(&key, "k1", "https://evil.example", "meshid-ca", 600),
            "issuer is not the cluster's",
        ),
        (
            "kid",
            sa_token(&key, "k2", ISSUER, "meshid-ca", 600),
            "not in the cluster's JWKS",
        ),
        (
            "forged",
            sa_token(
                &KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
                "k1",
                ISSUER,
                "meshid-ca",
                600,
            ),
            "signature does not verify",
        ),
        ("garbage", "not-a-jwt".to_owned(), "not a JWT"),
    ];
    for (name, token, why) in cases {
        let (out, _) = fetch_with_k8s_token(&ca, name, &token).await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name} must be refused: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("Unauthenticated") && stderr(&out).contains(why),
            "{name}: {}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn kubernetes_tokens_are_refused_when_kubernetes_is_not_configured() {
    let ca = Ca::start(&[]).await;
    let (out, _) = fetch_with_k8s_token(&ca, "nok8s", "anything").await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("FailedPrecondition") && stderr(&out).contains("not configured"),
        "{}",
        stderr(&out)
    );
}
