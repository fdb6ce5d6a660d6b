//! Compiles the protobuf contracts under `proto/` at build time, with `protox` (a protobuf
//! compiler in Rust): building Trellis's own contracts needs no `protoc` and no system `.proto`
//! files. The well-known types (`google/protobuf/struct.proto`, imported by the Workload API)
//! come built into protox, so the build reads only files of this repository.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/trellis/identity/v1/identity.proto",
        "proto/trellis/config/v1/config.proto",
        "proto/spiffe/workload.proto",
    ];
    // Each file by name: a directory alone is not always rescanned for edits to its files.
    println!("cargo:rerun-if-changed=proto");
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let files = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(protos)
        .map_err(|e| format!("the protobuf contracts under api/proto do not compile: {e}"))?
        .file_descriptor_set();
    tonic_prost_build::configure()
        // Maps as BTreeMap: a resource encodes to the same bytes every time it is built, so
        // trellisd can tell an unchanged resource from a changed one by its encoding.
        .btree_map(".trellis.config.v1")
        .build_client(true)
        .build_server(true)
        .compile_fds(files)
        .map_err(|e| format!("generating Rust from the protobuf contracts failed: {e}"))?;
    Ok(())
}
