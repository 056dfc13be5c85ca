//! `meshid check --ca HOST:PORT --ca-bundle FILE [--cert-dir DIR]`: the health of a live mesh,
//! as `linkerd check` gives it. One line per check, `ok`, `warn`, `fail` or `skip`, and for
//! every warning and failure what to do. Exit 0 all ok, 2 warnings, 1 a failure: a CI job or a
//! readiness gate can use it.
//!
//! What it asks the CA is what any workload may ask (the TLS handshake, `GetBundle`,
//! `GetJwks`); with `--cert-dir`, the local sidecar's SVID is checked and used to read the
//! policy in force (`WatchDirectory`, the first message only).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::{Args, ValueEnum};
use meshid::identity::client::CaClient;
use meshid::identity::files;
use meshid_proto::verify::{PeerRule, SpiffeVerifier, TrustSource};
use meshid_proto::{TrustBundle, pb};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;

use crate::ca_args::CaArgs;

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    ca: CaArgs,
    /// The local sidecar's certificate directory: its SVID is checked, and used to read the
    /// policy in force.
    #[arg(long, env = "MESHID_CERT_DIR")]
    cert_dir: Option<PathBuf>,
    /// `text` for people, `json` (one array of checks) for programs.
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

#[derive(Debug, Serialize)]
struct Line {
    check: &'static str,
    status: Status,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

#[derive(Default)]
struct Report(Vec<Line>);

impl Report {
    fn add(&mut self, check: &'static str, status: Status, message: String, fix: Option<String>) {
        self.0.push(Line {
            check,
            status,
            message,
            fix,
        });
    }
    fn ok(&mut self, check: &'static str, message: String) {
        self.add(check, Status::Ok, message, None);
    }
    fn warn(&mut self, check: &'static str, message: String, fix: impl Into<String>) {
        self.add(check, Status::Warn, message, Some(fix.into()));
    }
    fn fail(&mut self, check: &'static str, message: String, fix: impl Into<String>) {
        self.add(check, Status::Fail, message, Some(fix.into()));
    }
    fn skip(&mut self, check: &'static str, message: String) {
        self.add(check, Status::Skip, message, None);
    }
    fn count(&self, s: Status) -> usize {
        self.0.iter().filter(|l| l.status == s).count()
    }
}

/// Run the checks on a runtime of their own and print them.
pub fn run(a: CheckArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshid: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let output = a.output;
    let header = format!("CA {}, bundle {}", a.ca.ca, a.ca.ca_bundle.display());
    let report = runtime.block_on(checks(a));
    // A lookup still stuck in the blocking pool must not hold the answer up.
    runtime.shutdown_background();
    match output {
        Output::Json => match serde_json::to_string_pretty(&report.0) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("meshid: {e}"),
        },
        Output::Text => {
            println!("meshid check: {header}\n");
            for l in &report.0 {
                let status = match l.status {
                    Status::Ok => "ok",
                    Status::Warn => "warn",
                    Status::Fail => "FAIL",
                    Status::Skip => "skip",
                };
                println!("{status:<5} {:<13} {}", l.check, l.message);
                if let Some(fix) = &l.fix {
                    println!("{:19}fix: {fix}", "");
                }
            }
            println!(
                "\n{} ok, {} warning(s), {} failed, {} skipped",
                report.count(Status::Ok),
                report.count(Status::Warn),
                report.count(Status::Fail),
                report.count(Status::Skip)
            );
        }
    }
    if report.count(Status::Fail) > 0 {
        ExitCode::FAILURE
    } else if report.count(Status::Warn) > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// `at` as `2026-12-09T12:00:00Z (in 6 days)`, or `... (EXPIRED 3m ago)`.
fn when(at: SystemTime, now: SystemTime) -> String {
    let stamp = humantime::format_rfc3339_seconds(at);
    let round = |d: Duration| match d.as_secs() {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3_600 => format!("{} h", s / 3_600),
        s if s >= 120 => format!("{} min", s / 60),
        s => format!("{s} s"),
    };
    match at.duration_since(now) {
        Ok(left) => format!("{stamp} (in {})", round(left)),
        Err(e) => format!("{stamp} (EXPIRED {} ago)", round(e.duration())),
    }
}

/// How a certificate's remaining life looks: fail when expired or not valid yet, warn when
/// less than `warn_below` of its life is left.
fn life(not_before: SystemTime, not_after: SystemTime, now: SystemTime, warn_below: f64) -> Status {
    let total = not_after
        .duration_since(not_before)
        .unwrap_or_default()
        .as_secs_f64();
    match (
        now.duration_since(not_before),
        not_after.duration_since(now),
    ) {
        (Err(_), _) | (_, Err(_)) => Status::Fail,
        (Ok(_), Ok(left)) if total > 0.0 && left.as_secs_f64() / total < warn_below => Status::Warn,
        _ => Status::Ok,
    }
}

struct CertFacts {
    subject: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

fn facts(der: &[u8]) -> Option<CertFacts> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let t = |v: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(v.timestamp()).unwrap_or(0))
    };
    Some(CertFacts {
        subject: cert.subject().to_string(),
        not_before: t(cert.validity().not_before),
        not_after: t(cert.validity().not_after),
    })
}

fn sha256_set(roots: &[CertificateDer<'_>]) -> std::collections::BTreeSet<[u8; 32]> {
    roots
        .iter()
        .map(|r| meshid_proto::bundle::cert_sha256(r))
        .collect()
}

async fn checks(a: CheckArgs) -> Report {
    let mut r = Report::default();
    let file = a.ca.ca_bundle.display().to_string();
    let bundle = match a.ca.bundle() {
        Ok(b) => b,
        Err(e) => {
            r.fail(
                "bundle",
                format!("{e:#}"),
                "give the trust bundle the mesh uses (`meshid ca bundle --data-dir DIR` on the CA, or key bundle.pem of the meshid-bundle ConfigMap)",
            );
            return r;
        }
    };
    let td = bundle.trust_domain.clone();
    let now = SystemTime::now();

    // The CA, its serving chain verified against the bundle file.
    let served = match handshake(&a.ca.ca, &bundle).await {
        Ok((chain, took)) => {
            r.ok(
                "ca",
                format!(
                    "{} answers as {} (TLS 1.3, {} ms); its chain verifies against {file}",
                    a.ca.ca,
                    td.ca_id(),
                    took.as_millis()
                ),
            );
            Some(chain)
        }
        Err(HandshakeError::Unreachable(e)) => {
            r.fail(
                "ca",
                format!("cannot connect to {}: {e}", a.ca.ca),
                "check --ca (the CA's gRPC address, port 8443 by default) and that the CA runs (`kubectl -n meshid-system get pods`)",
            );
            None
        }
        Err(HandshakeError::Tls(e)) if time_error(&e) => {
            r.fail(
                "ca",
                format!("{}: its chain is not valid at this machine's time: {e}", a.ca.ca),
                "if the CA's intermediate or root expired, see \"Recovering an expired mesh\" in the README (`meshid ca rotate recover`); otherwise this machine's clock is off (`date -u` here and on the CA)",
            );
            None
        }
        Err(HandshakeError::Tls(e)) => {
            r.fail(
                "ca",
                format!("{} does not prove it is {}: {e}", a.ca.ca, td.ca_id()),
                format!("{file} may be stale or from another mesh: fetch the bundle again (`meshid ca bundle`, or the meshid-bundle ConfigMap); check --trust-domain"),
            );
            None
        }
    };
    let Some(served) = served else {
        for check in [
            "intermediate",
            "roots",
            "bundle",
            "rotation",
            "token-keys",
            "clock",
        ] {
            r.skip(
                check,
                "the CA could not be checked (see the ca line)".into(),
            );
        }
        local_svid(&mut r, &a, &bundle, None, now).await;
        return r;
    };
    let intermediate = served.get(1).and_then(|d| facts(d));
    match &intermediate {
        Some(i) => {
            let status = life(i.not_before, i.not_after, now, 1.0 / 6.0);
            let message = format!("{}, expires {}", i.subject, when(i.not_after, now));
            match status {
                Status::Ok => r.ok("intermediate", message),
                Status::Warn => r.warn(
                    "intermediate",
                    format!("{message}: less than a sixth of its life left"),
                    "the automatic schedule should have activated a new one by now: on the CA, `meshid ca rotate status` (and `--auto-rotate` must not be false)",
                ),
                _ => r.fail(
                    "intermediate",
                    format!("{message}: not valid now"),
                    "on the CA: `meshid ca rotate prepare --what intermediate` then `activate` (see \"Recovering an expired mesh\" in the README)",
                ),
            }
        }
        None => r.fail(
            "intermediate",
            "the CA sent no intermediate certificate after its own".into(),
            "the CA is not a meshid CA, or a proxy in between answers: check --ca",
        ),
    }

    // What any workload may ask: the bundle (with the Date of the answer) and the JWKS.
    let client = match CaClient::new(&a.ca.ca, bundle.clone()) {
        Ok(c) => c,
        Err(e) => {
            r.fail("ca", e.to_string(), "check --ca");
            local_svid(&mut r, &a, &bundle, None, now).await;
            return r;
        }
    };
    // Connected first, so the round trip timed is the request's alone.
    let (answer, asked, rtt) = match client.connect(None).await {
        Ok(mut c) => {
            let asked = SystemTime::now();
            let started = Instant::now();
            let answer = c
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(|s| s.message().to_owned());
            (answer, asked, started.elapsed())
        }
        Err(e) => (Err(e.to_string()), SystemTime::now(), Duration::ZERO),
    };
    let current = match answer {
        Ok(resp) => {
            clock(&mut r, resp.metadata().get("date"), asked + rtt / 2);
            match TrustBundle::try_from(resp.into_inner()) {
                Ok(b) => Some(b),
                Err(e) => {
                    r.fail(
                        "roots",
                        format!("the CA's bundle does not parse: {e}"),
                        "report it: the CA answered with a broken bundle",
                    );
                    None
                }
            }
        }
        Err(e) => {
            r.fail(
                "roots",
                format!("GetBundle failed: {e}"),
                "the CA accepted TLS but did not answer: see its log",
            );
            r.skip("clock", "the CA did not answer".into());
            None
        }
    };
    if let Some(current) = &current {
        roots(&mut r, current, &bundle, &served, &file, now);
        rotation(&mut r, current);
        token_keys(&mut r, &client, current).await;
    }
    local_svid(&mut r, &a, &bundle, current.as_ref(), now).await;
    r
}

fn clock(
    r: &mut Report,
    date: Option<&tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    local: SystemTime,
) {
    let Some(at) = date.and_then(|d| d.to_str().ok()).and_then(httpdate_parse) else {
        r.warn(
            "clock",
            "the CA's answer carried no Date: the clock cannot be compared".into(),
            "compare the clocks by hand (`date -u` on both)",
        );
        return;
    };
    // HTTP dates have whole seconds, cut down: the CA's clock read half a second later on
    // average, and up to a second of the difference is the format's.
    let at = at + Duration::from_millis(500);
    let skew = match at.duration_since(local) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    let abs = skew.abs();
    let text = if abs < 1.0 {
        "within a second of the CA's".to_owned()
    } else if skew > 0.0 {
        format!("{abs:.0} s behind the CA's")
    } else {
        format!("{abs:.0} s ahead of the CA's")
    };
    if abs <= 2.0 {
        r.ok("clock", format!("this machine's clock is {text}"));
    } else if abs <= 60.0 {
        r.warn(
            "clock",
            format!("this machine's clock is {text}"),
            "keep clocks in sync (chrony or systemd-timesyncd): new SVIDs and tokens may look not yet valid",
        );
    } else {
        r.fail(
            "clock",
            format!("this machine's clock is {text}"),
            "sync the clock (chrony or systemd-timesyncd): certificates and tokens are refused as expired or not yet valid",
        );
    }
}

/// An IMF-fixdate (`Wed, 02 Dec 2026 18:42:45 GMT`), the `Date` header's form.
fn httpdate_parse(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(&imf_to_rfc3339(s)?).ok()
}

fn imf_to_rfc3339(s: &str) -> Option<String> {
    let mut words = s.split_whitespace().skip(1);
    let day: u32 = words.next()?.parse().ok()?;
    let month = match words.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: u32 = words.next()?.parse().ok()?;
    let time = words.next()?;
    (words.next()? == "GMT").then(|| format!("{year:04}-{month:02}-{day:02}T{time}Z"))
}

fn roots(
    r: &mut Report,
    current: &TrustBundle,
    file_bundle: &TrustBundle,
    served: &[CertificateDer<'static>],
    file: &str,
    now: SystemTime,
) {
    let intermediate = served
        .get(1)
        .and_then(|d| x509_parser::parse_x509_certificate(d).ok())
        .map(|(_, c)| c);
    let n = current.roots.len();
    for (i, root) in current.roots.iter().enumerate() {
        let Some(f) = facts(root) else {
            r.fail(
                "roots",
                format!("root {} of {n} does not parse", i + 1),
                "report it",
            );
            continue;
        };
        // Every meshid root has the same name: which one signed is the signature's to say.
        let signs = intermediate.as_ref().is_some_and(|i| {
            x509_parser::parse_x509_certificate(root)
                .is_ok_and(|(_, root)| i.verify_signature(Some(root.public_key())).is_ok())
        });
        let message = format!(
            "root {} of {n}: {}, expires {}{}",
            i + 1,
            f.subject,
            when(f.not_after, now),
            if signs {
                "; it signs the active intermediate"
            } else {
                ""
            }
        );
        match life(f.not_before, f.not_after, now, 1.0 / 6.0) {
            Status::Ok => r.ok("roots", message),
            Status::Warn if n > 1 && !signs => r.ok("roots", format!("{message} (being replaced)")),
            Status::Warn => r.warn(
                "roots",
                format!("{message}: less than a sixth of its life left"),
                "on the CA: `meshid ca rotate status`; prepare and activate a new root (`meshid ca rotate prepare --what root`)",
            ),
            _ => r.fail(
                "roots",
                format!("{message}: not valid now"),
                "see \"Recovering an expired mesh\" in the README",
            ),
        }
    }
    let (ca, mine) = (sha256_set(&current.roots), sha256_set(&file_bundle.roots));
    let missing = ca.difference(&mine).count();
    let retired = mine.difference(&ca).count();
    if missing == 0 && retired == 0 {
        r.ok(
            "bundle",
            format!(
                "{file} holds exactly the CA's {n} root(s) (bundle sequence {})",
                current.sequence
            ),
        );
    } else {
        let mut what = Vec::new();
        if missing > 0 {
            what.push(format!(
                "lacks {missing} of the CA's roots (a rotation added them)"
            ));
        }
        if retired > 0 {
            what.push(format!(
                "still trusts {retired} root(s) the CA no longer uses"
            ));
        }
        r.warn(
            "bundle",
            format!("{file} {}", what.join(" and ")),
            "fetch the bundle again (`meshid ca bundle`, or the meshid-bundle ConfigMap): sidecars follow the CA themselves, but clients started with this file do not",
        );
    }
}

fn rotation(r: &mut Report, current: &TrustBundle) {
    let hints = &current.rotation;
    let mut under_way = Vec::new();
    if current.roots.len() > 1 {
        under_way.push(format!(
            "{} roots trusted at once (a root rotation)",
            current.roots.len()
        ));
    }
    if !hints.renew_issuers.is_empty() {
        under_way.push(format!(
            "SVIDs of {} old intermediate(s) renew within {}",
            hints.renew_issuers.len(),
            humantime::format_duration(hints.renew_window)
        ));
    }
    if hints.token_kids.len() > 1 {
        under_way.push(format!(
            "{} token keys announced (a token-key rotation)",
            hints.token_kids.len()
        ));
    }
    if under_way.is_empty() {
        r.ok("rotation", "no rotation under way".into());
    } else {
        r.ok(
            "rotation",
            format!(
                "under way: {}; `meshid ca rotate status` on the CA says what it waits for",
                under_way.join("; ")
            ),
        );
    }
}

async fn token_keys(r: &mut Report, client: &CaClient, current: &TrustBundle) {
    let jwks = match client.connect(None).await {
        Ok(mut c) => c
            .get_jwks(pb::GetJwksRequest {})
            .await
            .map(|j| j.into_inner().json)
            .map_err(|s| s.message().to_owned()),
        Err(e) => Err(e.to_string()),
    };
    let kids: Vec<String> = match jwks
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        Ok(Ok(v)) => v["keys"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| k["kid"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        Ok(Err(e)) => {
            r.fail(
                "token-keys",
                format!("the JWKS is not JSON: {e}"),
                "report it",
            );
            return;
        }
        Err(e) => {
            r.fail(
                "token-keys",
                format!("GetJwks failed: {e}"),
                "see the CA's log",
            );
            return;
        }
    };
    let announced = &current.rotation.token_kids;
    let absent: Vec<&String> = announced.iter().filter(|k| !kids.contains(k)).collect();
    if kids.is_empty() {
        r.warn(
            "token-keys",
            "the JWKS holds no key: no access token can be verified".into(),
            "the CA signs tokens only with a policy (--policy)",
        );
    } else if absent.is_empty() {
        r.ok(
            "token-keys",
            format!(
                "the JWKS holds {} key(s) (kid {})",
                kids.len(),
                kids.join(", ")
            ),
        );
    } else {
        r.warn(
            "token-keys",
            format!(
                "the bundle announces kid {} that the JWKS lacks",
                absent
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "another CA replica may be behind: check again in a minute",
        );
    }
}

async fn local_svid(
    r: &mut Report,
    a: &CheckArgs,
    file_bundle: &TrustBundle,
    current: Option<&TrustBundle>,
    now: SystemTime,
) {
    let Some(dir) = &a.cert_dir else {
        r.skip(
            "svid",
            "no --cert-dir: the local sidecar's SVID is not checked".into(),
        );
        r.skip(
            "policy",
            "no --cert-dir: the policy is read with a workload's SVID".into(),
        );
        return;
    };
    let svid = match files::read(dir, file_bundle.trust_domain.clone()) {
        Ok(s) => s,
        Err(e) => {
            r.fail(
                "svid",
                e.to_string(),
                "is the sidecar running with this --cert-dir? it writes svid.pem, svid_key.pem and bundle.pem there once it has an identity",
            );
            r.skip("policy", "no usable SVID to read the policy with".into());
            return;
        }
    };
    let roots = current.unwrap_or(file_bundle);
    let leaf = &svid.chain[0];
    let verified = TrustSource::new(roots.clone())
        .map_err(|e| e.to_string())
        .and_then(|trust| {
            SpiffeVerifier::new(trust, PeerRule::InTrustDomain(roots.trust_domain.clone()))
                .verify_chain(
                    leaf,
                    &svid.chain[1..],
                    UnixTime::since_unix_epoch(
                        now.duration_since(SystemTime::UNIX_EPOCH)
                            .unwrap_or_default(),
                    ),
                    webpki::KeyUsage::client_auth(),
                )
                .map_err(|e| e.to_string())
        });
    let info = meshid_proto::svid::inspect(leaf);
    match (&verified, &info) {
        (Err(e), _) if !time_error(e) => r.fail(
            "svid",
            format!("{} in {}: does not verify against the CA's roots: {e}", svid.spiffe_id, dir.display()),
            "the sidecar attests again by itself when its chain no longer verifies; if it does not, see its log and `meshid_svid_renewal_failures_total`",
        ),
        (_, Err(e)) => r.fail("svid", format!("{}: {e}", dir.display()), "report it"),
        (_, Ok(info)) => {
            // Expired or not yet valid: said by its dates, which is what to act on.
            let message = format!("{}, expires {}", svid.spiffe_id, when(info.not_after, now));
            match (life(info.not_before, info.not_after, now, 1.0 / 3.0), &verified) {
                (Status::Ok | Status::Warn, Err(e)) => r.fail(
                    "svid",
                    format!("{message}: its chain is not valid now: {e}"),
                    "the intermediate it chains to may have expired: see the intermediate line and \"Recovering an expired mesh\" in the README",
                ),
                (Status::Ok, _) => r.ok("svid", format!("{message}; renewed at half its life")),
                (Status::Warn, _) => r.warn(
                    "svid",
                    format!("{message}: renewal is overdue (the sidecar renews at half its life)"),
                    "is the sidecar running, and can it reach the CA? see its log and /metrics (meshid_svid_renewal_failures_total)",
                ),
                _ => r.fail(
                    "svid",
                    format!("{message}: not valid now"),
                    "restart the sidecar's pod, or check the clock (see the clock line)",
                ),
            }
        }
    }
    if verified.is_err() {
        r.skip(
            "policy",
            "the SVID does not verify: the CA would refuse it".into(),
        );
        return;
    }
    policy(r, a, &svid, current.unwrap_or(file_bundle)).await;
}

async fn policy(r: &mut Report, a: &CheckArgs, svid: &meshid::identity::Svid, roots: &TrustBundle) {
    let read = async {
        let client = CaClient::new(&a.ca.ca, roots.clone()).map_err(|e| e.to_string())?;
        let ck = svid.certified_key()?;
        let mut c = client
            .connect(Some(meshid_proto::tls::CertSlot::new(ck)))
            .await
            .map_err(|e| e.to_string())?;
        let mut stream = c
            .watch_directory(pb::WatchDirectoryRequest {})
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        let first = stream
            .message()
            .await
            .map_err(|s| s.message().to_owned())?
            .ok_or_else(|| "the stream ended at once".to_owned())?;
        meshid_proto::directory::Directory::try_from(first).map_err(|e| e.to_string())
    };
    let dir = match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            r.fail(
                "policy",
                format!("reading the policy in force: {e}"),
                "see the CA's log; is this SVID revoked?",
            );
            return;
        }
        Err(_) => {
            r.fail(
                "policy",
                "the CA sent no policy within 10 s".into(),
                "see the CA's log",
            );
            return;
        }
    };
    let grants: usize = dir.services().values().map(|s| s.callers.len()).sum();
    if dir.services().is_empty() {
        r.warn(
            "policy",
            format!("sequence {}: no services (the CA runs without --policy, or an empty one)", dir.sequence),
            "give the CA a policy (--policy FILE); without it no token is granted and every call is refused",
        );
        return;
    }
    r.ok(
        "policy",
        format!(
            "in force: sequence {}, {} services, {grants} caller grants",
            dir.sequence,
            dir.services().len()
        ),
    );
    match dir.service_by_id(&svid.spiffe_id) {
        Some(me) => {
            let callers: Vec<&str> = me.callers.keys().map(String::as_str).collect();
            let calls: Vec<&str> = dir
                .services()
                .values()
                .filter(|s| s.callers.contains_key(&me.name))
                .map(|s| s.name.as_str())
                .collect();
            let list = |v: &[&str]| if v.is_empty() { "nobody".to_owned() } else { v.join(", ") };
            r.ok(
                "workload",
                format!("this sidecar is service {}: called by {}; calls {}", me.name, list(&callers), list(&calls)),
            );
        }
        None => r.warn(
            "workload",
            format!("{} is not a service of the policy", svid.spiffe_id),
            "add it under services: (with its id) so it may be called and get tokens; until then its inbound requests are refused (not_a_service)",
        ),
    }
}

/// Whether a verification error is about time (expired, not yet valid) rather than trust.
fn time_error(e: &str) -> bool {
    let e = e.to_ascii_lowercase();
    e.contains("expired") || e.contains("not valid yet") || e.contains("notvalidyet")
}

enum HandshakeError {
    Unreachable(String),
    Tls(String),
}

/// A TLS 1.3 handshake with the CA, verified as the sidecars verify it: the chain it served.
async fn handshake(
    addr: &str,
    bundle: &TrustBundle,
) -> Result<(Vec<CertificateDer<'static>>, Duration), HandshakeError> {
    let trust = TrustSource::new(bundle.clone()).map_err(|e| HandshakeError::Tls(e.to_string()))?;
    let verifier = SpiffeVerifier::new(trust, PeerRule::Exact(bundle.trust_domain.ca_id()));
    let mut config = rustls::ClientConfig::builder_with_provider(meshid_proto::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| HandshakeError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
        .ok_or_else(|| HandshakeError::Unreachable(format!("{addr:?} is not HOST:PORT")))?;
    let name = ServerName::try_from(host)
        .map_err(|_| HandshakeError::Unreachable(format!("{addr:?} has no valid host")))?;
    let started = Instant::now();
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| HandshakeError::Unreachable("no answer within 5 s".into()))?
        .map_err(|e| HandshakeError::Unreachable(e.to_string()))?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| {
        HandshakeError::Unreachable(
            "no TLS handshake within 5 s (is it the CA's gRPC port?)".into(),
        )
    })?
    .map_err(|e| HandshakeError::Tls(e.to_string()))?;
    let took = started.elapsed();
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
        .unwrap_or_default();
    Ok((chain, took))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        let t = httpdate_parse("Wed, 02 Dec 2026 18:42:45 GMT").unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(t).to_string(),
            "2026-12-02T18:42:45Z"
        );
        assert!(httpdate_parse("Wed, 02 Foo 2026 18:42:45 GMT").is_none());
        assert!(httpdate_parse("yesterday").is_none());
    }

    #[test]
    fn a_certificate_life_is_judged_by_what_is_left() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = t0 + Duration::from_secs(600);
        assert_eq!(
            life(t0, end, t0 + Duration::from_secs(100), 1.0 / 6.0),
            Status::Ok
        );
        assert_eq!(
            life(t0, end, t0 + Duration::from_secs(550), 1.0 / 6.0),
            Status::Warn
        );
        assert_eq!(
            life(t0, end, end + Duration::from_secs(1), 1.0 / 6.0),
            Status::Fail
        );
        assert_eq!(
            life(t0, end, t0 - Duration::from_secs(1), 1.0 / 6.0),
            Status::Fail
        );
    }
}
