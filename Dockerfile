# syntax=docker/dockerfile:1
# confab container image. Two stages: build with the Rust toolchain, run on distroless (glibc,
# CA certificates, a non-root user, no shell, no package manager). Not built in this
# project's CI (no Docker engine there); tests/it/deploy.rs lints this file with hadolint.
#
#   docker build -t confab:0.1.0 .
#   docker run --rm -p 8080:8080 confab:0.1.0
FROM rust:1.95-bookworm AS build
WORKDIR /src

# 1. Dependencies only, in their own layer: it is rebuilt when a manifest or Cargo.lock changes,
#    not when src/ does. Stub targets stand in for the real ones: every workspace member's
#    manifest must load, with the targets it names (the server's test, the load tool's binary,
#    bench and example). Only the server is built; the load tool (crates/confab-bench) stays a
#    stub for good, since the image does not ship it.
COPY Cargo.toml Cargo.lock ./
COPY crates/confab-bench/Cargo.toml crates/confab-bench/
RUN mkdir -p src tests/it crates/confab-bench/src crates/confab-bench/benches \
        crates/confab-bench/examples \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && touch tests/it/main.rs \
    && echo 'fn main() {}' > crates/confab-bench/src/main.rs \
    && echo 'fn main() {}' > crates/confab-bench/benches/bridge.rs \
    && echo 'fn main() {}' > crates/confab-bench/examples/yardstick.rs \
    && cargo build --release --locked -p confab --bin confab \
    && rm -rf src tests target/release/confab* target/release/deps/confab-* \
        target/release/deps/libconfab-* target/release/.fingerprint/confab-*

# 2. confab itself. Only this layer is rebuilt when src/ changes.
COPY src src
COPY static static
COPY tests tests
# The store's schema, embedded at build time by sqlx's migrate!.
COPY migrations migrations
RUN cargo build --release --locked -p confab --bin confab

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/confab /usr/local/bin/confab
COPY config/default.toml /etc/confab/default.toml
# distroless's `nonroot` user; Kubernetes checks runAsNonRoot against this numeric id.
USER 65532:65532
# The nonroot user's home, which it may write: on the embedded bus the default store is
# data/confab.db under the working directory (mount a volume at /home/nonroot/data to keep it).
WORKDIR /home/nonroot
EXPOSE 8080
# Kubernetes sends SIGTERM; confab drains its sessions within server.shutdown_grace_secs.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/confab"]
CMD ["serve"]
