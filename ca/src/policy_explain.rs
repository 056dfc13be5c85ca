//! `meshid policy explain`: the decision the callee's sidecar would make for one call, step by
//! step, from the policy alone, and the smallest policy change that would allow it.
//!
//! The steps are the sidecar's own ([`meshid_proto::path::canonicalize`], the directory's
//! allowed callers, [`Service::route`], the caller's grant, which is what the caller's sidecar
//! asks the CA for and attaches). What the policy cannot know is left out and said: a revoked
//! caller, a token refused for its signature or binding.

use meshid_proto::SpiffeId;
use meshid_proto::directory::{Directory, Service};

/// What the callee's sidecar answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Each check, in the order the sidecar makes them.
    pub steps: Vec<String>,
    /// The HTTP status the caller's app sees (200: the request reaches the callee's app).
    pub status: u16,
    pub decision: String,
    /// The smallest policy change that would allow the call, if one would.
    pub fix: Option<String>,
}

/// Scopes as the policy writes them, space-separated, or "no scope".
pub fn scopes_text(scopes: &std::collections::BTreeSet<meshid_proto::directory::Scope>) -> String {
    if scopes.is_empty() {
        return "no scope".to_owned();
    }
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A service by name or by SPIFFE ID.
pub fn find<'a>(dir: &'a Directory, name_or_id: &str) -> Option<&'a Service> {
    dir.service(name_or_id).or_else(|| {
        SpiffeId::parse(name_or_id)
            .ok()
            .and_then(|id| dir.service_by_id(&id))
    })
}

pub fn explain(caller: &Service, callee: &Service, method: &str, path: &str) -> Explanation {
    let mut steps = Vec::new();
    let refuse =
        |steps: Vec<String>, status: u16, decision: String, fix: Option<String>| Explanation {
            steps,
            status,
            decision,
            fix,
        };
    let method = method.to_ascii_uppercase();
    let canonical = match meshid_proto::path::canonicalize(path) {
        Ok(c) => c.into_owned(),
        Err(e) => {
            steps.push(format!("path {path:?}: refused before any rule: {e}"));
            return refuse(steps, 400, format!("refused (400): {e}"), None);
        }
    };
    if canonical == path {
        steps.push(format!("path {path} is canonical"));
    } else {
        steps.push(format!(
            "path {path:?} is {canonical:?} in canonical form: rules are matched on it, and the app receives it"
        ));
    }
    let route = callee.route(&method, &canonical);
    let Some(granted) = callee.callers.get(&caller.name) else {
        steps.push(format!(
            "caller {} ({}) is not an allowed caller of {}: refused before any route is looked at",
            caller.name, caller.id, callee.name
        ));
        let scope = route.and_then(|r| r.scope.as_ref());
        let fix = format!(
            "under services.{}.callers add `{}: [{}]`",
            callee.name,
            caller.name,
            scope.map(|s| s.as_str()).unwrap_or("")
        );
        return refuse(
            steps,
            403,
            format!("refused (403): {} may not call {}", caller.id, callee.name),
            Some(fix),
        );
    };
    steps.push(format!(
        "caller {} is an allowed caller of {} (granted: {})",
        caller.name,
        callee.name,
        scopes_text(granted)
    ));
    let limit = callee.rate_limits.get(&caller.name);
    match limit {
        Some(l) => steps.push(format!(
            "{} is held to {l} by each {} sidecar: a request over it is refused with 429 and Retry-After",
            caller.name, callee.name
        )),
        None => steps.push(format!(
            "no rate limit for {} at {}",
            caller.name, callee.name
        )),
    }
    let Some(route) = route else {
        steps.push(format!(
            "no route of {} matches {method} {canonical} (first match wins; no match is refused)",
            callee.name
        ));
        return refuse(
            steps,
            403,
            format!(
                "refused (403): no route of {} matches {method} {canonical}",
                callee.name
            ),
            Some(format!(
                "add a route to services.{}.routes: `{{ method: {method}, path: {canonical} }}` (with the scope it should need)",
                callee.name
            )),
        );
    };
    let index = callee
        .routes
        .iter()
        .position(|r| std::ptr::eq(r, route))
        .map(|i| i + 1)
        .unwrap_or(0);
    steps.push(format!(
        "route {index} matches: {} {}",
        route.method.as_deref().unwrap_or("(any method)"),
        route.path_prefix
    ));
    let Some(scope) = &route.scope else {
        steps.push("it needs no scope: mutual TLS alone admits the call".into());
        return refuse(
            steps,
            200,
            "allowed (200): the request reaches the app".into(),
            None,
        );
    };
    steps.push(format!("it needs scope {scope}"));
    steps.push(format!(
        "the CA grants {} a token for {} with {}; {}'s sidecar attaches it to the call",
        caller.name,
        callee.name,
        scopes_text(granted),
        caller.name
    ));
    if granted.contains(scope) {
        steps.push(format!("the token carries {scope}"));
        refuse(
            steps,
            200,
            "allowed (200): the request reaches the app".into(),
            None,
        )
    } else {
        steps.push(format!("the token lacks {scope}"));
        let mut with: Vec<&str> = granted.iter().map(|s| s.as_str()).collect();
        with.push(scope.as_str());
        refuse(
            steps,
            403,
            format!("refused (403, insufficient_scope): the call needs {scope}"),
            Some(format!(
                "grant it: services.{}.callers.{}{}: [{}]",
                callee.name,
                caller.name,
                if limit.is_some() { ".scopes" } else { "" },
                with.join(", ")
            )),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_proto::TrustDomain;

    const POLICY: &str = "\
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
  frontend:
    id: spiffe://cluster.local/ns/shop/sa/frontend
  reports:
    id: spiffe://cluster.local/ns/shop/sa/reports
";

    fn run(caller: &str, method: &str, path: &str) -> Explanation {
        run_on(POLICY, caller, method, path)
    }

    fn run_on(policy: &str, caller: &str, method: &str, path: &str) -> Explanation {
        let dir =
            crate::policy::compile(policy, &TrustDomain::parse("cluster.local").unwrap(), "x")
                .unwrap();
        let caller = find(&dir, caller).unwrap().clone();
        let callee = find(&dir, "orders").unwrap().clone();
        explain(&caller, &callee, method, path)
    }

    #[test]
    fn each_refusal_has_its_reason_and_its_smallest_fix() {
        let ok = run("frontend", "GET", "/orders/7");
        assert_eq!((ok.status, ok.fix), (200, None));
        let scope = run(
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "post",
            "/orders",
        );
        assert_eq!(scope.status, 403);
        assert_eq!(
            scope.fix.unwrap(),
            "grant it: services.orders.callers.frontend: [orders:read, orders:write]"
        );
        let caller = run("reports", "GET", "/orders");
        assert_eq!(caller.status, 403);
        assert_eq!(
            caller.fix.unwrap(),
            "under services.orders.callers add `reports: [orders:read]`"
        );
        let route = run("frontend", "GET", "/admin");
        assert_eq!(route.status, 403);
        assert!(route.fix.unwrap().contains("{ method: GET, path: /admin }"));
        let tricked = run("frontend", "GET", "/orders/../healthz");
        assert_eq!(tricked.status, 200);
        assert!(
            tricked.steps[0].contains("\"/healthz\""),
            "{:?}",
            tricked.steps
        );
        let bad = run("frontend", "GET", "/a/%2e%2e/%2e%2e/x");
        assert_eq!(bad.status, 400, "{bad:?}");
    }

    #[test]
    fn a_rate_limit_is_shown_and_kept_in_the_fix() {
        let limited = POLICY.replace(
            "frontend: [orders:read]",
            "frontend: { scopes: [orders:read], rate: 200/s, burst: 50 }",
        );
        let ok = run_on(&limited, "frontend", "GET", "/orders");
        assert!(
            ok.steps
                .iter()
                .any(|s| s == "frontend is held to 200/s, burst 50 by each orders sidecar: a request over it is refused with 429 and Retry-After"),
            "{:?}",
            ok.steps
        );
        let scope = run_on(&limited, "frontend", "POST", "/orders");
        assert_eq!(
            scope.fix.unwrap(),
            "grant it: services.orders.callers.frontend.scopes: [orders:read, orders:write]"
        );
        let plain = run("frontend", "GET", "/orders");
        assert!(
            plain
                .steps
                .iter()
                .any(|s| s == "no rate limit for frontend at orders")
        );
    }
}
