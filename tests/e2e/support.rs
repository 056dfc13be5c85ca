//! Test support: the real `meshid` binary in child processes, temporary directories, free
//! loopback ports, readiness by polling with a deadline, processes killed on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::process::{Child, Command};

thread_local! {
    /// Extra environment for the processes this test thread starts (each test runs its body on
    /// its own thread, so tests do not see each other's).
    static CHILD_ENV: std::cell::RefCell<Vec<(String, String)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Give every `meshid` process this test starts from now on these environment variables.
pub fn set_child_env(vars: &[(&str, &str)]) {
    CHILD_ENV.with(|e| {
        *e.borrow_mut() = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    });
}

pub fn meshid() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meshid"));
    c.env("MESHID_LOG", "info").kill_on_drop(true);
    CHILD_ENV.with(|e| {
        for (k, v) in e.borrow().iter() {
            c.env(k, v);
        }
    });
    c
}

/// Run `meshid ARGS` to completion.
pub async fn run(args: &[&str]) -> Output {
    meshid().args(args).output().await.expect("meshid runs")
}

/// Run `meshid ARGS`, which must succeed; its stdout.
pub async fn run_ok(args: &[&str]) -> String {
    let out = run(args).await;
    assert!(
        out.status.success(),
        "meshid {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A loopback port nobody listens on, for a process to bind later. Taken below the kernel's
/// ephemeral range (32768 and up by default), in order from a random start: a port the kernel
/// hands out for `bind(:0)` is also what it gives the next outgoing connection, which then
/// holds it when the process tries to bind it (seen as flaky "address in use").
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (LOW + n % SPAN) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
}

/// A running `meshid ca serve` on loopback ports.
pub struct Ca {
    pub addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub work: PathBuf,
    child: Child,
    _tmp: Option<TempDir>,
}

impl Ca {
    pub async fn start(extra: &[&str]) -> Ca {
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = Self::start_in(tmp.path().join("ca"), tmp.path().to_path_buf(), extra).await;
        ca._tmp = Some(tmp);
        ca
    }

    /// Start on an existing (or new) data directory; `work` is where tests put their files.
    pub async fn start_in(data_dir: PathBuf, work: PathBuf, extra: &[&str]) -> Ca {
        Self::start_on(data_dir, work, free_addr(), free_addr(), extra).await
    }

    /// Start on given ports (a restart where clients already know the address).
    pub async fn start_on(
        data_dir: PathBuf,
        work: PathBuf,
        addr: SocketAddr,
        http_addr: SocketAddr,
        extra: &[&str],
    ) -> Ca {
        let admin_addr = free_addr();
        let child = meshid()
            .args(["ca", "serve", "--data-dir"])
            .arg(&data_dir)
            .args(["--grpc-addr", &addr.to_string()])
            .args(["--http-addr", &http_addr.to_string()])
            .args(["--admin-addr", &admin_addr.to_string()])
            .args(extra)
            .stderr(std::fs::File::create(work.join(format!("ca-{}.log", addr.port()))).unwrap())
            .spawn()
            .expect("meshid ca serve starts");
        let mut ca = Ca {
            addr,
            http_addr,
            admin_addr,
            data_dir,
            work,
            child,
            _tmp: None,
        };
        ca.ready().await;
        ca
    }

    async fn ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(self.addr).await.is_err()
            || tokio::net::TcpStream::connect(self.http_addr)
                .await
                .is_err()
            || tokio::net::TcpStream::connect(self.admin_addr)
                .await
                .is_err()
        {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("meshid ca serve exited with {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "CA not listening after 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the CA logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.work.join(format!("ca-{}.log", self.addr.port())))
            .unwrap_or_default()
    }

    /// Keep `tmp` (the test's files) alive as long as the CA.
    pub fn owning(mut self, tmp: TempDir) -> Self {
        self._tmp = Some(tmp);
        self
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn data_dir(&self) -> &str {
        self.data_dir.to_str().unwrap()
    }

    /// `meshid ca bundle` written to WORK/bundle.pem.
    pub async fn bundle_file(&self) -> PathBuf {
        let pem = run_ok(&["ca", "bundle", "--data-dir", self.data_dir()]).await;
        let path = self.work.join("bundle.pem");
        std::fs::write(&path, pem).unwrap();
        path
    }

    pub async fn join_token(&self, spiffe_id: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "ca",
            "join-token",
            "--data-dir",
            self.data_dir(),
            "--spiffe-id",
            spiffe_id,
        ];
        args.extend_from_slice(extra);
        run_ok(&args).await.trim().to_owned()
    }

    /// `meshid svid fetch` with a join token into WORK/NAME.
    pub async fn fetch(&self, token: &str, name: &str) -> (Output, PathBuf) {
        let bundle = self.bundle_file().await;
        let out_dir = self.work.join(name);
        let out = run(&[
            "svid",
            "fetch",
            "--ca",
            &self.addr(),
            "--ca-bundle",
            bundle.to_str().unwrap(),
            "--join-token",
            token,
            "--out",
            out_dir.to_str().unwrap(),
            "--timeout",
            "5s",
        ])
        .await;
        (out, out_dir)
    }

    /// `meshid token` for `scope` with the SVID in `cert_dir` (RFC 8705 mutual TLS to the
    /// CA's HTTPS port), plus `extra` flags.
    pub async fn token(&self, cert_dir: &Path, scope: &str, extra: &[&str]) -> Output {
        let bundle = self.bundle_file().await;
        let mut args = vec![
            "token".to_owned(),
            "--ca-http".to_owned(),
            format!("localhost:{}", self.http_addr.port()),
            "--ca-bundle".to_owned(),
            bundle.display().to_string(),
            "--cert".to_owned(),
            cert_dir.join("svid.pem").display().to_string(),
            "--key".to_owned(),
            cert_dir.join("svid_key.pem").display().to_string(),
            "--scope".to_owned(),
            scope.to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args).await
    }

    /// The audit log's lines, parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.data_dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Send SIGTERM, as Kubernetes does.
    pub fn terminate(&self) {
        terminate(&self.child);
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the CA runs")
    }

    /// Wait at most `limit` for the process to exit.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        exited_within(&mut self.child, limit).await
    }

    pub async fn stop(mut self) -> (PathBuf, Option<TempDir>) {
        let _ = self.child.kill().await;
        (self.data_dir.clone(), self._tmp.take())
    }
}

/// The value of the first sample of metric `name` (with or without labels) in a Prometheus
/// text exposition.
pub fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

/// A plain HTTP GET with curl: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-w",
            "\n%{http_code}",
            &format!("http://{addr}{path}"),
        ])
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_owned()))
}

async fn exited_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    tokio::time::timeout(limit, child.wait()).await.ok()?.ok()
}

fn terminate(child: &Child) {
    let pid = child.id().expect("the process runs");
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "SIGTERM to {pid}");
}

/// The Python interpreter with the interop packages (tests/run.sh sets it up).
pub fn python() -> String {
    std::env::var("MESHID_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
        if Path::new(venv).exists() {
            venv.into()
        } else {
            "python3".into()
        }
    })
}

/// Check an SVID with Python cryptography (tests/interop/check_svid.py).
pub fn check_svid_with_python(svid: &Path, bundle: &Path, want_id: &str, max_ttl: u64) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/check_svid.py");
    let out = std::process::Command::new(python())
        .arg(script)
        .arg(svid)
        .arg(bundle)
        .arg(want_id)
        .arg(max_ttl.to_string())
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "OK",
        "Python cryptography refused the SVID: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl verify` of an svid.pem (leaf + intermediate) against a bundle.
pub fn openssl_verify(svid: &Path, bundle: &Path) -> Result<(), String> {
    let pem = std::fs::read_to_string(svid).unwrap();
    let blocks: Vec<&str> = pem.split_inclusive("-----END CERTIFICATE-----\n").collect();
    let dir = svid.parent().unwrap();
    let leaf = dir.join("leaf.check.pem");
    let untrusted = dir.join("intermediates.check.pem");
    std::fs::write(&leaf, blocks[0]).unwrap();
    std::fs::write(&untrusted, blocks[1..].concat()).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(bundle)
        .arg("-untrusted")
        .arg(&untrusted)
        .arg(&leaf)
        .output()
        .expect("openssl runs");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A running `meshid sidecar` on loopback ports.
pub struct Sidecar {
    pub name: String,
    /// The join token it attested with.
    pub token: String,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub cert_dir: PathBuf,
    log: PathBuf,
    child: Child,
}

/// Ports for a sidecar, chosen before it starts (so others can route to it).
#[derive(Clone, Copy)]
pub struct SidecarPorts {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
}

impl SidecarPorts {
    pub fn new() -> Self {
        Self {
            inbound: free_addr(),
            outbound: free_addr(),
            admin: free_addr(),
        }
    }
}

impl Sidecar {
    /// Start a sidecar for `spiffe_id` (a reusable join token is made for it) in front of `app`.
    pub async fn start(
        ca: &Ca,
        name: &str,
        spiffe_id: &str,
        app: SocketAddr,
        ports: SidecarPorts,
        routes: &[String],
    ) -> Sidecar {
        Self::start_with(ca, name, spiffe_id, app, ports, routes, &[]).await
    }

    /// [`Sidecar::start`] with more flags.
    pub async fn start_with(
        ca: &Ca,
        name: &str,
        spiffe_id: &str,
        app: SocketAddr,
        ports: SidecarPorts,
        routes: &[String],
        extra: &[&str],
    ) -> Sidecar {
        let token = ca.join_token(spiffe_id, &["--reusable"]).await;
        let bundle = ca.bundle_file().await;
        Self::spawn_with(
            &ca.addr(),
            &bundle,
            &ca.work,
            name,
            &token,
            app,
            ports,
            routes,
            extra,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        ca_addr: &str,
        bundle: &Path,
        work: &Path,
        name: &str,
        token: &str,
        app: SocketAddr,
        ports: SidecarPorts,
        routes: &[String],
    ) -> Sidecar {
        Self::spawn_with(ca_addr, bundle, work, name, token, app, ports, routes, &[])
    }

    /// [`Sidecar::spawn`] with more flags.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_with(
        ca_addr: &str,
        bundle: &Path,
        work: &Path,
        name: &str,
        token: &str,
        app: SocketAddr,
        ports: SidecarPorts,
        routes: &[String],
        extra: &[&str],
    ) -> Sidecar {
        let cert_dir = work.join(format!("sidecar-{name}"));
        let log = work.join(format!("sidecar-{name}.log"));
        let mut cmd = meshid();
        cmd.args(["sidecar", "--ca", ca_addr, "--ca-bundle"])
            .arg(bundle)
            .args(["--join-token", token, "--cert-dir"])
            .arg(&cert_dir)
            .args(["--app", &app.to_string()])
            .args(["--inbound-addr", &ports.inbound.to_string()])
            .args(["--outbound-addr", &ports.outbound.to_string()])
            .args(["--admin-addr", &ports.admin.to_string()]);
        for r in routes {
            cmd.args(["--route", r]);
        }
        cmd.args(extra);
        let child = cmd
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("meshid sidecar starts");
        Sidecar {
            name: name.to_owned(),
            token: token.to_owned(),
            inbound: ports.inbound,
            outbound: ports.outbound,
            admin: ports.admin,
            cert_dir,
            log,
            child,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the sidecar runs")
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Send SIGTERM, as Kubernetes does.
    pub fn terminate(&self) {
        terminate(&self.child);
    }

    /// Wait at most `limit` for the process to exit.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        exited_within(&mut self.child, limit).await
    }

    /// GET on the admin port: (status, body).
    pub async fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.admin, path).await
    }

    /// Wait until /ready answers 200.
    pub async fn ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((200, _)) = self.admin_get("/ready").await {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sidecar {} exited with {status}: {}", self.name, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "sidecar {} not ready after 30 s: {}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A tiny HTTP app that answers with what it received, as JSON: method, path, the identity
/// headers (every copy), whether an Authorization header arrived, and the trace context.
pub async fn echo_app() -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let all = |name: &str| -> Vec<String> {
                            req.headers()
                                .get_all(name)
                                .iter()
                                .map(|v| v.to_str().unwrap_or("?").to_owned())
                                .collect()
                        };
                        // `?sleep_ms=N`: answer after N ms (a request in flight).
                        if let Some(ms) = req
                            .uri()
                            .query()
                            .and_then(|q| q.strip_prefix("sleep_ms="))
                            .and_then(|v| v.parse::<u64>().ok())
                        {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let mut out = serde_json::json!({
                            "method": req.method().as_str(),
                            "path": req.uri().path(),
                            "target": req.uri().to_string(),
                            "header_names": req.headers().keys().map(|k| k.as_str()).collect::<Vec<_>>(),
                            "peer": all("x-meshid-peer"),
                            "scopes": all("x-meshid-scopes"),
                            "authorization": req.headers().contains_key("authorization"),
                            "traceparent": all("traceparent"),
                        });
                        let (_, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        out["body_bytes"] = serde_json::json!(body.len());
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(
                            out.to_string(),
                        ))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}
