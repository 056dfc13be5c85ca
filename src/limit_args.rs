//! The bounds every listener applies (`meshid_proto::serve::Limits`), as flags shared by
//! `ca serve` and `sidecar`, so both read the same everywhere.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use meshid_proto::serve::Limits;

#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// Time a client has to complete the TLS handshake.
    #[arg(long, env = "MESHID_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// Time a new connection has to send its first complete request head (HTTP/1 and HTTP/2).
    #[arg(long, env = "MESHID_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    #[arg(long, env = "MESHID_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// HTTP/2 keep-alive: ping the client this often...
    #[arg(long, env = "MESHID_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    keepalive_interval: Duration,
    /// ...and close the connection when a ping is not answered within this.
    #[arg(long, env = "MESHID_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    keepalive_timeout: Duration,
    /// Most connections at once per listener; beyond it new ones are closed at once
    /// [default: 50000 for the CA (two per sidecar), 10000 for a sidecar].
    #[arg(long, env = "MESHID_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Largest request head (all headers) in bytes.
    #[arg(long, env = "MESHID_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// On SIGTERM: time given to requests in flight before the last connections are closed.
    #[arg(long, env = "MESHID_DRAIN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

impl LimitArgs {
    /// The checked limits; `default_max_connections` when `--max-connections` is not given.
    pub fn limits(&self, default_max_connections: usize) -> anyhow::Result<Limits> {
        let max_connections = self.max_connections.unwrap_or(default_max_connections);
        let positive = [
            ("--handshake-timeout", self.handshake_timeout),
            ("--header-read-timeout", self.header_read_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--keepalive-interval", self.keepalive_interval),
            ("--keepalive-timeout", self.keepalive_timeout),
        ];
        for (flag, d) in positive {
            if d.is_zero() {
                bail!("{flag} must be longer than 0s");
            }
        }
        if max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_header_bytes) {
            bail!("--max-header-bytes must be between 1024 and 16777216");
        }
        Ok(Limits {
            handshake_timeout: self.handshake_timeout,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            max_connections,
            max_header_bytes: self.max_header_bytes,
            drain_timeout: self.drain_timeout,
        })
    }
}
