//! `meshid demo`: the whole mesh on loopback in one command, on the embedded defaults.
//!
//! It starts the real binary as a CA and two sidecars (child processes of this one), runs two
//! tiny services in this process — `frontend` (A, which calls B through its sidecar with plain
//! HTTP) and `orders` (B, which answers with what its sidecar told it) — and narrates: the
//! identities, a call that goes through, a call refused for a missing scope, and a hot
//! certificate renewal. Everything lives in a temporary directory and on free ports; children
//! are killed and files removed on exit, also on Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use meshid::identity::client::{Attestation, CaClient};
use meshid::identity::files;
use meshid_ca::attest::join_token;
use meshid_ca::authority::Authorities;
use meshid_ca::store::{FsStore, Store};
use meshid_proto::{SpiffeId, TrustDomain};
use tokio::process::{Child, Command};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const POLICY: &str = "\
trust_domain: cluster.local
services:
  orders:
    id: spiffe://cluster.local/ns/shop/sa/orders
    scopes: [orders:read, orders:write]
    routes:
      - { method: GET,  path: /orders, scope: orders:read }
      - { method: POST, path: /orders, scope: orders:write }
    callers:
      frontend: [orders:read]
  frontend:
    id: spiffe://cluster.local/ns/shop/sa/frontend
";

fn free() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.start_kill();
        }
    }
}

pub async fn run() -> anyhow::Result<()> {
    let stop = crate::stop_signal();
    let tmp = tempfile::tempdir().context("making a temporary directory")?;
    let started = Instant::now();
    tokio::select! {
        r = scenario(tmp.path()) => {
            let r = r.map(|()| println!("\nDone in {:.1} s; everything it started is stopped and {} is removed.", started.elapsed().as_secs_f64(), tmp.path().display()));
            if let Err(e) = &r {
                eprintln!("\nThe demo failed. Logs:");
                for name in ["ca.log", "sidecar-frontend.log", "sidecar-orders.log"] {
                    let text = std::fs::read_to_string(tmp.path().join(name)).unwrap_or_default();
                    eprintln!("--- {name}\n{}", text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"));
                }
                eprintln!("---");
                let _ = e;
            }
            r
        }
        _ = stop => {
            println!("\nInterrupted: stopping everything and removing {}.", tmp.path().display());
            Ok(())
        }
    }
}

async fn wait_for(
    what: &str,
    deadline: Duration,
    mut ok: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    while !ok().await {
        if Instant::now() > until {
            bail!("{what} did not happen within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

async fn get(
    addr: SocketAddr,
    method: &str,
    uri: &str,
    host: &str,
) -> anyhow::Result<(u16, String, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", host)
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
    Ok((status, challenge, body))
}

/// B's app: answers with what its sidecar told it about the caller.
async fn orders_app() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_owned()
                        };
                        let body = format!(
                            "peer={} scopes={}",
                            h("x-meshid-peer"),
                            h("x-meshid-scopes")
                        );
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn describe(dir: &Path) -> anyhow::Result<(String, String, String)> {
    let pem = std::fs::read(dir.join(files::SVID_FILE))?;
    let certs = meshid_proto::pem::decode_certs(&pem)?;
    let info = meshid_proto::svid::inspect(&certs[0])?;
    let left = info
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Ok((
        info.spiffe_id.to_string(),
        format!(
            "{} (in {})",
            humantime::format_rfc3339_seconds(info.not_after),
            humantime::format_duration(Duration::from_secs(left.as_secs()))
        ),
        info.serial,
    ))
}

async fn scenario(work: &Path) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("finding the meshid binary")?;
    let (grpc, https, admin) = (free()?, free()?, free()?);
    let data = work.join("ca");
    std::fs::write(work.join("policy.yaml"), POLICY)?;
    let log = |name: &str| -> anyhow::Result<Stdio> {
        Ok(Stdio::from(std::fs::File::create(work.join(name))?))
    };
    let mut children = Children(Vec::new());

    println!(
        "meshid demo: a CA, two sidecars and two services on loopback ({})\n",
        work.display()
    );
    println!(
        "1. The CA starts (gRPC {grpc}, HTTPS {https}) with a policy: frontend may read orders, not write them."
    );
    children.0.push(
        Command::new(&me)
            .args(["ca", "serve", "--data-dir"])
            .arg(&data)
            .args(["--policy"])
            .arg(work.join("policy.yaml"))
            .args([
                "--grpc-addr",
                &grpc.to_string(),
                "--http-addr",
                &https.to_string(),
                "--admin-addr",
                &admin.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(log("ca.log")?)
            .kill_on_drop(true)
            .spawn()?,
    );
    wait_for("the CA listening", Duration::from_secs(10), async || {
        tokio::net::TcpStream::connect(grpc).await.is_ok()
    })
    .await?;
    let store = FsStore::open(&data)?;
    let td = TrustDomain::parse("cluster.local")?;
    let bundle = Authorities::new(td.clone(), store.load_authorities()?.value)?.bundle(0);
    let bundle_file = work.join("bundle.pem");
    std::fs::write(&bundle_file, bundle.to_pem())?;

    let orders_app = orders_app().await?;
    let (f_in, f_out, f_admin) = (free()?, free()?, free()?);
    let (o_in, o_out, o_admin) = (free()?, free()?, free()?);
    let mut sidecar = |name: &str,
                       id: &str,
                       app: SocketAddr,
                       inbound: SocketAddr,
                       outbound: SocketAddr,
                       admin: SocketAddr,
                       route: Option<String>|
     -> anyhow::Result<()> {
        let token = join_token::create(
            &store,
            &SpiffeId::parse(id)?,
            Duration::from_secs(600),
            true,
            SystemTime::now(),
        )?;
        let mut cmd = Command::new(&me);
        cmd.args(["sidecar", "--ca", &grpc.to_string(), "--ca-bundle"])
            .arg(&bundle_file)
            // In the environment, not argv: `ps` shows every process's arguments.
            .env("MESHID_JOIN_TOKEN", token.expose())
            .arg("--cert-dir")
            .arg(work.join(format!("sidecar-{name}")))
            .args([
                "--app",
                &app.to_string(),
                "--inbound-addr",
                &inbound.to_string(),
            ])
            .args([
                "--outbound-addr",
                &outbound.to_string(),
                "--admin-addr",
                &admin.to_string(),
            ]);
        if let Some(r) = route {
            cmd.args(["--route", &r]);
        }
        children.0.push(
            cmd.stdout(Stdio::null())
                .stderr(log(&format!("sidecar-{name}.log"))?)
                .kill_on_drop(true)
                .spawn()?,
        );
        Ok(())
    };
    println!("2. Two sidecars start and attest with join tokens; each generates its key in place.");
    sidecar("orders", ORDERS, orders_app, o_in, o_out, o_admin, None)?;
    sidecar(
        "frontend",
        FRONTEND,
        orders_app,
        f_in,
        f_out,
        f_admin,
        Some(format!("orders={o_in}")),
    )?;
    for admin in [o_admin, f_admin] {
        wait_for("a sidecar ready", Duration::from_secs(10), async || {
            get(admin, "GET", "/ready", "admin")
                .await
                .is_ok_and(|(s, _, _)| s == 200)
        })
        .await?;
    }
    let dirs: Vec<PathBuf> = ["frontend", "orders"]
        .iter()
        .map(|n| work.join(format!("sidecar-{n}")))
        .collect();
    for dir in &dirs {
        let (id, expiry, _) = describe(dir)?;
        println!("   {id}\n      certificate expires {expiry}");
    }

    println!("\n3. frontend's app calls http://orders/orders with plain HTTP through its sidecar.");
    let (status, _, body) = get(f_out, "GET", "http://orders/orders", "orders").await?;
    println!("   -> {status}; the orders app saw: {body}");
    if status != 200 {
        bail!("the allowed call answered {status}: {body}");
    }

    println!("\n4. frontend tries POST /orders, which needs orders:write.");
    let (status, challenge, body) = get(f_out, "POST", "http://orders/orders", "orders").await?;
    println!(
        "   -> {status} refused by orders' sidecar before the app saw it: {}",
        body.trim()
    );
    println!("      WWW-Authenticate: {challenge}");
    if status != 403 {
        bail!("the call without the scope answered {status}");
    }

    println!(
        "\n5. A new certificate for orders lands in its cert directory (as cert-manager would put it)."
    );
    let (_, _, old_serial) = describe(&dirs[1])?;
    let token = join_token::create(
        &store,
        &SpiffeId::parse(ORDERS)?,
        Duration::from_secs(60),
        false,
        SystemTime::now(),
    )?;
    let client = CaClient::new(&grpc.to_string(), bundle)?;
    let fresh = client.issue(&Attestation::JoinToken(token)).await?;
    files::write(&dirs[1], &fresh)?;
    let reloaded = async || {
        get(o_admin, "GET", "/metrics", "admin")
            .await
            .is_ok_and(|(_, _, m)| m.lines().any(|l| l == "meshid_svid_reloads_total 1"))
    };
    let t = Instant::now();
    wait_for(
        "the new certificate in use",
        Duration::from_secs(5),
        reloaded,
    )
    .await?;
    let (_, expiry, new_serial) = describe(&dirs[1])?;
    println!(
        "   orders' sidecar serves it after {} ms: serial {old_serial} -> {new_serial}, expires {expiry}",
        t.elapsed().as_millis()
    );
    let (status, _, body) = get(f_out, "GET", "http://orders/orders", "orders").await?;
    println!("   frontend calls again -> {status}; the orders app saw: {body}");
    if status != 200 {
        bail!("the call after the renewal answered {status}: {body}");
    }
    drop(children);
    Ok(())
}
