//! The cluster store: the CA's state in the Kubernetes API, shared by every replica.
//!
//! ```text
//! Secret    meshid-ca-authorities     authorities.json: every CA key, its certificates and state
//! Secret    meshid-ca-token-keys      token-keys.json: every token-signing key and its state
//! Secret    meshid-ca-revocations     revocations.json: the revocations in force
//! Secret    meshid-join-<sha256>      record.json: a join token's record (never the token),
//!                                     used: "true" once a single-use token is spent
//! ConfigMap meshid-ca-replica-<name>  replica.json: the SVIDs one replica issued
//! Lease     meshid-ca-rotation        which replica runs the automatic rotation schedule
//! ```
//!
//! All in one namespace (the CA's own). Every save of a shared document is a `replace` with
//! the `resourceVersion` it was read at (or a `create` when it was absent): the API server
//! answers 409 Conflict to the loser of a race, which becomes [`StoreError::Conflict`] and is
//! read and decided again by the caller. Spending a join token is the same conditional
//! replace, so exactly one replica wins it. A watch on the shared Secrets tells the CA when
//! another replica changed them ([`Store::changes`]).
//!
//! The [`Store`] interface is synchronous (the data directory's is); the API calls run on a
//! runtime of their own, in a thread of their own, so a caller on any thread (a runtime worker,
//! a blocking task) can wait for one. Every call is bounded by [`TIMEOUT`].

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret as K8sSecret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use meshid_proto::Secret;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::{
    AuthorityRecord, JoinTokenRecord, KeyState, ReplicaRecord, RevocationRecord, Store, StoreError,
    StoredJoinToken, TokenKeyRecord, Version, Versioned,
};

/// Each API call, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(10);
const AUTHORITIES: &str = "meshid-ca-authorities";
const TOKEN_KEYS: &str = "meshid-ca-token-keys";
const REVOCATIONS: &str = "meshid-ca-revocations";
const LEASE: &str = "meshid-ca-rotation";
const REPLICA_PREFIX: &str = "meshid-ca-replica-";
const JOIN_PREFIX: &str = "meshid-join-";
/// Every object the store writes carries these labels.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshid");
/// The shared documents the watch follows.
const SHARED_LABEL: (&str, &str) = ("meshid.io/ca-state", "shared");
const REPLICA_LABEL: (&str, &str) = ("meshid.io/ca-state", "replica");
const JOIN_LABEL: (&str, &str) = ("meshid.io/ca-state", "join-token");
/// The API server ends a watch after this long; a new one starts from where it stopped.
const WATCH_SECONDS: u32 = 290;

/// Where the API server is and how the CA authenticates to it.
#[derive(Debug, Clone)]
pub struct KubeStoreConfig {
    /// `https://host[:port]`.
    pub api_url: String,
    /// The API server's CA (PEM).
    pub ca_file: PathBuf,
    /// The CA's bearer token, re-read as the kubelet rotates it.
    pub token_file: PathBuf,
    /// Where the CA's objects live (the CA's own namespace).
    pub namespace: String,
}

pub struct KubeStore {
    namespace: String,
    client: kube::Client,
    /// The store's own runtime, driven by a thread of its own.
    runtime: tokio::runtime::Handle,
    changes: Arc<Notify>,
    /// When this replica last renewed the rotation lease (for its own "still mine" check).
    lease: Mutex<Option<SystemTime>>,
}

fn api_error(what: impl Into<String>, e: kube::Error) -> StoreError {
    StoreError::Api {
        what: what.into(),
        detail: e.to_string(),
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn labels(kind: (&str, &str)) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        (kind.0.to_owned(), kind.1.to_owned()),
    ])
}

fn selector(kind: (&str, &str)) -> String {
    format!("{}={},{}={}", MANAGED_BY.0, MANAGED_BY.1, kind.0, kind.1)
}

fn corrupt(what: &'static str, name: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what,
        path: format!("Secret or ConfigMap {name}"),
        detail: detail.to_string(),
    }
}

fn unix(t: SystemTime) -> i64 {
    meshid_proto::clock::unix_seconds(t)
}

fn from_unix(s: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(s.max(0) as u64)
}

/// [`AuthorityRecord`] as the Secret holds it. No `Debug`: it carries keys.
#[derive(Serialize, Deserialize)]
struct StoredAuthority {
    id: String,
    state: KeyState,
    created_at: i64,
    root_cert_pem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    root_key_pem: Option<String>,
    intermediate_cert_pem: String,
    intermediate_key_pem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    superseded_at: Option<i64>,
    #[serde(default)]
    tainted: bool,
}

impl From<&AuthorityRecord> for StoredAuthority {
    fn from(r: &AuthorityRecord) -> Self {
        Self {
            id: r.id.clone(),
            state: r.state,
            created_at: unix(r.created_at),
            root_cert_pem: r.root_cert_pem.clone(),
            root_key_pem: r.root_key_pem.as_ref().map(|k| k.expose().to_owned()),
            intermediate_cert_pem: r.intermediate_cert_pem.clone(),
            intermediate_key_pem: r.intermediate_key_pem.expose().to_owned(),
            superseded_at: r.superseded_at.map(unix),
            tainted: r.tainted,
        }
    }
}

impl From<StoredAuthority> for AuthorityRecord {
    fn from(r: StoredAuthority) -> Self {
        Self {
            id: r.id,
            state: r.state,
            created_at: from_unix(r.created_at),
            root_cert_pem: r.root_cert_pem,
            root_key_pem: r.root_key_pem.map(Secret::new),
            intermediate_cert_pem: r.intermediate_cert_pem,
            intermediate_key_pem: Secret::new(r.intermediate_key_pem),
            superseded_at: r.superseded_at.map(from_unix),
            tainted: r.tainted,
        }
    }
}

/// [`TokenKeyRecord`] as the Secret holds it. No `Debug`: it carries keys.
#[derive(Serialize, Deserialize)]
struct StoredTokenKey {
    kid: String,
    alg: String,
    state: KeyState,
    created_at: i64,
    pkcs8_pem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    superseded_at: Option<i64>,
}

impl From<&TokenKeyRecord> for StoredTokenKey {
    fn from(r: &TokenKeyRecord) -> Self {
        Self {
            kid: r.kid.clone(),
            alg: r.alg.clone(),
            state: r.state,
            created_at: unix(r.created_at),
            pkcs8_pem: r.pkcs8_pem.expose().to_owned(),
            superseded_at: r.superseded_at.map(unix),
        }
    }
}

impl From<StoredTokenKey> for TokenKeyRecord {
    fn from(r: StoredTokenKey) -> Self {
        Self {
            kid: r.kid,
            alg: r.alg,
            state: r.state,
            created_at: from_unix(r.created_at),
            pkcs8_pem: Secret::new(r.pkcs8_pem),
            superseded_at: r.superseded_at.map(from_unix),
        }
    }
}

impl KubeStore {
    /// Connect to the API server (nothing is read yet) and start following the shared Secrets.
    pub fn open(config: &KubeStoreConfig) -> Result<Arc<Self>, StoreError> {
        let api_url = config.api_url.clone();
        let bad = move |detail: String| StoreError::Api {
            what: format!("--store kubernetes ({api_url})"),
            detail,
        };
        let uri: http::Uri = config
            .api_url
            .parse()
            .map_err(|_| bad("the API server must be https://HOST[:PORT]".into()))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the API server must be https://HOST[:PORT]".into()));
        }
        if !super::fs::valid_replica_name(&config.namespace) || config.namespace.contains('.') {
            return Err(bad(format!(
                "{:?} is not a namespace name",
                config.namespace
            )));
        }
        let pem = std::fs::read(&config.ca_file)
            .map_err(|e| bad(format!("reading {}: {e}", config.ca_file.display())))?;
        use rustls_pki_types::pem::PemObject as _;
        let roots = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("{}: {e}", config.ca_file.display())))?;
        if roots.is_empty() {
            return Err(bad(format!(
                "{} holds no certificate",
                config.ca_file.display()
            )));
        }
        let mut kc = kube::Config::new(uri);
        kc.default_namespace = config.namespace.clone();
        kc.root_cert = Some(roots);
        kc.auth_info.token_file = Some(config.token_file.display().to_string());
        kc.connect_timeout = Some(TIMEOUT);

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| bad(format!("starting its runtime: {e}")))?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("meshid-kube-store".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .map_err(|e| bad(format!("starting its thread: {e}")))?;
        let bad_client = bad.clone();
        let client = wait(&handle, async move {
            kube::Client::try_from(kc).map_err(|e| bad_client(e.to_string()))
        })?;
        let store = Arc::new(Self {
            namespace: config.namespace.clone(),
            client,
            runtime: handle,
            changes: Arc::new(Notify::new()),
            lease: Mutex::new(None),
        });
        store.runtime.spawn(follow(
            store.secrets(),
            store.changes.clone(),
            store.namespace.clone(),
        ));
        Ok(store)
    }

    fn secrets(&self) -> Api<K8sSecret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn call<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        wait(&self.runtime, fut)
    }

    /// One JSON document in a Secret, and its resourceVersion.
    fn load_doc<T: serde::de::DeserializeOwned + Default + Send + 'static>(
        &self,
        name: &'static str,
        key: &'static str,
        what: &'static str,
    ) -> Result<Versioned<T>, StoreError> {
        let api = self.secrets();
        self.call(async move {
            let Some(secret) = api.get_opt(name).await.map_err(|e| api_error(name, e))? else {
                return Ok(Versioned {
                    value: T::default(),
                    version: Version::absent(),
                });
            };
            let version = Version(secret.metadata.resource_version.clone().unwrap_or_default());
            let value = match secret.data.as_ref().and_then(|d| d.get(key)) {
                None => T::default(),
                Some(bytes) => {
                    serde_json::from_slice(&bytes.0).map_err(|e| corrupt(what, name, e))?
                }
            };
            Ok(Versioned { value, version })
        })
    }

    /// Save one JSON document in a Secret if it is still at `expected`.
    fn save_doc<T: Serialize + ?Sized>(
        &self,
        name: &'static str,
        key: &'static str,
        what: &'static str,
        value: &T,
        expected: &Version,
    ) -> Result<Version, StoreError> {
        let json = serde_json::to_vec(value).expect("records serialize");
        let secret = K8sSecret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels(SHARED_LABEL)),
                resource_version: (!expected.0.is_empty()).then(|| expected.0.clone()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(key.to_owned(), ByteString(json))])),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        let api = self.secrets();
        let create = expected.0.is_empty();
        self.call(async move {
            let pp = PostParams::default();
            let written = if create {
                api.create(&pp, &secret).await
            } else {
                api.replace(name, &pp, &secret).await
            };
            match written {
                Ok(s) => Ok(Version(s.metadata.resource_version.unwrap_or_default())),
                // 409: created by another meanwhile, or replaced since it was read.
                Err(e) if is_status(&e, 409) => Err(StoreError::Conflict { what }),
                // Deleted since it was read: never re-created behind the operator's back.
                Err(e) if !create && is_status(&e, 404) => Err(StoreError::Api {
                    what: format!("saving {name}"),
                    detail: "the Secret was deleted; restore it from a backup".into(),
                }),
                Err(e) => Err(api_error(format!("saving {name}"), e)),
            }
        })
    }

    fn join_name(hash: &str) -> Result<String, StoreError> {
        if !super::valid_token_hash(hash) {
            return Err(StoreError::Corrupt {
                what: "join token hash",
                path: "Secret meshid-join-*".into(),
                detail: "not 64 lowercase hex digits".into(),
            });
        }
        Ok(format!("{JOIN_PREFIX}{hash}"))
    }
}

/// Run `fut` on the store's runtime and wait for it here, bounded by [`TIMEOUT`].
fn wait<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let result = match tokio::time::timeout(TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Api {
                what: "a request".into(),
                detail: format!("no answer within {TIMEOUT:?}"),
            }),
        };
        let _ = tx.send(result);
    });
    rx.recv().unwrap_or_else(|_| {
        Err(StoreError::Api {
            what: "a request".into(),
            detail: "the store's runtime is gone".into(),
        })
    })
}

/// Follow the shared Secrets: list, then watch from the list's resourceVersion, and notify
/// on every change (and after every relist, which may have missed some). Forever.
async fn follow(api: Api<K8sSecret>, changes: Arc<Notify>, namespace: String) {
    let mut delay = Duration::from_millis(500);
    loop {
        let listed = api
            .list(&ListParams::default().labels(&selector(SHARED_LABEL)))
            .await;
        let mut version = match listed {
            Ok(list) => list.metadata.resource_version.unwrap_or_default(),
            Err(e) => {
                warn!(
                    namespace,
                    "the CA store's watch: listing Secrets: {e}; retrying in {delay:?}"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        changes.notify_one();
        loop {
            let params = WatchParams::default()
                .labels(&selector(SHARED_LABEL))
                .timeout(WATCH_SECONDS);
            let stream = match api.watch(&params, &version).await {
                Ok(s) => s,
                Err(e) => {
                    debug!("the CA store's watch: {e}");
                    break;
                }
            };
            let mut stream = stream.boxed();
            let mut gone = false;
            loop {
                let next = tokio::time::timeout(
                    Duration::from_secs(WATCH_SECONDS as u64 + 30),
                    stream.try_next(),
                )
                .await;
                match next {
                    Ok(Ok(Some(WatchEvent::Added(s) | WatchEvent::Modified(s))))
                    | Ok(Ok(Some(WatchEvent::Deleted(s)))) => {
                        if let Some(v) = s.metadata.resource_version {
                            version = v;
                        }
                        delay = Duration::from_millis(500);
                        changes.notify_one();
                    }
                    Ok(Ok(Some(WatchEvent::Bookmark(b)))) => {
                        version = b.metadata.resource_version;
                    }
                    // 410 Gone: the version is too old; list again.
                    Ok(Ok(Some(WatchEvent::Error(status)))) => {
                        debug!("the CA store's watch ended: {status}");
                        gone = true;
                        break;
                    }
                    Ok(Ok(None)) => break, // the server ended it: watch again from `version`
                    Ok(Err(e)) => {
                        debug!("the CA store's watch: {e}");
                        gone = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            if gone {
                break;
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

impl Store for KubeStore {
    fn describe(&self) -> String {
        format!("kubernetes namespace {}", self.namespace)
    }

    fn load_authorities(&self) -> Result<Versioned<Vec<AuthorityRecord>>, StoreError> {
        let doc: Versioned<Vec<StoredAuthority>> =
            self.load_doc(AUTHORITIES, "authorities.json", "CA state")?;
        Ok(Versioned {
            value: doc.value.into_iter().map(Into::into).collect(),
            version: doc.version,
        })
    }

    fn save_authorities(
        &self,
        records: &[AuthorityRecord],
        expected: &Version,
    ) -> Result<Version, StoreError> {
        let stored: Vec<StoredAuthority> = records.iter().map(Into::into).collect();
        self.save_doc(
            AUTHORITIES,
            "authorities.json",
            "CA state",
            &stored,
            expected,
        )
    }

    fn load_token_keys(&self) -> Result<Versioned<Vec<TokenKeyRecord>>, StoreError> {
        let doc: Versioned<Vec<StoredTokenKey>> =
            self.load_doc(TOKEN_KEYS, "token-keys.json", "token key state")?;
        Ok(Versioned {
            value: doc.value.into_iter().map(Into::into).collect(),
            version: doc.version,
        })
    }

    fn save_token_keys(
        &self,
        records: &[TokenKeyRecord],
        expected: &Version,
    ) -> Result<Version, StoreError> {
        let stored: Vec<StoredTokenKey> = records.iter().map(Into::into).collect();
        self.save_doc(
            TOKEN_KEYS,
            "token-keys.json",
            "token key state",
            &stored,
            expected,
        )
    }

    fn load_revocations(&self) -> Result<Versioned<Vec<RevocationRecord>>, StoreError> {
        self.load_doc(REVOCATIONS, "revocations.json", "revocations")
    }

    fn save_revocations(
        &self,
        records: &[RevocationRecord],
        expected: &Version,
    ) -> Result<Version, StoreError> {
        self.save_doc(
            REVOCATIONS,
            "revocations.json",
            "revocations",
            records,
            expected,
        )
    }

    fn create_join_token(&self, hash: &str, record: &JoinTokenRecord) -> Result<(), StoreError> {
        let name = Self::join_name(hash)?;
        let secret = K8sSecret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels(JOIN_LABEL)),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "record.json".to_owned(),
                ByteString(serde_json::to_vec(record).expect("record serializes")),
            )])),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        let api = self.secrets();
        self.call(async move {
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => Ok(()),
                Err(e) if is_status(&e, 409) => Err(StoreError::JoinTokenExists),
                Err(e) => Err(api_error(format!("creating {name}"), e)),
            }
        })
    }

    fn join_token(&self, hash: &str) -> Result<Option<StoredJoinToken>, StoreError> {
        let name = Self::join_name(hash)?;
        let api = self.secrets();
        self.call(async move {
            let Some(secret) = api.get_opt(&name).await.map_err(|e| api_error(&name, e))? else {
                return Ok(None);
            };
            join_record(&name, &secret).map(Some)
        })
    }

    fn spend_join_token(&self, hash: &str) -> Result<bool, StoreError> {
        let name = Self::join_name(hash)?;
        let api = self.secrets();
        self.call(async move {
            // Read, mark spent, replace at the version read: of several replicas (or several
            // requests) presenting it at once, the API server lets exactly one replace win.
            loop {
                let Some(mut secret) = api.get_opt(&name).await.map_err(|e| api_error(&name, e))?
                else {
                    return Ok(false);
                };
                if join_record(&name, &secret)?.used {
                    return Ok(false);
                }
                secret
                    .data
                    .get_or_insert_default()
                    .insert("used".into(), ByteString(b"true".to_vec()));
                match api.replace(&name, &PostParams::default(), &secret).await {
                    Ok(_) => return Ok(true),
                    Err(e) if is_status(&e, 409) => continue, // read again: spent by another?
                    Err(e) if is_status(&e, 404) => return Ok(false),
                    Err(e) => return Err(api_error(format!("spending {name}"), e)),
                }
            }
        })
    }

    fn load_replicas(&self) -> Result<Vec<ReplicaRecord>, StoreError> {
        let api = self.config_maps();
        self.call(async move {
            let list = api
                .list(&ListParams::default().labels(&selector(REPLICA_LABEL)))
                .await
                .map_err(|e| api_error("listing replica ConfigMaps", e))?;
            let mut out = Vec::new();
            for cm in list.items {
                let name = cm.metadata.name.clone().unwrap_or_default();
                let Some(json) = cm.data.as_ref().and_then(|d| d.get("replica.json")) else {
                    continue;
                };
                // One record that does not parse must not stop the others being read.
                match serde_json::from_str(json) {
                    Ok(r) => out.push(r),
                    Err(e) => warn!(
                        "{}; this replica's record is passed over",
                        corrupt("replica record", &name, e)
                    ),
                }
            }
            Ok(out)
        })
    }

    fn save_replica(&self, record: &ReplicaRecord) -> Result<(), StoreError> {
        if !super::fs::valid_replica_name(&record.replica) {
            return Err(StoreError::Corrupt {
                what: "replica name",
                path: self.describe(),
                detail: format!("{:?} is not a DNS name", record.replica),
            });
        }
        let name = format!("{REPLICA_PREFIX}{}", record.replica);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels(REPLICA_LABEL)),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "replica.json".to_owned(),
                serde_json::to_string(record).expect("record serializes"),
            )])),
            ..Default::default()
        };
        let api = self.config_maps();
        self.call(async move {
            // Only this replica writes it: replace what is there, whatever its version.
            let pp = PostParams::default();
            match api.get_opt(&name).await.map_err(|e| api_error(&name, e))? {
                None => match api.create(&pp, &cm).await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(api_error(format!("creating {name}"), e)),
                },
                Some(current) => {
                    let mut cm = cm;
                    cm.metadata.resource_version = current.metadata.resource_version;
                    api.replace(&name, &pp, &cm)
                        .await
                        .map(|_| ())
                        .map_err(|e| api_error(format!("saving {name}"), e))
                }
            }
        })
    }

    fn try_lead(&self, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let api = self.leases();
        let holder = holder.to_owned();
        let namespace = self.namespace.clone();
        let led = self.call(async move {
            let now = SystemTime::now();
            let stamp = MicroTime(
                k8s_openapi::jiff::Timestamp::try_from(now)
                    .map_err(|e| corrupt("lease", LEASE, e))?,
            );
            let current = api.get_opt(LEASE).await.map_err(|e| api_error(LEASE, e))?;
            let pp = PostParams::default();
            let Some(mut lease) = current else {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE.into()),
                        namespace: Some(namespace),
                        labels: Some(labels(("meshid.io/ca-state", "lease"))),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(holder),
                        lease_duration_seconds: Some(ttl.as_secs().max(1) as i32),
                        acquire_time: Some(stamp.clone()),
                        renew_time: Some(stamp),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                return match api.create(&pp, &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_status(&e, 409) => Ok(false),
                    Err(e) => Err(api_error(format!("creating Lease {LEASE}"), e)),
                };
            };
            let spec = lease.spec.get_or_insert_default();
            let mine = spec.holder_identity.as_deref() == Some(holder.as_str());
            let renewed = spec.renew_time.as_ref().map(|t| SystemTime::from(t.0));
            let duration =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
            let expired = renewed.is_none_or(|r| r + duration <= now);
            if !mine && !expired {
                return Ok(false);
            }
            if !mine {
                spec.holder_identity = Some(holder.clone());
                spec.acquire_time = Some(stamp.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = Some(stamp);
            spec.lease_duration_seconds = Some(ttl.as_secs().max(1) as i32);
            match api.replace(LEASE, &pp, &lease).await {
                Ok(_) => Ok(true),
                // Another replica renewed or took it since we read it.
                Err(e) if is_status(&e, 409) => Ok(false),
                Err(e) => Err(api_error(format!("renewing Lease {LEASE}"), e)),
            }
        });
        let mut last = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        match led {
            Ok(true) => {
                *last = Some(SystemTime::now());
                Ok(true)
            }
            Ok(false) => {
                *last = None;
                Ok(false)
            }
            // The API server away: we lead only while the lease we renewed last still runs.
            Err(e) => {
                if last.is_some_and(|t| t + ttl / 2 > SystemTime::now()) {
                    Ok(true)
                } else {
                    *last = None;
                    Err(e)
                }
            }
        }
    }

    fn changes(&self) -> Option<Arc<Notify>> {
        Some(self.changes.clone())
    }
}

fn join_record(name: &str, secret: &K8sSecret) -> Result<StoredJoinToken, StoreError> {
    let data = secret.data.as_ref();
    let record = data
        .and_then(|d| d.get("record.json"))
        .ok_or_else(|| corrupt("join token record", name, "no record.json"))?;
    let record: JoinTokenRecord =
        serde_json::from_slice(&record.0).map_err(|e| corrupt("join token record", name, e))?;
    let used = data
        .and_then(|d| d.get("used"))
        .is_some_and(|v| v.0 == b"true");
    Ok(StoredJoinToken { record, used })
}
