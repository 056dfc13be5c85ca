//! Compiles the control-plane contract and the SPIFFE Workload API with a vendored protoc, so a
//! fresh machine needs nothing.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from("proto");
    let files = [
        proto_dir.join("meshid/ca/v1/ca.proto"),
        proto_dir.join("spiffe/workload.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Messages that carry a secret get a hand-written `Debug` that redacts it
        // (src/pb_debug.rs). A path names a message fully qualified; prost applies a message's
        // setting to its oneof enums too (`attestation::Kind`). The Workload API has no
        // package: its messages are `.X509SVID` and so on.
        .skip_debug([
            ".meshid.ca.v1.Attestation",
            ".meshid.ca.v1.IssueTokenResponse",
            ".meshid.ca.v1.JwtSvidResponse",
            ".X509SVID",
            ".JWTSVID",
            ".ValidateJWTSVIDRequest",
        ])
        .build_server(true)
        .build_client(true)
        .compile_with_config(
            config,
            &files,
            &[proto_dir, protoc_bin_vendored::include_path()?],
        )?;
    Ok(())
}
