# syntax=docker/dockerfile:1
# Weir's container image: the `weir` binary alone, on Debian slim, as a non-root user.
#   docker build -t weir:0.1.0 .
# Needs BuildKit (the default builder of current Docker) for the cache mounts. Not built
# in this repository's CI, which has no container runtime: see k8s/README.md.

# The Rust release the repository is built and tested with; Cargo.toml's rust-version is
# the oldest supported.
ARG RUST_VERSION=1.95
# Build and run on the same Debian release, so the binary's glibc matches.
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
# Only what `cargo build` reads: the manifest and lock file, the sources, the bench target
# that Cargo.toml declares, and openapi.json (compiled into the admin API).
COPY Cargo.toml Cargo.lock openapi.json ./
COPY src ./src
COPY benches ./benches
# The registry and target directories are BuildKit cache mounts: they survive between
# builds, so a source change rebuilds Weir's own crate, not its hundreds of dependencies.
# The binary is copied out of the cache mount, which is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo fetch --locked \
 && cargo build --release --locked --bin weir \
 && install -D -m 0755 target/release/weir /out/weir

FROM debian:${DEBIAN_RELEASE}-slim
# CA certificates for OTLP export over HTTPS (rustls reads the system's roots). Nothing else:
# no shell tools are needed, and the pod's preStop uses the kubelet's own sleep.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/weir /usr/local/bin/weir
# A numeric, non-root user, so Kubernetes' runAsNonRoot can check it (k8s/deployment.yaml
# sets the same ids). `weir run` keeps no files: its state is in JetStream.
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["run", "--config", "/etc/weir/weir.toml"]
