//! `meshid policy diff OLD NEW`: what a policy change grants and revokes, per callee and
//! caller, for the review of a policy pull request.

use std::collections::{BTreeMap, BTreeSet};

use meshid_proto::directory::{Directory, Route, Service};

/// One change, under the service it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `+` more access, `-` less, `~` neither simply (a route that needs another scope).
    Grants(String),
    Revokes(String),
    Changes(String),
}

impl Change {
    pub fn sign(&self) -> char {
        match self {
            Self::Grants(_) => '+',
            Self::Revokes(_) => '-',
            Self::Changes(_) => '~',
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Self::Grants(t) | Self::Revokes(t) | Self::Changes(t) => t,
        }
    }
}

fn route_key(r: &Route) -> (String, String) {
    (
        r.method.clone().unwrap_or_else(|| "*".into()),
        r.path_prefix.clone(),
    )
}

fn scope_text(r: &Route) -> String {
    match &r.scope {
        Some(s) => format!("needs {s}"),
        None => "needs no scope".into(),
    }
}

fn service_changes(name: &str, old: Option<&Service>, new: Option<&Service>) -> Vec<Change> {
    let mut out = Vec::new();
    let empty = BTreeMap::new();
    let (old_callers, new_callers) = (
        old.map_or(&empty, |s| &s.callers),
        new.map_or(&empty, |s| &s.callers),
    );
    if let (Some(o), Some(n)) = (old, new)
        && o.id != n.id
    {
        out.push(Change::Changes(format!("id {} (was {})", n.id, o.id)));
    }
    let callers: BTreeSet<&String> = old_callers.keys().chain(new_callers.keys()).collect();
    for caller in callers {
        match (old_callers.get(caller), new_callers.get(caller)) {
            (None, Some(scopes)) => out.push(Change::Grants(format!(
                "{caller} may call {name}{}",
                if scopes.is_empty() {
                    String::new()
                } else {
                    format!(", granted {}", crate::policy_explain::scopes_text(scopes))
                }
            ))),
            (Some(_), None) => out.push(Change::Revokes(format!(
                "{caller} may no longer call {name}"
            ))),
            (Some(o), Some(n)) => {
                for s in n.difference(o) {
                    out.push(Change::Grants(format!("{caller} may be granted {s}")));
                }
                for s in o.difference(n) {
                    out.push(Change::Revokes(format!(
                        "{caller} may no longer be granted {s}"
                    )));
                }
            }
            (None, None) => {}
        }
        let limit = |s: Option<&Service>| s.and_then(|s| s.rate_limits.get(caller)).copied();
        let change = match (limit(old), limit(new)) {
            (w, n) if w == n || !new_callers.contains_key(caller) => None,
            (None, Some(n)) if !old_callers.contains_key(caller) => {
                Some(Change::Changes(format!("{caller} is held to {n}")))
            }
            (None, Some(n)) => Some(Change::Revokes(format!("{caller} is held to {n}"))),
            (Some(w), None) => Some(Change::Grants(format!(
                "{caller} is no longer rate limited (was {w})"
            ))),
            (Some(w), Some(n)) => {
                // Requests per second compared without division: a/p vs b/q as a*q vs b*p.
                let (faster, slower) = (
                    u64::from(n.requests) * u64::from(w.period_seconds),
                    u64::from(w.requests) * u64::from(n.period_seconds),
                );
                let text = format!("{caller} is held to {n} (was {w})");
                Some(if faster >= slower && n.burst >= w.burst {
                    Change::Grants(text)
                } else if faster <= slower && n.burst <= w.burst {
                    Change::Revokes(text)
                } else {
                    Change::Changes(text)
                })
            }
            (None, None) => None,
        };
        out.extend(change);
    }
    let routes = |s: Option<&Service>| -> BTreeMap<(String, String), Route> {
        s.map(|s| s.routes.iter().map(|r| (route_key(r), r.clone())).collect())
            .unwrap_or_default()
    };
    let (old_routes, new_routes) = (routes(old), routes(new));
    for (key, r) in &new_routes {
        match old_routes.get(key) {
            None => out.push(Change::Grants(format!(
                "route {} {} {}",
                key.0,
                key.1,
                scope_text(r)
            ))),
            Some(o) if o.scope != r.scope => out.push(Change::Changes(format!(
                "route {} {} {} (was: {})",
                key.0,
                key.1,
                scope_text(r),
                scope_text(o)
            ))),
            Some(_) => {}
        }
    }
    for (key, r) in &old_routes {
        if !new_routes.contains_key(key) {
            out.push(Change::Revokes(format!(
                "route {} {} (it {}) is gone: requests it matched now fall to the next rule, or 403",
                key.0,
                key.1,
                scope_text(r)
            )));
        }
    }
    if let (Some(o), Some(n)) = (old, new) {
        let (ok, nk): (Vec<_>, Vec<_>) = (
            o.routes
                .iter()
                .map(route_key)
                .filter(|k| new_routes.contains_key(k))
                .collect(),
            n.routes
                .iter()
                .map(route_key)
                .filter(|k| old_routes.contains_key(k))
                .collect(),
        );
        if ok != nk {
            out.push(Change::Changes(
                "the order of its routes changed (the first match wins)".into(),
            ));
        }
        for p in n.opaque_ports.difference(&o.opaque_ports) {
            out.push(Change::Grants(format!("opaque port {p}")));
        }
        for p in o.opaque_ports.difference(&n.opaque_ports) {
            out.push(Change::Revokes(format!("opaque port {p}")));
        }
    }
    out
}

/// Every change from `old` to `new`, per service (by name), services added and removed
/// included. Empty when the two grant the same.
pub fn diff(old: &Directory, new: &Directory) -> BTreeMap<String, Vec<Change>> {
    let names: BTreeSet<&String> = old.services().keys().chain(new.services().keys()).collect();
    let mut out = BTreeMap::new();
    for name in names {
        let (o, n) = (old.service(name), new.service(name));
        let mut changes = Vec::new();
        match (o, n) {
            (None, Some(s)) => changes.push(Change::Grants(format!("new service, id {}", s.id))),
            (Some(s), None) => changes.push(Change::Revokes(format!(
                "service removed (id {}): every call to it is refused",
                s.id
            ))),
            _ => {}
        }
        changes.extend(service_changes(name, o, n));
        if !changes.is_empty() {
            out.insert(name.clone(), changes);
        }
    }
    let (op, np) = (old.passthrough(), new.passthrough());
    let text = |p: &meshid_proto::directory::Passthrough| {
        if p.ports.is_empty() {
            format!("{} (every port)", p.cidr)
        } else {
            let ports: Vec<String> = p.ports.iter().map(u16::to_string).collect();
            format!("{} ports {}", p.cidr, ports.join(","))
        }
    };
    let (os, ns): (BTreeSet<String>, BTreeSet<String>) =
        (op.iter().map(text).collect(), np.iter().map(text).collect());
    let mut pass = Vec::new();
    for p in ns.difference(&os) {
        pass.push(Change::Grants(format!("passthrough {p}")));
    }
    for p in os.difference(&ns) {
        pass.push(Change::Revokes(format!("passthrough {p}")));
    }
    if !pass.is_empty() {
        out.insert("(passthrough)".into(), pass);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_proto::TrustDomain;

    const OLD: &str = "\
trust_domain: cluster.local
services:
  orders:
    id: spiffe://cluster.local/ns/shop/sa/orders
    scopes: [orders:read, orders:write]
    routes:
      - { method: GET,  path: /orders, scope: orders:read }
      - { method: POST, path: /orders, scope: orders:write }
    callers:
      frontend: [orders:read]
      billing:  [orders:read, orders:write]
  frontend:
    id: spiffe://cluster.local/ns/shop/sa/frontend
  billing:
    id: spiffe://cluster.local/ns/shop/sa/billing
";

    fn compiled(text: &str) -> Directory {
        crate::policy::compile(text, &TrustDomain::parse("cluster.local").unwrap(), "x").unwrap()
    }

    fn lines(old: &str, new: &str) -> Vec<String> {
        diff(&compiled(old), &compiled(new))
            .into_iter()
            .flat_map(|(svc, cs)| {
                cs.into_iter()
                    .map(move |c| format!("{svc}: {} {}", c.sign(), c.text()))
            })
            .collect()
    }

    #[test]
    fn the_same_policy_changes_nothing() {
        assert!(lines(OLD, OLD).is_empty());
    }

    #[test]
    fn grants_and_revocations_are_named_per_callee_and_caller() {
        let new = OLD
            .replace("frontend: [orders:read]", "frontend: [orders:read, orders:write]")
            .replace("      billing:  [orders:read, orders:write]\n", "")
            .replace(
                "      - { method: POST, path: /orders, scope: orders:write }\n",
                "      - { method: POST, path: /orders, scope: orders:read }\n      - { path: /healthz }\n",
            );
        assert_eq!(
            lines(OLD, &new),
            vec![
                "orders: - billing may no longer call orders",
                "orders: + frontend may be granted orders:write",
                "orders: + route * /healthz needs no scope",
                "orders: ~ route POST /orders needs orders:read (was: needs orders:write)",
            ]
        );
    }

    #[test]
    fn services_added_and_removed() {
        let new = OLD
            .replace(
                "  billing:\n    id: spiffe://cluster.local/ns/shop/sa/billing\n",
                "  reports:\n    id: spiffe://cluster.local/ns/shop/sa/reports\n",
            )
            .replace("      billing:  [orders:read, orders:write]\n", "");
        let got = lines(OLD, &new);
        assert!(got.contains(&"billing: - service removed (id spiffe://cluster.local/ns/shop/sa/billing): every call to it is refused".to_owned()), "{got:#?}");
        assert!(
            got.contains(
                &"reports: + new service, id spiffe://cluster.local/ns/shop/sa/reports".to_owned()
            ),
            "{got:#?}"
        );
    }

    #[test]
    fn rate_limits_added_tightened_and_lifted() {
        let limited = |rate: &str| {
            OLD.replace(
                "frontend: [orders:read]",
                &format!("frontend: {{ scopes: [orders:read], {rate} }}"),
            )
        };
        assert_eq!(
            lines(OLD, &limited("rate: 200/s, burst: 50")),
            vec!["orders: - frontend is held to 200/s, burst 50"]
        );
        assert_eq!(
            lines(
                &limited("rate: 200/s, burst: 50"),
                &limited("rate: 100/s, burst: 50")
            ),
            vec!["orders: - frontend is held to 100/s, burst 50 (was 200/s, burst 50)"]
        );
        assert_eq!(
            lines(&limited("rate: 60/m"), &limited("rate: 2/s")),
            vec!["orders: + frontend is held to 2/s, burst 2 (was 60/m, burst 1)"]
        );
        assert_eq!(
            lines(&limited("rate: 200/s"), OLD),
            vec!["orders: + frontend is no longer rate limited (was 200/s, burst 200)"]
        );
    }
}
