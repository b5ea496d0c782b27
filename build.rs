//! Generates the gRPC code and the descriptor set that server reflection serves.
//!
//! The protobuf files are parsed by `protox`, a pure-Rust compiler, so building
//! needs no system `protoc`.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["usage/v1/usage.proto"], ["proto"])?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let encoded = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out_dir.join("usage_descriptor.bin"), encoded)?;

    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
