//! An anonymous client floods the CA with refused requests: the CA keeps serving, the audit log
//! accounts for every refusal in a handful of aggregated lines, and the log is not flooded.

use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tonic::Code;

use crate::refusals::{client, issue};
use crate::support::{Ca, set_child_env};

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const FLOOD: usize = 500;
const UNKNOWN: &str = "mjt.ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ";

fn csr() -> Vec<u8> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

/// The refusals for an unknown join token the audit log accounts for, and in how many lines.
fn unknown_token_refusals(ca: &Ca) -> (u64, usize) {
    let lines: Vec<serde_json::Value> = ca
        .audit()
        .into_iter()
        .filter(|l| {
            l["event"] == "x509_svid_issue"
                && l["outcome"] == "refused"
                && l["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("not known"))
        })
        .collect();
    let n = lines.iter().map(|l| l["count"].as_u64().unwrap_or(1)).sum();
    (n, lines.len())
}

#[tokio::test]
async fn a_flood_of_refused_requests_is_aggregated_and_the_ca_keeps_serving() {
    // A short aggregation window, so the test does not wait the default 10 s.
    set_child_env(&[("MESHID_AUDIT_WINDOW", "1s")]);
    let ca = Ca::start(&[]).await;
    let c = client(&ca).await;
    let csr = csr();

    // 500 refused issuances from one client, 16 at a time over its one connection.
    let mut flood = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (mut c, csr) = (c.clone(), csr.clone());
        flood.spawn(async move {
            for _ in (worker..FLOOD).step_by(16) {
                let err = issue(&mut c, UNKNOWN, csr.clone()).await.unwrap_err();
                assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
            }
        });
    }
    while let Some(done) = flood.join_next().await {
        done.unwrap();
    }

    // Right after, a valid request is served (and its issuance is audited before the reply).
    let token = ca.join_token(ORDERS, &[]).await;
    let svid = issue(&mut c.clone(), &token, csr.clone()).await.unwrap();
    assert_eq!(svid.spiffe_id, ORDERS);
    let issued = ca
        .audit()
        .into_iter()
        .filter(|l| l["outcome"] == "issued" && l["spiffe_id"] == ORDERS)
        .count();
    assert_eq!(issued, 1, "an issuance is written before its reply leaves");

    // Every refusal is accounted for once the windows have ended (with the default window too,
    // only slower).
    let deadline = Instant::now() + Duration::from_secs(40);
    let (accounted, lines) = loop {
        let (n, lines) = unknown_token_refusals(&ca);
        if n >= FLOOD as u64 {
            break (n, lines);
        }
        assert!(
            Instant::now() < deadline,
            "the audit log accounts for {n} of {FLOOD} refusals in {lines} lines"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(accounted, FLOOD as u64, "each refusal counted exactly once");
    assert!(lines <= 50, "{lines} audit lines for {FLOOD} refusals");

    let log = ca.log();
    let warns = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(
        warns <= 50,
        "{warns} WARN lines for {FLOOD} refusals:\n{log}"
    );
    assert!(
        !log.contains(UNKNOWN)
            && !std::fs::read_to_string(ca.data_dir.join("audit.log"))
                .unwrap()
                .contains(UNKNOWN),
        "no join token in the log or the audit log"
    );
}
