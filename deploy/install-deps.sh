#!/usr/bin/env bash
# Installs what Trellis needs to build and test on Debian, skipping what is already there.
# Needs root (apt-get). Sourced by setup.sh and test.sh; safe to run on its own.
set -euo pipefail

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)   # etcd-client and our contracts
command -v nft >/dev/null 2>&1 || need+=(nftables)                # lab capture rules
command -v ip >/dev/null 2>&1 || need+=(iproute2)                 # lab namespaces and links
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)            # the federation store
command -v cc >/dev/null 2>&1 || need+=(build-essential)          # aws-lc-sys builds C

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing ${need[*]}; run as root (or: sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "install-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: no Rust toolchain; install rustup (https://rustup.rs) and run this again" >&2
  exit 1
fi
