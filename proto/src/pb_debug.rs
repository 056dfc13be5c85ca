//! Hand-written `Debug` for the generated messages that carry a secret: the attestation (a join
//! token or a Kubernetes ServiceAccount token, `Attestation.kind`) and the access token
//! (`IssueTokenResponse.access_token`). build.rs tells prost not to derive `Debug` for exactly
//! these (`skip_debug`); here every field is printed as the derive would, but a secret shows as
//! `[redacted]`, so a `{:?}` of a request or response in a log line or an error never leaks it.
//! Messages that contain these (`IssueSvidRequest`) keep their derived `Debug` and redact
//! through them. A new secret field in ca.proto belongs in build.rs and here.

use std::fmt;

use crate::{pb, workload};

/// Stands in for a secret's value in `Debug` output.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Debug for pb::Attestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attestation")
            .field("kind", &self.kind)
            .finish()
    }
}

impl fmt::Debug for pb::attestation::Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Which kind of attestation it is tells an operator something; its value is the secret.
        let name = match self {
            Self::JoinToken(_) => "JoinToken",
            Self::K8sServiceAccountToken(_) => "K8sServiceAccountToken",
        };
        f.debug_tuple(name).field(&Redacted).finish()
    }
}

impl fmt::Debug for pb::IssueTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueTokenResponse")
            .field("access_token", &Redacted)
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish()
    }
}

impl fmt::Debug for pb::JwtSvidResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSvidResponse")
            .field("spiffe_id", &self.spiffe_id)
            .field("token", &Redacted)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

// The Workload API: the X.509-SVID's private key and the JWT-SVIDs are secrets.
impl fmt::Debug for workload::X509svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509SVID")
            .field("spiffe_id", &self.spiffe_id)
            .field(
                "x509_svid",
                &format_args!("[{} bytes]", self.x509_svid.len()),
            )
            .field("x509_svid_key", &Redacted)
            .field("bundle", &format_args!("[{} bytes]", self.bundle.len()))
            .field("hint", &self.hint)
            .finish()
    }
}

impl fmt::Debug for workload::Jwtsvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JWTSVID")
            .field("spiffe_id", &self.spiffe_id)
            .field("svid", &Redacted)
            .field("hint", &self.hint)
            .finish()
    }
}

impl fmt::Debug for workload::ValidateJwtsvidRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateJWTSVIDRequest")
            .field("audience", &self.audience)
            .field("svid", &Redacted)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::pb;

    const SECRET: &str = "s3cr3t-value-that-must-not-leak";

    #[test]
    fn join_token_attestation_debug_is_redacted() {
        let a = pb::Attestation {
            kind: Some(pb::attestation::Kind::JoinToken(SECRET.into())),
        };
        let shown = format!("{a:?} {a:#?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert_eq!(
            format!("{a:?}"),
            "Attestation { kind: Some(JoinToken([redacted])) }"
        );
    }

    #[test]
    fn service_account_token_attestation_debug_is_redacted() {
        let a = pb::Attestation {
            kind: Some(pb::attestation::Kind::K8sServiceAccountToken(SECRET.into())),
        };
        let shown = format!("{a:?} {a:#?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(
            shown.contains("K8sServiceAccountToken([redacted])"),
            "{shown}"
        );
        let none = pb::Attestation { kind: None };
        assert_eq!(format!("{none:?}"), "Attestation { kind: None }");
    }

    #[test]
    fn issue_svid_request_debug_redacts_its_attestation_and_keeps_the_csr() {
        let r = pb::IssueSvidRequest {
            attestation: Some(pb::Attestation {
                kind: Some(pb::attestation::Kind::JoinToken(SECRET.into())),
            }),
            csr: vec![0x30, 0x82],
        };
        let shown = format!("{r:?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("JoinToken([redacted])"), "{shown}");
        assert!(shown.contains("csr: [48, 130]"), "{shown}");
    }

    #[test]
    fn workload_api_secrets_are_redacted() {
        use crate::workload;
        let x = workload::X509svid {
            spiffe_id: "spiffe://td/a".into(),
            x509_svid: vec![1, 2, 3],
            x509_svid_key: SECRET.as_bytes().to_vec(),
            bundle: vec![4],
            hint: String::new(),
        };
        let key_bytes = format!("{:?}", SECRET.as_bytes());
        let r = workload::X509svidResponse {
            svids: vec![x],
            ..Default::default()
        };
        let shown = format!("{r:?} {r:#?}");
        assert!(!shown.contains(&key_bytes[1..20]), "{shown}");
        assert!(shown.contains("x509_svid_key: [redacted]"), "{shown}");
        assert!(shown.contains("spiffe://td/a"), "{shown}");
        let j = workload::JwtsvidResponse {
            svids: vec![workload::Jwtsvid {
                spiffe_id: "spiffe://td/a".into(),
                svid: SECRET.into(),
                hint: String::new(),
            }],
        };
        let v = workload::ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: SECRET.into(),
        };
        let m = pb::JwtSvidResponse {
            spiffe_id: "spiffe://td/a".into(),
            token: SECRET.into(),
            expires_at: 1,
        };
        let shown = format!("{j:?} {v:#?} {m:?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert_eq!(shown.matches("[redacted]").count(), 3, "{shown}");
    }

    #[test]
    fn issue_token_response_debug_redacts_the_access_token_only() {
        let r = pb::IssueTokenResponse {
            access_token: SECRET.into(),
            token_type: "Bearer".into(),
            expires_in: 300,
            scope: "orders:read orders:write".into(),
        };
        let shown = format!("{r:?} {r:#?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert_eq!(
            format!("{r:?}"),
            "IssueTokenResponse { access_token: [redacted], token_type: \"Bearer\", \
             expires_in: 300, scope: \"orders:read orders:write\" }"
        );
    }
}
