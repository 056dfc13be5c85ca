//! Publishing the trust bundle to Kubernetes: the CA keeps a ConfigMap (`meshid-bundle` by
//! default, key `bundle.pem`: every root of the bundle) current in every namespace a label
//! selector matches, so pods can mount the bundle their sidecar bootstraps with, as istiod
//! keeps `istio-ca-root-cert`.
//!
//! On start, on every bundle change and every [`RESYNC`]: list the matching namespaces
//! (`GET /api/v1/namespaces?labelSelector=...`, paged), and in each one GET the ConfigMap,
//! POST it when missing, PUT it back with the `resourceVersion` read when its `bundle.pem`
//! differs (a 409 Conflict is re-read and retried, a few times). Between lists a watch on the
//! same namespaces (`watch=true`, from the list's resourceVersion) writes the ConfigMap into a
//! namespace as soon as it appears or gains the label. Nothing is ever deleted.
//!
//! The API server is on the CA's side path only: failures are logged at WARN (throttled, one
//! line per kind of failure a minute) and retried with backoff, while the CA serves as before.
//! Every request is bounded in time and in response size, as TokenReview is.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use meshid_proto::TrustBundle;
use meshid_proto::throttle::{Throttle, Verdict};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::attest::k8s::{ApiEndpoint, K8sConfigError};

/// The ConfigMap's name unless `--bundle-configmap-name` says otherwise.
pub const DEFAULT_CONFIGMAP_NAME: &str = "meshid-bundle";
/// The key in the ConfigMap's `data` that holds the bundle (PEM).
pub const BUNDLE_KEY: &str = "bundle.pem";
/// The label every ConfigMap the CA creates carries.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "meshid";
/// The metric counting writes, labelled `outcome`: `created`, `updated`, `conflict` (a 409
/// that was re-read and retried), `failed`.
pub const WRITES_METRIC: &str = "meshid_bundle_configmap_writes_total";

/// Every namespace is visited at least this often (a watch catches new ones in between).
pub const RESYNC: Duration = Duration::from_secs(60);
/// Each request, connection included.
const TIMEOUT: Duration = Duration::from_secs(5);
/// One ConfigMap: etcd holds no object larger than 1.5 MiB.
const MAX_OBJECT: usize = 2 * 1024 * 1024;
/// One page of the namespace list ([`PAGE_SIZE`] namespaces with their managed fields).
const MAX_PAGE: usize = 4 * 1024 * 1024;
const PAGE_SIZE: u32 = 100;
/// At most this many pages (a million namespaces): a server that keeps answering `continue`
/// cannot keep the publisher listing forever.
const MAX_PAGES: usize = 10_000;
/// One watch event; namespace objects are small.
const MAX_EVENT: usize = 1024 * 1024;
/// The API server ends a watch after this long; a new one starts from where it stopped.
const WATCH_SECONDS: u64 = 290;
/// A watch silent for this long is dead (the server would have ended it).
const WATCH_IDLE: Duration = Duration::from_secs(WATCH_SECONDS + 30);
/// A kept-alive connection idle for longer is not reused (the server may be closing it).
const IDLE_REUSE: Duration = Duration::from_secs(30);
/// 409 Conflicts retried (re-read and written again) before this write counts as failed.
const CONFLICT_ATTEMPTS: usize = 5;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The shortest pause before a relist the watch asked for (a resourceVersion too old).
const RELIST_DELAY: Duration = Duration::from_secs(1);
const LOG_WINDOW: Duration = Duration::from_secs(60);

/// What `--bundle-configmap-*` and the API server settings give.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// `https://host[:port]` of the API server.
    pub api_url: String,
    /// The API server's CA certificate (PEM).
    pub ca_file: PathBuf,
    /// The CA's own bearer token, re-read for every request (kubelet rotates it).
    pub token_file: PathBuf,
    /// A Kubernetes label selector, e.g. `meshid.io/inject=enabled`.
    pub namespace_selector: String,
    /// The ConfigMap's name.
    pub configmap_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishConfigError {
    #[error(transparent)]
    Api(#[from] K8sConfigError),
    #[error(
        "namespace selector {0:?} is not a label selector (e.g. meshid.io/inject=enabled; to match every namespace use kubernetes.io/metadata.name)"
    )]
    BadSelector(String),
    #[error("ConfigMap name {0:?} is not a DNS subdomain name (lowercase a-z, 0-9, '-', '.')")]
    BadName(String),
}

/// A checked publisher, ready to [`spawn`].
pub struct Publisher {
    api: Arc<Api>,
    selector: String,
    name: String,
}

impl Publisher {
    pub fn new(config: PublishConfig) -> Result<Self, PublishConfigError> {
        let selector = config.namespace_selector.trim().to_owned();
        if !valid_selector(&selector) {
            return Err(PublishConfigError::BadSelector(config.namespace_selector));
        }
        if !valid_subdomain(&config.configmap_name) {
            return Err(PublishConfigError::BadName(config.configmap_name));
        }
        Ok(Self {
            api: Arc::new(Api::new(
                &config.api_url,
                &config.ca_file,
                config.token_file,
            )?),
            selector,
            name: config.configmap_name,
        })
    }
}

/// Counts one write by its outcome (see [`WRITES_METRIC`]).
pub type Counter = Arc<dyn Fn(&'static str) + Send + Sync>;

/// Publish `bundles` until `shutdown`: the task never ends on its own while the CA runs.
pub fn spawn(
    publisher: Publisher,
    bundles: watch::Receiver<TrustBundle>,
    count: Counter,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    info!(
        selector = %publisher.selector,
        configmap = %publisher.name,
        "publishing the trust bundle to the selected namespaces"
    );
    let run = Run {
        conn: Conn::default(),
        api: publisher.api,
        selector: publisher.selector,
        name: publisher.name,
        count,
        throttle: Arc::new(Throttle::new(LOG_WINDOW, 256)),
    };
    tokio::spawn(run.run(bundles, shutdown))
}

/// A label selector as far as it can be checked here (the API server parses it): the
/// characters of keys, values and operators only, and not empty (that would match every
/// namespace).
fn valid_selector(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 4096
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" -_./=!,()".contains(&b))
        && s.bytes().any(|b| b.is_ascii_alphanumeric())
}

/// RFC 1123 subdomain, as Kubernetes names most objects.
fn valid_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// RFC 1123 label: what a namespace name is. Checked before a name from the API server goes
/// into a request path.
fn valid_namespace(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && valid_subdomain(s)
}

/// `/api/v1/namespaces` with `query`, encoded.
fn namespaces_path(query: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in query {
        q.append_pair(k, v);
    }
    format!("/api/v1/namespaces?{}", q.finish())
}

/// A failed API exchange: `kind` is short and stable (it keys the log throttle), `detail` is
/// for the operator.
#[derive(Debug)]
struct ApiError {
    kind: String,
    detail: String,
}

impl ApiError {
    fn new(kind: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            detail: detail.into(),
        }
    }

    /// An answer other than the ones expected, with what its `Status` object says.
    fn status(what: &str, reply: &Reply) -> Self {
        #[derive(Deserialize, Default)]
        struct Status {
            #[serde(default)]
            reason: String,
            #[serde(default)]
            message: String,
        }
        let s: Status = serde_json::from_slice(&reply.body).unwrap_or_default();
        let mut detail = format!("{what} answered HTTP {}", reply.status);
        if !s.reason.is_empty() {
            detail.push_str(&format!(" {}", s.reason));
        }
        if !s.message.is_empty() {
            detail.push_str(&format!(": {}", s.message));
        }
        Self {
            kind: format!("http_{}", reply.status.as_u16()),
            detail,
        }
    }
}

struct Reply {
    status: StatusCode,
    body: Bytes,
}

/// The API server, reached as TokenReview reaches it.
type Api = ApiEndpoint;

impl Api {
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<hyper::Request<Full<Bytes>>, ApiError> {
        let bearer = tokio::fs::read_to_string(&self.credentials)
            .await
            .map_err(|e| {
                ApiError::new(
                    "credentials",
                    format!("reading CA credentials {}: {e}", self.credentials.display()),
                )
            })?;
        // Outside input: a byte that cannot go in a header is this request's error, and the
        // value is never printed.
        let mut authorization =
            hyper::header::HeaderValue::from_str(&format!("Bearer {}", bearer.trim())).map_err(
                |_| {
                    ApiError::new(
                        "credentials",
                        format!(
                            "CA credentials {} hold bytes that cannot be sent in a header",
                            self.credentials.display()
                        ),
                    )
                },
            )?;
        authorization.set_sensitive(true);
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, "meshid-ca")
            .header(hyper::header::AUTHORIZATION, authorization);
        let body = match body {
            Some(v) => {
                builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        builder
            .body(Full::new(body))
            .map_err(|e| ApiError::new("request", format!("building a request: {e}")))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ApiError> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                ApiError::new("connect", format!("connecting to {}: {e}", self.authority))
            })?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| ApiError::new("tls", format!("TLS to the API server: {e}")))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ApiError::new("http", format!("HTTP to the API server: {e}")))?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

/// One kept-alive connection for the publisher's requests, which are sequential.
#[derive(Default)]
struct Conn {
    idle: Option<(SendRequest<Full<Bytes>>, Instant)>,
}

impl Conn {
    /// One request and its whole answer, within [`TIMEOUT`] and `limit` bytes.
    async fn call(
        &mut self,
        api: &Api,
        method: Method,
        path: &str,
        body: Option<&Value>,
        limit: usize,
    ) -> Result<Reply, ApiError> {
        let what = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let request = api.request(method, path, body).await?;
        let exchange = async {
            let reused = match self.idle.take() {
                Some((mut sender, since)) if since.elapsed() < IDLE_REUSE => {
                    match sender.ready().await {
                        Ok(()) => Some(sender),
                        Err(_) => None,
                    }
                }
                _ => None,
            };
            let mut sender = match reused {
                Some(s) => s,
                None => api.connect().await?,
            };
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| ApiError::new("http", format!("{what}: {e}")))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map_err(|e| ApiError::new("read", format!("reading the answer to {what}: {e}")))?
                .to_bytes();
            // Only a connection whose answer was read to the end can carry the next request.
            self.idle = Some((sender, Instant::now()));
            Ok::<_, ApiError>(Reply { status, body })
        };
        tokio::time::timeout(TIMEOUT, exchange).await.map_err(|_| {
            ApiError::new("timeout", format!("no answer to {what} within {TIMEOUT:?}"))
        })?
    }
}

#[derive(Deserialize)]
struct NamespaceList {
    #[serde(default)]
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<Object>,
}

#[derive(Deserialize, Default)]
struct ListMeta {
    #[serde(default, rename = "resourceVersion")]
    resource_version: String,
    #[serde(default, rename = "continue")]
    cont: String,
}

#[derive(Deserialize, Default)]
struct Object {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    status: Option<serde_json::Value>,
}

impl Object {
    /// A namespace being deleted takes no new objects: writing into it would fail every sync.
    fn terminating(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s["phase"] == "Terminating")
    }
}

#[derive(Deserialize, Default)]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default, rename = "resourceVersion")]
    resource_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Created,
    Updated,
    Unchanged,
}

/// What the namespace watch tells the publisher.
enum Event {
    /// A matching namespace appeared or changed.
    Namespace(String),
    /// The watch cannot go on from where it is (its resourceVersion is too old): list again.
    Relist,
}

/// The ConfigMap as the CA writes it. Other data keys, labels and annotations of an existing
/// one are kept; a `managed-by` label of another manager is left as it is.
fn updated_configmap(mut object: Value, pem: &str) -> Option<Value> {
    let map = object.as_object_mut()?;
    let data = map.entry("data").or_insert_with(|| json!({}));
    if data.is_null() {
        *data = json!({});
    }
    data.as_object_mut()?.insert(BUNDLE_KEY.into(), pem.into());
    let meta = map.get_mut("metadata")?.as_object_mut()?;
    // The server keeps the managed fields of an update that sends none.
    meta.remove("managedFields");
    let labels = meta.entry("labels").or_insert_with(|| json!({}));
    if labels.is_null() {
        *labels = json!({});
    }
    labels
        .as_object_mut()?
        .entry(MANAGED_BY_LABEL)
        .or_insert_with(|| MANAGED_BY.into());
    Some(object)
}

struct Run {
    api: Arc<Api>,
    conn: Conn,
    selector: String,
    name: String,
    count: Counter,
    throttle: Arc<Throttle>,
}

impl Run {
    async fn run(mut self, mut bundles: watch::Receiver<TrustBundle>, shutdown: CancellationToken) {
        let mut pem = bundles.borrow_and_update().to_pem();
        let (events_tx, mut events) = mpsc::channel::<Event>(256);
        let mut watcher: Option<tokio::task::JoinHandle<()>> = None;
        let mut backoff = BACKOFF_MIN;
        let mut next_sync = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = bundles.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    pem = bundles.borrow_and_update().to_pem();
                    next_sync = Instant::now();
                }
                _ = tokio::time::sleep_until(next_sync) => {
                    let result = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        r = self.sync(&pem) => r,
                    };
                    match result {
                        Ok((resource_version, all_written)) => {
                            if watcher.as_ref().is_none_or(|w| w.is_finished()) {
                                watcher = Some(tokio::spawn(watch_namespaces(
                                    self.api.clone(),
                                    self.selector.clone(),
                                    resource_version,
                                    events_tx.clone(),
                                    self.throttle.clone(),
                                )));
                            }
                            if all_written {
                                backoff = BACKOFF_MIN;
                                next_sync = Instant::now() + RESYNC;
                            } else {
                                next_sync = Instant::now() + backoff;
                                backoff = (backoff * 2).min(BACKOFF_MAX);
                            }
                        }
                        Err(e) => {
                            log_failure(&self.throttle, "list", None, &e);
                            next_sync = Instant::now() + backoff;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
                Some(event) = events.recv() => match event {
                    Event::Namespace(ns) => {
                        let result = tokio::select! {
                            _ = shutdown.cancelled() => break,
                            r = self.ensure(&ns, &pem) => r,
                        };
                        if let Err(e) = result {
                            self.failed(&ns, &e);
                            next_sync = next_sync.min(Instant::now() + backoff);
                        }
                    }
                    Event::Relist => {
                        if let Some(w) = watcher.take() {
                            w.abort();
                        }
                        next_sync = next_sync.min(Instant::now() + RELIST_DELAY);
                    }
                },
            }
        }
        if let Some(w) = watcher {
            w.abort();
        }
    }

    fn failed(&self, ns: &str, e: &ApiError) {
        (self.count)("failed");
        log_failure(&self.throttle, "write", Some(ns), e);
    }

    /// Every matching namespace, and the resourceVersion to watch them from.
    async fn list(&mut self) -> Result<(Vec<String>, String), ApiError> {
        let mut names = Vec::new();
        let mut cont = String::new();
        for _ in 0..MAX_PAGES {
            let limit = PAGE_SIZE.to_string();
            let mut query = vec![("labelSelector", self.selector.as_str()), ("limit", &limit)];
            if !cont.is_empty() {
                query.push(("continue", &cont));
            }
            let path = namespaces_path(&query);
            let reply = self
                .conn
                .call(&self.api, Method::GET, &path, None, MAX_PAGE)
                .await?;
            if reply.status != StatusCode::OK {
                return Err(ApiError::status("listing namespaces", &reply));
            }
            let page: NamespaceList = serde_json::from_slice(&reply.body).map_err(|e| {
                ApiError::new(
                    "json",
                    format!("the namespace list is not a NamespaceList: {e}"),
                )
            })?;
            for item in page.items {
                if item.terminating() {
                    debug!(namespace = %item.metadata.name, "terminating, skipped");
                } else if valid_namespace(&item.metadata.name) {
                    names.push(item.metadata.name);
                } else {
                    debug!(namespace = ?item.metadata.name, "not a namespace name, skipped");
                }
            }
            if page.metadata.cont.is_empty() {
                return Ok((names, page.metadata.resource_version));
            }
            cont = page.metadata.cont;
        }
        Err(ApiError::new(
            "pages",
            format!("the namespace list did not end within {MAX_PAGES} pages"),
        ))
    }

    /// List, then write the ConfigMap wherever it differs. `Ok` when the list worked: the
    /// resourceVersion to watch from and whether every namespace was written.
    async fn sync(&mut self, pem: &str) -> Result<(String, bool), ApiError> {
        let (namespaces, resource_version) = self.list().await?;
        let (mut written, mut unchanged, mut failed) = (0usize, 0usize, 0usize);
        for ns in &namespaces {
            match self.ensure(ns, pem).await {
                Ok(Outcome::Unchanged) => unchanged += 1,
                Ok(_) => written += 1,
                Err(e) => {
                    failed += 1;
                    self.failed(ns, &e);
                }
            }
        }
        if written > 0 || failed > 0 {
            info!(
                namespaces = namespaces.len(),
                written, unchanged, failed, "bundle ConfigMaps synced"
            );
        } else {
            debug!(namespaces = namespaces.len(), "bundle ConfigMaps current");
        }
        Ok((resource_version, failed == 0))
    }

    /// Create or update the ConfigMap in `ns` so that it holds `pem`.
    async fn ensure(&mut self, ns: &str, pem: &str) -> Result<Outcome, ApiError> {
        let collection = format!("/api/v1/namespaces/{ns}/configmaps");
        let object = format!("{collection}/{}", self.name);
        for _ in 0..CONFLICT_ATTEMPTS {
            let reply = self
                .conn
                .call(&self.api, Method::GET, &object, None, MAX_OBJECT)
                .await?;
            match reply.status {
                StatusCode::NOT_FOUND => {
                    let body = json!({
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {
                            "name": self.name,
                            "namespace": ns,
                            "labels": { MANAGED_BY_LABEL: MANAGED_BY },
                        },
                        "data": { BUNDLE_KEY: pem },
                    });
                    let reply = self
                        .conn
                        .call(
                            &self.api,
                            Method::POST,
                            &collection,
                            Some(&body),
                            MAX_OBJECT,
                        )
                        .await?;
                    match reply.status {
                        StatusCode::CREATED | StatusCode::OK => {
                            (self.count)("created");
                            info!(namespace = %ns, configmap = %self.name, "bundle ConfigMap created");
                            return Ok(Outcome::Created);
                        }
                        // Someone created it since the read: read it again.
                        StatusCode::CONFLICT => (self.count)("conflict"),
                        _ => return Err(ApiError::status("creating the ConfigMap", &reply)),
                    }
                }
                StatusCode::OK => {
                    let current: Value = serde_json::from_slice(&reply.body).map_err(|e| {
                        ApiError::new("json", format!("the ConfigMap is not JSON: {e}"))
                    })?;
                    if current
                        .pointer(&format!("/data/{BUNDLE_KEY}"))
                        .and_then(Value::as_str)
                        == Some(pem)
                    {
                        return Ok(Outcome::Unchanged);
                    }
                    let version = serde_json::from_value::<Object>(current.clone())
                        .map(|o| o.metadata.resource_version)
                        .unwrap_or_default();
                    if version.is_empty() {
                        return Err(ApiError::new(
                            "json",
                            "the ConfigMap read has no metadata.resourceVersion",
                        ));
                    }
                    let Some(next) = updated_configmap(current, pem) else {
                        return Err(ApiError::new("json", "the ConfigMap read is not an object"));
                    };
                    let reply = self
                        .conn
                        .call(&self.api, Method::PUT, &object, Some(&next), MAX_OBJECT)
                        .await?;
                    match reply.status {
                        StatusCode::OK | StatusCode::CREATED => {
                            (self.count)("updated");
                            info!(
                                namespace = %ns,
                                configmap = %self.name,
                                resource_version = %version,
                                "bundle ConfigMap updated"
                            );
                            return Ok(Outcome::Updated);
                        }
                        // Changed (or deleted) since the read: read it again.
                        StatusCode::CONFLICT => (self.count)("conflict"),
                        StatusCode::NOT_FOUND => {}
                        _ => return Err(ApiError::status("updating the ConfigMap", &reply)),
                    }
                }
                _ => return Err(ApiError::status("reading the ConfigMap", &reply)),
            }
            debug!(
                namespace = %ns,
                "bundle ConfigMap changed under the write, reading it again"
            );
        }
        Err(ApiError::new(
            "conflict",
            format!("the ConfigMap kept changing under {CONFLICT_ATTEMPTS} writes"),
        ))
    }
}

fn log_failure(throttle: &Throttle, op: &str, ns: Option<&str>, e: &ApiError) {
    let key = format!("{op}|{}", e.kind);
    let at = ns
        .map(|ns| format!(" in namespace {ns}"))
        .unwrap_or_default();
    match throttle.check(&key, std::time::Instant::now()) {
        Verdict::Log { suppressed: 0 } => {
            warn!("bundle ConfigMap {op}{at} failed, retrying: {}", e.detail)
        }
        Verdict::Log { suppressed } => warn!(
            suppressed,
            "bundle ConfigMap {op}{at} failed, retrying: {} ({suppressed} more like this before)",
            e.detail
        ),
        Verdict::Quiet => debug!("bundle ConfigMap {op}{at} failed: {}", e.detail),
    }
}

/// Watch the matching namespaces from `resource_version` on, reconnecting from the last
/// version seen, until the receiver is gone or the version is too old ([`Event::Relist`]).
async fn watch_namespaces(
    api: Arc<Api>,
    selector: String,
    mut resource_version: String,
    events: mpsc::Sender<Event>,
    throttle: Arc<Throttle>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        match watch_once(&api, &selector, &mut resource_version, &events).await {
            Ok(WatchEnd::Closed) => {}
            Ok(WatchEnd::Gone) => {
                let _ = events.send(Event::Relist).await;
                return;
            }
            Ok(WatchEnd::Receiver) => return,
            Err(e) => log_failure(&throttle, "watch", None, &e),
        }
        // A watch that ran a while was healthy: the next one starts soon.
        if started.elapsed() > Duration::from_secs(30) {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

enum WatchEnd {
    /// The server ended the stream (its timeout, a restart): go on from the last version.
    Closed,
    /// 410 Gone: the version is too old to go on from.
    Gone,
    /// The publisher stopped.
    Receiver,
}

#[derive(Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    object: Value,
}

async fn watch_once(
    api: &Api,
    selector: &str,
    resource_version: &mut String,
    events: &mpsc::Sender<Event>,
) -> Result<WatchEnd, ApiError> {
    let seconds = WATCH_SECONDS.to_string();
    let mut query = vec![
        ("labelSelector", selector),
        ("watch", "true"),
        ("allowWatchBookmarks", "true"),
        ("timeoutSeconds", &seconds),
    ];
    if !resource_version.is_empty() {
        query.push(("resourceVersion", resource_version.as_str()));
    }
    let path = namespaces_path(&query);
    let request = api.request(Method::GET, &path, None).await?;
    let start = async {
        let mut sender = api.connect().await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ApiError::new("http", format!("watching namespaces: {e}")))?;
        Ok::<_, ApiError>((sender, response))
    };
    let (_sender, response) = tokio::time::timeout(TIMEOUT, start).await.map_err(|_| {
        ApiError::new(
            "timeout",
            format!("no answer to the watch within {TIMEOUT:?}"),
        )
    })??;
    let status = response.status();
    if status != StatusCode::OK {
        let body = tokio::time::timeout(
            TIMEOUT,
            Limited::new(response.into_body(), MAX_EVENT).collect(),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| b.to_bytes())
        .unwrap_or_default();
        if status == StatusCode::GONE {
            return Ok(WatchEnd::Gone);
        }
        return Err(ApiError::status(
            "watching namespaces",
            &Reply { status, body },
        ));
    }
    let mut body = response.into_body();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let frame = match tokio::time::timeout(WATCH_IDLE, body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    "watch_idle",
                    format!("the namespace watch was silent for {WATCH_IDLE:?}"),
                ));
            }
            Ok(None) => return Ok(WatchEnd::Closed),
            Ok(Some(Err(e))) => {
                return Err(ApiError::new(
                    "read",
                    format!("reading the namespace watch: {e}"),
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        // Events are JSON objects one after the other (newline-separated, as the API server
        // writes them; not relied on).
        let mut parsed = Vec::new();
        let mut stream = serde_json::Deserializer::from_slice(&buf).into_iter::<WatchEvent>();
        let mut consumed = 0;
        loop {
            match stream.next() {
                Some(Ok(event)) => {
                    consumed = stream.byte_offset();
                    parsed.push(event);
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    return Err(ApiError::new(
                        "json",
                        format!("a watch event is not JSON: {e}"),
                    ));
                }
                None => {
                    consumed = stream.byte_offset();
                    break;
                }
            }
        }
        buf.drain(..consumed);
        if buf.len() > MAX_EVENT {
            return Err(ApiError::new(
                "too_large",
                format!("a watch event is over {MAX_EVENT} bytes"),
            ));
        }
        for event in parsed {
            let meta = serde_json::from_value::<Object>(event.object.clone())
                .unwrap_or_default()
                .metadata;
            match event.kind.as_str() {
                "ADDED" | "MODIFIED" => {
                    if !meta.resource_version.is_empty() {
                        *resource_version = meta.resource_version;
                    }
                    if valid_namespace(&meta.name)
                        && events.send(Event::Namespace(meta.name)).await.is_err()
                    {
                        return Ok(WatchEnd::Receiver);
                    }
                }
                "BOOKMARK" => {
                    if !meta.resource_version.is_empty() {
                        *resource_version = meta.resource_version;
                    }
                }
                "DELETED" => {
                    if !meta.resource_version.is_empty() {
                        *resource_version = meta.resource_version;
                    }
                }
                "ERROR" => {
                    if event.object.get("code").and_then(Value::as_u64) == Some(410) {
                        return Ok(WatchEnd::Gone);
                    }
                    let message = event
                        .object
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("no message");
                    return Err(ApiError::new(
                        "watch_error",
                        format!("the namespace watch ended with an error: {message}"),
                    ));
                }
                other => debug!(kind = other, "unknown watch event, ignored"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_names_are_checked() {
        assert!(valid_selector("meshid.io/inject=enabled"));
        assert!(valid_selector("env in (prod, staging),!legacy"));
        assert!(valid_selector("kubernetes.io/metadata.name"));
        assert!(!valid_selector(""));
        assert!(!valid_selector("  "));
        assert!(!valid_selector("a=b&watch=true"));
        assert!(!valid_selector("a=b\n"));
        assert!(valid_subdomain("meshid-bundle"));
        assert!(valid_subdomain("meshid.bundle"));
        assert!(!valid_subdomain("Meshid"));
        assert!(!valid_subdomain("-x"));
        assert!(!valid_subdomain("a/b"));
        assert!(valid_namespace("shop"));
        assert!(!valid_namespace("a.b"));
        assert!(!valid_namespace("../etc"));
        assert!(!valid_namespace(&"a".repeat(64)));
    }

    #[test]
    fn an_update_keeps_what_others_put_in_the_configmap() {
        let read = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "meshid-bundle", "namespace": "shop", "resourceVersion": "7",
                         "labels": {"team": "shop"}, "managedFields": [{"manager": "kubectl"}]},
            "data": {"bundle.pem": "stale", "other": "kept"},
        });
        let next = updated_configmap(read, "PEM").unwrap();
        assert_eq!(next["data"]["bundle.pem"], "PEM");
        assert_eq!(next["data"]["other"], "kept");
        assert_eq!(next["metadata"]["resourceVersion"], "7");
        assert_eq!(next["metadata"]["labels"]["team"], "shop");
        assert_eq!(next["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
        assert!(next["metadata"].get("managedFields").is_none());

        let bare = json!({"metadata": {"name": "x", "resourceVersion": "1", "labels": null}, "data": null});
        let next = updated_configmap(bare, "PEM").unwrap();
        assert_eq!(next["data"]["bundle.pem"], "PEM");
        let other = json!({"metadata": {"labels": {MANAGED_BY_LABEL: "helm"}}});
        assert_eq!(
            updated_configmap(other, "PEM").unwrap()["metadata"]["labels"][MANAGED_BY_LABEL],
            "helm"
        );
        assert!(updated_configmap(json!({"metadata": {}, "data": "x"}), "PEM").is_none());
        assert!(updated_configmap(json!([]), "PEM").is_none());
    }
}
