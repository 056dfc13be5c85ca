//! `meshid inspect FILE`: what a certificate file or an access token says, in human form.
//! Tokens are decoded, not verified: the output says so.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use base64::Engine;

pub fn run(path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let trimmed = text.trim();
    if !trimmed.contains("-----BEGIN") && trimmed.split('.').count() == 3 {
        return token(trimmed);
    }
    certificates(&bytes, path)
}

fn left(not_after: i64, now: SystemTime) -> String {
    let secs = not_after - meshid_proto::clock::unix_seconds(now);
    if secs > 0 {
        format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(secs as u64))
        )
    } else {
        "EXPIRED".to_owned()
    }
}

fn certificates(bytes: &[u8], path: &Path) -> anyhow::Result<()> {
    let certs = meshid_proto::pem::decode_certs(bytes).with_context(|| {
        format!(
            "{} is neither a PEM certificate file nor a JWT",
            path.display()
        )
    })?;
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
        println!("  not before: {}", cert.validity().not_before);
        let not_after = cert.validity().not_after;
        println!(
            "  not after:  {not_after} ({})",
            left(not_after.timestamp(), now)
        );
        println!("  x5t#S256:   {}", meshid_proto::token::x5t_s256(der));
    }
    Ok(())
}

fn token(jwt: &str) -> anyhow::Result<()> {
    let part = |i: usize| -> anyhow::Result<serde_json::Value> {
        let raw = jwt.split('.').nth(i).unwrap_or_default();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw)
            .with_context(|| format!("JWT part {} is not base64url", i + 1))?;
        serde_json::from_slice(&bytes).with_context(|| format!("JWT part {} is not JSON", i + 1))
    };
    let (header, claims) = (part(0)?, part(1)?);
    if !header.is_object() || !claims.is_object() {
        bail!("not a JWT");
    }
    let s = |v: &serde_json::Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    println!("access token (decoded only; the signature is NOT verified here)");
    println!(
        "  type:       {}  alg: {}  kid: {}",
        s(&header["typ"]),
        s(&header["alg"]),
        s(&header["kid"])
    );
    println!("  issuer:     {}", s(&claims["iss"]));
    println!("  subject:    {}", s(&claims["sub"]));
    println!("  client_id:  {}", s(&claims["client_id"]));
    println!("  audience:   {}", s(&claims["aud"]));
    println!("  scopes:     {}", s(&claims["scope"]));
    if let Some(exp) = claims["exp"].as_i64() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(exp.max(0) as u64);
        println!(
            "  expires:    {} ({})",
            humantime::format_rfc3339_seconds(at),
            left(exp, SystemTime::now())
        );
    }
    println!("  bound to:   x5t#S256 {}", s(&claims["cnf"]["x5t#S256"]));
    println!("  jti:        {}", s(&claims["jti"]));
    Ok(())
}
