#!/usr/bin/env bash
# Runs one benchmark with the optimised bench profile: bash bench/run.sh control-plane|data-plane [--baseline REV]|federation|failover|transport
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  control-plane)
    cargo build --profile bench -p trellis-control --bin trellisd -p trellis-bench --bin control_plane
    # The bench profile builds into target/release.
    exec target/release/control_plane ;;
  data-plane)
    # Needs root: it builds a network-namespace lab (trellis lab up) and tears it down after.
    # With --baseline REV it also measures REV's ztunnel in the same lab, turn about with this
    # build's: REV is checked out in a worktree under target/ and built into the same target
    # directory first (its binary copied aside), so the two builds share their dependencies.
    if [ "${2:-}" = --baseline ]; then
      rev=$(git rev-parse --short "${3:?--baseline needs a git revision}^{commit}")
      src=target/baseline/src-$rev
      [ -d "$src" ] || git worktree add --detach "$src" "$rev"
      cargo build --profile bench --manifest-path "$src/Cargo.toml" --target-dir target -p trellis-ztunnel --bin ztunnel
      cp target/release/ztunnel "target/baseline/ztunnel-$rev"
      export TRELLIS_BENCH_BASELINE_ZTUNNEL=$PWD/target/baseline/ztunnel-$rev
    fi
    cargo build --profile bench -p trellis-control --bin trellisd -p trellis-ztunnel --bin ztunnel \
      -p trellis-cli --bin trellis -p trellis-bench --bin netbench --bin data_plane
    exec target/release/data_plane ;;
  federation)
    # Starts its own etcd (Debian's etcd-server: bash deploy/install-deps.sh) on loopback, then
    # (root: a two-cluster lab) the cross-cluster overhead through the gateways.
    cargo build --profile bench -p trellis-control --bin trellisd -p trellis-ztunnel --bin ztunnel \
      -p trellis-cli --bin trellis -p trellis-bench --bin netbench --bin federation --bin cross_cluster
    target/release/federation
    echo
    exec target/release/cross_cluster ;;
  failover)
    # Needs root: a three-cluster lab (trellis lab up, with Debian's etcd-server: bash
    # deploy/install-deps.sh), torn down after; kills, blackholes and loses what serves a client.
    cargo build --profile bench -p trellis-control --bin trellisd -p trellis-ztunnel --bin ztunnel \
      -p trellis-cli --bin trellis -p trellis-bench --bin failover
    exec target/release/failover ;;
  transport)
    # Needs root: a two-cluster lab (trellis lab up, with Debian's etcd-server: bash
    # deploy/install-deps.sh), torn down after; shapes the wan with bench/src/bin/wanem.rs.
    cargo build --profile bench -p trellis-control --bin trellisd -p trellis-ztunnel --bin ztunnel \
      -p trellis-cli --bin trellis -p trellis-bench --bin netbench --bin wanem --bin transport
    exec target/release/transport ;;
  *)
    echo "usage: bash bench/run.sh control-plane|data-plane|federation|failover|transport" >&2; exit 2 ;;
esac
