//! Bad input on every port of the real processes: the CA's gRPC, HTTPS and admin ports, a
//! sidecar's outbound, inbound and admin ports, and its Workload API socket. Each port gets
//! garbage, a TLS ClientHello and then nothing, HTTP/2 frames out of order, an oversized
//! header, an oversized body, more connections than it takes, a slowloris, invalid gRPC
//! framing and valid gRPC with absurd field values, whichever of them the port speaks. Each
//! must be refused (a status, a GOAWAY or RST_STREAM, a TLS alert, or the connection closed),
//! well-behaved clients are served after every one, and resident memory stays bounded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_proto::pb::{self, attestation::Kind};
use meshid_proto::workload;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::mesh::{Shop, direct, shop_with, via_proxy};
use crate::security::try_tls;
use crate::support::set_child_env;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Conn = Box<dyn Io>;

/// How a port is reached.
#[derive(Clone)]
enum Reach {
    /// Plain TCP (HTTP/1.1, and HTTP/2 with prior knowledge where the port speaks it).
    Plain(SocketAddr),
    /// TLS; the client presents the SVID in the directory when given.
    Tls(SocketAddr, Option<PathBuf>),
    Unix(PathBuf),
}

#[derive(Clone)]
struct Port {
    name: &'static str,
    reach: Reach,
    /// Speaks HTTP/2 (all gRPC ports; the sidecar's inbound too).
    h2: bool,
    /// A gRPC method to frame requests for.
    grpc: Option<&'static str>,
    /// At most this many connections at once (beyond them, new ones are closed at once).
    max_connections: usize,
}

impl Port {
    /// A connection as a client of the port makes it (TLS completed on TLS ports).
    async fn connect(&self, bundle: &Path, alpn: &[u8]) -> Conn {
        self.try_connect(bundle, alpn)
            .await
            .unwrap_or_else(|e| panic!("{}: a well-formed connection failed: {e}", self.name))
    }

    async fn try_connect(&self, bundle: &Path, alpn: &[u8]) -> std::io::Result<Conn> {
        match &self.reach {
            Reach::Plain(a) => TcpStream::connect(a).await.map(|c| Box::new(c) as Conn),
            Reach::Tls(a, cert) => try_tls(*a, bundle, cert.as_deref(), alpn)
                .await
                .map(|c| Box::new(c) as Conn),
            Reach::Unix(p) => UnixStream::connect(p).await.map(|c| Box::new(c) as Conn),
        }
    }

    /// A raw connection from 127.0.0.2 (a flood from another address than the clients').
    async fn raw_from_elsewhere(&self) -> Conn {
        match &self.reach {
            Reach::Plain(a) | Reach::Tls(a, _) => {
                let s = tokio::net::TcpSocket::new_v4().unwrap();
                s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                Box::new(s.connect(*a).await.unwrap())
            }
            Reach::Unix(_) => self.raw().await,
        }
    }

    /// A raw stream with no TLS (for bytes that come before any handshake).
    async fn raw(&self) -> Conn {
        let c: std::io::Result<Conn> = match &self.reach {
            Reach::Plain(a) | Reach::Tls(a, _) => {
                TcpStream::connect(a).await.map(|c| Box::new(c) as Conn)
            }
            Reach::Unix(p) => UnixStream::connect(p).await.map(|c| Box::new(c) as Conn),
        };
        c.unwrap_or_else(|e| panic!("{}: connecting failed: {e}", self.name))
    }

    fn tls(&self) -> bool {
        matches!(self.reach, Reach::Tls(..))
    }
}

/// What came back: the bytes read until the server closed or went quiet, and whether it
/// closed.
struct Answer {
    bytes: Vec<u8>,
    closed: bool,
    after: Duration,
}

async fn answer(c: &mut Conn, within: Duration) -> Answer {
    let started = Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = within.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Answer {
                    bytes,
                    closed: true,
                    after: started.elapsed(),
                };
            }
            Ok(Ok(n)) => {
                bytes.extend_from_slice(&buf[..n]);
                if bytes.len() > 1 << 20 {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    Answer {
        bytes,
        closed: false,
        after: started.elapsed(),
    }
}

/// Deterministic garbage.
fn garbage(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// --- HTTP/2 frames, written by hand so they can be wrong --------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The frames in `bytes`: (type, flags, stream, payload); a trailing partial frame is dropped.
fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut b = bytes;
    while b.len() >= 9 {
        let len = (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize;
        if b.len() < 9 + len {
            break;
        }
        let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff;
        out.push((b[3], b[4], stream, b[9..9 + len].to_vec()));
        b = &b[9 + len..];
    }
    out
}

/// A request's header block (HPACK), split into HEADERS and CONTINUATION frames of 16 KiB.
fn header_frames(stream: u32, fields: &[(&[u8], &[u8])], end_stream: bool) -> Vec<u8> {
    let block = loona_hpack::Encoder::new().encode(fields.iter().copied());
    let chunks: Vec<&[u8]> = block.chunks(16_384).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i == chunks.len() - 1;
        let flags =
            if last { END_HEADERS } else { 0 } | if i == 0 && end_stream { END_STREAM } else { 0 };
        out.extend(frame(
            if i == 0 { HEADERS } else { CONTINUATION },
            flags,
            stream,
            chunk,
        ));
    }
    out
}

fn grpc_request(method: &str, extra: &[(&[u8], &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut f: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b":method".to_vec(), b"POST".to_vec()),
        (b":scheme".to_vec(), b"http".to_vec()),
        (b":path".to_vec(), method.as_bytes().to_vec()),
        (b":authority".to_vec(), b"localhost".to_vec()),
        (b"content-type".to_vec(), b"application/grpc".to_vec()),
        (b"te".to_vec(), b"trailers".to_vec()),
        (b"workload.spiffe.io".to_vec(), b"true".to_vec()),
    ];
    f.extend(extra.iter().map(|(n, v)| (n.to_vec(), v.to_vec())));
    f
}

fn fields(f: &[(Vec<u8>, Vec<u8>)]) -> Vec<(&[u8], &[u8])> {
    f.iter()
        .map(|(n, v)| (n.as_slice(), v.as_slice()))
        .collect()
}

/// What an HTTP/2 answer says: a GOAWAY or RST_STREAM, and the `:status` and `grpc-status`
/// values of the header blocks (decoded with one HPACK state for the connection).
#[derive(Debug, Default)]
struct H2Answer {
    goaway: bool,
    rst: bool,
    status: Option<String>,
    grpc_status: Option<String>,
    grpc_message: Option<String>,
}

fn h2_answer(bytes: &[u8]) -> H2Answer {
    let mut a = H2Answer::default();
    let mut decoder = loona_hpack::Decoder::new();
    for (kind, _, _, payload) in frames(bytes) {
        match kind {
            GOAWAY => a.goaway = true,
            RST_STREAM => a.rst = true,
            HEADERS => {
                if let Ok(fields) = decoder.decode(&payload) {
                    for (n, v) in fields {
                        let v = String::from_utf8_lossy(&v).into_owned();
                        match n.as_slice() {
                            b":status" => a.status = Some(v),
                            b"grpc-status" => a.grpc_status = Some(v),
                            b"grpc-message" => a.grpc_message = Some(v),
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    a
}

// --- What counts as a refusal ------------------------------------------------------------------

/// An HTTP/1.1 refusal: a 4xx status line, or the connection closed.
fn h1_refused(a: &Answer) -> Result<String, String> {
    let text = String::from_utf8_lossy(&a.bytes);
    if let Some(status) = text.strip_prefix("HTTP/1.1 ").and_then(|s| s.get(..3))
        && status.starts_with('4')
    {
        return Ok(format!("HTTP {status}"));
    }
    if a.closed && a.bytes.is_empty() {
        return Ok("closed".into());
    }
    Err(format!(
        "neither a 4xx nor a close: {:?} (closed {})",
        text.chars().take(120).collect::<String>(),
        a.closed
    ))
}

/// An HTTP/2 refusal: GOAWAY, RST_STREAM, a 4xx `:status`, a gRPC status other than OK, or
/// the connection closed.
fn h2_refused(a: &Answer) -> Result<String, String> {
    let h = h2_answer(&a.bytes);
    // Served is not refused, however the connection ends afterwards.
    if h.grpc_status.as_deref() == Some("0")
        || h.status.as_deref().is_some_and(|s| s.starts_with('2'))
    {
        return Err(format!("served: {h:?}"));
    }
    if let Some(g) = h.grpc_status.as_deref().filter(|g| *g != "0") {
        return Ok(format!(
            "grpc-status {g} ({})",
            h.grpc_message.as_deref().unwrap_or("")
        ));
    }
    if h.status.as_deref().is_some_and(|s| s.starts_with('4')) {
        return Ok(format!("HTTP/2 {}", h.status.unwrap_or_default()));
    }
    if h.goaway || h.rst {
        return Ok(if h.goaway { "GOAWAY" } else { "RST_STREAM" }.into());
    }
    if a.closed {
        return Ok("closed".into());
    }
    Err(format!("no refusal in {h:?}"))
}

/// Bytes before any TLS handshake on a TLS port: an alert, or the connection closed.
fn tls_refused(a: &Answer) -> Result<String, String> {
    match a.bytes.first() {
        Some(0x15) => Ok("TLS alert".into()),
        None if a.closed => Ok("closed".into()),
        _ => Err(format!(
            "answered {} bytes, closed {}",
            a.bytes.len(),
            a.closed
        )),
    }
}

// --- The attacks --------------------------------------------------------------------------------

/// A ClientHello as rustls sends it first.
fn client_hello() -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(meshid_proto::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut c = rustls::ClientConnection::new(
        Arc::new(config),
        rustls_pki_types::ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    c.write_tls(&mut out).unwrap();
    out
}

/// Whether the port answers a well-formed client: its HTTP/2 SETTINGS, or an HTTP/1.1
/// status line.
async fn responsive(p: &Port, bundle: &Path, alpn: &[u8]) -> Result<(), String> {
    let mut c = p
        .try_connect(bundle, alpn)
        .await
        .map_err(|e| e.to_string())?;
    if p.h2 {
        send(&mut c, &h2_start()).await;
    } else {
        send(&mut c, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    }
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(QUICK, c.read(&mut buf))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| e.to_string())?;
    let ok = if p.h2 {
        n >= 9 && buf[3] == SETTINGS
    } else {
        buf[..n].starts_with(b"HTTP/1.1 ")
    };
    ok.then_some(())
        .ok_or_else(|| format!("answered {:?}", &buf[..n]))
}

/// How an answer is judged: how it was refused, or what is wrong with it.
type Judge = fn(&Answer) -> Result<String, String>;

/// One attack on one port: its name and the verdict (how it was refused, or what went wrong).
type Tried = (String, Result<String, String>);

const QUICK: Duration = Duration::from_secs(3);

/// The HTTP/2 connection start most attacks need: preface and an empty SETTINGS.
fn h2_start() -> Vec<u8> {
    let mut b = PREFACE.to_vec();
    b.extend(frame(SETTINGS, 0, 0, &[]));
    b
}

async fn send(c: &mut Conn, bytes: &[u8]) -> bool {
    c.write_all(bytes).await.is_ok() && c.flush().await.is_ok()
}

async fn attacks(p: &Port, bundle: &Path) -> Vec<Tried> {
    let mut tried: Vec<Tried> = Vec::new();
    let alpn: &[u8] = if p.h2 { b"h2" } else { b"http/1.1" };
    // Ports that take HTTP/1.1 also take HTTP/2 with prior knowledge: judge the answer by
    // the protocol it is in.
    let refused = |a: &Answer| {
        if a.bytes.starts_with(b"HTTP/1.") || (a.bytes.is_empty() && !p.h2) {
            h1_refused(a)
        } else {
            h2_refused(a)
        }
    };

    // Garbage, before any handshake and (on TLS ports) after it.
    for (n, seed) in [(17usize, 1u64), (4096, 2), (65_536, 3)] {
        let mut c = p.raw().await;
        send(&mut c, &garbage(n, seed)).await;
        let a = answer(&mut c, QUICK).await;
        let v = if p.tls() {
            tls_refused(&a)
        } else {
            refused(&a)
        };
        tried.push((format!("{n} bytes of garbage"), v));
    }
    if p.tls() {
        let mut c = p.connect(bundle, alpn).await;
        send(&mut c, &garbage(4096, 4)).await;
        let a = answer(&mut c, QUICK).await;
        tried.push(("garbage after the TLS handshake".into(), refused(&a)));
    }

    // A ClientHello and then nothing: cut off by the handshake timeout (1 s here).
    {
        let mut c = p.raw().await;
        send(&mut c, &client_hello()).await;
        let a = answer(&mut c, Duration::from_secs(6)).await;
        let v = if !a.closed {
            Err("still open after 6 s".into())
        } else if p.tls() && a.after < Duration::from_millis(500) {
            // A TLS port answers the hello and waits for the client's Finished.
            Err(format!(
                "closed after {:?}, before the handshake timeout",
                a.after
            ))
        } else {
            Ok(format!("closed after {:.1} s", a.after.as_secs_f64()))
        };
        tried.push(("a ClientHello, then nothing".into(), v));
    }

    // HTTP/2 frames out of order (on an HTTP/1.1-only port, the preface itself is refused).
    let out_of_order: [(&str, Vec<u8>); 6] = [
        (
            "DATA on a stream never opened",
            frame(DATA, END_STREAM, 1, b"hello"),
        ),
        (
            "HEADERS on an even (server) stream",
            header_frames(2, &fields(&grpc_request("/x", &[])), true),
        ),
        (
            "CONTINUATION with no HEADERS",
            frame(CONTINUATION, END_HEADERS, 1, &[0x82]),
        ),
        (
            "SETTINGS of a length not a multiple of 6",
            frame(SETTINGS, 0, 0, &[0, 1, 0]),
        ),
        (
            "WINDOW_UPDATE of 0",
            frame(WINDOW_UPDATE, 0, 0, &[0, 0, 0, 0]),
        ),
        (
            "HEADERS with a broken HPACK block",
            frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &[0xff, 0xff, 0xff, 0xff, 0x0f],
            ),
        ),
    ];
    for (what, f) in out_of_order {
        let mut c = p.connect(bundle, alpn).await;
        let mut b = h2_start();
        b.extend(f);
        send(&mut c, &b).await;
        let a = answer(&mut c, QUICK).await;
        let v = if a.bytes.starts_with(b"HTTP/1.") {
            h1_refused(&a)
        } else {
            let h = h2_answer(&a.bytes);
            if h.goaway || h.rst || a.closed {
                Ok(if h.goaway {
                    "GOAWAY"
                } else if h.rst {
                    "RST_STREAM"
                } else {
                    "closed"
                }
                .into())
            } else {
                Err(format!("{h:?}"))
            }
        };
        tried.push((format!("HTTP/2: {what}"), v));
    }

    // An oversized header (1 MiB; the limit is 64 KiB).
    {
        let big = vec![b'a'; 1 << 20];
        let mut c = p.connect(bundle, alpn).await;
        if p.h2 {
            let mut req = grpc_request(p.grpc.unwrap_or("/healthz"), &[]);
            req.push((b"x-big".to_vec(), big));
            let mut b = h2_start();
            b.extend(header_frames(1, &fields(&req), true));
            send(&mut c, &b).await;
        } else {
            let mut b = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
            b.extend(&big);
            b.extend(b"\r\n\r\n");
            send(&mut c, &b).await;
        }
        let a = answer(&mut c, QUICK).await;
        tried.push(("a 1 MiB header".into(), refused(&a)));
    }
    // Many headers (10,000 small ones).
    {
        let mut c = p.connect(bundle, alpn).await;
        if p.h2 {
            let mut req = grpc_request(p.grpc.unwrap_or("/healthz"), &[]);
            req.extend((0..10_000).map(|i| (format!("x-h{i}").into_bytes(), b"v".to_vec())));
            let mut b = h2_start();
            b.extend(header_frames(1, &fields(&req), true));
            send(&mut c, &b).await;
        } else {
            let mut b = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
            for i in 0..10_000 {
                b.extend(format!("X-H{i}: v\r\n").as_bytes());
            }
            b.extend(b"\r\n");
            send(&mut c, &b).await;
        }
        let a = answer(&mut c, QUICK).await;
        tried.push(("10,000 headers".into(), refused(&a)));
    }

    // An oversized body: a gRPC message of 64 MiB announced (the limits are 4 MiB and 64 KiB),
    // its first 16 KB sent (within the flow-control window); on HTTP/1.1 ports a POST
    // announcing 1 GiB, 1 MiB of it sent.
    let mut body_refusal: Option<Judge> = None;
    {
        let mut c = p.connect(bundle, alpn).await;
        if let Some(method) = p.grpc {
            let mut b = h2_start();
            b.extend(header_frames(1, &fields(&grpc_request(method, &[])), false));
            let mut msg = vec![0u8];
            msg.extend((64u32 << 20).to_be_bytes());
            msg.extend(vec![0u8; 16_000 - 5]);
            b.extend(frame(DATA, 0, 1, &msg));
            send(&mut c, &b).await;
            // Refused for its size: RESOURCE_EXHAUSTED or OUT_OF_RANGE, before the rest.
            body_refusal = Some(|a| {
                let h = h2_answer(&a.bytes);
                match h.grpc_status.as_deref() {
                    Some(g @ ("8" | "11")) => Ok(format!(
                        "grpc-status {g} ({})",
                        h.grpc_message.unwrap_or_default()
                    )),
                    other => Err(format!("grpc-status {other:?}, not for the size: {h:?}")),
                }
            });
        } else if p.h2 {
            // The inbound streams bodies to the app; an absurd announced length is refused.
            let req: Vec<(Vec<u8>, Vec<u8>)> = vec![
                (b":method".to_vec(), b"POST".to_vec()),
                (b":scheme".to_vec(), b"https".to_vec()),
                (b":path".to_vec(), b"/orders".to_vec()),
                (b":authority".to_vec(), b"orders".to_vec()),
                (
                    b"content-length".to_vec(),
                    b"99999999999999999999999".to_vec(),
                ),
            ];
            let mut b = h2_start();
            b.extend(header_frames(1, &fields(&req), false));
            b.extend(frame(DATA, 0, 1, &[0u8; 16_000]));
            send(&mut c, &b).await;
        } else {
            // To a real destination through the outbound proxy (which refuses what the
            // caller may not do before reading the body); to /token elsewhere.
            let target = if p.name == "sidecar outbound" {
                "http://orders/orders"
            } else {
                "/token"
            };
            let mut b = format!(
                "POST {target} HTTP/1.1\r\nHost: orders\r\nContent-Length: 1073741824\r\n\r\n"
            )
            .into_bytes();
            b.extend(vec![b'a'; 1 << 20]);
            send(&mut c, &b).await;
        }
        let a = answer(&mut c, QUICK).await;
        let v = match body_refusal {
            Some(check) => check(&a),
            None if p.name == "CA HTTPS" => {
                // The token endpoint reads at most 16 KiB of form and says so.
                let text = String::from_utf8_lossy(&a.bytes).into_owned();
                if text.starts_with("HTTP/1.1 400") && text.contains("over 16384 bytes") {
                    Ok("HTTP 400 invalid_request: the body is over 16384 bytes".into())
                } else {
                    Err(format!(
                        "not refused for its size: {}",
                        text.chars().take(200).collect::<String>()
                    ))
                }
            }
            None => refused(&a),
        };
        let what = match p.name {
            "sidecar outbound" => {
                "an oversized body, to a route the caller may not use (refused before the body)"
            }
            "CA admin" | "sidecar admin" => {
                "an oversized body, to a path that takes none (refused before the body)"
            }
            "sidecar inbound" => "an oversized body with an absurd content-length",
            _ => "an oversized body",
        };
        tried.push((what.into(), v));
    }

    // Invalid gRPC framing.
    if let Some(method) = p.grpc {
        let bad: [(&str, Vec<u8>); 3] = [
            ("a compressed message with no grpc-encoding", {
                let mut m = vec![1u8, 0, 0, 0, 3];
                m.extend(b"abc");
                m
            }),
            ("a message cut short", vec![0u8, 0, 0, 0, 100, 1, 2, 3]),
            ("a message that is not protobuf", {
                let mut m = vec![0u8, 0, 0, 0, 8];
                m.extend([0xff; 8]);
                m
            }),
        ];
        for (what, msg) in bad {
            let mut c = p.connect(bundle, alpn).await;
            let mut b = h2_start();
            b.extend(header_frames(1, &fields(&grpc_request(method, &[])), false));
            b.extend(frame(DATA, END_STREAM, 1, &msg));
            send(&mut c, &b).await;
            let a = answer(&mut c, QUICK).await;
            let h = h2_answer(&a.bytes);
            let v = match h.grpc_status.as_deref() {
                Some(s) if s != "0" => Ok(format!(
                    "grpc-status {s} ({})",
                    h.grpc_message.unwrap_or_default()
                )),
                other => Err(format!("grpc-status {other:?}: {h:?}")),
            };
            tried.push((format!("gRPC: {what}"), v));
        }
    }

    // Too many connections at once (from another source address, 127.0.0.2): beyond the
    // port's limit they are closed at once; below it, others are served meanwhile; and the
    // port serves once they go.
    {
        let n = (p.max_connections + 20).min(300);
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(p.raw_from_elsewhere().await);
        }
        let during = if n <= p.max_connections {
            responsive(p, bundle, alpn).await
        } else {
            Ok(())
        };
        let v = if let Err(e) = during {
            Err(format!("not served during the flood: {e}"))
        } else if n > p.max_connections {
            // Those over the limit are closed without a byte at once, well before the 1 s
            // timeouts; the first ones stay open meanwhile.
            let window = Duration::from_millis(300);
            let (first, over) = held.split_at_mut(p.max_connections);
            let over_closed = futures::future::join_all(
                over.iter_mut()
                    .map(|c| async move { answer(c, window).await.closed }),
            );
            let first_open = futures::future::join_all(
                first
                    .iter_mut()
                    .take(5)
                    .map(|c| async move { !answer(c, window).await.closed }),
            );
            let (over_closed, first_open) = tokio::join!(over_closed, first_open);
            let closed = over_closed.iter().filter(|c| **c).count();
            let open = first_open.iter().filter(|o| **o).count();
            // A connection of the first ones the server had not counted yet when a later one
            // came may swap places with it: allow two.
            if closed + 2 >= over_closed.len() && open == first_open.len() {
                Ok(format!(
                    "{closed} of the {} over the limit of {} closed within {window:?}",
                    over_closed.len(),
                    p.max_connections
                ))
            } else {
                Err(format!(
                    "{closed} of {} over the limit closed within {window:?}, {open} of the first {} open",
                    over_closed.len(),
                    first_open.len()
                ))
            }
        } else {
            Ok(format!("{n} held"))
        };
        tried.push((format!("{n} connections at once"), v));
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = responsive(p, bundle, alpn).await {
            assert!(
                Instant::now() < deadline,
                "{}: not served after the flood: {e}",
                p.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // A bounded slowloris: a request head one byte every 100 ms, cut off by the header-read
    // timeout (1 s here).
    {
        let mut c = p.connect(bundle, alpn).await;
        // HTTP/2: all but the last byte of the preface, and then nothing (a repeated preface
        // would be refused as a bad frame instead, not for its slowness).
        let bytes: Box<dyn Iterator<Item = &u8> + Send> = if p.h2 {
            Box::new(PREFACE[..PREFACE.len() - 1].iter())
        } else {
            Box::new(
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
                    .iter()
                    .cycle(),
            )
        };
        let started = Instant::now();
        let mut cut = None;
        let mut buf = [0u8; 256];
        'outer: for b in bytes {
            if started.elapsed() > Duration::from_secs(8) {
                break;
            }
            if !send(&mut c, &[*b]).await {
                cut = Some(started.elapsed());
                break;
            }
            match tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    cut = Some(started.elapsed());
                    break 'outer;
                }
                _ => {}
            }
        }
        if cut.is_none() {
            let left = Duration::from_secs(8).saturating_sub(started.elapsed());
            if matches!(
                tokio::time::timeout(left, c.read(&mut buf)).await,
                Ok(Ok(0) | Err(_))
            ) {
                cut = Some(started.elapsed());
            }
        }
        let v = match cut {
            Some(d) if d < Duration::from_millis(3500) => {
                Ok(format!("cut off after {:.1} s", d.as_secs_f64()))
            }
            Some(d) => Err(format!("cut off only after {d:?}")),
            None => Err("never cut off".into()),
        };
        tried.push(("a slowloris request head".into(), v));
    }
    tried
}

/// A refusal by the server with one of the `want` codes and a message (not a client-side
/// transport error, not a code that says something else went wrong).
fn refused_with<T>(r: Result<T, tonic::Status>, want: &[tonic::Code]) -> Result<String, String> {
    match r {
        Ok(_) => Err("accepted".into()),
        Err(st) if want.contains(&st.code()) && !st.message().is_empty() => {
            Ok(format!("{:?}: {}", st.code(), st.message()))
        }
        Err(st) => Err(format!(
            "{:?} ({}), wanted one of {want:?}",
            st.code(),
            st.message()
        )),
    }
}

/// The codes of a request refused for its size or its fields.
const TOO_BIG: &[tonic::Code] = &[
    tonic::Code::OutOfRange,
    tonic::Code::ResourceExhausted,
    tonic::Code::InvalidArgument,
];

/// Valid gRPC with absurd field values, through stock tonic clients.
async fn absurd_ca_requests(s: &Shop) -> Vec<Tried> {
    let mut tried = Vec::new();
    let mut c = crate::refusals::client(&s.ca).await;
    let cases: Vec<(&str, pb::IssueSvidRequest)> = vec![
        (
            "IssueSvid with a 3 MiB CSR of zeros",
            pb::IssueSvidRequest {
                attestation: Some(pb::Attestation {
                    kind: Some(Kind::JoinToken("mjt.x".into())),
                }),
                csr: vec![0; 3 << 20],
            },
        ),
        (
            "IssueSvid with a 1 MiB join token",
            pb::IssueSvidRequest {
                attestation: Some(pb::Attestation {
                    kind: Some(Kind::JoinToken("mjt.".to_owned() + &"A".repeat(1 << 20))),
                }),
                csr: vec![0x30, 0x03, 0x02, 0x01, 0x00],
            },
        ),
        (
            "IssueSvid with a 1 MiB Kubernetes token",
            pb::IssueSvidRequest {
                attestation: Some(pb::Attestation {
                    kind: Some(Kind::K8sServiceAccountToken("e".repeat(1 << 20))),
                }),
                csr: vec![0x30, 0x80],
            },
        ),
        (
            "IssueSvid with no attestation",
            pb::IssueSvidRequest {
                attestation: None,
                csr: vec![],
            },
        ),
    ];
    for (what, req) in cases {
        let v = refused_with(c.issue_svid(req).await, TOO_BIG);
        tried.push((what.to_owned(), v));
    }
    let v = refused_with(
        c.issue_jwt_svid(pb::IssueJwtSvidRequest {
            audience: (0..100_000).map(|i| format!("aud-{i}")).collect(),
        })
        .await,
        TOO_BIG,
    );
    tried.push(("IssueJwtSvid with 100,000 audiences (anonymous)".into(), v));
    tried
}

async fn absurd_workload_api_requests(socket: &Path) -> Vec<Tried> {
    use workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut c = SpiffeWorkloadApiClient::new(channel);
    fn with_header<T>(m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        r
    }
    let mut tried = Vec::new();
    let asks: Vec<(&str, workload::JwtsvidRequest)> = vec![
        (
            "FetchJWTSVID with 5,000 audiences",
            workload::JwtsvidRequest {
                audience: (0..5_000).map(|i| format!("a{i}")).collect(),
                spiffe_id: String::new(),
            },
        ),
        (
            "FetchJWTSVID with a 60 KiB audience",
            workload::JwtsvidRequest {
                audience: vec!["a".repeat(60 << 10)],
                spiffe_id: String::new(),
            },
        ),
        (
            "FetchJWTSVID for another identity",
            workload::JwtsvidRequest {
                audience: vec!["x".into()],
                spiffe_id: "spiffe://cluster.local/ns/kube-system/sa/admin".into(),
            },
        ),
        (
            "FetchJWTSVID with no audience",
            workload::JwtsvidRequest {
                audience: vec![],
                spiffe_id: String::new(),
            },
        ),
    ];
    for (what, req) in asks {
        let want = if req.spiffe_id.is_empty() {
            TOO_BIG
        } else {
            &[tonic::Code::PermissionDenied]
        };
        let v = refused_with(c.fetch_jwtsvid(with_header(req)).await, want);
        tried.push((what.to_owned(), v));
    }
    let v = refused_with(
        c.validate_jwtsvid(with_header(workload::ValidateJwtsvidRequest {
            audience: "x".into(),
            svid: "e".repeat(60 << 10),
        }))
        .await,
        TOO_BIG,
    );
    tried.push(("ValidateJWTSVID with a 60 KiB token".into(), v));
    tried
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Well-behaved clients on every port.
async fn served(s: &Shop, socket: &Path, after: &str) {
    let r = via_proxy(s.frontend.outbound, "GET", "http://orders/orders", &[]);
    assert_eq!(
        r.status, 200,
        "outbound and inbound after {after}: {}",
        r.body
    );
    let r = direct(
        s.orders.inbound,
        Some(&s.frontend.cert_dir),
        "/healthz",
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200, "inbound after {after}");
    assert_eq!(
        s.orders.admin_get("/ready").await.unwrap().0,
        200,
        "sidecar admin after {after}"
    );
    let admin = crate::support::http_get(s.ca.admin_addr, "/healthz").await;
    assert_eq!(admin.map(|a| a.0), Some(200), "CA admin after {after}");
    let mut c = crate::refusals::client(&s.ca).await;
    let b = c.get_bundle(pb::GetBundleRequest {}).await;
    assert!(b.is_ok(), "CA gRPC after {after}: {b:?}");
    let bundle = s.ca.bundle_file().await;
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(&bundle)
        .arg(format!(
            "https://localhost:{}/.well-known/jwks.json",
            s.ca.http_addr.port()
        ))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "CA HTTPS after {after}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap_or_else(|e| panic!("Workload API after {after}: {e}"));
    let svid = client.fetch_x509_svid().await;
    assert!(svid.is_ok(), "Workload API after {after}: {:?}", svid.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_port_refuses_bad_input_and_keeps_serving_in_bounded_memory() {
    set_child_env(&[
        ("MESHID_HANDSHAKE_TIMEOUT", "1s"),
        ("MESHID_HEADER_READ_TIMEOUT", "1s"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");
    let s = shop_with(
        crate::mesh::POLICY,
        &[],
        &["--workload-api-socket", socket.to_str().unwrap()],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no Workload API socket");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bundle = s.ca.bundle_file().await;
    served(&s, &socket, "start-up").await;
    let pids = [
        ("CA", s.ca.pid()),
        ("orders sidecar", s.orders.pid()),
        ("frontend sidecar", s.frontend.pid()),
    ];
    let before: Vec<u64> = pids.iter().map(|(_, p)| rss_kib(*p)).collect();

    let ports = [
        Port {
            name: "CA gRPC",
            reach: Reach::Tls(s.ca.addr, None),
            h2: true,
            grpc: Some("/meshid.ca.v1.Ca/GetBundle"),
            max_connections: 50_000,
        },
        Port {
            name: "CA HTTPS",
            reach: Reach::Tls(s.ca.http_addr, None),
            h2: false,
            grpc: None,
            max_connections: 5_000,
        },
        Port {
            name: "CA admin",
            reach: Reach::Plain(s.ca.admin_addr),
            h2: false,
            grpc: None,
            max_connections: 64,
        },
        Port {
            name: "sidecar outbound",
            reach: Reach::Plain(s.frontend.outbound),
            h2: false,
            grpc: None,
            max_connections: 10_000,
        },
        Port {
            name: "sidecar inbound",
            reach: Reach::Tls(s.orders.inbound, Some(s.frontend.cert_dir.clone())),
            h2: true,
            grpc: None,
            max_connections: 10_000,
        },
        Port {
            name: "sidecar admin",
            reach: Reach::Plain(s.orders.admin),
            h2: false,
            grpc: None,
            max_connections: 64,
        },
        Port {
            name: "Workload API",
            reach: Reach::Unix(socket.clone()),
            h2: true,
            grpc: Some("/SpiffeWorkloadAPI/FetchJWTBundles"),
            max_connections: 128,
        },
    ];
    let mut report: BTreeMap<&str, Vec<Tried>> = BTreeMap::new();
    for p in &ports {
        let tried = attacks(p, &bundle).await;
        served(&s, &socket, p.name).await;
        report.insert(p.name, tried);
    }
    report
        .get_mut("CA gRPC")
        .unwrap()
        .extend(absurd_ca_requests(&s).await);
    report
        .get_mut("Workload API")
        .unwrap()
        .extend(absurd_workload_api_requests(&socket).await);
    served(&s, &socket, "the absurd requests").await;

    let mut failures = Vec::new();
    let mut total = 0;
    for (port, tried) in &report {
        eprintln!("{port}: {} bad inputs", tried.len());
        for (what, v) in tried {
            total += 1;
            match v {
                Ok(how) => eprintln!("  {what}: {how}"),
                Err(e) => {
                    eprintln!("  {what}: NOT REFUSED: {e}");
                    failures.push(format!("{port}: {what}: {e}"));
                }
            }
        }
    }
    // Memory after: what the bad input cost must be given back or bounded.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for ((name, pid), before) in pids.iter().zip(before) {
        let after = rss_kib(*pid);
        eprintln!(
            "{name}: resident {} KiB before, {} KiB after",
            before, after
        );
        assert!(
            after < before + 32 * 1024,
            "{name} grew from {before} KiB to {after} KiB"
        );
    }
    eprintln!("{total} bad inputs on {} ports", report.len());
    assert!(failures.is_empty(), "not refused:\n{}", failures.join("\n"));
}
