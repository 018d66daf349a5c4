# syntax=docker/dockerfile:1
#
#   docker build -t geoproxy .
#   docker run --rm -p 6380:6380 -p 9380:9380 \
#       -v "$PWD/my-geoproxy.toml:/etc/geoproxy/geoproxy.toml:ro" geoproxy
#
# The image ships no configuration: mount one at /etc/geoproxy/geoproxy.toml (see
# config/geoproxy.toml). Inside a container, proxy.listen and admin.listen must use 0.0.0.0
# (or the container's address) to be reachable through the published ports; they can also
# be set from the environment: -e GEOPROXY__PROXY__LISTEN=0.0.0.0:6380
# -e GEOPROXY__ADMIN__LISTEN=0.0.0.0:9380.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/geoproxy /usr/local/bin/geoproxy

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 geoproxy \
    && useradd --system --uid 10001 --gid geoproxy --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin geoproxy \
    && mkdir -p /etc/geoproxy
COPY --from=build /usr/local/bin/geoproxy /usr/local/bin/geoproxy
# Plain log lines (no terminal colors) in `docker logs`.
# Numeric, so Kubernetes can verify runAsNonRoot.
USER 10001:10001
# 6380: Redis clients. 9380: admin HTTP (/live /ready /metrics /v1/status).
EXPOSE 6380 9380
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/geoproxy"]
CMD ["--config", "/etc/geoproxy/geoproxy.toml"]
