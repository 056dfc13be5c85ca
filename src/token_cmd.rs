//! `meshid token`: one access token from the CA's `/token` endpoint, authenticated by an SVID
//! over mutual TLS (RFC 8705 `tls_client_auth`), for scripts and debugging.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use meshid_proto::tls::{self, CertSlot};
use meshid_proto::verify::{PeerRule, SpiffeVerifier, TrustSource};
use meshid_proto::{TrustBundle, TrustDomain};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName};

#[derive(Args)]
pub struct TokenArgs {
    /// The CA's HTTPS address, HOST:PORT.
    #[arg(long, env = "MESHID_CA_HTTP")]
    ca_http: String,
    /// Trust bundle (PEM) to verify the CA with.
    #[arg(long, env = "MESHID_CA_BUNDLE")]
    ca_bundle: PathBuf,
    /// The CA's trust domain.
    #[arg(long, env = "MESHID_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The caller's SVID (PEM: leaf, then intermediates).
    #[arg(long, env = "MESHID_CERT")]
    cert: PathBuf,
    /// The SVID's private key (PEM).
    #[arg(long, env = "MESHID_KEY")]
    key: PathBuf,
    /// Space-separated scopes of one service, e.g. "orders:read orders:write".
    #[arg(long, env = "MESHID_SCOPE")]
    scope: Option<String>,
    /// Target service (name or SPIFFE ID); must agree with the scopes.
    #[arg(long, env = "MESHID_AUDIENCE")]
    audience: Option<String>,
    /// client_id to send (must name the caller's own service).
    #[arg(long, env = "MESHID_CLIENT_ID")]
    client_id: Option<String>,
    /// Print the whole RFC 6749 response as JSON instead of only the access token.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: TokenArgs) -> anyhow::Result<()> {
    let td = TrustDomain::parse(&a.trust_domain).context("--trust-domain")?;
    let pem = std::fs::read(&a.ca_bundle)
        .with_context(|| format!("reading --ca-bundle {}", a.ca_bundle.display()))?;
    let bundle = TrustBundle::from_pem(td.clone(), &pem).context("--ca-bundle")?;
    let chain = meshid_proto::pem::decode_certs(
        &std::fs::read(&a.cert).with_context(|| format!("reading --cert {}", a.cert.display()))?,
    )
    .context("--cert")?;
    let key = PrivateKeyDer::from_pem_slice(
        &std::fs::read(&a.key).with_context(|| format!("reading --key {}", a.key.display()))?,
    )
    .map_err(|_| anyhow::anyhow!("--key {} is not a PEM private key", a.key.display()))?;
    let identity = tls::certified_key(chain, key).context("--cert and --key")?;

    let verifier = SpiffeVerifier::new(TrustSource::new(bundle)?, PeerRule::Exact(td.ca_id()));
    let mut config = rustls::ClientConfig::builder_with_provider(meshid_proto::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(CertSlot::new(identity));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];

    let (host, _) = a
        .ca_http
        .rsplit_once(':')
        .context("--ca-http must be HOST:PORT")?;
    let host = host.trim_matches(['[', ']']);
    let server_name = ServerName::try_from(host.to_owned()).context("--ca-http host")?;
    let tcp = tokio::net::TcpStream::connect(&a.ca_http)
        .await
        .with_context(|| format!("connecting to {}", a.ca_http))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .with_context(|| format!("TLS to {}", a.ca_http))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);

    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials");
    for (k, v) in [
        ("scope", &a.scope),
        ("audience", &a.audience),
        ("client_id", &a.client_id),
    ] {
        if let Some(v) = v {
            form.append_pair(k, v);
        }
    }
    let request = hyper::Request::post("/token")
        .header(hyper::header::HOST, &a.ca_http)
        .header(
            hyper::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(Full::new(Bytes::from(form.finish())))?;
    let response = sender.send_request(request).await.context("POST /token")?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let json: serde_json::Value =
        serde_json::from_slice(&body).context("the CA's answer is not JSON")?;
    if !status.is_success() {
        bail!(
            "CA refused ({status}): {} — {}",
            json["error"].as_str().unwrap_or("?"),
            json["error_description"].as_str().unwrap_or("")
        );
    }
    if a.json {
        println!("{json}");
    } else {
        println!(
            "{}",
            json["access_token"]
                .as_str()
                .context("no access_token in the answer")?
        );
    }
    Ok(())
}
