//! Faults under continuous traffic through a sidecar pair (the rotation tests' traffic: two
//! keep-alive clients, one that opens a connection per request, and a streaming response):
//! the CA killed and restarted, a sidecar killed and restarted, the cert directory made
//! read-only, the policy file deleted and restored, the audit log's disk full, and the wall
//! clock stepped forward past half an SVID's life. For each: no crash, no lost state, the
//! fault in the logs and metrics with its reason, recovery with no operator, and the requests
//! that failed counted (zero where the design says zero).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::rotation::{Pair, Traffic, metric, pair};
use crate::support::{Ca, Sidecar, SidecarPorts, http_get, set_child_env};

/// A sample of the CA's metrics.
async fn ca_metric(ca: &Ca, name: &str) -> f64 {
    let (_, body) = http_get(ca.admin_addr, "/metrics")
        .await
        .expect("CA metrics");
    crate::support::sample(&body, name)
}

/// Wait (at most `within`) until `cond` holds.
async fn until<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stop the traffic after at least `n` requests: (ok, failed), with the first failures shown.
async fn finish(t: Traffic, n: u64, started: Instant, fault: &str) -> (u64, u64) {
    let (ok, failed, errors, _) = t.finish(n, started).await;
    eprintln!("{fault}: {ok} requests ok, {failed} failed");
    for e in &errors {
        eprintln!("  {e}");
    }
    (ok, failed)
}

/// The CA (SIGKILL) goes away three times, for 3 s each, while SVIDs renew every ~30 s and
/// tokens every ~10 s, and comes back on the same ports and data. No request fails: the mesh
/// runs on what it holds; renewals and token grants resume on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_killed_and_restarted_loses_no_request_and_renewals_resume() {
    let args = ["--svid-ttl", "1m", "--token-ttl", "20s"];
    let Pair {
        mut ca,
        frontend,
        orders,
        stream_stop,
        policy,
        ..
    } = pair(&args).await;
    let started = Instant::now();
    let traffic = Traffic::start(frontend.outbound, stream_stop.clone());
    let mut again = vec!["--policy".to_owned(), policy.display().to_string()];
    again.extend(args.iter().map(|s| s.to_string()));
    let again: Vec<&str> = again.iter().map(String::as_str).collect();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(6)).await;
        let (addr, http_addr, work) = (ca.addr, ca.http_addr, ca.work.clone());
        let (data_dir, tmp) = ca.stop().await;
        eprintln!("round {round}: CA killed");
        tokio::time::sleep(Duration::from_secs(3)).await;
        ca = Ca::start_on(data_dir, work, addr, http_addr, &again).await;
        if let Some(tmp) = tmp {
            ca = ca.owning(tmp);
        }
    }
    // Renewals resume against the restarted CA, and sidecars are connected to it again.
    let (f0, o0) = (
        metric(&frontend, "meshid_svid_renewals_total").await,
        metric(&orders, "meshid_svid_renewals_total").await,
    );
    until(
        "a renewal of both sidecars after the restarts",
        Duration::from_secs(60),
        || async {
            metric(&frontend, "meshid_svid_renewals_total").await > f0
                && metric(&orders, "meshid_svid_renewals_total").await > o0
        },
    )
    .await;
    assert!(
        frontend.log().contains("stream") && frontend.log().contains("reconnecting"),
        "the outage is in the sidecar's log: {}",
        frontend.log()
    );
    assert!(
        metric(&frontend, "meshid_ca_stream_breaks_total").await >= 3.0,
        "and in its metrics"
    );
    let (ok, failed) = finish(traffic, 2_000, started, "CA killed 3 times").await;
    assert!(ok >= 2_000);
    assert_eq!(failed, 0, "requests failed while the CA was away");
}

/// The callee's sidecar is killed (SIGKILL) and started again with a join token that the CA
/// would refuse: it comes back with the SVID it left in its cert directory, and the caller's
/// requests succeed again. Requests sent while it is down fail (the pod is gone), and are
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_killed_and_restarted_reuses_its_svid_from_disk() {
    let Pair {
        ca,
        frontend,
        mut orders,
        stream_stop,
        orders_app,
        ..
    } = pair(&[]).await;
    let before = std::fs::read(orders.cert_dir.join("svid.pem")).unwrap();
    let ports = SidecarPorts {
        inbound: orders.inbound,
        outbound: orders.outbound,
        admin: orders.admin,
    };
    // No streaming response here: the stream goes through the sidecar that is killed.
    stream_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let traffic = Traffic::requests_only(frontend.outbound);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ok_before = traffic.total();
    orders.kill().await;
    let killed = Instant::now();
    let bundle = ca.bundle_file().await;
    let mut orders = Sidecar::spawn_with(
        &ca.addr(),
        &bundle,
        &ca.work,
        "orders",
        "mjt.not-a-token-the-ca-knows",
        orders_app,
        ports,
        &[],
        &[],
    );
    orders.ready().await;
    let down_for = killed.elapsed();
    assert!(
        orders
            .log()
            .contains("using the SVID left in the cert directory"),
        "{}",
        orders.log()
    );
    assert_eq!(
        std::fs::read(orders.cert_dir.join("svid.pem")).unwrap(),
        before,
        "the same SVID is in use"
    );
    // Once it is back (and the caller's pooled connections to the old process are gone),
    // every request succeeds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed_at_ready = traffic.counts_failed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failed_after = traffic.counts_failed();
    let (ok, failed) = finish(traffic, ok_before + 1_000, started, "callee sidecar killed").await;
    eprintln!(
        "callee sidecar down for {:.1} s: {failed} requests failed, all while it was down",
        down_for.as_secs_f64()
    );
    assert!(ok > ok_before);
    assert_eq!(
        failed_after, failed_at_ready,
        "requests still fail once it is back"
    );
}

/// The caller's cert directory becomes read-only (a bind mount): a renewal is still put in
/// use, the write failure is logged and counted, and once the directory is writable again
/// the next renewal lands on disk. No request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_cert_directory_keeps_the_renewed_svid_in_use() {
    let p = pair(&["--svid-ttl", "1m"]).await;
    let dir = p.frontend.cert_dir.clone();
    let started = Instant::now();
    let traffic = Traffic::start(p.frontend.outbound, p.stream_stop.clone());
    let ro = ReadOnly::mount(&dir);
    let on_disk = std::fs::read(dir.join("svid.pem")).unwrap();
    until("a write failure", Duration::from_secs(60), || async {
        metric(&p.frontend, "meshid_svid_write_failures_total").await >= 1.0
    })
    .await;
    assert!(
        p.frontend.log().contains("not on disk"),
        "{}",
        p.frontend.log()
    );
    assert_eq!(std::fs::read(dir.join("svid.pem")).unwrap(), on_disk);
    drop(ro);
    let renewals = metric(&p.frontend, "meshid_svid_renewals_total").await;
    until(
        "the next renewal on disk",
        Duration::from_secs(60),
        || async {
            metric(&p.frontend, "meshid_svid_renewals_total").await > renewals
                && std::fs::read(dir.join("svid.pem")).unwrap() != on_disk
        },
    )
    .await;
    let (_, failed) = finish(traffic, 1_000, started, "cert directory read-only").await;
    assert_eq!(failed, 0);
}

/// A read-only bind mount of a directory over itself, undone on drop.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn mount(dir: &Path) -> ReadOnly {
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "mount {args:?}");
        };
        run(&["--bind"]);
        let guard = ReadOnly(dir.to_path_buf());
        run(&["-o", "remount,ro,bind"]);
        assert!(
            std::fs::write(dir.join("probe"), b"x").is_err(),
            "read-only"
        );
        guard
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        umount(&self.0);
    }
}

/// Unmount `dir`, lazily when it is busy: a test never leaves a mount behind.
fn umount(dir: &Path) {
    let done = |args: &[&str]| {
        std::process::Command::new("umount")
            .args(args)
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !done(&[]) && !done(&["-l"]) {
        eprintln!("could not unmount {}", dir.display());
    }
}

/// The policy file is deleted: the CA says so, counts the refusal and keeps the last good
/// policy (no request fails). Restored with a change, the change is in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_file_deleted_and_restored_keeps_the_last_good_policy() {
    let p = pair(&[]).await;
    let started = Instant::now();
    let traffic = Traffic::start(p.frontend.outbound, p.stream_stop.clone());
    let text = std::fs::read_to_string(&p.policy).unwrap();
    let seq = ca_metric(&p.ca, "meshid_ca_policy_sequence").await;
    let refusals = ca_metric(&p.ca, "meshid_ca_policy_reload_refusals_total").await;
    std::fs::remove_file(&p.policy).unwrap();
    until("the refusal counted", Duration::from_secs(10), || async {
        ca_metric(&p.ca, "meshid_ca_policy_reload_refusals_total").await > refusals
    })
    .await;
    assert!(
        p.ca.log()
            .contains("is gone; the last good policy stays in force"),
        "{}",
        p.ca.log()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ca_metric(&p.ca, "meshid_ca_policy_sequence").await, seq);
    assert_eq!(
        ca_metric(&p.ca, "meshid_ca_policy_reload_refusals_total").await,
        refusals + 1.0,
        "a deletion is refused once"
    );
    // Restored, with orders now also open on /health.
    let changed = text.replace(
        "      - { method: GET, path: /stream, scope: orders:read }",
        "      - { method: GET, path: /stream, scope: orders:read }\n      - { path: /health }",
    );
    assert_ne!(changed, text);
    std::fs::write(&p.policy, changed).unwrap();
    until(
        "the restored policy in force",
        Duration::from_secs(10),
        || async { ca_metric(&p.ca, "meshid_ca_policy_sequence").await > seq },
    )
    .await;
    until("orders serves /health", Duration::from_secs(10), || async {
        crate::mesh::via_proxy(p.frontend.outbound, "GET", "http://orders/health", &[]).status
            == 200
    })
    .await;
    let (_, failed) = finish(traffic, 1_000, started, "policy file deleted").await;
    assert_eq!(failed, 0);
}

/// The CA's data directory is on a 2 MiB tmpfs that fills up: issuance and token grants go on
/// (the mesh does not stop for its audit log), every record that could not be written is
/// logged and counted, no half line is left in the log, and writing resumes once there is
/// room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_disk_is_counted_and_the_ca_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap()
        .success();
    assert!(mounted, "a tmpfs");
    let _umount = Umount(disk.clone());
    let p = crate::rotation::pair_in(
        Some(&disk.join("ca")),
        &["--svid-ttl", "1m", "--token-ttl", "10s"],
    )
    .await;
    let started = Instant::now();
    let traffic = Traffic::start(p.frontend.outbound, p.stream_stop.clone());
    // Fill the disk.
    let filler = disk.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    until("an audit record lost", Duration::from_secs(60), || async {
        ca_metric(&p.ca, "meshid_ca_audit_write_failures_total").await >= 1.0
    })
    .await;
    assert!(
        p.ca.log().contains("audit log write failed"),
        "{}",
        p.ca.log()
    );
    let renewals = metric(&p.frontend, "meshid_svid_renewals_total").await;
    until(
        "a renewal while the disk is full",
        Duration::from_secs(60),
        || async { metric(&p.frontend, "meshid_svid_renewals_total").await > renewals },
    )
    .await;
    // Room again: records are written again.
    std::fs::remove_file(&filler).unwrap();
    let lines = p.ca.audit().len();
    until(
        "audit records written again",
        Duration::from_secs(60),
        || async { p.ca.audit().len() > lines },
    )
    .await;
    // Every line is whole JSON (Ca::audit parses each).
    let _ = p.ca.audit();
    let (_, failed) = finish(traffic, 1_000, started, "audit disk full").await;
    assert_eq!(failed, 0);
}

struct Umount(PathBuf);

impl Drop for Umount {
    fn drop(&mut self) {
        umount(&self.0);
    }
}

/// The wall clock of the CA and both sidecars (libfaketime) jumps 11 minutes forward, past
/// half of a 20-minute SVID's life: both sidecars renew within seconds, and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_stepped_past_half_an_svids_life_renews_at_once() {
    // The build for threaded programs: the plain one keeps its state unsynchronized.
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
    assert!(
        Path::new(lib).exists(),
        "libfaketime (Debian's faketime) is installed"
    );
    let tmp = tempfile::tempdir().unwrap();
    let offset = tmp.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    set_child_env(&[
        ("LD_PRELOAD", lib),
        ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
        // Read at every call, so that the three processes see the step at the same moment,
        // as processes on one host do.
        ("FAKETIME_NO_CACHE", "1"),
        // Timers (tokio's, on the monotonic clock) run as before: only the wall clock jumps.
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ("DONT_FAKE_MONOTONIC", "1"),
    ]);
    let p = pair(&["--svid-ttl", "20m", "--token-ttl", "15m"]).await;
    let started = Instant::now();
    let traffic = Traffic::start(p.frontend.outbound, p.stream_stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = (
        metric(&p.frontend, "meshid_svid_renewals_total").await,
        metric(&p.orders, "meshid_svid_renewals_total").await,
    );
    let expiry = metric(&p.frontend, "meshid_svid_expiry_seconds").await;
    assert!(
        expiry > 15.0 * 60.0,
        "a fresh 20-minute SVID: {expiry} s left"
    );
    // Replaced in one rename: a reader never sees half of it.
    let next = tmp.path().join("faketime.next");
    std::fs::write(&next, "+660\n").unwrap();
    std::fs::rename(&next, &offset).unwrap();
    let stepped = Instant::now();
    until(
        "both sidecars renewed after the step",
        Duration::from_secs(30),
        || async {
            metric(&p.frontend, "meshid_svid_renewals_total").await > before.0
                && metric(&p.orders, "meshid_svid_renewals_total").await > before.1
        },
    )
    .await;
    eprintln!(
        "renewed {:.1} s after the clock step",
        stepped.elapsed().as_secs_f64()
    );
    for s in [&p.frontend, &p.orders] {
        assert!(
            s.log().contains("the wall clock stepped forward by 6"),
            "the step is in the log: {}",
            s.log()
        );
        assert!(metric(s, "meshid_clock_steps_total").await >= 1.0);
    }
    let expiry = metric(&p.frontend, "meshid_svid_expiry_seconds").await;
    assert!(
        expiry > 15.0 * 60.0,
        "a fresh SVID after the step: {expiry} s left"
    );
    let (_, failed) = finish(traffic, 2_000, started, "clock stepped 11 min").await;
    assert_eq!(failed, 0);
}
