# syntax=docker/dockerfile:1
# meshid's two images, from one build of the binary:
#   docker build --target meshid      -t ghcr.io/meshid/meshid:v0.1.0 .
#   docker build --target meshid-init -t ghcr.io/meshid/meshid-init:v0.1.0 .
# meshid: the binary only (distroless, glibc), as UID/GID 1337: the CA and the sidecar.
# meshid-init: the binary plus iptables (nft and legacy backends), as root: the init
# container that runs `meshid init-iptables` with NET_ADMIN and NET_RAW.
# Both: /usr/local/bin/meshid is the ENTRYPOINT. The base images can be pinned by digest with
# --build-arg (e.g. RUNTIME_IMAGE=gcr.io/distroless/cc-debian12@sha256:...).

# The toolchain of Cargo.toml's rust-version, on the Debian release both runtimes are built on
# (the binary needs that release's glibc or newer).
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12
ARG INIT_IMAGE=docker.io/library/debian:bookworm-slim
ARG VERSION=0.1.0

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# .dockerignore keeps target/, .venv/ and .git/ out. protoc is vendored (protoc-bin-vendored);
# aws-lc builds with the image's C compiler.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin meshid \
 && install -D -m 0755 target/release/meshid /out/meshid \
 && install -d -m 0700 /out/lib/meshid

# The init container's image: root, iptables with both backends (iptables-nft is Debian's
# default `iptables`; iptables-legacy, iptables-nft-save and iptables-legacy-save come with
# it), nothing else.
FROM ${INIT_IMAGE} AS meshid-init
ARG VERSION
LABEL org.opencontainers.image.title="meshid-init" \
      org.opencontainers.image.description="meshid with iptables: the init container that writes a pod's interception rules (meshid init-iptables)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/meshid/meshid" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/meshid /usr/local/bin/meshid
ENTRYPOINT ["/usr/local/bin/meshid"]
CMD ["init-iptables", "--help"]

# The CA and the sidecar. Last, so a plain `docker build .` gives this one.
FROM ${RUNTIME_IMAGE} AS meshid
ARG VERSION
LABEL org.opencontainers.image.title="meshid" \
      org.opencontainers.image.description="Service-mesh identity: the CA (meshid ca serve) and the sidecar (meshid sidecar)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/meshid/meshid" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12"
COPY --from=build /out/meshid /usr/local/bin/meshid
# The CA's data directory, /var/lib/meshid (0700, owned by 1337), for
# `docker run -v NAME:/var/lib/meshid` (a new named volume takes its owner and mode). In
# Kubernetes a volume is mounted there instead. (COPY copies a directory's contents: the
# directory meshid is the content of /out/lib.)
COPY --from=build --chown=1337:1337 /out/lib/ /var/lib/
# The UID the iptables rules exclude (init-iptables --proxy-uid/--proxy-gid) and the manifests
# run as (runAsUser: 1337).
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/meshid"]
CMD ["--help"]
