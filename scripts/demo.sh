#!/usr/bin/env bash
# A real local fleet (nats-server, a coordinator, two workers with simulated
# GPUs) running the sample job in examples/hello.json, then stopping.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NATS_SERVER_BIN="$(scripts/nats-server.sh)"
export NATS_SERVER_BIN
cargo build --release --quiet --bins
exec target/release/gpufleet up --workers 2 --simulate-gpus 2x24GiB:L4 --port 4222 \
  --run "${1:-examples/hello.json}" --once
