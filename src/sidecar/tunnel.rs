//! Opaque TCP between sidecars (a database, any protocol that is not HTTP, or an app's own TLS
//! inside a CONNECT): mutual TLS and the callee's identity as for every call, authorised by
//! the caller's identity alone, since there are no requests to check.
//!
//! The wire protocol is as small as it can be. The caller's sidecar dials the callee's with ALPN
//! [`TCP_ALPN`](super::tls::TCP_ALPN), sends the app port it wants (2 bytes, big-endian), and
//! waits for one status byte: [`TunnelStatus::Open`], or why not. Then bytes flow both ways.
//! The callee's sidecar opens the tunnel only to a port its policy declares opaque, and only
//! for an allowed caller: a tunnel cannot reach an HTTP port and so skip its route rules.

use std::time::Duration;

use meshid_proto::SpiffeId;
use meshid_proto::directory::Directory;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dial::{Dialer, MeshTlsStream, Target};
use super::identity::Current;
use super::tls::Alpn;

/// The callee's answer to a tunnel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TunnelStatus {
    Open = 0,
    /// The caller is not an allowed caller of the service.
    CallerNotAllowed = 1,
    /// The port is not one of the service's opaque ports (HTTP ports are checked per request).
    PortNotOpaque = 2,
    /// The app does not accept connections on that port.
    AppUnreachable = 3,
    /// The callee's sidecar has no service directory, or is not a service of it.
    Unavailable = 4,
    /// The caller's identity or certificate is revoked (`meshid ca revoke`).
    Revoked = 5,
}

impl TunnelStatus {
    fn from_byte(b: u8) -> Option<Self> {
        use TunnelStatus::*;
        [
            Open,
            CallerNotAllowed,
            PortNotOpaque,
            AppUnreachable,
            Unavailable,
            Revoked,
        ]
        .into_iter()
        .find(|s| *s as u8 == b)
    }

    pub fn reason(self) -> &'static str {
        match self {
            TunnelStatus::Open => "open",
            TunnelStatus::CallerNotAllowed => "the caller may not call this service",
            TunnelStatus::PortNotOpaque => {
                "the port is not an opaque port of the service (the policy's opaque_ports)"
            }
            TunnelStatus::AppUnreachable => "the app does not accept connections on that port",
            TunnelStatus::Unavailable => "the callee's sidecar cannot decide yet",
            TunnelStatus::Revoked => "the caller is revoked",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("{0}")]
    Dial(std::io::Error),
    #[error("the server presented {0}, which is not a service of the mesh")]
    NotAService(SpiffeId),
    #[error("{service} refused the tunnel: {}", .status.reason())]
    Refused {
        service: String,
        status: TunnelStatus,
    },
    #[error("tunnel to {service}: {error}")]
    Io {
        service: String,
        error: std::io::Error,
    },
}

/// Open a tunnel to `port` of the service at `target` (`expect`: the SPIFFE ID it must have,
/// or `None` to learn it from the handshake). Returns the stream, ready for bytes, and the
/// callee's service name.
pub async fn open(
    dialer: &Dialer,
    identity: &Current,
    dir: &Directory,
    target: Target<'_>,
    expect: Option<&SpiffeId>,
    port: u16,
) -> Result<(MeshTlsStream, String), TunnelError> {
    let (mut tls, id) = dialer
        .dial(target, identity, expect, Alpn::Tcp)
        .await
        .map_err(TunnelError::Dial)?;
    let service = dir
        .service_by_id(&id)
        .ok_or(TunnelError::NotAService(id))?
        .name
        .clone();
    let io = |error| TunnelError::Io {
        service: service.clone(),
        error,
    };
    tls.write_all(&port.to_be_bytes()).await.map_err(io)?;
    tls.flush().await.map_err(io)?;
    let mut status = [0u8; 1];
    tokio::time::timeout(dialer.connect_timeout(), tls.read_exact(&mut status))
        .await
        .map_err(|_| {
            io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer to the tunnel request",
            ))
        })?
        .map_err(io)?;
    match TunnelStatus::from_byte(status[0]) {
        Some(TunnelStatus::Open) => Ok((tls, service)),
        Some(status) => Err(TunnelError::Refused { service, status }),
        None => Err(io(std::io::Error::other(format!(
            "unknown tunnel status {}",
            status[0]
        )))),
    }
}

/// The callee side: read the port a tunnel asks for (within `timeout`).
pub async fn read_port<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> std::io::Result<u16> {
    let mut port = [0u8; 2];
    tokio::time::timeout(timeout, io.read_exact(&mut port))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no tunnel port"))??;
    Ok(u16::from_be_bytes(port))
}

/// The callee side: answer a tunnel request.
pub async fn answer<W: tokio::io::AsyncWrite + Unpin>(
    io: &mut W,
    status: TunnelStatus,
) -> std::io::Result<()> {
    io.write_all(&[status as u8]).await?;
    io.flush().await
}
