//! The OAuth 2.0 client-credentials grant (RFC 6749 §4.4), decided against the directory.
//!
//! The caller is the SPIFFE ID of the certificate that authenticated the request (RFC 8705
//! `tls_client_auth`); `client_id`, when sent, must name that caller's service. The scopes name
//! their service, which is the token's audience (`orders:read` -> `aud` = the SPIFFE ID of
//! `orders`). Only scopes the policy grants this caller are given; asking for any other is
//! `invalid_scope`, never a silent downgrade. One implementation serves `POST /token` and gRPC
//! `IssueToken`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshid_proto::SpiffeId;
use meshid_proto::directory::{Directory, Scope};

/// RFC 6749 §5.2 errors (plus rate limiting), each with a description for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidClient(String),
    #[error("{0}")]
    UnauthorizedClient(String),
    #[error("{0}")]
    UnsupportedGrantType(String),
    #[error("{0}")]
    InvalidScope(String),
    /// The CA cannot sign this kind of token with its keys (a JWT-SVID under an EdDSA key).
    #[error("{0}")]
    UnsupportedAlgorithm(String),
    #[error("too many token requests; retry in {retry_after} s")]
    RateLimited { retry_after: u64 },
    #[error("{0}")]
    Internal(String),
}

impl GrantError {
    /// The RFC 6749 `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidClient(_) => "invalid_client",
            Self::UnauthorizedClient(_) => "unauthorized_client",
            Self::UnsupportedGrantType(_) => "unsupported_grant_type",
            Self::InvalidScope(_) => "invalid_scope",
            Self::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            Self::RateLimited { .. } => "slow_down",
            Self::Internal(_) => "server_error",
        }
    }
}

/// What the caller asked for, already authenticated.
#[derive(Debug, Clone)]
pub struct GrantRequest<'a> {
    pub caller: &'a SpiffeId,
    pub client_id: Option<&'a str>,
    /// Space-separated scopes as sent.
    pub scope: Option<&'a str>,
    /// Target service by name or SPIFFE ID.
    pub audience: Option<&'a str>,
}

/// The decision: who gets which scopes for which audience.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub client_id: String,
    pub audience_service: String,
    pub audience: SpiffeId,
    pub scopes: BTreeSet<Scope>,
}

impl Grant {
    pub fn scope_string(&self) -> String {
        self.scopes
            .iter()
            .map(Scope::as_str)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Decide a client-credentials request against the directory.
pub fn decide(dir: &Directory, req: &GrantRequest<'_>) -> Result<Grant, GrantError> {
    let caller = dir.service_by_id(req.caller).ok_or_else(|| {
        GrantError::UnauthorizedClient(format!("{} is not a service of the policy", req.caller))
    })?;
    if let Some(cid) = req.client_id
        && cid != caller.name
    {
        return Err(GrantError::InvalidClient(format!(
            "client_id {cid:?} does not match the client certificate ({})",
            caller.name
        )));
    }
    let requested: Vec<Scope> = match req.scope {
        Some(s) if !s.trim().is_empty() => s
            .split(' ')
            .filter(|x| !x.is_empty())
            .map(|x| Scope::parse(x).map_err(|e| GrantError::InvalidScope(e.to_string())))
            .collect::<Result<_, _>>()?,
        _ => Vec::new(),
    };
    let from_scopes: BTreeSet<&str> = requested.iter().map(Scope::service).collect();
    if from_scopes.len() > 1 {
        return Err(GrantError::InvalidScope(format!(
            "scopes name {} services ({}); one token is for one audience",
            from_scopes.len(),
            from_scopes.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    let from_audience = match req.audience {
        None | Some("") => None,
        Some(a) => Some(
            dir.service(a)
                .or_else(|| {
                    SpiffeId::parse(a)
                        .ok()
                        .and_then(|id| dir.service_by_id(&id))
                })
                .ok_or_else(|| {
                    GrantError::InvalidRequest(format!(
                        "audience {a:?} is not a service of the policy"
                    ))
                })?
                .name
                .as_str(),
        ),
    };
    let target_name = match (from_scopes.first(), from_audience) {
        (Some(s), Some(a)) if *s != a => {
            return Err(GrantError::InvalidScope(format!(
                "scopes are for {s} but the audience is {a}"
            )));
        }
        (Some(s), _) => *s,
        (None, Some(a)) => a,
        (None, None) => return Err(GrantError::InvalidScope("scope is required".into())),
    };
    let target = dir.service(target_name).ok_or_else(|| {
        GrantError::InvalidScope(format!("no service {target_name:?} in the policy"))
    })?;
    let allowed = target
        .callers
        .get(&caller.name)
        .cloned()
        .unwrap_or_default();
    let scopes: BTreeSet<Scope> = if requested.is_empty() {
        // Audience only: the default is every scope this caller may hold there.
        allowed.clone()
    } else {
        let denied: Vec<&str> = requested
            .iter()
            .filter(|s| !allowed.contains(*s))
            .map(Scope::as_str)
            .collect();
        if !denied.is_empty() {
            return Err(GrantError::InvalidScope(format!(
                "{} may not be granted {} on {}",
                caller.name,
                denied.join(" "),
                target.name
            )));
        }
        requested.into_iter().collect()
    };
    if scopes.is_empty() {
        return Err(GrantError::InvalidScope(format!(
            "{} may not call {}",
            caller.name, target.name
        )));
    }
    Ok(Grant {
        client_id: caller.name.clone(),
        audience_service: target.name.clone(),
        audience: target.id.clone(),
        scopes,
    })
}

/// A token bucket per caller: `rate` requests per second, bursts of `rate`.
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<SpiffeId, (f64, Instant)>>,
}

const MAX_BUCKETS: usize = 100_000;

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        Self {
            rate: f64::from(per_second.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one request from `who`'s bucket, or say how many seconds until one is available.
    pub fn check(&self, who: &SpiffeId, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS {
            let rate = self.rate;
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < rate
            });
        }
        let (tokens, at) = buckets.entry(who.clone()).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = Duration::from_secs_f64((1.0 - *tokens) / self.rate);
            Err(wait.as_secs().max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_proto::TrustDomain;

    fn dir() -> Directory {
        let text = "\
trust_domain: cluster.local
services:
  orders:
    id: spiffe://cluster.local/ns/shop/sa/orders
    scopes: [orders:read, orders:write]
    callers:
      frontend: [orders:read]
  billing:
    id: spiffe://cluster.local/ns/shop/sa/billing
    scopes: [billing:charge]
    callers:
      frontend: [billing:charge]
  frontend:
    id: spiffe://cluster.local/ns/shop/sa/frontend
";
        crate::policy::compile(
            text,
            &TrustDomain::parse("cluster.local").unwrap(),
            "https://ca",
        )
        .unwrap()
    }

    fn frontend() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").unwrap()
    }

    fn ask<'a>(
        caller: &'a SpiffeId,
        scope: Option<&'a str>,
        audience: Option<&'a str>,
        client_id: Option<&'a str>,
    ) -> GrantRequest<'a> {
        GrantRequest {
            caller,
            client_id,
            scope,
            audience,
        }
    }

    #[test]
    fn scopes_name_the_audience() {
        let f = frontend();
        let g = decide(
            &dir(),
            &ask(&f, Some("orders:read"), None, Some("frontend")),
        )
        .unwrap();
        assert_eq!(
            g.audience.to_string(),
            "spiffe://cluster.local/ns/shop/sa/orders"
        );
        assert_eq!(g.scope_string(), "orders:read");
        assert_eq!(g.client_id, "frontend");
        let g = decide(
            &dir(),
            &ask(
                &f,
                None,
                Some("spiffe://cluster.local/ns/shop/sa/orders"),
                None,
            ),
        )
        .unwrap();
        assert_eq!(
            g.scope_string(),
            "orders:read",
            "audience only gets the default scopes"
        );
    }

    #[test]
    fn refusals_have_the_rfc6749_code() {
        let f = frontend();
        let d = dir();
        let code = |r: GrantRequest<'_>| decide(&d, &r).unwrap_err().code();
        assert_eq!(
            code(ask(&f, Some("orders:write"), None, None)),
            "invalid_scope"
        );
        assert_eq!(
            code(ask(&f, Some("orders:read billing:charge"), None, None)),
            "invalid_scope"
        );
        assert_eq!(
            code(ask(&f, Some("orders:read"), Some("billing"), None)),
            "invalid_scope"
        );
        assert_eq!(code(ask(&f, None, None, None)), "invalid_scope");
        assert_eq!(
            code(ask(&f, Some("orders:read"), None, Some("billing"))),
            "invalid_client"
        );
        assert_eq!(
            code(ask(&f, Some("orders:read"), Some("nosuch"), None)),
            "invalid_request"
        );
        let stranger = SpiffeId::parse("spiffe://cluster.local/ns/x/sa/y").unwrap();
        assert_eq!(
            code(ask(&stranger, Some("orders:read"), None, None)),
            "unauthorized_client"
        );
        let orders = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        assert_eq!(
            code(ask(&orders, Some("billing:charge"), None, None)),
            "invalid_scope"
        );
    }

    #[test]
    fn the_rate_limit_refills_over_time() {
        let limiter = RateLimiter::new(2);
        let who = frontend();
        let t0 = Instant::now();
        assert!(limiter.check(&who, t0).is_ok());
        assert!(limiter.check(&who, t0).is_ok());
        assert_eq!(limiter.check(&who, t0), Err(1));
        assert!(limiter.check(&who, t0 + Duration::from_millis(600)).is_ok());
    }
}
