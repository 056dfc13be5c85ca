//! `meshid init-iptables`: the transparent-interception rules for one pod, run once by an init
//! container with `NET_ADMIN` in the pod's network namespace (the job of Istio's
//! `istio-iptables` and Linkerd's `proxy-init`).
//!
//! Everything lives in the `nat` table, in chains of our own (`MESHID_*`) entered by one jump
//! each from `PREROUTING` and `OUTPUT`:
//!
//! - inbound TCP (other than to the sidecar's own ports and the excluded ones) is redirected to
//!   `--inbound-port`;
//! - outbound TCP from anyone but the sidecar (`--proxy-uid`/`--proxy-gid`), to anything but
//!   loopback and the excluded ports and CIDRs, is redirected to `--outbound-port`.
//!
//! The rules are a pure function of the flags ([`Config::restore_input`]), fed to
//! `iptables-restore --noflush` (atomic per family; the table's other rules are untouched)
//! after removing whatever meshid installed before, so a second run leaves one copy.
//!
//! Which iptables backend to write with matters: the kernel runs the rules of both, but a
//! system whose other rules (and whose tools) are on the other backend hides ours, and a
//! mismatch has caused outages elsewhere (linkerd2#7749, istio#49279). `--backend auto` picks
//! the backend that already holds rules in this namespace, else the system's `iptables`.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use tracing::{info, warn};

/// Every chain meshid creates starts with this; nothing else of ours is in the table.
pub const CHAIN_PREFIX: &str = "MESHID_";
const INBOUND: &str = "MESHID_INBOUND";
const IN_REDIRECT: &str = "MESHID_IN_REDIRECT";
const OUTPUT: &str = "MESHID_OUTPUT";
const REDIRECT: &str = "MESHID_REDIRECT";

#[derive(Args, Debug)]
pub struct InitIptablesArgs {
    /// UID the sidecar runs as. Its connections are never redirected outbound (they are the
    /// outbound proxy's own connections to callees).
    #[arg(long, env = "MESHID_PROXY_UID", default_value_t = 1337)]
    proxy_uid: u32,
    /// GID the sidecar runs as; connections of this group are never redirected outbound.
    #[arg(long, env = "MESHID_PROXY_GID", default_value_t = 1337)]
    proxy_gid: u32,
    /// Port the sidecar takes redirected outbound TCP on (connections arrive on 127.0.0.1 or
    /// ::1; the original destination is the socket's SO_ORIGINAL_DST).
    #[arg(long, env = "MESHID_OUTBOUND_PORT", default_value_t = 15001,
          value_parser = clap::value_parser!(u16).range(1..))]
    outbound_port: u16,
    /// Port the sidecar takes redirected inbound TCP on. Never captured itself.
    #[arg(long, env = "MESHID_INBOUND_PORT", default_value_t = 15006,
          value_parser = clap::value_parser!(u16).range(1..))]
    inbound_port: u16,
    /// The sidecar's admin port (/healthz, /ready, /metrics). Never captured inbound.
    #[arg(long, env = "MESHID_ADMIN_PORT", default_value_t = 15000,
          value_parser = clap::value_parser!(u16).range(1..))]
    admin_port: u16,
    /// Capture inbound TCP only to these ports (comma-separated, e.g. "8080,9090"). Empty or
    /// "*" captures every port.
    #[arg(long, env = "MESHID_INBOUND_PORTS", default_value = "*")]
    inbound_ports: String,
    /// Inbound TCP to these ports (comma-separated) reaches the app directly, e.g. the ports
    /// the kubelet probes in plain HTTP.
    #[arg(long, env = "MESHID_EXCLUDE_INBOUND_PORTS", default_value = "")]
    exclude_inbound_ports: String,
    /// Outbound TCP to these destination ports (comma-separated) is not redirected.
    #[arg(long, env = "MESHID_EXCLUDE_OUTBOUND_PORTS", default_value = "")]
    exclude_outbound_ports: String,
    /// Outbound TCP to these destinations (comma-separated IPv4 and IPv6 CIDRs, or single
    /// addresses) is not redirected; each goes to the rules of its own family.
    #[arg(long, env = "MESHID_EXCLUDE_OUTBOUND_CIDRS", default_value = "")]
    exclude_outbound_cidrs: String,
    /// Which iptables to write with. "auto": the backend that already holds rules in this
    /// network namespace; when both or neither do, the one the system's `iptables` is.
    #[arg(long, env = "MESHID_IPTABLES_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// IPv6 rules. "auto": when the kernel has IPv6 and ip6tables of the chosen backend works
    /// in this namespace; "on": the same, and it not working is an error; "off": IPv4 only.
    #[arg(long, env = "MESHID_IPTABLES_IPV6", value_enum, default_value_t = Ipv6Mode::Auto)]
    ipv6: Ipv6Mode,
    /// Print the exact iptables-restore input for each family and change nothing.
    #[arg(long, env = "MESHID_IPTABLES_DRY_RUN")]
    dry_run: bool,
    /// Remove everything meshid installed (the jumps from PREROUTING and OUTPUT and the
    /// MESHID_* chains), in both families. Succeeds when there is nothing to remove.
    #[arg(long, env = "MESHID_IPTABLES_REMOVE", conflicts_with = "dry_run")]
    remove: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    Auto,
    Nft,
    Legacy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Ipv6Mode {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The tools' name stem: `iptables` or `ip6tables`.
    fn stem(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// A network in canonical form (host bits cleared), as `iptables-save` prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn family(self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The checked flags: everything the rules depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    proxy_uid: u32,
    proxy_gid: u32,
    outbound_port: u16,
    inbound_port: u16,
    admin_port: u16,
    /// `None`: capture every inbound port.
    inbound_ports: Option<Vec<u16>>,
    exclude_inbound_ports: Vec<u16>,
    exclude_outbound_ports: Vec<u16>,
    exclude_outbound_cidrs: Vec<Cidr>,
}

impl Config {
    pub fn from_args(a: &InitIptablesArgs) -> anyhow::Result<Config> {
        for (flag, port) in [
            ("--outbound-port", a.outbound_port),
            ("--inbound-port", a.inbound_port),
            ("--admin-port", a.admin_port),
        ] {
            if port == 0 {
                bail!("{flag} 0: expected a port number 1-65535");
            }
        }
        if a.outbound_port == a.inbound_port {
            bail!(
                "--outbound-port and --inbound-port are both {}: they must differ",
                a.inbound_port
            );
        }
        if a.admin_port == a.inbound_port || a.admin_port == a.outbound_port {
            bail!(
                "--admin-port {} is also the inbound or outbound port: they must differ",
                a.admin_port
            );
        }
        let inbound_ports = match a.inbound_ports.trim() {
            "" | "*" => None,
            list => Some(parse_ports("--inbound-ports", list)?),
        };
        Ok(Config {
            proxy_uid: a.proxy_uid,
            proxy_gid: a.proxy_gid,
            outbound_port: a.outbound_port,
            inbound_port: a.inbound_port,
            admin_port: a.admin_port,
            inbound_ports,
            exclude_inbound_ports: parse_ports(
                "--exclude-inbound-ports",
                &a.exclude_inbound_ports,
            )?,
            exclude_outbound_ports: parse_ports(
                "--exclude-outbound-ports",
                &a.exclude_outbound_ports,
            )?,
            exclude_outbound_cidrs: parse_cidrs(
                "--exclude-outbound-cidrs",
                &a.exclude_outbound_cidrs,
            )?,
        })
    }

    /// The `nat` table rules for one family, as `iptables-restore --noflush` input (without
    /// a header). Each rule is written the way `iptables-save` prints it back, so the two can
    /// be compared line by line.
    pub fn restore_input(&self, family: Family) -> String {
        let mut rules: Vec<String> = Vec::new();
        let mut rule = |chain: &str, spec: String| rules.push(format!("-A {chain} {spec}"));
        let tcp_port = |port: u16| format!("-p tcp -m tcp --dport {port}");

        rule("PREROUTING", format!("-p tcp -j {INBOUND}"));
        rule("OUTPUT", format!("-p tcp -j {OUTPUT}"));

        let mut no_capture = vec![self.inbound_port, self.admin_port];
        no_capture.extend(&self.exclude_inbound_ports);
        for port in dedup(no_capture) {
            rule(INBOUND, format!("{} -j RETURN", tcp_port(port)));
        }
        match &self.inbound_ports {
            None => rule(INBOUND, format!("-p tcp -j {IN_REDIRECT}")),
            Some(ports) => {
                for &port in ports {
                    rule(INBOUND, format!("{} -j {IN_REDIRECT}", tcp_port(port)));
                }
            }
        }
        rule(
            IN_REDIRECT,
            format!("-p tcp -j REDIRECT --to-ports {}", self.inbound_port),
        );

        let lo = family.loopback();
        if family == Family::V4 {
            // The sidecar hands redirected inbound connections to the app at the pod's own
            // address (not 127.0.0.1, so services bound to loopback stay private), from
            // INBOUND_SOURCE: those must not be sent back to the inbound port.
            rule(
                OUTPUT,
                format!(
                    "-s {}/32 -o lo -j RETURN",
                    meshid::sidecar::inbound::INBOUND_SOURCE
                ),
            );
            // The sidecar's other traffic to the pod's own address (a pod calling itself by
            // its IP) still gets the inbound checks. IPv6 has no second loopback address to
            // tell the two apart by, so there a pod calling its own IPv6 address reaches its
            // app directly.
            rule(
                OUTPUT,
                format!(
                    "! -d {lo} -o lo -m owner --uid-owner {} -j {IN_REDIRECT}",
                    self.proxy_uid
                ),
            );
        }
        rule(
            OUTPUT,
            format!("-m owner --uid-owner {} -j RETURN", self.proxy_uid),
        );
        rule(
            OUTPUT,
            format!("-m owner --gid-owner {} -j RETURN", self.proxy_gid),
        );
        rule(OUTPUT, format!("-d {lo} -j RETURN"));
        for &port in &self.exclude_outbound_ports {
            rule(OUTPUT, format!("{} -j RETURN", tcp_port(port)));
        }
        for cidr in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| c.family() == family)
        {
            if cidr.prefix == 0 {
                // Everything: iptables-save prints no `-d` for a /0.
                rule(OUTPUT, "-j RETURN".to_owned());
            } else {
                rule(OUTPUT, format!("-d {cidr} -j RETURN"));
            }
        }
        rule(OUTPUT, format!("-j {REDIRECT}"));
        rule(
            REDIRECT,
            format!("-p tcp -j REDIRECT --to-ports {}", self.outbound_port),
        );

        let mut out = String::from("*nat\n");
        for chain in [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT] {
            // In a --noflush restore this creates the chain, or empties it if it exists.
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for r in rules {
            out.push_str(&r);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
        out
    }
}

fn dedup<T: PartialEq + Copy>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// A comma-separated port list (spaces and empty items allowed), duplicates dropped.
fn parse_ports(flag: &str, list: &str) -> anyhow::Result<Vec<u16>> {
    let mut ports = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(p) if p > 0 => ports.push(p),
            _ if item == "*" => {
                bail!("{flag} {list:?}: \"*\" (every port) cannot be combined with a list")
            }
            _ => bail!("{flag} {item:?}: expected a port number 1-65535"),
        }
    }
    Ok(dedup(ports))
}

/// A comma-separated list of CIDRs or single addresses (taken as /32 or /128), in canonical
/// form, duplicates dropped.
fn parse_cidrs(flag: &str, list: &str) -> anyhow::Result<Vec<Cidr>> {
    let mut cidrs = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (addr, prefix) = match item.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (item, None),
        };
        let Ok(addr) = addr.parse::<IpAddr>() else {
            bail!("{flag} {item:?}: {addr:?} is not an IPv4 or IPv6 address");
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => bail!(
                    "{flag} {item:?}: prefix length {p:?} is not 0-{max} for an {} address",
                    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            },
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        cidrs.push(Cidr { addr, prefix });
    }
    Ok(dedup(cidrs))
}

// ---------------------------------------------------------------------------------------------
// What is in the table now: parsing `iptables-save` output.

/// The target chain of a saved rule (`-j X` or `-g X`), if any.
fn target(rule: &str) -> Option<&str> {
    let mut tokens = rule.split_whitespace();
    while let Some(t) = tokens.next() {
        if t == "-j" || t == "-g" {
            return tokens.next();
        }
    }
    None
}

fn is_ours(chain: &str) -> bool {
    chain.starts_with(CHAIN_PREFIX)
}

/// Rules (`-A` lines, all tables) that are not meshid's: neither in a MESHID_ chain nor a jump
/// into one.
pub fn count_foreign_rules(save: &str) -> usize {
    save.lines()
        .filter_map(|l| l.strip_prefix("-A "))
        .filter(|r| {
            let chain = r.split_whitespace().next().unwrap_or("");
            !is_ours(chain) && !target(r).is_some_and(is_ours)
        })
        .count()
}

/// What meshid installed in the `nat` table of a save: its chains, and the rules elsewhere
/// that jump into them (as saved, i.e. as `-A` lines).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    chains: Vec<String>,
    jumps: Vec<String>,
}

impl Installed {
    pub fn from_save(save: &str) -> Installed {
        let mut found = Installed::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim_end) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
            } else if !in_nat {
            } else if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split_whitespace().next().unwrap_or("");
                if is_ours(chain) {
                    found.chains.push(chain.to_owned());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or("");
                if !is_ours(chain) && target(rule).is_some_and(is_ours) {
                    found.jumps.push(rule.to_owned());
                }
            }
        }
        found
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }

    /// `iptables-restore --noflush` input that removes it all: the jumps (one `-D` per copy),
    /// then the chains' rules, then the chains.
    pub fn removal_input(&self) -> String {
        let mut out = String::from("*nat\n");
        for j in &self.jumps {
            let _ = writeln!(out, "-D {j}");
        }
        for c in &self.chains {
            let _ = writeln!(out, "-F {c}");
        }
        for c in &self.chains {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Backends.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

/// What the system's plain `iptables` is, from `iptables --version`.
pub fn parse_version(version: &str) -> Backend {
    if version.contains("nf_tables") {
        Backend::Nft
    } else {
        // "(legacy)" since 1.8; before 1.8 there was only legacy and no marker.
        Backend::Legacy
    }
}

/// Choose from the rules that exist under each backend (`None`: not installed or not usable).
pub fn choose(
    legacy: Option<usize>,
    nft: Option<usize>,
    system: Option<Backend>,
) -> anyhow::Result<(Backend, String)> {
    let system_says = |why: String| match system {
        Some(b) => (b, format!("{why}, so the system's iptables ({b}) decides")),
        None => (
            Backend::Nft,
            format!("{why} and there is no plain iptables to ask; nft is the default"),
        ),
    };
    Ok(match (legacy, nft) {
        (None, None) => bail!(
            "no usable iptables: looked for iptables-nft-save/-restore, \
             iptables-legacy-save/-restore and iptables-save/-restore"
        ),
        (Some(_), None) => (Backend::Legacy, "only iptables-legacy is usable".into()),
        (None, Some(_)) => (Backend::Nft, "only iptables-nft is usable".into()),
        (Some(l), Some(0)) if l > 0 => (
            Backend::Legacy,
            format!("{l} rule(s) already exist under iptables-legacy and none under iptables-nft"),
        ),
        (Some(0), Some(n)) if n > 0 => (
            Backend::Nft,
            format!("{n} rule(s) already exist under iptables-nft and none under iptables-legacy"),
        ),
        (Some(0), Some(0)) => system_says("no rules exist under either backend".into()),
        (Some(l), Some(n)) => system_says(format!(
            "rules exist under both backends ({l} legacy, {n} nft)"
        )),
    })
}

/// An executable by name: on PATH, else in the sbin directories (an init container's PATH
/// may lack them).
fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[derive(Clone, Debug)]
struct Tool {
    save: PathBuf,
    restore: PathBuf,
}

impl Tool {
    /// `iptables-nft` / `ip6tables-legacy` ..., or the plain names when the system's iptables
    /// is that backend and the suffixed ones are not installed.
    fn find(backend: Backend, family: Family, system: Option<Backend>) -> Option<Tool> {
        let stem = family.stem();
        let pair = |infix: &str| {
            Some(Tool {
                save: which(&format!("{stem}{infix}-save"))?,
                restore: which(&format!("{stem}{infix}-restore"))?,
            })
        };
        pair(&format!("-{backend}")).or_else(|| {
            if system == Some(backend) {
                pair("")
            } else {
                None
            }
        })
    }

    fn restore_name(&self) -> String {
        self.restore
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// One backend and what its save tools show in this namespace.
struct Observed {
    backend: Backend,
    v4: (Tool, String),
    /// The IPv6 tool and its save output, or why IPv6 cannot be used with this backend.
    v6: Result<(Tool, String), String>,
}

impl Observed {
    fn read(backend: Backend, system: Option<Backend>) -> Result<Observed, String> {
        let Some(tool) = Tool::find(backend, Family::V4, system) else {
            return Err(format!(
                "iptables-{backend}-save and iptables-{backend}-restore are not installed"
            ));
        };
        let v4 = save(&tool.save)?;
        let v6 = if !Path::new("/proc/net/if_inet6").exists() {
            Err("the kernel has no IPv6 (no /proc/net/if_inet6)".to_owned())
        } else {
            match Tool::find(backend, Family::V6, system) {
                None => Err(format!(
                    "ip6tables-{backend}-save and ip6tables-{backend}-restore are not installed"
                )),
                Some(t) => save(&t.save).map(|text| (t, text)),
            }
        };
        Ok(Observed {
            backend,
            v4: (tool, v4),
            v6,
        })
    }

    fn foreign_rules(&self) -> usize {
        count_foreign_rules(&self.v4.1)
            + self
                .v6
                .as_ref()
                .map_or(0, |(_, text)| count_foreign_rules(text))
    }

    /// Each family's tool with what meshid installed there.
    fn installed(&self) -> Vec<(Family, &Tool, Installed)> {
        let mut out = vec![(Family::V4, &self.v4.0, Installed::from_save(&self.v4.1))];
        if let Ok((tool, text)) = &self.v6 {
            out.push((Family::V6, tool, Installed::from_save(text)));
        }
        out
    }
}

fn save(tool: &Path) -> Result<String, String> {
    let out = Command::new(tool)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", tool.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            tool.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The line number in an iptables-restore error ("Error occurred at line: 7", "line 7 failed").
pub fn error_line(stderr: &str) -> Option<usize> {
    let at = stderr.find("line")?;
    stderr[at + 4..]
        .trim_start_matches([':', ' '])
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Feed `input` to `<tool> --noflush` (one atomic transaction).
fn restore(tool: &Tool, input: &str) -> anyhow::Result<()> {
    let mut child = Command::new(&tool.restore)
        .args(["--noflush", "--wait=10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", tool.restore.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A restore that exits early closes the pipe; its status and stderr say why.
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {}", tool.restore.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut msg = format!(
        "{} --noflush failed ({}): {}",
        tool.restore_name(),
        out.status,
        stderr.trim()
    );
    if let Some(n) = error_line(&stderr)
        && let Some(line) = input.lines().nth(n.saturating_sub(1))
    {
        let _ = write!(msg, "\nthe ruleset's line {n}: {line}");
        if line == "COMMIT" {
            msg.push_str(" (the table as a whole was refused)");
        }
    }
    bail!("{msg}")
}

fn header(backend: impl fmt::Display, family: Family, tool: &str, what: &str) -> String {
    format!("# meshid init-iptables: {what}, {family} nat table, backend {backend} ({tool})\n")
}

// ---------------------------------------------------------------------------------------------
// The command.

pub async fn run(args: InitIptablesArgs) -> anyhow::Result<()> {
    // Every flag is checked before anything is read or changed.
    let config = Config::from_args(&args)?;

    let system = which("iptables").and_then(|p| {
        let out = Command::new(p).arg("--version").output().ok()?;
        out.status
            .success()
            .then(|| parse_version(&String::from_utf8_lossy(&out.stdout)))
    });
    let wanted: &[Backend] = match args.backend {
        BackendChoice::Auto => &[Backend::Legacy, Backend::Nft],
        BackendChoice::Nft => &[Backend::Nft],
        BackendChoice::Legacy => &[Backend::Legacy],
    };
    let mut observed = Vec::new();
    let mut unusable = Vec::new();
    for &b in wanted {
        match Observed::read(b, system) {
            Ok(o) => observed.push(o),
            Err(why) => unusable.push(why),
        }
    }
    if args.backend != BackendChoice::Auto && observed.is_empty() {
        bail!("--backend {}: {}", wanted[0], unusable.join("; "));
    }
    for why in &unusable {
        info!("backend not usable: {why}");
    }

    if args.remove {
        if remove(&observed)? == 0 {
            info!("no meshid rules to remove");
        }
        return Ok(());
    }

    let chosen = if args.backend == BackendChoice::Auto {
        let count = |b| {
            observed
                .iter()
                .find(|o| o.backend == b)
                .map(Observed::foreign_rules)
        };
        choose(count(Backend::Legacy), count(Backend::Nft), system).map(|(b, why)| {
            info!("iptables backend {b}: {why}");
            observed.iter().position(|o| o.backend == b).unwrap_or(0)
        })
    } else {
        info!(
            "iptables backend {}: chosen by --backend",
            observed[0].backend
        );
        Ok(0)
    };

    if args.dry_run {
        let chosen = match chosen {
            Ok(i) => Some(&observed[i]),
            Err(e) => {
                warn!("{e:#}: printing the rules without a backend");
                None
            }
        };
        return dry_run(&config, args.ipv6, chosen);
    }
    let chosen = &observed[chosen?];

    let v6 = match (&chosen.v6, args.ipv6) {
        (_, Ipv6Mode::Off) => None,
        (Ok((tool, _)), _) => Some(tool),
        (Err(why), Ipv6Mode::On) => bail!("--ipv6 on: {why}"),
        (Err(why), Ipv6Mode::Auto) if has_global_ipv6() => bail!(
            "this pod has an IPv6 address but the IPv6 rules cannot be applied ({why}): without \
             them its IPv6 traffic would bypass the sidecar. Fix ip6tables, or say --ipv6 off \
             if IPv6 is not used"
        ),
        (Err(why), Ipv6Mode::Auto) => {
            info!("IPv6 rules not applied (no IPv6 address but loopback): {why}");
            None
        }
    };

    // Whatever meshid installed before, under any backend we read: a stale copy under the
    // other backend would still be run by the kernel.
    remove(&observed)?;
    let mut applied = Vec::new();
    for (family, tool) in [(Family::V4, Some(&chosen.v4.0)), (Family::V6, v6)] {
        let Some(tool) = tool else { continue };
        let input = header(chosen.backend, family, &tool.restore_name(), "rules")
            + &config.restore_input(family);
        if let Err(e) = restore(tool, &input) {
            if family == Family::V6 {
                // No half-intercepted pod: take the IPv4 rules out again (a retry starts over).
                let ours = Installed::from_save(&config.restore_input(Family::V4));
                if let Err(undo) = restore(&chosen.v4.0, &ours.removal_input()) {
                    warn!("removing the IPv4 rules after the IPv6 failure: {undo:#}");
                }
            }
            return Err(e.context(format!(
                "applying the {family} rules with {}",
                tool.restore_name()
            )));
        }
        applied.push(format!("{family} ({})", tool.restore_name()));
    }
    info!(
        "interception rules applied: {}; inbound TCP to port {}, outbound TCP to port {}, except uid {} / gid {}",
        applied.join(", "),
        config.inbound_port,
        config.outbound_port,
        config.proxy_uid,
        config.proxy_gid
    );
    Ok(())
}

/// Remove what meshid installed under each backend read; how many tables it changed.
fn remove(observed: &[Observed]) -> anyhow::Result<usize> {
    let mut removed = 0;
    for o in observed {
        for (family, tool, installed) in o.installed() {
            if installed.is_empty() {
                continue;
            }
            let input = header(o.backend, family, &tool.restore_name(), "removal")
                + &installed.removal_input();
            restore(tool, &input).with_context(|| {
                format!(
                    "removing meshid's {family} rules with {}",
                    tool.restore_name()
                )
            })?;
            info!(
                "removed meshid's {family} rules under {}: {} chain(s), {} jump(s)",
                o.backend,
                installed.chains.len(),
                installed.jumps.len()
            );
            removed += 1;
        }
    }
    Ok(removed)
}

/// Whether an interface has an IPv6 address other than loopback and link-local ones
/// (`/proc/net/if_inet6`: address, index, prefix length, scope, flags, name).
fn has_global_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        // Scope 00 is global; 10 host (::1), 20 link-local.
        .any(|scope| scope == "00")
}

fn dry_run(config: &Config, ipv6: Ipv6Mode, chosen: Option<&Observed>) -> anyhow::Result<()> {
    let mut out = String::new();
    let (label, tools): (String, [String; 2]) = match chosen {
        Some(o) => (o.backend.to_string(), {
            let v6 = match &o.v6 {
                Ok((t, _)) => t.restore_name(),
                Err(_) => format!("ip6tables-{}-restore", o.backend),
            };
            [o.v4.0.restore_name(), v6]
        }),
        None => (
            "undetermined".into(),
            ["iptables-restore".into(), "ip6tables-restore".into()],
        ),
    };
    let mut families = vec![Family::V4];
    match (ipv6, chosen.map(|o| &o.v6)) {
        (Ipv6Mode::Off, _) => {}
        (Ipv6Mode::On, Some(Err(why))) => bail!("--ipv6 on: {why}"),
        (Ipv6Mode::Auto, Some(Err(why))) => {
            info!("IPv6 rules would not be applied: {why}");
        }
        _ => families.push(Family::V6),
    }
    for (i, family) in families.into_iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&header(&label, family, &tools[i], "rules"));
        out.push_str(&config.restore_input(family));
    }
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: InitIptablesArgs,
    }

    fn config(flags: &[&str]) -> anyhow::Result<Config> {
        let cli =
            Cli::try_parse_from(std::iter::once("init-iptables").chain(flags.iter().copied()))?;
        Config::from_args(&cli.args)
    }

    fn err(flags: &[&str]) -> String {
        format!("{:#}", config(flags).unwrap_err())
    }

    #[test]
    fn default_rules() {
        let c = config(&[]).unwrap();
        assert_eq!(
            c.restore_input(Family::V4),
            "\
*nat
:MESHID_INBOUND - [0:0]
:MESHID_IN_REDIRECT - [0:0]
:MESHID_OUTPUT - [0:0]
:MESHID_REDIRECT - [0:0]
-A PREROUTING -p tcp -j MESHID_INBOUND
-A OUTPUT -p tcp -j MESHID_OUTPUT
-A MESHID_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A MESHID_INBOUND -p tcp -m tcp --dport 15000 -j RETURN
-A MESHID_INBOUND -p tcp -j MESHID_IN_REDIRECT
-A MESHID_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A MESHID_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A MESHID_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j MESHID_IN_REDIRECT
-A MESHID_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESHID_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A MESHID_OUTPUT -d 127.0.0.1/32 -j RETURN
-A MESHID_OUTPUT -j MESHID_REDIRECT
-A MESHID_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"
        );
        let v6 = c.restore_input(Family::V6);
        assert_eq!(
            v6,
            c.restore_input(Family::V4)
                .replace("-A MESHID_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN\n", "")
                .replace(
                    "-A MESHID_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j MESHID_IN_REDIRECT\n",
                    ""
                )
                .replace("127.0.0.1/32", "::1/128")
        );
    }

    #[test]
    fn flags_change_the_numbers() {
        let c = config(&[
            "--proxy-uid=101",
            "--proxy-gid=102",
            "--outbound-port=7001",
            "--inbound-port=7006",
            "--admin-port=7000",
        ])
        .unwrap();
        let t = c.restore_input(Family::V4);
        for want in [
            "-A MESHID_INBOUND -p tcp -m tcp --dport 7006 -j RETURN\n",
            "-A MESHID_INBOUND -p tcp -m tcp --dport 7000 -j RETURN\n",
            "-A MESHID_IN_REDIRECT -p tcp -j REDIRECT --to-ports 7006\n",
            "-A MESHID_REDIRECT -p tcp -j REDIRECT --to-ports 7001\n",
            "--uid-owner 101 -j MESHID_IN_REDIRECT\n",
            "-A MESHID_OUTPUT -m owner --uid-owner 101 -j RETURN\n",
            "-A MESHID_OUTPUT -m owner --gid-owner 102 -j RETURN\n",
        ] {
            assert!(t.contains(want), "{want:?} in\n{t}");
        }
        assert!(!t.contains("1337") && !t.contains("1500"), "{t}");
    }

    #[test]
    fn inbound_ports_list_replaces_the_catch_all() {
        for star in ["", "*", " * "] {
            assert_eq!(
                config(&["--inbound-ports", star]).unwrap().inbound_ports,
                None
            );
        }
        let t = config(&["--inbound-ports", "8080, 9090,8080,"])
            .unwrap()
            .restore_input(Family::V4);
        let inbound: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("-A MESHID_INBOUND"))
            .collect();
        assert_eq!(
            inbound,
            [
                "-A MESHID_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
                "-A MESHID_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
                "-A MESHID_INBOUND -p tcp -m tcp --dport 8080 -j MESHID_IN_REDIRECT",
                "-A MESHID_INBOUND -p tcp -m tcp --dport 9090 -j MESHID_IN_REDIRECT",
            ]
        );
    }

    #[test]
    fn excludes_come_before_the_redirect_and_split_by_family() {
        let c = config(&[
            "--exclude-inbound-ports=9901,15000",
            "--exclude-outbound-ports=5432",
            "--exclude-outbound-cidrs=10.0.0.0/8, 2001:db8::/32,169.254.169.254,fd00::1:2/112,10.1.2.3/16",
        ])
        .unwrap();
        let v4 = c.restore_input(Family::V4);
        let v6 = c.restore_input(Family::V6);
        assert!(v4.contains(
            "-A MESHID_INBOUND -p tcp -m tcp --dport 15000 -j RETURN\n\
             -A MESHID_INBOUND -p tcp -m tcp --dport 9901 -j RETURN\n\
             -A MESHID_INBOUND -p tcp -j MESHID_IN_REDIRECT\n"
        ));
        assert_eq!(v4.matches("--dport 15000").count(), 1, "deduplicated");
        let tail = "-A MESHID_OUTPUT -d 127.0.0.1/32 -j RETURN\n\
             -A MESHID_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN\n\
             -A MESHID_OUTPUT -d 10.0.0.0/8 -j RETURN\n\
             -A MESHID_OUTPUT -d 169.254.169.254/32 -j RETURN\n\
             -A MESHID_OUTPUT -d 10.1.0.0/16 -j RETURN\n\
             -A MESHID_OUTPUT -j MESHID_REDIRECT\n";
        assert!(v4.contains(tail), "{v4}");
        assert!(!v4.contains("2001:db8") && !v4.contains("fd00"));
        assert!(
            v6.contains(
                "-A MESHID_OUTPUT -d ::1/128 -j RETURN\n\
             -A MESHID_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN\n\
             -A MESHID_OUTPUT -d 2001:db8::/32 -j RETURN\n\
             -A MESHID_OUTPUT -d fd00::1:0/112 -j RETURN\n\
             -A MESHID_OUTPUT -j MESHID_REDIRECT\n"
            ),
            "{v6}"
        );
        assert!(!v6.contains("10.0.0.0"));
        let all = config(&["--exclude-outbound-cidrs=0.0.0.0/0"]).unwrap();
        assert!(
            all.restore_input(Family::V4)
                .contains("-A MESHID_OUTPUT -j RETURN\n-A MESHID_OUTPUT -j MESHID_REDIRECT\n")
        );
    }

    #[test]
    fn bad_values_name_the_flag_and_the_value() {
        for (flags, want) in [
            (
                &["--exclude-outbound-cidrs", "10.0.0.0/33"][..],
                "--exclude-outbound-cidrs \"10.0.0.0/33\"",
            ),
            (
                &["--exclude-outbound-cidrs", "10.0.0.0/8,2001:db8::/129"],
                "\"2001:db8::/129\"",
            ),
            (
                &["--exclude-outbound-cidrs", "10.0.0/8"],
                "\"10.0.0\" is not an IPv4 or IPv6 address",
            ),
            (
                &["--exclude-outbound-cidrs", "10.0.0.0/"],
                "--exclude-outbound-cidrs \"10.0.0.0/\"",
            ),
            (
                &["--exclude-outbound-cidrs", "example.com"],
                "--exclude-outbound-cidrs \"example.com\"",
            ),
            (
                &["--exclude-outbound-ports", "5432,0"],
                "--exclude-outbound-ports \"0\": expected a port number 1-65535",
            ),
            (
                &["--exclude-inbound-ports", "70000"],
                "--exclude-inbound-ports \"70000\"",
            ),
            (
                &["--exclude-inbound-ports", "80-90"],
                "--exclude-inbound-ports \"80-90\"",
            ),
            (&["--inbound-ports", "8080,*"], "--inbound-ports \"8080,*\""),
            (&["--inbound-ports", "http"], "--inbound-ports \"http\""),
            (
                &["--outbound-port", "15006"],
                "--outbound-port and --inbound-port are both 15006",
            ),
            (&["--admin-port", "15001"], "--admin-port 15001"),
        ] {
            let e = err(flags);
            assert!(e.contains(want), "{flags:?}: {e:?} lacks {want:?}");
        }
        // Numbers out of u16 range or zero are refused by clap, also naming the flag.
        for flag in ["--outbound-port", "--inbound-port", "--admin-port"] {
            for v in ["0", "65536", "x"] {
                let e = err(&[flag, v]);
                assert!(e.contains(flag), "{flag} {v}: {e}");
            }
        }
        assert!(err(&["--backend", "iptables"]).contains("--backend"));
    }

    const SAVE: &str = "\
# Generated by iptables-save v1.8.9 on Wed Dec  2 06:02:31 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:MESHID_INBOUND - [0:0]
:MESHID_OUTPUT - [0:0]
:OTHER - [0:0]
-A PREROUTING -p tcp -j MESHID_INBOUND
-A PREROUTING -p tcp -j MESHID_INBOUND
-A OUTPUT -p tcp -j MESHID_OUTPUT
-A OUTPUT -j OTHER
-A POSTROUTING -d 203.0.113.1/32 -j RETURN
-A MESHID_INBOUND -p tcp -j RETURN
-A MESHID_OUTPUT -j MESHID_INBOUND
COMMIT
";

    #[test]
    fn foreign_rules_do_not_count_ours() {
        assert_eq!(count_foreign_rules(SAVE), 3);
        assert_eq!(count_foreign_rules(""), 0);
    }

    #[test]
    fn removal_deletes_each_jump_then_the_chains() {
        let i = Installed::from_save(SAVE);
        assert_eq!(
            i.removal_input(),
            "\
*nat
-D PREROUTING -p tcp -j MESHID_INBOUND
-D PREROUTING -p tcp -j MESHID_INBOUND
-D OUTPUT -p tcp -j MESHID_OUTPUT
-F MESHID_INBOUND
-F MESHID_OUTPUT
-X MESHID_INBOUND
-X MESHID_OUTPUT
COMMIT
"
        );
        assert!(Installed::from_save("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n").is_empty());
        // Our own input read back as a save: what a failed IPv6 apply takes out of IPv4.
        let ours = Installed::from_save(&config(&[]).unwrap().restore_input(Family::V4));
        assert_eq!(ours.chains, [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT]);
        assert_eq!(
            ours.jumps,
            [
                "PREROUTING -p tcp -j MESHID_INBOUND",
                "OUTPUT -p tcp -j MESHID_OUTPUT"
            ]
        );
        // A chain of that name in another table is not ours to touch.
        assert!(
            Installed::from_save("*filter\n:MESHID_X - [0:0]\n-A INPUT -j MESHID_X\nCOMMIT\n")
                .is_empty()
        );
    }

    #[test]
    fn backend_choice() {
        use Backend::*;
        let pick = |l, n, s| choose(l, n, s).unwrap().0;
        assert_eq!(pick(Some(3), Some(0), Some(Nft)), Legacy);
        assert_eq!(pick(Some(0), Some(2), Some(Legacy)), Nft);
        assert_eq!(pick(Some(0), Some(0), Some(Legacy)), Legacy);
        assert_eq!(pick(Some(0), Some(0), Some(Nft)), Nft);
        assert_eq!(pick(Some(1), Some(1), Some(Legacy)), Legacy);
        assert_eq!(pick(Some(0), Some(0), None), Nft);
        assert_eq!(pick(Some(5), None, Some(Nft)), Legacy);
        assert_eq!(pick(None, Some(0), Some(Legacy)), Nft);
        assert!(choose(None, None, Some(Nft)).is_err());
        let (_, why) = choose(Some(3), Some(0), Some(Nft)).unwrap();
        assert!(
            why.contains("3 rule(s) already exist under iptables-legacy"),
            "{why}"
        );
        let (_, why) = choose(Some(1), Some(2), Some(Nft)).unwrap();
        assert!(
            why.contains("both") && why.contains("system's iptables (nft)"),
            "{why}"
        );
        assert_eq!(parse_version("iptables v1.8.9 (nf_tables)\n"), Nft);
        assert_eq!(parse_version("iptables v1.8.9 (legacy)\n"), Legacy);
        assert_eq!(parse_version("iptables v1.6.1\n"), Legacy);
    }

    #[test]
    fn restore_error_lines() {
        assert_eq!(
            error_line(
                "iptables-restore v1.8.9 (legacy): unknown option \"--bogus\"\nError occurred at line: 3\nTry ..."
            ),
            Some(3)
        );
        assert_eq!(error_line("iptables-restore: line 12 failed\n"), Some(12));
        assert_eq!(
            error_line("Another app is currently holding the xtables lock."),
            None
        );
    }
}
