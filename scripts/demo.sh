#!/usr/bin/env bash
# A real local fleet (nats-server, a coordinator, two workers with simulated
# GPUs) running the sample job in examples/hello.json (or the job file given
# as $1), streaming its output, then stopping everything. Exits with the
# job's outcome: 0 when it completed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NATS_SERVER_BIN="$(scripts/nats-server.sh)"
export NATS_SERVER_BIN
echo "building gpufleet (release; the first build takes a few minutes)..." >&2
cargo build --release --quiet --bins
exec "${CARGO_TARGET_DIR:-target}/release/gpufleet" up --workers 2 --simulate-gpus 2x24GiB:L4 \
  --port 4222 --run "${1:-examples/hello.json}" --once
