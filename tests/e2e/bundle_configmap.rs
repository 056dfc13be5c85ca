//! The CA publishes its trust bundle as a ConfigMap in every namespace a label selector
//! matches. No API server can run here, so the real `meshid ca serve` talks to a fake that
//! speaks the real wire format: HTTPS with its own cluster CA, bearer authentication,
//! `NamespaceList` pages with `continue`, label selectors, a namespace watch (JSON events from
//! a resourceVersion on), ConfigMaps with `resourceVersion` and optimistic concurrency, and
//! `Status` objects for 404, 409 and 500.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::fake_k8s::{Body, matches, not_found, now_rfc3339, reply, status};
use crate::support::{Ca, http_get, meshid, run_ok, stderr};

use crate::fake_k8s::CA_CREDENTIAL;
const INJECT: &str = "meshid.io/inject";
const SELECTOR: &str = "meshid.io/inject=enabled";
const NAME: &str = "meshid-bundle";
const STALE: &str = "-----BEGIN CERTIFICATE-----\nc3RhbGU=\n-----END CERTIFICATE-----\n";

/// The part of a cluster the CA can see, and what the test makes the fake do.
#[derive(Default)]
struct Cluster {
    rv: u64,
    namespaces: BTreeMap<String, Value>,
    configmaps: BTreeMap<(String, String), Value>,
    /// Namespace watch events by resourceVersion, for watches that start in the past.
    events: Vec<(u64, Value)>,
    watchers: Vec<(String, mpsc::UnboundedSender<Bytes>)>,
    /// Answer this many requests with 500.
    fail_next: u32,
    /// Answer everything with 500 (and end every watch).
    failing: bool,
    /// Another writer changes the object just before the next PUT lands.
    race_next_put: bool,
    server_errors: u32,
    unauthorized: u32,
    /// The resourceVersion every PUT carried.
    put_versions: Vec<String>,
    posts: Vec<String>,
}

type Shared = Arc<Mutex<Cluster>>;

impl Cluster {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn add_namespace(&mut self, name: &str, labels: &[(&str, &str)]) {
        let rv = self.next_rv();
        let mut l = serde_json::Map::new();
        l.insert("kubernetes.io/metadata.name".into(), name.into());
        for (k, v) in labels {
            l.insert((*k).into(), (*v).into());
        }
        let ns = json!({
            "metadata": {
                "name": name, "uid": format!("ns-uid-{rv}"), "resourceVersion": rv.to_string(),
                "creationTimestamp": now_rfc3339(), "labels": l,
                "managedFields": [{"manager": "kubectl-create", "operation": "Update", "apiVersion": "v1",
                                   "time": now_rfc3339(), "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}],
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        });
        self.namespaces.insert(name.into(), ns.clone());
        let mut object = ns;
        object["kind"] = "Namespace".into();
        object["apiVersion"] = "v1".into();
        let event = json!({"type": "ADDED", "object": object});
        let line = Bytes::from(format!("{event}\n"));
        self.watchers.retain(|(selector, tx)| {
            !matches(selector, &event["object"]["metadata"]["labels"])
                || tx.send(line.clone()).is_ok()
        });
        self.events.push((rv, event));
    }

    fn seed_configmap(&mut self, ns: &str, data: Value) -> String {
        let rv = self.next_rv().to_string();
        let cm = json!({
            "kind": "ConfigMap", "apiVersion": "v1",
            "metadata": {"name": NAME, "namespace": ns, "uid": "cm-uid-seed", "resourceVersion": rv,
                         "creationTimestamp": now_rfc3339(), "labels": {"team": ns}},
            "data": data,
        });
        self.configmaps.insert((ns.into(), NAME.into()), cm);
        rv
    }

    fn configmap(&self, ns: &str) -> Option<Value> {
        self.configmaps.get(&(ns.into(), NAME.into())).cloned()
    }
}

struct FakeApiServer {
    addr: SocketAddr,
    ca_pem: PathBuf,
    _task: tokio::task::JoinHandle<()>,
}

async fn fake_api_server(dir: &Path, cluster: Shared) -> FakeApiServer {
    let (addr, ca_pem, task) =
        crate::fake_k8s::serve_tls(dir, move |req| handle(req, cluster.clone())).await;
    FakeApiServer {
        addr,
        ca_pem,
        _task: task,
    }
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
    let mut c = cluster.lock().unwrap();
    if !authorized {
        c.unauthorized += 1;
        return Ok(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
            json!({}),
        ));
    }
    if c.failing || c.fail_next > 0 {
        c.fail_next = c.fail_next.saturating_sub(1);
        c.server_errors += 1;
        return Ok(status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: etcdserver: request timed out",
            json!({}),
        ));
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    Ok(match (&method, segments.as_slice()) {
        (&Method::GET, ["api", "v1", "namespaces"])
            if query.get("watch").map(String::as_str) == Some("true") =>
        {
            watch(&mut c, &query)
        }
        (&Method::GET, ["api", "v1", "namespaces"]) => list(&c, &query),
        (_, ["api", "v1", "namespaces", ns, "configmaps", ..])
            if !c.namespaces.contains_key(*ns) =>
        {
            not_found("namespaces", ns)
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            match c.configmaps.get(&((*ns).into(), (*name).into())) {
                Some(cm) => reply(StatusCode::OK, cm),
                None => not_found("configmaps", name),
            }
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, "configmaps"]) => create(&mut c, ns, &body),
        (&Method::PUT, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            update(&mut c, ns, name, &body)
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
            json!({}),
        ),
    })
}

/// Matching namespaces, one a page: the API server may return fewer than `limit`, with
/// `continue` set when more remain.
fn list(c: &Cluster, query: &HashMap<String, String>) -> Response<Body> {
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    let matching: Vec<&Value> = c
        .namespaces
        .values()
        .filter(|ns| matches(&selector, &ns["metadata"]["labels"]))
        .collect();
    let start: usize = query
        .get("continue")
        .map(|t| t.strip_prefix("page-").unwrap().parse().unwrap())
        .unwrap_or(0);
    assert!(
        query
            .get("limit")
            .is_some_and(|l| l.parse::<u32>().unwrap() > 0)
    );
    let items: Vec<&Value> = matching.iter().skip(start).take(1).copied().collect();
    let mut metadata = json!({"resourceVersion": c.rv.to_string()});
    if start + 1 < matching.len() {
        metadata["continue"] = format!("page-{}", start + 1).into();
    }
    reply(
        StatusCode::OK,
        &json!({"kind": "NamespaceList", "apiVersion": "v1", "metadata": metadata, "items": items}),
    )
}

/// A watch from `resourceVersion` on: the events since then, then live ones, one JSON object
/// a line on a chunked response.
fn watch(c: &mut Cluster, query: &HashMap<String, String>) -> Response<Body> {
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = mpsc::unbounded_channel();
    for (rv, event) in &c.events {
        if *rv > from && matches(&selector, &event["object"]["metadata"]["labels"]) {
            tx.send(Bytes::from(format!("{event}\n"))).unwrap();
        }
    }
    c.watchers.push((selector, tx));
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(StreamBody::new(stream).boxed_unsync())
        .unwrap()
}

fn create(c: &mut Cluster, ns: &str, body: &[u8]) -> Response<Body> {
    let Ok(mut cm) = serde_json::from_slice::<Value>(body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON", json!({}));
    };
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["apiVersion"], "v1");
    let name = cm["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if cm["metadata"].get("namespace").is_some_and(|n| n != ns) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
            json!({}),
        );
    }
    if c.configmaps.contains_key(&(ns.into(), name.clone())) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("configmaps \"{name}\" already exists"),
            json!({"name": name, "kind": "configmaps"}),
        );
    }
    let rv = c.next_rv();
    cm["metadata"]["namespace"] = ns.into();
    cm["metadata"]["uid"] = format!("cm-uid-{rv}").into();
    cm["metadata"]["resourceVersion"] = rv.to_string().into();
    cm["metadata"]["creationTimestamp"] = now_rfc3339().into();
    c.posts.push(ns.into());
    c.configmaps.insert((ns.into(), name), cm.clone());
    reply(StatusCode::CREATED, &cm)
}

fn update(c: &mut Cluster, ns: &str, name: &str, body: &[u8]) -> Response<Body> {
    let Ok(mut cm) = serde_json::from_slice::<Value>(body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON", json!({}));
    };
    assert_eq!(cm["metadata"]["name"], name);
    let key = (ns.to_owned(), name.to_owned());
    if !c.configmaps.contains_key(&key) {
        return not_found("configmaps", name);
    }
    if std::mem::take(&mut c.race_next_put) {
        // Someone else (kubectl annotate) wins the race.
        let rv = c.next_rv().to_string();
        let theirs = c.configmaps.get_mut(&key).unwrap();
        theirs["metadata"]["annotations"] = json!({"other-writer": "was-here"});
        theirs["metadata"]["resourceVersion"] = rv.into();
    }
    let sent = cm["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    c.put_versions.push(sent.clone());
    if sent.is_empty() {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            &format!(
                "ConfigMap \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
            ),
            json!({"name": name, "kind": "ConfigMap"}),
        );
    }
    let current = c.configmaps[&key].clone();
    if current["metadata"]["resourceVersion"] != sent.as_str() {
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on configmaps \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
            json!({"name": name, "kind": "configmaps"}),
        );
    }
    let rv = c.next_rv();
    cm["metadata"]["resourceVersion"] = rv.to_string().into();
    cm["metadata"]["uid"] = current["metadata"]["uid"].clone();
    cm["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
    c.configmaps.insert(key, cm.clone());
    reply(StatusCode::OK, &cm)
}

async fn eventually(what: &str, limit: Duration, mut ok: impl FnMut() -> bool, ca: &Ca) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what} not within {limit:?}; CA log:\n{}",
            ca.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn bundle_of(cluster: &Shared, ns: &str) -> Option<String> {
    cluster
        .lock()
        .unwrap()
        .configmap(ns)
        .and_then(|cm| cm["data"]["bundle.pem"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn the_bundle_configmap_is_kept_current_in_the_selected_namespaces() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Shared::default();
    let stale_rv = {
        let mut c = cluster.lock().unwrap();
        c.add_namespace("shop", &[(INJECT, "enabled")]);
        c.add_namespace("billing", &[(INJECT, "enabled"), ("team", "billing")]);
        c.add_namespace("kube-system", &[]);
        c.add_namespace("legacy", &[(INJECT, "disabled")]);
        let rv = c.seed_configmap("shop", json!({"bundle.pem": STALE, "extra": "kept"}));
        c.race_next_put = true;
        // The API server is not answering yet when the CA starts: the list is retried.
        c.fail_next = 2;
        rv
    };
    let api = fake_api_server(tmp.path(), cluster.clone()).await;
    let credential = tmp.path().join("ca-token");
    std::fs::write(&credential, format!("{CA_CREDENTIAL}\n")).unwrap();
    let ca = Ca::start_in(
        tmp.path().join("ca"),
        tmp.path().to_path_buf(),
        &[
            "--k8s-api",
            &format!("https://127.0.0.1:{}", api.addr.port()),
            "--k8s-api-ca",
            api.ca_pem.to_str().unwrap(),
            "--k8s-api-token-file",
            credential.to_str().unwrap(),
            "--bundle-configmap-namespace-selector",
            SELECTOR,
        ],
    )
    .await;
    let bundle = run_ok(&["ca", "bundle", "--data-dir", ca.data_dir()]).await;
    assert!(bundle.starts_with("-----BEGIN CERTIFICATE-----"));

    eventually(
        "the bundle ConfigMap in both selected namespaces",
        Duration::from_secs(10),
        || {
            bundle_of(&cluster, "shop").as_deref() == Some(&bundle)
                && bundle_of(&cluster, "billing").as_deref() == Some(&bundle)
        },
        &ca,
    )
    .await;
    {
        let c = cluster.lock().unwrap();
        assert!(c.server_errors >= 2, "the first lists failed");
        assert_eq!(c.unauthorized, 0, "every request carries the CA's token");
        assert!(c.configmap("kube-system").is_none() && c.configmap("legacy").is_none());
        // billing: created, with the label.
        let billing = c.configmap("billing").unwrap();
        assert_eq!(
            billing["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "meshid"
        );
        assert_eq!(billing["data"].as_object().unwrap().len(), 1);
        assert_eq!(c.posts, ["billing"]);
        // shop: the stale one was PUT with the resourceVersion read; another writer won the
        // first PUT (409), so it was read again and written over that writer's version, whose
        // change is kept.
        let shop = c.configmap("shop").unwrap();
        let raced = (stale_rv.parse::<u64>().unwrap() + 1).to_string();
        assert!(
            c.put_versions.len() == 2
                && c.put_versions[0] == stale_rv
                && c.put_versions[1] != stale_rv,
            "PUTs carried {:?} (stale at {stale_rv})",
            c.put_versions
        );
        assert!(c.put_versions[1].parse::<u64>().unwrap() >= raced.parse().unwrap());
        assert_eq!(shop["metadata"]["annotations"]["other-writer"], "was-here");
        assert_eq!(shop["metadata"]["labels"]["team"], "shop");
        assert_eq!(
            shop["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "meshid"
        );
        assert_eq!(shop["data"]["extra"], "kept");
        assert_eq!(shop["metadata"]["uid"], "cm-uid-seed");
    }

    // A namespace labelled later gets it from the watch, long before the periodic resync; an
    // unlabelled one does not.
    eventually(
        "the CA watching namespaces",
        Duration::from_secs(10),
        || !cluster.lock().unwrap().watchers.is_empty(),
        &ca,
    )
    .await;
    cluster
        .lock()
        .unwrap()
        .add_namespace("payments", &[(INJECT, "enabled")]);
    cluster.lock().unwrap().add_namespace("scratch", &[]);
    eventually(
        "the bundle ConfigMap in a new namespace",
        Duration::from_secs(5),
        || bundle_of(&cluster, "payments").as_deref() == Some(&bundle),
        &ca,
    )
    .await;

    // The API server fails: every request answers 500 and the watch ends. The CA keeps
    // issuing and answering its probes, and catches up once the API server is back.
    let errors_before = {
        let mut c = cluster.lock().unwrap();
        c.failing = true;
        c.watchers.clear();
        c.server_errors
    };
    eventually(
        "the CA retrying against the failing API server",
        Duration::from_secs(10),
        || cluster.lock().unwrap().server_errors >= errors_before + 2,
        &ca,
    )
    .await;
    let token = ca
        .join_token("spiffe://cluster.local/ns/shop/sa/orders", &[])
        .await;
    let (out, _) = ca.fetch(&token, "orders").await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        http_get(ca.admin_addr, "/healthz").await.map(|r| r.0),
        Some(200)
    );
    {
        let mut c = cluster.lock().unwrap();
        c.failing = false;
        c.add_namespace("orders", &[(INJECT, "enabled")]);
    }
    eventually(
        "the bundle ConfigMap once the API server is back",
        Duration::from_secs(20),
        || bundle_of(&cluster, "orders").as_deref() == Some(&bundle),
        &ca,
    )
    .await;
    assert!(cluster.lock().unwrap().configmap("scratch").is_none());

    let (code, metrics) = http_get(ca.admin_addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for line in [
        "meshid_bundle_configmap_writes_total{outcome=\"created\"} 3",
        "meshid_bundle_configmap_writes_total{outcome=\"updated\"} 1",
        "meshid_bundle_configmap_writes_total{outcome=\"conflict\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    // Failures are WARN lines, throttled: a handful, not one per retry.
    let log = ca.log();
    let warns = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("bundle ConfigMap"))
        .count();
    assert!((1..=6).contains(&warns), "{warns} WARN lines:\n{log}");
    assert!(
        !log.contains(CA_CREDENTIAL),
        "the CA's token is never logged"
    );
}

#[tokio::test]
async fn bundle_configmap_flags_are_checked_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("ca");
    let ca_file = tmp.path().join("k8s-ca.crt");
    let start = |extra: Vec<String>| {
        let mut cmd = meshid();
        cmd.env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("MESHID_K8S_API")
            .args(["ca", "serve", "--data-dir"])
            .arg(&data_dir)
            .args(extra);
        async move { cmd.output().await.unwrap() }
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let out = start(s(&["--bundle-configmap-namespace-selector", SELECTOR])).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("needs the Kubernetes API server"),
        "{}",
        stderr(&out)
    );

    let api = ["--k8s-api", "https://127.0.0.1:6443", "--k8s-api-ca"];
    let mut args = s(&api);
    args.extend(s(&[
        ca_file.to_str().unwrap(),
        "--bundle-configmap-namespace-selector",
        SELECTOR,
    ]));
    let out = start(args).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("k8s-ca.crt"), "{}", stderr(&out));

    std::fs::write(&ca_file, "not a certificate").unwrap();
    for (flags, why) in [
        (
            &[SELECTOR, "--bundle-configmap-name", "meshid-bundle"][..],
            "holds no usable CA certificate",
        ),
        (&[""][..], "not a label selector"),
        (&["a=b&watch=true"][..], "not a label selector"),
        (
            &[SELECTOR, "--bundle-configmap-name", "Bad_Name"][..],
            "not a DNS subdomain name",
        ),
    ] {
        let mut args = s(&api);
        args.extend(s(&[
            ca_file.to_str().unwrap(),
            "--bundle-configmap-namespace-selector",
        ]));
        args.extend(s(flags));
        let out = start(args).await;
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(why), "{flags:?}: {}", stderr(&out));
    }
}
