//! `meshid inspect FILE`: what a certificate file says, in human form.

use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;

pub fn run(path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = meshid_proto::pem::decode_certs(&bytes)
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    let now = SystemTime::now();
    for (i, der) in certs.iter().enumerate() {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .with_context(|| format!("certificate {} does not parse", i + 1))?;
        println!("certificate {} of {}", i + 1, certs.len());
        match meshid_proto::svid::inspect(der) {
            Ok(info) => println!("  spiffe id:  {}", info.spiffe_id),
            Err(e) => println!("  spiffe id:  none ({e})"),
        }
        println!("  subject:    {}", cert.subject());
        println!("  issuer:     {}", cert.issuer());
        println!(
            "  serial:     {}",
            cert.tbs_certificate.raw_serial_as_string().replace(':', "")
        );
        println!("  is CA:      {}", cert.is_ca());
        let not_after = cert.validity().not_after;
        let secs = not_after.timestamp() - meshid_proto::clock::unix_seconds(now);
        let left = if secs > 0 {
            format!(
                "in {}",
                humantime::format_duration(std::time::Duration::from_secs(secs as u64))
            )
        } else {
            "EXPIRED".to_owned()
        };
        println!("  not before: {}", cert.validity().not_before);
        println!("  not after:  {not_after} ({left})");
    }
    Ok(())
}
