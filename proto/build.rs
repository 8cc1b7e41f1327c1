//! Generates the gRPC code from `proto/interlock/v1/*.proto` at build time (tonic-prost-build,
//! which runs `protoc`). Generated code is not committed: one source of truth, no freshness test.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/interlock/v1/coordinator.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    if std::process::Command::new("protoc")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err(
            "protoc not found: run `cargo xtask setup` (installs Debian's protobuf-compiler)"
                .into(),
        );
    }
    tonic_prost_build::configure().compile_protos(&protos, &["proto"])?;
    Ok(())
}
