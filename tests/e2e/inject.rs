//! `meshid inject` on real multi-document YAML, the CA's admission webhook over HTTPS with the
//! AdmissionReview v1 requests an API server sends, and the sidecar answering the app's
//! kubelet probes that injection sends to its admin port.

use std::process::Stdio;

use base64::Engine;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::support::{Ca, Sidecar, SidecarPorts, echo_app, free_addr, meshid, set_child_env};

const WORKLOADS: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata: { name: orders, namespace: shop }
spec:
  selector: { matchLabels: { app: orders } }
  template:
    metadata:
      labels: { app: orders }
      annotations: { meshid.io/exclude-inbound-ports: \"9901\" }
    spec:
      serviceAccountName: orders
      containers:
        - name: app
          image: example/orders:1
          ports: [ { name: http, containerPort: 8080 } ]
          readinessProbe: { httpGet: { path: /healthz, port: http } }
---
apiVersion: v1
kind: Service
metadata: { name: orders, namespace: shop }
spec: { ports: [ { port: 8080 } ] }
---
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: db, namespace: shop }
spec:
  serviceName: db
  selector: { matchLabels: { app: db } }
  template:
    metadata: { labels: { app: db }, annotations: { meshid.io/opaque-ports: \"5432\" } }
    spec: { containers: [ { name: db, image: postgres:17 } ] }
---
apiVersion: apps/v1
kind: DaemonSet
metadata: { name: agent }
spec:
  selector: { matchLabels: { app: agent } }
  template:
    metadata: { labels: { app: agent } }
    spec: { containers: [ { name: agent, image: example/agent:1 } ] }
---
apiVersion: batch/v1
kind: CronJob
metadata: { name: report }
spec:
  schedule: \"0 * * * *\"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [ { name: report, image: example/report:1 } ]
---
apiVersion: v1
kind: Pod
metadata: { name: opted-out, annotations: { meshid.io/inject: disabled } }
spec: { containers: [ { name: c, image: example/c:1 } ] }
";

async fn inject(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = meshid()
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}

fn docs(yaml: &[u8]) -> Vec<Value> {
    serde_saphyr::from_str_multiple(std::str::from_utf8(yaml).unwrap()).unwrap()
}

fn pod_spec(doc: &Value) -> &Value {
    match doc["kind"].as_str().unwrap() {
        "Pod" => &doc["spec"],
        "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => &doc["spec"]["template"]["spec"],
    }
}

#[tokio::test]
async fn inject_adds_a_native_sidecar_to_every_kind_of_workload() {
    let out = inject(&[], WORKLOADS).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected = docs(&out.stdout);
    assert_eq!(injected.len(), 6);
    for doc in &injected {
        let kind = doc["kind"].as_str().unwrap();
        let spec = pod_spec(doc);
        let name = doc["metadata"]["name"].as_str().unwrap();
        if kind == "Service" || name == "opted-out" {
            assert!(spec["initContainers"].is_null(), "{kind} {name} untouched");
            continue;
        }
        let init = &spec["initContainers"];
        assert_eq!(init[0]["name"], "meshid-init", "{kind}");
        let caps = &init[0]["securityContext"]["capabilities"];
        assert_eq!(caps["add"], json!(["NET_ADMIN", "NET_RAW"]), "{kind}");
        assert_eq!(caps["drop"], json!(["ALL"]), "{kind}");
        let proxy = &init[1];
        assert_eq!(proxy["name"], "meshid-proxy");
        assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar: {kind}");
        assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15020);
        assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/healthz");
        let sc = &proxy["securityContext"];
        assert_eq!(sc["runAsUser"], 1337);
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert!(proxy["resources"]["requests"]["memory"].is_string());
        let volumes = spec["volumes"].as_array().unwrap();
        let token = volumes
            .iter()
            .find(|v| v["name"] == "meshid-token")
            .unwrap();
        assert_eq!(
            token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "meshid-ca"
        );
        assert!(
            volumes
                .iter()
                .any(|v| v["configMap"]["name"] == "meshid-bundle")
        );
        assert!(
            volumes
                .iter()
                .any(|v| v["name"] == "meshid-certs" && v["emptyDir"].is_object())
        );
    }
    // Annotations reached the rules and the sidecar; the app's probe goes through the sidecar.
    let orders = pod_spec(&injected[0]);
    assert!(
        orders["initContainers"][0]["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--exclude-inbound-ports=9901,15020"))
    );
    assert_eq!(
        orders["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/app-health/app/readinessProbe"
    );
    let db = pod_spec(&injected[2]);
    assert!(
        db["initContainers"][1]["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--opaque-ports=5432"))
    );
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        report.contains("document 6 (Pod opted-out): opted out"),
        "{report}"
    );
    assert!(
        report.contains("document 2 (Service shop/orders): not a workload"),
        "{report}"
    );

    // Injecting the output again changes nothing.
    let again = inject(&[], std::str::from_utf8(&out.stdout).unwrap()).await;
    assert!(again.status.success());
    assert_eq!(again.stdout, out.stdout);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already injected"));

    // The older layout, for clusters before 1.29: the app waits for the sidecar's postStart.
    let deployment = WORKLOADS.split("---\n").next().unwrap();
    let old = inject(&["--inject-native-sidecars=false"], deployment).await;
    assert!(
        old.status.success(),
        "{}",
        String::from_utf8_lossy(&old.stderr)
    );
    let old = docs(&old.stdout);
    let spec = pod_spec(&old[0]);
    assert_eq!(spec["containers"][0]["name"], "meshid-proxy");
    assert_eq!(
        spec["containers"][0]["lifecycle"]["postStart"]["exec"]["command"][1],
        "wait-ready"
    );
    // ... which a Job could never complete with: refused, with the reason.
    let old = inject(&["--inject-native-sidecars=false"], WORKLOADS).await;
    assert!(!old.status.success());
    let err = String::from_utf8_lossy(&old.stderr);
    assert!(
        err.contains("document 5 (CronJob report)") && err.contains("native sidecars"),
        "{err}"
    );
}

#[tokio::test]
async fn inject_refuses_bad_input_naming_document_and_field_and_writes_nothing() {
    for (input, want) in [
        ("kind: [unclosed\n", "not YAML"),
        (
            "apiVersion: v1\nkind: Service\nmetadata: { name: s }\n---\napiVersion: argoproj.io/v1alpha1\nkind: Rollout\nmetadata: { name: r }\n",
            "document 2 (Rollout r): kind: kind Rollout is not one meshid knows",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: { name: p }\nspec: { containers: [] }\n",
            "document 1 (Pod p): spec.containers: a pod needs at least one container",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: d }\nspec: { selector: {} }\n",
            "document 1 (Deployment d): spec.template: missing",
        ),
        ("just words\n", "not a Kubernetes object"),
    ] {
        let out = inject(&[], input).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{input:?} was accepted");
        assert!(out.stdout.is_empty(), "{input:?}: wrote {:?}", out.stdout);
        assert!(err.contains(want), "{input:?}: {err}");
    }
    let out = inject(
        &["--pass-unknown"],
        "apiVersion: argoproj.io/v1alpha1\nkind: Rollout\nmetadata: { name: r }\n",
    )
    .await;
    assert!(out.status.success(), "--pass-unknown copies it");
}

/// An AdmissionReview v1 request as the API server sends it for a pod being created.
fn review(uid: &str, namespace: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"] },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": { "apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions" },
        }
    })
}

fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "generateName": "orders-7c9f-", "namespace": "shop", "labels": { "app": "orders" }, "annotations": annotations },
        "spec": {
            "serviceAccountName": "orders",
            "containers": [ { "name": "app", "image": "example/orders:1", "ports": [ { "containerPort": 8080 } ] } ],
        },
    })
}

/// POST a body to the CA's webhook over HTTPS (curl, checking the CA's certificate against the
/// bundle, as the API server does with the webhook's caBundle): status and JSON.
fn post(ca: &Ca, bundle: &std::path::Path, body: &[u8]) -> (u16, Value) {
    let file = ca.work.join(format!("review-{}.json", free_addr().port()));
    std::fs::write(&file, body).unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(bundle)
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(format!("@{}", file.display()))
        .args(["-w", "\n%{http_code}"])
        .arg(format!("https://localhost:{}/inject", ca.http_addr.port()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (json, status) = text.rsplit_once('\n').unwrap();
    (
        status.parse().unwrap(),
        serde_json::from_str(json).unwrap_or(Value::Null),
    )
}

/// Apply the JSONPatch operations the webhook uses (`add`) to a JSON document.
fn apply(doc: &mut Value, patch: &Value) {
    for op in patch.as_array().unwrap() {
        assert_eq!(op["op"], "add", "{op}");
        let path = op["path"].as_str().unwrap();
        let (parent, last) = path.rsplit_once('/').unwrap();
        let last = last.replace("~1", "/").replace("~0", "~");
        let target = doc
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("no {parent}"));
        target[last.as_str()] = op["value"].clone();
    }
}

#[tokio::test]
async fn the_webhook_answers_admission_reviews_as_the_api_server_expects() {
    let ca = Ca::start(&[]).await;
    let bundle = ca.bundle_file().await;

    // A pod that needs the sidecar: a JSONPatch whose result is what `meshid inject` makes.
    let uid = "b6f0a7d2-3c1e-4f5a-9d8e-0c1b2a3d4e5f";
    let body = serde_json::to_vec(&review(uid, "shop", pod(json!({})))).unwrap();
    let (status, answer) = post(&ca, &bundle, &body);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], uid);
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut patched = pod(json!({}));
    apply(&mut patched, &patch);
    let by_cli = inject(&[], &serde_json::to_string(&pod(json!({}))).unwrap()).await;
    assert!(by_cli.status.success());
    assert_eq!(
        patched,
        docs(&by_cli.stdout)[0],
        "the webhook and `meshid inject` agree"
    );
    assert_eq!(
        patched["spec"]["initContainers"][1]["restartPolicy"],
        "Always"
    );

    // Opted out, and already injected: allowed, unchanged.
    for object in [
        pod(json!({ "meshid.io/inject": "disabled" })),
        patched.clone(),
    ] {
        let body = serde_json::to_vec(&review("u-2", "shop", object)).unwrap();
        let (status, answer) = post(&ca, &bundle, &body);
        assert_eq!(status, 200);
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        assert!(answer["response"].get("patch").is_none(), "{answer}");
    }
    // A pod of the control plane's namespace is never injected.
    let body = serde_json::to_vec(&review("u-3", "meshid-system", pod(json!({})))).unwrap();
    let (_, answer) = post(&ca, &bundle, &body);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    // A pod that cannot be injected: refused with the reason, in the review.
    let mut bad = pod(json!({ "meshid.io/exclude-outbound-cidrs": "10.0.0.0/33" }));
    bad["metadata"]["name"] = json!("orders-1");
    let body = serde_json::to_vec(&review("u-4", "shop", bad)).unwrap();
    let (status, answer) = post(&ca, &bundle, &body);
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("meshid.io/exclude-outbound-cidrs"),
        "{message}"
    );
    // Malformed requests: a 400 that says why, and the CA keeps serving.
    for body in [
        &b"{not json"[..],
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#,
    ] {
        let (status, answer) = post(&ca, &bundle, body);
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"].as_str().unwrap().len() > 10, "{answer}");
    }
    let (status, _) = post(
        &ca,
        &bundle,
        &serde_json::to_vec(&review("u-5", "shop", pod(json!({})))).unwrap(),
    );
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_sidecar_answers_the_apps_probes_on_its_admin_port() {
    let ca = Ca::start(&[]).await;
    let app = echo_app().await;
    let closed = free_addr();
    let probes = json!({
        "app/readinessProbe": { "port": app.port(), "path": "/healthz" },
        "app/livenessProbe": { "port": app.port(), "tcp": true },
        "gone/readinessProbe": { "port": closed.port(), "path": "/" },
    })
    .to_string();
    let probe_addr = free_addr();
    set_child_env(&[
        ("MESHID_APP_PROBES", &probes),
        ("MESHID_PROBE_ADDR", &probe_addr.to_string()),
    ]);
    let mut s = Sidecar::start(
        &ca,
        "orders",
        "spiffe://cluster.local/ns/shop/sa/orders",
        app,
        SidecarPorts::new(),
        &[],
    )
    .await;
    s.ready().await;
    let (status, body) = s.admin_get("/app-health/app/readinessProbe").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = s.admin_get("/app-health/app/livenessProbe").await.unwrap();
    assert_eq!(status, 200);
    let (status, body) = s
        .admin_get("/app-health/gone/readinessProbe")
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    let (status, _) = s
        .admin_get("/app-health/nobody/readinessProbe")
        .await
        .unwrap();
    assert_eq!(status, 404);
    set_child_env(&[]);
}

#[tokio::test]
async fn the_shop_example_is_what_inject_makes_of_its_source() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/examples/shop");
    let source = std::fs::read_to_string(format!("{dir}/app.yaml")).unwrap();
    let committed = std::fs::read_to_string(format!("{dir}/injected.yaml")).unwrap();
    let out = inject(&[], &source).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: String = committed
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        body == String::from_utf8_lossy(&out.stdout),
        "k8s/examples/shop/injected.yaml is stale: regenerate it with \
         `meshid inject -f k8s/examples/shop/app.yaml` (see its first line)"
    );
    let report = String::from_utf8_lossy(&out.stderr);
    assert_eq!(report.matches(": injected").count(), 3, "{report}");
}
