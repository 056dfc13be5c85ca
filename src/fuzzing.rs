//! The fuzz targets' bodies, one per edge where meshid parses input it does not trust. The
//! cargo-fuzz binaries in `fuzz/` call these with libFuzzer's inputs; the ordinary test suite
//! replays every seed (`fuzz/corpus/TARGET/`) and every input a fuzzer ever crashed on
//! (`fuzz/regressions/TARGET/`) through the same functions.
//!
//! Each function takes arbitrary bytes and must never panic. Beyond that, each checks what
//! must hold of every input it accepts, with a second, independent look where there is one
//! (a token it accepts has a signature that verifies under the fixture key by a direct
//! aws-lc-rs call; a path it accepts is read the same way by a server that decodes every
//! escape; an SVID it issues has the attested ID and the leaf profile). A failed check panics,
//! which libFuzzer reports as a crash.
//!
//! The fixtures (`fuzz/fixtures/`: a trust bundle, SVIDs, a token-signing key and a token)
//! were made once by `cargo run --features fuzzing --example fuzz_seeds` at the fixed time [`T0`], the time every
//! target reads as "now", so the committed seeds stay valid.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use meshid_ca::attest::join_token;
use meshid_ca::authority::X509Authority;
use meshid_ca::issue::{self, X509SvidParams};
use meshid_ca::store::{FsStore, JoinTokenRecord, KeyState, Store};
use meshid_proto::jwks::{JwksCache, StaticJwks};
use meshid_proto::token::{AccessTokenClaims, TokenVerifier};
use meshid_proto::verify::TrustSource;
use meshid_proto::{Secret, SpiffeId, TrustBundle, TrustDomain};
use rustls_pki_types::UnixTime;

use crate::identity::files;
use crate::sidecar::{identity::judge_replaced, proxy};

/// The fixed "now" of every target: 2027-01-15T08:00:00Z.
pub const T0: u64 = 1_800_000_000;
/// The trust domain of the fixtures.
pub const TRUST_DOMAIN: &str = "fuzz.test";
/// The identity the fixture SVIDs and tokens are for.
pub const CALLER: &str = "spiffe://fuzz.test/ns/shop/sa/frontend";
/// The audience of the fixture tokens (the callee).
pub const CALLEE: &str = "spiffe://fuzz.test/ns/shop/sa/orders";
pub const ISSUER: &str = "https://meshid-ca.fuzz.test";
/// What separates the three files in a cert-files input: chain, key, bundle.
pub const FILE_SEPARATOR: &[u8] = b"\n%%\n";

pub const FIXTURE_BUNDLE: &str = include_str!("../fuzz/fixtures/bundle.pem");
pub const FIXTURE_SVID: &str = include_str!("../fuzz/fixtures/svid.pem");
pub const FIXTURE_SVID_KEY: &str = include_str!("../fuzz/fixtures/svid_key.pem");
/// A PKCS#8 P-256 key: the token-signing key of the fixtures (a test key, nothing else).
pub const FIXTURE_TOKEN_KEY: &str = include_str!("../fuzz/fixtures/token_key.pem");
pub const FIXTURE_TOKEN: &str = include_str!("../fuzz/fixtures/token.jwt");

pub fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(T0)
}

fn td() -> TrustDomain {
    TrustDomain::parse(TRUST_DOMAIN).expect("the fixture trust domain is valid")
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime starts")
    });
    &RT
}

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its directory under `fuzz/corpus/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("csr", csr),
    ("access_token", access_token),
    ("jwks", jwks),
    ("policy", policy),
    ("request_head", request_head),
    ("cert_files", cert_files),
    ("join_token", join_token),
];

// ---------------------------------------------------------------------------------------------
// CSR parsing and the issuance decision

/// A CSR as the CA receives it (DER), then what the CA does with one it accepts: sign an
/// SVID for the attested identity, never one the CSR asks for.
pub fn csr(data: &[u8]) {
    static AUTHORITY: LazyLock<X509Authority> = LazyLock::new(|| {
        X509Authority::generate(&td(), now() - Duration::from_secs(60), KeyState::Active)
            .expect("a fresh authority")
    });
    let Ok(key) = issue::parse_csr(data) else {
        return;
    };
    let id = SpiffeId::parse(CALLER).expect("the fixture ID is valid");
    let svid = issue::sign_x509_svid(
        &AUTHORITY,
        X509SvidParams {
            spiffe_id: &id,
            key: &key,
            ttl: Duration::from_secs(3600),
            now: now(),
            dns_names: &[],
            ip_addresses: &[],
        },
    )
    .expect("a CSR that parsed is signed");
    issue::check_profile(&svid.chain[0], &id).expect("the SVID has the leaf profile");
    // The leaf carries the CSR's key, and only the attested ID.
    let (_, leaf) = x509_parser::parse_x509_certificate(&svid.chain[0]).expect("the leaf parses");
    use x509_parser::prelude::FromDer;
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(data)
        .expect("a CSR that parsed parses again");
    assert_eq!(
        leaf.public_key().raw,
        req.certification_request_info.subject_pki.raw,
        "the SVID certifies the CSR's key"
    );
    assert_eq!(
        meshid_proto::svid::spiffe_id_of(&svid.chain[0]).expect("the leaf names an ID"),
        id
    );
}

// ---------------------------------------------------------------------------------------------
// Access tokens

struct TokenKey {
    kid: String,
    /// Uncompressed P-256 point: 0x04 || x || y.
    public: Vec<u8>,
    jwks: JwkSet,
}

fn token_key() -> &'static TokenKey {
    static KEY: LazyLock<TokenKey> = LazyLock::new(|| {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        use rustls_pki_types::pem::PemObject;
        let der =
            rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(FIXTURE_TOKEN_KEY.as_bytes())
                .expect("the fixture token key is PKCS#8 PEM");
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.secret_pkcs8_der())
                .expect("the fixture token key is P-256");
        let public = pair.public_key().as_ref().to_vec();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let kid = "fuzz-es256".to_owned();
        let jwks = serde_json::from_value(serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&public[1..33]), "y": b64(&public[33..]),
        }]}))
        .expect("a JWKS");
        TokenKey { kid, public, jwks }
    });
    &KEY
}

/// The RFC 8705 thumbprint of the fixture SVID: the certificate the fixture token is bound to.
pub fn fixture_x5t() -> &'static str {
    static X5T: LazyLock<String> = LazyLock::new(|| {
        let chain = meshid_proto::pem::decode_certs(FIXTURE_SVID.as_bytes()).expect("fixture SVID");
        meshid_proto::token::x5t_s256(&chain[0])
    });
    &X5T
}

fn b64_part(part: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("a part of an accepted token is base64url")
}

/// A bearer token as the callee's sidecar receives it, checked as the inbound path does
/// (bound to the fixture certificate). An accepted token is checked again from scratch.
pub fn access_token(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let key = token_key();
    let keys = Arc::new(JwksCache::new(Arc::new(StaticJwks(key.jwks.clone()))));
    let verifier = TokenVerifier::with_keys(ISSUER, CALLEE, keys);
    let x5t = fixture_x5t();
    let Ok(v) = runtime().block_on(verifier.verify_bound(token, x5t, None, now())) else {
        return;
    };
    independently_valid(token, &key.public, &key.kid);
    let parts: Vec<&str> = token.split('.').collect();
    let claims: AccessTokenClaims =
        serde_json::from_slice(&b64_part(parts[1])).expect("accepted claims are the claims");
    assert_eq!(v.claims, claims, "the verifier reports the signed claims");
    assert_eq!(claims.iss, ISSUER);
    assert_eq!(claims.aud, CALLEE);
    assert_eq!(
        claims.cnf.x5t_s256, x5t,
        "bound to the presented certificate"
    );
    let now_s = T0 as i64;
    let leeway = meshid_proto::token::LEEWAY_SECONDS as i64;
    assert!(
        claims.exp.saturating_add(leeway) > now_s,
        "accepted after expiry"
    );
    assert!(
        claims.nbf.saturating_sub(leeway) <= now_s,
        "accepted before nbf"
    );
    assert!(
        claims.iat.saturating_sub(leeway) <= now_s,
        "accepted before iat"
    );
    assert!(claims.exp.saturating_sub(claims.iat) <= meshid_proto::token::MAX_LIFETIME_SECONDS);
    assert_eq!(
        v.scopes,
        claims
            .scope
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect()
    );
}

/// A JWS that some verifier accepted: compact form, `typ` at+jwt, `alg` ES256, `kid` the
/// fixture key's, and an ES256 signature over its first two parts by `public`.
fn independently_valid(token: &str, public: &[u8], kid: &str) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "an accepted token has three parts");
    let header: serde_json::Value =
        serde_json::from_slice(&b64_part(parts[0])).expect("an accepted header is JSON");
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], kid);
    assert!(
        header["typ"].as_str().is_some_and(|t| {
            t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt")
        }),
        "typ {:?}",
        header["typ"]
    );
    let signed = &token[..parts[0].len() + 1 + parts[1].len()];
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        public,
    )
    .verify(signed.as_bytes(), &b64_part(parts[2]))
    .expect("an accepted token's signature verifies under the fixture key");
}

// ---------------------------------------------------------------------------------------------
// JWKS

/// A JWKS as the CA's answer carries it, loaded as the sidecar loads it. Whatever it holds,
/// the fixture token is only accepted if the set holds the fixture's public key under its kid.
pub fn jwks(data: &[u8]) {
    let Ok(set) = serde_json::from_slice::<JwkSet>(data) else {
        return;
    };
    for jwk in &set.keys {
        let _ = jsonwebtoken::DecodingKey::from_jwk(jwk);
    }
    let cache = Arc::new(JwksCache::new(Arc::new(StaticJwks(set.clone()))));
    let rt = runtime();
    if rt.block_on(cache.prime()).is_err() {
        assert!(!cache.has_keys(), "a refused JWKS leaves no keys");
        return;
    }
    assert!(cache.kids().len() <= meshid_proto::jwks::MAX_KEYS);
    for kid in cache.kids() {
        assert!(
            rt.block_on(cache.key(&kid)).is_some(),
            "a held kid has its key"
        );
    }
    let verifier = TokenVerifier::with_keys(ISSUER, CALLEE, cache);
    let token = FIXTURE_TOKEN.trim();
    if rt
        .block_on(verifier.verify_bound(token, fixture_x5t(), None, now()))
        .is_ok()
    {
        let key = token_key();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let (x, y) = (b64(&key.public[1..33]), b64(&key.public[33..]));
        let holds = set.keys.iter().any(|k| {
            k.common.key_id.as_deref() == Some(key.kid.as_str())
                && matches!(&k.algorithm, AlgorithmParameters::EllipticCurve(ec) if ec.x == x && ec.y == y)
        });
        assert!(holds, "the token verified against a JWKS without its key");
    }
}

// ---------------------------------------------------------------------------------------------
// Policy

/// A policy file, as the CA compiles it and as `meshid policy check` checks it: both agree
/// (for the CA's trust domain, and whether it is given or read from the file), lint never
/// fails on a policy that compiles, and every route of such a policy is on a canonical path.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let td = TrustDomain::parse("cluster.local").expect("valid");
    let compiled = meshid_ca::policy::compile(text, &td, ISSUER);
    let given = meshid_ca::policy::check(text, Some(&td));
    let read = meshid_ca::policy::check(text, None);
    assert_eq!(
        compiled.is_ok(),
        given.is_ok(),
        "the CA and `meshid policy check` disagree: {:?} / {:?}",
        compiled.as_ref().err().map(|e| e.to_string()),
        given.as_ref().err().map(|e| e.to_string()),
    );
    // A policy of cluster.local checks the same whether the trust domain is given or read.
    if let Ok((dir, _)) = &read
        && dir.trust_domain == td
    {
        assert!(
            given.is_ok(),
            "read as cluster.local but refused when given it"
        );
    }
    let Ok(dir) = compiled else {
        return;
    };
    for service in dir.services().values() {
        for route in &service.routes {
            assert!(
                matches!(
                    meshid_proto::path::canonicalize(&route.path_prefix),
                    Ok(std::borrow::Cow::Borrowed(_))
                ),
                "route {} of {} is not canonical",
                route.path_prefix,
                service.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Inbound request heads

/// The routes of [`request_head`]: an open prefix and two that need scopes.
fn head_routes() -> &'static [meshid_proto::directory::Route] {
    static ROUTES: LazyLock<Vec<meshid_proto::directory::Route>> = LazyLock::new(|| {
        let policy = "\
trust_domain: cluster.local
services:
  orders:
    id: spiffe://cluster.local/ns/shop/sa/orders
    scopes: [orders:admin, orders:read]
    routes:
      - { path: /admin, scope: orders:admin }
      - { method: GET, path: /orders/private, scope: orders:admin }
      - { method: GET, path: /orders, scope: orders:read }
      - { path: /, }
    callers:
      frontend: [orders:read]
  frontend:
    id: spiffe://cluster.local/ns/shop/sa/frontend
";
        let td = TrustDomain::parse("cluster.local").expect("valid");
        let dir = meshid_ca::policy::compile(policy, &td, ISSUER).expect("the head policy");
        dir.service("orders").expect("orders").routes.clone()
    });
    &ROUTES
}

/// What a server that decodes every escape and then resolves dot segments and runs of `/`
/// takes the path to be (a lenient reading: many frameworks route on this). `None` when the
/// decoded bytes are not text.
fn lenient_reading(path: &str) -> Option<String> {
    let raw = path.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hexval = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        if raw[i] == b'%'
            && let (Some(h), Some(l)) = (
                raw.get(i + 1).copied().and_then(hexval),
                raw.get(i + 2).copied().and_then(hexval),
            )
        {
            decoded.push(h << 4 | l);
            i += 3;
        } else {
            decoded.push(raw[i]);
            i += 1;
        }
    }
    let text = String::from_utf8(decoded).ok()?;
    let mut out: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    Some(format!("/{}", out.join("/")))
}

/// The route a request is decided on, by index.
fn route_of(method: &str, path: &str) -> Option<usize> {
    head_routes().iter().position(|r| r.matches(method, path))
}

/// An HTTP/1.1 request head (as a caller's sidecar sends it, as hyper parses it with
/// httparse), through the inbound checks: the path is canonicalized before any rule, the rule
/// is chosen on the canonical path, and the headers the app must never get from a caller are
/// removed.
pub fn request_head(data: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return;
    };
    let Ok(uri) = target.parse::<http::Uri>() else {
        return;
    };
    let path = uri.path();
    if let Ok(canonical) = meshid_proto::path::canonicalize(path) {
        // One spelling: canonical input stays as it is (and, without escapes, is not copied).
        let again = meshid_proto::path::canonicalize(&canonical).expect("canonical is accepted");
        assert_eq!(again, canonical, "canonicalizing twice changes {path}");
        assert!(
            canonical.contains('%') || matches!(again, std::borrow::Cow::Borrowed(_)),
            "{canonical} is copied again"
        );
        assert!(canonical.starts_with('/'));
        assert!(!canonical.contains("//"), "{canonical}");
        assert!(
            !canonical.split('/').any(|s| s == "." || s == ".."),
            "{canonical}"
        );
        assert!(
            !canonical.contains(';') && !canonical.contains('\\'),
            "{canonical}"
        );
        // A lenient server reads the raw path as the app reads the canonical one, so the rule
        // chosen for the canonical path is the one for what the app will serve.
        if let (Some(raw_reading), Some(canonical_reading)) =
            (lenient_reading(path), lenient_reading(&canonical))
        {
            assert_eq!(raw_reading, canonical_reading, "{path} / {canonical}");
            if !raw_reading.contains(['?', '#', '%']) {
                assert_eq!(
                    route_of(method, &canonical),
                    route_of(method, &raw_reading),
                    "{method} {path} is decided as {canonical} but served as {raw_reading}"
                );
            }
        }
    }
    let mut map = HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            map.append(n, v);
        }
    }
    let upgrade = proxy::upgrade_of(&map);
    proxy::prepare_forward(&mut map, upgrade.clone());
    proxy::strip_identity(&mut map);
    proxy::strip_rewrites(&mut map);
    // Identity and rewrite headers in any spelling (CGI and WSGI servers read `_` as `-`);
    // hop-by-hop headers by their exact names (an `_` spelling is an ordinary header to HTTP).
    const NEVER_ANY_SPELLING: &[&str] = &[
        "x-meshid-peer",
        "x-meshid-scopes",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ];
    const HOP_BY_HOP: &[&str] = &[
        "proxy-authorization",
        "transfer-encoding",
        "keep-alive",
        "proxy-connection",
        "http2-settings",
        "trailer",
    ];
    for name in map.keys() {
        let dashed = name.as_str().replace('_', "-");
        assert!(
            !NEVER_ANY_SPELLING.contains(&dashed.as_str()),
            "{name} reaches the app"
        );
        assert!(!HOP_BY_HOP.contains(&name.as_str()), "{name} is forwarded");
    }
    if let Some(te) = map.get(http::header::TE) {
        assert_eq!(te, "trailers", "only TE: trailers is forwarded");
    }
    match upgrade {
        Some(_) => assert!(
            map.get(http::header::UPGRADE)
                .and_then(|u| u.to_str().ok())
                .is_some_and(|u| u.trim().eq_ignore_ascii_case("websocket"))
        ),
        None => {
            assert!(
                !map.contains_key(http::header::UPGRADE),
                "no upgrade but websocket"
            );
            assert!(!map.contains_key(http::header::CONNECTION));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Certificate files

/// Replaced certificate files (`svid.pem`, `svid_key.pem`, `bundle.pem`, separated by
/// [`FILE_SEPARATOR`]) through the sidecar's reload path, with the fixture SVID in force. What
/// it puts in force chains to the bundle in force, names the same identity, and has its key.
pub fn cert_files(data: &[u8]) {
    struct InForce {
        current: crate::identity::Svid,
        trust: Arc<TrustSource>,
    }
    static IN_FORCE: LazyLock<InForce> = LazyLock::new(|| {
        let current = files::parse(
            FIXTURE_SVID.as_bytes(),
            FIXTURE_SVID_KEY.as_bytes(),
            FIXTURE_BUNDLE.as_bytes(),
            td(),
        )
        .expect("the fixture SVID reads");
        let bundle =
            TrustBundle::from_pem(td(), FIXTURE_BUNDLE.as_bytes()).expect("the fixture bundle");
        let trust = TrustSource::new(bundle).expect("the fixture bundle anchors");
        InForce { current, trust }
    });
    let mut parts = split(data, FILE_SEPARATOR);
    let (Some(chain), Some(key), Some(bundle)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let Ok(read) = files::parse(chain, key, bundle, td()) else {
        return;
    };
    assert!(!read.chain.is_empty());
    let f = &*IN_FORCE;
    let at = UnixTime::since_unix_epoch(Duration::from_secs(T0 + 60));
    let Ok(Some(next)) = judge_replaced(read, &f.current, &f.trust, &td(), at) else {
        return;
    };
    assert_eq!(
        next.spiffe_id, f.current.spiffe_id,
        "the identity in force stays"
    );
    assert_ne!(next.chain[0], f.current.chain[0]);
    meshid_proto::verify::SpiffeVerifier::new(
        f.trust.clone(),
        meshid_proto::verify::PeerRule::Exact(f.current.spiffe_id.clone()),
    )
    .verify_chain(
        &next.chain[0],
        &next.chain[1..],
        at,
        webpki::KeyUsage::server_auth(),
    )
    .expect("what is put in force verifies as a server certificate for the same ID");
}

fn split<'a>(data: &'a [u8], sep: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.windows(sep.len()).position(|w| w == sep) {
            Some(i) => {
                rest = Some(&r[i + sep.len()..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Join tokens

/// The join tokens of [`join_token`]'s store: what each is, by its exact text.
pub const JOIN_TOKENS: &[(&str, &str)] = &[
    (
        "mjt.fuzz-reusable-token-for-the-frontend-00000000000",
        "reusable",
    ),
    (
        "mjt.fuzz-single-use-token-for-the-frontend-000000000",
        "single-use",
    ),
    (
        "mjt.fuzz-expired-token-for-the-frontend-000000000000",
        "expired",
    ),
    (
        "mjt.fuzz-token-for-an-id-of-another-trust-domain-000",
        "foreign",
    ),
    ("mjt.fuzz-token-for-the-ca-identity-itself-0000000000", "ca"),
];

/// Presented join tokens (the input's lines, up to 8), as the CA attests them one after the
/// other against a store of its own for this input. Only the exact text of a good token
/// attests, as the identity it was made for; a single-use one only at its first presentation;
/// a refused presentation spends nothing.
pub fn join_token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = FsStore::open(dir.path()).expect("a store");
    let t0 = T0 as i64;
    for (token, kind) in JOIN_TOKENS {
        let (id, expires_at, reusable) = match *kind {
            "reusable" => (CALLER.to_owned(), t0 + 3600, true),
            "single-use" => (CALLER.to_owned(), t0 + 3600, false),
            "expired" => (CALLER.to_owned(), t0 - 1, true),
            "foreign" => (
                "spiffe://elsewhere.test/ns/a/sa/b".to_owned(),
                t0 + 3600,
                true,
            ),
            _ => (td().ca_id().to_string(), t0 + 3600, true),
        };
        store
            .create_join_token(
                &join_token::hash(token),
                &JoinTokenRecord {
                    spiffe_id: id,
                    expires_at,
                    reusable,
                    created_at: t0 - 60,
                },
            )
            .expect("a token is stored");
    }
    let mut spent = false;
    for presented in text.split('\n').take(8) {
        let result = join_token::attest(&store, &Secret::new(presented.to_owned()), &td(), now());
        let kind = JOIN_TOKENS
            .iter()
            .find(|(tok, _)| *tok == presented)
            .map(|(_, k)| *k);
        let should = match kind {
            Some("reusable") => true,
            Some("single-use") => !spent,
            _ => false,
        };
        match result {
            Ok(attested) => {
                assert!(should, "{kind:?} token attested (spent: {spent})");
                assert_eq!(attested.spiffe_id.to_string(), CALLER);
                if kind == Some("single-use") {
                    spent = true;
                }
            }
            Err(e) => assert!(!should, "a good {kind:?} token was refused: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(kind: &str, target: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(kind)
            .join(target)
    }

    /// Every seed and every saved crash of every target, through the target's body.
    #[test]
    fn every_seed_and_every_saved_crash_passes_its_target() {
        let mut total = 0;
        for (name, target) in TARGETS {
            let mut seeds = 0;
            for kind in ["corpus", "regressions"] {
                let Ok(entries) = std::fs::read_dir(dir(kind, name)) else {
                    assert_eq!(kind, "regressions", "fuzz/corpus/{name} is missing");
                    continue;
                };
                for e in entries {
                    let path = e.expect("a directory entry").path();
                    if path.file_name().is_some_and(|n| n == "README.md") {
                        continue;
                    }
                    let data = std::fs::read(&path).expect("a seed reads");
                    let outcome = std::panic::catch_unwind(|| target(&data));
                    assert!(outcome.is_ok(), "{} fails its target", path.display());
                    seeds += 1;
                }
            }
            assert!(seeds >= 3, "{name} has only {seeds} seeds");
            total += seeds;
        }
        eprintln!("{total} seeds and saved crashes replayed");
    }

    /// The seeds reach past the first refusal: the fixture token verifies, the fixture files
    /// reload, a good CSR is signed, the good join tokens attest.
    #[test]
    fn the_fixtures_are_accepted_where_they_should_be() {
        let key = token_key();
        let keys = Arc::new(JwksCache::new(Arc::new(StaticJwks(key.jwks.clone()))));
        let verifier = TokenVerifier::with_keys(ISSUER, CALLEE, keys);
        runtime()
            .block_on(verifier.verify_bound(FIXTURE_TOKEN.trim(), fixture_x5t(), None, now()))
            .expect("the fixture token verifies");
        let renewed =
            std::fs::read(dir("corpus", "cert_files").join("renewed")).expect("the renewed seed");
        let mut parts = split(&renewed, FILE_SEPARATOR);
        let read = files::parse(
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            td(),
        )
        .expect("the renewed seed reads");
        let current = files::parse(
            FIXTURE_SVID.as_bytes(),
            FIXTURE_SVID_KEY.as_bytes(),
            FIXTURE_BUNDLE.as_bytes(),
            td(),
        )
        .expect("the fixture reads");
        let trust =
            TrustSource::new(TrustBundle::from_pem(td(), FIXTURE_BUNDLE.as_bytes()).expect("pem"))
                .expect("anchors");
        let at = UnixTime::since_unix_epoch(Duration::from_secs(T0 + 60));
        assert!(matches!(
            judge_replaced(read, &current, &trust, &td(), at),
            Ok(Some(_))
        ));
        let good_csr = std::fs::read(dir("corpus", "csr").join("p256")).expect("the CSR seed");
        issue::parse_csr(&good_csr).expect("the P-256 CSR seed parses");
        join_token(JOIN_TOKENS[0].0.as_bytes());
    }

    #[test]
    fn a_lenient_server_reads_escapes_and_dots_as_one_path() {
        assert_eq!(
            lenient_reading("/a/%2e%2e/b//c/./d").as_deref(),
            Some("/b/c/d")
        );
        assert_eq!(lenient_reading("/adm%69n").as_deref(), Some("/admin"));
        assert_eq!(route_of("GET", "/admin/x"), Some(0));
        assert_eq!(route_of("GET", "/orders/private/7"), Some(1));
        assert_eq!(route_of("GET", "/elsewhere"), Some(3));
    }
}
