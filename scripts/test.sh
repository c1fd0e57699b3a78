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
# The metrics suite scrapes a fleet with a real Prometheus, and the
# dashboard suite drives a real headless Chromium through chromedriver:
# Debian's packages, installed when absent.
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (apt-get) for the metrics and dashboard tests"
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "cannot install ${missing[*]}: run as root on Debian, or install them yourself" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The end-to-end tests run the binaries; build them once, up front.
cargo build --bins --quiet
GPUFLEET_SKIP_BUILD=1 cargo test --workspace "$@"
# Every benchmark scenario at a tiny size, so that they keep working.
target/debug/gpufleet-bench --smoke all
# The Docker deployment: images built, the compose stack run (needs root;
# installs and starts Docker if needed, fails where it cannot run).
scripts/docker-test.sh
