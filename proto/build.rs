//! Compiles the control-plane contract with a vendored protoc, so a fresh machine needs nothing.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from("proto");
    let file = proto_dir.join("meshid/ca/v1/ca.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Messages that carry a secret get a hand-written `Debug` that redacts it
        // (src/pb_debug.rs). A path names a message fully qualified; prost applies a message's
        // setting to its oneof enums too (`attestation::Kind`).
        .skip_debug([
            ".meshid.ca.v1.Attestation",
            ".meshid.ca.v1.IssueTokenResponse",
        ])
        .build_server(true)
        .build_client(true)
        .compile_with_config(
            config,
            &[file],
            &[proto_dir, protoc_bin_vendored::include_path()?],
        )?;
    Ok(())
}
