#!/usr/bin/env bash
# Runs one benchmark with the optimised bench profile: bash bench/run.sh control-plane
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  control-plane)
    cargo build --profile bench -p trellis-control --bin trellisd -p trellis-bench --bin control_plane
    exec target/release/control_plane  # the bench profile builds into target/release ;;
  *)
    echo "usage: bash bench/run.sh control-plane" >&2; exit 2 ;;
esac
