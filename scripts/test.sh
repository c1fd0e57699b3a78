#!/usr/bin/env bash
# Runs every test: unit tests, the real-NATS suites and the end-to-end
# tests with the real binaries. Installs nats-server if needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NATS_SERVER_BIN="$(scripts/nats-server.sh)"
export NATS_SERVER_BIN
echo "using $("$NATS_SERVER_BIN" --version) at $NATS_SERVER_BIN"
# The stand-in libnvidia-ml.so.1 (tests/nvml-stub) is compiled by the test
# kit on first use.
if ! command -v "${CC:-gcc}" >/dev/null; then
  echo "the NVML tests build tests/nvml-stub with a C compiler: install gcc (or set CC)" >&2
  exit 1
fi
# The end-to-end tests run the binaries; build them once, up front.
cargo build --bins --quiet
GPUFLEET_SKIP_BUILD=1 cargo test --workspace "$@"
# Every benchmark scenario at a tiny size, so that they keep working.
target/debug/gpufleet-bench --smoke all
# The Docker deployment: images built, the compose stack run (needs root;
# installs and starts Docker if needed, fails where it cannot run).
scripts/docker-test.sh
