# One image with every KubeBao binary: kubebao-operator, kubebao-kms, kubebao-csi and
# kubebao-installer. The rendered static pod, the DaemonSets and the Helm chart run it with
# different commands.
#
#   docker build -t ghcr.io/kubebao/kubebao:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
# protoc comes from the protoc-bin-vendored crate; no OpenSSL is linked (rustls + ring).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p kubebao-operator -p kubebao-kms -p kubebao-csi -p kubebao-installer \
 && mkdir /out \
 && cp target/release/kubebao-operator target/release/kubebao-kms \
       target/release/kubebao-csi target/release/kubebao-installer /out/

# distroless/cc: glibc and CA certificates only; no shell, no package manager; runs as 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kubebao-operator"]
