//! Sidecar injection: the one transform behind `meshid inject` (YAML in, YAML out) and the
//! CA's mutating admission webhook (AdmissionReview v1, JSONPatch out), so that a Deployment
//! injected by hand and a pod injected at admission are the same.
//!
//! Into each pod template it adds:
//! - `meshid-init`, an init container that runs `meshid init-iptables` as root with NET_ADMIN and
//!   NET_RAW only (read-only root filesystem; an emptyDir for the xtables lock);
//! - `meshid-proxy`, the sidecar, as a Kubernetes native sidecar (an init container with
//!   `restartPolicy: Always`) whose startup probe on `/ready` holds the app containers until
//!   the pod has its identity, with readiness and liveness probes, resources, and a security
//!   context (UID 1337, non-root, read-only root filesystem, no capabilities, no escalation);
//!   or, for clusters before 1.29, as the first regular container with a `postStart` hook
//!   that waits for `/ready` (the kubelet starts the next container only after it);
//! - volumes: the projected ServiceAccount token with audience `meshid-ca`, the trust bundle
//!   from the `meshid-bundle` ConfigMap the CA keeps current, an emptyDir (memory) for the
//!   certificates;
//! - the app containers' HTTP and TCP probes, rewritten to go through the sidecar's admin port
//!   (`/app-health/CONTAINER/PROBE`), which asks the app locally: a kubelet probe cannot make
//!   mutual TLS, and would otherwise be refused by the inbound port.
//!
//! Annotations on the pod template: `meshid.io/inject: disabled` opts out;
//! `meshid.io/exclude-inbound-ports`, `meshid.io/exclude-outbound-ports`,
//! `meshid.io/exclude-outbound-cidrs`, `meshid.io/inbound-ports` go to `init-iptables`;
//! `meshid.io/opaque-ports` (ports this pod's sidecar tunnels as opaque TCP without
//! detection); `meshid.io/app-port`; `meshid.io/workload-api: enabled` serves the SPIFFE
//! Workload API on a socket in an emptyDir that the sidecar and every app container mount, and
//! sets `SPIFFE_ENDPOINT_SOCKET` in the app containers (unless they set it themselves). An
//! object already injected is left as it is.

use std::collections::BTreeSet;

use base64::Engine;
use serde_json::{Map, Value, json};

pub const INJECT_ANNOTATION: &str = "meshid.io/inject";
pub const INJECTED_ANNOTATION: &str = "meshid.io/injected";
pub const PROXY_NAME: &str = "meshid-proxy";
pub const INIT_NAME: &str = "meshid-init";
/// The UID (and GID) the sidecar runs as, which `init-iptables` excludes.
pub const PROXY_UID: i64 = 1337;
pub const ADMIN_PORT: u16 = 15000;
/// Where the kubelet probes the sidecar and, through it, the app (the only sidecar port that
/// plain-text clients on the pod network reach; `/metrics` stays on the loopback admin port).
pub const PROBE_PORT: u16 = 15020;
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
const BINARY: &str = "/usr/local/bin/meshid";
const CERT_DIR: &str = "/var/run/meshid/certs";
const TOKEN_DIR: &str = "/var/run/meshid/token";
const BUNDLE_DIR: &str = "/var/run/meshid/bundle";
/// Where the Workload API socket lives in every container of a pod that asks for it.
pub const WORKLOAD_API_DIR: &str = "/run/meshid/workload-api";
pub const WORKLOAD_API_ANNOTATION: &str = "meshid.io/workload-api";

/// What injection needs to know about the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    pub image: String,
    pub init_image: String,
    /// Where sidecars reach the CA's gRPC port.
    pub ca_addr: String,
    /// The ConfigMap (key `bundle.pem`) holding the trust bundle in each meshed namespace.
    pub bundle_configmap: String,
    /// Native sidecars (Kubernetes 1.29 and later); `false`: the older layout.
    pub native_sidecars: bool,
}

impl Default for InjectConfig {
    fn default() -> Self {
        let v = env!("CARGO_PKG_VERSION");
        Self {
            image: format!("ghcr.io/meshid/meshid:v{v}"),
            init_image: format!("ghcr.io/meshid/meshid-init:v{v}"),
            ca_addr: "meshid-ca.meshid-system.svc:8443".into(),
            bundle_configmap: "meshid-bundle".into(),
            native_sidecars: true,
        }
    }
}

/// Why an object cannot be injected: which object, which field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct InjectError {
    pub object: String,
    pub field: String,
    pub message: String,
}

/// What became of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    AlreadyInjected,
    OptedOut,
    /// `hostNetwork: true`: its iptables rules would be the node's, so it is left alone.
    HostNetwork,
    /// Not a workload (a Service, a ConfigMap, ...): passed through.
    NotAWorkload,
}

impl Outcome {
    pub fn describe(&self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::AlreadyInjected => "already injected, left as it is",
            Outcome::OptedOut => "opted out (meshid.io/inject: disabled), left as it is",
            Outcome::HostNetwork => "uses the host's network, left as it is",
            Outcome::NotAWorkload => "not a workload, passed through",
        }
    }
}

/// Kinds that hold a pod template, and where.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

/// Kinds passed through unchanged (they run no pods).
const PASSED_THROUGH: &[&str] = &[
    "Service",
    "ConfigMap",
    "Secret",
    "ServiceAccount",
    "Namespace",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "Ingress",
    "IngressClass",
    "NetworkPolicy",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "StorageClass",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "LimitRange",
    "ResourceQuota",
    "PriorityClass",
    "Endpoints",
    "EndpointSlice",
    "CustomResourceDefinition",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "Lease",
];

/// "Deployment shop/orders", for messages.
fn describe(obj: &Value, index: Option<usize>) -> String {
    let kind = obj["kind"].as_str().unwrap_or("object");
    let name = obj["metadata"]["name"]
        .as_str()
        .or_else(|| obj["metadata"]["generateName"].as_str())
        .unwrap_or("(unnamed)");
    let name = match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    };
    match index {
        Some(i) => format!("document {} ({kind} {name})", i + 1),
        None => format!("{kind} {name}"),
    }
}

/// Inject one object in place. `pass_unknown`: kinds this does not know are passed through
/// instead of refused.
pub fn inject_object(
    obj: &mut Value,
    config: &InjectConfig,
    index: Option<usize>,
    pass_unknown: bool,
) -> Result<Outcome, InjectError> {
    let what = describe(obj, index);
    let err = |field: &str, message: String| InjectError {
        object: what.clone(),
        field: field.to_owned(),
        message,
    };
    if !obj.is_object() {
        return Err(err("", "not a Kubernetes object (a YAML mapping)".into()));
    }
    let (Some(kind), Some(_)) = (obj["kind"].as_str(), obj["apiVersion"].as_str()) else {
        return Err(err(
            "kind",
            "not a Kubernetes object: apiVersion and kind are required".into(),
        ));
    };
    let kind = kind.to_owned();
    if kind == "List" {
        let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut) else {
            return Err(err("items", "a List needs items".into()));
        };
        let mut any = Outcome::NotAWorkload;
        for item in items.iter_mut() {
            if inject_object(item, config, None, pass_unknown)? == Outcome::Injected {
                any = Outcome::Injected;
            }
        }
        return Ok(any);
    }
    let Some(path) = template_path(&kind) else {
        if PASSED_THROUGH.contains(&kind.as_str()) || pass_unknown {
            return Ok(Outcome::NotAWorkload);
        }
        return Err(err(
            "kind",
            format!(
                "kind {kind} is not one meshid knows (Pod, Deployment, StatefulSet, DaemonSet, \
                 ReplicaSet, Job, CronJob, ReplicationController inject; Service, ConfigMap and \
                 other kinds without pods pass through); --pass-unknown copies it unchanged"
            ),
        ));
    };
    let mut template = &mut *obj;
    let mut field = String::new();
    for p in path {
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(p);
        template = match template.get_mut(*p) {
            Some(t) if t.is_object() => t,
            _ => {
                return Err(err(
                    &field,
                    "missing (a workload needs a pod template)".into(),
                ));
            }
        };
    }
    let prefix = if field.is_empty() {
        String::new()
    } else {
        format!("{field}.")
    };
    inject_template(template, config, &what, &prefix)
}

/// Inject a pod (or pod template): its `metadata` and `spec`. `prefix` names where it sits in
/// the object, for messages.
pub fn inject_template(
    template: &mut Value,
    config: &InjectConfig,
    what: &str,
    prefix: &str,
) -> Result<Outcome, InjectError> {
    let err = |field: &str, message: String| InjectError {
        object: what.to_owned(),
        field: format!("{prefix}{field}"),
        message,
    };
    let annotations: Map<String, Value> = template["metadata"]["annotations"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let annotation = |k: &str| annotations.get(k).and_then(Value::as_str);
    let label = template["metadata"]["labels"][INJECT_ANNOTATION].as_str();
    if annotation(INJECT_ANNOTATION) == Some("disabled") || label == Some("disabled") {
        return Ok(Outcome::OptedOut);
    }
    let spec = match template.get("spec") {
        Some(s) if s.is_object() => s,
        _ => return Err(err("spec", "missing".into())),
    };
    let named = |list: &str| -> bool {
        spec[list].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["name"] == PROXY_NAME || c["name"] == INIT_NAME)
        })
    };
    if annotations.contains_key(INJECTED_ANNOTATION)
        || named("containers")
        || named("initContainers")
    {
        return Ok(Outcome::AlreadyInjected);
    }
    if spec["hostNetwork"] == true {
        return Ok(Outcome::HostNetwork);
    }
    let Some(containers) = spec["containers"].as_array().filter(|c| !c.is_empty()) else {
        return Err(err(
            "spec.containers",
            "a pod needs at least one container".into(),
        ));
    };
    let reserved = [ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT, PROBE_PORT];
    let runs_as_proxy = |sc: &Value| sc["runAsUser"] == PROXY_UID || sc["runAsGroup"] == PROXY_UID;
    if runs_as_proxy(&spec["securityContext"]) {
        return Err(err(
            "spec.securityContext",
            format!(
                "the pod runs as UID/GID {PROXY_UID}, the sidecar's: its traffic would bypass \
                 the interception rules"
            ),
        ));
    }
    for (i, c) in containers.iter().enumerate() {
        if !c["name"].is_string() {
            return Err(err(&format!("spec.containers[{i}].name"), "missing".into()));
        }
        if runs_as_proxy(&c["securityContext"]) {
            return Err(err(
                &format!("spec.containers[{i}].securityContext"),
                format!(
                    "runs as UID/GID {PROXY_UID}, the sidecar's: its traffic would bypass the \
                     interception rules"
                ),
            ));
        }
        for (j, p) in c["ports"].as_array().into_iter().flatten().enumerate() {
            if let Some(port) = p["containerPort"].as_u64()
                && reserved.iter().any(|r| u64::from(*r) == port)
            {
                return Err(err(
                    &format!("spec.containers[{i}].ports[{j}].containerPort"),
                    format!("port {port} is the sidecar's ({reserved:?} are)"),
                ));
            }
        }
    }
    for (i, v) in spec["volumes"].as_array().into_iter().flatten().enumerate() {
        if v["name"].as_str().is_some_and(|n| n.starts_with("meshid-")) {
            return Err(err(
                &format!("spec.volumes[{i}].name"),
                "volume names starting with meshid- are the sidecar's".into(),
            ));
        }
    }
    if !config.native_sidecars
        && matches!(spec["restartPolicy"].as_str(), Some("Never" | "OnFailure"))
    {
        return Err(err(
            "spec.restartPolicy",
            "a pod that runs to completion (a Job's) would never complete with the sidecar as a \
             regular container: use native sidecars (Kubernetes 1.29 and later)"
                .into(),
        ));
    }
    let ports = |key: &str| -> Result<Option<String>, InjectError> {
        let Some(v) = annotation(key) else {
            return Ok(None);
        };
        let list = port_list(v).map_err(|m| err(&format!("metadata.annotations[{key}]"), m))?;
        Ok(Some(list))
    };
    // The probe port always reaches the sidecar in plain text (the kubelet's probes).
    let exclude_inbound = Some(match ports("meshid.io/exclude-inbound-ports")? {
        Some(p) if !p.is_empty() => port_list(&format!("{p},{PROBE_PORT}")).expect("valid"),
        _ => PROBE_PORT.to_string(),
    });
    let exclude_outbound = ports("meshid.io/exclude-outbound-ports")?;
    let inbound_ports = ports("meshid.io/inbound-ports")?;
    let opaque_ports = ports("meshid.io/opaque-ports")?;
    let cidrs = match annotation("meshid.io/exclude-outbound-cidrs") {
        None => None,
        Some(v) => Some(
            cidr_list(v)
                .map_err(|m| err("metadata.annotations[meshid.io/exclude-outbound-cidrs]", m))?,
        ),
    };
    let app_port = match annotation("meshid.io/app-port") {
        Some(v) => v
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                err(
                    "metadata.annotations[meshid.io/app-port]",
                    format!("{v:?} is not a TCP port"),
                )
            })?,
        None => containers
            .iter()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .find_map(|p| p["containerPort"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(8080),
    };

    let workload_api = match annotation(WORKLOAD_API_ANNOTATION).map(str::trim) {
        None | Some("disabled") | Some("false") => false,
        Some("enabled") | Some("true") => true,
        Some(v) => {
            return Err(err(
                &format!("metadata.annotations[{WORKLOAD_API_ANNOTATION}]"),
                format!("{v:?} is neither enabled nor disabled"),
            ));
        }
    };

    // The app's probes, through the sidecar's admin port.
    let mut probes = Map::new();
    let mut new_containers = containers.clone();
    for (i, c) in new_containers.iter_mut().enumerate() {
        let name = c["name"].as_str().unwrap_or_default().to_owned();
        let container = c.clone();
        for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let Some(probe) = c.get_mut(kind) else {
                continue;
            };
            match probe_target(probe, &container, kind) {
                Ok(Some(target)) => {
                    probes.insert(format!("{name}/{kind}"), target);
                }
                Ok(None) => {}
                Err(m) => return Err(err(&format!("spec.containers[{i}].{kind}"), m)),
            }
        }
    }

    let socket_mount = json!({ "name": "meshid-workload-api", "mountPath": WORKLOAD_API_DIR });
    if workload_api {
        let endpoint = format!("unix://{WORKLOAD_API_DIR}/socket");
        // Read-only for the apps: connecting to a socket needs no write to the file system,
        // and no app can replace the socket with one of its own.
        let mut app_mount = socket_mount.clone();
        app_mount["readOnly"] = json!(true);
        for c in new_containers.iter_mut() {
            let c = c.as_object_mut().expect("a container is an object");
            let mounts = c.entry("volumeMounts").or_insert_with(|| json!([]));
            if let Some(m) = mounts.as_array_mut() {
                m.push(app_mount.clone());
            }
            let env = c.entry("env").or_insert_with(|| json!([]));
            if let Some(env) = env.as_array_mut()
                && !env.iter().any(|e| e["name"] == "SPIFFE_ENDPOINT_SOCKET")
            {
                env.push(json!({ "name": "SPIFFE_ENDPOINT_SOCKET", "value": endpoint }));
            }
        }
    }

    let mut init_args = vec!["init-iptables".to_owned()];
    init_args.push(format!("--proxy-uid={PROXY_UID}"));
    init_args.push(format!("--proxy-gid={PROXY_UID}"));
    for (flag, v) in [
        ("--inbound-ports", &inbound_ports),
        ("--exclude-inbound-ports", &exclude_inbound),
        ("--exclude-outbound-ports", &exclude_outbound),
        ("--exclude-outbound-cidrs", &cidrs),
    ] {
        if let Some(v) = v {
            init_args.push(format!("{flag}={v}"));
        }
    }
    let security_drop_all = json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] },
        "seccompProfile": { "type": "RuntimeDefault" },
    });
    let mut init_security = security_drop_all.clone();
    init_security["capabilities"]["add"] = json!(["NET_ADMIN", "NET_RAW"]);
    init_security["runAsUser"] = json!(0);
    init_security["runAsGroup"] = json!(0);
    init_security["runAsNonRoot"] = json!(false);
    init_security["privileged"] = json!(false);
    let init = json!({
        "name": INIT_NAME,
        "image": config.init_image,
        "args": init_args,
        "securityContext": init_security,
        "resources": {
            "requests": { "cpu": "10m", "memory": "16Mi" },
            "limits": { "cpu": "100m", "memory": "64Mi" },
        },
        "volumeMounts": [ { "name": "meshid-xtables", "mountPath": "/run" } ],
    });

    let mut proxy_args = vec![
        "sidecar".to_owned(),
        format!("--ca={}", config.ca_addr),
        format!("--ca-bundle={BUNDLE_DIR}/bundle.pem"),
        format!("--k8s-token-file={TOKEN_DIR}/token"),
        format!("--cert-dir={CERT_DIR}"),
        format!("--app=127.0.0.1:{app_port}"),
        format!("--inbound-addr=[::]:{INBOUND_PORT}"),
        format!("--outbound-addr=127.0.0.1:{OUTBOUND_PORT},[::1]:{OUTBOUND_PORT}"),
        format!("--admin-addr=127.0.0.1:{ADMIN_PORT}"),
        format!("--probe-addr=[::]:{PROBE_PORT}"),
        "--log-format=json".to_owned(),
    ];
    if let Some(p) = &opaque_ports {
        proxy_args.push(format!("--opaque-ports={p}"));
    }
    if workload_api {
        proxy_args.push(format!("--workload-api-socket={WORKLOAD_API_DIR}/socket"));
    }
    let mut proxy_security = security_drop_all;
    proxy_security["runAsUser"] = json!(PROXY_UID);
    proxy_security["runAsGroup"] = json!(PROXY_UID);
    proxy_security["runAsNonRoot"] = json!(true);
    let admin_probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": { "path": path, "port": PROBE_PORT },
            "periodSeconds": period,
            "failureThreshold": failures,
        })
    };
    let mut proxy = json!({
        "name": PROXY_NAME,
        "image": config.image,
        "args": proxy_args,
        "env": [
            { "name": "MESHID_POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
            { "name": "MESHID_POD_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
            // App probes go to the pod's address, as the kubelet's would.
            { "name": "MESHID_POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
        ],
        "ports": [
            { "name": "meshid-inbound", "containerPort": INBOUND_PORT },
            { "name": "meshid-probes", "containerPort": PROBE_PORT },
        ],
        // Up to 5 minutes to obtain an identity (the CA may be starting too).
        "startupProbe": admin_probe("/ready", 1, 300),
        "readinessProbe": admin_probe("/ready", 5, 3),
        "livenessProbe": admin_probe("/healthz", 10, 3),
        "resources": {
            "requests": { "cpu": "50m", "memory": "32Mi" },
            "limits": { "cpu": "1", "memory": "128Mi" },
        },
        "securityContext": proxy_security,
        "volumeMounts": [
            { "name": "meshid-certs", "mountPath": CERT_DIR },
            { "name": "meshid-token", "mountPath": TOKEN_DIR, "readOnly": true },
            { "name": "meshid-bundle", "mountPath": BUNDLE_DIR, "readOnly": true },
        ],
    });
    if workload_api {
        proxy["volumeMounts"]
            .as_array_mut()
            .expect("volumeMounts is a list")
            .push(socket_mount);
    }
    if !probes.is_empty() {
        let probes = Value::Object(probes).to_string();
        proxy["env"]
            .as_array_mut()
            .expect("env is a list")
            .push(json!({ "name": "MESHID_APP_PROBES", "value": probes }));
    }

    let first_app = containers[0]["name"].clone();
    let spec = template["spec"].as_object_mut().expect("checked above");
    let mut init_containers = vec![init];
    if config.native_sidecars {
        proxy["restartPolicy"] = json!("Always");
        init_containers.push(proxy);
    } else {
        // The kubelet starts containers in order and the next one only once this one's
        // postStart hook has returned: the app waits for the pod's identity.
        proxy["lifecycle"] = json!({
            "postStart": { "exec": { "command": [BINARY, "wait-ready", "--timeout=300s"] } }
        });
        new_containers.insert(0, proxy);
    }
    if let Some(existing) = spec.get("initContainers").and_then(Value::as_array) {
        init_containers.extend(existing.iter().cloned());
    }
    spec.insert("initContainers".into(), Value::Array(init_containers));
    spec.insert("containers".into(), Value::Array(new_containers));
    let mut volumes = spec
        .get("volumes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    volumes.extend([
        json!({ "name": "meshid-certs", "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" } }),
        json!({ "name": "meshid-xtables", "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" } }),
        json!({ "name": "meshid-token", "projected": { "sources": [
            { "serviceAccountToken": { "audience": "meshid-ca", "expirationSeconds": 3600, "path": "token" } }
        ] } }),
        json!({ "name": "meshid-bundle", "configMap": { "name": config.bundle_configmap } }),
    ]);
    if workload_api {
        volumes.push(
            json!({ "name": "meshid-workload-api", "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" } }),
        );
    }
    spec.insert("volumes".into(), Value::Array(volumes));

    let meta = template
        .as_object_mut()
        .expect("a template is an object")
        .entry("metadata")
        .or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    let annotations = meta
        .as_object_mut()
        .expect("an object")
        .entry("annotations")
        .or_insert_with(|| json!({}));
    if !annotations.is_object() {
        *annotations = json!({});
    }
    let annotations = annotations.as_object_mut().expect("an object");
    annotations.insert(INJECTED_ANNOTATION.into(), json!(env!("CARGO_PKG_VERSION")));
    // `kubectl logs/exec` without `-c` go to the app, not to the sidecar.
    annotations
        .entry("kubectl.kubernetes.io/default-container")
        .or_insert(json!(first_app));
    Ok(Outcome::Injected)
}

/// Rewrite an HTTP or TCP probe of container `name` to ask the sidecar's admin port, and
/// return what the sidecar must probe instead (port, path, headers; an HTTPS probe becomes a
/// TCP check: the sidecar does not speak TLS to its own app). A named port is resolved
/// against the container's ports.
fn probe_target(probe: &mut Value, container: &Value, kind: &str) -> Result<Option<Value>, String> {
    let name = container["name"].as_str().unwrap_or_default();
    let admin_path = format!("/app-health/{name}/{kind}");
    let port = |p: &Value| -> Result<u64, String> {
        match p {
            Value::Number(n) => n.as_u64().filter(|n| (1..=65535).contains(n)),
            Value::String(s) => s.parse::<u64>().ok().or_else(|| {
                container["ports"]
                    .as_array()?
                    .iter()
                    .find(|cp| cp["name"] == s.as_str())?["containerPort"]
                    .as_u64()
            }),
            _ => None,
        }
        .ok_or_else(|| format!("port {p} is neither a number nor a port name of the container"))
    };
    // The kubelet's timeout (default 1 s): the sidecar must answer within it.
    let timeout_ms = probe["timeoutSeconds"].as_u64().unwrap_or(1).max(1) * 1000;
    let mut target = if let Some(get) = probe.get("httpGet") {
        if get.get("host").is_some() || get["port"] == PROBE_PORT {
            return Ok(None);
        }
        let p = port(&get["port"])?;
        if get["scheme"] == "HTTPS" {
            json!({ "port": p, "tcp": true })
        } else {
            let path = get["path"].as_str().unwrap_or("/");
            let path = if path.starts_with('/') {
                path.to_owned()
            } else {
                format!("/{path}")
            };
            json!({
                "port": p,
                "path": path,
                "headers": get.get("httpHeaders").cloned().unwrap_or(json!([])),
            })
        }
    } else if let Some(tcp) = probe.get("tcpSocket") {
        if tcp.get("host").is_some() {
            return Ok(None);
        }
        json!({ "port": port(&tcp["port"])?, "tcp": true })
    } else if let Some(grpc) = probe.get("grpc") {
        // The sidecar speaks no gRPC health protocol to the app: it checks the port accepts.
        json!({ "port": port(&grpc["port"])?, "tcp": true })
    } else {
        return Ok(None);
    };
    target["timeout_ms"] = json!(timeout_ms);
    let Some(probe) = probe.as_object_mut() else {
        return Ok(None);
    };
    probe.remove("tcpSocket");
    probe.remove("grpc");
    probe.insert(
        "httpGet".into(),
        json!({ "path": admin_path, "port": PROBE_PORT }),
    );
    Ok(Some(target))
}

fn port_list(v: &str) -> Result<String, String> {
    let mut out = BTreeSet::new();
    for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match p.parse::<u16>() {
            Ok(n) if n != 0 => {
                out.insert(n);
            }
            _ => return Err(format!("{p:?} is not a TCP port (1-65535)")),
        }
    }
    Ok(out.iter().map(u16::to_string).collect::<Vec<_>>().join(","))
}

fn cidr_list(v: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for c in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        meshid_proto::directory::Cidr::parse(c).map_err(|e| e.to_string())?;
        out.push(c.to_owned());
    }
    Ok(out.join(","))
}

/// `meshid inject`: every document of `text`, injected. Returns the YAML and one line per
/// object saying what became of it. Nothing is returned on any error.
pub fn inject_yaml(
    text: &str,
    config: &InjectConfig,
    pass_unknown: bool,
) -> Result<(String, Vec<String>), InjectError> {
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(text).map_err(|e| InjectError {
        object: "input".into(),
        field: e
            .location()
            .map(|l| format!("line {}", l.line()))
            .unwrap_or_default(),
        message: format!(
            "not YAML: {}",
            e.without_snippet()
                .to_string()
                .lines()
                .next()
                .unwrap_or("does not parse")
        ),
    })?;
    let mut out = Vec::with_capacity(docs.len());
    let mut report = Vec::new();
    for (i, mut doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let what = describe(&doc, Some(i));
        let outcome = inject_object(&mut doc, config, Some(i), pass_unknown)?;
        report.push(format!("{what}: {}", outcome.describe()));
        out.push(doc);
    }
    let yaml = serde_saphyr::to_string_multiple(&out).map_err(|e| InjectError {
        object: "output".into(),
        field: String::new(),
        message: e.to_string(),
    })?;
    Ok((yaml, report))
}

/// Why an admission request could not be answered with an AdmissionReview.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReviewError(pub String);

/// Namespaces never injected, whatever their labels say.
pub const NEVER_INJECTED: &[&str] = &["meshid-system", "kube-system", "kube-public"];

/// The webhook: an AdmissionReview v1 request for a pod in, the AdmissionReview response out
/// (a JSONPatch when the pod is injected; allowed without one when it opted out, is injected
/// already or is not a pod; refused with the reason when it cannot be injected).
pub fn admission_review(body: &[u8], config: &InjectConfig) -> Result<Value, ReviewError> {
    let review: Value = serde_json::from_slice(body)
        .map_err(|e| ReviewError(format!("not an AdmissionReview (JSON): {e}")))?;
    if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return Err(ReviewError(
            "not an admission.k8s.io/v1 AdmissionReview".into(),
        ));
    }
    let request = &review["request"];
    let Some(uid) = request["uid"].as_str() else {
        return Err(ReviewError("the AdmissionReview has no request.uid".into()));
    };
    let respond = |response: Value| {
        let mut r = json!({ "uid": uid });
        r.as_object_mut()
            .expect("an object")
            .extend(response.as_object().expect("an object").clone());
        json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": r })
    };
    let allow = || respond(json!({ "allowed": true }));
    if request["kind"]["kind"] != "Pod" || request["operation"] != "CREATE" {
        return Ok(allow());
    }
    let namespace = request["namespace"]
        .as_str()
        .or_else(|| request["object"]["metadata"]["namespace"].as_str())
        .unwrap_or_default();
    if NEVER_INJECTED.contains(&namespace) {
        return Ok(allow());
    }
    let original = request["object"].clone();
    if !original.is_object() {
        return Ok(respond(json!({
            "allowed": false,
            "status": { "code": 400, "reason": "BadRequest", "message": "meshid: the request holds no pod (request.object)" },
        })));
    }
    let mut pod = original.clone();
    let what = describe(&pod, None);
    match inject_template(&mut pod, config, &what, "") {
        Ok(Outcome::Injected) => {}
        Ok(_) => return Ok(allow()),
        Err(e) => {
            return Ok(respond(json!({
                "allowed": false,
                "status": { "code": 400, "reason": "BadRequest", "message": format!("meshid: cannot inject the sidecar: {e}") },
            })));
        }
    }
    let patch = json_patch(&original, &pod);
    let patch = base64::engine::general_purpose::STANDARD
        .encode(serde_json::to_vec(&patch).expect("JSON serializes"));
    Ok(respond(
        json!({ "allowed": true, "patchType": "JSONPatch", "patch": patch }),
    ))
}

/// The JSONPatch (RFC 6902) from `old` to `new` for what injection changes: the members of
/// `spec` and the pod's annotations (`add` replaces a member that exists).
fn json_patch(old: &Value, new: &Value) -> Value {
    let mut ops = Vec::new();
    if let Some(spec) = new["spec"].as_object() {
        for (k, v) in spec {
            if old["spec"].get(k) != Some(v) {
                ops.push(json!({ "op": "add", "path": format!("/spec/{}", pointer_escape(k)), "value": v }));
            }
        }
    }
    if !old["metadata"].is_object() {
        ops.push(json!({ "op": "add", "path": "/metadata", "value": new["metadata"] }));
    } else if !old["metadata"]["annotations"].is_object() {
        ops.push(json!({ "op": "add", "path": "/metadata/annotations", "value": new["metadata"]["annotations"] }));
    } else if let Some(annotations) = new["metadata"]["annotations"].as_object() {
        for (k, v) in annotations {
            if old["metadata"]["annotations"].get(k) != Some(v) {
                ops.push(json!({ "op": "add", "path": format!("/metadata/annotations/{}", pointer_escape(k)), "value": v }));
            }
        }
    }
    Value::Array(ops)
}

/// A JSON pointer token (RFC 6901): `~` as `~0`, `/` as `~1`.
fn pointer_escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: orders
  namespace: shop
spec:
  selector:
    matchLabels: { app: orders }
  template:
    metadata:
      labels: { app: orders }
      annotations:
        meshid.io/exclude-outbound-cidrs: 10.96.0.1/32
    spec:
      serviceAccountName: orders
      containers:
        - name: app
          image: example/orders:1
          ports: [ { containerPort: 8080, name: http } ]
          readinessProbe:
            httpGet: { path: /healthz, port: http }
          livenessProbe:
            tcpSocket: { port: 8080 }
---
apiVersion: v1
kind: Service
metadata: { name: orders, namespace: shop }
spec:
  ports: [ { port: 8080 } ]
";

    fn injected(text: &str) -> Vec<Value> {
        let (yaml, _) = inject_yaml(text, &InjectConfig::default(), false).unwrap();
        serde_saphyr::from_str_multiple(&yaml).unwrap()
    }

    #[test]
    fn a_deployment_gets_a_native_sidecar_and_the_init_container() {
        let docs = injected(DEPLOYMENT);
        assert_eq!(docs.len(), 2);
        let spec = &docs[0]["spec"]["template"]["spec"];
        let init = &spec["initContainers"][0];
        assert_eq!(init["name"], INIT_NAME);
        assert_eq!(
            init["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
        assert_eq!(
            init["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        assert!(
            init["args"]
                .as_array()
                .unwrap()
                .contains(&json!("--exclude-outbound-cidrs=10.96.0.1/32"))
        );
        let proxy = &spec["initContainers"][1];
        assert_eq!(proxy["name"], PROXY_NAME);
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(proxy["securityContext"]["runAsUser"], PROXY_UID);
        assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
        assert!(
            proxy["args"]
                .as_array()
                .unwrap()
                .contains(&json!("--app=127.0.0.1:8080"))
        );
        // The app's probes go through the sidecar's admin port.
        let app = &spec["containers"][0];
        assert_eq!(app["readinessProbe"]["httpGet"]["port"], PROBE_PORT);
        assert_eq!(
            app["readinessProbe"]["httpGet"]["path"],
            "/app-health/app/readinessProbe"
        );
        assert_eq!(
            app["livenessProbe"]["httpGet"]["path"],
            "/app-health/app/livenessProbe"
        );
        assert!(app["livenessProbe"].get("tcpSocket").is_none());
        let env = proxy["env"].as_array().unwrap();
        let probes = env
            .iter()
            .find(|e| e["name"] == "MESHID_APP_PROBES")
            .unwrap();
        let probes: Value = serde_json::from_str(probes["value"].as_str().unwrap()).unwrap();
        assert_eq!(
            probes["app/readinessProbe"]["port"], 8080,
            "the named port, resolved"
        );
        assert_eq!(probes["app/livenessProbe"]["tcp"], true);
        let volumes = spec["volumes"].as_array().unwrap();
        let token = volumes
            .iter()
            .find(|v| v["name"] == "meshid-token")
            .unwrap();
        assert_eq!(
            token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "meshid-ca"
        );
        assert_eq!(
            docs[0]["spec"]["template"]["metadata"]["annotations"][INJECTED_ANNOTATION],
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(docs[1]["kind"], "Service");
    }

    #[test]
    fn injecting_twice_changes_nothing_and_opting_out_is_respected() {
        let once = inject_yaml(DEPLOYMENT, &InjectConfig::default(), false)
            .unwrap()
            .0;
        let (twice, report) = inject_yaml(&once, &InjectConfig::default(), false).unwrap();
        assert_eq!(once, twice);
        assert!(report[0].contains("already injected"), "{report:?}");
        let out = DEPLOYMENT.replace(
            "meshid.io/exclude-outbound-cidrs: 10.96.0.1/32",
            "meshid.io/inject: disabled",
        );
        let (yaml, report) = inject_yaml(&out, &InjectConfig::default(), false).unwrap();
        assert!(!yaml.contains(PROXY_NAME));
        assert!(report[0].contains("opted out"), "{report:?}");
    }

    #[test]
    fn the_workload_api_annotation_shares_a_socket_with_every_app_container() {
        let text = DEPLOYMENT.replace(
            "meshid.io/exclude-outbound-cidrs: 10.96.0.1/32",
            "meshid.io/workload-api: enabled",
        );
        let docs = injected(&text);
        let spec = &docs[0]["spec"]["template"]["spec"];
        let proxy = &spec["initContainers"][1];
        let socket = format!("{WORKLOAD_API_DIR}/socket");
        assert!(
            proxy["args"]
                .as_array()
                .unwrap()
                .contains(&json!(format!("--workload-api-socket={socket}")))
        );
        let mount = json!({ "name": "meshid-workload-api", "mountPath": WORKLOAD_API_DIR });
        assert!(proxy["volumeMounts"].as_array().unwrap().contains(&mount));
        let app = &spec["containers"][0];
        let mut read_only = mount.clone();
        read_only["readOnly"] = json!(true);
        assert!(app["volumeMounts"].as_array().unwrap().contains(&read_only));
        assert!(app["env"].as_array().unwrap().contains(
            &json!({ "name": "SPIFFE_ENDPOINT_SOCKET", "value": format!("unix://{socket}") })
        ));
        assert!(
            spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == "meshid-workload-api" && v["emptyDir"].is_object())
        );
        // Without the annotation, none of it.
        let plain = injected(DEPLOYMENT);
        let yaml = serde_json::to_string(&plain).unwrap();
        assert!(!yaml.contains("workload-api"), "{yaml}");
        // A value that is neither: refused, naming the annotation.
        let bad = DEPLOYMENT.replace(
            "meshid.io/exclude-outbound-cidrs: 10.96.0.1/32",
            "meshid.io/workload-api: maybe",
        );
        let e = inject_yaml(&bad, &InjectConfig::default(), false).unwrap_err();
        assert!(e.to_string().contains("meshid.io/workload-api"), "{e}");
    }

    #[test]
    fn the_older_layout_holds_the_app_until_ready() {
        let config = InjectConfig {
            native_sidecars: false,
            ..InjectConfig::default()
        };
        let (yaml, _) = inject_yaml(DEPLOYMENT, &config, false).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_str_multiple(&yaml).unwrap();
        let spec = &docs[0]["spec"]["template"]["spec"];
        assert_eq!(spec["containers"][0]["name"], PROXY_NAME);
        assert!(spec["containers"][0].get("restartPolicy").is_none());
        assert_eq!(
            spec["containers"][0]["lifecycle"]["postStart"]["exec"]["command"][1],
            "wait-ready"
        );
        assert_eq!(spec["initContainers"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn bad_input_is_refused_naming_the_document_and_field() {
        let e = inject_yaml("kind: [unclosed", &InjectConfig::default(), false).unwrap_err();
        assert!(e.message.starts_with("not YAML"), "{e}");
        let e = inject_yaml(
            "apiVersion: example.com/v1\nkind: Rollout\nmetadata: { name: r }\n",
            &InjectConfig::default(),
            false,
        )
        .unwrap_err();
        assert_eq!(e.object, "document 1 (Rollout r)");
        assert_eq!(e.field, "kind");
        assert!(
            inject_yaml(
                "apiVersion: example.com/v1\nkind: Rollout\nmetadata: { name: r }\n",
                &InjectConfig::default(),
                true
            )
            .is_ok()
        );
        let no_containers = "---\napiVersion: v1\nkind: Service\nmetadata: { name: s }\n---\napiVersion: v1\nkind: Pod\nmetadata: { name: p }\nspec:\n  containers: []\n";
        let e = inject_yaml(no_containers, &InjectConfig::default(), false).unwrap_err();
        assert_eq!(e.object, "document 2 (Pod p)");
        assert_eq!(e.field, "spec.containers");
        let bad_port = DEPLOYMENT.replace(
            "meshid.io/exclude-outbound-cidrs: 10.96.0.1/32",
            "meshid.io/exclude-inbound-ports: \"80,99999\"",
        );
        let e = inject_yaml(&bad_port, &InjectConfig::default(), false).unwrap_err();
        assert_eq!(
            e.field,
            "spec.template.metadata.annotations[meshid.io/exclude-inbound-ports]"
        );
        assert!(e.message.contains("99999"), "{e}");
        let e = inject_yaml("just a string\n", &InjectConfig::default(), false).unwrap_err();
        assert!(e.message.contains("not a Kubernetes object"), "{e}");
    }

    #[test]
    fn admission_reviews_get_a_patch_that_injects_the_pod() {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "generateName": "orders-", "namespace": "shop", "labels": { "app": "orders" } },
            "spec": { "containers": [ { "name": "app", "image": "example/orders:1" } ] },
        });
        let review = |object: Value, namespace: &str| {
            json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {
                    "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                    "kind": { "group": "", "version": "v1", "kind": "Pod" },
                    "resource": { "group": "", "version": "v1", "resource": "pods" },
                    "namespace": namespace, "operation": "CREATE", "object": object,
                },
            })
        };
        let body = serde_json::to_vec(&review(pod.clone(), "shop")).unwrap();
        let out = admission_review(&body, &InjectConfig::default()).unwrap();
        let response = &out["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch: Value = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(response["patch"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        let paths: Vec<&str> = patch
            .as_array()
            .unwrap()
            .iter()
            .map(|op| op["path"].as_str().unwrap())
            .collect();
        assert!(paths.contains(&"/spec/initContainers"), "{paths:?}");
        assert!(paths.contains(&"/spec/volumes"), "{paths:?}");
        assert!(paths.contains(&"/metadata/annotations"), "{paths:?}");
        // The control plane's namespace is never injected.
        let body = serde_json::to_vec(&review(pod, "meshid-system")).unwrap();
        let out = admission_review(&body, &InjectConfig::default()).unwrap();
        assert!(out["response"].get("patch").is_none());
        assert!(admission_review(b"{", &InjectConfig::default()).is_err());
    }
}
