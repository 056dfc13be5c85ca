//! A fake Kubernetes API server that speaks the real wire format, for what no API server can
//! run here: TokenReview (Kubernetes attestation) and the CA's cluster store (Secrets,
//! ConfigMaps and `coordination.k8s.io/v1` Leases).
//!
//! What it does as the API server does: HTTPS with a cluster CA of its own; bearer
//! authentication (401 `Status` otherwise); namespaced collections with `get`, `list` (with
//! equality label selectors), `create` (409 `AlreadyExists`), `replace` (a `resourceVersion`
//! sent must be the current one: 409 `Conflict` otherwise; none sent is an unconditional
//! update; 404 when the object is gone); one `resourceVersion` counter for every object; watches
//! (`watch=true&resourceVersion=N`) that replay the events after N and then stream new ones,
//! one JSON `WatchEvent` a line on a chunked response, ended by `timeoutSeconds`.
//!
//! What it does not model: RBAC (every authenticated request may do anything), field
//! selectors, `DELETE`, `PATCH`, server-side apply, pagination (`limit`/`continue`), watch
//! bookmarks, compaction (a watch from an old version is never answered 410 Gone), admission,
//! and object size limits.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

/// The bearer token the CA authenticates with.
pub const CA_CREDENTIAL: &str = "the-ca-service-account-token";

/// What the fake knows about each ServiceAccount token: username and audiences.
pub type Tokens = HashMap<String, (String, Vec<String>)>;

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// An object's place: (resource, namespace, name), e.g. ("secrets", "meshid", "meshid-ca-keys").
type Key = (String, String, String);

struct Watcher {
    resource: String,
    namespace: String,
    selector: String,
    tx: mpsc::UnboundedSender<Bytes>,
}

/// Everything the fake holds, and what the test makes it do.
#[derive(Default)]
pub struct Cluster {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every event, for watches that start in the past: (resourceVersion, key, event).
    events: Vec<(u64, Key, Value)>,
    watchers: Vec<Watcher>,
    pub tokens: Tokens,
    /// Answer everything with 503 and end every watch: the API server away.
    pub down: bool,
    /// 409 answers sent: (resource/name, reason).
    pub conflicts: Vec<(String, String)>,
    /// Requests answered, by method and resource.
    pub requests: BTreeMap<String, u64>,
    /// The first GETs of this object wait until as many as the barrier counts have arrived
    /// (two replicas that start at once both see an empty store).
    pub get_barrier: Option<(String, Arc<tokio::sync::Barrier>)>,
}

pub type Shared = Arc<Mutex<Cluster>>;

impl Cluster {
    /// An object as stored.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.objects
            .get(&(resource.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// The names of the objects of `resource` in `namespace`.
    pub fn names(&self, resource: &str, namespace: &str) -> Vec<String> {
        self.objects
            .keys()
            .filter(|(r, ns, _)| r == resource && ns == namespace)
            .map(|(_, _, n)| n.clone())
            .collect()
    }

    /// Go away (answer 503, end every watch) or come back.
    pub fn set_down(&mut self, down: bool) {
        self.down = down;
        if down {
            self.watchers.clear();
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, rv: u64, key: Key, kind: &str, object: &Value) {
        let event = json!({"type": kind, "object": object});
        let line = Bytes::from(format!("{event}\n"));
        self.watchers.retain(|w| {
            if w.resource != key.0
                || w.namespace != key.1
                || !matches(&w.selector, &object["metadata"]["labels"])
            {
                return !w.tx.is_closed();
            }
            w.tx.send(line.clone()).is_ok()
        });
        self.events.push((rv, key, event));
    }
}

/// Equality-based label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated), as
/// the API server evaluates them.
pub fn matches(selector: &str, labels: &Value) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .all(|req| {
            let label = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
            if let Some((k, v)) = req.split_once("!=") {
                label(k) != Some(v.trim())
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                label(k) == Some(v.trim())
            } else if let Some(k) = req.strip_prefix('!') {
                label(k).is_none()
            } else {
                label(req).is_some()
            }
        })
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    /// The cluster CA (PEM), as `--k8s-api-ca` takes it.
    pub ca_pem: PathBuf,
    /// A file holding [`CA_CREDENTIAL`], as `--k8s-api-token-file` takes it.
    pub token_file: PathBuf,
    pub cluster: Shared,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeApiServer {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The flags that point `meshid ca` at this API server.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--k8s-api".into(),
            self.url(),
            "--k8s-api-ca".into(),
            self.ca_pem.display().to_string(),
            "--k8s-api-token-file".into(),
            self.token_file.display().to_string(),
        ]
    }
}

/// An HTTPS server on loopback with a cluster CA and an API server certificate for 127.0.0.1,
/// as kubeadm would make them, answering every request with `handler`: (its address, the
/// cluster CA's PEM file in `dir`, the task).
pub async fn serve_tls<H, F>(
    dir: &Path,
    handler: H,
) -> (SocketAddr, PathBuf, tokio::task::JoinHandle<()>)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<Body>, hyper::Error>> + Send + 'static,
{
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ])
    .unwrap()
    .signed_by(&key, &issuer)
    .unwrap();
    let ca_pem = dir.join("k8s-ca.crt");
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(handler);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, ca_pem, task)
}

/// Start the fake on loopback, with its files in `dir`.
pub async fn start(dir: &Path, tokens: Tokens) -> FakeApiServer {
    let token_file = dir.join("k8s-token");
    std::fs::write(&token_file, CA_CREDENTIAL).unwrap();
    let cluster = Shared::default();
    cluster.lock().unwrap().tokens = tokens;
    let shared = cluster.clone();
    let (addr, ca_pem, task) = serve_tls(dir, move |req| handle(req, shared.clone())).await;
    FakeApiServer {
        addr,
        ca_pem,
        token_file,
        cluster,
        _task: task,
    }
}

pub fn reply(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .unwrap()
}

pub fn status(code: StatusCode, reason: &str, message: &str, details: Value) -> Response<Body> {
    reply(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "details": details, "code": code.as_u16()}),
    )
}

pub fn not_found(resource: &str, name: &str) -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
        json!({"name": name, "kind": resource}),
    )
}

/// The kind and apiVersion of the objects of a collection.
fn kind_of(resource: &str) -> Option<(&'static str, &'static str)> {
    match resource {
        "secrets" => Some(("Secret", "v1")),
        "configmaps" => Some(("ConfigMap", "v1")),
        "leases" => Some(("Lease", "coordination.k8s.io/v1")),
        _ => None,
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

async fn handle(req: Request<Incoming>, cluster: Shared) -> Result<Response<Body>, hyper::Error> {
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {CA_CREDENTIAL}"));
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let body = req.into_body().collect().await?.to_bytes();
    if !authorized {
        return Ok(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
            json!({}),
        ));
    }
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    // Namespaced collections of the core group and of coordination.k8s.io/v1.
    let (ns, resource, name) = match segments.as_slice() {
        [
            "api",
            "v1",
            "namespaces",
            ns,
            r @ ("secrets" | "configmaps"),
        ] => (*ns, *r, None),
        [
            "api",
            "v1",
            "namespaces",
            ns,
            r @ ("secrets" | "configmaps"),
            name,
        ] => (*ns, *r, Some(*name)),
        [
            "apis",
            "coordination.k8s.io",
            "v1",
            "namespaces",
            ns,
            "leases",
        ] => (*ns, "leases", None),
        [
            "apis",
            "coordination.k8s.io",
            "v1",
            "namespaces",
            ns,
            "leases",
            name,
        ] => (*ns, "leases", Some(*name)),
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] if method == Method::POST => {
            let tokens = cluster.lock().unwrap().tokens.clone();
            return Ok(review(&body, &tokens));
        }
        _ => {
            return Ok(status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
                json!({}),
            ));
        }
    };
    // Two replicas starting at once: both read the empty store before either writes.
    let barrier = {
        let c = cluster.lock().unwrap();
        match (&c.get_barrier, name) {
            (Some((n, b)), Some(name)) if method == Method::GET && n == name => Some(b.clone()),
            _ => None,
        }
    };
    if let Some(b) = barrier {
        let _ = tokio::time::timeout(Duration::from_secs(10), b.wait()).await;
        // Once: later reads go through.
        cluster.lock().unwrap().get_barrier = None;
    }
    let mut c = cluster.lock().unwrap();
    if c.down {
        return Ok(status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
            json!({}),
        ));
    }
    *c.requests
        .entry(format!("{method} {resource}"))
        .or_default() += 1;
    Ok(match (&method, name) {
        (&Method::GET, None) if query.get("watch").map(String::as_str) == Some("true") => {
            watch(&mut c, resource, ns, &query)
        }
        (&Method::GET, None) => list(&c, resource, ns, &query),
        (&Method::GET, Some(name)) => match c.get(resource, ns, name) {
            Some(o) => reply(StatusCode::OK, &o),
            None => not_found(resource, name),
        },
        (&Method::POST, None) => create(&mut c, resource, ns, &body),
        (&Method::PUT, Some(name)) => replace(&mut c, resource, ns, name, &body),
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            json!({}),
        ),
    })
}

fn list(c: &Cluster, resource: &str, ns: &str, query: &HashMap<String, String>) -> Response<Body> {
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    let items: Vec<&Value> = c
        .objects
        .iter()
        .filter(|((r, n, _), o)| {
            r == resource && n == ns && matches(&selector, &o["metadata"]["labels"])
        })
        .map(|(_, o)| o)
        .collect();
    let (kind, api_version) = kind_of(resource).unwrap();
    reply(
        StatusCode::OK,
        &json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                "metadata": {"resourceVersion": c.rv.to_string()}, "items": items}),
    )
}

/// A watch from `resourceVersion` on: the events since then, then live ones, one JSON object
/// a line on a chunked response, until `timeoutSeconds` pass with no event.
fn watch(
    c: &mut Cluster,
    resource: &str,
    ns: &str,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1800u64);
    let (tx, rx) = mpsc::unbounded_channel();
    for (rv, (r, n, _), event) in &c.events {
        if *rv > from
            && r == resource
            && n == ns
            && matches(&selector, &event["object"]["metadata"]["labels"])
        {
            tx.send(Bytes::from(format!("{event}\n"))).unwrap();
        }
    }
    c.watchers.push(Watcher {
        resource: resource.into(),
        namespace: ns.into(),
        selector,
        tx,
    });
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .timeout(Duration::from_secs(timeout))
        .map_while(Result::ok)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(StreamBody::new(stream).boxed_unsync())
        .unwrap()
}

fn create(c: &mut Cluster, resource: &str, ns: &str, body: &[u8]) -> Response<Body> {
    let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON", json!({}));
    };
    let (kind, api_version) = kind_of(resource).unwrap();
    if object["kind"] != kind || object["apiVersion"] != api_version {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("the object is not a {api_version} {kind}"),
            json!({}),
        );
    }
    let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            &format!(
                "{kind} is invalid: metadata.name: Required value: name or generateName is required"
            ),
            json!({"kind": kind}),
        );
    };
    if object["metadata"].get("namespace").is_some_and(|n| n != ns) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
            json!({}),
        );
    }
    if object["metadata"].get("resourceVersion").is_some() {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            &format!(
                "{kind} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: must not be set on create"
            ),
            json!({"name": name, "kind": kind}),
        );
    }
    let key: Key = (resource.into(), ns.into(), name.clone());
    if c.objects.contains_key(&key) {
        c.conflicts
            .push((format!("{resource}/{name}"), "AlreadyExists".into()));
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{resource} \"{name}\" already exists"),
            json!({"name": name, "kind": resource}),
        );
    }
    let rv = c.next_rv();
    object["metadata"]["namespace"] = ns.into();
    object["metadata"]["uid"] = format!("uid-{rv}").into();
    object["metadata"]["resourceVersion"] = rv.to_string().into();
    object["metadata"]["creationTimestamp"] = now_rfc3339().into();
    c.objects.insert(key.clone(), object.clone());
    c.emit(rv, key, "ADDED", &object);
    reply(StatusCode::CREATED, &object)
}

fn replace(c: &mut Cluster, resource: &str, ns: &str, name: &str, body: &[u8]) -> Response<Body> {
    let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON", json!({}));
    };
    if object["metadata"]["name"] != name {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the name of the object does not match the name on the URL",
            json!({}),
        );
    }
    let key: Key = (resource.into(), ns.into(), name.into());
    let Some(current) = c.objects.get(&key).cloned() else {
        return not_found(resource, name);
    };
    let sent = object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // Without a resourceVersion, Secrets, ConfigMaps and Leases take an unconditional update.
    if !sent.is_empty() && current["metadata"]["resourceVersion"] != sent.as_str() {
        c.conflicts
            .push((format!("{resource}/{name}"), "Conflict".into()));
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
            json!({"name": name, "kind": resource}),
        );
    }
    let rv = c.next_rv();
    object["metadata"]["namespace"] = ns.into();
    object["metadata"]["resourceVersion"] = rv.to_string().into();
    object["metadata"]["uid"] = current["metadata"]["uid"].clone();
    object["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
    c.objects.insert(key.clone(), object.clone());
    c.emit(rv, key, "MODIFIED", &object);
    reply(StatusCode::OK, &object)
}

/// The API server's TokenReview behaviour, as far as the CA can observe it.
fn review(body: &[u8], tokens: &Tokens) -> Response<Body> {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if body["apiVersion"] != "authentication.k8s.io/v1" || body["kind"] != "TokenReview" {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "not a TokenReview",
            json!({}),
        );
    }
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> =
        serde_json::from_value(body["spec"]["audiences"].clone()).unwrap_or_default();
    let status = match tokens.get(token) {
        None => {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
        }
        Some((user, auds)) => {
            let common: Vec<&String> = auds.iter().filter(|a| wanted.contains(a)).collect();
            if common.is_empty() {
                json!({"authenticated": false, "error": format!(
                    "[invalid bearer token, token audiences {auds:?} is invalid for the target audiences {wanted:?}]")})
            } else {
                json!({"authenticated": true, "audiences": common,
                       "user": {"username": user, "uid": "0b7c1d1e", "groups": ["system:serviceaccounts"]}})
            }
        }
    };
    reply(
        StatusCode::CREATED,
        &json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {}, "spec": body["spec"], "status": status}),
    )
}
