# syntax=docker/dockerfile:1
#
# flowgate container image: the `flowgate` binary built with the `dist`
# profile (release, no debug info, stripped: Cargo.toml [profile.dist]) on
# debian:bookworm-slim, running as a non-root user.
#
#   docker build -t flowgate:0.1.0 .
#   docker run --rm -p 9464:9464 \
#     -e FLOWGATE__AMQP__URL=amqp://user:pass@rabbitmq:5672/%2f flowgate:0.1.0
#
# See deploy/README.md (Kubernetes: deploy/helm/flowgate).

############################ build ############################
FROM rust:1-bookworm AS build
WORKDIR /src

# The whole workspace: Cargo.toml declares [[bench]] targets, so benches/
# must be present for cargo to load the manifest (see .dockerignore).
COPY . .

# BuildKit caches keep the crate registry and target/ between builds.
# --locked: build exactly the dependency versions of Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked --bin flowgate \
 && install -m 0755 target/dist/flowgate /usr/local/bin/flowgate

############################ runtime ############################
FROM debian:bookworm-slim AS runtime

# ca-certificates: amqps:// and rediss:// verify the server against the
# system roots (lapin uses rustls with the native certificate store).
# Not pinned: Debian's security updates replace the version in bookworm.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it and
# fsGroup can make mounted volumes writable.
RUN groupadd --system --gid 10001 flowgate \
 && useradd --system --uid 10001 --gid flowgate --home-dir /var/lib/flowgate \
      --no-create-home --shell /usr/sbin/nologin flowgate \
 && install -d -o flowgate -g flowgate -m 0750 /var/lib/flowgate \
 && install -d -m 0755 /etc/flowgate

COPY --from=build /usr/local/bin/flowgate /usr/local/bin/flowgate
# A default config (the 3-stage forward demo) so the image runs as is;
# mount your own at /etc/flowgate/flowgate.toml (the Helm chart does).
COPY config/demo.toml /etc/flowgate/flowgate.toml

# In a container the HTTP server (/metrics /healthz /readyz) must listen on
# all interfaces to be reachable; FLOWGATE__* variables override the file.
ENV FLOWGATE__HTTP__BIND=0.0.0.0:9464 \
    RUST_LOG=info,lapin=warn

# The durable publish spool (set `[spool] path = "/var/lib/flowgate/spool.redb"`).
VOLUME ["/var/lib/flowgate"]
WORKDIR /var/lib/flowgate

# 9464: /metrics /healthz /readyz (+ POST /publish); 8080: the order gateway
# when `[orders] gateway_bind = "0.0.0.0:8080"`.
EXPOSE 9464 8080

USER 10001:10001

# flowgate drains in-flight work on SIGTERM within `[shutdown] grace`.
# No HEALTHCHECK: orchestrators probe /healthz and /readyz themselves.
STOPSIGNAL SIGTERM
ENTRYPOINT ["flowgate"]
CMD ["run", "--config", "/etc/flowgate/flowgate.toml"]
