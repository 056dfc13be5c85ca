//! Issuance: one X509-SVID from a CSR and an attested SPIFFE ID.
//!
//! What goes into a credential is decided here and nowhere else (the template), and every
//! certificate is checked against the SPIFFE X509-SVID profile before it leaves (SPIRE's
//! credtemplate/credvalidator split). The CSR contributes its public key and nothing else: its
//! subject, SANs and extensions are ignored, because the SPIFFE ID comes from attestation, never
//! from what the caller asks for.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use meshid_proto::SpiffeId;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PKCS_ED25519, SanType, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::authority::{self, X509Authority};

/// A CSR larger than this is refused before parsing. A P-256 CSR is about 300 bytes.
pub const MAX_CSR_BYTES: usize = 8 * 1024;
/// The shortest SVID lifetime the CA issues (DESIGN: configurable down to 1 min).
pub const MIN_SVID_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    #[error("CSR is empty")]
    CsrMissing,
    #[error("CSR is {size} bytes; the limit is {limit}")]
    CsrTooLarge { size: usize, limit: usize },
    #[error("CSR is not a DER PKCS#10 request")]
    CsrMalformed,
    #[error("CSR signature does not verify with its own public key (tampered or corrupt)")]
    CsrSignature,
    #[error("CSR key is {0}; only ECDSA P-256 and Ed25519 keys are accepted")]
    UnsupportedKey(String),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("issued certificate breaks the SVID profile: {0}")]
    Profile(String),
    #[error("the signing CA expires at {expires:?}, too soon to issue a useful SVID")]
    AuthorityExpiring { expires: SystemTime },
}

/// The public key of a verified CSR, the only part of it the CA uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrKey(SubjectPublicKeyInfo);

impl CsrKey {
    /// The public half of a key the CA holds itself (its own serving certificate).
    pub fn from_key_pair(key: &rcgen::KeyPair) -> Result<Self, IssueError> {
        SubjectPublicKeyInfo::from_der(&rcgen::PublicKeyData::subject_public_key_info(key))
            .map(Self)
            .map_err(|e| IssueError::Sign(e.to_string()))
    }
}

/// Parse a DER CSR, verify its self-signature and accept only P-256 or Ed25519 keys.
pub fn parse_csr(der: &[u8]) -> Result<CsrKey, IssueError> {
    if der.is_empty() {
        return Err(IssueError::CsrMissing);
    }
    if der.len() > MAX_CSR_BYTES {
        return Err(IssueError::CsrTooLarge {
            size: der.len(),
            limit: MAX_CSR_BYTES,
        });
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|_| IssueError::CsrMalformed)?;
    if !rest.is_empty() {
        return Err(IssueError::CsrMalformed);
    }
    let spki = &csr.certification_request_info.subject_pki;
    let key = SubjectPublicKeyInfo::from_der(spki.raw).map_err(|_| {
        IssueError::UnsupportedKey(format!("of algorithm {}", spki.algorithm.algorithm))
    })?;
    let alg = rcgen::PublicKeyData::algorithm(&key);
    if alg != &PKCS_ECDSA_P256_SHA256 && alg != &PKCS_ED25519 {
        return Err(IssueError::UnsupportedKey(format!("{alg:?}")));
    }
    csr.verify_signature()
        .map_err(|_| IssueError::CsrSignature)?;
    Ok(CsrKey(key))
}

/// What one SVID should say. `dns_names`/`ip_addresses` are only for the CA's own serving
/// certificate, so stock TLS clients can reach it by host name.
#[derive(Debug, Clone)]
pub struct X509SvidParams<'a> {
    pub spiffe_id: &'a SpiffeId,
    pub key: &'a CsrKey,
    pub ttl: Duration,
    pub now: SystemTime,
    pub dns_names: &'a [String],
    pub ip_addresses: &'a [IpAddr],
}

/// A signed SVID and what the audit log records about it.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    pub spiffe_id: SpiffeId,
    /// Leaf first, then the intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    /// Lowercase hex.
    pub serial: String,
    pub not_after: SystemTime,
}

/// Sign an X509-SVID with `authority`. The lifetime is capped by the intermediate's own expiry.
pub fn sign_x509_svid(
    authority: &X509Authority,
    p: X509SvidParams<'_>,
) -> Result<IssuedSvid, IssueError> {
    let ttl = p.ttl.max(MIN_SVID_TTL);
    let not_after = (p.now + ttl).min(authority.intermediate_not_after);
    if not_after <= p.now + MIN_SVID_TTL / 2 {
        return Err(IssueError::AuthorityExpiring {
            expires: authority.intermediate_not_after,
        });
    }
    let serial = authority::random_serial();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshid");
    params.distinguished_name = dn;
    let uri = p
        .spiffe_id
        .to_string()
        .try_into()
        .map_err(|_| IssueError::Sign("SPIFFE ID is not IA5".into()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    for name in p.dns_names {
        let dns = name
            .clone()
            .try_into()
            .map_err(|_| IssueError::Sign(format!("DNS name {name:?} is not IA5")))?;
        params.subject_alt_names.push(SanType::DnsName(dns));
    }
    for ip in p.ip_addresses {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    // SPIFFE X509-SVID §4: leaf, CA:false, digitalSignature only (critical), both EKUs.
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = (p.now - authority::BACKDATE).into();
    params.not_after = not_after.into();
    params.serial_number = Some(serial.clone().into());
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&p.key.0, authority.issuer())
        .map_err(|e| IssueError::Sign(e.to_string()))?;
    let leaf = cert.der().clone();
    check_profile(&leaf, p.spiffe_id)?;
    Ok(IssuedSvid {
        spiffe_id: p.spiffe_id.clone(),
        chain: vec![leaf, authority.intermediate.clone()],
        serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        not_after,
    })
}

/// The SPIFFE X509-SVID leaf profile, checked on our own output with an independent parse.
pub fn check_profile(der: &[u8], want: &SpiffeId) -> Result<(), IssueError> {
    let fail = |m: &str| IssueError::Profile(m.to_owned());
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| fail("does not parse"))?;
    let mut uris = Vec::new();
    let (mut ca_false, mut ku_ok, mut eku_ok) = (false, false, false);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    if let GeneralName::URI(u) = n {
                        uris.push(*u);
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) => ca_false = !bc.ca,
            ParsedExtension::KeyUsage(ku) => {
                ku_ok =
                    ext.critical && ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign()
            }
            ParsedExtension::ExtendedKeyUsage(eku) => eku_ok = eku.server_auth && eku.client_auth,
            _ => {}
        }
    }
    let want = want.to_string();
    if uris != [want.as_str()] {
        return Err(fail(
            "must have exactly one URI SAN, the attested SPIFFE ID",
        ));
    }
    if !ca_false {
        return Err(fail("basic constraints must say CA:false"));
    }
    if !ku_ok {
        return Err(fail(
            "key usage must be critical with digitalSignature and no CA usages",
        ));
    }
    if !eku_ok {
        return Err(fail(
            "extended key usage must hold serverAuth and clientAuth",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KeyState;
    use meshid_proto::TrustDomain;
    use rcgen::{KeyPair, PKCS_ECDSA_P384_SHA384};

    fn csr_for(key: &KeyPair, san: &str) -> Vec<u8> {
        let params = CertificateParams::new(vec![san.to_owned()]).unwrap();
        params.serialize_request(key).unwrap().der().to_vec()
    }

    fn authority() -> X509Authority {
        let td = TrustDomain::parse("cluster.local").unwrap();
        X509Authority::generate(&td, SystemTime::now(), KeyState::Active).unwrap()
    }

    #[test]
    fn the_svid_carries_the_attested_id_not_the_requested_one() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = parse_csr(&csr_for(&key, "admin.example.com")).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let now = SystemTime::now();
        let svid = sign_x509_svid(
            &authority(),
            X509SvidParams {
                spiffe_id: &id,
                key: &csr,
                ttl: Duration::from_secs(3600),
                now,
                dns_names: &[],
                ip_addresses: &[],
            },
        )
        .unwrap();
        let info = meshid_proto::svid::inspect(&svid.chain[0]).unwrap();
        assert_eq!(info.spiffe_id, id);
        assert_eq!(svid.chain.len(), 2);
        assert_eq!(svid.serial.len(), 32);
        let life = info.not_after.duration_since(now).unwrap().as_secs();
        assert!((3599..=3600).contains(&life), "lifetime {life}");
    }

    #[test]
    fn lifetime_never_passes_the_intermediate() {
        let auth = authority();
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let csr = parse_csr(&csr_for(&key, "x")).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/x").unwrap();
        let svid = sign_x509_svid(
            &auth,
            X509SvidParams {
                spiffe_id: &id,
                key: &csr,
                ttl: Duration::from_secs(100 * 365 * 24 * 3600),
                now: SystemTime::now(),
                dns_names: &[],
                ip_addresses: &[],
            },
        )
        .unwrap();
        assert!(svid.not_after <= auth.intermediate_not_after);
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut der = csr_for(&key, "x");
        // Flip a byte inside the SAN value: still DER, signature no longer matches.
        let pos = der.windows(1).position(|w| w == b"x").unwrap();
        der[pos] = b'y';
        assert_eq!(parse_csr(&der).unwrap_err(), IssueError::CsrSignature);
    }

    #[test]
    fn p384_and_garbage_are_refused_with_the_reason() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(matches!(
            parse_csr(&csr_for(&key, "x")),
            Err(IssueError::UnsupportedKey(_))
        ));
        assert_eq!(parse_csr(b"not a csr"), Err(IssueError::CsrMalformed));
        assert_eq!(parse_csr(&[]), Err(IssueError::CsrMissing));
        assert!(matches!(
            parse_csr(&vec![0u8; MAX_CSR_BYTES + 1]),
            Err(IssueError::CsrTooLarge { .. })
        ));
    }
}
