//! Per-caller rate limits and the access log, at the callee's sidecar, end to end: the shop
//! mesh (CA, frontend, reports and orders sidecars, echo apps), calls through the callers'
//! outbound proxies as their apps make them.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::mesh::{POLICY, Reply, shop_with, via_proxy};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const REPORTS: &str = "spiffe://cluster.local/ns/shop/sa/reports";

/// The shop policy with frontend held to `rate` and reports an allowed caller with no limit.
fn limited(rate: &str) -> String {
    POLICY.replace(
        "      frontend: [orders:read]\n",
        &format!(
            "      frontend: {{ scopes: [orders:read], {rate} }}\n      reports: [orders:read]\n"
        ),
    )
}

fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
    r.headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn metric(text: &str, line_prefix: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

// The limit holds per calling identity, with 429 and Retry-After; other callers are not
// touched; a policy reload changes it; metrics count it; `explain` shows it; a sidecar with
// the default access log writes its refusals, and only those, as JSON lines on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_per_caller_and_follow_a_policy_reload() {
    // 60/m: one more request a second, so a quick run of 20 sees the burst and little more.
    let s = shop_with(&limited("rate: 60/m, burst: 5"), &[], &[]).await;
    let (mut ok, mut limited_replies) = (0, Vec::new());
    for _ in 0..20 {
        let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders/1", &[]);
        match r.status {
            200 => ok += 1,
            429 => limited_replies.push(r),
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(
        (5..=7).contains(&ok),
        "a burst of 5 and about one a second: {ok} of 20 allowed"
    );
    let r = &limited_replies[0];
    let retry: u64 = header(r, "retry-after")
        .expect("429 has Retry-After")
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert!(r.body.contains("over its rate limit"), "{}", r.body);
    // Another caller of the same service is not held back by frontend's limit.
    for i in 0..20 {
        let r = via_proxy(s.reports.outbound, "GET", "http://orders/orders/1", &[]);
        assert_eq!(r.status, 200, "reports call {i}: {}", r.body);
    }
    let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders/1", &[]);
    assert_eq!(r.status, 429, "frontend is still over its limit");
    let refused = limited_replies.len() as u64 + 1;

    let (_, m) = s.orders.admin_get("/metrics").await.unwrap();
    assert_eq!(
        metric(
            &m,
            "meshid_requests_total{direction=\"inbound\",outcome=\"rate_limited\"} "
        ),
        refused,
        "{m}"
    );
    assert_eq!(
        metric(&m, "meshid_rate_limited_total{caller=\"frontend\"} "),
        refused
    );
    assert!(!m.contains("meshid_rate_limited_total{caller=\"reports\"}"));

    // The default access log: refusals on stderr as JSON, allowed requests not. (The writer
    // takes lines in batches, some milliseconds after the request.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines: Vec<Value> = loop {
        let lines: Vec<Value> = s
            .orders
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let rate_lines = lines
            .iter()
            .filter(|l| l["reason"] == "rate_limited")
            .count() as u64;
        if rate_lines >= refused || Instant::now() > deadline {
            assert_eq!(rate_lines, refused, "one line per refusal");
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        lines.iter().all(|l| l["decision"] == "deny"),
        "allowed requests are not logged by default"
    );
    let line = lines
        .iter()
        .find(|l| l["reason"] == "rate_limited")
        .unwrap();
    assert_eq!(line["caller"], FRONTEND);
    assert_eq!(line["status"], 429);

    // explain says the same from the policy file.
    let policy = s.ca.work.join("policy.yaml");
    let out = crate::support::run(&[
        "policy",
        "explain",
        policy.to_str().unwrap(),
        "--caller",
        "frontend",
        "--callee",
        "orders",
        "/orders/1",
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("frontend is held to 60/m, burst 5"), "{text}");

    // A reload raises the limit: the next calls go through, a whole run of them.
    std::fs::write(&policy, limited("rate: 100/s, burst: 100")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders/1", &[]);
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the new limit never applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..30 {
        let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders/1", &[]);
        assert_eq!(r.status, 200, "call {i} under the raised limit: {}", r.body);
    }
    // And one that lowers it holds again.
    std::fs::write(&policy, limited("rate: 1/h, burst: 1")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders/1", &[]);
        if r.status == 429 {
            let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
            assert!(retry > 60, "an hour's limit waits long: {retry}");
            break;
        }
        assert!(Instant::now() < deadline, "the lowered limit never applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// One JSON line per decision at the callee, with every field an auditor asks, for an
// allowed request and for refusals; never the token, never the query string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_the_fields_of_each_decision() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let s = shop_with(
        POLICY,
        &[],
        &[
            "--access-log",
            log.to_str().unwrap(),
            "--access-log-allowed",
        ],
    )
    .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("traceparent: 00-{trace}-00f067aa0ba902b7-01");
    let r = via_proxy(
        s.frontend.outbound,
        "GET",
        "http://orders/orders/7?card=4111111111111111",
        &[&traceparent],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = via_proxy(s.frontend.outbound, "POST", "http://orders/orders", &[]);
    assert_eq!(r.status, 403, "{}", r.body);
    let r = via_proxy(s.reports.outbound, "GET", "http://orders/orders/7", &[]);
    assert_eq!(r.status, 403, "{}", r.body);
    let r = via_proxy(
        s.frontend.outbound,
        "GET",
        "http://orders/orders/../healthz",
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);

    let deadline = Instant::now() + Duration::from_secs(10);
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if lines.len() >= 4 {
            assert!(
                !text.contains("eyJ"),
                "a token reached the access log: {text}"
            );
            assert!(
                !text.contains("4111"),
                "the query reached the access log: {text}"
            );
            break lines;
        }
        assert!(Instant::now() < deadline, "access log: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(lines.len(), 4, "{lines:#?}");

    let allowed = &lines[0];
    for (field, want) in [
        ("caller", Value::from(FRONTEND)),
        ("caller_service", "frontend".into()),
        ("callee", ORDERS.into()),
        ("callee_service", "orders".into()),
        ("method", "GET".into()),
        ("path", "/orders/7".into()),
        ("route", "GET /orders".into()),
        ("scope_required", "orders:read".into()),
        ("scopes_presented", serde_json::json!(["orders:read"])),
        ("decision", "allow".into()),
        ("reason", "allowed".into()),
        ("status", 200.into()),
        ("trace_id", trace.into()),
    ] {
        assert_eq!(allowed[field], want, "{field}: {allowed:#}");
    }
    let time = allowed["time"].as_str().unwrap();
    let at = humantime::parse_rfc3339(time).expect("RFC 3339 time");
    let age = std::time::SystemTime::now().duration_since(at).unwrap();
    assert!(age < Duration::from_secs(60), "{time}");
    let latency = allowed["latency_ms"].as_f64().unwrap();
    assert!(latency > 0.0 && latency < 10_000.0, "{latency}");

    let scope = &lines[1];
    for (field, want) in [
        ("method", Value::from("POST")),
        ("route", "POST /orders".into()),
        ("scope_required", "orders:write".into()),
        ("scopes_presented", serde_json::json!(["orders:read"])),
        ("decision", "deny".into()),
        ("reason", "insufficient_scope".into()),
        ("status", 403.into()),
    ] {
        assert_eq!(scope[field], want, "{field}: {scope:#}");
    }
    assert!(scope["trace_id"].is_null(), "no trace sent, none exported");

    let caller = &lines[2];
    for (field, want) in [
        ("caller", Value::from(REPORTS)),
        ("caller_service", "reports".into()),
        ("route", Value::Null),
        ("scope_required", Value::Null),
        ("scopes_presented", serde_json::json!([])),
        ("decision", "deny".into()),
        ("reason", "caller_not_allowed".into()),
        ("status", 403.into()),
    ] {
        assert_eq!(caller[field], want, "{field}: {caller:#}");
    }
    // The path the rules saw, not the one the caller wrote.
    let tricked = &lines[3];
    assert_eq!(tricked["path"], "/healthz");
    assert_eq!(tricked["route"], "* /healthz");
    assert_eq!(tricked["decision"], "allow");

    let (_, m) = s.orders.admin_get("/metrics").await.unwrap();
    assert_eq!(metric(&m, "meshid_access_log_lines_total "), 4, "{m}");
    assert_eq!(metric(&m, "meshid_access_log_dropped_total "), 0);
    // Not on stderr as well.
    assert!(!s.orders.log().contains("\"decision\""));

    // logrotate moves the file away: the sidecar notices and writes a new one at the path,
    // the moved file keeps its four lines.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders/8", &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        let fresh = std::fs::read_to_string(&log).unwrap_or_default();
        if fresh.contains("/orders/8") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new access log after a rename; the old one: {}",
            std::fs::read_to_string(&rotated).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.lines().count() >= 4, "{old}");
}
