//! Generates the gRPC types and stubs from `proto/chime/v1/*.proto` (protoc comes
//! from `tools/protoc`, see `.cargo/config.toml`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "../proto/chime/v1/worker.proto",
        "../proto/chime/v1/admin.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["../proto"])?;
    Ok(())
}
