//! Compiles `schema/*.capnp` into Rust for the `capsync-schema` crate.
//!
//! The schema compiler runs in-process from WebAssembly (`capnpc-embedded`), so a machine with
//! only the Rust toolchain builds capsync: no system `capnp` binary, no C++ toolchain.

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let schema = manifest_dir.join("capsync.capnp");
    println!("cargo:rerun-if-changed={}", schema.display());

    let request = capnpc_embedded::CompileCommand::new()
        .file(&schema)
        .src_prefix(&manifest_dir)
        .compile()
        .expect("compiling schema/capsync.capnp");
    capnpc::codegen::CodeGenerationCommand::new()
        .output_directory(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .run(&request[..])
        .expect("generating Rust from schema/capsync.capnp");
}
