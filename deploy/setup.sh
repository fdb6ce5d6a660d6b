#!/usr/bin/env bash
# The one set-up command: installs what is missing, builds Trellis, and runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo build --workspace --bins
exec bash deploy/demo.sh
