# Two stages: build with the full toolchain, run on a slim Debian with only the binary.
FROM rust:1-bookworm AS build
WORKDIR /src
# The whole tree (less .dockerignore): Cargo.toml names test targets, so they must exist.
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 confab
COPY --from=build /src/target/release/confab /usr/local/bin/confab
COPY config/default.toml /etc/confab/default.toml
USER confab
EXPOSE 8080
# Kubernetes sends SIGTERM; confab drains its sessions within server.shutdown_grace_secs.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/confab"]
CMD ["serve"]
