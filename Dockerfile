# syntax=docker/dockerfile:1
#
# packet-ingest container image.
#   docker build -t packet-ingest:0.1.0 .
#   docker run --rm -p 50051:50051 -p 7000:7000 -p 9090:9090 packet-ingest:0.1.0
# Configuration comes from PACKET_INGEST_* environment variables (or flags
# after the image name); see helm/packet-ingest for a Kubernetes deployment.

FROM rust:1-bookworm AS builder
WORKDIR /src
# build.rs compiles proto/ with a pure-Rust compiler: no protoc needed.
COPY . .
# The cache mounts keep the registry and target/ between builds; the binary is
# copied out of target/ in the same step, since the mount is gone afterwards.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin packet-ingest \
 && install -D -m 0755 target/release/packet-ingest /out/packet-ingest

# glibc + libgcc (+ CA certificates), no shell, runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="packet-ingest" \
      org.opencontainers.image.description="Verifies length-prefixed packets (SHA-256 / HMAC-SHA256) and fans them out in order to gRPC subscribers" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=builder /out/packet-ingest /usr/local/bin/packet-ingest
USER 65532:65532
# gRPC, TCP ingest, HTTP metrics (/metrics, /healthz).
EXPOSE 50051 7000 9090
# The process drains on SIGTERM and exits 0 within --shutdown-grace.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/packet-ingest"]
