//! What an operator hands the CA is checked before it is trusted: a brought intermediate that
//! could not sign, or does not chain to the bundle it came with, stops `ca serve` with a message
//! naming the file and the reason; a join token for another trust domain is never printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::{Ca, free_addr, meshid, openssl_verify, run, run_ok, stderr};

/// An operator's CA material made with openssl, as an operator would make it.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A self-signed root NAME.pem / NAME.key: CA:TRUE, keyCertSign.
    fn root(&self, name: &str, cn: &str) -> PathBuf {
        let (cert, key) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.key")),
        );
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
            &format!("/O=Example Corp/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            s(&key),
            "-out",
            s(&cert),
        ]);
        cert
    }

    /// NAME.pem / NAME.key signed by root ISSUER, with exactly the extensions given.
    fn signed(&self, name: &str, issuer: &str, extensions: &str) -> (PathBuf, PathBuf) {
        let (cert, key, csr, ext) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.key")),
            self.path(&format!("{name}.csr")),
            self.path(&format!("{name}.ext")),
        );
        std::fs::write(&ext, extensions).unwrap();
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/O=Example Corp/CN={name}"),
            "-keyout",
            s(&key),
            "-out",
            s(&csr),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            s(&self.path(&format!("{issuer}.pem"))),
            "-CAkey",
            s(&self.path(&format!("{issuer}.key"))),
            "-CAserial",
            s(&self.path(&format!("{issuer}.srl"))),
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            s(&ext),
            "-out",
            s(&cert),
        ]);
        (cert, key)
    }
}

const GOOD_INTERMEDIATE: &str = "basicConstraints=critical,CA:TRUE,pathlen:0\n\
     keyUsage=critical,keyCertSign,cRLSign\n\
     subjectAltName=URI:spiffe://example.org\n";

/// `meshid ca serve` with a brought intermediate, expected to stop by itself.
async fn serve_must_refuse(
    data_dir: &Path,
    cert: &Path,
    key: &Path,
    bundle: &Path,
    extra: &[&str],
) -> Output {
    let mut cmd = meshid();
    cmd.args(["ca", "serve", "--data-dir", s(data_dir)])
        .args(["--grpc-addr", &free_addr().to_string()])
        .args(["--http-addr", &free_addr().to_string()])
        .args(["--admin-addr", &free_addr().to_string()])
        .args(["--intermediate-cert", s(cert), "--intermediate-key", s(key)])
        .args(["--upstream-bundle", s(bundle)])
        .args(extra);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("ca serve must refuse the intermediate and exit, not start")
        .unwrap();
    assert!(!out.status.success(), "ca serve exited with success");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    out
}

async fn assert_no_ca_saved(data_dir: &Path) {
    let out = run(&["ca", "bundle", "--data-dir", s(data_dir)]).await;
    assert!(
        stderr(&out).contains("holds no CA yet"),
        "a refused intermediate must not be saved: {}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_non_ca_intermediate_is_refused_at_start() {
    let pki = Pki::new();
    let root = pki.root("root", "Example Root");
    let (cert, key) = pki.signed(
        "leaf-as-intermediate",
        "root",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n",
    );
    let data_dir = pki.path("ca");
    let out = serve_must_refuse(&data_dir, &cert, &key, &root, &[]).await;
    let err = stderr(&out);
    for want in ["--intermediate-cert", s(&cert), "CA:true", "is refused"] {
        assert!(err.contains(want), "stderr lacks {want:?}: {err}");
    }
    assert_no_ca_saved(&data_dir).await;
}

#[tokio::test]
async fn an_intermediate_not_signed_by_the_upstream_bundle_is_refused() {
    let pki = Pki::new();
    pki.root("root", "Example Root");
    let (cert, key) = pki.signed("intermediate", "root", GOOD_INTERMEDIATE);
    // Same name as the real root, another key: names match, the signature does not.
    let impostor = pki.root("impostor", "Example Root");
    let data_dir = pki.path("ca");
    let out = serve_must_refuse(
        &data_dir,
        &cert,
        &key,
        &impostor,
        &["--trust-domain", "example.org"],
    )
    .await;
    let err = stderr(&out);
    for want in [
        "--intermediate-cert",
        s(&cert),
        "does not chain to --upstream-bundle",
        s(&impostor),
    ] {
        assert!(err.contains(want), "stderr lacks {want:?}: {err}");
    }
    assert_no_ca_saved(&data_dir).await;
}

#[tokio::test]
async fn an_intermediate_naming_another_trust_domain_is_refused() {
    let pki = Pki::new();
    let root = pki.root("root", "Example Root");
    let (cert, key) = pki.signed(
        "intermediate",
        "root",
        "basicConstraints=critical,CA:TRUE,pathlen:0\n\
         keyUsage=critical,keyCertSign,cRLSign\n\
         subjectAltName=URI:spiffe://other.domain\n",
    );
    let data_dir = pki.path("ca");
    let out = serve_must_refuse(&data_dir, &cert, &key, &root, &[]).await;
    let err = stderr(&out);
    for want in [
        "--intermediate-cert",
        "spiffe://other.domain",
        "trust domain cluster.local",
    ] {
        assert!(err.contains(want), "stderr lacks {want:?}: {err}");
    }
    assert_no_ca_saved(&data_dir).await;
}

#[tokio::test]
async fn a_sound_brought_intermediate_serves_and_holds_tokens_to_its_trust_domain() {
    let pki = Pki::new();
    let unrelated = pki.root("unrelated", "Unrelated Root");
    let root = pki.root("root", "Example Root");
    let (cert, key) = pki.signed("intermediate", "root", GOOD_INTERMEDIATE);
    // The signing root is not first in the bundle.
    let bundle = pki.path("upstream.pem");
    std::fs::write(
        &bundle,
        std::fs::read_to_string(&unrelated).unwrap() + &std::fs::read_to_string(&root).unwrap(),
    )
    .unwrap();
    let ca = Ca::start_in(
        pki.path("ca"),
        pki.dir.path().to_path_buf(),
        &[
            "--trust-domain",
            "example.org",
            "--intermediate-cert",
            s(&cert),
            "--intermediate-key",
            s(&key),
            "--upstream-bundle",
            s(&bundle),
        ],
    )
    .await;

    // join-token learns the trust domain from the CA's certificate, with no flag for it.
    let out = run(&[
        "ca",
        "join-token",
        "--data-dir",
        ca.data_dir(),
        "--spiffe-id",
        "spiffe://cluster.local/ns/shop/sa/orders",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("expected an ID in trust domain example.org"),
        "{}",
        stderr(&out)
    );

    let orders = "spiffe://example.org/ns/shop/sa/orders";
    let token = ca.join_token(orders, &[]).await;
    let bundle_pem = pki.path("bundle.pem");
    std::fs::write(
        &bundle_pem,
        run_ok(&["ca", "bundle", "--data-dir", ca.data_dir()]).await,
    )
    .unwrap();
    let out = run(&[
        "svid",
        "fetch",
        "--ca",
        &ca.addr(),
        "--ca-bundle",
        s(&bundle_pem),
        "--trust-domain",
        "example.org",
        "--join-token",
        &token,
        "--out",
        s(&pki.path("orders")),
        "--timeout",
        "5s",
    ])
    .await;
    assert!(out.status.success(), "svid fetch: {}", stderr(&out));
    // The operator's own root, not the unrelated one first in the bundle, anchors the chain.
    openssl_verify(&pki.path("orders").join("svid.pem"), &root).unwrap();
    assert!(
        openssl_verify(&pki.path("orders").join("svid.pem"), &unrelated).is_err(),
        "the chain must not verify against an unrelated root"
    );
}

#[tokio::test]
async fn a_join_token_for_another_trust_domain_is_refused_naming_the_expected_one() {
    let ca = Ca::start(&[]).await;
    let join_token = |id: &'static str| {
        let data_dir = ca.data_dir().to_owned();
        async move {
            run(&[
                "ca",
                "join-token",
                "--data-dir",
                &data_dir,
                "--spiffe-id",
                id,
            ])
            .await
        }
    };
    let out = join_token("spiffe://other.domain/ns/x/sa/y").await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    for want in [
        "--spiffe-id spiffe://other.domain/ns/x/sa/y",
        "outside this CA's trust domain",
        "trust domain cluster.local",
    ] {
        assert!(err.contains(want), "stderr lacks {want:?}: {err}");
    }
    assert!(out.stdout.is_empty(), "no token is printed");

    // A --trust-domain that contradicts the CA's certificates is an error, not an override.
    let out = run(&[
        "ca",
        "join-token",
        "--data-dir",
        ca.data_dir(),
        "--trust-domain",
        "other.domain",
        "--spiffe-id",
        "spiffe://other.domain/ns/x/sa/y",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--trust-domain other.domain is not this CA's trust domain"),
        "{}",
        stderr(&out)
    );

    let out = join_token("spiffe://cluster.local/meshid/ca").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("reserved for the CA"),
        "{}",
        stderr(&out)
    );

    let out = join_token("spiffe://cluster.local/ns/x/sa/y").await;
    assert!(out.status.success(), "{}", stderr(&out));
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
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

#[tokio::test]
async fn a_data_directory_is_never_served_as_another_trust_domain() {
    let ca = Ca::start(&[]).await;
    let (data_dir, _tmp) = ca.stop().await;
    let out = crate::support::run(&[
        "ca",
        "serve",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--trust-domain",
        "other.example",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = crate::support::stderr(&out);
    assert!(
        err.contains("holds the CA of trust domain cluster.local, not other.example"),
        "{err}"
    );
}
