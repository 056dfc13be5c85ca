//! An app that does its own mutual TLS gets its identity from the sidecar's SPIFFE Workload
//! API, with the SPIFFE project's Rust library (the `spiffe` crate), as README.md shows:
//!
//! ```text
//! SPIFFE_ENDPOINT_SOCKET=unix:///run/meshid/workload-api/socket cargo run --example workload_api
//! ```

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = spiffe::WorkloadApiClient::connect_env().await?; // SPIFFE_ENDPOINT_SOCKET
    let svid = client.fetch_x509_svid().await?; // certificate chain and private key
    let bundles = client.fetch_x509_bundles().await?; // the roots to verify peers with
    let jwt = client.fetch_jwt_svid(["db"], None).await?; // a JWT-SVID for audience "db"

    println!(
        "X.509-SVID {} ({} certificates)",
        svid.spiffe_id(),
        svid.cert_chain().len()
    );
    let td = svid.spiffe_id().trust_domain();
    let roots = bundles.get(td).map_or(0, |b| b.authorities().len());
    println!("bundle of {td}: {roots} root(s)");
    println!("JWT-SVID {} for {:?}", jwt.spiffe_id(), jwt.audience());
    Ok(())
}
