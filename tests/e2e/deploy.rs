//! What a newcomer and an operator run: the quick-start script, and the Kubernetes manifests,
//! which must start the real binary with exactly the flags they carry.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{free_addr, meshid};

#[tokio::test]
async fn the_quickstart_script_runs_end_to_end() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart.sh");
    let out = tokio::process::Command::new("bash")
        .arg(script)
        .env("MESHID", env!("CARGO_BIN_EXE_meshid"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("quickstart: OK"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("spiffe id:  spiffe://cluster.local/ns/shop/sa/frontend"));
    assert!(
        stdout.contains("audience:   spiffe://cluster.local/ns/shop/sa/orders"),
        "{stdout}"
    );
    assert!(stdout.contains("scopes:     orders:read"), "{stdout}");
    assert!(stdout.contains(r#""error":"invalid_scope""#), "{stdout}");
}

/// The container args of the rendered CA Deployment.
fn rendered_ca_args() -> Vec<String> {
    let out = std::process::Command::new("kubectl")
        .args([
            "kustomize",
            concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/base"),
        ])
        .output()
        .expect("kubectl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(yaml.contains("kind: ClusterRoleBinding") && yaml.contains("system:auth-delegator"));
    let docs: Vec<serde_json::Value> = serde_saphyr::from_str_multiple(&yaml).unwrap();
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "meshid-ca")
        .expect("the CA Deployment");
    assert_eq!(deployment["metadata"]["namespace"], "meshid-system");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["name"], "ca");
    assert_eq!(
        container["image"],
        format!("ghcr.io/meshid/meshid:v{}", env!("CARGO_PKG_VERSION"))
    );
    container["args"]
        .as_array()
        .expect("the CA container has args")
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_ca_manifest_starts_the_real_binary() {
    let args = rendered_ca_args();
    assert_eq!(&args[..2], ["ca", "serve"]);
    let tmp = tempfile::tempdir().unwrap();
    let (addr, http_addr, admin_addr) = (free_addr(), free_addr(), free_addr());
    assert!(
        args.contains(&"--bundle-configmap-namespace-selector=meshid.io/inject=enabled".to_owned()),
        "the CA keeps the bundle ConfigMap of meshed namespaces current: {args:?}"
    );
    // Same flags, with the pod's paths and port mapped onto this machine; without the
    // bundle publisher, which needs an API server (`bundle_configmap` tests it against one).
    let args: Vec<String> = args
        .into_iter()
        .filter(|a| !a.starts_with("--bundle-configmap-namespace-selector="))
        .map(|a| match a.split_once('=') {
            Some(("--data-dir", _)) => format!("--data-dir={}", tmp.path().display()),
            Some(("--grpc-addr", _)) => format!("--grpc-addr={addr}"),
            Some(("--http-addr", _)) => format!("--http-addr={http_addr}"),
            Some(("--admin-addr", _)) => format!("--admin-addr={admin_addr}"),
            // The ConfigMap's file, from the same source kustomize generated it from.
            Some(("--policy", _)) => format!(
                "--policy={}",
                concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/base/policy.yaml")
            ),
            _ => a,
        })
        .collect();
    assert!(
        args.iter().any(|a| a.starts_with("--http-addr=")),
        "the manifest sets --http-addr"
    );
    let mut child = meshid().args(&args).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().await.unwrap();
            panic!(
                "CA from the manifest exited {status}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            Instant::now() < deadline,
            "CA from the manifest is not listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Kubernetes stops a pod with SIGTERM: the CA exits cleanly, and promptly.
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the CA stops within 10 s of SIGTERM")
        .unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    // --log-format=json from the manifest: every log line is JSON.
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.lines().count() > 0);
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|_| panic!("not JSON: {line}"));
    }
}
