//! `meshid check` against a live mesh (the real CA and sidecars), and `--config FILE` for
//! `ca serve` and `sidecar` with its precedence (flag > environment > file > default).

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::mesh::shop;
use crate::rotation::operator;
use crate::support::{Ca, free_addr, http_get, meshid, run, stderr};

/// `meshid check --output json`: its exit code and the checks by name.
async fn check_json(ca: &str, bundle: &Path, cert_dir: Option<&Path>) -> (i32, Vec<Value>) {
    let mut args = vec![
        "check".to_owned(),
        "--ca".to_owned(),
        ca.to_owned(),
        "--ca-bundle".to_owned(),
        bundle.display().to_string(),
        "--output".to_owned(),
        "json".to_owned(),
    ];
    if let Some(d) = cert_dir {
        args.extend(["--cert-dir".to_owned(), d.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&args).await;
    let lines: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "meshid check prints a JSON array ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        )
    });
    (out.status.code().expect("exit code"), lines)
}

/// The line of check `name`: (status, message).
fn line(lines: &[Value], name: &str) -> (String, String) {
    let l = lines
        .iter()
        .find(|l| l["check"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {lines:#?}"));
    (
        l["status"].as_str().unwrap().to_owned(),
        l["message"].as_str().unwrap().to_owned(),
    )
}

fn not_ok(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l["status"] != "ok").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshid_check_reports_a_healthy_mesh_and_what_is_wrong() {
    let shop = shop(&[]).await;
    let ca = &shop.ca;
    let bundle = ca.bundle_file().await;

    // Healthy: every line ok, exit 0, the policy in force and who this workload is.
    let (code, lines) = check_json(&ca.addr(), &bundle, Some(&shop.orders.cert_dir)).await;
    assert_eq!(code, 0, "{lines:#?}");
    assert!(not_ok(&lines).is_empty(), "{lines:#?}");
    for name in [
        "ca",
        "intermediate",
        "roots",
        "bundle",
        "rotation",
        "token-keys",
        "clock",
        "svid",
        "policy",
        "workload",
    ] {
        line(&lines, name);
    }
    assert!(
        line(&lines, "ca")
            .1
            .contains("spiffe://cluster.local/meshid/ca")
    );
    assert!(line(&lines, "svid").1.contains("ns/shop/sa/orders"));
    assert!(line(&lines, "clock").1.contains("within a second"));
    let (_, policy) = line(&lines, "policy");
    assert!(
        policy.contains("sequence") && policy.contains("services"),
        "{policy}"
    );
    let (_, workload) = line(&lines, "workload");
    assert!(
        workload.contains("service orders: called by billing, frontend"),
        "{workload}"
    );

    // The text form a person reads, with the summary line.
    let out = run(&[
        "check",
        "--ca",
        &ca.addr(),
        "--ca-bundle",
        bundle.to_str().unwrap(),
        "--cert-dir",
        shop.orders.cert_dir.to_str().unwrap(),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("ok    ca "), "{text}");
    assert!(
        text.contains("ok    workload      this sidecar is service orders"),
        "{text}"
    );
    assert!(
        text.contains("10 ok, 0 warning(s), 0 failed, 0 skipped"),
        "{text}"
    );

    // Nobody listens: a failure, exit 1, and what to check.
    let (code, lines) = check_json(&free_addr().to_string(), &bundle, None).await;
    assert_eq!(code, 1, "{lines:#?}");
    let (status, message) = line(&lines, "ca");
    assert_eq!(status, "fail");
    assert!(message.contains("cannot connect"), "{message}");
    assert!(
        lines[0]["fix"].as_str().unwrap().contains("--ca"),
        "{lines:#?}"
    );

    // A bundle of another mesh: the CA cannot prove who it is.
    let other = Ca::start(&[]).await;
    let other_bundle = other.bundle_file().await;
    let (code, lines) = check_json(&ca.addr(), &other_bundle, None).await;
    assert_eq!(code, 1, "{lines:#?}");
    let (status, message) = line(&lines, "ca");
    assert_eq!(status, "fail");
    assert!(message.contains("does not prove it is"), "{message}");

    // A root rotation prepared: a bundle file from before it lacks the new root (a warning,
    // exit 2), the rotation is reported as under way; a fresh bundle is all ok again.
    let (ok, out) = operator(ca, "rotate", &["prepare", "--what", "root"]).await;
    assert!(ok, "{out}");
    let (code, lines) = check_json(&ca.addr(), &bundle, Some(&shop.orders.cert_dir)).await;
    assert_eq!(code, 2, "{lines:#?}");
    let (status, message) = line(&lines, "bundle");
    assert_eq!(status, "warn");
    assert!(message.contains("lacks 1 of the CA's roots"), "{message}");
    assert_eq!(not_ok(&lines).len(), 1, "only the bundle warns: {lines:#?}");
    assert!(
        line(&lines, "rotation")
            .1
            .contains("2 roots trusted at once")
    );
    let fresh = ca.bundle_file().await;
    let (code, lines) = check_json(&ca.addr(), &fresh, Some(&shop.orders.cert_dir)).await;
    assert_eq!(code, 0, "{lines:#?}");

    // A usage mistake is a failure (exit 1), not a warning (2).
    let out = run(&["check", "--ca-bundle", fresh.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--ca"), "{}", stderr(&out));

    // An SVID directory that is not one.
    let empty = tempfile::tempdir().unwrap();
    let (code, lines) = check_json(&ca.addr(), &fresh, Some(empty.path())).await;
    assert_eq!(code, 1, "{lines:#?}");
    assert_eq!(line(&lines, "svid").0, "fail");
    assert_eq!(line(&lines, "policy").0, "skip");
}

async fn wait_until_listening(addr: std::net::SocketAddr, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} not listening on {addr} after 30 s: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn output_of(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = meshid();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().await.expect("meshid runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_a_config_file_below_flags_and_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();

    // The CA from a file alone, keys spelled with dashes or underscores.
    let (grpc, http, admin) = (free_addr(), free_addr(), free_addr());
    let data_dir = work.join("ca");
    let ca_config = work.join("ca.yaml");
    std::fs::write(
        &ca_config,
        format!(
            "# the CA's settings\ndata-dir: {}\ngrpc_addr: {grpc}\nhttp-addr: {http}\nadmin-addr: {admin}\nsvid-ttl: 2h\n",
            data_dir.display()
        ),
    )
    .unwrap();
    let ca_log = work.join("ca.log");
    let _ca = meshid()
        .args(["ca", "serve", "--config"])
        .arg(&ca_config)
        .stderr(std::fs::File::create(&ca_log).unwrap())
        .spawn()
        .unwrap();
    wait_until_listening(grpc, "the CA", &ca_log).await;
    wait_until_listening(admin, "the CA's admin port", &ca_log).await;
    assert!(
        std::fs::read_to_string(&ca_log)
            .unwrap()
            .contains("settings from --config"),
        "the CA says where its settings came from"
    );
    let bundle = work.join("bundle.pem");
    let pem = run(&["ca", "bundle", "--data-dir", data_dir.to_str().unwrap()]).await;
    assert!(pem.status.success(), "{}", stderr(&pem));
    std::fs::write(&bundle, &pem.stdout).unwrap();
    let token = run(&[
        "ca",
        "join-token",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--spiffe-id",
        "spiffe://cluster.local/ns/shop/sa/orders",
        "--reusable",
    ])
    .await;
    assert!(token.status.success(), "{}", stderr(&token));
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();

    // A sidecar from a file; the admin address in the file is overridden by the flag, the
    // inbound address by the environment; the rest comes from the file.
    let (file_admin, flag_admin) = (free_addr(), free_addr());
    let (file_inbound, env_inbound) = (free_addr(), free_addr());
    let cert_dir = work.join("certs");
    let sidecar_config = work.join("sidecar.yaml");
    std::fs::write(
        &sidecar_config,
        format!(
            "ca: 127.0.0.1:{}\nca-bundle: {}\njoin-token: {token}\ncert-dir: {}\napp: 127.0.0.1:9\ninbound-addr: {file_inbound}\noutbound-addr: {}\nadmin-addr: {file_admin}\nroute: [a=127.0.0.1:1, b=127.0.0.1:2]\naccess-log-allowed: true\n",
            grpc.port(),
            bundle.display(),
            cert_dir.display(),
            free_addr(),
        ),
    )
    .unwrap();
    let sidecar_log = work.join("sidecar.log");
    let _sidecar = meshid()
        .args(["sidecar", "--admin-addr", &flag_admin.to_string()])
        .env("MESHID_CONFIG", &sidecar_config)
        .env("MESHID_INBOUND_ADDR", env_inbound.to_string())
        .stderr(std::fs::File::create(&sidecar_log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(flag_admin, "/ready").await.map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "sidecar not ready on the flag's admin address: {}",
            std::fs::read_to_string(&sidecar_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tokio::net::TcpStream::connect(file_admin).await.is_err(),
        "the flag beats the file"
    );
    assert!(
        tokio::net::TcpStream::connect(env_inbound).await.is_ok(),
        "the environment beats the file"
    );
    assert!(tokio::net::TcpStream::connect(file_inbound).await.is_err());
    assert!(
        cert_dir.join("svid.pem").exists(),
        "the file's cert-dir is used"
    );
    let svid = run(&["inspect", cert_dir.join("svid.pem").to_str().unwrap()]).await;
    assert!(
        String::from_utf8_lossy(&svid.stdout).contains("ns/shop/sa/orders"),
        "{}",
        String::from_utf8_lossy(&svid.stdout)
    );
    let log = std::fs::read_to_string(&sidecar_log).unwrap();
    assert!(
        !log.contains(&token),
        "the join token from the file is never logged"
    );

    // A mistake in the file: refused before anything starts, with the line and the keys.
    let bad = work.join("bad.yaml");
    std::fs::write(&bad, "cert-dir: /tmp/x\n\nadmin-adr: 127.0.0.1:1\n").unwrap();
    let out = output_of(&["sidecar", "--config", bad.to_str().unwrap()], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("line 3: unknown key \"admin-adr\""), "{e}");
    assert!(e.contains("admin-addr"), "the known keys are listed: {e}");
    // A value from the file is checked as the same flag would be.
    std::fs::write(&bad, "workers: many\n").unwrap();
    let out = output_of(&["sidecar", "--config", bad.to_str().unwrap()], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--workers"), "{}", stderr(&out));
    let out = output_of(&["ca", "serve", "--config", "/nonexistent/ca.yaml"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--config /nonexistent/ca.yaml"),
        "{}",
        stderr(&out)
    );
}
