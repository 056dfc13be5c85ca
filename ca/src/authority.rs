//! The CA's signing keys: each an X.509 root and the intermediate that signs leaves, in one of
//! the states prepared -> active -> retired. Exactly one is active; the trust bundle is the roots
//! of every key that is not retired.
//!
//! On a new data directory a root and intermediate are generated (ECDSA P-256); an operator can
//! instead bring a root (cert + key: meshid makes the intermediate) or an intermediate (cert +
//! key, with the root cert it chains to). Private keys never leave the store and never reach a
//! log: they are held as `Secret`s until parsed into signing keys here.

use std::path::Path;
use std::time::{Duration, SystemTime};

use meshid_proto::{Secret, TrustBundle, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::store::{AuthorityRecord, KeyState};

const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
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
    pub intermediate_not_after: SystemTime,
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
    let info = x509_parser::parse_x509_certificate(der)
        .map_err(|e| bad(what, e))?
        .1;
    let secs = info.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
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

impl X509Authority {
    /// A brand-new root and intermediate for `td`, in state `state`.
    pub fn generate(
        td: &TrustDomain,
        now: SystemTime,
        state: KeyState,
    ) -> Result<Self, AuthorityError> {
        let root_key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(AuthorityError::Generate)?;
        let root_params = ca_params(td, "meshid root", 1, now, ROOT_TTL);
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
        )
    }

    /// An operator's root (certificate and key files): meshid generates the intermediate.
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
        let issuer = Issuer::from_ca_cert_der(&root_der, root_key)
            .map_err(|e| bad("root certificate", e))?;
        Self::with_new_intermediate(
            td,
            now,
            KeyState::Active,
            root_pem,
            Some(root_key_pem),
            &issuer,
        )
    }

    /// An operator's intermediate (certificate and key) and the root it chains to.
    pub fn from_intermediate_files(
        now: SystemTime,
        root_cert: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, AuthorityError> {
        let record = AuthorityRecord {
            id: new_id(now),
            state: KeyState::Active,
            created_at: now,
            root_cert_pem: read(root_cert)?,
            root_key_pem: None,
            intermediate_cert_pem: read(cert)?,
            intermediate_key_pem: Secret::new(read(key)?),
        };
        Self::from_record(record)
    }

    fn with_new_intermediate(
        td: &TrustDomain,
        now: SystemTime,
        state: KeyState,
        root_cert_pem: String,
        root_key_pem: Option<Secret>,
        root_issuer: &Issuer<'_, KeyPair>,
    ) -> Result<Self, AuthorityError> {
        let root_der = one_cert(&root_cert_pem, "root certificate")?;
        let root_not_after = not_after_of(&root_der, "root certificate")?;
        let ttl = INTERMEDIATE_TTL.min(root_not_after.duration_since(now).unwrap_or_default());
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
        let intermediate_not_after = not_after_of(&intermediate, "intermediate certificate")?;
        let issuer = Issuer::from_ca_cert_der(&intermediate, key)
            .map_err(|e| bad("intermediate certificate", e))?;
        Ok(Self {
            id: record.id.clone(),
            state: record.state,
            root,
            intermediate,
            intermediate_not_after,
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

    /// The roots of every key not retired, oldest first.
    pub fn bundle(&self, sequence: u64) -> TrustBundle {
        TrustBundle {
            trust_domain: self.trust_domain.clone(),
            roots: self
                .keys
                .iter()
                .filter(|k| k.state != KeyState::Retired)
                .map(|k| k.root.clone())
                .collect(),
            sequence,
        }
    }
}

impl Authorities {
    /// The CA keys in `store`; on a new store, the first key from `source`, saved.
    pub fn load_or_init(
        store: &dyn crate::store::Store,
        trust_domain: &TrustDomain,
        source: &crate::config::CaSource,
        now: SystemTime,
    ) -> Result<Self, InitError> {
        use crate::config::CaSource;
        let mut records = store.load_authorities()?;
        if records.is_empty() {
            let first = match source {
                CaSource::Generate => X509Authority::generate(trust_domain, now, KeyState::Active)?,
                CaSource::Root { cert, key } => {
                    X509Authority::from_root_files(trust_domain, now, cert, key)?
                }
                CaSource::Intermediate {
                    root_cert,
                    cert,
                    key,
                } => X509Authority::from_intermediate_files(now, root_cert, cert, key)?,
            };
            store.save_authorities(std::slice::from_ref(first.record()))?;
            records = store.load_authorities()?;
        }
        Ok(Self::new(trust_domain.clone(), records)?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}
