//! The service directory: what the platform team's policy says, compiled. Service names, their
//! SPIFFE IDs, the scopes each owns, inbound route rules and which callers may hold which
//! scopes. The CA builds it from the policy file; sidecars receive it over `WatchDirectory` and
//! never read a policy of their own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::id::{SpiffeId, TrustDomain};
use crate::pb;

/// A scope `service:verb`, owned by `service`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scope {0:?} must be SERVICE:VERB (lowercase letters, digits, '-', '_', '.')")]
pub struct ScopeError(pub String);

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// A service name: lowercase letters, digits, '-', '_', '.'; at most 63 characters.
pub fn valid_service_name(s: &str) -> bool {
    is_name(s)
}

impl Scope {
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        match s.split_once(':') {
            Some((svc, verb)) if is_name(svc) && is_name(verb) => Ok(Self(s.to_owned())),
            _ => Err(ScopeError(s.to_owned())),
        }
    }

    /// The service that owns this scope, and so the audience of a token that carries it.
    pub fn service(&self) -> &str {
        self.0.split_once(':').map(|(s, _)| s).unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An inbound route rule: method (None = any) and path prefix, and the scope it requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub method: Option<String>,
    pub path_prefix: String,
    pub scope: Option<Scope>,
}

impl Route {
    /// Segment-aware prefix match: `/orders` matches `/orders`, `/orders/7` and `/orders?x`,
    /// not `/ordersx`. A `GET` rule also covers `HEAD` (RFC 9110 §9.3.2: the same request
    /// without the body), so a HEAD cannot fall through to a more open rule.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        let covers = |m: &str| {
            m.eq_ignore_ascii_case(method)
                || (m.eq_ignore_ascii_case("GET") && method.eq_ignore_ascii_case("HEAD"))
        };
        if self.method.as_deref().is_some_and(|m| !covers(m)) {
            return false;
        }
        let p = self.path_prefix.as_str();
        match path.strip_prefix(p) {
            Some(rest) => p.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?']),
            None => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub id: SpiffeId,
    pub scopes: BTreeSet<Scope>,
    pub routes: Vec<Route>,
    /// Caller service name -> the scopes of this service it may be granted.
    pub callers: BTreeMap<String, BTreeSet<Scope>>,
}

impl Service {
    /// The first route that matches; `None` means 403.
    pub fn route(&self, method: &str, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(method, path))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    pub sequence: u64,
    pub trust_domain: TrustDomain,
    pub token_issuer: String,
    services: BTreeMap<String, Service>,
    /// SPIFFE ID -> service name: the sidecar looks up its caller by ID on every request.
    by_id: HashMap<SpiffeId, String>,
}

impl Directory {
    pub fn new(
        sequence: u64,
        trust_domain: TrustDomain,
        token_issuer: String,
        services: BTreeMap<String, Service>,
    ) -> Self {
        let mut by_id = HashMap::with_capacity(services.len());
        for (name, s) in &services {
            // The policy refuses duplicate IDs; should one come anyway, the first name wins.
            by_id.entry(s.id.clone()).or_insert_with(|| name.clone());
        }
        Self {
            sequence,
            trust_domain,
            token_issuer,
            services,
            by_id,
        }
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    /// Every service, by name.
    pub fn services(&self) -> &BTreeMap<String, Service> {
        &self.services
    }

    /// The service a SPIFFE ID belongs to.
    pub fn service_by_id(&self, id: &SpiffeId) -> Option<&Service> {
        self.services.get(self.by_id.get(id)?)
    }
}

impl From<&Directory> for pb::Directory {
    fn from(d: &Directory) -> Self {
        pb::Directory {
            sequence: d.sequence,
            trust_domain: d.trust_domain.to_string(),
            token_issuer: d.token_issuer.clone(),
            services: d
                .services
                .values()
                .map(|s| pb::DirectoryService {
                    name: s.name.clone(),
                    spiffe_id: s.id.to_string(),
                    scopes: s.scopes.iter().map(|x| x.to_string()).collect(),
                    routes: s
                        .routes
                        .iter()
                        .map(|r| pb::Route {
                            method: r.method.clone().unwrap_or_default(),
                            path_prefix: r.path_prefix.clone(),
                            scope: r.scope.as_ref().map(|x| x.to_string()).unwrap_or_default(),
                        })
                        .collect(),
                    callers: s
                        .callers
                        .iter()
                        .map(|(name, scopes)| pb::Caller {
                            service: name.clone(),
                            scopes: scopes.iter().map(|x| x.to_string()).collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("directory from the CA is malformed: {0}")]
pub struct DirectoryError(pub String);

impl TryFrom<pb::Directory> for Directory {
    type Error = DirectoryError;
    fn try_from(d: pb::Directory) -> Result<Self, Self::Error> {
        let bad = |e: &dyn fmt::Display| DirectoryError(e.to_string());
        let scope = |s: &str| Scope::parse(s).map_err(|e| bad(&e));
        let mut services = BTreeMap::new();
        for s in d.services {
            let service = Service {
                id: SpiffeId::parse(&s.spiffe_id).map_err(|e| bad(&e))?,
                scopes: s
                    .scopes
                    .iter()
                    .map(|x| scope(x))
                    .collect::<Result<_, _>>()?,
                routes: s
                    .routes
                    .into_iter()
                    .map(|r| {
                        Ok(Route {
                            method: (!r.method.is_empty()).then_some(r.method),
                            path_prefix: r.path_prefix,
                            scope: if r.scope.is_empty() {
                                None
                            } else {
                                Some(scope(&r.scope)?)
                            },
                        })
                    })
                    .collect::<Result<_, DirectoryError>>()?,
                callers: s
                    .callers
                    .into_iter()
                    .map(|c| {
                        Ok((
                            c.service,
                            c.scopes
                                .iter()
                                .map(|x| scope(x))
                                .collect::<Result<_, _>>()?,
                        ))
                    })
                    .collect::<Result<_, DirectoryError>>()?,
                name: s.name.clone(),
            };
            services.insert(s.name, service);
        }
        Ok(Directory::new(
            d.sequence,
            TrustDomain::parse(&d.trust_domain).map_err(|e| bad(&e))?,
            d.token_issuer,
            services,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_name_their_service() {
        let s = Scope::parse("orders:read").unwrap();
        assert_eq!(s.service(), "orders");
        assert!(Scope::parse("orders").is_err());
        assert!(Scope::parse("Orders:read").is_err());
        assert!(Scope::parse("orders:read:x").is_err());
    }

    #[test]
    fn routes_match_by_method_and_path_segment() {
        let r = Route {
            method: Some("GET".into()),
            path_prefix: "/orders".into(),
            scope: None,
        };
        assert!(r.matches("GET", "/orders"));
        assert!(r.matches("get", "/orders/7"));
        assert!(r.matches("GET", "/orders?id=7"));
        assert!(!r.matches("GET", "/ordersx"));
        assert!(!r.matches("POST", "/orders"));
        assert!(r.matches("HEAD", "/orders"), "a GET rule covers HEAD");
        let any = Route {
            method: None,
            path_prefix: "/".into(),
            scope: None,
        };
        assert!(any.matches("DELETE", "/anything"));
    }

    fn service(name: &str, id: &str) -> Service {
        Service {
            name: name.into(),
            id: SpiffeId::parse(id).unwrap(),
            scopes: BTreeSet::new(),
            routes: Vec::new(),
            callers: BTreeMap::new(),
        }
    }

    #[test]
    fn services_are_found_by_spiffe_id_also_after_the_wire_round_trip() {
        let services: BTreeMap<String, Service> = (0..500)
            .map(|i| {
                let name = format!("svc{i}");
                let id = format!("spiffe://cluster.local/ns/shop/sa/{name}");
                (name.clone(), service(&name, &id))
            })
            .collect();
        let td = TrustDomain::parse("cluster.local").unwrap();
        let dir = Directory::new(3, td, "https://ca".into(), services);
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/svc417").unwrap();
        assert_eq!(dir.service_by_id(&id).unwrap().name, "svc417");
        let stranger = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/nobody").unwrap();
        assert!(dir.service_by_id(&stranger).is_none());

        let back = Directory::try_from(pb::Directory::from(&dir)).unwrap();
        assert_eq!(back, dir);
        assert_eq!(back.service_by_id(&id).unwrap().name, "svc417");
    }
}
