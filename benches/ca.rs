//! CA throughput on one core, next to the raw ECDSA P-256 rate of `openssl speed` on the same
//! machine: `cargo bench --bench ca`.
//!
//! Measures, in process and on a single-threaded runtime pinned to one CPU (via `taskset`):
//! - token grants: decide against the policy, mint an ES256 JWT, write the audit line;
//! - SVID issuances: parse and verify the CSR, attest a join token from the data directory,
//!   sign, check the profile, write the audit line;
//! - token verification in a sidecar, uncached (signature check) and cached.
//!
//! No assertions: these are figures to compare, not tests.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshid_ca::attest::join_token;
use meshid_ca::ca::{CaCore, Proof, TokenParams};
use meshid_ca::config::{CaConfig, CaSource, K8sConfig};
use meshid_ca::store::FsStore;
use meshid_ca::token::TokenAlg;
use meshid_proto::directory::Scope;
use meshid_proto::token::{StaticJwks, TokenVerifier};
use meshid_proto::{SpiffeId, SystemClock, TrustDomain};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};

const SECONDS: f64 = 3.0;

fn pin_to_one_core() {
    if std::env::var_os("MESHID_BENCH_PINNED").is_some() {
        return;
    }
    let me = std::env::current_exe().expect("own path");
    let args: Vec<String> = std::env::args().skip(1).collect();
    match Command::new("taskset")
        .arg("-c")
        .arg("0")
        .arg(&me)
        .args(&args)
        .env("MESHID_BENCH_PINNED", "1")
        .status()
    {
        Ok(status) => std::process::exit(status.code().unwrap_or(1)),
        Err(_) => eprintln!("taskset not found: running unpinned"),
    }
}

/// Run `op` repeatedly for SECONDS; operations per second.
async fn rate<F, Fut>(mut op: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..50 {
        op().await;
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < SECONDS {
        for _ in 0..50 {
            op().await;
        }
        n += 50;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn openssl_p256() -> Option<(f64, f64)> {
    let out = Command::new("taskset")
        .args(["-c", "0", "openssl", "speed", "-seconds", "3", "ecdsap256"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("nistp256"))?;
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let n = nums.len();
    (n >= 2).then(|| (nums[n - 2], nums[n - 1]))
}

fn main() {
    // `cargo test --all-targets` runs bench targets too, without `--bench`: nothing to measure.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benches/ca.rs measures only under `cargo bench --bench ca`");
        return;
    }
    pin_to_one_core();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("policy.yaml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/base/policy.yaml"),
        &policy,
    )
    .unwrap();
    let td = TrustDomain::parse("cluster.local").unwrap();
    let config = CaConfig {
        limits: meshid_proto::serve::Limits::default(),
        audit_window: Duration::from_secs(10),
        data_dir: tmp.path().join("ca"),
        store: meshid_ca::config::StoreConfig::DataDir,
        replica: "bench".into(),
        trust_domain: td.clone(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        svid_ttl: Duration::from_secs(3600),
        source: CaSource::Generate,
        k8s: K8sConfig::Disabled,
        dns_names: vec![],
        ip_addresses: vec![],
        http_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        policy: Some(policy),
        token_issuer: "https://localhost:8444".into(),
        token_ttl: Duration::from_secs(300),
        token_rate_limit: u32::MAX,
        token_alg: TokenAlg::Es256,
        inject: Default::default(),
        rotation: Default::default(),
    };
    let core = CaCore::open(config, Arc::new(SystemClock)).unwrap();
    let store = FsStore::open(tmp.path().join("ca")).unwrap();
    let frontend = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").unwrap();
    let token = join_token::create(
        &store,
        &frontend,
        Duration::from_secs(3600),
        true,
        SystemTime::now(),
    )
    .unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();

    let issuances = rate(|| async {
        core.issue(Some(Proof::JoinToken(token.clone())), &csr, None)
            .await
            .unwrap();
    })
    .await;

    let svid = core
        .issue(Some(Proof::JoinToken(token.clone())), &csr, None)
        .await
        .unwrap();
    let chain = svid.chain.clone();
    let grants = rate(|| async {
        let params = TokenParams {
            grant_type: Some("client_credentials"),
            scope: Some("orders:read"),
            ..Default::default()
        };
        core.grant(Some(&chain), params, None).await.unwrap();
    })
    .await;

    let params = TokenParams {
        grant_type: Some("client_credentials"),
        scope: Some("orders:read"),
        ..Default::default()
    };
    let access = core
        .grant(Some(&chain), params, None)
        .await
        .unwrap()
        .access_token;
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(core.jwks()).unwrap();
    let source = Arc::new(StaticJwks(jwks));
    let orders = "spiffe://cluster.local/ns/shop/sa/orders";
    let read = Scope::parse("orders:read").unwrap();
    let uncached = rate(|| async {
        let v = TokenVerifier::new("https://localhost:8444", orders, source.clone());
        v.verify(access.expose(), &chain[0], Some(&read), SystemTime::now())
            .await
            .unwrap();
    })
    .await;
    let v = TokenVerifier::new("https://localhost:8444", orders, source.clone());
    let cached = rate(|| async {
        v.verify(access.expose(), &chain[0], Some(&read), SystemTime::now())
            .await
            .unwrap();
    })
    .await;

    println!("meshid CA on one core ({SECONDS} s per figure)");
    println!("{:<44} {:>12}", "operation", "per second");
    println!(
        "{:<44} {:>12.0}",
        "SVID issuance (CSR verify + sign + audit)", issuances
    );
    println!(
        "{:<44} {:>12.0}",
        "token grant (decide + ES256 sign + audit)", grants
    );
    println!(
        "{:<44} {:>12.0}",
        "token verify, uncached (ES256 verify)", uncached
    );
    println!("{:<44} {:>12.0}", "token verify, cached", cached);
    match openssl_p256() {
        Some((sign, verify)) => {
            // One issuance costs one verify (the CSR) and one sign; the raw ceiling is
            // 1 / (1/sign + 1/verify).
            let raw_issue = 1.0 / (1.0 / sign + 1.0 / verify);
            println!("{:<44} {:>12.0}", "openssl speed ecdsap256: sign", sign);
            println!("{:<44} {:>12.0}", "openssl speed ecdsap256: verify", verify);
            println!(
                "{:<44} {:>12.0}",
                "raw ceiling for issuance (verify + sign)", raw_issue
            );
            println!(
                "ratio: token grants / openssl sign          = {:.2}",
                grants / sign
            );
            println!(
                "ratio: issuances / raw verify+sign ceiling  = {:.2}",
                issuances / raw_issue
            );
            println!(
                "ratio: uncached verify / openssl verify     = {:.2}",
                uncached / verify
            );
        }
        None => println!("openssl speed not available: no raw figures to compare"),
    }
}
