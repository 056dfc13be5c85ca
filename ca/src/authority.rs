//! The CA's signing keys: each an X.509 root and the intermediate that signs leaves, in one of
//! the states prepared -> active -> retired. Exactly one is active; the trust bundle is the roots
//! of every key that is not retired.
//!
//! On a new data directory a root and intermediate are generated (ECDSA P-256); an operator can
//! instead bring a root (cert + key: meshid makes the intermediate) or an intermediate (cert +
//! key, with the root cert it chains to). Private keys never leave the store and never reach a
//! log: they are held as `Secret`s until parsed into signing keys here.
//!
//! Brought files are operator input, not trusted as given: before the first key is saved they
//! are checked for what would make every chain fail at relying parties (not a CA, no
//! keyCertSign, expired, not signed by the upstream bundle, a key that is not the certificate's)
//! and for an intermediate that could speak for an identity other than this trust domain's CA
//! (a URI SAN other than `spiffe://<td>`). A refusal names the flag, the file and the reason.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use meshid_proto::clock::unix_seconds;
use meshid_proto::{Secret, SpiffeId, TrustBundle, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::store::{AuthorityRecord, KeyState};

/// How long a generated root and intermediate live (`--root-ttl`, `--intermediate-ttl`). An
/// intermediate never outlives its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub root: Duration,
    pub intermediate: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            root: Duration::from_secs(10 * 365 * 24 * 3600),
            intermediate: Duration::from_secs(365 * 24 * 3600),
        }
    }
}
/// Backdating absorbs small clock differences between the CA and its relying parties.
pub const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("generating a CA key: {0}")]
    Generate(rcgen::Error),
    #[error("{what}: {detail}")]
    BadMaterial { what: String, detail: String },
    #[error("the data directory has no active CA key")]
    NoActive,
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// An operator's CA file that fails the checks made before it is first saved.
    #[error("{file} {path} is refused: {reason}")]
    Refused {
        file: CaFile,
        path: String,
        reason: CaFileRefusal,
    },
}

/// An operator-supplied CA file, named by the `meshid ca serve` flag that brings it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaFile {
    RootCert,
    RootKey,
    IntermediateCert,
    IntermediateKey,
    UpstreamBundle,
}

impl CaFile {
    pub fn flag(self) -> &'static str {
        match self {
            Self::RootCert => "--root-cert",
            Self::RootKey => "--root-key",
            Self::IntermediateCert => "--intermediate-cert",
            Self::IntermediateKey => "--intermediate-key",
            Self::UpstreamBundle => "--upstream-bundle",
        }
    }
}

impl fmt::Display for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.flag())
    }
}

/// Why a brought CA certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaFileRefusal {
    #[error("it is not an X.509 certificate x509-parser can read: {detail}")]
    Unparseable { detail: String },
    #[error(
        "it is not a CA certificate (basicConstraints CA:true is missing), so every certificate it signs would be rejected"
    )]
    NotCa,
    #[error(
        "its key usage lacks keyCertSign, so every certificate it signs would be rejected (RFC 5280 §4.2.1.3)"
    )]
    NoKeyCertSign,
    #[error(
        "its pathLenConstraint is 0, which leaves no room for the intermediate meshid makes under it (RFC 5280 §4.2.1.9)"
    )]
    NoRoomForIntermediate,
    #[error(
        "its validity ended at {} (it is now {})",
        humantime::format_rfc3339_seconds(*not_after),
        humantime::format_rfc3339_seconds(*now)
    )]
    Expired {
        not_after: SystemTime,
        now: SystemTime,
    },
    #[error(
        "it is not valid before {} (it is now {})",
        humantime::format_rfc3339_seconds(*not_before),
        humantime::format_rfc3339_seconds(*now)
    )]
    NotYetValid {
        not_before: SystemTime,
        now: SystemTime,
    },
    #[error(
        "it does not chain to --upstream-bundle {bundle}: none of the {candidates} certificate(s) there is its issuer ({issuer}) with a valid signature over it"
    )]
    NotSignedByUpstream {
        bundle: String,
        candidates: usize,
        issuer: String,
    },
    #[error("its public key does not match the private key in {key_file} {key_path}")]
    KeyMismatch { key_file: CaFile, key_path: String },
    #[error(
        "it carries URI SAN {uri:?}, but a CA certificate of trust domain {trust_domain} may name only spiffe://{trust_domain} (no path); any other ID would let the CA's own certificate pass for that identity"
    )]
    ForeignUriSan {
        uri: String,
        trust_domain: TrustDomain,
    },
}

fn bad(what: impl Into<String>, detail: impl ToString) -> AuthorityError {
    AuthorityError::BadMaterial {
        what: what.into(),
        detail: detail.to_string(),
    }
}

/// One CA key, parsed and ready to sign.
pub struct X509Authority {
    pub id: String,
    pub state: KeyState,
    pub root: CertificateDer<'static>,
    pub intermediate: CertificateDer<'static>,
    pub intermediate_not_before: SystemTime,
    pub intermediate_not_after: SystemTime,
    pub root_not_before: SystemTime,
    pub root_not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
    record: AuthorityRecord,
}

impl std::fmt::Debug for X509Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Authority")
            .field("id", &self.id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn ca_params(
    td: &TrustDomain,
    cn: &str,
    path_len: u8,
    now: SystemTime,
    ttl: Duration,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshid");
    dn.push(DnType::CommonName, format!("{cn} {}", td));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // SPIFFE X509-SVID §4.1: a signing certificate may carry the trust domain's ID as URI SAN.
    if let Ok(uri) = format!("spiffe://{td}").try_into() {
        p.subject_alt_names = vec![SanType::URI(uri)];
    }
    p.not_before = (now - BACKDATE).into();
    p.not_after = (now + ttl).into();
    p.serial_number = Some(random_serial().into());
    p.use_authority_key_identifier_extension = true;
    p
}

/// 16 random bytes, top bit clear so the DER INTEGER is positive (RFC 5280 §4.1.2.2).
pub fn random_serial() -> Vec<u8> {
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).expect("the system random source works");
    serial[0] &= 0x7f;
    serial[0] |= 0x01; // never a leading zero byte: the serial stays 16 bytes long
    serial.to_vec()
}

fn new_id(now: SystemTime) -> String {
    let mut r = [0u8; 4];
    aws_lc_rs::rand::fill(&mut r).expect("the system random source works");
    format!(
        "{}-{:08x}",
        meshid_proto::clock::unix_seconds(now),
        u32::from_be_bytes(r)
    )
}

fn not_after_of(der: &[u8], what: &str) -> Result<SystemTime, AuthorityError> {
    Ok(validity_of(der, what)?.1)
}

/// notBefore and notAfter of a certificate.
fn validity_of(der: &[u8], what: &str) -> Result<(SystemTime, SystemTime), AuthorityError> {
    let info = x509_parser::parse_x509_certificate(der)
        .map_err(|e| bad(what, e))?
        .1;
    let v = info.validity();
    Ok((
        system_time(v.not_before.timestamp()),
        system_time(v.not_after.timestamp()),
    ))
}

fn one_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, AuthorityError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| bad(what, format!("not a PEM certificate: {e}")))
}

fn key_pair(pem: &Secret, what: &str) -> Result<KeyPair, AuthorityError> {
    // rcgen's error does not contain key bytes; still, say only what kind of failure it was.
    KeyPair::from_pem(pem.expose())
        .map_err(|_| bad(what, "not a PKCS#8 PEM private key rcgen can use"))
}

fn refused(file: CaFile, path: &Path) -> impl Fn(CaFileRefusal) -> AuthorityError + '_ {
    move |reason| AuthorityError::Refused {
        file,
        path: path.display().to_string(),
        reason,
    }
}

fn parse_cert<'a>(der: &'a [u8]) -> Result<X509Certificate<'a>, CaFileRefusal> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(unparseable)
}

fn unparseable(e: impl ToString) -> CaFileRefusal {
    CaFileRefusal::Unparseable {
        detail: e.to_string(),
    }
}

fn system_time(unix: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64)
}

/// RFC 5280 §4.2.1.9 CA:true, and §4.2.1.3 keyCertSign when key usage is present: without
/// them, relying parties reject every certificate this one signs.
fn check_ca_profile(cert: &X509Certificate<'_>) -> Result<(), CaFileRefusal> {
    let constraints = cert.basic_constraints().map_err(unparseable)?;
    if !constraints.is_some_and(|bc| bc.value.ca) {
        return Err(CaFileRefusal::NotCa);
    }
    if let Some(usage) = cert.key_usage().map_err(unparseable)?
        && !usage.value.key_cert_sign()
    {
        return Err(CaFileRefusal::NoKeyCertSign);
    }
    Ok(())
}

/// Valid now; a `not_before` up to [`BACKDATE`] ahead is clock skew, not a refusal.
fn check_validity(cert: &X509Certificate<'_>, now: SystemTime) -> Result<(), CaFileRefusal> {
    let validity = cert.validity();
    let now_s = unix_seconds(now);
    if validity.not_after.timestamp() < now_s {
        return Err(CaFileRefusal::Expired {
            not_after: system_time(validity.not_after.timestamp()),
            now,
        });
    }
    if validity.not_before.timestamp() > now_s + BACKDATE.as_secs() as i64 {
        return Err(CaFileRefusal::NotYetValid {
            not_before: system_time(validity.not_before.timestamp()),
            now,
        });
    }
    Ok(())
}

fn check_key_matches(
    cert: &X509Certificate<'_>,
    key: &KeyPair,
    key_file: CaFile,
    key_path: &Path,
) -> Result<(), CaFileRefusal> {
    if cert.public_key().subject_public_key.data.as_ref() != rcgen::PublicKeyData::der_bytes(key) {
        return Err(CaFileRefusal::KeyMismatch {
            key_file,
            key_path: key_path.display().to_string(),
        });
    }
    Ok(())
}

/// Every URI SAN of `cert`.
fn uri_sans<'a>(cert: &X509Certificate<'a>) -> Result<Vec<&'a str>, x509_parser::error::X509Error> {
    Ok(cert
        .subject_alternative_name()?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// SPIFFE X509-SVID §4.1: a signing certificate may carry its trust domain's ID. Anything else
/// (a path, another trust domain, another scheme) would make the CA's own certificate name an
/// identity it is not.
fn check_uri_sans(cert: &X509Certificate<'_>, td: &TrustDomain) -> Result<(), CaFileRefusal> {
    for uri in uri_sans(cert).map_err(unparseable)? {
        let own =
            SpiffeId::parse(uri).is_ok_and(|id| id.trust_domain() == td && id.path().is_empty());
        if !own {
            return Err(CaFileRefusal::ForeignUriSan {
                uri: uri.to_owned(),
                trust_domain: td.clone(),
            });
        }
    }
    Ok(())
}

/// Whether `candidate` issued `cert`: its subject is `cert`'s issuer (what path building
/// matches on) and its key verifies `cert`'s signature.
fn issued_by(cert: &X509Certificate<'_>, candidate: &[u8]) -> bool {
    parse_cert(candidate).is_ok_and(|issuer| {
        issuer.subject().as_raw() == cert.issuer().as_raw()
            && cert.verify_signature(Some(issuer.public_key())).is_ok()
    })
}

/// The trust domain a data directory's CA names: the `spiffe://<td>` URI SAN of its active
/// intermediate (every intermediate meshid makes carries one, and a brought one may carry no
/// other). `None` on a new data directory, or when a brought intermediate carries no URI SAN.
pub fn recorded_trust_domain(
    records: &[AuthorityRecord],
) -> Result<Option<TrustDomain>, AuthorityError> {
    if records.is_empty() {
        return Ok(None);
    }
    let active = records
        .iter()
        .rev()
        .find(|r| r.state == KeyState::Active)
        .ok_or(AuthorityError::NoActive)?;
    let der = one_cert(&active.intermediate_cert_pem, "intermediate certificate")?;
    let cert = parse_cert(&der).map_err(|e| bad("intermediate certificate", e))?;
    let uris = uri_sans(&cert).map_err(|e| bad("intermediate certificate", e))?;
    Ok(uris
        .into_iter()
        .filter_map(|uri| SpiffeId::parse(uri).ok())
        .find(|id| id.path().is_empty())
        .map(|id| id.trust_domain().clone()))
}

impl X509Authority {
    /// A brand-new root and intermediate for `td`, in state `state`.
    pub fn generate(
        td: &TrustDomain,
        now: SystemTime,
        state: KeyState,
    ) -> Result<Self, AuthorityError> {
        Self::generate_with(td, now, state, Lifetimes::default())
    }

    /// A brand-new root and intermediate living `lifetimes`.
    pub fn generate_with(
        td: &TrustDomain,
        now: SystemTime,
        state: KeyState,
        lifetimes: Lifetimes,
    ) -> Result<Self, AuthorityError> {
        let root_key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(AuthorityError::Generate)?;
        let root_params = ca_params(td, "meshid root", 1, now, lifetimes.root);
        let root_cert = root_params
            .self_signed(&root_key)
            .map_err(AuthorityError::Generate)?;
        let root_key_pem = Secret::new(root_key.serialize_pem());
        let root_issuer = Issuer::new(root_params, root_key);
        Self::with_new_intermediate(
            td,
            now,
            state,
            root_cert.pem(),
            Some(root_key_pem),
            &root_issuer,
            lifetimes.intermediate,
        )
    }

    /// A new intermediate under the root of `under` (whose root key the store must hold).
    pub fn new_intermediate(
        td: &TrustDomain,
        now: SystemTime,
        state: KeyState,
        under: &AuthorityRecord,
        ttl: Duration,
    ) -> Result<Self, AuthorityError> {
        let root_key_pem = under.root_key_pem.clone().ok_or_else(|| {
            bad(
                "intermediate rotation",
                "the data directory holds no root key (the CA was started with a brought intermediate); bring a new intermediate from your upstream CA instead",
            )
        })?;
        let root_der = one_cert(&under.root_cert_pem, "root certificate")?;
        let root_key = key_pair(&root_key_pem, "root key")?;
        let issuer = Issuer::from_ca_cert_der(&root_der, root_key)
            .map_err(|e| bad("root certificate", e))?;
        Self::with_new_intermediate(
            td,
            now,
            state,
            under.root_cert_pem.clone(),
            Some(root_key_pem),
            &issuer,
            ttl,
        )
    }

    /// An operator's root (certificate and key files): meshid generates the intermediate.
    /// Refused unless the root is a CA (CA:true, keyCertSign if key usage is present, room for
    /// one intermediate below it), valid now, and the key is its key.
    pub fn from_root_files(
        td: &TrustDomain,
        now: SystemTime,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, AuthorityError> {
        let root_pem = read(cert)?;
        let root_key_pem = Secret::new(read(key)?);
        let root_der = one_cert(&root_pem, "root certificate")?;
        let root_key = key_pair(&root_key_pem, "root key")?;
        let refuse = refused(CaFile::RootCert, cert);
        let root = parse_cert(&root_der).map_err(&refuse)?;
        check_ca_profile(&root).map_err(&refuse)?;
        if let Ok(Some(bc)) = root.basic_constraints()
            && bc.value.path_len_constraint == Some(0)
        {
            return Err(refuse(CaFileRefusal::NoRoomForIntermediate));
        }
        check_validity(&root, now).map_err(&refuse)?;
        check_key_matches(&root, &root_key, CaFile::RootKey, key).map_err(&refuse)?;
        let issuer = Issuer::from_ca_cert_der(&root_der, root_key)
            .map_err(|e| bad("root certificate", e))?;
        Self::with_new_intermediate(
            td,
            now,
            KeyState::Active,
            root_pem,
            Some(root_key_pem),
            &issuer,
            Lifetimes::default().intermediate,
        )
    }

    /// An operator's intermediate (certificate and key) and the upstream bundle holding the root
    /// it chains to. Refused unless the intermediate is a CA (CA:true, keyCertSign if key usage
    /// is present), valid now, signed by a certificate of the bundle (which must be valid now
    /// too), the key is its key, and every URI SAN it carries is `spiffe://<td>`. The root
    /// that signed it, alone, becomes this key's root in the trust bundle.
    pub fn from_intermediate_files(
        td: &TrustDomain,
        now: SystemTime,
        root_cert: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, AuthorityError> {
        let bundle_pem = read(root_cert)?;
        let intermediate_pem = read(cert)?;
        let intermediate_key_pem = Secret::new(read(key)?);
        let der = one_cert(&intermediate_pem, "intermediate certificate")?;
        let intermediate_key = key_pair(&intermediate_key_pem, "intermediate key")?;

        let refuse = refused(CaFile::IntermediateCert, cert);
        let intermediate = parse_cert(&der).map_err(&refuse)?;
        check_ca_profile(&intermediate).map_err(&refuse)?;
        check_validity(&intermediate, now).map_err(&refuse)?;
        check_key_matches(
            &intermediate,
            &intermediate_key,
            CaFile::IntermediateKey,
            key,
        )
        .map_err(&refuse)?;
        check_uri_sans(&intermediate, td).map_err(&refuse)?;

        let refuse_bundle = refused(CaFile::UpstreamBundle, root_cert);
        let roots = meshid_proto::pem::decode_certs(bundle_pem.as_bytes())
            .map_err(|e| refuse_bundle(unparseable(e)))?;
        let root = roots
            .iter()
            .find(|root| issued_by(&intermediate, root.as_ref()))
            .ok_or_else(|| {
                refuse(CaFileRefusal::NotSignedByUpstream {
                    bundle: root_cert.display().to_string(),
                    candidates: roots.len(),
                    issuer: intermediate.issuer().to_string(),
                })
            })?;
        check_validity(&parse_cert(root).map_err(&refuse_bundle)?, now).map_err(&refuse_bundle)?;

        Self::from_record(AuthorityRecord {
            id: new_id(now),
            state: KeyState::Active,
            created_at: now,
            root_cert_pem: meshid_proto::pem::encode("CERTIFICATE", root),
            root_key_pem: None,
            intermediate_cert_pem: intermediate_pem,
            intermediate_key_pem,
            superseded_at: None,
            tainted: false,
        })
    }

    fn with_new_intermediate(
        td: &TrustDomain,
        now: SystemTime,
        state: KeyState,
        root_cert_pem: String,
        root_key_pem: Option<Secret>,
        root_issuer: &Issuer<'_, KeyPair>,
        ttl: Duration,
    ) -> Result<Self, AuthorityError> {
        let root_der = one_cert(&root_cert_pem, "root certificate")?;
        let root_not_after = not_after_of(&root_der, "root certificate")?;
        let ttl = ttl.min(root_not_after.duration_since(now).unwrap_or_default());
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(AuthorityError::Generate)?;
        let cert = ca_params(td, "meshid intermediate", 0, now, ttl)
            .signed_by(&key, root_issuer)
            .map_err(AuthorityError::Generate)?;
        Self::from_record(AuthorityRecord {
            id: new_id(now),
            state,
            created_at: now,
            root_cert_pem,
            root_key_pem,
            intermediate_cert_pem: cert.pem(),
            intermediate_key_pem: Secret::new(key.serialize_pem()),
            superseded_at: None,
            tainted: false,
        })
    }

    /// Parse a stored record. Checks that the intermediate's key matches its certificate.
    pub fn from_record(record: AuthorityRecord) -> Result<Self, AuthorityError> {
        let root = one_cert(&record.root_cert_pem, "root certificate")?;
        let intermediate = one_cert(&record.intermediate_cert_pem, "intermediate certificate")?;
        let key = key_pair(&record.intermediate_key_pem, "intermediate key")?;
        let parsed = x509_parser::parse_x509_certificate(&intermediate)
            .map_err(|e| bad("intermediate certificate", e))?
            .1;
        if parsed.public_key().subject_public_key.data.as_ref()
            != rcgen::PublicKeyData::der_bytes(&key)
        {
            return Err(bad(
                "intermediate key",
                "does not match the intermediate certificate",
            ));
        }
        let (intermediate_not_before, intermediate_not_after) =
            validity_of(&intermediate, "intermediate certificate")?;
        let (root_not_before, root_not_after) = validity_of(&root, "root certificate")?;
        let issuer = Issuer::from_ca_cert_der(&intermediate, key)
            .map_err(|e| bad("intermediate certificate", e))?;
        Ok(Self {
            id: record.id.clone(),
            state: record.state,
            root,
            intermediate,
            intermediate_not_before,
            intermediate_not_after,
            root_not_before,
            root_not_after,
            issuer,
            record,
        })
    }

    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    pub fn record(&self) -> &AuthorityRecord {
        &self.record
    }
}

fn read(path: &Path) -> Result<String, AuthorityError> {
    std::fs::read_to_string(path).map_err(|source| AuthorityError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Every CA key the data directory holds.
#[derive(Debug)]
pub struct Authorities {
    pub trust_domain: TrustDomain,
    keys: Vec<X509Authority>,
}

impl Authorities {
    pub fn new(
        trust_domain: TrustDomain,
        records: Vec<AuthorityRecord>,
    ) -> Result<Self, AuthorityError> {
        let keys = records
            .into_iter()
            .map(X509Authority::from_record)
            .collect::<Result<Vec<_>, _>>()?;
        let this = Self { trust_domain, keys };
        this.active()?;
        Ok(this)
    }

    /// The key that signs new SVIDs.
    pub fn active(&self) -> Result<&X509Authority, AuthorityError> {
        self.keys
            .iter()
            .rev()
            .find(|k| k.state == KeyState::Active)
            .ok_or(AuthorityError::NoActive)
    }

    /// Every key, oldest first.
    pub fn keys(&self) -> &[X509Authority] {
        &self.keys
    }

    /// The records of every key, as the store holds them.
    pub fn records(&self) -> Vec<AuthorityRecord> {
        self.keys.iter().map(|k| k.record.clone()).collect()
    }

    /// The roots of every key not retired, oldest first.
    pub fn bundle(&self, sequence: u64) -> TrustBundle {
        TrustBundle {
            trust_domain: self.trust_domain.clone(),
            roots: {
                let mut roots: Vec<CertificateDer<'static>> = Vec::new();
                for k in self.keys.iter().filter(|k| k.state.trusted()) {
                    // An intermediate rotation keeps the root: one root, however many keys.
                    if !roots.contains(&k.root) {
                        roots.push(k.root.clone());
                    }
                }
                roots
            },
            sequence,
            rotation: Default::default(),
        }
    }
}

impl Authorities {
    /// The CA keys in `store`, and the version read; on a new store, the first key from
    /// `source`, saved. Of several replicas starting at once on an empty store, one saves its
    /// key and the others find it there and use it: the CA has one root.
    pub fn load_or_init(
        store: &dyn crate::store::Store,
        trust_domain: &TrustDomain,
        source: &crate::config::CaSource,
        lifetimes: Lifetimes,
        now: SystemTime,
    ) -> Result<(Self, crate::store::Version), InitError> {
        use crate::config::CaSource;
        let mut loaded = store.load_authorities()?;
        if loaded.value.is_empty()
            && let Some(r) = store
                .load_replicas()?
                .into_iter()
                .find(|r| !r.authorities.is_empty())
        {
            return Err(InitError::KeysGone {
                store: store.describe(),
                replica: r.replica,
            });
        }
        if loaded.value.is_empty() {
            let first = match source {
                CaSource::Generate => {
                    X509Authority::generate_with(trust_domain, now, KeyState::Active, lifetimes)?
                }
                CaSource::Root { cert, key } => {
                    X509Authority::from_root_files(trust_domain, now, cert, key)?
                }
                CaSource::Intermediate {
                    root_cert,
                    cert,
                    key,
                } => {
                    X509Authority::from_intermediate_files(trust_domain, now, root_cert, cert, key)?
                }
            };
            match store.save_authorities(std::slice::from_ref(first.record()), &loaded.version) {
                Ok(_) => {}
                Err(e) if e.is_conflict() => {
                    tracing::info!("another CA replica created the CA first; using its keys");
                }
                Err(e) => return Err(e.into()),
            }
            loaded = store.load_authorities()?;
        }
        let crate::store::Versioned {
            value: records,
            version,
        } = loaded;
        // A data directory belongs to one trust domain: serving it as another would sign IDs
        // of one domain under an intermediate that names the other.
        if let Some(recorded) = recorded_trust_domain(&records)?
            && recorded != *trust_domain
        {
            return Err(InitError::TrustDomain {
                recorded,
                asked: trust_domain.clone(),
            });
        }
        Ok((Self::new(trust_domain.clone(), records)?, version))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(
        "this data directory holds the CA of trust domain {recorded}, not {asked}: give --trust-domain {recorded}, or use a new data directory"
    )]
    TrustDomain {
        recorded: TrustDomain,
        asked: TrustDomain,
    },
    #[error(
        "the {store} holds no CA keys, but CA replica {replica} has served from it: the keys were deleted. Restore them (the Secret meshid-ca-authorities from a backup) rather than start a new CA, which would break every SVID in use; to start a new CA on purpose, delete the replicas' records first"
    )]
    KeysGone { store: String, replica: String },
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rcgen::{Certificate, ExtendedKeyUsagePurpose};

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn td() -> TrustDomain {
        TrustDomain::parse("cluster.local").unwrap()
    }

    fn new_key() -> KeyPair {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
    }

    /// What an operator's CA tooling would make: CA:true, keyCertSign, valid for a year.
    fn ca(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Example Corp");
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        p.not_before = (now - DAY).into();
        p.not_after = (now + 365 * DAY).into();
        p
    }

    fn with_uri(mut p: CertificateParams, uri: &str) -> CertificateParams {
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p
    }

    /// A self-signed root: its issuer (to sign with), its certificate and its key PEM.
    fn root(p: CertificateParams) -> (Issuer<'static, KeyPair>, Certificate, String) {
        let key = new_key();
        let cert = p.self_signed(&key).unwrap();
        let key_pem = key.serialize_pem();
        (Issuer::new(p, key), cert, key_pem)
    }

    /// An intermediate signed by `by`: its certificate PEM and key PEM.
    fn intermediate(p: CertificateParams, by: &Issuer<'_, KeyPair>) -> (String, String) {
        let key = new_key();
        let cert = p.signed_by(&key, by).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    struct Files(tempfile::TempDir);

    impl Files {
        fn new() -> Self {
            Self(tempfile::tempdir().unwrap())
        }

        fn file(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.0.path().join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }

        fn bring_intermediate(
            &self,
            bundle: &str,
            cert: &str,
            key: &str,
        ) -> Result<X509Authority, AuthorityError> {
            X509Authority::from_intermediate_files(
                &td(),
                SystemTime::now(),
                &self.file("upstream.pem", bundle),
                &self.file("int.pem", cert),
                &self.file("int.key", key),
            )
        }

        fn bring_root(&self, cert: &str, key: &str) -> Result<X509Authority, AuthorityError> {
            X509Authority::from_root_files(
                &td(),
                SystemTime::now(),
                &self.file("root.pem", cert),
                &self.file("root.key", key),
            )
        }
    }

    /// The refusal, checking that its message names the flag and the file.
    fn refusal(result: Result<X509Authority, AuthorityError>) -> (CaFile, CaFileRefusal) {
        match result {
            Err(e @ AuthorityError::Refused { .. }) => {
                let text = e.to_string();
                let AuthorityError::Refused { file, path, reason } = e else {
                    unreachable!()
                };
                assert!(text.contains(file.flag()) && text.contains(&path), "{text}");
                (file, reason)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_sound_brought_intermediate_is_accepted_and_its_own_root_recorded() {
        let files = Files::new();
        let (_, unrelated, _) = root(ca("Unrelated Root"));
        let (issuer, signing_root, _) = root(ca("Example Root"));
        let (cert, key) = intermediate(
            with_uri(ca("Example Intermediate"), "spiffe://cluster.local"),
            &issuer,
        );
        // The signing root is second in the bundle: it, not the first, must be recorded.
        let bundle = format!("{}{}", unrelated.pem(), signing_root.pem());
        let authority = files.bring_intermediate(&bundle, &cert, &key).unwrap();
        assert_eq!(authority.root.as_ref(), signing_root.der().as_ref());
        assert_eq!(
            meshid_proto::pem::decode_certs(authority.record().root_cert_pem.as_bytes()).unwrap(),
            vec![signing_root.der().clone()]
        );
        assert_eq!(
            recorded_trust_domain(std::slice::from_ref(authority.record())).unwrap(),
            Some(td())
        );
    }

    #[test]
    fn a_brought_intermediate_without_uri_san_is_accepted() {
        let files = Files::new();
        let (issuer, root_cert, _) = root(ca("Example Root"));
        let (cert, key) = intermediate(ca("Example Intermediate"), &issuer);
        let authority = files
            .bring_intermediate(&root_cert.pem(), &cert, &key)
            .unwrap();
        // Nothing in it names the trust domain: the CLI must learn it elsewhere.
        assert_eq!(
            recorded_trust_domain(std::slice::from_ref(authority.record())).unwrap(),
            None
        );
    }

    #[test]
    fn non_ca_intermediate_is_refused() {
        for is_ca in [IsCa::NoCa, IsCa::ExplicitNoCa] {
            let files = Files::new();
            let (issuer, root_cert, _) = root(ca("Example Root"));
            let mut p = ca("Example Leaf");
            p.is_ca = is_ca;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let (cert, key) = intermediate(p, &issuer);
            let result = files.bring_intermediate(&root_cert.pem(), &cert, &key);
            let text = result.as_ref().unwrap_err().to_string();
            assert!(text.contains("CA:true"), "{text}");
            assert_eq!(
                refusal(result),
                (CaFile::IntermediateCert, CaFileRefusal::NotCa)
            );
        }
    }

    #[test]
    fn intermediate_without_key_cert_sign_is_refused() {
        let files = Files::new();
        let (issuer, root_cert, _) = root(ca("Example Root"));
        let mut p = ca("Example Intermediate");
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
        let (cert, key) = intermediate(p, &issuer);
        assert_eq!(
            refusal(files.bring_intermediate(&root_cert.pem(), &cert, &key)),
            (CaFile::IntermediateCert, CaFileRefusal::NoKeyCertSign)
        );
    }

    #[test]
    fn intermediate_not_signed_by_the_upstream_bundle_is_refused() {
        let files = Files::new();
        let (issuer, _, _) = root(ca("Example Root"));
        let (cert, key) = intermediate(ca("Example Intermediate"), &issuer);
        // Another root, and an impostor with the very same name but another key: a matching
        // name is not enough, the signature must verify.
        let (_, other, _) = root(ca("Other Root"));
        let (_, impostor, _) = root(ca("Example Root"));
        let bundle = format!("{}{}", other.pem(), impostor.pem());
        let (file, reason) = refusal(files.bring_intermediate(&bundle, &cert, &key));
        assert_eq!(file, CaFile::IntermediateCert);
        match reason {
            CaFileRefusal::NotSignedByUpstream {
                candidates, issuer, ..
            } => {
                assert_eq!(candidates, 2);
                assert!(issuer.contains("Example Root"), "{issuer}");
            }
            other => panic!("expected NotSignedByUpstream, got {other:?}"),
        }
    }

    #[test]
    fn expired_intermediate_is_refused() {
        let files = Files::new();
        let (issuer, root_cert, _) = root(ca("Example Root"));
        let mut p = ca("Example Intermediate");
        let now = SystemTime::now();
        p.not_before = (now - 30 * DAY).into();
        p.not_after = (now - DAY).into();
        let (cert, key) = intermediate(p, &issuer);
        let (file, reason) = refusal(files.bring_intermediate(&root_cert.pem(), &cert, &key));
        assert_eq!(file, CaFile::IntermediateCert);
        assert!(
            matches!(reason, CaFileRefusal::Expired { not_after, .. } if not_after < now),
            "{reason:?}"
        );
    }

    #[test]
    fn expired_upstream_root_is_refused() {
        let files = Files::new();
        let mut p = ca("Example Root");
        let now = SystemTime::now();
        p.not_before = (now - 30 * DAY).into();
        p.not_after = (now - DAY).into();
        let (issuer, root_cert, _) = root(p);
        let (cert, key) = intermediate(ca("Example Intermediate"), &issuer);
        let (file, reason) = refusal(files.bring_intermediate(&root_cert.pem(), &cert, &key));
        assert_eq!(file, CaFile::UpstreamBundle);
        assert!(
            matches!(reason, CaFileRefusal::Expired { .. }),
            "{reason:?}"
        );
    }

    #[test]
    fn intermediate_with_another_key_is_refused() {
        let files = Files::new();
        let (issuer, root_cert, _) = root(ca("Example Root"));
        let (cert, _) = intermediate(ca("Example Intermediate"), &issuer);
        let (file, reason) =
            refusal(files.bring_intermediate(&root_cert.pem(), &cert, &new_key().serialize_pem()));
        assert_eq!(file, CaFile::IntermediateCert);
        assert!(
            matches!(
                reason,
                CaFileRefusal::KeyMismatch {
                    key_file: CaFile::IntermediateKey,
                    ..
                }
            ),
            "{reason:?}"
        );
    }

    #[test]
    fn intermediate_naming_another_identity_is_refused() {
        for uri in [
            "spiffe://other.domain",
            "spiffe://other.domain/ns/x/sa/y",
            "spiffe://cluster.local/ns/shop/sa/orders",
            "spiffe://cluster.local/meshid/ca",
            "https://ca.example.com",
        ] {
            let files = Files::new();
            let (issuer, root_cert, _) = root(ca("Example Root"));
            let (cert, key) = intermediate(with_uri(ca("Example Intermediate"), uri), &issuer);
            assert_eq!(
                refusal(files.bring_intermediate(&root_cert.pem(), &cert, &key)),
                (
                    CaFile::IntermediateCert,
                    CaFileRefusal::ForeignUriSan {
                        uri: uri.to_owned(),
                        trust_domain: td()
                    }
                ),
                "{uri}"
            );
        }
    }

    #[test]
    fn a_sound_brought_root_is_accepted_and_the_trust_domain_recorded() {
        let files = Files::new();
        let (_, root_cert, key) = root(ca("Example Root"));
        let authority = files.bring_root(&root_cert.pem(), &key).unwrap();
        assert_eq!(authority.root.as_ref(), root_cert.der().as_ref());
        assert_eq!(
            recorded_trust_domain(std::slice::from_ref(authority.record())).unwrap(),
            Some(td())
        );
    }

    #[test]
    fn non_ca_root_is_refused() {
        let files = Files::new();
        let mut p = ca("Example Root");
        p.is_ca = IsCa::ExplicitNoCa;
        let (_, root_cert, key) = root(p);
        assert_eq!(
            refusal(files.bring_root(&root_cert.pem(), &key)),
            (CaFile::RootCert, CaFileRefusal::NotCa)
        );
    }

    #[test]
    fn root_with_another_key_is_refused() {
        let files = Files::new();
        let (_, root_cert, _) = root(ca("Example Root"));
        let (file, reason) =
            refusal(files.bring_root(&root_cert.pem(), &new_key().serialize_pem()));
        assert_eq!(file, CaFile::RootCert);
        assert!(
            matches!(
                reason,
                CaFileRefusal::KeyMismatch {
                    key_file: CaFile::RootKey,
                    ..
                }
            ),
            "{reason:?}"
        );
    }

    #[test]
    fn root_with_no_room_for_an_intermediate_is_refused() {
        let files = Files::new();
        let mut p = ca("Example Root");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let (_, root_cert, key) = root(p);
        assert_eq!(
            refusal(files.bring_root(&root_cert.pem(), &key)),
            (CaFile::RootCert, CaFileRefusal::NoRoomForIntermediate)
        );
    }

    #[test]
    fn generated_ca_records_its_trust_domain() {
        let authority =
            X509Authority::generate(&td(), SystemTime::now(), KeyState::Active).unwrap();
        assert_eq!(
            recorded_trust_domain(std::slice::from_ref(authority.record())).unwrap(),
            Some(td())
        );
        assert_eq!(recorded_trust_domain(&[]).unwrap(), None);
    }
}
