//! SPIFFE IDs and trust domains, parsed and validated once (SPIFFE ID spec §2).
//!
//! A `SpiffeId` is only ever built through [`SpiffeId::parse`] or the constructors here, so code
//! that holds one never re-checks it.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID must start with spiffe://")]
    WrongScheme,
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error(
        "trust domain contains {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    BadTrustDomainChar(char),
    #[error("path segment {0:?} is empty, '.' or '..'")]
    BadSegment(String),
    #[error("path contains {0:?}; only letters, digits, '.', '-' and '_' are allowed")]
    BadPathChar(char),
    #[error("SPIFFE ID is longer than 2048 bytes")]
    TooLong,
    #[error("SPIFFE ID must not have a query or fragment")]
    QueryOrFragment,
}

/// A SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if let Some(c) = s.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        }) {
            return Err(SpiffeIdError::BadTrustDomainChar(c));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The ID of this trust domain's CA itself (`spiffe://<td>/meshid/ca`): reserved, never
    /// issued to a workload.
    pub fn ca_id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.clone(),
            path: "/meshid/ca".to_owned(),
        }
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service account>`, the Kubernetes workload form.
    pub fn workload_id(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeIdError> {
        // Each is one path segment: a '/' would smuggle in extra segments.
        for part in [namespace, service_account] {
            if part.is_empty() || part.contains('/') {
                return Err(SpiffeIdError::BadSegment(part.to_owned()));
            }
        }
        SpiffeId::parse(&format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.0
        ))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A validated SPIFFE ID: `spiffe://<trust domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > 2048 {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or(SpiffeIdError::WrongScheme)?;
        if rest.contains(['?', '#']) {
            return Err(SpiffeIdError::QueryOrFragment);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let trust_domain = TrustDomain::parse(td)?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() || segment == "." || segment == ".." {
                    return Err(SpiffeIdError::BadSegment(segment.to_owned()));
                }
                if let Some(c) = segment
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(SpiffeIdError::BadPathChar(c));
                }
            }
        }
        Ok(Self {
            trust_domain,
            path: path.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_id_round_trips() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/orders");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/orders");
    }

    #[test]
    fn malformed_ids_are_refused_with_the_reason() {
        assert_eq!(
            SpiffeId::parse("https://x/y"),
            Err(SpiffeIdError::WrongScheme)
        );
        assert_eq!(
            SpiffeId::parse("spiffe:///a"),
            Err(SpiffeIdError::EmptyTrustDomain)
        );
        assert_eq!(
            SpiffeId::parse("spiffe://Cluster/a"),
            Err(SpiffeIdError::BadTrustDomainChar('C'))
        );
        assert_eq!(
            SpiffeId::parse("spiffe://td/a//b"),
            Err(SpiffeIdError::BadSegment(String::new()))
        );
        assert_eq!(
            SpiffeId::parse("spiffe://td/a/../b"),
            Err(SpiffeIdError::BadSegment("..".into()))
        );
        assert_eq!(
            SpiffeId::parse("spiffe://td/a b"),
            Err(SpiffeIdError::BadPathChar(' '))
        );
        assert_eq!(
            SpiffeId::parse("spiffe://td/a?x=1"),
            Err(SpiffeIdError::QueryOrFragment)
        );
        assert_eq!(
            SpiffeId::parse("spiffe://td/"),
            Err(SpiffeIdError::BadSegment(String::new()))
        );
    }

    #[test]
    fn kubernetes_workload_form() {
        let td = TrustDomain::parse("cluster.local").unwrap();
        assert_eq!(
            td.workload_id("shop", "orders").unwrap().to_string(),
            "spiffe://cluster.local/ns/shop/sa/orders"
        );
        assert!(td.workload_id("shop", "bad/name").is_err());
        assert_eq!(td.ca_id().to_string(), "spiffe://cluster.local/meshid/ca");
    }
}
