//! Life over time: restarts keep the CA, renewals keep the identity, the bundle stream starts
//! with the current bundle.

use meshid::identity::client::CaClient;
use meshid_proto::pb;
use meshid_proto::{TrustBundle, TrustDomain};

use crate::support::{Ca, check_svid_with_python, run, run_ok};

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

#[tokio::test]
async fn a_restart_keeps_the_root_and_a_renewal_keeps_the_id() {
    let ca = Ca::start(&[]).await;
    let before = run_ok(&["ca", "bundle", "--data-dir", ca.data_dir()]).await;
    let token = ca.join_token(ORDERS, &[]).await;
    let (out, dir) = ca.fetch(&token, "orders").await;
    assert!(out.status.success());
    let first_cert = std::fs::read_to_string(dir.join("svid.pem")).unwrap();
    let first_key = std::fs::read_to_string(dir.join("svid_key.pem")).unwrap();

    let work = ca.work.clone();
    let (data_dir, tmp) = ca.stop().await;
    let ca = Ca::start_in(data_dir, work, &[]).await;
    let after = run_ok(&["ca", "bundle", "--data-dir", ca.data_dir()]).await;
    assert_eq!(before, after, "the same data directory keeps the same root");

    let renewed = run_ok(&[
        "svid",
        "renew",
        "--ca",
        &ca.addr(),
        "--cert-dir",
        dir.to_str().unwrap(),
    ])
    .await;
    assert!(renewed.contains(ORDERS), "{renewed}");
    assert_ne!(
        std::fs::read_to_string(dir.join("svid.pem")).unwrap(),
        first_cert
    );
    assert_ne!(
        std::fs::read_to_string(dir.join("svid_key.pem")).unwrap(),
        first_key,
        "renewal rotates the key"
    );
    check_svid_with_python(&dir.join("svid.pem"), &dir.join("bundle.pem"), ORDERS, 3600);

    let last = ca.audit().pop().unwrap();
    assert_eq!(last["event"], "x509_svid_renew");
    assert_eq!(last["attestation"], "x509_svid");
    assert_eq!(last["spiffe_id"], ORDERS);
    drop(tmp);
}

#[tokio::test]
async fn the_bundle_stream_starts_with_the_current_bundle() {
    let ca = Ca::start(&[]).await;
    let pem = std::fs::read(ca.bundle_file().await).unwrap();
    let bundle = TrustBundle::from_pem(TrustDomain::parse("cluster.local").unwrap(), &pem).unwrap();
    let mut c = CaClient::new(&ca.addr(), bundle.clone())
        .unwrap()
        .connect(None)
        .await
        .unwrap();
    let unary = c
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    // The stream holds a connection open for good: only for workloads with an SVID.
    let refused = c
        .watch_bundle(pb::GetBundleRequest {})
        .await
        .expect_err("an anonymous WatchBundle is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(
        refused.message().contains("WatchBundle") && refused.message().contains("needs an SVID"),
        "{refused:?}"
    );
    let token = ca
        .join_token("spiffe://cluster.local/ns/shop/sa/orders", &[])
        .await;
    let (out, dir) = ca.fetch(&token, "orders").await;
    assert!(out.status.success());
    let svid =
        meshid::identity::files::read(&dir, TrustDomain::parse("cluster.local").unwrap()).unwrap();
    let key =
        rustls_pki_types::pem::PemObject::from_pem_slice(svid.key_pem.expose().as_bytes()).unwrap();
    let ck = meshid_proto::tls::certified_key(svid.chain.clone(), key).unwrap();
    let mut c = CaClient::new(&ca.addr(), bundle.clone())
        .unwrap()
        .connect(Some(meshid_proto::tls::CertSlot::new(ck)))
        .await
        .unwrap();
    let mut stream = c
        .watch_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first bundle");
    assert_eq!(first, unary);
    assert_eq!(first.trust_domain, "cluster.local");
    assert_eq!(
        first.roots,
        bundle.roots.iter().map(|r| r.to_vec()).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn bad_flags_stop_start_up_with_a_message_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let out = run(&["ca", "serve", "--data-dir", dir, "--svid-ttl", "10s"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--svid-ttl 10s is below the minimum of 1m"),
        "{err}"
    );
    let out = run(&[
        "ca",
        "serve",
        "--data-dir",
        dir,
        "--trust-domain",
        "Bad Domain",
    ])
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--trust-domain") && err.contains("only lowercase letters"),
        "{err}"
    );
    let out = run(&["ca", "bundle", "--data-dir", dir]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("{dir} holds no CA yet")), "{err}");
    assert!(out.stdout.is_empty(), "no bundle is printed");
}
