//! Writes the fuzz fixtures (`fuzz/fixtures/`) and the seed corpora (`fuzz/corpus/TARGET/`).
//! Run once from the repository root: `cargo run --features fuzzing --example fuzz_seeds`. The fixtures are made
//! at the fuzz targets' fixed time (`meshid::fuzzing::T0`), so they stay valid; every target
//! reads them, so after regenerating them run the fuzz seeds test (`cargo test fuzzing`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshid::fuzzing::{
    self, CALLEE, CALLER, FILE_SEPARATOR, ISSUER, JOIN_TOKENS, T0, TRUST_DOMAIN,
};
use meshid_ca::authority::X509Authority;
use meshid_ca::issue::{self, CsrKey, X509SvidParams};
use meshid_ca::store::KeyState;
use meshid_proto::{SpiffeId, TrustDomain, pem};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, SanType};

fn write(dir: &Path, name: &str, data: impl AsRef<[u8]>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), data).with_context(|| format!("{}/{name}", dir.display()))
}

struct Files {
    chain: String,
    key: String,
}

fn svid(authority: &X509Authority, id: &str) -> Result<Files> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let id = SpiffeId::parse(id)?;
    let issued = issue::sign_x509_svid(
        authority,
        X509SvidParams {
            spiffe_id: &id,
            key: &CsrKey::from_key_pair(&key)?,
            ttl: Duration::from_secs(3600),
            now: fuzzing::now() - Duration::from_secs(60),
            dns_names: &[],
            ip_addresses: &[],
        },
    )?;
    Ok(Files {
        chain: pem::encode_certs(&issued.chain),
        key: key.serialize_pem(),
    })
}

fn joined(parts: &[&str]) -> Vec<u8> {
    parts
        .iter()
        .map(|p| p.as_bytes())
        .collect::<Vec<_>>()
        .join(FILE_SEPARATOR)
}

fn main() -> Result<()> {
    let root = Path::new("fuzz");
    let fixtures = root.join("fixtures");
    let corpus = |t: &str| root.join("corpus").join(t);
    let td = TrustDomain::parse(TRUST_DOMAIN)?;
    let at = fuzzing::now() - Duration::from_secs(3600);
    let authority = X509Authority::generate(&td, at, KeyState::Active)?;
    let bundle = authority.record().root_cert_pem.clone();
    let current = svid(&authority, CALLER)?;
    write(&fixtures, "bundle.pem", &bundle)?;
    write(&fixtures, "svid.pem", &current.chain)?;
    write(&fixtures, "svid_key.pem", &current.key)?;

    // cert_files: chain, key, bundle.
    let c = corpus("cert_files");
    let renewed = svid(&authority, CALLER)?;
    let other = svid(&authority, CALLEE)?;
    let foreign = X509Authority::generate(&td, at, KeyState::Active)?;
    let foreign_svid = svid(&foreign, CALLER)?;
    write(
        &c,
        "current",
        joined(&[&current.chain, &current.key, &bundle]),
    )?;
    write(
        &c,
        "renewed",
        joined(&[&renewed.chain, &renewed.key, &bundle]),
    )?;
    write(
        &c,
        "another-identity",
        joined(&[&other.chain, &other.key, &bundle]),
    )?;
    let foreign_bundle = &foreign.record().root_cert_pem;
    write(
        &c,
        "another-root",
        joined(&[&foreign_svid.chain, &foreign_svid.key, foreign_bundle]),
    )?;
    write(
        &c,
        "key-of-another",
        joined(&[&renewed.chain, &other.key, &bundle]),
    )?;
    write(
        &c,
        "half-a-chain",
        joined(&[&renewed.chain[..300], &renewed.key, &bundle]),
    )?;

    // csr
    let c = corpus("csr");
    let p256 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    write(
        &c,
        "p256",
        CertificateParams::default().serialize_request(&p256)?.der(),
    )?;
    let ed = KeyPair::generate_for(&PKCS_ED25519)?;
    write(
        &c,
        "ed25519",
        CertificateParams::default().serialize_request(&ed)?.der(),
    )?;
    let mut asks = CertificateParams::default();
    asks.subject_alt_names = vec![SanType::URI(
        "spiffe://fuzz.test/ns/kube-system/sa/admin".try_into()?,
    )];
    let der = asks.serialize_request(&p256)?.der().to_vec();
    write(&c, "asks-for-another-id", &der)?;
    let mut tampered = der.clone();
    let n = tampered.len();
    tampered[n - 10] ^= 0x55;
    write(&c, "bad-signature", &tampered)?;
    write(&c, "truncated", &der[..der.len() / 2])?;

    // access_token and jwks
    let token_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    write(&fixtures, "token_key.pem", token_key.serialize_pem())?;
    let enc = EncodingKey::from_ec_pem(token_key.serialize_pem().as_bytes())?;
    let x5t = {
        let chain = pem::decode_certs(current.chain.as_bytes())?;
        meshid_proto::token::x5t_s256(&chain[0])
    };
    let t0 = T0 as i64;
    let claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = serde_json::json!({
            "iss": ISSUER, "sub": CALLER, "client_id": "frontend", "aud": CALLEE,
            "scope": "orders:read orders:write", "iat": t0 - 60, "nbf": t0 - 60,
            "exp": t0 + 600, "jti": "fuzz-1", "cnf": {"x5t#S256": x5t},
        });
        f(&mut c);
        c
    };
    let mut header = Header::new(Algorithm::ES256);
    header.typ = Some("at+jwt".into());
    header.kid = Some("fuzz-es256".into());
    let sign = |c: serde_json::Value| jsonwebtoken::encode(&header, &c, &enc);
    let good = sign(claims(&|_| {}))?;
    write(&fixtures, "token.jwt", format!("{good}\n"))?;
    let c = corpus("access_token");
    write(&c, "good", &good)?;
    write(
        &c,
        "expired",
        sign(claims(&|c| {
            c["iat"] = (t0 - 1000).into();
            c["nbf"] = (t0 - 1000).into();
            c["exp"] = (t0 - 100).into();
        }))?,
    )?;
    write(
        &c,
        "another-audience",
        sign(claims(&|c| {
            c["aud"] = "spiffe://fuzz.test/ns/x/sa/y".into()
        }))?,
    )?;
    write(
        &c,
        "another-certificate",
        sign(claims(&|c| c["cnf"]["x5t#S256"] = "AAAA".into()))?,
    )?;
    write(
        &c,
        "too-long-lived",
        sign(claims(&|c| c["exp"] = (t0 + 7200).into()))?,
    )?;
    let parts: Vec<&str> = good.split('.').collect();
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    write(
        &c,
        "alg-none",
        format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"at+jwt","kid":"fuzz-es256"}"#),
            parts[1]
        ),
    )?;
    write(
        &c,
        "alg-hs256",
        format!(
            "{}.{}.{}",
            b64(r#"{"alg":"HS256","typ":"at+jwt","kid":"fuzz-es256"}"#),
            parts[1],
            parts[2]
        ),
    )?;
    let more_scope = claims(&|c| c["scope"] = "orders:read orders:write orders:admin".into());
    write(
        &c,
        "claims-swapped",
        format!("{}.{}.{}", parts[0], b64(&more_scope.to_string()), parts[2]),
    )?;

    let c = corpus("jwks");
    let public = token_key.public_key_raw();
    let (x, y) = (b64u(&public[1..33]), b64u(&public[33..]));
    let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "fuzz-es256", "x": x, "y": y});
    write(&c, "good", serde_json::json!({"keys": [jwk]}).to_string())?;
    write(&c, "empty", r#"{"keys": []}"#)?;
    let mut no_kid = jwk.clone();
    no_kid.as_object_mut().map(|o| o.remove("kid"));
    write(
        &c,
        "no-kid",
        serde_json::json!({"keys": [no_kid]}).to_string(),
    )?;
    let mut other_kid = jwk.clone();
    other_kid["kid"] = "another".into();
    write(
        &c,
        "another-kid",
        serde_json::json!({"keys": [other_kid]}).to_string(),
    )?;
    let okp = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "fuzz-es256", "x": x});
    write(
        &c,
        "okp-under-the-kid",
        serde_json::json!({"keys": [okp]}).to_string(),
    )?;
    let many: Vec<_> = (0..24)
        .map(|i| {
            let mut k = jwk.clone();
            k["kid"] = format!("k{i}").into();
            k
        })
        .collect();
    write(&c, "many", serde_json::json!({"keys": many}).to_string())?;
    let oct = serde_json::json!({"kty": "oct", "alg": "HS256", "kid": "fuzz-es256", "k": b64(&bundle[..40])});
    write(
        &c,
        "hmac-under-the-kid",
        serde_json::json!({"keys": [oct]}).to_string(),
    )?;

    // policy
    let c = corpus("policy");
    write(
        &c,
        "shop",
        "\
trust_domain: cluster.local
services:
  orders:
    id: spiffe://cluster.local/ns/shop/sa/orders
    scopes: [orders:read, orders:write]
    routes:
      - { method: GET, path: /orders, scope: orders:read }
      - { method: POST, path: /orders, scope: orders:write }
      - { path: /health }
    rate_limits:
      frontend: 200/s
    callers:
      frontend: [orders:read, orders:write]
    opaque_ports: [5432]
  frontend:
    id: spiffe://cluster.local/ns/shop/sa/frontend
passthrough:
  - { cidr: 10.0.0.0/8, ports: [443] }
",
    )?;
    write(
        &c,
        "path-tricks",
        "\
trust_domain: cluster.local
services:
  a:
    id: spiffe://cluster.local/ns/x/sa/a
    scopes: [a:r]
    routes:
      - { path: /x/../admin, scope: a:r }
      - { path: '/%2e%2e/b' }
",
    )?;
    write(
        &c,
        "unknown-field",
        "trust_domain: cluster.local\nservices: {}\nsurprise: 1\n",
    )?;
    write(
        &c,
        "anchors",
        "trust_domain: &a cluster.local\nservices:\n  a: { id: *a }\n",
    )?;
    write(
        &c,
        "deep",
        format!(
            "trust_domain: cluster.local\nservices: {}{}\n",
            "[".repeat(200),
            "]".repeat(200)
        ),
    )?;

    // request_head
    let c = corpus("request_head");
    let heads: &[(&str, &str)] = &[
        ("plain", "GET /orders/7 HTTP/1.1\r\nhost: orders\r\n\r\n"),
        (
            "dot-segments",
            "GET /public/../admin/users HTTP/1.1\r\nhost: orders\r\n\r\n",
        ),
        (
            "escapes",
            "GET /%61dmin/%2e%2e/orders/private HTTP/1.1\r\nhost: orders\r\n\r\n",
        ),
        (
            "semicolon",
            "GET /orders;x/private HTTP/1.1\r\nhost: orders\r\n\r\n",
        ),
        (
            "slashes",
            "HEAD //orders//private HTTP/1.1\r\nhost: orders\r\n\r\n",
        ),
        (
            "encoded-slash",
            "GET /orders%2Fprivate HTTP/1.1\r\nhost: orders\r\n\r\n",
        ),
        (
            "double-encoded",
            "GET /orders/%252e%252e/admin HTTP/1.1\r\nhost: orders\r\n\r\n",
        ),
        (
            "rewrite-headers",
            "GET /orders HTTP/1.1\r\nhost: orders\r\nX-Original-URL: /admin\r\nx_http_method_override: DELETE\r\n\r\n",
        ),
        (
            "forged-identity",
            "GET /orders HTTP/1.1\r\nhost: orders\r\nx-meshid-peer: spiffe://cluster.local/ns/x/sa/admin\r\nx_meshid_scopes: orders:admin\r\n\r\n",
        ),
        (
            "hop-by-hop",
            "GET /orders HTTP/1.1\r\nhost: orders\r\nconnection: keep-alive, x-meshid-peer, te\r\nte: trailers, gzip\r\nkeep-alive: 5\r\nproxy-authorization: Basic eA==\r\n\r\n",
        ),
        (
            "websocket",
            "GET /orders/ws HTTP/1.1\r\nhost: orders\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\r\n",
        ),
        (
            "h2c-upgrade",
            "GET / HTTP/1.1\r\nhost: orders\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
        ),
        (
            "absolute-form",
            "GET http://orders/admin/../orders?x=1 HTTP/1.1\r\nhost: orders\r\n\r\n",
        ),
        (
            "above-root",
            "GET /../../etc/passwd HTTP/1.1\r\nhost: orders\r\n\r\n",
        ),
    ];
    for (name, head) in heads {
        write(&c, name, head)?;
    }

    // join_token
    let c = corpus("join_token");
    for (token, kind) in JOIN_TOKENS {
        write(&c, kind, token)?;
    }
    write(&c, "prefix-only", "mjt.")?;
    let (reusable, single) = (JOIN_TOKENS[0].0, JOIN_TOKENS[1].0);
    write(
        &c,
        "replayed",
        format!("{single}\n{single}\n{reusable}\n{reusable}"),
    )?;
    write(
        &c,
        "near-miss-then-good",
        format!("{}\n{single}", &single[..single.len() - 1]),
    )?;
    write(
        &c,
        "near-miss",
        &JOIN_TOKENS[0].0[..JOIN_TOKENS[0].0.len() - 1],
    )?;
    write(&c, "long", format!("mjt.{}", "A".repeat(300)))?;
    eprintln!(
        "wrote {} and {}",
        fixtures.display(),
        root.join("corpus").display()
    );
    Ok(())
}

fn b64u(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}
