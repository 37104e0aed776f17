# KubeBao's image for those who build with Docker: the same image as `make image` (which needs
# no Docker engine, see docs/image.md). One image with every KubeBao binary in /usr/local/bin:
# kubebao-operator, kubebao-kms, kubebao-csi and kubebao-installer. The chart, the rendered
# static pod and the DaemonSets run it with their own command and args.
#
#   docker build -t ghcr.io/kubebao/kubebao:0.1.0 .

FROM rust:1.95-bookworm AS build
# The layer is written by the same script as `make image`: the binaries, the libraries `ldd`
# finds for them, /etc/passwd and /etc/group, /tmp and the CA bundle; nothing else (no shell).
RUN command -v python3 >/dev/null && [ -f /etc/ssl/certs/ca-certificates.crt ] \
 || (apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates)
WORKDIR /src
# protoc comes from the protoc-bin-vendored crate; no OpenSSL is linked (rustls + ring).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p kubebao-operator -p kubebao-kms -p kubebao-csi -p kubebao-installer --bins \
 && python3 image/write_image.py --bin-dir target/release --rootfs /rootfs

FROM scratch
COPY --from=build /rootfs/ /
# Same configuration as image/write_image.py writes.
USER 65532:65532
ENV PATH=/usr/local/bin:/usr/bin:/bin
WORKDIR /
ENTRYPOINT ["/usr/local/bin/kubebao-operator"]
LABEL org.opencontainers.image.title=kubebao \
      org.opencontainers.image.licenses=Apache-2.0 \
      org.opencontainers.image.source=https://github.com/kubebao/kubebao
