//! The embedded store: one data directory.
//!
//! ```text
//! DIR/authorities/state.json          ids and states of every CA key (the commit point)
//! DIR/authorities/<id>/root.pem       root certificate
//! DIR/authorities/<id>/root_key.pem   root key, 0600 (absent for a brought intermediate)
//! DIR/authorities/<id>/intermediate.pem, intermediate_key.pem (0600)
//! DIR/token-keys/state.json          kid, algorithm and state of every token-signing key
//! DIR/token-keys/<kid>.pem            the key, PKCS#8, 0600
//! DIR/join-tokens/<sha256>.json       an unspent join token's record (never the token)
//! DIR/join-tokens/<sha256>.used       the same record once a single-use token is spent
//! DIR/revocations.json                the revocations in force
//! DIR/issued.json                     serials of the SVIDs that may still be in use
//! ```
//!
//! Files are written to a temporary name, synced and renamed, so a reader in another process
//! (`meshid ca bundle` next to a running `meshid ca serve`) sees either the old or the new file.
//! Spending a single-use token is a `rename`, which exactly one process can win.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use meshid_proto::Secret;
use meshid_proto::atomic_file::write_atomic;
use serde::{Deserialize, Serialize};

use super::{
    AuthorityRecord, IssuedRecord, JoinTokenRecord, KeyState, ReplicaRecord, RevocationRecord,
    Store, StoreError, StoredJoinToken, TokenKeyRecord, Version, Versioned,
};

#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
    /// `DIR/rotation.lock`, once this process holds it.
    leader: std::sync::Arc<std::sync::Mutex<Option<fs::File>>>,
}

/// The version of a file's contents (absent: the empty version).
fn version_of(bytes: Option<&[u8]>) -> Version {
    match bytes {
        None => Version::absent(),
        Some(b) => Version(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b)
                .as_ref()
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect(),
        ),
    }
}

/// A file's bytes, or `None` when it does not exist.
fn read_opt(path: &Path, what: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(what, path)(e)),
    }
}

/// A replica's name names a file and an object: a lowercase DNS subdomain (RFC 1123, as a
/// pod's name is), short enough to name a ConfigMap with its prefix; nothing that walks.
pub fn valid_replica_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[derive(Default, Serialize, Deserialize)]
struct StateFile {
    authorities: Vec<StateEntry>,
}

#[derive(Default, Serialize, Deserialize)]
struct TokenKeyState {
    keys: Vec<TokenKeyEntry>,
}

#[derive(Serialize, Deserialize)]
struct TokenKeyEntry {
    kid: String,
    alg: String,
    state: KeyState,
    created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    superseded_at: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct StateEntry {
    id: String,
    state: KeyState,
    created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    superseded_at: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    tainted: bool,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.display().to_string();
    move |source| StoreError::Io { what, path, source }
}

impl FsStore {
    /// Opens (and creates, mode 0700) a data directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        for dir in [
            root.clone(),
            root.join("authorities"),
            root.join("join-tokens"),
            root.join("token-keys"),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io("data directory", &dir))?;
        }
        Ok(Self {
            root,
            leader: Default::default(),
        })
    }

    /// Run `save` under the directory's lock if `path` is still at `expected`; the new version.
    fn save_if(
        &self,
        path: &Path,
        what: &'static str,
        expected: &Version,
        save: impl FnOnce() -> Result<Vec<u8>, StoreError>,
    ) -> Result<Version, StoreError> {
        let lock_path = self.root.join(".lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("data directory lock", &lock_path))?;
        // Released when `lock` is dropped, after the save.
        lock.lock().map_err(io("data directory lock", &lock_path))?;
        let current = version_of(read_opt(path, what)?.as_deref());
        if current != *expected {
            return Err(StoreError::Conflict { what });
        }
        let written = save()?;
        Ok(version_of(Some(&written)))
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    fn state_path(&self) -> PathBuf {
        self.root.join("authorities").join("state.json")
    }

    fn token_path(&self, hash: &str, ext: &str) -> Result<PathBuf, StoreError> {
        // The hash names a file: refuse anything but lowercase hex, so it cannot walk the tree.
        if !super::valid_token_hash(hash) {
            return Err(StoreError::Corrupt {
                what: "join token hash",
                path: self.root.display().to_string(),
                detail: "not 64 lowercase hex digits".into(),
            });
        }
        Ok(self.root.join("join-tokens").join(format!("{hash}.{ext}")))
    }

    fn read_token(&self, path: &Path) -> Result<Option<JoinTokenRecord>, StoreError> {
        match fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        what: "join token record",
                        path: path.display().to_string(),
                        detail: e.to_string(),
                    })
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("join token record", path)(e)),
        }
    }
}

/// A kid names a file: only the base64url alphabet, so it cannot walk the tree.
fn kid_path(dir: &Path, kid: &str) -> Result<PathBuf, StoreError> {
    if kid.is_empty()
        || kid.len() > 128
        || !kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(StoreError::Corrupt {
            what: "token key id",
            path: dir.display().to_string(),
            detail: format!("{kid:?} is not base64url"),
        });
    }
    Ok(dir.join(format!("{kid}.pem")))
}

fn to_unix(t: SystemTime) -> i64 {
    meshid_proto::clock::unix_seconds(t)
}

fn from_unix(s: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(s.max(0) as u64)
}

impl FsStore {
    /// A JSON document of the data directory and its version; empty when it does not exist.
    fn read_doc<T: serde::de::DeserializeOwned + Default>(
        &self,
        path: &Path,
        what: &'static str,
    ) -> Result<Versioned<T>, StoreError> {
        let bytes = read_opt(path, what)?;
        let version = version_of(bytes.as_deref());
        let value = match bytes {
            None => T::default(),
            Some(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                what,
                path: path.display().to_string(),
                detail: e.to_string(),
            })?,
        };
        Ok(Versioned { value, version })
    }

    fn replicas_dir(&self) -> PathBuf {
        self.root.join("replicas")
    }

    /// The key files of every authority (only what is new), then the state file, the commit
    /// point; its bytes.
    fn write_authorities(&self, records: &[AuthorityRecord]) -> Result<Vec<u8>, StoreError> {
        for r in records {
            let dir = self.root.join("authorities").join(&r.id);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io("authority directory", &dir))?;
            let mut files = vec![
                (
                    "root.pem",
                    r.root_cert_pem.as_str(),
                    0o644,
                    "root certificate",
                ),
                (
                    "intermediate.pem",
                    r.intermediate_cert_pem.as_str(),
                    0o644,
                    "intermediate certificate",
                ),
                (
                    "intermediate_key.pem",
                    r.intermediate_key_pem.expose(),
                    0o600,
                    "intermediate key",
                ),
            ];
            if let Some(k) = &r.root_key_pem {
                files.push(("root_key.pem", k.expose(), 0o600, "root key"));
            }
            for (name, contents, mode, what) in files {
                let p = dir.join(name);
                // Key material of an existing authority never changes: only write what is new.
                if fs::read_to_string(&p).is_ok_and(|old| old == contents) {
                    continue;
                }
                write_atomic(&p, contents.as_bytes(), mode).map_err(io(what, &p))?;
            }
        }
        let state = StateFile {
            authorities: records
                .iter()
                .map(|r| StateEntry {
                    id: r.id.clone(),
                    state: r.state,
                    created_at: to_unix(r.created_at),
                    superseded_at: r.superseded_at.map(to_unix),
                    tainted: r.tainted,
                })
                .collect(),
        };
        write_json(&self.state_path(), "CA state", &state)
    }

    fn write_token_keys(&self, records: &[TokenKeyRecord]) -> Result<Vec<u8>, StoreError> {
        let dir = self.root.join("token-keys");
        for r in records {
            let p = kid_path(&dir, &r.kid)?;
            if !fs::read_to_string(&p).is_ok_and(|old| old == r.pkcs8_pem.expose()) {
                write_atomic(&p, r.pkcs8_pem.expose().as_bytes(), 0o600)
                    .map_err(io("token key", &p))?;
            }
        }
        let state = TokenKeyState {
            keys: records
                .iter()
                .map(|r| TokenKeyEntry {
                    kid: r.kid.clone(),
                    alg: r.alg.clone(),
                    state: r.state,
                    created_at: to_unix(r.created_at),
                    superseded_at: r.superseded_at.map(to_unix),
                })
                .collect(),
        };
        write_json(&dir.join("state.json"), "token key state", &state)
    }
}

fn write_json<T: Serialize + ?Sized>(
    path: &Path,
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec_pretty(value).expect("records serialize");
    write_atomic(path, &json, 0o600).map_err(io(what, path))?;
    Ok(json)
}

impl Store for FsStore {
    fn describe(&self) -> String {
        format!("data directory {}", self.root.display())
    }

    fn load_revocations(&self) -> Result<Versioned<Vec<RevocationRecord>>, StoreError> {
        self.read_doc(&self.root.join("revocations.json"), "revocations")
    }

    fn save_revocations(
        &self,
        records: &[RevocationRecord],
        expected: &Version,
    ) -> Result<Version, StoreError> {
        let p = self.root.join("revocations.json");
        self.save_if(&p, "revocations", expected, || {
            write_json(&p, "revocations", records)
        })
    }

    fn load_replicas(&self) -> Result<Vec<ReplicaRecord>, StoreError> {
        let mut out = Vec::new();
        // What a CA kept before replicas: read as one more replica's record until it expires.
        let legacy: Versioned<Vec<IssuedRecord>> =
            self.read_doc(&self.root.join("issued.json"), "issued SVIDs")?;
        if !legacy.value.is_empty() {
            out.push(ReplicaRecord {
                replica: "issued.json".into(),
                issued: legacy.value,
                ..Default::default()
            });
        }
        let dir = self.replicas_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io("replica records", &dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io("replica records", &dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            // One record that does not parse (a hand edit) must not stop the others being read.
            match self.read_doc::<ReplicaRecord>(&path, "replica record") {
                Ok(record) => out.push(record.value),
                Err(e) => tracing::warn!("{e}; this replica's record is passed over"),
            }
        }
        out.sort_by(|a, b| a.replica.cmp(&b.replica));
        Ok(out)
    }

    fn save_replica(&self, record: &ReplicaRecord) -> Result<(), StoreError> {
        let dir = self.replicas_dir();
        if !valid_replica_name(&record.replica) {
            return Err(StoreError::Corrupt {
                what: "replica name",
                path: dir.display().to_string(),
                detail: format!("{:?} is not a DNS name", record.replica),
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io("replica records", &dir))?;
        let p = dir.join(format!("{}.json", record.replica));
        write_json(&p, "replica record", record).map(|_| ())
    }

    fn try_lead(&self, _holder: &str, _ttl: Duration) -> Result<bool, StoreError> {
        let mut held = self.leader.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_some() {
            return Ok(true);
        }
        let p = self.root.join("rotation.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io("rotation lock", &p))?;
        match file.try_lock() {
            Ok(()) => {
                *held = Some(file);
                Ok(true)
            }
            Err(fs::TryLockError::WouldBlock) => Ok(false),
            Err(fs::TryLockError::Error(e)) => Err(io("rotation lock", &p)(e)),
        }
    }

    fn load_authorities(&self) -> Result<Versioned<Vec<AuthorityRecord>>, StoreError> {
        let Versioned {
            value: state,
            version,
        } = self.read_doc::<StateFile>(&self.state_path(), "CA state")?;
        let value = state
            .authorities
            .into_iter()
            .map(|entry| {
                let dir = self.root.join("authorities").join(&entry.id);
                let read = |name: &str, what: &'static str| {
                    let p = dir.join(name);
                    fs::read_to_string(&p).map_err(io(what, &p))
                };
                let root_key = dir.join("root_key.pem");
                let root_key_pem = match fs::read_to_string(&root_key) {
                    Ok(s) => Some(Secret::new(s)),
                    Err(e) if e.kind() == ErrorKind::NotFound => None,
                    Err(e) => return Err(io("root key", &root_key)(e)),
                };
                Ok(AuthorityRecord {
                    root_cert_pem: read("root.pem", "root certificate")?,
                    root_key_pem,
                    intermediate_cert_pem: read("intermediate.pem", "intermediate certificate")?,
                    intermediate_key_pem: Secret::new(read(
                        "intermediate_key.pem",
                        "intermediate key",
                    )?),
                    id: entry.id,
                    state: entry.state,
                    created_at: from_unix(entry.created_at),
                    superseded_at: entry.superseded_at.map(from_unix),
                    tainted: entry.tainted,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Versioned { value, version })
    }

    fn save_authorities(
        &self,
        records: &[AuthorityRecord],
        expected: &Version,
    ) -> Result<Version, StoreError> {
        self.save_if(&self.state_path(), "CA state", expected, || {
            self.write_authorities(records)
        })
    }

    fn load_token_keys(&self) -> Result<Versioned<Vec<TokenKeyRecord>>, StoreError> {
        let dir = self.root.join("token-keys");
        let Versioned {
            value: state,
            version,
        } = self.read_doc::<TokenKeyState>(&dir.join("state.json"), "token key state")?;
        let value = state
            .keys
            .into_iter()
            .map(|entry| {
                let p = kid_path(&dir, &entry.kid)?;
                Ok(TokenKeyRecord {
                    pkcs8_pem: Secret::new(fs::read_to_string(&p).map_err(io("token key", &p))?),
                    kid: entry.kid,
                    alg: entry.alg,
                    state: entry.state,
                    created_at: from_unix(entry.created_at),
                    superseded_at: entry.superseded_at.map(from_unix),
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Versioned { value, version })
    }

    fn save_token_keys(
        &self,
        records: &[TokenKeyRecord],
        expected: &Version,
    ) -> Result<Version, StoreError> {
        let p = self.root.join("token-keys").join("state.json");
        self.save_if(&p, "token key state", expected, || {
            self.write_token_keys(records)
        })
    }
    fn create_join_token(&self, hash: &str, record: &JoinTokenRecord) -> Result<(), StoreError> {
        let p = self.token_path(hash, "json")?;
        let json = serde_json::to_vec(record).expect("record serializes");
        let tmp = self.token_path(hash, "new")?;
        write_atomic(&tmp, &json, 0o600).map_err(io("join token record", &tmp))?;
        // A hard link fails if the name exists, so an existing token is never overwritten.
        let linked = fs::hard_link(&tmp, &p);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(StoreError::JoinTokenExists),
            Err(e) => Err(io("join token record", &p)(e)),
        }
    }

    fn join_token(&self, hash: &str) -> Result<Option<StoredJoinToken>, StoreError> {
        if let Some(record) = self.read_token(&self.token_path(hash, "json")?)? {
            return Ok(Some(StoredJoinToken {
                record,
                used: false,
            }));
        }
        Ok(self
            .read_token(&self.token_path(hash, "used")?)?
            .map(|record| StoredJoinToken { record, used: true }))
    }

    fn spend_join_token(&self, hash: &str) -> Result<bool, StoreError> {
        let from = self.token_path(hash, "json")?;
        let to = self.token_path(hash, "used")?;
        match fs::rename(&from, &to) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("join token record", &from)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> JoinTokenRecord {
        JoinTokenRecord {
            spiffe_id: "spiffe://td/a".into(),
            expires_at: 10,
            reusable: false,
            created_at: 1,
        }
    }

    #[test]
    fn a_single_use_token_is_spent_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let hash = "a".repeat(64);
        store.create_join_token(&hash, &record()).unwrap();
        assert!(!store.join_token(&hash).unwrap().unwrap().used);
        assert!(store.spend_join_token(&hash).unwrap());
        assert!(!store.spend_join_token(&hash).unwrap());
        assert!(store.join_token(&hash).unwrap().unwrap().used);
    }

    #[test]
    fn an_existing_token_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let hash = "b".repeat(64);
        store.create_join_token(&hash, &record()).unwrap();
        assert!(matches!(
            store.create_join_token(&hash, &record()),
            Err(StoreError::JoinTokenExists)
        ));
    }

    #[test]
    fn a_hash_that_is_not_hex_cannot_name_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        assert!(store.join_token("../../etc/passwd").is_err());
    }

    #[test]
    fn key_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        store
            .save_authorities(
                &[AuthorityRecord {
                    id: "k1".into(),
                    state: KeyState::Active,
                    created_at: SystemTime::now(),
                    root_cert_pem: "root".into(),
                    root_key_pem: Some(Secret::new("rk")),
                    intermediate_cert_pem: "int".into(),
                    intermediate_key_pem: Secret::new("ik"),
                    superseded_at: Some(
                        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
                    ),
                    tainted: true,
                }],
                &Version::absent(),
            )
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        for name in ["root_key.pem", "intermediate_key.pem"] {
            let mode = fs::metadata(dir.path().join("authorities/k1").join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let back = store.load_authorities().unwrap().value;
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].state, KeyState::Active);
        assert_eq!(back[0].intermediate_key_pem.expose(), "ik");
        // The rotation state survives a restart.
        assert_eq!(
            back[0].superseded_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        );
        assert!(back[0].tainted);
    }

    #[test]
    fn revocations_and_issued_serials_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let empty = store.load_revocations().unwrap();
        assert!(empty.value.is_empty());
        assert_eq!(empty.version, Version::absent());
        let revoked = vec![RevocationRecord {
            kind: super::super::RevokedKind::SpiffeId,
            value: "spiffe://td/a".into(),
            revoked_at: 5,
            reason: "stolen laptop".into(),
        }];
        store.save_revocations(&revoked, &empty.version).unwrap();
        let mine = ReplicaRecord {
            replica: "ca-0".into(),
            updated_at: 3,
            issued: vec![IssuedRecord {
                serial: "0a".into(),
                spiffe_id: "spiffe://td/a".into(),
                authority: "k1".into(),
                not_after: 9,
            }],
            renewed: vec![],
            authorities: "v1".into(),
            token_keys: "v2".into(),
        };
        store.save_replica(&mine).unwrap();
        let again = FsStore::open(dir.path()).unwrap();
        assert_eq!(again.load_revocations().unwrap().value, revoked);
        assert_eq!(again.load_replicas().unwrap(), vec![mine.clone()]);
        // A record that does not parse is passed over; the others are still read.
        let other = ReplicaRecord {
            replica: "ca-1".into(),
            ..mine.clone()
        };
        again.save_replica(&other).unwrap();
        std::fs::write(dir.path().join("replicas/ca-0.json"), "{").unwrap();
        assert_eq!(again.load_replicas().unwrap(), vec![other]);
        // A replica's name names a file and an object: a lowercase DNS name, nothing else.
        for name in ["../x", "CA-0", "ca_0", "-ca", "ca..0", ""] {
            let bad = ReplicaRecord {
                replica: name.into(),
                ..mine.clone()
            };
            assert!(again.save_replica(&bad).is_err(), "{name:?}");
        }
    }

    #[test]
    fn a_save_that_lost_a_race_is_refused_and_the_winner_stays() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            FsStore::open(dir.path()).unwrap(),
            FsStore::open(dir.path()).unwrap(),
        );
        let read_a = a.load_revocations().unwrap();
        let read_b = b.load_revocations().unwrap();
        let rec = |v: &str| RevocationRecord {
            kind: super::super::RevokedKind::Serial,
            value: v.into(),
            revoked_at: 1,
            reason: String::new(),
        };
        let v1 = a.save_revocations(&[rec("0a")], &read_a.version).unwrap();
        // Both read "absent"; the second to save loses, and says why.
        let e = b
            .save_revocations(&[rec("0b")], &read_b.version)
            .unwrap_err();
        assert!(e.is_conflict(), "{e}");
        assert!(e.to_string().contains("another replica"), "{e}");
        let now = b.load_revocations().unwrap();
        assert_eq!(now.value, vec![rec("0a")]);
        assert_eq!(now.version, v1);
        // Read again, decided again: it wins now.
        b.save_revocations(&[rec("0a"), rec("0b")], &now.version)
            .unwrap();
        assert_eq!(a.load_revocations().unwrap().value.len(), 2);
    }

    #[test]
    fn one_process_at_a_time_leads_the_rotation_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let a = FsStore::open(dir.path()).unwrap();
        let b = FsStore::open(dir.path()).unwrap();
        assert!(a.try_lead("a", Duration::from_secs(15)).unwrap());
        assert!(a.try_lead("a", Duration::from_secs(15)).unwrap());
        assert!(!b.try_lead("b", Duration::from_secs(15)).unwrap());
        drop(a);
        assert!(b.try_lead("b", Duration::from_secs(15)).unwrap());
    }
}
