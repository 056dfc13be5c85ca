//! The service directory: what the platform team's policy says, compiled. Service names, their
//! SPIFFE IDs, the scopes each owns, inbound route rules and which callers may hold which
//! scopes. The CA builds it from the policy file; sidecars receive it over `WatchDirectory` and
//! never read a policy of their own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

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

/// A per-caller request rate limit: `requests` per `period_seconds`, and up to `burst`
/// requests at once after a quiet spell. The callee's sidecar enforces it per calling
/// identity (a generic cell rate algorithm: one timestamp per caller, no timer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RateLimit {
    pub requests: u32,
    pub period_seconds: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "rate {0:?} must be REQUESTS/s, REQUESTS/m or REQUESTS/h (e.g. 200/s), REQUESTS at least 1"
)]
pub struct RateError(pub String);

impl RateLimit {
    /// `200/s`, `600/m`, `1000/h` (also `/second`, `/minute`, `/hour`); `burst` defaults to
    /// one second's worth, at least 1.
    pub fn parse(rate: &str, burst: Option<u32>) -> Result<Self, RateError> {
        let bad = || RateError(rate.to_owned());
        let (n, unit) = rate.trim().split_once('/').ok_or_else(bad)?;
        let requests: u32 = n.trim().parse().ok().filter(|&n| n > 0).ok_or_else(bad)?;
        let period_seconds = match unit.trim() {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3600,
            _ => return Err(bad()),
        };
        let burst = burst.unwrap_or_else(|| requests.div_ceil(period_seconds).max(1));
        Ok(Self {
            requests,
            period_seconds,
            burst,
        })
    }

    /// The time between two requests at the sustained rate.
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.period_seconds)) / self.requests.max(1)
    }

    /// The rate as written in a policy: `200/s`.
    pub fn rate(&self) -> String {
        let unit = match self.period_seconds {
            1 => "s".to_owned(),
            60 => "m".to_owned(),
            3600 => "h".to_owned(),
            n => format!("{n}s"),
        };
        format!("{}/{unit}", self.requests)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, burst {}", self.rate(), self.burst)
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
    /// Caller service name -> the request rate it is held to (callers absent: no limit).
    pub rate_limits: BTreeMap<String, RateLimit>,
    /// Ports that carry opaque TCP: authorised by caller identity alone, no requests seen.
    pub opaque_ports: BTreeSet<u16>,
}

impl Service {
    /// The first route that matches; `None` means 403.
    pub fn route(&self, method: &str, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(method, path))
    }
}

/// An IP network, `10.96.0.0/12` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP network (ADDRESS/PREFIX, e.g. 10.96.0.1/32 or fd00::/8)")]
pub struct CidrError(pub String);

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, CidrError> {
        let bad = || CidrError(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a.parse::<IpAddr>().map_err(|_| bad())?,
                p.parse::<u8>().map_err(|_| bad())?,
            ),
            None => {
                let a = s.parse::<IpAddr>().map_err(|_| bad())?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        // `::ffff:10.0.0.0/104` means an IPv4 network: it must be written as one, so that one
        // spelling has one meaning (addresses are compared in their IPv4 form).
        if let IpAddr::V6(v6) = addr
            && v6.to_ipv4_mapped().is_some()
        {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| -> (u128, u32) {
            match a.to_canonical() {
                IpAddr::V4(v) => (u128::from(u32::from(v)), 32),
                IpAddr::V6(v) => (u128::from(v), 128),
            }
        };
        let ((net, width), (host, host_width)) = (bits(self.addr), bits(ip));
        if width != host_width {
            return false;
        }
        let Some(shift) = width.checked_sub(u32::from(self.prefix)) else {
            return false;
        };
        if shift >= 128 {
            return true;
        }
        (net >> shift) == (host >> shift)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A destination outside the mesh that sidecars may reach in plain TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passthrough {
    pub cidr: Cidr,
    /// Empty: every port.
    pub ports: BTreeSet<u16>,
}

impl Passthrough {
    pub fn allows(&self, to: SocketAddr) -> bool {
        self.cidr.contains(to.ip()) && (self.ports.is_empty() || self.ports.contains(&to.port()))
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
    passthrough: Vec<Passthrough>,
    /// Every opaque port of every service: a redirected connection to one of these is a
    /// tunnel at once (no protocol detection, which would wait on server-first protocols).
    opaque_ports: BTreeSet<u16>,
    revoked: Revoked,
}

/// A certificate serial number in one form, whatever printed it: the integer in lowercase
/// hex, colons, a `0x` prefix and leading zeros dropped (`00:8f:...` from the DER bytes and
/// `8f...` from an integer are the same serial). `None` if it is not hex, or longer than a
/// serial can be (RFC 5280: 20 octets, plus a sign octet).
pub fn canonical_serial(value: &str) -> Option<String> {
    let s = value.trim().to_ascii_lowercase().replace(':', "");
    let s = s.strip_prefix("0x").unwrap_or(&s);
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let digits = s.trim_start_matches('0');
    Some(if digits.is_empty() { "0" } else { digits }.to_owned())
}

/// Identities and SVIDs revoked by `meshid ca revoke`: every sidecar refuses their calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revoked {
    pub spiffe_ids: BTreeSet<SpiffeId>,
    /// Serials in [`canonical_serial`] form.
    pub serials: BTreeSet<String>,
}

impl Revoked {
    pub fn is_empty(&self) -> bool {
        self.spiffe_ids.is_empty() && self.serials.is_empty()
    }

    /// Why a caller presenting this SVID is refused, if it is revoked. `serial` as
    /// [`crate::svid::inspect`] gives it; `serials` hold [`canonical_serial`]s.
    pub fn refuses(&self, id: &SpiffeId, serial: &str) -> Option<&'static str> {
        if self.spiffe_ids.contains(id) {
            Some("its identity is revoked")
        } else if !self.serials.is_empty()
            && canonical_serial(serial).is_some_and(|s| self.serials.contains(&s))
        {
            Some("its certificate is revoked")
        } else {
            None
        }
    }
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
        let opaque_ports = services
            .values()
            .flat_map(|s| s.opaque_ports.iter().copied())
            .collect();
        Self {
            sequence,
            trust_domain,
            token_issuer,
            services,
            by_id,
            passthrough: Vec::new(),
            opaque_ports,
            revoked: Revoked::default(),
        }
    }

    /// The revocations in force.
    pub fn with_revoked(mut self, revoked: Revoked) -> Self {
        self.revoked = revoked;
        self
    }

    pub fn revoked(&self) -> &Revoked {
        &self.revoked
    }

    pub fn set_revoked(&mut self, revoked: Revoked) {
        self.revoked = revoked;
    }

    /// The destinations outside the mesh sidecars may reach in plain TCP.
    pub fn with_passthrough(mut self, passthrough: Vec<Passthrough>) -> Self {
        self.passthrough = passthrough;
        self
    }

    pub fn passthrough(&self) -> &[Passthrough] {
        &self.passthrough
    }

    /// Whether `to`, outside the mesh, may be reached in plain TCP.
    pub fn passes_through(&self, to: SocketAddr) -> bool {
        self.passthrough.iter().any(|p| p.allows(to))
    }

    /// Whether some service declares `port` opaque.
    pub fn is_opaque_port(&self, port: u16) -> bool {
        self.opaque_ports.contains(&port)
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
                        .map(|(name, scopes)| {
                            let limit = s.rate_limits.get(name);
                            pb::Caller {
                                service: name.clone(),
                                scopes: scopes.iter().map(|x| x.to_string()).collect(),
                                rate_requests: limit.map_or(0, |l| l.requests),
                                rate_period_seconds: limit.map_or(0, |l| l.period_seconds),
                                rate_burst: limit.map_or(0, |l| l.burst),
                            }
                        })
                        .collect(),
                    opaque_ports: s.opaque_ports.iter().map(|&p| u32::from(p)).collect(),
                })
                .collect(),
            passthrough: d
                .passthrough
                .iter()
                .map(|p| pb::Passthrough {
                    cidr: p.cidr.to_string(),
                    ports: p.ports.iter().map(|&x| u32::from(x)).collect(),
                })
                .collect(),
            revoked_spiffe_ids: d.revoked.spiffe_ids.iter().map(|i| i.to_string()).collect(),
            revoked_serials: d.revoked.serials.iter().cloned().collect(),
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
        let ports = |ps: &[u32]| -> Result<BTreeSet<u16>, DirectoryError> {
            ps.iter()
                .map(|&p| {
                    u16::try_from(p)
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or_else(|| DirectoryError(format!("port {p} is out of range")))
                })
                .collect()
        };
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
                rate_limits: s
                    .callers
                    .iter()
                    .filter(|c| c.rate_requests != 0)
                    .map(|c| {
                        let limit = RateLimit {
                            requests: c.rate_requests,
                            period_seconds: c.rate_period_seconds,
                            burst: c.rate_burst,
                        };
                        if limit.period_seconds == 0 || limit.burst == 0 {
                            return Err(DirectoryError(format!(
                                "rate limit of caller {}: period and burst must be positive",
                                c.service
                            )));
                        }
                        Ok((c.service.clone(), limit))
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
                opaque_ports: ports(&s.opaque_ports)?,
                name: s.name.clone(),
            };
            services.insert(s.name, service);
        }
        let passthrough = d
            .passthrough
            .iter()
            .map(|p| {
                Ok(Passthrough {
                    cidr: Cidr::parse(&p.cidr).map_err(|e| bad(&e))?,
                    ports: ports(&p.ports)?,
                })
            })
            .collect::<Result<_, DirectoryError>>()?;
        let revoked = Revoked {
            spiffe_ids: d
                .revoked_spiffe_ids
                .iter()
                .map(|i| SpiffeId::parse(i).map_err(|e| bad(&e)))
                .collect::<Result<_, _>>()?,
            serials: d
                .revoked_serials
                .into_iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
        };
        Ok(Directory::new(
            d.sequence,
            TrustDomain::parse(&d.trust_domain).map_err(|e| bad(&e))?,
            d.token_issuer,
            services,
        )
        .with_passthrough(passthrough)
        .with_revoked(revoked))
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
            rate_limits: BTreeMap::new(),
            opaque_ports: BTreeSet::new(),
        }
    }

    #[test]
    fn rates_parse_as_written_in_a_policy() {
        let l = RateLimit::parse("200/s", Some(50)).unwrap();
        assert_eq!((l.requests, l.period_seconds, l.burst), (200, 1, 50));
        assert_eq!(l.interval(), std::time::Duration::from_millis(5));
        assert_eq!(l.to_string(), "200/s, burst 50");
        let l = RateLimit::parse("600/m", None).unwrap();
        assert_eq!((l.requests, l.period_seconds, l.burst), (600, 60, 10));
        assert_eq!(RateLimit::parse("5/hour", None).unwrap().burst, 1);
        for bad in ["0/s", "200", "200/d", "-1/s", "/s", "1.5/s", "x/s"] {
            assert!(RateLimit::parse(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn networks_contain_their_addresses_only() {
        let n = Cidr::parse("10.96.0.0/12").unwrap();
        assert!(n.contains("10.96.0.1".parse().unwrap()));
        assert!(n.contains("10.111.255.255".parse().unwrap()));
        assert!(!n.contains("10.112.0.0".parse().unwrap()));
        assert!(!n.contains("fd00::1".parse().unwrap()));
        assert!(
            n.contains("::ffff:10.96.0.1".parse().unwrap()),
            "a v4-mapped address is its IPv4 address"
        );
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert_eq!(
            Cidr::parse("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "x/1",
            "",
            "::ffff:10.0.0.0/104",
            "::ffff:0:0/96",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        let p = Passthrough {
            cidr: Cidr::parse("10.96.0.1/32").unwrap(),
            ports: [443].into(),
        };
        assert!(p.allows("10.96.0.1:443".parse().unwrap()));
        assert!(!p.allows("10.96.0.1:80".parse().unwrap()));
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

        let mut services = dir.services().clone();
        services.get_mut("svc3").unwrap().opaque_ports = [5432, 6379].into();
        let dir = Directory::new(3, dir.trust_domain.clone(), "https://ca".into(), services);
        assert!(dir.is_opaque_port(6379) && !dir.is_opaque_port(80));
        let dir = dir.with_passthrough(vec![Passthrough {
            cidr: Cidr::parse("fd00::/8").unwrap(),
            ports: [5432].into(),
        }]);
        let back = Directory::try_from(pb::Directory::from(&dir)).unwrap();
        assert_eq!(back, dir);
        assert_eq!(back.service_by_id(&id).unwrap().name, "svc417");
    }
}
