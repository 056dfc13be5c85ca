//! A workload gets an SVID with a join token, as an operator would do it from a shell.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use crate::support::{Ca, check_svid_with_python, openssl_verify, run_ok};

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

#[tokio::test]
async fn svid_fetch_with_a_join_token_writes_a_valid_x509_svid() {
    let ca = Ca::start(&["--svid-ttl", "10m"]).await;
    let token = ca.join_token(ORDERS, &[]).await;
    assert!(token.len() >= 40, "a join token carries >= 256 bits");

    let (out, dir) = ca.fetch(&token, "orders").await;
    assert!(
        out.status.success(),
        "svid fetch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(ORDERS));

    let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("svid_key.pem"), 0o600);
    let bundle = ca.bundle_file().await;
    assert_eq!(
        std::fs::read(dir.join("bundle.pem")).unwrap(),
        std::fs::read(&bundle).unwrap(),
        "the bundle written by svid fetch is the CA's bundle"
    );

    // Two independent parsers agree: Python cryptography checks every profile rule and the
    // chain; openssl verifies the chain for client use.
    check_svid_with_python(&dir.join("svid.pem"), &bundle, ORDERS, 600);
    openssl_verify(&dir.join("svid.pem"), &bundle).unwrap();

    // The key on disk belongs to the certificate (openssl's view of both public keys).
    let cert_pub = openssl(&[
        "x509",
        "-noout",
        "-pubkey",
        "-in",
        dir.join("svid.pem").to_str().unwrap(),
    ]);
    let key_pub = openssl(&[
        "pkey",
        "-pubout",
        "-in",
        dir.join("svid_key.pem").to_str().unwrap(),
    ]);
    assert_eq!(cert_pub, key_pub);

    let audit = ca.audit();
    let last = audit.last().expect("an audit line");
    assert_eq!(last["event"], "x509_svid_issue");
    assert_eq!(last["outcome"], "issued");
    assert_eq!(last["attestation"], "join_token");
    assert_eq!(last["spiffe_id"], ORDERS);
    assert!(last["serial"].as_str().unwrap().len() == 32);
    let log = std::fs::read_to_string(ca.data_dir.join("audit.log")).unwrap();
    assert!(
        !log.contains(&token),
        "the audit log never holds a join token"
    );
}

#[tokio::test]
async fn stock_tls_clients_reach_the_ca_by_host_name() {
    let ca = Ca::start(&["--san", "mesh-ca.mesh-system.svc"]).await;
    let bundle = ca.bundle_file().await;
    // openssl s_client with ordinary hostname verification against the bundle.
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &ca.addr(),
            "-servername",
            "localhost",
            "-verify_hostname",
            "localhost",
        ])
        .args([
            "-verify_return_error",
            "-alpn",
            "h2",
            "-CAfile",
            bundle.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Verify return code: 0 (ok)"),
        "s_client: {text}"
    );

    // The serving certificate is the CA's own SVID, with DNS/IP SANs for stock clients.
    let start = text.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end = text.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    let cert = ca.work.join("serving.pem");
    std::fs::write(&cert, &text[start..end]).unwrap();
    let sans = openssl(&[
        "x509",
        "-noout",
        "-ext",
        "subjectAltName",
        "-in",
        cert.to_str().unwrap(),
    ]);
    for want in [
        "URI:spiffe://cluster.local/meshid/ca",
        "DNS:localhost",
        "DNS:mesh-ca.mesh-system.svc",
        "IP Address:127.0.0.1",
    ] {
        assert!(sans.contains(want), "serving cert SANs {sans} lack {want}");
    }
}

#[tokio::test]
async fn an_operators_own_root_signs_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, key) = (tmp.path().join("root.pem"), tmp.path().join("root.key"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/O=Example Corp/CN=Example Root",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        root.to_str().unwrap(),
    ]);
    let ca = Ca::start_in(
        tmp.path().join("ca"),
        tmp.path().to_path_buf(),
        &[
            "--root-cert",
            root.to_str().unwrap(),
            "--root-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let bundle = run_ok(&["ca", "bundle", "--data-dir", ca.data_dir()]).await;
    let fingerprint = |pem: &str| {
        let f = tmp.path().join("fp.pem");
        std::fs::write(&f, pem).unwrap();
        openssl(&[
            "x509",
            "-noout",
            "-fingerprint",
            "-sha256",
            "-in",
            f.to_str().unwrap(),
        ])
    };
    assert_eq!(
        fingerprint(&bundle),
        fingerprint(&std::fs::read_to_string(&root).unwrap())
    );

    let token = ca.join_token(ORDERS, &[]).await;
    let (out, dir) = ca.fetch(&token, "orders").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The operator's own root file, not ours, is the trust anchor that verifies the chain.
    openssl_verify(&dir.join("svid.pem"), &root).unwrap();
    check_svid_with_python(&dir.join("svid.pem"), &root, ORDERS, 3600);
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
