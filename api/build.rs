//! Compiles the protobuf contracts under `proto/` at build time.
//!
//! Needs `protoc` (Debian: `protobuf-compiler`); `PROTOC` may point at another one.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/trellis/identity/v1/identity.proto",
        "proto/trellis/config/v1/config.proto",
        "proto/spiffe/workload.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &["proto"])
        .map_err(|e| format!("compiling the protobuf contracts failed (is protoc installed? Debian: apt-get install protobuf-compiler): {e}"))?;
    Ok(())
}
