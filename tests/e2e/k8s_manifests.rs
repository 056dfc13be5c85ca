//! The Kubernetes manifests (`k8s/`) and the image definition (`Dockerfile`): every rendered
//! document validated strictly against the Kubernetes API schemas (kubernetes-validate, not
//! ours), what matters in them checked (the CA's confinement, the webhook's scope, RBAC, the
//! disruption budget, the shop example), the manifests and the Dockerfile read against each
//! other, and the real binary run as the images run it: the CA and a sidecar as the image's
//! UID with no capabilities, the init container's rules as root with NET_ADMIN and NET_RAW
//! only, each on a read-only root filesystem with one directory writable.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{echo_app, free_addr, http_get, python};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const MESHID: &str = env!("CARGO_BIN_EXE_meshid");
/// The Kubernetes versions every document must be valid for: the current release (the newest
/// schemas the pinned kubernetes-validate of tests/requirements.txt ships) and 1.34, three
/// minors back, for clusters that trail.
const KUBERNETES_VERSIONS: &[&str] = &["1.34.0", "1.37.0"];
const CONTROL_PLANE_NS: &str = "meshid-system";
/// Where injected sidecars reach the CA (`meshid inject`'s default).
const SIDECAR_CA_ADDR: &str = "meshid-ca.meshid-system.svc:8443";
const ENTRYPOINT: &str = "/usr/local/bin/meshid";

fn image() -> String {
    format!("ghcr.io/meshid/meshid:v{}", env!("CARGO_PKG_VERSION"))
}

fn init_image() -> String {
    format!("ghcr.io/meshid/meshid-init:v{}", env!("CARGO_PKG_VERSION"))
}

fn path(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Rendering, parsing, validating

/// Every kustomization under k8s/.
fn kustomizations() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        if entries.iter().any(|p| {
            matches!(
                p.file_name().and_then(|n| n.to_str()),
                Some("kustomization.yaml" | "kustomization.yml" | "Kustomization")
            )
        }) {
            out.push(dir.to_owned());
        }
        for e in entries.iter().filter(|p| p.is_dir()) {
            walk(e, out);
        }
    }
    let mut out = Vec::new();
    walk(&path("k8s"), &mut out);
    out
}

/// `kubectl kustomize DIR`.
fn render(dir: &Path) -> String {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl is installed (.ci/run installs it)");
    if !out.status.success() {
        let version = std::process::Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .map(|o| text(&o.stdout))
            .unwrap_or_default();
        panic!(
            "kubectl kustomize {}: {}\n{version}(written against kubectl 1.32 with kustomize \
             v5.5; kubectl 1.20, Debian bookworm's kubernetes-client, embeds kustomize v2.0.3, \
             which cannot read these kustomizations)",
            dir.display(),
            text(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).unwrap()
}

fn parse(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_str_multiple::<Value, Vec<Value>>(yaml)
        .expect("YAML parses")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn base() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| parse(&render(&path("k8s/base"))))
}

fn shop() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| parse(&render(&path("k8s/examples/shop"))))
}

fn file_docs(rel: &str) -> Vec<Value> {
    parse(&std::fs::read_to_string(path(rel)).unwrap())
}

/// `kubernetes-validate [--strict]` on one file, for every version of [`KUBERNETES_VERSIONS`].
/// Ok: how many documents it checked. Any document it could not check (no schema for its
/// kind and apiVersion: the validator only warns) is an error too.
fn validate(file: &Path, strict: bool) -> Result<usize, String> {
    let mut cmd = std::process::Command::new(python());
    cmd.args(["-m", "kubernetes_validate"]);
    if strict {
        cmd.arg("--strict");
    }
    for v in KUBERNETES_VERSIONS {
        cmd.args(["-k", v]);
    }
    let out = cmd
        .arg(file)
        .output()
        .expect("python runs (tests/requirements.txt has kubernetes-validate)");
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    let not_passed: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(l.starts_with("INFO ") && l.contains(" passed for resource ")))
        .collect();
    if !out.status.success() || !not_passed.is_empty() {
        return Err(format!(
            "kubernetes-validate ({}) on {}:\n{}\n{stderr}",
            out.status,
            file.display(),
            not_passed.join("\n")
        ));
    }
    let passed = stdout.lines().filter(|l| l.starts_with("INFO ")).count();
    Ok(passed / KUBERNETES_VERSIONS.len())
}

fn validate_docs(name: &str, docs: &[Value], strict: bool) -> Result<usize, String> {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join(format!("{name}.yaml"));
    // JSON is YAML: one document per object.
    let yaml: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
    std::fs::write(&file, yaml.join("\n---\n")).unwrap();
    validate(&file, strict)
}

// ---------------------------------------------------------------------------------------------
// Looking into objects

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind} {name} in the render");
    found[0]
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a Kubernetes label selector (matchLabels and matchExpressions) selects `l`.
fn selects(selector: &Value, l: &BTreeMap<String, String>) -> bool {
    let by_labels = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| l.get(k).map(String::as_str) == v.as_str());
    let by_expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap();
            let values = strings(&e["values"]);
            let value = l.get(key);
            match e["operator"].as_str().unwrap() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                op => panic!("unknown selector operator {op}"),
            }
        });
    by_labels && by_expressions
}

/// Every pod template of a workload, with what holds it.
fn pod_templates(docs: &[Value]) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    for d in docs {
        let what = format!(
            "{} {}/{}",
            d["kind"].as_str().unwrap_or("?"),
            d["metadata"]["namespace"].as_str().unwrap_or(""),
            d["metadata"]["name"].as_str().unwrap_or("?")
        );
        match d["kind"].as_str() {
            Some("Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job") => {
                out.push((what, &d["spec"]["template"]))
            }
            Some("CronJob") => out.push((what, &d["spec"]["jobTemplate"]["spec"]["template"])),
            Some("Pod") => out.push((what, d)),
            _ => {}
        }
    }
    out
}

/// Every container (init and regular) of a pod spec.
fn containers(pod_spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod_spec[*k].as_array().into_iter().flatten())
        .collect()
}

/// A security-context field as it applies to `container`: its own, else the pod's.
fn effective<'a>(pod_spec: &'a Value, container: &'a Value, key: &str) -> &'a Value {
    match &container["securityContext"][key] {
        Value::Null => &pod_spec["securityContext"][key],
        v => v,
    }
}

/// `--NAME=VALUE` flags of an args list (every value, in order).
fn flag(args: &[String], name: &str) -> Vec<String> {
    let prefix = format!("--{name}=");
    args.iter()
        .filter_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

fn the_flag(args: &[String], name: &str) -> String {
    let v = flag(args, name);
    assert_eq!(v.len(), 1, "--{name} once in {args:?}");
    v[0].clone()
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

fn ca_deployment(docs: &[Value]) -> &Value {
    find(docs, "Deployment", "meshid-ca")
}

fn ca_container(docs: &[Value]) -> &Value {
    let c: Vec<&Value> = ca_deployment(docs)["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "ca")
        .collect();
    assert_eq!(c.len(), 1, "the CA Deployment has one container named ca");
    c[0]
}

fn ca_args(docs: &[Value]) -> Vec<String> {
    strings(&ca_container(docs)["args"])
}

fn container_port(container: &Value, name: &str) -> u64 {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("container port {name}"))["containerPort"]
        .as_u64()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Every document is valid Kubernetes, and the validator really refuses what is not.

#[test]
fn every_rendered_manifest_validates_strictly_against_the_kubernetes_schemas() {
    let dirs = kustomizations();
    for want in ["k8s/base", "k8s/examples/shop"] {
        assert!(dirs.contains(&path(want)), "{want} is a kustomization");
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for dir in &dirs {
        // kubectl's YAML as it is, the text `kubectl apply` would send.
        let yaml = render(dir);
        let docs = parse(&yaml);
        assert!(!docs.is_empty(), "{} renders nothing", dir.display());
        let name = dir
            .strip_prefix(ROOT)
            .unwrap()
            .display()
            .to_string()
            .replace('/', "_");
        let file = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&file, &yaml).unwrap();
        match validate(&file, true) {
            Ok(n) => assert_eq!(n, docs.len(), "every document of {} checked", dir.display()),
            Err(e) => failures.push(e),
        }
    }
    // The generated shop workloads on their own (and their uninjected source), as
    // `kubectl apply -f` would take them.
    for rel in [
        "k8s/examples/shop/injected.yaml",
        "k8s/examples/shop/app.yaml",
    ] {
        match validate(&path(rel), true) {
            Ok(n) => assert_eq!(n, file_docs(rel).len(), "every document of {rel} checked"),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_validator_refuses_an_unknown_field_a_wrong_type_and_an_unknown_api() {
    let deployment = ca_deployment(base()).clone();
    assert_eq!(
        validate_docs("good", std::slice::from_ref(&deployment), true),
        Ok(1)
    );

    let mut bogus = deployment.clone();
    bogus["spec"]["template"]["spec"]["containers"][0]["bogus"] = json!(1);
    let err = validate_docs("bogus", &[bogus.clone()], true).unwrap_err();
    assert!(
        err.contains("did not validate") && err.contains("bogus"),
        "{err}"
    );
    // Only strict validation knows every field: without it the typo goes through, which is
    // why the manifests are checked with --strict.
    assert_eq!(validate_docs("bogus-lax", &[bogus], false), Ok(1));

    let mut wrong_type = deployment.clone();
    wrong_type["spec"]["replicas"] = json!("one");
    let err = validate_docs("wrong-type", &[wrong_type], true).unwrap_err();
    assert!(err.contains("replicas"), "{err}");

    // A kind the validator has no schema for is only a warning to it: an error here.
    let mut unknown = deployment;
    unknown["apiVersion"] = json!("apps/v1beta9");
    let err = validate_docs("unknown-api", &[unknown], true).unwrap_err();
    assert!(err.contains("WARN"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 2. What matters in the rendered control plane and the example.

#[test]
fn the_control_plane_renders_every_kind_it_needs_in_its_namespace() {
    let docs = base();
    let want: BTreeSet<String> = [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "PersistentVolumeClaim",
        "Deployment",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(kinds(docs), want);
    let cluster_scoped = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
    ];
    for d in docs {
        let kind = d["kind"].as_str().unwrap();
        if cluster_scoped.contains(&kind) {
            assert!(
                d["metadata"]["namespace"].is_null(),
                "{kind} is cluster-scoped"
            );
        } else {
            assert_eq!(d["metadata"]["namespace"], CONTROL_PLANE_NS, "{d}");
        }
    }
    let ns = find(docs, "Namespace", CONTROL_PLANE_NS);
    let ns_labels = labels(&ns["metadata"]["labels"]);
    assert_eq!(
        ns_labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("restricted"),
        "the control plane's pods meet the restricted Pod Security profile, and it is enforced"
    );
    assert!(!ns_labels.contains_key("meshid.io/inject"));
    // The CA writes the bundle ConfigMap itself.
    assert!(
        docs.iter()
            .chain(shop())
            .all(|d| d["metadata"]["name"] != "meshid-bundle"),
        "no manifest carries meshid-bundle: the CA writes it"
    );
}

#[test]
fn the_ca_runs_confined_as_the_image_user() {
    let docs = base();
    let deployment = ca_deployment(docs);
    let pod = &deployment["spec"]["template"]["spec"];
    let ca = ca_container(docs);
    assert_eq!(ca["image"], image());
    for c in containers(pod) {
        let name = c["name"].as_str().unwrap();
        assert_eq!(effective(pod, c, "runAsNonRoot"), true, "{name}");
        assert_eq!(effective(pod, c, "runAsUser"), 1337, "{name}");
        assert_eq!(effective(pod, c, "runAsGroup"), 1337, "{name}");
        assert_eq!(
            effective(pod, c, "seccompProfile")["type"],
            "RuntimeDefault",
            "{name}"
        );
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
        assert!(
            sc["capabilities"]["add"].is_null(),
            "{name} adds no capability"
        );
        assert!(sc["privileged"] != true, "{name}");
    }
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(pod[host] != true, "{host}");
    }
    assert_eq!(
        pod["securityContext"]["fsGroup"], 1337,
        "the data volume is the CA's"
    );

    // Listeners, container ports and the Service agree.
    let args = ca_args(docs);
    assert_eq!(&args[..2], ["ca", "serve"]);
    let service = find(docs, "Service", "meshid-ca");
    let pod_labels = labels(&deployment["spec"]["template"]["metadata"]["labels"]);
    assert!(
        labels(&service["spec"]["selector"])
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the Service selects the CA pods"
    );
    assert!(selects(&deployment["spec"]["selector"], &pod_labels));
    for (flag_name, port_name, port) in [
        ("grpc-addr", "grpc", 8443),
        ("http-addr", "https", 8444),
        ("admin-addr", "admin", 9090),
    ] {
        let addr = the_flag(&args, flag_name);
        assert!(
            addr.starts_with("0.0.0.0:"),
            "--{flag_name}={addr} listens on the pod's IP"
        );
        assert_eq!(port_of(&addr), port, "--{flag_name}");
        assert_eq!(
            container_port(ca, port_name),
            port,
            "containerPort {port_name}"
        );
        let sp = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == port_name)
            .unwrap_or_else(|| panic!("Service port {port_name}"));
        assert_eq!(sp["port"], port, "Service port {port_name}");
        assert_eq!(sp["targetPort"], port_name);
    }
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/healthz")] {
        assert_eq!(ca[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(ca[probe]["httpGet"]["port"], "admin", "{probe}");
    }
    let resources = &ca["resources"];
    assert!(
        resources["requests"]["cpu"].is_string() && resources["requests"]["memory"].is_string()
    );
    assert!(resources["limits"]["memory"].is_string());

    // The names sidecars and the API server (for the webhook) reach the CA by are in its
    // certificate, and the issuer is the Service's HTTPS port.
    let sans = flag(&args, "san");
    let (host, port) = SIDECAR_CA_ADDR.rsplit_once(':').unwrap();
    assert!(sans.iter().any(|s| s == host), "{sans:?}");
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"].as_u64() == port.parse().ok())
    );
    assert_eq!(host, format!("meshid-ca.{CONTROL_PLANE_NS}.svc"));
    assert_eq!(
        the_flag(&args, "issuer"),
        format!("https://meshid-ca.{CONTROL_PLANE_NS}.svc:8444")
    );

    // The data directory is the persistent volume; the policy is the ConfigMap's file.
    let mounts = ca["volumeMounts"].as_array().unwrap();
    let volume = |mount_path: &str| -> &Value {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"] == mount_path)
            .unwrap_or_else(|| panic!("a volume at {mount_path}"));
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap()
    };
    let data = volume(&the_flag(&args, "data-dir"));
    find(
        docs,
        "PersistentVolumeClaim",
        data["persistentVolumeClaim"]["claimName"].as_str().unwrap(),
    );
    let policy = the_flag(&args, "policy");
    let (dir, key) = policy.rsplit_once('/').unwrap();
    let cm_name = volume(dir)["configMap"]["name"].as_str().unwrap();
    assert_eq!(cm_name, "meshid-policy");
    let cm = find(docs, "ConfigMap", cm_name);
    assert_eq!(
        cm["data"][key].as_str().unwrap(),
        std::fs::read_to_string(path("k8s/base/policy.yaml")).unwrap()
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "meshid-ca"
    );
    find(docs, "ServiceAccount", "meshid-ca");

    // Spread over nodes when there are several.
    let term = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        [0]["podAffinityTerm"];
    assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
    assert!(selects(&term["labelSelector"], &pod_labels));
}

#[test]
fn the_disruption_budget_covers_the_ca_pods_and_nothing_else() {
    let docs = shop();
    let pdb = find(docs, "PodDisruptionBudget", "meshid-ca");
    assert_eq!(pdb["metadata"]["namespace"], CONTROL_PLANE_NS);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let selected: Vec<String> = pod_templates(docs)
        .into_iter()
        .filter(|(_, t)| selects(&pdb["spec"]["selector"], &labels(&t["metadata"]["labels"])))
        .map(|(what, _)| what)
        .collect();
    assert_eq!(
        selected,
        [format!("Deployment {CONTROL_PLANE_NS}/meshid-ca")]
    );
}

#[test]
fn the_webhook_injects_pods_of_meshed_namespaces_only_and_fails_closed() {
    let docs = shop();
    let config = find(docs, "MutatingWebhookConfiguration", "meshid-injector");
    let hooks = config["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 1);
    let hook = &hooks[0];
    assert_eq!(hook["name"], "inject.meshid.io");
    assert_eq!(
        hook["clientConfig"]["service"],
        json!({ "name": "meshid-ca", "namespace": CONTROL_PLANE_NS, "port": 8444, "path": "/inject" })
    );
    assert!(hook["clientConfig"]["url"].is_null());
    // Filled in after the CA's first start (README); not set here, so that applying the
    // manifests again keeps it.
    assert!(hook["clientConfig"]["caBundle"].is_null());
    // The Service it names exists and has that port; the CA serves HTTPS on it.
    let service = find(docs, "Service", "meshid-ca");
    assert_eq!(service["metadata"]["namespace"], CONTROL_PLANE_NS);
    let https = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == 8444)
        .expect("the Service has port 8444");
    assert_eq!(
        port_of(&the_flag(&ca_args(docs), "http-addr")),
        container_port(ca_container(docs), https["targetPort"].as_str().unwrap())
    );
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["matchPolicy"], "Equivalent");
    assert_eq!(hook["reinvocationPolicy"], "Never");
    assert_eq!(hook["timeoutSeconds"], 10);
    assert_eq!(strings(&hook["admissionReviewVersions"]), ["v1"]);
    let rules = hook["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(strings(&rules[0]["operations"]), ["CREATE"]);
    assert_eq!(strings(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strings(&rules[0]["apiVersions"]), ["v1"]);
    assert_eq!(strings(&rules[0]["resources"]), ["pods"]);

    // Which namespaces: the API server matches the selector against a namespace's labels,
    // kubernetes.io/metadata.name included (it sets that label on every namespace).
    let ns_labels = |name: &str, extra: &[(&str, &str)]| {
        let mut l: BTreeMap<String, String> = docs
            .iter()
            .find(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == name)
            .map(|d| labels(&d["metadata"]["labels"]))
            .unwrap_or_default();
        l.insert("kubernetes.io/metadata.name".into(), name.into());
        for (k, v) in extra {
            l.insert(k.to_string(), v.to_string());
        }
        l
    };
    let selector = &hook["namespaceSelector"];
    let enabled = [("meshid.io/inject", "enabled")];
    assert!(
        selects(selector, &ns_labels("shop", &[])),
        "the shop is meshed"
    );
    assert!(selects(selector, &ns_labels("payments", &enabled)));
    assert!(
        !selects(selector, &ns_labels("default", &[])),
        "unlabelled: not meshed"
    );
    assert!(!selects(
        selector,
        &ns_labels("default", &[("meshid.io/inject", "disabled")])
    ));
    for never in [CONTROL_PLANE_NS, "kube-system", "kube-public"] {
        assert!(!selects(selector, &ns_labels(never, &[])), "{never}");
        assert!(
            !selects(selector, &ns_labels(never, &enabled)),
            "{never} is never injected, even labelled (the CA could not admit its own pods)"
        );
    }
    // Which pods of a meshed namespace: all but those that opt out.
    let pod = |l: &[(&str, &str)]| -> BTreeMap<String, String> {
        l.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let objects = &hook["objectSelector"];
    assert!(selects(objects, &pod(&[])));
    assert!(selects(
        objects,
        &pod(&[("app.kubernetes.io/name", "orders")])
    ));
    assert!(!selects(objects, &pod(&[("meshid.io/inject", "disabled")])));
}

#[test]
fn rbac_grants_the_ca_exactly_what_it_does_and_no_wildcard() {
    let docs = base();
    // (scope, apiGroup, resource, verb, resourceName or "" for any)
    let mut granted: BTreeSet<(String, String, String, String, String)> = BTreeSet::new();
    for role in of_kind(docs, "ClusterRole")
        .into_iter()
        .chain(of_kind(docs, "Role"))
    {
        let scope = role["metadata"]["namespace"]
            .as_str()
            .unwrap_or("cluster")
            .to_owned();
        assert!(role["aggregationRule"].is_null());
        for rule in role["rules"].as_array().unwrap() {
            assert!(rule["nonResourceURLs"].is_null(), "{rule}");
            let names = strings(&rule["resourceNames"]);
            let names = if names.is_empty() {
                vec![String::new()]
            } else {
                names
            };
            for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                assert!(
                    !strings(&rule[field]).iter().any(|s| s.contains('*')),
                    "no wildcard in {field}: {rule}"
                );
            }
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    for v in strings(&rule["verbs"]) {
                        for n in &names {
                            granted.insert((
                                scope.clone(),
                                g.clone(),
                                r.clone(),
                                v.clone(),
                                n.clone(),
                            ));
                        }
                    }
                }
            }
        }
    }
    let mut want = BTreeSet::new();
    let mut add = |scope: &str, resource: &str, verbs: &[&str], name: &str| {
        for v in verbs {
            want.insert((
                scope.to_owned(),
                String::new(),
                resource.to_owned(),
                v.to_string(),
                name.to_owned(),
            ));
        }
    };
    add("cluster", "namespaces", &["get", "list", "watch"], "");
    add("cluster", "configmaps", &["create"], "");
    add(
        "cluster",
        "configmaps",
        &["get", "update", "patch"],
        "meshid-bundle",
    );
    add(CONTROL_PLANE_NS, "secrets", &["create"], "");
    add(
        CONTROL_PLANE_NS,
        "secrets",
        &["get", "update", "patch"],
        "meshid-ca-state",
    );
    add(CONTROL_PLANE_NS, "configmaps", &["create"], "");
    add(
        CONTROL_PLANE_NS,
        "configmaps",
        &["get", "update", "patch"],
        "meshid-bundle",
    );
    assert_eq!(granted, want);

    // Every binding: to the CA's ServiceAccount only, of a role of this render or the
    // built-in TokenReview one.
    let mut bound = BTreeSet::new();
    for b in of_kind(docs, "ClusterRoleBinding")
        .into_iter()
        .chain(of_kind(docs, "RoleBinding"))
    {
        assert_eq!(
            b["subjects"],
            json!([{ "kind": "ServiceAccount", "name": "meshid-ca", "namespace": CONTROL_PLANE_NS }]),
            "{b}"
        );
        let (kind, name) = (
            b["roleRef"]["kind"].as_str().unwrap(),
            b["roleRef"]["name"].as_str().unwrap(),
        );
        if name != "system:auth-delegator" {
            let role = find(docs, kind, name);
            assert_eq!(role["metadata"]["namespace"], b["metadata"]["namespace"]);
        }
        bound.insert(format!("{} -> {kind} {name}", b["kind"].as_str().unwrap()));
    }
    assert_eq!(
        bound,
        BTreeSet::from([
            "ClusterRoleBinding -> ClusterRole meshid-ca".to_owned(),
            "ClusterRoleBinding -> ClusterRole system:auth-delegator".to_owned(),
            "RoleBinding -> Role meshid-ca".to_owned(),
        ])
    );
}

#[test]
fn the_shop_example_is_meshed_with_unprivileged_apps_and_its_policy() {
    let docs = shop();
    // The whole control plane comes along.
    for d in base() {
        let same: Vec<&Value> = docs
            .iter()
            .filter(|s| {
                s["kind"] == d["kind"]
                    && s["metadata"]["name"] == d["metadata"]["name"]
                    && s["metadata"]["namespace"] == d["metadata"]["namespace"]
            })
            .collect();
        assert_eq!(same.len(), 1, "{} {}", d["kind"], d["metadata"]["name"]);
    }
    let ns = find(docs, "Namespace", "shop");
    assert_eq!(ns["metadata"]["labels"]["meshid.io/inject"], "enabled");

    // The kustomization deploys the injected workloads, never the uninjected source.
    let kustomization: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(path("k8s/examples/shop/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let resources = strings(&kustomization["resources"]);
    assert!(
        resources.contains(&"injected.yaml".to_owned()),
        "{resources:?}"
    );
    assert!(!resources.contains(&"app.yaml".to_owned()), "{resources:?}");
    let ids = |docs: &[Value]| -> BTreeSet<String> {
        docs.iter()
            .map(|d| {
                format!(
                    "{} {}/{}",
                    d["kind"].as_str().unwrap(),
                    d["metadata"]["namespace"].as_str().unwrap_or(""),
                    d["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    };
    let app = file_docs("k8s/examples/shop/app.yaml");
    assert_eq!(
        ids(&file_docs("k8s/examples/shop/injected.yaml")),
        ids(&app),
        "injected.yaml holds the objects of app.yaml"
    );

    // The apps, as their developers write them.
    let accounts: BTreeSet<String> = of_kind(&app, "ServiceAccount")
        .iter()
        .map(|a| a["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        accounts,
        BTreeSet::from(["billing".into(), "frontend".into(), "orders".into()])
    );
    let services = of_kind(&app, "Service");
    for d in of_kind(&app, "Deployment") {
        let name = d["metadata"]["name"].as_str().unwrap();
        assert_eq!(d["metadata"]["namespace"], "shop");
        let pod = &d["spec"]["template"]["spec"];
        assert!(accounts.contains(pod["serviceAccountName"].as_str().unwrap()));
        for c in containers(pod) {
            assert_eq!(effective(pod, c, "runAsNonRoot"), true, "{name}");
            // Not root, not the sidecar's UID/GID (its traffic would leave the iptables
            // rules): README, "Transparent mode".
            for id in ["runAsUser", "runAsGroup"] {
                let v = effective(pod, c, id).as_i64().expect("set explicitly");
                assert!(v != 0 && v != 1337, "{name}: {id} {v}");
            }
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
            assert!(sc["capabilities"]["add"].is_null(), "{name}");
            assert_eq!(c["ports"][0]["containerPort"], 8080, "{name}");
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz", "{name}");
            assert_eq!(c["readinessProbe"]["httpGet"]["port"], 8080, "{name}");
            assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object());
        }
        let pod_labels = labels(&d["spec"]["template"]["metadata"]["labels"]);
        let svc = services
            .iter()
            .find(|s| s["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("a Service for {name}"));
        assert!(
            labels(&svc["spec"]["selector"])
                .iter()
                .all(|(k, v)| pod_labels.get(k) == Some(v)),
            "Service {name} selects its pods"
        );
        assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    }

    // The CA gets the shop's policy (in place of the base's), whose identities are the
    // shop's ServiceAccounts.
    let policies: Vec<&Value> = of_kind(docs, "ConfigMap")
        .into_iter()
        .filter(|c| c["metadata"]["name"] == "meshid-policy")
        .collect();
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0]["metadata"]["namespace"], CONTROL_PLANE_NS);
    let source = std::fs::read_to_string(path("k8s/examples/shop/policy.yaml")).unwrap();
    assert_eq!(
        policies[0]["data"]["policy.yaml"].as_str(),
        Some(source.as_str())
    );
    let policy: Value = serde_saphyr::from_str(&source).unwrap();
    let trust_domain = the_flag(&ca_args(docs), "trust-domain");
    assert_eq!(policy["trust_domain"], trust_domain);
    let services = policy["services"].as_object().unwrap();
    let policy_ids: BTreeSet<String> = services
        .values()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    let sa_ids: BTreeSet<String> = accounts
        .iter()
        .map(|a| format!("spiffe://{trust_domain}/ns/shop/sa/{a}"))
        .collect();
    assert_eq!(policy_ids, sa_ids);
    assert_eq!(
        services["orders"]["callers"],
        json!({ "frontend": ["orders:read"], "billing": ["orders:read", "orders:write"] })
    );
}

// ---------------------------------------------------------------------------------------------
// 3. The Dockerfile and the manifests agree.

struct Stage {
    name: String,
    from: String,
    /// (INSTRUCTION, rest of the line), continuations joined.
    steps: Vec<(String, String)>,
}

impl Stage {
    fn all(&self, instruction: &str) -> Vec<&str> {
        self.steps
            .iter()
            .filter(|(i, _)| i == instruction)
            .map(|(_, r)| r.as_str())
            .collect()
    }

    fn last(&self, instruction: &str) -> Option<&str> {
        self.all(instruction).last().copied()
    }
}

/// The stages of the Dockerfile, with global ARG defaults substituted into FROM.
fn dockerfile() -> Vec<Stage> {
    let source = std::fs::read_to_string(path("Dockerfile")).unwrap();
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in source.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for line in lines {
        let (instruction, rest) = line.split_once(char::is_whitespace).unwrap();
        let (instruction, rest) = (instruction.to_uppercase(), rest.trim().to_owned());
        if instruction == "FROM" {
            let words: Vec<&str> = rest
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let mut from = words[0].to_owned();
            for (k, v) in &args {
                from = from.replace(&format!("${{{k}}}"), v);
            }
            assert!(
                words.len() == 3 && words[1].eq_ignore_ascii_case("as"),
                "every stage is named: FROM {rest}"
            );
            stages.push(Stage {
                name: words[2].to_owned(),
                from,
                steps: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.steps.push((instruction, rest));
        } else if instruction == "ARG"
            && let Some((k, v)) = rest.split_once('=')
        {
            args.insert(k.to_owned(), v.to_owned());
        }
    }
    stages
}

fn stage<'a>(stages: &'a [Stage], name: &str) -> &'a Stage {
    stages
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("Dockerfile has a stage {name}"))
}

/// The `meshid` target's USER, as numbers.
fn image_user() -> (u32, u32) {
    let stages = dockerfile();
    let user = stage(&stages, "meshid")
        .last("USER")
        .expect("the meshid target sets USER");
    let (uid, gid) = user.split_once(':').expect("USER UID:GID");
    (uid.parse().unwrap(), gid.parse().unwrap())
}

/// The binary copied into a stage: from which stage.
fn binary_from(s: &Stage) -> &str {
    let copy = s
        .all("COPY")
        .into_iter()
        .find(|c| c.ends_with(&format!(" {ENTRYPOINT}")))
        .unwrap_or_else(|| panic!("stage {} copies the binary to {ENTRYPOINT}", s.name));
    copy.split_whitespace()
        .find_map(|w| w.strip_prefix("--from="))
        .expect("COPY --from the build stage")
}

#[test]
fn the_dockerfile_and_the_manifests_agree() {
    let stages = dockerfile();
    let entrypoint: Vec<String> = vec![ENTRYPOINT.into()];

    let meshid = stage(&stages, "meshid");
    assert_eq!(meshid.from, "gcr.io/distroless/cc-debian12");
    assert_eq!(meshid.last("USER"), Some("1337:1337"));
    assert_eq!(image_user(), (1337, 1337));
    let ep: Vec<String> = serde_json::from_str(meshid.last("ENTRYPOINT").unwrap()).unwrap();
    assert_eq!(ep, entrypoint);
    assert!(
        meshid.all("RUN").is_empty(),
        "distroless: nothing runs in it"
    );

    let init = stage(&stages, "meshid-init");
    assert_eq!(init.from, "docker.io/library/debian:bookworm-slim");
    assert!(
        init.all("USER").iter().all(|u| *u == "root" || *u == "0"),
        "the init image runs as root"
    );
    let ep: Vec<String> = serde_json::from_str(init.last("ENTRYPOINT").unwrap()).unwrap();
    assert_eq!(ep, entrypoint);
    let installs = init.all("RUN").join("\n");
    assert!(
        installs.contains("apt-get install")
            && installs.contains("--no-install-recommends")
            && installs.split_whitespace().any(|w| w == "iptables")
            && installs.contains("rm -rf /var/lib/apt/lists"),
        "the init image installs iptables: {installs}"
    );

    // One build of the binary for both, with the workspace's toolchain, on the Debian release
    // both runtimes are (bookworm is Debian 12: the binary's glibc is the runtime's).
    let from = binary_from(meshid);
    assert_eq!(binary_from(init), from);
    let build = stage(&stages, from);
    let manifest = std::fs::read_to_string(path("Cargo.toml")).unwrap();
    let rust_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert_eq!(
        build.from,
        format!("docker.io/library/rust:{rust_version}-bookworm")
    );
    assert!(
        build
            .all("RUN")
            .iter()
            .any(|r| r.contains("cargo build --release --locked --bin meshid")),
        "the build stage builds the release binary from the lock file"
    );
    for s in [meshid, init] {
        assert!(
            s.all("LABEL")
                .iter()
                .any(|l| l.contains("org.opencontainers.image.source")
                    && l.contains("org.opencontainers.image.version")),
            "{} has OCI labels",
            s.name
        );
    }
    let ignored: BTreeSet<String> = std::fs::read_to_string(path(".dockerignore"))
        .unwrap()
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_owned())
        .collect();
    for dir in ["target", ".venv", ".git"] {
        assert!(ignored.contains(dir), ".dockerignore has {dir}/");
    }

    // The manifests: the CA runs the meshid image as its USER; every meshid container anywhere
    // uses one of the two images, and an explicit command is the ENTRYPOINT.
    let (uid, gid) = image_user();
    let docs = base();
    let pod = &ca_deployment(docs)["spec"]["template"]["spec"];
    let ca = ca_container(docs);
    assert_eq!(ca["image"], image());
    assert_eq!(effective(pod, ca, "runAsUser"), uid);
    assert_eq!(effective(pod, ca, "runAsGroup"), gid);
    assert!(ca["command"].is_null() || strings(&ca["command"]) == entrypoint);
    let injected = file_docs("k8s/examples/shop/injected.yaml");
    let mut seen = BTreeSet::new();
    for (what, template) in pod_templates(shop())
        .into_iter()
        .chain(pod_templates(&injected))
    {
        let pod = &template["spec"];
        for c in containers(pod) {
            let img = c["image"].as_str().unwrap();
            if !img.starts_with("ghcr.io/meshid/") {
                continue;
            }
            let name = c["name"].as_str().unwrap();
            seen.insert(img.to_owned());
            if !c["command"].is_null() {
                assert_eq!(strings(&c["command"])[0], ENTRYPOINT, "{what} {name}");
            }
            if img == image() {
                let user = effective(pod, c, "runAsUser");
                assert!(user.is_null() || *user == uid, "{what} {name}: {user}");
            } else if img == init_image() {
                let user = effective(pod, c, "runAsUser");
                assert!(user.is_null() || *user == 0, "{what} {name} runs as root");
            } else {
                panic!(
                    "{what} {name}: image {img} is neither {} nor {}",
                    image(),
                    init_image()
                );
            }
        }
        // Injected sidecars reach the CA at its Service.
        for c in containers(pod)
            .into_iter()
            .filter(|c| c["name"] == "meshid-proxy")
        {
            assert!(c.to_string().contains(SIDECAR_CA_ADDR), "{what}: {c}");
        }
    }
    assert!(seen.contains(&image()));
}

#[test]
fn the_binary_needs_only_the_libraries_distroless_cc_ships() {
    // gcr.io/distroless/cc-debian12: glibc, libgcc_s, libstdc++ and libgomp, and (from the
    // base image) OpenSSL 3; nothing else.
    const SHIPPED: &[&str] = &[
        "linux-vdso.so.1",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
        "libc.so.6",
        "libm.so.6",
        "libdl.so.2",
        "librt.so.1",
        "libpthread.so.0",
        "libgcc_s.so.1",
        "libstdc++.so.6",
        "libgomp.so.1",
        "libssl.so.3",
        "libcrypto.so.3",
    ];
    let out = std::process::Command::new("ldd")
        .arg(MESHID)
        .output()
        .expect("ldd runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let needed: Vec<String> = text(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|l| l.rsplit('/').next().unwrap().to_owned())
        .collect();
    assert!(needed.iter().any(|l| l == "libc.so.6"), "{needed:?}");
    for lib in &needed {
        assert!(
            SHIPPED.contains(&lib.as_str()),
            "{lib} is not in distroless/cc"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. The binary as the images run it: the image's UID/GID, no capabilities, no new
// privileges, every mount read-only but one directory.

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// Run in a new mount namespace (as root), before the command: every mount of the copy made
/// read-only, a tmpfs owned by UID:GID on WRITABLE, the proof that nothing else takes a write,
/// then the command as UID:GID with only the capabilities CAPS (setpriv --bounding-set: `-all`
/// is none) and no new privileges (allowPrivilegeEscalation: false).
/// `remount,bind,ro` changes one mount's flag in this namespace only, never the filesystem
/// (which the machine's other namespaces share).
const SANDBOX: &str = r#"
set -eu
w=$1 uid=$2 gid=$3 caps=$4
shift 4
mounts() { awk '{ for (i = 7; i <= NF; i++) if ($i == "-") { print $(i + 1), $5; break } }' /proc/self/mountinfo; }
# Network namespaces bind-mounted by `ip netns` elsewhere: not kept alive by this copy.
mounts | while read -r type m; do
  if [ "$type" = nsfs ]; then umount -l "$m" 2>/dev/null || true; fi
done
for m in $(mounts | awk '{ print $2 }' | sort -u); do
  mount -o remount,bind,ro "$m" || { echo "meshid-sandbox: cannot make $m read-only" >&2; exit 97; }
done
mount -t tmpfs -o "mode=0700,uid=$uid,gid=$gid,size=64m" meshid-writable "$w"
# As root, whom no file permission stops: only the read-only flag can refuse these.
for m in $(mounts | awk '{ print $2 }' | sort -u); do
  [ "$m" != "$w" ] || continue
  if [ -d "$m" ]; then
    f="$m/.meshid-sandbox-probe.$$"
    if (: > "$f") 2>/dev/null; then rm -f "$f"; echo "meshid-sandbox: $m is writable" >&2; exit 98; fi
  elif [ -f "$m" ] && (: >> "$m") 2>/dev/null; then
    echo "meshid-sandbox: $m is writable" >&2; exit 98
  fi
done
(: > "$w/.probe") && rm "$w/.probe"
echo "meshid-sandbox: every mount read-only but $w; running as $uid:$gid" >&2
exec setpriv --reuid "$uid" --regid "$gid" --clear-groups --inh-caps=-all --bounding-set="$caps" --no-new-privs -- "$@"
"#;

const SANDBOX_OK: &str = "meshid-sandbox: every mount read-only but ";

/// How a container runs: its user, its capabilities, its one writable directory.
struct Confined<'a> {
    writable: &'a Path,
    user: (u32, u32),
    /// For setpriv --bounding-set.
    caps: &'a str,
    /// A network namespace of its own (a pod's), else the test's.
    own_network: bool,
}

impl Confined<'_> {
    /// The image's user, no capabilities: the CA's and the sidecar's container.
    fn image_user(writable: &Path) -> Confined<'_> {
        Confined {
            writable,
            user: image_user(),
            caps: "-all",
            own_network: false,
        }
    }

    fn command(&self, argv: &[String]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("unshare");
        c.arg("--mount");
        if self.own_network {
            c.arg("--net");
        }
        c.args([
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            SANDBOX,
            "meshid-sandbox",
        ])
        .arg(self.writable)
        .args([
            self.user.0.to_string(),
            self.user.1.to_string(),
            self.caps.to_owned(),
        ])
        .args(argv)
        .env("MESHID_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
        c
    }

    async fn run(&self, argv: &[&str]) -> Output {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        self.command(&argv).output().await.unwrap()
    }
}

/// A command in the mount namespace of process `pid`, as `user` (None: root).
fn in_namespace_of(pid: u32, user: Option<(u32, u32)>, argv: &[&str]) -> Output {
    let mut c = std::process::Command::new("nsenter");
    c.args(["--target", &pid.to_string(), "--mount"]);
    if let Some((uid, gid)) = user {
        c.args(["--setuid", &uid.to_string(), "--setgid", &gid.to_string()]);
    }
    c.arg("--").args(argv).output().unwrap()
}

/// Uid, Gid, Groups, CapEff, NoNewPrivs of a running process.
fn credentials(pid: u32) -> BTreeMap<String, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| {
            [
                "Uid",
                "Gid",
                "Groups",
                "CapEff",
                "CapPrm",
                "CapBnd",
                "NoNewPrivs",
            ]
            .contains(k)
        })
        .map(|(k, v)| {
            (
                k.to_owned(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect()
}

fn assert_runs_as_image_user(pid: u32, (uid, gid): (u32, u32), what: &str) {
    let c = credentials(pid);
    assert_eq!(
        c["Uid"],
        format!("{uid} {uid} {uid} {uid}"),
        "{what}: {c:?}"
    );
    assert_eq!(
        c["Gid"],
        format!("{gid} {gid} {gid} {gid}"),
        "{what}: {c:?}"
    );
    assert_eq!(c["Groups"], "", "{what}: {c:?}");
    assert_eq!(c["CapEff"], "0000000000000000", "{what}: {c:?}");
    assert_eq!(c["CapPrm"], "0000000000000000", "{what}: {c:?}");
    assert_eq!(c["CapBnd"], "0000000000000000", "{what}: {c:?}");
    assert_eq!(c["NoNewPrivs"], "1", "{what}: {c:?}");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, Path::new(MESHID), "{what} is the meshid binary itself");
}

/// A write anywhere but the data directory fails in `pid`'s mount namespace, as root and as
/// the image user, because the filesystem is read-only.
fn assert_read_only_but(pid: u32, writable: &Path, user: (u32, u32), what: &str) {
    let tmp = format!("/tmp/meshid-ro-{pid}");
    let beside = writable.with_file_name(format!("meshid-ro-{pid}"));
    for target in [tmp.as_str(), "/meshid-ro", beside.to_str().unwrap()] {
        for as_user in [None, Some(user)] {
            let out = in_namespace_of(pid, as_user, &["touch", target]);
            assert!(
                !out.status.success() && text(&out.stderr).contains("Read-only file system"),
                "{what}: touch {target} as {as_user:?} in its namespace: {}",
                text(&out.stderr)
            );
            assert!(!Path::new(target).exists());
        }
    }
    let probe = writable.join("probe");
    let out = in_namespace_of(pid, Some(user), &["touch", probe.to_str().unwrap()]);
    assert!(out.status.success(), "{what}: {}", text(&out.stderr));
    assert!(
        !probe.exists(),
        "the writable directory is the namespace's own tmpfs"
    );
}

/// Poll `GET addr/ready` until 200; the log on failure.
async fn wait_ready(child: &mut tokio::process::Child, admin: std::net::SocketAddr, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, _)) = http_get(admin, "/ready").await {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "not ready after 30 s: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn terminate(child: &mut tokio::process::Child, log: &Path, what: &str) {
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} stops within 10 s of SIGTERM"))
        .unwrap();
    assert!(
        status.success(),
        "{what} exited {status}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[tokio::test]
async fn the_image_user_runs_the_ca_and_a_sidecar_on_a_read_only_root_filesystem() {
    assert!(
        is_root(),
        "this test makes mount namespaces: run it as root (CI does)"
    );
    let user = image_user();
    let tmp = tempfile::tempdir().unwrap();
    // The image user reaches what is under it (tempdir makes it 0700).
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();

    // The CA with the shop example's args, the pod's paths and ports mapped onto this machine.
    let (grpc, https, admin) = (free_addr(), free_addr(), free_addr());
    let mut argv = vec![MESHID.to_owned()];
    argv.extend(
        ca_args(shop())
            .into_iter()
            // The bundle publisher needs an API server (`bundle_configmap` tests it).
            .filter(|a| !a.starts_with("--bundle-configmap-namespace-selector="))
            .map(|a| match a.split_once('=') {
                Some(("--data-dir", _)) => format!("--data-dir={}", data.display()),
                Some(("--grpc-addr", _)) => format!("--grpc-addr={grpc}"),
                Some(("--http-addr", _)) => format!("--http-addr={https}"),
                Some(("--admin-addr", _)) => format!("--admin-addr={admin}"),
                // The ConfigMap's file, from the source kustomize generated it from.
                Some(("--policy", _)) => format!(
                    "--policy={}",
                    path("k8s/examples/shop/policy.yaml").display()
                ),
                _ => a,
            }),
    );
    let ca_log = tmp.path().join("ca.log");
    let mut ca = Confined::image_user(&data)
        .command(&argv)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&ca_log).unwrap())
        .spawn()
        .unwrap();
    wait_ready(&mut ca, admin, &ca_log).await;
    let ca_pid = ca.id().unwrap();
    let log = std::fs::read_to_string(&ca_log).unwrap();
    assert!(log.contains(SANDBOX_OK), "{log}");
    // Nothing it tried failed (a write refused would show here first).
    assert!(
        !log.contains("\"level\":\"ERROR\"") && !log.contains("\"level\":\"WARN\""),
        "{log}"
    );
    assert_runs_as_image_user(ca_pid, user, "the CA");
    assert_read_only_but(ca_pid, &data, user, "the CA");
    // It wrote its keys into the tmpfs, which nothing outside its namespace sees.
    let out = in_namespace_of(ca_pid, Some(user), &["ls", "-A", data.to_str().unwrap()]);
    assert!(
        out.status.success() && !text(&out.stdout).trim().is_empty(),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);

    // The bundle and a join token, as an operator gets them (`kubectl exec`: the same mount
    // namespace, the image's user).
    let out = in_namespace_of(
        ca_pid,
        Some(user),
        &[MESHID, "ca", "bundle", "--data-dir", data.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bundle = tmp.path().join("bundle.pem");
    std::fs::write(&bundle, &out.stdout).unwrap();
    let out = in_namespace_of(
        ca_pid,
        Some(user),
        &[
            MESHID,
            "ca",
            "join-token",
            "--data-dir",
            data.to_str().unwrap(),
            "--spiffe-id",
            "spiffe://cluster.local/ns/shop/sa/orders",
            "--reusable",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();

    // A sidecar, its certificates on a tmpfs of its own (the injected pod's emptyDir).
    let certs = tmp.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let app = echo_app().await;
    let (inbound, outbound, sidecar_admin) = (free_addr(), free_addr(), free_addr());
    let argv: Vec<String> = [
        MESHID,
        "sidecar",
        "--ca",
        &grpc.to_string(),
        "--ca-bundle",
        bundle.to_str().unwrap(),
        "--join-token",
        &token,
        "--cert-dir",
        certs.to_str().unwrap(),
        "--app",
        &app.to_string(),
        "--inbound-addr",
        &inbound.to_string(),
        "--outbound-addr",
        &outbound.to_string(),
        "--admin-addr",
        &sidecar_admin.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let sidecar_log = tmp.path().join("sidecar.log");
    let mut sidecar = Confined::image_user(&certs)
        .command(&argv)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&sidecar_log).unwrap())
        .spawn()
        .unwrap();
    wait_ready(&mut sidecar, sidecar_admin, &sidecar_log).await;
    let sidecar_pid = sidecar.id().unwrap();
    assert!(
        std::fs::read_to_string(&sidecar_log)
            .unwrap()
            .contains(SANDBOX_OK)
    );
    assert_runs_as_image_user(sidecar_pid, user, "the sidecar");
    assert_read_only_but(sidecar_pid, &certs, user, "the sidecar");
    let out = in_namespace_of(sidecar_pid, Some(user), &["ls", certs.to_str().unwrap()]);
    assert!(
        text(&out.stdout).contains("svid.pem"),
        "the sidecar wrote its SVID into its tmpfs: {}",
        text(&out.stdout)
    );
    // It stops cleanly as Kubernetes stops it, and so does the CA: nothing on the way out
    // needs to write either.
    terminate(&mut sidecar, &sidecar_log, "the sidecar").await;
    terminate(&mut ca, &ca_log, "the CA").await;
}

#[tokio::test]
async fn the_image_user_runs_the_cli_on_a_read_only_root_filesystem() {
    assert!(
        is_root(),
        "this test makes mount namespaces: run it as root (CI does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    for (argv, want) in [
        (
            vec![MESHID, "--version"],
            format!("meshid {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            vec![MESHID, "sidecar", "--help"],
            "Usage: meshid sidecar".to_owned(),
        ),
        (
            vec![MESHID, "ca", "serve", "--help"],
            "Usage: meshid ca serve".to_owned(),
        ),
        // Proof that the sandbox bites: the same user cannot write where it otherwise could.
        (
            vec!["sh", "-c", "touch /tmp/meshid-ro-cli 2>&1 || echo refused"],
            "Read-only file system".to_owned(),
        ),
    ] {
        let out = Confined::image_user(tmp.path()).run(&argv).await;
        let stderr = text(&out.stderr);
        assert!(
            out.status.success() && text(&out.stdout).contains(&want),
            "{argv:?}: {}{stderr}",
            text(&out.stdout)
        );
        assert!(stderr.contains(SANDBOX_OK), "{stderr}");
    }
    assert!(!Path::new("/tmp/meshid-ro-cli").exists());
}

#[tokio::test]
async fn the_init_image_user_writes_the_rules_on_a_read_only_root_filesystem() {
    assert!(
        is_root(),
        "this test makes mount and network namespaces: run it as root (CI does)"
    );
    // The injected init container's args (the placeholder injected.yaml has none yet: then
    // the defaults, which are the same rules).
    let injected = file_docs("k8s/examples/shop/injected.yaml");
    let args: Vec<String> = pod_templates(&injected)
        .into_iter()
        .flat_map(|(_, t)| {
            containers(&t["spec"])
                .into_iter()
                .cloned()
                .collect::<Vec<_>>()
        })
        .find(|c| c["image"] == init_image())
        .map(|c| strings(&c["args"]))
        .unwrap_or_else(|| vec!["init-iptables".to_owned()]);
    assert_eq!(args[0], "init-iptables");
    // As the init container runs: root, NET_ADMIN and NET_RAW only, no escalation, a
    // read-only root filesystem with an emptyDir on /run (the xtables lock), in the pod's
    // network namespace. Both backends the image ships.
    let confined = Confined {
        writable: Path::new("/run"),
        user: (0, 0),
        caps: "-all,+net_admin,+net_raw",
        own_network: true,
    };
    for backend in ["nft", "legacy"] {
        let script = r#"set -e
backend=$1; shift
"$@" --backend "$backend"
iptables-"$backend"-save -t nat
ip6tables-"$backend"-save -t nat
grep ^Cap /proc/self/status
touch /tmp/meshid-ro-init 2>&1 || true"#;
        let mut argv = vec!["sh", "-c", script, "init", backend, MESHID];
        argv.extend(args.iter().map(String::as_str));
        let out = confined.run(&argv).await;
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{backend}: {stdout}{stderr}");
        assert!(stderr.contains(SANDBOX_OK), "{stderr}");
        for rule in [
            "-A OUTPUT -p tcp -j MESHID_OUTPUT",
            "-A MESHID_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A MESHID_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ] {
            assert_eq!(
                stdout.matches(rule).count(),
                2,
                "{backend}: {rule} for IPv4 and IPv6: {stdout}{stderr}"
            );
        }
        // 0x3000: CAP_NET_ADMIN and CAP_NET_RAW, nothing else.
        assert!(stdout.contains("CapEff:\t0000000000003000"), "{stdout}");
        assert!(stdout.contains("CapBnd:\t0000000000003000"), "{stdout}");
        assert!(stdout.contains("Read-only file system"), "{stdout}");
    }
    assert!(!Path::new("/tmp/meshid-ro-init").exists());
}

// ---------------------------------------------------------------------------------------------
// Several CA replicas (k8s/examples/replicas)

#[test]
fn the_replicas_example_runs_three_ca_replicas_on_the_cluster_store() {
    let docs = parse(&render(&path("k8s/examples/replicas")));
    let deployment = ca_deployment(&docs);
    assert_eq!(deployment["spec"]["replicas"], 3);
    // No shared volume: a rolling update keeps two replicas serving.
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");
    assert!(of_kind(&docs, "PersistentVolumeClaim").is_empty());
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let data: Vec<&Value> = volumes.iter().filter(|v| v["name"] == "data").collect();
    assert!(
        data.len() == 1 && data[0]["emptyDir"].is_object(),
        "{volumes:?}"
    );
    let args = ca_args(&docs);
    assert_eq!(flag(&args, "store"), ["kubernetes"]);
    // One issuer for every replica: the Service's.
    assert_eq!(
        flag(&args, "issuer"),
        ["https://meshid-ca.meshid-system.svc:8444"]
    );
    assert!(
        flag(&args, "replica-name").is_empty(),
        "the pod's name is the default"
    );
    // The store's RBAC: in meshid-system only, bound to the CA's service account.
    let role = find(&docs, "Role", "meshid-ca-store");
    assert_eq!(role["metadata"]["namespace"], "meshid-system");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    granted.insert(format!(
                        "{g}/{r}/{v}/{}",
                        strings(&rule["resourceNames"]).join(",")
                    ));
                }
            }
        }
    }
    for want in [
        "/secrets/get/",
        "/secrets/list/",
        "/secrets/watch/",
        "/secrets/create/",
        "/secrets/update/",
        "/configmaps/get/",
        "/configmaps/list/",
        "/configmaps/create/",
        "/configmaps/update/",
        "coordination.k8s.io/leases/create/",
        "coordination.k8s.io/leases/get/meshid-ca-rotation",
        "coordination.k8s.io/leases/update/meshid-ca-rotation",
    ] {
        assert!(granted.contains(want), "{want} not in {granted:?}");
    }
    assert!(
        !granted
            .iter()
            .any(|g| g.contains("delete") || g.contains('*')),
        "{granted:?}"
    );
    let binding = find(&docs, "RoleBinding", "meshid-ca-store");
    assert_eq!(binding["roleRef"]["name"], "meshid-ca-store");
    assert_eq!(binding["subjects"][0]["name"], "meshid-ca");
    assert_eq!(binding["subjects"][0]["namespace"], "meshid-system");
    let pdb = find(&docs, "PodDisruptionBudget", "meshid-ca");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
}
