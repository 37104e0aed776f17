//! Compiles the upstream contracts with the protoc shipped in the protoc-bin-vendored crate,
//! so a fresh machine needs no hand-installed protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(
            config,
            &["kms/v2/api.proto", "csi/v1alpha1/service.proto"],
            &["kms", "csi"],
        )?;
    println!("cargo:rerun-if-changed=kms/v2/api.proto");
    println!("cargo:rerun-if-changed=csi/v1alpha1/service.proto");
    Ok(())
}
