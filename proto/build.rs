//! Generates the gRPC types and stubs from `proto/chime/v1/*.proto` (protoc comes
//! from `tools/protoc`, see `.cargo/config.toml`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "chime/v1/worker.proto",
        "chime/v1/admin.proto",
        "chime/v1/queue.proto",
        "chime/v1/delivery.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // The descriptor set feeds gRPC server reflection (grpcurl, Postman).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("chime_descriptor.bin"))
        // Payloads handed to subscribers share the popped item's buffer instead of
        // being copied into a Vec for every delivery.
        .bytes(".chime.v1.DeliveredItem.payload")
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["."])?;
    // The OTLP trace export chime's spans go out by: a client only, and kept out of
    // the descriptor set, so reflection lists only the services chime serves.
    let otlp = "otlp/trace_export.proto";
    println!("cargo:rerun-if-changed={otlp}");
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_protos(&[otlp], &["."])?;
    Ok(())
}
