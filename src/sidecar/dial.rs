//! Dialling a callee's sidecar: TCP, then mutual TLS as one identity, verifying the callee.
//!
//! The callee is either known before the call (a service the request names: its SPIFFE ID must
//! be exactly that) or learned from the handshake (a transparent call to an address: any SPIFFE
//! ID of the trust domain, which must then be a service of the directory). One client config
//! is kept per callee rule, identity and protocol, so reconnects resume their TLS sessions.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshid_proto::SpiffeId;
use meshid_proto::tls::CertSlot;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::identity::Current;
use super::tls::{Alpn, MeshTls};

pub type MeshTlsStream = TlsStream<TcpStream>;

type ConfigKey = (String, Option<SpiffeId>, Alpn);

pub struct Dialer {
    tls: Arc<MeshTls>,
    connect_timeout: Duration,
    /// (identity x5t, callee rule, protocol) -> config. Cleared when the identity changes.
    configs: Mutex<HashMap<ConfigKey, Arc<rustls::ClientConfig>>>,
    /// Local addresses of dials to addresses whose handshake is in progress: a redirected
    /// connection from one of them is the sidecar's own, sent back by rules that do not
    /// exclude its UID.
    own: Mutex<HashSet<SocketAddr>>,
}

struct OwnDial<'a>(&'a Dialer, SocketAddr);

impl Drop for OwnDial<'_> {
    fn drop(&mut self) {
        self.0
            .own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// Where to dial: a `HOST:PORT` (a `--route`, or `NAME:15006`) or an address.
pub enum Target<'a> {
    Host(&'a str),
    Addr(SocketAddr),
}

impl std::fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Host(h) => f.write_str(h),
            Target::Addr(a) => write!(f, "{a}"),
        }
    }
}

impl Dialer {
    pub fn new(tls: Arc<MeshTls>, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            tls,
            connect_timeout,
            configs: Mutex::new(HashMap::new()),
            own: Mutex::new(HashSet::new()),
        })
    }

    /// Whether `peer` is the local end of one of this sidecar's own dials in progress.
    pub fn is_own_dial(&self, peer: SocketAddr) -> bool {
        self.own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&peer)
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The config for this identity, callee rule and protocol.
    pub fn config(
        &self,
        identity: &Current,
        expect: Option<&SpiffeId>,
        alpn: Alpn,
    ) -> Arc<rustls::ClientConfig> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if configs.keys().next().is_some_and(|k| k.0 != identity.x5t) {
            // A renewal: configs for the old certificate are no longer wanted.
            configs.retain(|k, _| k.0 == identity.x5t);
        }
        let key = (identity.x5t.clone(), expect.cloned(), alpn);
        configs
            .entry(key)
            .or_insert_with(|| {
                self.tls
                    .client(expect, CertSlot::new(identity.key.clone()), alpn)
            })
            .clone()
    }

    /// Connect and complete mutual TLS within the connect timeout. Returns the stream and the
    /// callee's SPIFFE ID as its certificate proved it.
    pub async fn dial(
        &self,
        target: Target<'_>,
        identity: &Current,
        expect: Option<&SpiffeId>,
        alpn: Alpn,
    ) -> std::io::Result<(MeshTlsStream, SpiffeId)> {
        let config = self.config(identity, expect, alpn);
        let server_name = match &target {
            Target::Addr(a) => ServerName::IpAddress(a.ip().into()),
            Target::Host(h) => {
                let host = h.rsplit_once(':').map(|(h, _)| h).unwrap_or(h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                match host.parse::<IpAddr>() {
                    Ok(ip) => ServerName::IpAddress(ip.into()),
                    Err(_) => {
                        ServerName::try_from(host.to_owned()).map_err(std::io::Error::other)?
                    }
                }
            }
        };
        let dial = async {
            let mut _own = None;
            let tcp = match &target {
                Target::Addr(a) => {
                    let tcp = TcpStream::connect(a).await?;
                    if let Ok(local) = tcp.local_addr() {
                        self.own
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(local);
                        _own = Some(OwnDial(self, local));
                    }
                    tcp
                }
                Target::Host(h) => TcpStream::connect(*h).await?,
            };
            tcp.set_nodelay(true)?;
            tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await
        };
        let tls = tokio::time::timeout(self.connect_timeout, dial)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no mutual TLS with {target} within {:?}",
                        self.connect_timeout
                    ),
                )
            })??;
        let id = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| meshid_proto::svid::spiffe_id_of(leaf).ok())
            .ok_or_else(|| std::io::Error::other("the callee presented no SPIFFE ID"))?;
        Ok((tls, id))
    }
}
