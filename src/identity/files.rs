//! The cert directory: `svid.pem` (leaf then intermediates), `svid_key.pem` (mode 0600) and
//! `bundle.pem`, each replaced atomically, so a reader (an app, the sidecar's own reloader) never
//! sees half a file. The key is written before the certificate, so a reader that sees a new
//! certificate finds its key already in place.

use std::path::{Path, PathBuf};

use meshid_proto::atomic_file::write_atomic;
use meshid_proto::{Secret, TrustBundle, TrustDomain, pem};

use super::Svid;

pub const SVID_FILE: &str = "svid.pem";
pub const KEY_FILE: &str = "svid_key.pem";
pub const BUNDLE_FILE: &str = "bundle.pem";

#[derive(Debug, thiserror::Error)]
#[error("writing {path}: {source}")]
pub struct WriteError {
    path: PathBuf,
    source: std::io::Error,
}

/// Write `svid` into `dir` (created if missing, mode 0700).
pub fn write(dir: &Path, svid: &Svid) -> Result<(), WriteError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err(dir))?;
    let key = dir.join(KEY_FILE);
    write_atomic(&key, svid.key_pem.expose().as_bytes(), 0o600).map_err(err(&key))?;
    let cert = dir.join(SVID_FILE);
    write_atomic(&cert, pem::encode_certs(&svid.chain).as_bytes(), 0o644).map_err(err(&cert))?;
    let bundle = dir.join(BUNDLE_FILE);
    write_atomic(&bundle, svid.bundle.to_pem().as_bytes(), 0o644).map_err(err(&bundle))
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Bad { path: PathBuf, detail: String },
}

/// Read the SVID in `dir` back. Checks that the key matches the certificate.
pub fn read(dir: &Path, trust_domain: TrustDomain) -> Result<Svid, ReadError> {
    let load = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| ReadError::Io { path, source })
    };
    let (chain, key, bundle) = (load(SVID_FILE)?, load(KEY_FILE)?, load(BUNDLE_FILE)?);
    parse(&chain, &key, &bundle, trust_domain).map_err(|(name, detail)| ReadError::Bad {
        path: dir.join(name),
        detail,
    })
}

/// The SVID in the three files' contents, or which file is bad and why. The key must match
/// the certificate. What [`read`] and the reload path decide on (and what `fuzz/` feeds).
pub fn parse(
    chain_pem: &[u8],
    key_pem: &[u8],
    bundle_pem: &[u8],
    trust_domain: TrustDomain,
) -> Result<Svid, (&'static str, String)> {
    let chain = pem::decode_certs(chain_pem).map_err(|e| (SVID_FILE, e.to_string()))?;
    let key_pem = String::from_utf8(key_pem.to_vec()).map_err(|_| (KEY_FILE, "not text".into()))?;
    let bundle = TrustBundle::from_pem(trust_domain, bundle_pem)
        .map_err(|e| (BUNDLE_FILE, e.to_string()))?;
    let info = meshid_proto::svid::inspect(&chain[0]).map_err(|e| (SVID_FILE, e.to_string()))?;
    {
        use rustls_pki_types::pem::PemObject;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| (KEY_FILE, "not a PEM private key".to_owned()))?;
        meshid_proto::tls::certified_key(chain.clone(), key)
            .map_err(|e| (KEY_FILE, e.to_string()))?;
    }
    Ok(Svid {
        spiffe_id: info.spiffe_id,
        chain,
        key_pem: Secret::new(key_pem),
        not_after: info.not_after,
        bundle,
    })
}
