//! Reading identity out of an X509-SVID: the one URI SAN (SPIFFE X509-SVID spec §2) and the
//! validity window. Chain validation is not done here; see [`crate::verify`].

use std::time::{Duration, SystemTime};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::id::{SpiffeId, SpiffeIdError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate does not parse as X.509 DER")]
    Malformed,
    #[error("certificate has no URI SAN, so it carries no SPIFFE ID")]
    NoUriSan,
    #[error("certificate has {0} URI SANs; an X509-SVID has exactly one")]
    SeveralUriSans(usize),
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(#[from] SpiffeIdError),
}

/// What a workload certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    pub spiffe_id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Serial number, lowercase hex.
    pub serial: String,
}

/// The SPIFFE ID and validity of a certificate in DER.
pub fn inspect(der: &[u8]) -> Result<SvidInfo, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| SvidError::Malformed)?;
    let spiffe_id = spiffe_id_of_parsed(&cert)?;
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok(SvidInfo {
        spiffe_id,
        not_before: to_system(cert.validity().not_before),
        not_after: to_system(cert.validity().not_after),
        serial: cert.tbs_certificate.raw_serial_as_string().replace(':', ""),
    })
}

/// The SPIFFE ID of a certificate in DER: its single URI SAN.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| SvidError::Malformed)?;
    spiffe_id_of_parsed(&cert)
}

fn spiffe_id_of_parsed(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| SvidError::Malformed)?
        .ok_or(SvidError::NoUriSan)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan),
        [one] => Ok(SpiffeId::parse(one)?),
        many => Err(SvidError::SeveralUriSans(many.len())),
    }
}
