# syntax=docker/dockerfile:1
#
# sandgate's container image: built from source in a Rust stage, run from a slim Debian stage
# as an unprivileged user. The gateway listens on 0.0.0.0:$PORT (8080) and keeps its state in
# /var/lib/sandgate (SQLite, sandbox working trees, the generated admin key): mount a volume
# there.
#
#   docker build -t sandgate:0.1.0 .
#   docker run --rm -p 8080:8080 -v sandgate-data:/var/lib/sandgate sandgate:0.1.0
#
# This file needs a registry for its base images; the tests here have none, so they build the
# same runtime layout from the host-built binary instead (deploy/docker/Dockerfile.prebuilt,
# tests/it/image.rs). See docs/deploy.md.

# ---- build ---------------------------------------------------------------------------------
# Keep the tag in step with rust-toolchain.toml (rustup in this image honours that file).
FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
# Dependencies first, against an empty crate, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY crates/sandgate/Cargo.toml crates/sandgate/Cargo.toml
RUN mkdir -p crates/sandgate/src/bin \
    && echo 'fn main() {}' > crates/sandgate/src/main.rs \
    && echo 'fn main() {}' > crates/sandgate/src/bin/fixture.rs \
    && touch crates/sandgate/src/lib.rs \
    && cargo build --release --locked --bin sandgate \
    && rm -rf crates/sandgate/src
COPY crates/sandgate crates/sandgate
# The real sources are older than the placeholder's build outputs: make Cargo rebuild them.
RUN touch crates/sandgate/src/main.rs crates/sandgate/src/lib.rs \
    && cargo build --release --locked --bin sandgate \
    && install -D -m 0755 target/release/sandgate /out/sandgate

# ---- run -----------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: a JWKS fetched over https (SANDGATE_JWT_JWKS) is checked against them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sandgate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sandgate \
        --shell /usr/sbin/nologin sandgate \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/sandgate
COPY --from=build /out/sandgate /usr/local/bin/sandgate
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/sandgate
ENV PORT=8080 \
    GATEWAY_HOST=0.0.0.0 \
    SANDGATE_DATA_DIR=/var/lib/sandgate
EXPOSE 8080
VOLUME ["/var/lib/sandgate"]
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
    CMD ["/usr/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${PORT} && printf 'GET /health/live HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/local/bin/sandgate"]
CMD ["serve"]
