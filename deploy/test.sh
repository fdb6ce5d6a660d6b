#!/usr/bin/env bash
# The whole test suite (what CI runs): installs what is missing, builds every binary the
# end-to-end suites start, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo build --workspace --bins
cargo test --workspace --no-fail-fast
