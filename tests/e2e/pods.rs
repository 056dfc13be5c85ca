//! Pods as Linux network namespaces, for the transparent-mode tests: a [`Net`] is a namespace
//! holding a bridge; each [`Pod`] is a namespace with `eth0` (a veth whose other end is on the
//! bridge), an IPv4 and an IPv6 address, and default routes via the bridge. Commands run in a
//! pod with `ip netns exec`; [`Capture`] is tcpdump on a pod's veth end, seen from the bridge,
//! and [`pcap_payloads`] reads what it captured. The apps the tests run in pods are the Python
//! scripts in `tests/e2e/apps` ([`App`] waits for their `READY`). Needs root.
//!
//! Every namespace a `Net` made is removed when it drops, a panicking test included (the
//! processes still in them are killed first). Names carry the test process's pid and a
//! counter, so parallel tests and concurrent test processes never share one.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::support::python;

/// Proxy settings a pod's processes never inherit from the test's environment (a test sets
/// them explicitly with `.env(..)` when it wants a proxy).
const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "grpc_proxy",
    "ws_proxy",
    "wss_proxy",
    "socks_proxy",
    "no_proxy",
    "NO_PROXY",
    "no_grpc_proxy",
];

/// Run `ip ARGS` (split at spaces) to completion; it must succeed.
fn ip(args: &str) {
    let out = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("`ip` runs");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The names `ip netns list` shows.
pub fn netns_list() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("`ip netns list` runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// A network: a namespace holding the bridge `br0` with the gateway addresses 10.X.Y.1/24 and
/// fd00:X:Y::1/64; pods get 10.X.Y.N and fd00:X:Y::N (N from 2). X is 1 + pid mod 250 and Y a
/// per-process counter, so concurrent tests have distinct subnets (not that they could meet:
/// each network is its own namespace).
pub struct Net {
    /// The network namespace (the bridge, the pods' veth ends, tcpdump).
    pub ns: String,
    pub gateway: Ipv4Addr,
    pub gateway6: Ipv6Addr,
    x: u8,
    y: u8,
    /// Every namespace made, the network's first.
    made: Mutex<Vec<String>>,
    pods: Mutex<Vec<String>>,
}

impl Net {
    pub fn new() -> Net {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let (x, y) = ((1 + pid % 250) as u8, (n % 256) as u8);
        let net = Net {
            ns: format!("mi{pid}-{n}"),
            gateway: Ipv4Addr::new(10, x, y, 1),
            gateway6: Ipv6Addr::new(0xfd00, x.into(), y.into(), 0, 0, 0, 0, 1),
            x,
            y,
            made: Mutex::new(Vec::new()),
            pods: Mutex::new(Vec::new()),
        };
        net.add_namespace(&net.ns);
        let (ns, gw, gw6) = (&net.ns, net.gateway, net.gateway6);
        ip(&format!("-n {ns} link add br0 type bridge"));
        ip(&format!("-n {ns} addr add {gw}/24 dev br0"));
        ip(&format!("-n {ns} addr add {gw6}/64 dev br0 nodad"));
        ip(&format!("-n {ns} link set br0 up"));
        net
    }

    fn add_namespace(&self, ns: &str) {
        ip(&format!("netns add {ns}"));
        self.made.lock().unwrap().push(ns.to_owned());
        ip(&format!("-n {ns} link set lo up"));
    }

    /// Every namespace this network made (to check they are gone after it drops).
    pub fn namespaces(&self) -> Vec<String> {
        self.made.lock().unwrap().clone()
    }

    /// A new pod on this network. `name` (letters, digits, `-`) must be unique in the network.
    pub fn pod(&self, name: &str) -> Pod {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "pod name {name:?}"
        );
        let index = {
            let mut pods = self.pods.lock().unwrap();
            assert!(!pods.iter().any(|p| p == name), "two pods named {name}");
            pods.push(name.to_owned());
            pods.len() + 1
        };
        assert!(index < 255, "too many pods");
        let n = index as u8;
        let pod = Pod {
            name: name.to_owned(),
            ip: Ipv4Addr::new(10, self.x, self.y, n),
            ip6: Ipv6Addr::new(0xfd00, self.x.into(), self.y.into(), 0, 0, 0, 0, n.into()),
            ns: format!("{}-{name}", self.ns),
            veth: format!("v{n}-{name}").chars().take(15).collect(),
        };
        self.add_namespace(&pod.ns);
        let (net, ns, veth) = (&self.ns, &pod.ns, &pod.veth);
        ip(&format!(
            "-n {net} link add {veth} type veth peer name eth0 netns {ns}"
        ));
        ip(&format!("-n {net} link set {veth} master br0 up"));
        ip(&format!("-n {ns} addr add {}/24 dev eth0", pod.ip));
        ip(&format!("-n {ns} addr add {}/64 dev eth0 nodad", pod.ip6));
        ip(&format!("-n {ns} link set eth0 up"));
        ip(&format!("-n {ns} route add default via {}", self.gateway));
        ip(&format!(
            "-n {ns} -6 route add default via {}",
            self.gateway6
        ));
        pod
    }

    /// `program` in the network namespace (it reaches every pod; pods reach it at
    /// [`Net::gateway`] / [`Net::gateway6`], e.g. for a CA). Killed on drop.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        netns_command(&self.ns, program)
    }

    /// The `meshid` binary in the network namespace (e.g. a CA the pods reach at the gateway
    /// address), with MESHID_LOG=info.
    pub fn meshid(&self) -> Command {
        let mut c = self.command(env!("CARGO_BIN_EXE_meshid"));
        c.env("MESHID_LOG", "info");
        c
    }

    /// Start tcpdump on `pod`'s veth end (everything the pod sends and receives on `eth0`,
    /// not its loopback), once it is really capturing.
    pub async fn capture(&self, pod: &Pod) -> Capture {
        let mut child = self
            .command("tcpdump")
            .args(["-i", &pod.veth, "-w", "-", "-U", "-s", "0", "-n"])
            // Each packet at once (no batching to lose at SIGINT), and room for many: in
            // immediate mode every slot is a full snapshot length (256 KiB).
            .args(["--immediate-mode", "-B", "131072"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump starts");
        let pcap = Arc::new(Mutex::new(Vec::new()));
        let stdout = drain(child.stdout.take().unwrap(), pcap.clone());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let started = tokio::time::timeout(Duration::from_secs(10), async {
            let mut line = String::new();
            loop {
                line.clear();
                if stderr.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return false;
                }
                log.lock().unwrap().extend_from_slice(line.as_bytes());
                if line.contains("listening on") {
                    return true;
                }
            }
        })
        .await;
        let stderr = drain(stderr, log.clone());
        if started != Ok(true) {
            let _ = child.kill().await;
            let _ = stderr.await;
            panic!(
                "tcpdump on {} did not start capturing: {}",
                pod.veth,
                String::from_utf8_lossy(&log.lock().unwrap())
            );
        }
        Capture {
            child,
            pcap,
            log,
            stdout,
            stderr,
        }
    }
}

impl Default for Net {
    fn default() -> Self {
        Net::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let made = std::mem::take(&mut *self.made.lock().unwrap_or_else(|e| e.into_inner()));
        for ns in made.iter().rev() {
            // Deleting a namespace's name does not end the processes in it (nor free it while
            // they run): kill them first.
            if let Ok(out) = std::process::Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
            {
                let pids = String::from_utf8_lossy(&out.stdout);
                let pids: Vec<&str> = pids.split_whitespace().collect();
                if !pids.is_empty() {
                    let _ = std::process::Command::new("kill")
                        .arg("-KILL")
                        .args(&pids)
                        .status();
                }
            }
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

fn netns_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(program)
        .kill_on_drop(true);
    for var in PROXY_VARS {
        c.env_remove(var);
    }
    c
}

/// Copy everything `from` yields into `into`, in a task.
fn drain(
    mut from: impl AsyncRead + Unpin + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                return;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

/// A pod: a network namespace with `eth0` on its network's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Its network namespace.
    pub ns: String,
    /// The name of the other end of its `eth0`, in the network's namespace (what
    /// [`Net::capture`] listens on).
    pub veth: String,
}

impl Pod {
    /// `ip netns exec <ns> program`: runs as root in the pod. Killed on drop. Proxy variables
    /// (http_proxy, no_proxy, ...) are not inherited from the test.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        netns_command(&self.ns, program)
    }

    /// `program` in the pod as `uid`:`gid` with no supplementary groups (setpriv switches
    /// after `ip netns exec` has entered the namespace, which needs root).
    pub fn command_as(&self, program: impl AsRef<OsStr>, uid: u32, gid: u32) -> Command {
        let mut c = self.command("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg("--")
            .arg(program);
        c
    }

    /// The `meshid` binary in the pod (as root), with MESHID_LOG=info.
    pub fn meshid(&self) -> Command {
        let mut c = self.command(env!("CARGO_BIN_EXE_meshid"));
        c.env("MESHID_LOG", "info");
        c
    }

    /// The venv's Python running `tests/e2e/apps/SCRIPT` in the pod, as root.
    pub fn app(&self, script: &str) -> Command {
        let mut c = self.command(python());
        c.arg(apps_dir().join(script));
        c
    }

    /// The same as `uid`:`gid`.
    pub fn app_as(&self, script: &str, uid: u32, gid: u32) -> Command {
        let mut c = self.command_as(python(), uid, gid);
        c.arg(apps_dir().join(script));
        c
    }

    /// Wait until a TCP connection from this pod to `addr` is accepted (a connect loop in
    /// Python in the pod: what answers is whatever the pod's routing and iptables reach).
    pub async fn wait_port(&self, addr: SocketAddr, timeout: Duration) {
        const LOOP: &str = "\
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[3])
while True:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).close()
        break
    except OSError as e:
        if time.monotonic() > deadline:
            sys.exit(f'{e}')
        time.sleep(0.02)
";
        let out = self
            .command(python())
            .args(["-c", LOOP, &addr.ip().to_string(), &addr.port().to_string()])
            .arg(timeout.as_secs_f64().to_string())
            .output()
            .await
            .expect("python runs");
        assert!(
            out.status.success(),
            "{addr} accepts no connection from pod {} after {timeout:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `addr` with this pod's IPv4 address.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }

    /// `addr` with this pod's IPv6 address.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6), port)
    }
}

/// Where the apps are (`tests/e2e/apps`).
pub fn apps_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/apps"))
}

/// A running server that printed `READY` (a script in `tests/e2e/apps`, or anything else that
/// does). Killed on drop.
pub struct App {
    pub child: Child,
    what: String,
    output: Arc<Mutex<Vec<u8>>>,
}

impl App {
    /// Spawn `cmd` and wait (at most 15 s) for the line `READY` on its stdout.
    pub async fn start(mut cmd: Command) -> App {
        let what = format!("{:?}", cmd.as_std());
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{what} starts: {e}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        drain(child.stderr.take().unwrap(), output.clone());
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let ready = tokio::time::timeout(Duration::from_secs(15), async {
            let mut line = String::new();
            loop {
                line.clear();
                if stdout.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return false;
                }
                if line.trim() == "READY" {
                    return true;
                }
                output.lock().unwrap().extend_from_slice(line.as_bytes());
            }
        })
        .await;
        drain(stdout, output.clone());
        let mut app = App {
            child,
            what,
            output,
        };
        if ready != Ok(true) {
            let _ = app.child.kill().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            panic!("{} did not print READY: {}", app.what, app.log());
        }
        app
    }

    /// What it printed (stdout after READY, and stderr).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }
}

/// Run `cmd` (a client app), which must exit 0, and parse the last line of its stdout as JSON.
pub async fn json_output(cmd: &mut Command) -> Value {
    let out = cmd.output().await.expect("the client runs");
    let what = format!("{:?}", cmd.as_std());
    parse_json_output(&what, &out)
}

/// The last stdout line of a client that must have succeeded, as JSON.
pub fn parse_json_output(what: &str, out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// tcpdump running on a pod's veth end.
pub struct Capture {
    child: Child,
    pcap: Arc<Mutex<Vec<u8>>>,
    log: Arc<Mutex<Vec<u8>>>,
    stdout: JoinHandle<()>,
    stderr: JoinHandle<()>,
}

impl Capture {
    /// Stop capturing (once nothing new came for 200 ms, at most 2 s: the last packets of
    /// the test's exchange are in) with SIGINT, and return the pcap file's bytes.
    pub async fn stop(mut self) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut seen = self.pcap.lock().unwrap().len();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = self.pcap.lock().unwrap().len();
            if now == seen || Instant::now() > deadline {
                break;
            }
            seen = now;
        }
        let pid = self.child.id().expect("tcpdump runs");
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        let _ = (&mut self.stdout).await;
        let _ = (&mut self.stderr).await;
        let pcap = std::mem::take(&mut *self.pcap.lock().unwrap());
        let log = String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned();
        assert!(pcap.len() >= 24, "tcpdump wrote no pcap: {log}");
        // A capture with holes would make "this never appears in plaintext" meaningless.
        assert!(
            log.contains("\n0 packets dropped by kernel"),
            "tcpdump lost packets: {log}"
        );
        pcap
    }
}

/// One TCP segment with data, from a capture.
#[derive(Clone, Debug)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub payload: Vec<u8>,
}

/// The TCP segments with data in a classic pcap file (Ethernet, Linux cooked v1/v2 or raw IP
/// link types; IPv4 and IPv6), in capture order.
pub fn pcap_segments(pcap: &[u8]) -> Vec<Segment> {
    assert!(pcap.len() >= 24, "a pcap file starts with a 24-byte header");
    let magic = u32::from_le_bytes(pcap[0..4].try_into().unwrap());
    let little = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => panic!("not a classic pcap file (magic {magic:#010x})"),
    };
    let u32_at = |b: &[u8], at: usize| {
        let v: [u8; 4] = b[at..at + 4].try_into().unwrap();
        if little {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        }
    };
    let link = u32_at(pcap, 20) & 0xffff;
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len = u32_at(pcap, at + 8) as usize;
        let Some(frame) = pcap.get(at + 16..at + 16 + len) else {
            break; // truncated at the end (tcpdump was stopped mid-write)
        };
        at += 16 + len;
        let ip = match link {
            1 => ethernet_payload(frame),
            113 => frame
                .get(14..16)
                .map(|t| (u16::from_be_bytes([t[0], t[1]]), &frame[16..])),
            276 => frame
                .get(0..2)
                .filter(|_| frame.len() >= 20)
                .map(|t| (u16::from_be_bytes([t[0], t[1]]), &frame[20..])),
            12 | 101 => frame.first().map(|v| match v >> 4 {
                4 => (0x0800, frame),
                _ => (0x86dd, frame),
            }),
            other => panic!("pcap link type {other} is not supported"),
        };
        if let Some(seg) = ip.and_then(|(ethertype, ip)| tcp_segment(ethertype, ip)) {
            out.push(seg);
        }
    }
    out
}

/// The (source, destination, payload) of every TCP segment with data in a pcap file.
pub fn pcap_payloads(pcap: &[u8]) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
    pcap_segments(pcap)
        .into_iter()
        .map(|s| (s.src, s.dst, s.payload))
        .collect()
}

/// Each direction of each TCP connection in a pcap file, its data reassembled in sequence
/// order (retransmitted bytes counted once): for markers split across segments.
pub fn pcap_streams(pcap: &[u8]) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
    // Segments per direction, placed by sequence number relative to the first one seen, so
    // that a retransmission (the same bytes again, maybe cut differently) is counted once.
    type Placed = Vec<(i64, Vec<u8>)>;
    let mut directions: Vec<(SocketAddr, SocketAddr, u32, Placed)> = Vec::new();
    for s in pcap_segments(pcap) {
        match directions
            .iter_mut()
            .find(|(src, dst, _, _)| (*src, *dst) == (s.src, s.dst))
        {
            Some((_, _, first, segments)) => {
                let at = i64::from(s.seq.wrapping_sub(*first) as i32);
                segments.push((at, s.payload));
            }
            None => directions.push((s.src, s.dst, s.seq, vec![(0, s.payload)])),
        }
    }
    directions
        .into_iter()
        .map(|(src, dst, _, mut segments)| {
            segments.sort_by_key(|(at, _)| *at);
            let start = segments.first().map_or(0, |(at, _)| *at);
            let mut data = Vec::new();
            for (at, payload) in segments {
                let offset = (at - start) as usize;
                // A gap (bytes the capture missed) is kept as a gap: nothing is invented.
                let skip = data.len().saturating_sub(offset);
                if skip < payload.len() {
                    data.extend_from_slice(&payload[skip..]);
                }
            }
            (src, dst, data)
        })
        .collect()
}

/// The (source, destination) of the stream directions in a pcap file whose data contain
/// `needle`.
pub fn pcap_find(pcap: &[u8], needle: &[u8]) -> Vec<(SocketAddr, SocketAddr)> {
    pcap_streams(pcap)
        .into_iter()
        .filter(|(_, _, data)| contains(data, needle))
        .map(|(src, dst, _)| (src, dst))
        .collect()
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// (EtherType, the frame's payload), past any VLAN tags.
fn ethernet_payload(frame: &[u8]) -> Option<(u16, &[u8])> {
    let mut at = 12;
    loop {
        let t = frame.get(at..at + 2)?;
        let ethertype = u16::from_be_bytes([t[0], t[1]]);
        if ethertype == 0x8100 || ethertype == 0x88a8 {
            at += 4;
            continue;
        }
        return Some((ethertype, frame.get(at + 2..)?));
    }
}

fn tcp_segment(ethertype: u16, ip: &[u8]) -> Option<Segment> {
    let (src, dst, tcp) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            // A total length of 0 is TSO's "the rest"; fragments other than the first carry
            // no TCP header.
            let end = if total == 0 {
                ip.len()
            } else {
                total.min(ip.len())
            };
            let frag_offset = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x1fff;
            if *ip.get(9)? != 6 || frag_offset != 0 || ihl < 20 || end < ihl {
                return None;
            }
            let a: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let b: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (IpAddr::from(a), IpAddr::from(b), &ip[ihl..end])
        }
        0x86dd => {
            let payload_len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let end = if payload_len == 0 {
                ip.len()
            } else {
                (40 + payload_len).min(ip.len())
            };
            let a: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let b: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let (mut next, mut at) = (*ip.get(6)?, 40);
            loop {
                match next {
                    6 => break,
                    // Hop-by-hop, routing, destination options.
                    0 | 43 | 60 => {
                        next = *ip.get(at)?;
                        at += (usize::from(*ip.get(at + 1)?) + 1) * 8;
                    }
                    44 => {
                        let offset = u16::from_be_bytes([*ip.get(at + 2)?, *ip.get(at + 3)?]) >> 3;
                        if offset != 0 {
                            return None;
                        }
                        next = *ip.get(at)?;
                        at += 8;
                    }
                    _ => return None,
                }
            }
            (IpAddr::from(a), IpAddr::from(b), ip.get(at..end)?)
        }
        _ => return None,
    };
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    let payload = tcp.get(offset..)?;
    if payload.is_empty() {
        return None;
    }
    Some(Segment {
        src: SocketAddr::new(src, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([tcp[2], tcp[3]])),
        seq: u32::from_be_bytes(tcp[4..8].try_into().ok()?),
        payload: payload.to_vec(),
    })
}

// The harness itself: pods reach each other over IPv4 and IPv6, the capture sees the traffic,
// the apps pass their own checks, and nothing is left behind.
#[tokio::test]
async fn pods_harness_self_test() {
    let net = Net::new();
    let a = net.pod("a");
    let b = net.pod("b");
    let namespaces = net.namespaces();
    assert_eq!(namespaces.len(), 3);

    let serve = |script: &str, args: &[&str]| {
        let mut cmd = b.app(script);
        cmd.args(args);
        App::start(cmd)
    };
    let mut in_net = net.command(python());
    in_net
        .arg(apps_dir().join("tcp_echo.py"))
        .args(["server", &net.gateway.to_string(), "9100"]);
    let (http, tcp, banner, grpc, ws, in_net) = tokio::join!(
        serve("http_echo.py", &["::", "8080"]),
        serve("tcp_echo.py", &["server", "::", "9000"]),
        serve("tcp_echo.py", &["banner", "::", "9001", "banner-marker"]),
        serve("grpc_echo.py", &["server", "::", "50051"]),
        serve("ws_echo.py", &["server", "::", "8765"]),
        App::start(in_net),
    );
    let capture = net.capture(&a).await;
    a.wait_port(b.addr(8080), Duration::from_secs(10)).await;

    let marker = format!("marker-{}-{}", std::process::id(), net.ns);
    let url = format!("http://{}:8080/{marker}", b.ip);
    let answer = json_output(a.command("curl").args(["-sS", "--max-time", "10", &url])).await;
    assert_eq!(answer["path"], format!("/{marker}"), "{answer}");
    assert_eq!(answer["method"], "GET");
    assert_eq!(answer["headers"]["host"][0], format!("{}:8080", b.ip));
    assert_eq!(answer["client"][0], format!("::ffff:{}", a.ip), "{answer}");

    // A chunked POST body is read and hashed.
    let answer = json_output(a.command("curl").args([
        "-sS",
        "--max-time",
        "10",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "hello",
        &url,
    ]))
    .await;
    assert_eq!(answer["method"], "POST");
    assert_eq!(answer["body_len"], 5, "{answer}");
    assert_eq!(
        answer["body_sha256"],
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );

    let url6 = format!("http://{}/v6", b.addr6(8080));
    let answer = json_output(a.command("curl").args(["-sSg", "--max-time", "10", &url6])).await;
    assert_eq!(answer["path"], "/v6");
    assert_eq!(answer["client"][0], a.ip6.to_string(), "{answer}");

    let tcp_marker = format!("tcp-{marker}");
    let echoed = json_output(a.app("tcp_echo.py").args([
        "client",
        &b.ip.to_string(),
        "9000",
        "1000000",
        "--marker",
        &tcp_marker,
    ]))
    .await;
    assert_eq!(echoed["ok"], true);
    assert_eq!(echoed["bytes"], 1_000_000);

    // A server-first protocol; and a server in the network namespace, at the gateway.
    let b_ip = b.ip.to_string();
    let echoed = json_output(
        a.app("tcp_echo.py")
            .args(["client", &b_ip, "9001", "10", "--banner"]),
    )
    .await;
    assert_eq!(echoed["banner"], "HELLO banner-marker", "{echoed}");
    let gateway = net.gateway.to_string();
    let echoed = json_output(
        a.app("tcp_echo.py")
            .args(["client", &gateway, "9100", "10"]),
    )
    .await;
    assert_eq!(echoed["bytes"], 10);

    let target = b.addr(50051).to_string();
    let rpc = json_output(a.app("grpc_echo.py").args(["client", &target, "3"])).await;
    assert_eq!(rpc["ok"], true, "{rpc}");
    assert_eq!(rpc["chat_trailer"], "3");
    assert!(
        rpc["peer"].as_str().unwrap().contains(&a.ip.to_string()),
        "{rpc}"
    );

    let ws_url = format!("ws://{}:8765/echo", b.ip);
    let echoed = json_output(a.app("ws_echo.py").args(["client", &ws_url, "3"])).await;
    assert_eq!(echoed["ok"], true, "{echoed}");
    assert_eq!(
        echoed["proxy"],
        Value::Null,
        "no proxy from the test's environment"
    );
    assert_eq!(echoed["path"], "/echo");

    // As another user, in the pod; an app too (the venv and the scripts are readable).
    let echoed = json_output(a.app_as("tcp_echo.py", 1234, 2345).args([
        "client",
        &b.ip6.to_string(),
        "9000",
        "1000",
    ]))
    .await;
    assert_eq!(echoed["bytes"], 1000);
    let out = a.meshid().arg("--version").output().await.unwrap();
    assert!(out.status.success(), "meshid runs in a pod: {out:?}");
    let out = net.meshid().arg("--version").output().await.unwrap();
    assert!(out.status.success(), "meshid runs in the network: {out:?}");
    let out = a.command_as("id", 1234, 2345).output().await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "uid=1234 gid=2345 groups=2345"
    );

    let pcap = capture.stop().await;
    let payloads = pcap_payloads(&pcap);
    let to_http = SocketAddr::new(b.ip.into(), 8080);
    assert!(
        payloads.iter().any(|(src, dst, p)| src.ip() == a.ip
            && *dst == to_http
            && contains(p, marker.as_bytes())),
        "the capture shows the request in plaintext"
    );
    assert!(
        payloads
            .iter()
            .any(|(src, dst, _)| src.ip() == a.ip6 && dst.ip() == b.ip6),
        "the capture shows IPv6"
    );
    let found = pcap_find(&pcap, tcp_marker.as_bytes());
    let echo = b.addr(9000);
    assert!(
        found.iter().any(|(s, d)| s.ip() == a.ip && *d == echo)
            && found.iter().any(|(s, d)| *s == echo && d.ip() == a.ip),
        "the tcp marker goes from a to b:9000, and comes back: {found:?}"
    );
    // Every byte of both directions is in the capture, in order.
    let marked: Vec<_> = pcap_streams(&pcap)
        .into_iter()
        .filter(|(_, _, data)| data.starts_with(tcp_marker.as_bytes()))
        .map(|(_, _, data)| data.len())
        .collect();
    assert_eq!(marked, [1_000_000, 1_000_000]);
    drop((http, tcp, banner, grpc, ws, in_net));

    drop(net);
    let left = netns_list();
    for ns in &namespaces {
        assert!(!left.contains(ns), "namespace {ns} left behind: {left:?}");
    }
}

// A test that panics still removes its namespaces.
#[test]
fn pods_removed_when_a_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let net = Net::new();
        let _pod = net.pod("x");
        tx.send(net.namespaces()).unwrap();
        panic!("the test fails");
    })
    .join();
    assert!(result.is_err());
    let namespaces = rx.recv().unwrap();
    assert_eq!(namespaces.len(), 2);
    let left = netns_list();
    for ns in &namespaces {
        assert!(!left.contains(ns), "namespace {ns} left behind: {left:?}");
    }
}

// The reassembly counts retransmitted bytes once (whole, partial and re-cut), places
// out-of-order segments by sequence number, and survives the sequence number wrapping.
#[test]
fn pcap_streams_reassemble_retransmissions_once() {
    fn raw_ipv4(seq: u32, payload: &[u8]) -> Vec<u8> {
        let total = (20 + 20 + payload.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        let mut tcp = vec![0x9c, 0x40, 0x1f, 0x90];
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        [ip, tcp, payload.to_vec()].concat()
    }
    let first = u32::MAX - 3; // "hello " crosses the wrap
    let frames = [
        raw_ipv4(first, b"hello "),
        raw_ipv4(first.wrapping_add(12), b"again"),
        raw_ipv4(first.wrapping_add(6), b"world "),
        raw_ipv4(first, b"hello wor"), // retransmitted, cut differently
        raw_ipv4(first.wrapping_add(12), b"again"),
    ];
    let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
    pcap.extend_from_slice(&[0; 8]);
    pcap.extend_from_slice(&65535u32.to_le_bytes());
    pcap.extend_from_slice(&101u32.to_le_bytes());
    for frame in &frames {
        pcap.extend_from_slice(&[0; 8]);
        pcap.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        pcap.extend_from_slice(frame);
    }
    let streams = pcap_streams(&pcap);
    assert_eq!(streams.len(), 1, "one direction");
    assert_eq!(
        String::from_utf8_lossy(&streams[0].2),
        "hello world again",
        "each byte once, in sequence order"
    );
    assert_eq!(streams[0].0, "10.0.0.1:40000".parse().unwrap());
    assert_eq!(streams[0].1, "10.0.0.2:8080".parse().unwrap());
}
