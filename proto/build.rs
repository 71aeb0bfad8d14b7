//! Generates the tonic/prost code of `zeroshard/v1/*.proto`.
//!
//! protoc comes from `$PROTOC` (set workspace-wide by `.cargo/config.toml` to
//! `proto/protoc`, which runs the binary of the `protoc-bin-vendored` crate or
//! a system protoc); if that does not run, the vendored binary is used directly.
use std::path::PathBuf;
use std::process::Command;

const PROTOS: &[&str] = &[
    "zeroshard/v1/common.proto",
    "zeroshard/v1/inference.proto",
    "zeroshard/v1/worker.proto",
    "zeroshard/v1/shards.proto",
    "zeroshard/v1/control.proto",
    "zeroshard/v1/group.proto",
];

fn runs(protoc: &std::ffi::OsStr) -> bool {
    Command::new(protoc).arg("--version").output().is_ok_and(|o| o.status.success())
}

fn protoc() -> PathBuf {
    match std::env::var_os("PROTOC") {
        Some(p) if runs(&p) => PathBuf::from(p),
        _ => {
            protoc_bin_vendored::protoc_bin_path().expect("protoc-bin-vendored ships a protoc for this host")
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=PROTOC");
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    // Edition 2021 build script, single-threaded here: prost-build reads PROTOC.
    std::env::set_var("PROTOC", protoc());
    tonic_prost_build::configure()
        // `bytes` fields as `bytes::Bytes`: chunks are sliced, never copied.
        .bytes(".")
        // Undecodable requests are INVALID_ARGUMENT (prost's codec says INTERNAL).
        .codec_path("crate::codec::StrictCodec")
        .compile_protos(PROTOS, &["."])?;
    Ok(())
}
