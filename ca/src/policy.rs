//! The policy file platform teams write, compiled into the service [`Directory`].
//!
//! A policy that does not parse, or is inconsistent (unknown service, a scope its service does
//! not own, a duplicate SPIFFE ID, ...) is refused with a message naming the line; the caller
//! keeps the last good policy. [`watch`] reloads the file when it changes: it watches the
//! file's directory, because Kubernetes ConfigMaps change by swapping a `..data` symlink, and
//! re-reads on a timer as well in case an event is lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshid_proto::dir_watch::DirWatch;
use meshid_proto::directory::{self, Directory, Route, Scope, Service};
use meshid_proto::{SpiffeId, TrustDomain};
use serde::Deserialize;
use serde_saphyr::Spanned;
use tokio_util::sync::CancellationToken;

/// A policy refused, with the 1-based line it is about when known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct PolicyError {
    pub line: Option<u64>,
    pub message: String,
}

fn at<T>(s: &Spanned<T>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        line: Some(s.referenced.line()),
        message: message.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDoc {
    trust_domain: Spanned<String>,
    #[serde(default)]
    services: BTreeMap<String, Spanned<ServiceDoc>>,
    /// Destinations outside the mesh that sidecars may reach in plain TCP.
    #[serde(default)]
    passthrough: Vec<Spanned<PassthroughDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PassthroughDoc {
    cidr: String,
    #[serde(default)]
    ports: Vec<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceDoc {
    id: Spanned<String>,
    #[serde(default)]
    scopes: Vec<Spanned<String>>,
    #[serde(default)]
    routes: Vec<Spanned<RouteDoc>>,
    #[serde(default)]
    callers: BTreeMap<String, Spanned<CallerDoc>>,
    #[serde(default)]
    opaque_ports: Vec<Spanned<i64>>,
}

/// What a service grants one caller: a list of scopes, or a map with the scopes and a request
/// rate limit (`{ scopes: [orders:read], rate: 200/s, burst: 50 }`).
struct CallerDoc {
    scopes: Vec<Spanned<String>>,
    rate: Option<Spanned<String>>,
    burst: Option<Spanned<i64>>,
}

impl<'de> Deserialize<'de> for CallerDoc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CallerDoc;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of scopes, or a map with scopes, rate and burst")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<CallerDoc, A::Error> {
                let mut scopes = Vec::new();
                while let Some(s) = seq.next_element()? {
                    scopes.push(s);
                }
                Ok(CallerDoc {
                    scopes,
                    rate: None,
                    burst: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<CallerDoc, A::Error> {
                const FIELDS: &[&str] = &["scopes", "rate", "burst"];
                let mut doc = CallerDoc {
                    scopes: Vec::new(),
                    rate: None,
                    burst: None,
                };
                let mut seen = BTreeSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("duplicate field `{key}`")));
                    }
                    match key.as_str() {
                        "scopes" => doc.scopes = map.next_value()?,
                        "rate" => doc.rate = Some(map.next_value()?),
                        "burst" => doc.burst = Some(map.next_value()?),
                        other => return Err(serde::de::Error::unknown_field(other, FIELDS)),
                    }
                }
                Ok(doc)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The largest burst a policy may give (a bigger one is no limit at all).
const MAX_BURST: i64 = 1_000_000;

/// A TCP port as written in the policy: 1..=65535.
fn port<T>(at_: &Spanned<T>, p: i64, what: &str) -> Result<u16, PolicyError> {
    u16::try_from(p)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| at(at_, format!("{what}: port {p} is not a TCP port (1-65535)")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteDoc {
    method: Option<String>,
    path: String,
    scope: Option<String>,
}

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
];

/// Parse and check a policy for `trust_domain`. `token_issuer` goes into the directory so
/// sidecars know whose tokens to accept.
pub fn compile(
    text: &str,
    trust_domain: &TrustDomain,
    token_issuer: &str,
) -> Result<Directory, PolicyError> {
    let doc: PolicyDoc = serde_saphyr::from_str(text).map_err(|e| PolicyError {
        line: e.location().map(|l| l.line()),
        message: e
            .without_snippet()
            .to_string()
            .lines()
            .next()
            .unwrap_or("does not parse")
            .to_owned(),
    })?;
    if doc.trust_domain.value != trust_domain.as_str() {
        return Err(at(
            &doc.trust_domain,
            format!(
                "trust_domain {:?} is not this CA's ({trust_domain})",
                doc.trust_domain.value
            ),
        ));
    }
    let names: BTreeSet<&str> = doc.services.keys().map(String::as_str).collect();
    let mut services = BTreeMap::new();
    let mut ids: HashMap<SpiffeId, (&str, &Spanned<String>)> = HashMap::new();
    for (name, svc) in &doc.services {
        if !directory::valid_service_name(name) {
            return Err(at(
                svc,
                format!("service name {name:?} must be lowercase letters, digits, '-', '_', '.'"),
            ));
        }
        let id = SpiffeId::parse(&svc.value.id.value)
            .map_err(|e| at(&svc.value.id, format!("service {name}: id: {e}")))?;
        if id.trust_domain() != trust_domain {
            return Err(at(
                &svc.value.id,
                format!("service {name}: {id} is outside trust domain {trust_domain}"),
            ));
        }
        if let Some((other, other_id)) = ids.insert(id.clone(), (name, &svc.value.id)) {
            // Services are checked in name order; blame the one written later in the file.
            let (later, earlier, spot) =
                if other_id.referenced.line() > svc.value.id.referenced.line() {
                    (other, name.as_str(), other_id)
                } else {
                    (name.as_str(), other, &svc.value.id)
                };
            return Err(at(
                spot,
                format!("service {later}: {id} is already the id of service {earlier}"),
            ));
        }
        let mut scopes = BTreeSet::new();
        for s in &svc.value.scopes {
            let scope = Scope::parse(&s.value).map_err(|e| at(s, e.to_string()))?;
            if scope.service() != name {
                return Err(at(
                    s,
                    format!(
                        "scope {scope} is not owned by service {name} (scopes are {name}:VERB)"
                    ),
                ));
            }
            if !scopes.insert(scope) {
                return Err(at(s, format!("scope {} is listed twice", s.value)));
            }
        }
        let owned = |s: &Spanned<String>, what: &str| -> Result<Scope, PolicyError> {
            let scope = Scope::parse(&s.value).map_err(|e| at(s, e.to_string()))?;
            if !scopes.contains(&scope) {
                return Err(at(
                    s,
                    format!("{what}: service {name} does not define scope {scope}"),
                ));
            }
            Ok(scope)
        };
        let mut routes = Vec::new();
        for r in &svc.value.routes {
            let method = match &r.value.method {
                Some(m) if METHODS.contains(&m.to_ascii_uppercase().as_str()) => {
                    Some(m.to_ascii_uppercase())
                }
                Some(m) => return Err(at(r, format!("route method {m:?} is not an HTTP method"))),
                None => None,
            };
            let path = &r.value.path;
            if !path.starts_with('/') {
                return Err(at(r, format!("route path {path:?} must start with '/'")));
            }
            if path.contains(['?', '#']) {
                return Err(at(
                    r,
                    format!("route path {path:?} must be a path only, without '?' or '#'"),
                ));
            }
            // `/admin/` would leave `/admin` itself to a later rule, though most apps serve both
            // alike; a prefix covers its whole segment, so write `/admin`.
            if path.len() > 1 && path.ends_with('/') {
                return Err(at(
                    r,
                    format!(
                        "route path {path:?} ends with '/': write {:?}, which covers it and everything under it",
                        path.trim_end_matches('/')
                    ),
                ));
            }
            // Rules are matched against canonical request paths, so a prefix in any other
            // spelling could never match (or would match what its author did not mean).
            match meshid_proto::path::canonicalize(path) {
                Ok(c) if c == path.as_str() => {}
                Ok(c) => {
                    return Err(at(
                        r,
                        format!("route path {path:?} is not in canonical form; write {c:?}"),
                    ));
                }
                Err(e) => return Err(at(r, format!("route path {path:?} is refused: {e}"))),
            }
            let scope = match &r.value.scope {
                Some(s) => Some(owned(
                    &Spanned::new(s.clone(), r.referenced, r.defined),
                    "route",
                )?),
                None => None,
            };
            routes.push(Route {
                method,
                path_prefix: r.value.path.clone(),
                scope,
            });
        }
        let mut callers = BTreeMap::new();
        let mut rate_limits = BTreeMap::new();
        for (caller, granted) in &svc.value.callers {
            if !names.contains(caller.as_str()) {
                return Err(at(
                    granted,
                    format!("service {name}: caller {caller:?} is not a service of this policy"),
                ));
            }
            let set = granted
                .value
                .scopes
                .iter()
                .map(|s| owned(s, &format!("caller {caller}")))
                .collect::<Result<BTreeSet<_>, _>>()?;
            callers.insert(caller.clone(), set);
            let burst = match &granted.value.burst {
                None => None,
                Some(b) if (1..=MAX_BURST).contains(&b.value) => u32::try_from(b.value).ok(),
                Some(b) => {
                    return Err(at(
                        b,
                        format!(
                            "service {name}: caller {caller}: burst {} must be 1 to {MAX_BURST}",
                            b.value
                        ),
                    ));
                }
            };
            match &granted.value.rate {
                Some(rate) => {
                    let limit = directory::RateLimit::parse(&rate.value, burst)
                        .map_err(|e| at(rate, format!("service {name}: caller {caller}: {e}")))?;
                    rate_limits.insert(caller.clone(), limit);
                }
                None if burst.is_some() => {
                    return Err(at(
                        granted,
                        format!(
                            "service {name}: caller {caller}: burst needs a rate (e.g. rate: 200/s)"
                        ),
                    ));
                }
                None => {}
            }
        }
        let mut opaque_ports = BTreeSet::new();
        for p in &svc.value.opaque_ports {
            let n = port(p, p.value, &format!("service {name}: opaque_ports"))?;
            if !opaque_ports.insert(n) {
                return Err(at(
                    p,
                    format!("service {name}: opaque port {n} is listed twice"),
                ));
            }
        }
        services.insert(
            name.clone(),
            Service {
                name: name.clone(),
                id,
                scopes,
                routes,
                callers,
                rate_limits,
                opaque_ports,
            },
        );
    }
    let mut passthrough = Vec::new();
    for p in &doc.passthrough {
        let cidr = directory::Cidr::parse(&p.value.cidr)
            .map_err(|e| at(p, format!("passthrough: {e}")))?;
        let ports = p
            .value
            .ports
            .iter()
            .map(|&n| port(p, n, &format!("passthrough {cidr}")))
            .collect::<Result<_, _>>()?;
        passthrough.push(directory::Passthrough { cidr, ports });
    }
    Ok(
        Directory::new(0, trust_domain.clone(), token_issuer.to_owned(), services)
            .with_passthrough(passthrough),
    )
}

/// Read and compile the policy at `path`.
pub fn load(
    path: &Path,
    trust_domain: &TrustDomain,
    token_issuer: &str,
) -> Result<Directory, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
        line: None,
        message: format!("reading {}: {e}", path.display()),
    })?;
    compile(&text, trust_domain, token_issuer)
}

/// Watch `path` and call `apply` with every new policy that compiles; `refuse` with every one
/// that does not. Runs until `shutdown`.
pub fn watch(
    path: PathBuf,
    trust_domain: TrustDomain,
    token_issuer: String,
    apply: Arc<dyn Fn(Directory) + Send + Sync>,
    refuse: Arc<dyn Fn(PolicyError) + Send + Sync>,
    shutdown: CancellationToken,
) {
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut changes = DirWatch::new(&dir, "policy changes");
    tokio::spawn(async move {
        // Reads run off the runtime threads that serve requests.
        let mut last = tokio::fs::read(&path).await.ok();
        // Said once per disappearance (a ConfigMap update swaps a symlink, and the directory
        // sees several events for one change).
        let mut gone = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changes.changed() => {}
            }
            let bytes = match tokio::fs::read(&path).await {
                Ok(b) => b,
                Err(e) => {
                    if !gone && e.kind() == std::io::ErrorKind::NotFound {
                        gone = true;
                        refuse(PolicyError {
                            line: None,
                            message: format!(
                                "{} is gone; the last good policy stays in force until it is back",
                                path.display()
                            ),
                        });
                    }
                    continue;
                }
            };
            gone = false;
            if last.as_deref() == Some(bytes.as_slice()) {
                continue;
            }
            last = Some(bytes.clone());
            match std::str::from_utf8(&bytes)
                .map_err(|_| PolicyError {
                    line: None,
                    message: "policy is not UTF-8".into(),
                })
                .and_then(|text| compile(text, &trust_domain, &token_issuer))
            {
                Ok(dir) => apply(dir),
                Err(e) => refuse(e),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
trust_domain: cluster.local
services:
  orders:
    id: spiffe://cluster.local/ns/shop/sa/orders
    scopes: [orders:read, orders:write]
    routes:
      - { method: GET,  path: /orders, scope: orders:read }
      - { method: POST, path: /orders, scope: orders:write }
      - { path: /healthz }
    callers:
      frontend: [orders:read]
      billing:  [orders:read, orders:write]
  frontend:
    id: spiffe://cluster.local/ns/shop/sa/frontend
  billing:
    id: spiffe://cluster.local/ns/shop/sa/billing
";

    fn td() -> TrustDomain {
        TrustDomain::parse("cluster.local").unwrap()
    }

    fn refuse(text: &str) -> PolicyError {
        compile(text, &td(), "https://ca").unwrap_err()
    }

    #[test]
    fn the_design_example_compiles() {
        let d = compile(GOOD, &td(), "https://ca").unwrap();
        let orders = d.service("orders").unwrap();
        assert_eq!(orders.routes.len(), 3);
        assert_eq!(
            orders
                .route("GET", "/orders/1")
                .unwrap()
                .scope
                .as_ref()
                .unwrap()
                .as_str(),
            "orders:read"
        );
        assert!(orders.route("DELETE", "/orders").is_none());
        assert_eq!(orders.callers["billing"].len(), 2);
        assert_eq!(
            d.service_by_id(
                &SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").unwrap()
            )
            .unwrap()
            .name,
            "frontend"
        );
    }

    #[test]
    fn inconsistencies_are_refused_with_their_line() {
        let e = refuse(&GOOD.replace("frontend: [orders:read]", "frontnd: [orders:read]"));
        assert_eq!(e.line, Some(11), "{e}");
        assert!(
            e.message.contains("caller \"frontnd\" is not a service"),
            "{e}"
        );

        let e = refuse(&GOOD.replace("scope: orders:read }", "scope: orders:list }"));
        assert_eq!(e.line, Some(7), "{e}");
        assert!(
            e.message.contains("does not define scope orders:list"),
            "{e}"
        );

        let e = refuse(&GOOD.replace(
            "[orders:read, orders:write]",
            "[orders:read, billing:write]",
        ));
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("not owned by service orders"), "{e}");

        let e = refuse(&GOOD.replace("sa/billing", "sa/frontend"));
        assert_eq!(e.line, Some(16), "{e}");
        assert!(e.message.contains("already the id of service"), "{e}");

        let e = refuse(&GOOD.replace("trust_domain: cluster.local", "trust_domain: other.local"));
        assert_eq!(e.line, Some(1), "{e}");
    }

    #[test]
    fn route_paths_must_be_canonical() {
        for (path, says) in [
            ("/orders/../admin", "write \"/admin\""),
            ("//orders", "write \"/orders\""),
            ("/%6frders", "write \"/orders\""),
            ("/orders%2fx", "encoded '/'"),
            ("/orders?x=1", "without '?'"),
            ("/../orders", "climbs above the root"),
            ("/orders/", "ends with '/': write \"/orders\""),
            ("/orders;v=1", "holds ';'"),
        ] {
            let e = refuse(&GOOD.replace(
                "path: /orders, scope: orders:read",
                &format!("path: \"{path}\", scope: orders:read"),
            ));
            assert_eq!(e.line, Some(7), "{path}: {e}");
            assert!(e.message.contains(says), "{path}: {e}");
        }
    }

    #[test]
    fn callers_may_have_a_rate_limit() {
        let text = GOOD.replace(
            "frontend: [orders:read]",
            "frontend: { scopes: [orders:read], rate: 200/s, burst: 50 }",
        );
        let d = compile(&text, &td(), "https://ca").unwrap();
        let orders = d.service("orders").unwrap();
        assert_eq!(orders.callers["frontend"].len(), 1);
        let l = orders.rate_limits["frontend"];
        assert_eq!((l.requests, l.period_seconds, l.burst), (200, 1, 50));
        assert!(
            !orders.rate_limits.contains_key("billing"),
            "no limit unless written"
        );
        // It reaches sidecars in the directory they receive.
        let back = Directory::try_from(meshid_proto::pb::Directory::from(&d)).unwrap();
        assert_eq!(
            back.service("orders").unwrap().rate_limits,
            orders.rate_limits
        );

        for (written, says) in [
            ("rate: 0/s", "must be REQUESTS/s"),
            ("rate: fast", "must be REQUESTS/s"),
            ("rate: 200/s, burst: 0", "burst 0 must be 1 to 1000000"),
            ("burst: 5", "burst needs a rate"),
            ("rate: 200/s, limit: 5", "limit"),
        ] {
            let e = refuse(&GOOD.replace(
                "frontend: [orders:read]",
                &format!("frontend: {{ scopes: [orders:read], {written} }}"),
            ));
            assert_eq!(e.line, Some(11), "{written}: {e}");
            assert!(e.message.contains(says), "{written}: {e}");
        }
    }

    #[test]
    fn yaml_errors_name_the_line() {
        let e = refuse(&GOOD.replace(
            "    scopes: [orders:read, orders:write]",
            "    scopes: [orders:read, orders:write",
        ));
        assert!(e.line.is_some(), "{e}");
        let e = refuse(&GOOD.replace("    routes:", "    routez:"));
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.message.contains("routez"), "{e}");
        let e = refuse(&GOOD.replace("method: GET", "method: FETCH"));
        assert_eq!(e.line, Some(7), "{e}");
    }

    #[test]
    fn opaque_ports_and_passthrough_compile_and_bad_ones_name_their_line() {
        let text = format!(
            "{GOOD}  db:\n    id: spiffe://cluster.local/ns/shop/sa/db\n    opaque_ports: [5432]\n    callers:\n      orders: []\npassthrough:\n  - {{ cidr: 10.96.0.1/32, ports: [443] }}\n  - {{ cidr: 'fd00::/8' }}\n"
        );
        let d = compile(&text, &td(), "https://ca").unwrap();
        assert!(d.service("db").unwrap().opaque_ports.contains(&5432));
        assert!(d.is_opaque_port(5432));
        assert!(d.passes_through("10.96.0.1:443".parse().unwrap()));
        assert!(!d.passes_through("10.96.0.1:80".parse().unwrap()));
        assert!(d.passes_through("[fd00::7]:9".parse().unwrap()));
        let e = refuse(&text.replace("[5432]", "[70000]"));
        assert_eq!(e.line, Some(19), "{e}");
        assert!(e.message.contains("70000"), "{e}");
        let e = refuse(&text.replace("10.96.0.1/32", "10.96.0.1/33"));
        assert_eq!(e.line, Some(23), "{e}");
        assert!(e.message.contains("10.96.0.1/33"), "{e}");
        let e = refuse(&text.replace("[443]", "[0]"));
        assert!(e.message.contains("port 0"), "{e}");
    }
}

/// What a reviewer of a policy wants pointed out, though the CA accepts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyWarning {
    /// 1-based line of the key it is about.
    pub line: u64,
    pub message: String,
}

impl std::fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// `meshid policy check`: the CA's validation (the same errors, with their lines), then the
/// warnings of [`lint`]. The trust domain is the file's own unless `trust_domain` is given
/// (then the file must name it, as the CA requires of its own).
pub fn check(
    text: &str,
    trust_domain: Option<&TrustDomain>,
) -> Result<(Directory, Vec<PolicyWarning>), PolicyError> {
    let td = match trust_domain {
        Some(td) => td.clone(),
        None => {
            #[derive(Deserialize)]
            struct Head {
                trust_domain: Spanned<String>,
            }
            // Errors in the rest of the file are compile's to report, with its messages.
            match serde_saphyr::from_str::<Head>(text) {
                Ok(head) => TrustDomain::parse(&head.trust_domain.value)
                    .map_err(|e| at(&head.trust_domain, format!("trust_domain: {e}")))?,
                Err(_) => TrustDomain::parse("cluster.local").expect("a valid trust domain"),
            }
        }
    };
    let dir = compile(text, &td, "offline")?;
    let doc: PolicyDoc = serde_saphyr::from_str(text).map_err(|e| PolicyError {
        line: e.location().map(|l| l.line()),
        message: e.without_snippet().to_string(),
    })?;
    let warnings = lint(&doc, &dir);
    Ok((dir, warnings))
}

/// Whether route `a` matches every request route `b` would: `b` written after `a` is then
/// never used (the first match wins).
fn shadows(a: &Route, b: &Route) -> bool {
    let method = match (&a.method, &b.method) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(am), Some(bm)) => am == bm || (am == "GET" && bm == "HEAD"),
    };
    let p = a.path_prefix.as_str();
    method
        && (p == "/"
            || b.path_prefix == p
            || b.path_prefix
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/')))
}

fn route_name(r: &Route) -> String {
    format!("{} {}", r.method.as_deref().unwrap_or("*"), r.path_prefix)
}

/// Warnings on a policy that compiled: scopes nobody may be granted, routes no granted scope
/// can reach, grants of scopes no route needs, services with routes that nobody may call, and
/// routes an earlier route always matches first.
fn lint(doc: &PolicyDoc, dir: &Directory) -> Vec<PolicyWarning> {
    let mut out = Vec::new();
    let mut warn = |line: u64, message: String| out.push(PolicyWarning { line, message });
    for (name, svc_doc) in &doc.services {
        let Some(svc) = dir.service(name) else {
            continue;
        };
        let granted: BTreeSet<&Scope> = svc.callers.values().flatten().collect();
        let required: BTreeSet<&Scope> =
            svc.routes.iter().filter_map(|r| r.scope.as_ref()).collect();
        for s in &svc_doc.value.scopes {
            if let Ok(scope) = Scope::parse(&s.value)
                && !granted.contains(&scope)
            {
                warn(
                    s.referenced.line(),
                    format!("scope {scope} of {name} is granted to no caller: nobody can use it"),
                );
            }
        }
        for (i, (r, route)) in svc_doc.value.routes.iter().zip(&svc.routes).enumerate() {
            if let Some(scope) = &route.scope
                && !granted.contains(scope)
            {
                warn(
                    r.referenced.line(),
                    format!(
                        "route {} of {name} needs {scope}, which no caller is granted: no call can reach it",
                        route_name(route)
                    ),
                );
            }
            if let Some((j, earlier)) = svc.routes[..i]
                .iter()
                .enumerate()
                .find(|(_, e)| shadows(e, route))
            {
                warn(
                    r.referenced.line(),
                    format!(
                        "route {} of {name} is never used: route {} (line {}) matches every request it would, first",
                        route_name(route),
                        route_name(earlier),
                        svc_doc.value.routes[j].referenced.line()
                    ),
                );
            }
        }
        for (caller, grants) in &svc_doc.value.callers {
            for g in &grants.value.scopes {
                if let Ok(scope) = Scope::parse(&g.value)
                    && !required.contains(&scope)
                {
                    warn(
                        g.referenced.line(),
                        format!(
                            "caller {caller} is granted {scope}, which no route of {name} needs"
                        ),
                    );
                }
            }
        }
        if (!svc.routes.is_empty() || !svc.opaque_ports.is_empty()) && svc.callers.is_empty() {
            warn(
                svc_doc.referenced.line(),
                format!("service {name} serves routes or opaque ports, but no service may call it"),
            );
        }
    }
    out.sort_by_key(|w| w.line);
    out
}

#[cfg(test)]
mod check_tests {
    use super::*;

    const CLEAN: &str = "\
trust_domain: cluster.local
services:
  orders:
    id: spiffe://cluster.local/ns/shop/sa/orders
    scopes: [orders:read, orders:write]
    routes:
      - { method: GET,  path: /orders, scope: orders:read }
      - { method: POST, path: /orders, scope: orders:write }
      - { path: /healthz }
    callers:
      frontend: [orders:read]
      billing:  [orders:read, orders:write]
  frontend:
    id: spiffe://cluster.local/ns/shop/sa/frontend
  billing:
    id: spiffe://cluster.local/ns/shop/sa/billing
";

    fn warnings(text: &str) -> Vec<String> {
        check(text, None)
            .unwrap()
            .1
            .iter()
            .map(|w| w.to_string())
            .collect()
    }

    #[test]
    fn a_clean_policy_has_no_warning() {
        assert_eq!(warnings(CLEAN), Vec::<String>::new());
    }

    #[test]
    fn each_warning_is_triggered_by_its_own_mistake_with_its_line() {
        // billing loses orders:write: the scope and the POST route are unusable.
        let ungranted = CLEAN.replace(
            "billing:  [orders:read, orders:write]",
            "billing:  [orders:read]",
        );
        assert_eq!(
            warnings(&ungranted),
            vec![
                "line 5: scope orders:write of orders is granted to no caller: nobody can use it",
                "line 8: route POST /orders of orders needs orders:write, which no caller is granted: no call can reach it",
            ]
        );
        // A grant of a scope no route needs.
        let unneeded = CLEAN
            .replace(
                "scopes: [orders:read, orders:write]",
                "scopes: [orders:read, orders:write, orders:admin]",
            )
            .replace(
                "frontend: [orders:read]",
                "frontend: [orders:read, orders:admin]",
            );
        assert_eq!(
            warnings(&unneeded),
            vec![
                "line 11: caller frontend is granted orders:admin, which no route of orders needs"
            ]
        );
        // An earlier rule that always matches first.
        let shadowed = CLEAN.replace(
            "      - { path: /healthz }\n",
            "      - { path: /healthz }\n      - { method: GET, path: /orders/7, scope: orders:write }\n",
        );
        assert_eq!(
            warnings(&shadowed),
            vec![
                "line 10: route GET /orders/7 of orders is never used: route GET /orders (line 7) matches every request it would, first"
            ]
        );
        // A service with routes that nobody may call.
        let uncalled = format!(
            "{CLEAN}  reports:\n    id: spiffe://cluster.local/ns/shop/sa/reports\n    routes:\n      - {{ path: /daily }}\n"
        );
        assert_eq!(
            warnings(&uncalled),
            vec![
                "line 18: service reports serves routes or opaque ports, but no service may call it"
            ]
        );
    }

    #[test]
    fn errors_are_the_cas_own_with_their_line() {
        let bad = CLEAN.replace("frontend: [orders:read]", "frontnd: [orders:read]");
        let td = TrustDomain::parse("cluster.local").unwrap();
        let offline = check(&bad, None).unwrap_err();
        let ca = compile(&bad, &td, "https://ca").unwrap_err();
        assert_eq!(offline, ca);
        assert_eq!(offline.line, Some(11));
        // Another trust domain than the one asked for is refused, as the CA refuses it.
        let other = TrustDomain::parse("example.org").unwrap();
        assert!(
            check(CLEAN, Some(&other))
                .unwrap_err()
                .message
                .contains("not this CA's")
        );
    }

    #[test]
    fn head_covers_get_and_a_prefix_covers_its_segment_only() {
        let r = |m: Option<&str>, p: &str| Route {
            method: m.map(str::to_owned),
            path_prefix: p.into(),
            scope: None,
        };
        assert!(shadows(&r(Some("GET"), "/a"), &r(Some("HEAD"), "/a/b")));
        assert!(shadows(&r(None, "/"), &r(Some("POST"), "/x")));
        assert!(!shadows(&r(Some("GET"), "/a"), &r(None, "/a")));
        assert!(!shadows(&r(None, "/a"), &r(None, "/ab")));
        assert!(!shadows(&r(Some("POST"), "/a"), &r(Some("GET"), "/a")));
    }
}
