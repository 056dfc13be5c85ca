//! Several CA replicas sharing one CA through the Kubernetes API (`--store kubernetes`), against
//! the fake API server of [`crate::fake_k8s`]: two replicas started at once on an empty store
//! end with one root; an SVID issued by one renews on the other; a single-use join token is
//! spent once across both; a rotation begun on one is finished on the other; and under traffic
//! through a sidecar pair that knows both replicas, killing one (SIGKILL) again and again fails
//! no request while every renewal completes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use crate::fake_k8s::FakeApiServer;
use crate::rotation::{POLICY, Traffic, metric, orders_app};
use crate::support::{Ca, Sidecar, SidecarPorts, free_addr, openssl_verify, run};

const NAMESPACE: &str = "meshid";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

/// The flags of every command that works on the cluster store.
fn store_flags(api: &FakeApiServer) -> Vec<String> {
    let mut f = vec![
        "--store".to_owned(),
        "kubernetes".to_owned(),
        "--store-namespace".to_owned(),
        NAMESPACE.to_owned(),
    ];
    f.extend(api.flags());
    f
}

/// Where a replica runs: its own data directory (audit log, admin credential) and ports, kept
/// across restarts.
#[derive(Clone)]
struct Replica {
    name: String,
    data_dir: PathBuf,
    work: PathBuf,
    addr: SocketAddr,
    http_addr: SocketAddr,
}

impl Replica {
    fn new(work: &Path, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            data_dir: work.join(name),
            work: work.to_path_buf(),
            addr: free_addr(),
            http_addr: free_addr(),
        }
    }

    async fn start(&self, api: &FakeApiServer, extra: &[&str]) -> Ca {
        let mut args = store_flags(api);
        // One issuer for every replica: the CA's Service.
        args.extend([
            "--replica-name".to_owned(),
            self.name.clone(),
            "--issuer".to_owned(),
            "https://meshid-ca.meshid.svc:8444".to_owned(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Ca::start_on(
            self.data_dir.clone(),
            self.work.clone(),
            self.addr,
            self.http_addr,
            &args,
        )
        .await
    }
}

/// `meshid ca ARGS` on the cluster store: (exit ok, stdout, stderr).
async fn ca_cmd(api: &FakeApiServer, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["ca".to_owned()];
    all.extend(args.iter().map(|s| s.to_string()));
    all.extend(store_flags(api));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = run(&all).await;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `meshid ca bundle` from the cluster store, written to `path`.
async fn bundle_file(api: &FakeApiServer, path: &Path) -> String {
    let (ok, pem, err) = ca_cmd(api, &["bundle"]).await;
    assert!(ok, "meshid ca bundle --store kubernetes: {err}");
    std::fs::write(path, &pem).unwrap();
    pem
}

async fn join_token(api: &FakeApiServer, id: &str, extra: &[&str]) -> String {
    let mut args = vec!["join-token", "--spiffe-id", id];
    args.extend_from_slice(extra);
    let (ok, out, err) = ca_cmd(api, &args).await;
    assert!(ok, "meshid ca join-token --store kubernetes: {err}");
    out.trim().to_owned()
}

/// A join token made while the API server is up, for use once it is down.
async fn join_token_while_up(api: &FakeApiServer, id: &str) -> String {
    api.cluster.lock().unwrap().set_down(false);
    let token = join_token(api, id, &[]).await;
    api.cluster.lock().unwrap().set_down(true);
    token
}

/// A JSON document the store keeps in a Secret, decoded.
fn secret_doc(api: &FakeApiServer, name: &str, key: &str) -> Value {
    let secret = api
        .cluster
        .lock()
        .unwrap()
        .get("secrets", NAMESPACE, name)
        .unwrap_or_else(|| panic!("Secret {name} exists"));
    assert_eq!(secret["type"], "Opaque");
    let b64 = secret["data"][key].as_str().unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

async fn svid_fetch(ca: &Ca, bundle: &Path, token: &str, out: &Path) -> std::process::Output {
    run(&[
        "svid",
        "fetch",
        "--ca",
        &ca.addr(),
        "--ca-bundle",
        bundle.to_str().unwrap(),
        "--join-token",
        token,
        "--out",
        out.to_str().unwrap(),
        "--timeout",
        "5s",
    ])
    .await
}

async fn svid_renew(ca: &Ca, dir: &Path) -> std::process::Output {
    run(&[
        "svid",
        "renew",
        "--ca",
        &ca.addr(),
        "--cert-dir",
        dir.to_str().unwrap(),
        "--timeout",
        "5s",
    ])
    .await
}

fn serial_of(dir: &Path) -> String {
    let pem = std::fs::read(dir.join("svid.pem")).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = p.parse_x509().unwrap();
    cert.raw_serial_as_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_started_at_once_make_one_ca_and_share_its_work() {
    let tmp = tempfile::tempdir().unwrap();
    let api = crate::fake_k8s::start(tmp.path(), Default::default()).await;
    // Both replicas read the empty store before either writes: a real race for the first key.
    api.cluster.lock().unwrap().get_barrier = Some((
        "meshid-ca-authorities".into(),
        Arc::new(tokio::sync::Barrier::new(2)),
    ));
    let (r0, r1) = (
        Replica::new(tmp.path(), "ca-0"),
        Replica::new(tmp.path(), "ca-1"),
    );
    let (ca0, ca1) = tokio::join!(r0.start(&api, &[]), r1.start(&api, &[]));

    // One CA: one authority and one token key in the store; the loser of the race said so.
    let authorities = secret_doc(&api, "meshid-ca-authorities", "authorities.json");
    assert_eq!(authorities.as_array().unwrap().len(), 1, "{authorities}");
    let keys = secret_doc(&api, "meshid-ca-token-keys", "token-keys.json");
    assert_eq!(keys.as_array().unwrap().len(), 1);
    let conflicts = api.cluster.lock().unwrap().conflicts.clone();
    assert!(
        conflicts
            .iter()
            .any(|(what, reason)| what == "secrets/meshid-ca-authorities"
                && reason == "AlreadyExists"),
        "the second replica's create was refused with 409: {conflicts:?}"
    );
    let (log0, log1) = (ca0.log(), ca1.log());
    assert!(
        (log0 + &log1).contains("another CA replica created the CA first"),
        "the replica that lost says so"
    );
    // Keys are Secrets' business: nothing of them in the ConfigMaps.
    let configmaps = api.cluster.lock().unwrap().names("configmaps", NAMESPACE);
    for name in configmaps {
        let cm = api
            .cluster
            .lock()
            .unwrap()
            .get("configmaps", NAMESPACE, &name)
            .unwrap();
        assert!(!cm.to_string().contains("PRIVATE KEY"), "{name}");
    }

    let bundle = tmp.path().join("bundle.pem");
    let pem = bundle_file(&api, &bundle).await;
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 1, "{pem}");

    // Issued by ca-0, renewed by ca-1: the renewal is verified against the one root, and
    // ca-1 accepts the SVID ca-0 signed.
    let token = join_token(&api, ORDERS, &[]).await;
    let dir = tmp.path().join("orders");
    let out = svid_fetch(&ca0, &bundle, &token, &dir).await;
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let first = serial_of(&dir);
    let out = svid_renew(&ca1, &dir).await;
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    assert_ne!(serial_of(&dir), first, "a new SVID");
    openssl_verify(&dir.join("svid.pem"), &bundle).unwrap();

    // A single-use join token presented to both replicas at once is spent exactly once.
    for round in 0..3 {
        let token = join_token(&api, FRONTEND, &[]).await;
        let (a, b) = (
            tmp.path().join(format!("a{round}")),
            tmp.path().join(format!("b{round}")),
        );
        let (oa, ob) = tokio::join!(
            svid_fetch(&ca0, &bundle, &token, &a),
            svid_fetch(&ca1, &bundle, &token, &b)
        );
        let won = [&oa, &ob].iter().filter(|o| o.status.success()).count();
        assert_eq!(
            won,
            1,
            "round {round}: exactly one replica accepts it: {} / {}",
            crate::support::stderr(&oa),
            crate::support::stderr(&ob)
        );
        let lost = if oa.status.success() { &ob } else { &oa };
        assert!(
            crate::support::stderr(lost).contains("join token was already used"),
            "{}",
            crate::support::stderr(lost)
        );
    }
    // The API server away: both replicas keep renewing with the CA they hold; what needs the
    // shared store (spending a join token) is answered "unavailable, retry", and the client's
    // retry succeeds once the API server is back.
    api.cluster.lock().unwrap().set_down(true);
    let out = svid_renew(&ca0, &dir).await;
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let spare = join_token_while_up(&api, FRONTEND).await;
    let fetching = {
        let (addr, bundle, out) = (ca1.addr(), bundle.clone(), tmp.path().join("down"));
        tokio::spawn(async move {
            run(&[
                "svid",
                "fetch",
                "--ca",
                &addr,
                "--ca-bundle",
                bundle.to_str().unwrap(),
                "--join-token",
                &spare,
                "--out",
                out.to_str().unwrap(),
                "--timeout",
                "20s",
            ])
            .await
        })
    };
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    api.cluster.lock().unwrap().set_down(false);
    let out = fetching.await.unwrap();
    let err = crate::support::stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        down_at.elapsed() >= Duration::from_millis(1900),
        "the join token could not have been spent while the API server was away"
    );

    // The join token's record is a Secret holding no token, only its hash names it.
    let names = api.cluster.lock().unwrap().names("secrets", NAMESPACE);
    assert!(names.iter().any(|n| n.starts_with("meshid-join-")));
    for n in &names {
        assert!(!n.contains(&token), "{n}");
    }
}

/// `meshid ca rotate ARGS` against one replica (its admin endpoint, through its data
/// directory): (ok, output).
async fn rotate(ca: &Ca, args: &[&str]) -> (bool, String) {
    crate::rotation::operator(ca, "rotate", args).await
}

async fn status(ca: &Ca) -> Value {
    let (ok, out) = rotate(ca, &["status", "--json"]).await;
    assert!(ok, "{out}");
    serde_json::from_str(&out).unwrap()
}

fn states(status: &Value) -> Vec<String> {
    status["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["state"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_begun_on_one_replica_is_finished_on_the_other() {
    let tmp = tempfile::tempdir().unwrap();
    let api = crate::fake_k8s::start(tmp.path(), Default::default()).await;
    let (r0, r1) = (
        Replica::new(tmp.path(), "ca-0"),
        Replica::new(tmp.path(), "ca-1"),
    );
    let off = ["--auto-rotate", "false"];
    let ca0 = r0.start(&api, &off).await;
    let ca1 = r1.start(&api, &off).await;
    let bundle = tmp.path().join("bundle.pem");
    let old_root = bundle_file(&api, &bundle).await;
    let dir = tmp.path().join("orders");
    let token = join_token(&api, ORDERS, &[]).await;
    let out = svid_fetch(&ca0, &bundle, &token, &dir).await;
    assert!(out.status.success(), "{}", crate::support::stderr(&out));

    // Prepared on ca-0: ca-1 has it within seconds (it watches the Secrets).
    let (ok, out) = rotate(&ca0, &["prepare", "--what", "root"]).await;
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !states(&status(&ca1).await).contains(&"prepared".to_owned()) {
        assert!(
            Instant::now() < deadline,
            "ca-1 never saw the prepared root"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Activated on ca-1, once ca-0's record says it has the prepared root in force (its
    // sidecars trust it then).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out) = rotate(&ca1, &["activate", "--what", "root"]).await;
        if ok {
            break;
        }
        assert!(
            out.contains("has not caught up") && Instant::now() < deadline,
            "{out}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // ca-1 refuses to retire: at first because ca-0 has not yet put the activation in force
    // (it could still sign under the old root), then because the SVID ca-0 issued under the
    // old root is live.
    let (ok, out) = rotate(&ca1, &["retire", "--what", "root"]).await;
    assert!(!ok, "retire must wait: {out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let (ok, out) = rotate(&ca1, &["retire", "--what", "root"]).await;
        assert!(!ok, "retire must wait for the SVID ca-0 issued: {out}");
        if !out.contains("has not caught up") {
            break out;
        }
        assert!(Instant::now() < deadline, "ca-0 never caught up: {out}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(out.contains("live SVID") && out.contains(ORDERS), "{out}");
    let st = status(&ca0).await;
    assert_eq!(
        states(&st).iter().filter(|s| *s == "active").count(),
        1,
        "ca-0 sees ca-1's activation: {st}"
    );

    // The holder renews on ca-1 (under the new root; it trusts both, as a sidecar does once
    // its bundle stream brings the prepared root); then ca-0 retires the old root.
    bundle_file(&api, &dir.join("bundle.pem")).await;
    let out = svid_renew(&ca1, &dir).await;
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ok, out) = rotate(&ca0, &["retire", "--what", "root"]).await;
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ca-0 never learnt that ca-1 saw the old SVID renewed: {out}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let new_root = bundle_file(&api, &bundle).await;
    assert_eq!(new_root.matches("BEGIN CERTIFICATE").count(), 1);
    assert_ne!(new_root, old_root);
    openssl_verify(&dir.join("svid.pem"), &bundle).unwrap();
    // Both replicas serve the new root only: a fresh SVID from either chains to it.
    for (ca, name) in [(&ca0, "after0"), (&ca1, "after1")] {
        let token = join_token(&api, FRONTEND, &[]).await;
        let out = svid_fetch(ca, &bundle, &token, &tmp.path().join(name)).await;
        assert!(out.status.success(), "{}", crate::support::stderr(&out));
        openssl_verify(&tmp.path().join(name).join("svid.pem"), &bundle).unwrap();
    }
    let st = status(&ca1).await;
    assert_eq!(states(&st), vec!["active".to_owned()], "{st}");

    // A revocation made on ca-0 is in force on ca-1 within seconds, and lifted there.
    let after1 = tmp.path().join("after1");
    let (ok, out) = crate::rotation::operator(&ca0, "revoke", &["--spiffe-id", FRONTEND]).await;
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = svid_renew(&ca1, &after1).await;
        if !out.status.success() {
            let err = crate::support::stderr(&out);
            assert!(err.contains("revoked"), "{err}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ca-1 still renews a revoked identity"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (ok, out) = crate::rotation::operator(&ca1, "unrevoke", &["--spiffe-id", FRONTEND]).await;
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !svid_renew(&ca0, &after1).await.status.success() {
        assert!(
            Instant::now() < deadline,
            "ca-0 never saw the revocation lifted"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_ca_replicas_under_traffic_fails_no_request() {
    let tmp = tempfile::tempdir().unwrap();
    let api = crate::fake_k8s::start(tmp.path(), Default::default()).await;
    let policy = tmp.path().join("policy.yaml");
    std::fs::write(&policy, POLICY.replace("OPAQUE_PORT", "9")).unwrap();
    // SVIDs renew about every 30 s and tokens about every 10 s: several of each per replica
    // outage over the test.
    let args = [
        "--policy",
        policy.to_str().unwrap(),
        "--svid-ttl",
        "1m",
        "--token-ttl",
        "20s",
    ];
    let replicas = [
        Replica::new(tmp.path(), "ca-0"),
        Replica::new(tmp.path(), "ca-1"),
    ];
    let mut cas = [
        Some(replicas[0].start(&api, &args).await),
        Some(replicas[1].start(&api, &args).await),
    ];
    let both = format!("{},{}", replicas[0].addr, replicas[1].addr);
    let bundle = tmp.path().join("bundle.pem");
    bundle_file(&api, &bundle).await;

    let stream_stop = Arc::new(AtomicBool::new(false));
    let orders_ports = SidecarPorts::new();
    let app = orders_app(stream_stop.clone()).await;
    let orders_token = join_token(&api, ORDERS, &["--reusable"]).await;
    let mut orders = Sidecar::spawn(
        &both,
        &bundle,
        tmp.path(),
        "orders",
        &orders_token,
        app,
        orders_ports,
        &[],
    );
    let frontend_token = join_token(&api, FRONTEND, &["--reusable"]).await;
    let frontend_app = orders_app(Arc::new(AtomicBool::new(true))).await;
    let mut frontend = Sidecar::spawn(
        &both,
        &bundle,
        tmp.path(),
        "frontend",
        &frontend_token,
        frontend_app,
        SidecarPorts::new(),
        &[format!("orders={}", orders_ports.inbound)],
    );
    orders.ready().await;
    frontend.ready().await;

    let started = Instant::now();
    let traffic = Traffic::start(frontend.outbound, stream_stop.clone());
    let renewals = |s: &Sidecar| {
        let s = s.admin;
        async move {
            let (_, body) = crate::support::http_get(s, "/metrics").await.unwrap();
            (
                crate::support::sample(&body, "meshid_svid_renewals_total"),
                crate::support::sample(&body, "meshid_svid_renewal_failures_total"),
            )
        }
    };
    let (f0, _) = renewals(&frontend).await;
    let (o0, _) = renewals(&orders).await;
    for round in 0..4 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let which = round % 2;
        let ca = cas[which].take().unwrap();
        ca.stop().await;
        eprintln!("round {round}: replica ca-{which} killed");
        tokio::time::sleep(Duration::from_secs(8)).await;
        cas[which] = Some(replicas[which].start(&api, &args).await);
    }
    // Renewals kept completing throughout; each sidecar renewed at least once more after
    // the last restart.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (f, _) = renewals(&frontend).await;
        let (o, _) = renewals(&orders).await;
        if f >= f0 + 2.0 && o >= o0 + 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "renewals: frontend {f0} -> {f}, orders {o0} -> {o}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for s in [&frontend, &orders] {
        let (_, failed) = renewals(s).await;
        assert_eq!(failed, 0.0, "a renewal failed: {}", s.log());
    }
    assert!(
        metric(&frontend, "meshid_ca_stream_breaks_total").await >= 2.0,
        "the frontend's watch streams moved between replicas"
    );
    // Both replicas did the work: the sidecars moved to each (renewals and token grants).
    for ca in cas.iter().flatten() {
        let served = ca
            .audit()
            .iter()
            .filter(|r| {
                (r["event"] == "x509_svid_renew" && r["outcome"] == "issued")
                    || (r["event"] == "token_grant" && r["outcome"] == "granted")
            })
            .count();
        assert!(served > 0, "replica {} served no sidecar", ca.addr);
    }
    let (ok, failed, errors, _) = traffic.finish(3_000, started).await;
    for e in &errors {
        eprintln!("  {e}");
    }
    eprintln!("CA replicas killed 4 times: {ok} requests ok, {failed} failed");
    assert!(ok >= 3_000);
    assert_eq!(
        failed, 0,
        "requests failed while a replica was away: {errors:?}"
    );
}

/// The Lease's holder, as the fake API server holds it.
fn lease_holder(api: &FakeApiServer) -> Option<(String, i64)> {
    let lease = api
        .cluster
        .lock()
        .unwrap()
        .get("leases", NAMESPACE, "meshid-ca-rotation")?;
    Some((
        lease["spec"]["holderIdentity"].as_str()?.to_owned(),
        lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rotation_schedule_runs_on_one_replica_and_survives_its_leader_dying_mid_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let api = crate::fake_k8s::start(tmp.path(), Default::default()).await;
    // A one-minute token key: prepared at 30 s, activated at 50 s.
    let args = ["--token-key-ttl", "1m"];
    let replicas = [
        Replica::new(tmp.path(), "ca-0"),
        Replica::new(tmp.path(), "ca-1"),
    ];
    let mut cas = [
        Some(replicas[0].start(&api, &args).await),
        Some(replicas[1].start(&api, &args).await),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        if let Some((holder, _)) = lease_holder(&api) {
            break holder;
        }
        assert!(
            Instant::now() < deadline,
            "no replica took the rotation Lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (l, f) = if leader == "ca-0" { (0, 1) } else { (1, 0) };
    // The leader prepares the next key; the other never steps.
    let deadline = Instant::now() + Duration::from_secs(50);
    while !cas[l]
        .as_ref()
        .unwrap()
        .log()
        .contains("automatic rotation: prepare token-key")
    {
        assert!(
            Instant::now() < deadline,
            "the leader never prepared: {}",
            cas[l].as_ref().unwrap().log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !cas[f]
            .as_ref()
            .unwrap()
            .log()
            .contains("automatic rotation: prepare"),
        "the replica without the Lease stepped too"
    );
    // The leader dies between prepare and activate (once its record names the new key: the
    // others wait for that).
    tokio::time::sleep(Duration::from_secs(3)).await;
    cas[l].take().unwrap().stop().await;
    let killed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let follower = cas[f].as_ref().unwrap().log();
        if follower.contains("automatic rotation: activate token-key") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other replica never took over the schedule: {follower}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (holder, transitions) = lease_holder(&api).unwrap();
    assert_eq!(holder, replicas[f].name);
    assert!(transitions >= 1);
    eprintln!(
        "the schedule moved to {holder} and activated {:.1} s after its leader died",
        killed.elapsed().as_secs_f64()
    );
    // One outcome: the first key old, one new key active, no second prepared key.
    let keys = secret_doc(&api, "meshid-ca-token-keys", "token-keys.json");
    let states: Vec<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["old", "active"], "{keys}");
}
