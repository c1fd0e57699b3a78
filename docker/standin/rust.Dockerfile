# Stand-in for rust:<version>-bookworm, the build stage's base, for machines
# that reach no image registry (scripts/docker-test.sh builds it). Same
# interface: cargo and rustc on PATH, CARGO_HOME=/usr/local/cargo (the
# Dockerfile keeps a cache of the registry there), gcc for crates that
# build C. The toolchain is the host's, copied into the context as rust/.
ARG DEBIAN_BASE=debian:bookworm-slim
FROM ${DEBIAN_BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
# The host's CA bundle: cargo must trust whatever the host trusts to reach
# crates.io (a TLS-inspecting proxy's CA, say).
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY rust /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin && cargo --version && rustc --version
