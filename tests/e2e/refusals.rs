//! Every refusal comes with the right gRPC code and a message that says what was wrong, leaves
//! an audit line, and the CA keeps serving.

use std::time::Duration;

use meshid::identity::client::CaClient;
use meshid_proto::pb::{self, attestation::Kind, ca_client::CaClient as PbClient};
use meshid_proto::{TrustBundle, TrustDomain};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384};
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{Ca, run, stderr};

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

pub(crate) async fn client(ca: &Ca) -> PbClient<Channel> {
    let pem = std::fs::read(ca.bundle_file().await).unwrap();
    let bundle = TrustBundle::from_pem(TrustDomain::parse("cluster.local").unwrap(), &pem).unwrap();
    CaClient::new(&ca.addr(), bundle)
        .unwrap()
        .connect(None)
        .await
        .unwrap()
}

fn csr(key: &KeyPair, sans: &[&str]) -> Vec<u8> {
    let params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.serialize_request(key).unwrap().der().to_vec()
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
}

pub(crate) async fn issue(
    c: &mut PbClient<Channel>,
    token: &str,
    csr: Vec<u8>,
) -> Result<pb::SvidResponse, tonic::Status> {
    c.issue_svid(pb::IssueSvidRequest {
        attestation: Some(pb::Attestation {
            kind: Some(Kind::JoinToken(token.to_owned())),
        }),
        csr,
    })
    .await
    .map(|r| r.into_inner())
}

async fn still_serving(c: &mut PbClient<Channel>) {
    let b = c
        .get_bundle(pb::GetBundleRequest {})
        .await
        .expect("CA still serves")
        .into_inner();
    assert!(!b.roots.is_empty());
}

#[tokio::test]
async fn a_tampered_csr_is_refused_and_does_not_spend_the_token() {
    let ca = Ca::start(&[]).await;
    let mut c = client(&ca).await;
    let token = ca.join_token(ORDERS, &[]).await;
    let mut der = csr(&p256(), &["workload.example"]);
    let at = der.windows(8).position(|w| w == b"workload").unwrap();
    der[at] = b'W';
    let err = issue(&mut c, &token, der).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("signature does not verify"),
        "{}",
        err.message()
    );
    // Bad input loses nothing: the token still works with a good CSR.
    let ok = issue(&mut c, &token, csr(&p256(), &[])).await.unwrap();
    assert_eq!(ok.spiffe_id, ORDERS);
}

#[tokio::test]
async fn a_csr_asking_for_another_identity_gets_the_attested_one() {
    let ca = Ca::start(&[]).await;
    let mut c = client(&ca).await;
    let token = ca.join_token(ORDERS, &[]).await;
    let greedy = csr(
        &p256(),
        &[
            "spiffe://cluster.local/ns/kube-system/sa/admin",
            "admin.example",
        ],
    );
    let svid = issue(&mut c, &token, greedy).await.unwrap();
    assert_eq!(svid.spiffe_id, ORDERS);
    let info = meshid_proto::svid::inspect(&svid.cert_chain[0]).unwrap();
    assert_eq!(info.spiffe_id.to_string(), ORDERS);
    let (_, leaf) = x509_parser::parse_x509_certificate(&svid.cert_chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names.len(),
        1,
        "only the attested URI SAN, nothing from the CSR"
    );
}

#[tokio::test]
async fn unsupported_keys_and_malformed_requests_are_invalid_arguments() {
    let ca = Ca::start(&[]).await;
    let mut c = client(&ca).await;
    let token = ca.join_token(ORDERS, &["--reusable"]).await;

    let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let err = issue(&mut c, &token, csr(&p384, &[])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("only ECDSA P-256 and Ed25519"),
        "{}",
        err.message()
    );

    let err = issue(&mut c, &token, b"certainly not DER".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("not a DER PKCS#10"),
        "{}",
        err.message()
    );

    let err = issue(&mut c, &token, vec![0x30; 10 * 1024])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limit is 8192"), "{}", err.message());

    let err = c
        .issue_svid(pb::IssueSvidRequest {
            attestation: None,
            csr: csr(&p256(), &[]),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("no attestation"),
        "{}",
        err.message()
    );
    still_serving(&mut c).await;
}

#[tokio::test]
async fn an_oversized_request_is_refused_before_decoding() {
    let ca = Ca::start(&[]).await;
    let mut c = client(&ca).await;
    let token = ca.join_token(ORDERS, &[]).await;
    let err = issue(&mut c, &token, vec![0x30; 1024 * 1024])
        .await
        .unwrap_err();
    // tonic refuses a message over the decoding limit with OutOfRange.
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("message length too large"),
        "{}",
        err.message()
    );
    let mut c = client(&ca).await;
    still_serving(&mut c).await;
    // Nothing was spent: the token is still good.
    assert_eq!(
        issue(&mut c, &token, csr(&p256(), &[]))
            .await
            .unwrap()
            .spiffe_id,
        ORDERS
    );
}

#[tokio::test]
async fn replayed_expired_and_unknown_join_tokens_are_unauthenticated() {
    let ca = Ca::start(&[]).await;
    let token = ca.join_token(ORDERS, &[]).await;
    let (first, _) = ca.fetch(&token, "first").await;
    assert!(first.status.success());

    let (replay, dir) = ca.fetch(&token, "replay").await;
    assert_eq!(replay.status.code(), Some(1), "{}", stderr(&replay));
    assert!(
        stderr(&replay).contains("Unauthenticated"),
        "{}",
        stderr(&replay)
    );
    assert!(
        stderr(&replay).contains("already used"),
        "{}",
        stderr(&replay)
    );
    assert!(
        !dir.join("svid.pem").exists(),
        "nothing is written on a refusal"
    );

    let unknown = "mjt.ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ";
    let (out, _) = ca.fetch(unknown, "unknown").await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Unauthenticated") && stderr(&out).contains("not known"),
        "{}",
        stderr(&out)
    );

    let short = ca.join_token(ORDERS, &["--ttl", "1s"]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (out, _) = ca.fetch(&short, "expired").await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Unauthenticated") && stderr(&out).contains("expired at"),
        "{}",
        stderr(&out)
    );

    let reasons: Vec<String> = ca
        .audit()
        .iter()
        .filter(|l| l["outcome"] == "refused")
        .map(|l| l["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reasons.len(), 3, "one audit line per refusal: {reasons:?}");
    let log = std::fs::read_to_string(ca.data_dir.join("audit.log")).unwrap();
    for t in [&token, unknown, &short] {
        assert!(!log.contains(t), "no token in the audit log");
    }

    // The CA keeps serving.
    let fresh = ca.join_token(ORDERS, &[]).await;
    assert!(ca.fetch(&fresh, "fresh").await.0.status.success());

    // And counts each refusal by reason on /metrics.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", &format!("http://{}/metrics", ca.admin_addr)])
        .output()
        .await
        .unwrap();
    let metrics = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for reason in [
        "join_token_replayed",
        "join_token_unknown",
        "join_token_expired",
    ] {
        let line = format!(r#"meshid_ca_svid_refused_total{{reason="{reason}"}} 1"#);
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn the_ca_identity_cannot_be_requested_by_join_token() {
    let ca = Ca::start(&[]).await;
    let out = run(&[
        "ca",
        "join-token",
        "--data-dir",
        ca.data_dir(),
        "--spiffe-id",
        "spiffe://cluster.local/meshid/ca",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("--spiffe-id spiffe://cluster.local/meshid/ca is reserved for the CA itself"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty(), "no join token is printed");
    let out = run(&[
        "ca",
        "join-token",
        "--data-dir",
        ca.data_dir(),
        "--spiffe-id",
        "http://not/spiffe",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains(r#"--spiffe-id "http://not/spiffe": SPIFFE ID must start with spiffe://"#),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty(), "no join token is printed");
}

#[tokio::test]
async fn renewal_needs_a_current_svid_from_this_trust_domain() {
    let ca = Ca::start(&[]).await;
    let mut c = client(&ca).await;
    let err = c
        .renew_svid(pb::RenewSvidRequest {
            csr: csr(&p256(), &[]),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("current SVID"), "{}", err.message());

    // A certificate from another CA does not get through the TLS handshake.
    let other = Ca::start(&[]).await;
    let token = other.join_token(ORDERS, &[]).await;
    let (out, dir) = other.fetch(&token, "other").await;
    assert!(out.status.success());
    std::fs::copy(ca.bundle_file().await, dir.join("bundle.pem")).unwrap();
    let foreign_svid = std::fs::read(dir.join("svid.pem")).unwrap();
    let out = run(&[
        "svid",
        "renew",
        "--ca",
        &ca.addr(),
        "--cert-dir",
        dir.to_str().unwrap(),
        "--timeout",
        "1s",
    ])
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "a foreign SVID must not renew: {}",
        stderr(&out)
    );
    // The handshake is refused before any RPC; the client reports it as the renewal failing
    // (today without saying why: "CA refused (Cancelled): operation was canceled" or
    // "(Unknown): transport error"), and the SVID on disk is left as it was.
    assert!(
        stderr(&out).contains("meshid: renewing the SVID: "),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(dir.join("svid.pem")).unwrap(),
        foreign_svid,
        "nothing is written on a refusal"
    );
    assert!(
        !ca.audit()
            .iter()
            .any(|l| l["event"] == "x509_svid_renew" && l["outcome"] == "issued"),
        "no renewal granted: {:?}",
        ca.audit()
    );
    still_serving(&mut c).await;
}
