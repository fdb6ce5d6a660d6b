#!/usr/bin/env bash
# Installs what Trellis needs to build and test on Debian, skipping what is already there.
# Needs root (apt-get). Run by setup.sh and test.sh; safe to run on its own.
#
# Each need is checked by the file the build or the tests actually use, not only by a command
# name: protoc without its well-known types (libprotobuf-dev) passes `command -v protoc` and
# still fails a build that imports google/protobuf/*.proto.
set -euo pipefail

need=()
want() { # want <package> <path or command>...: the package is needed if any of them is missing
  local package=$1; shift
  for thing in "$@"; do
    if [[ $thing == /* ]]; then [ -e "$thing" ] && continue; else command -v "$thing" >/dev/null 2>&1 && continue; fi
    need+=("$package"); return
  done
}
# Trellis's own contracts compile with protox (in Rust) and need neither of these two; etcd-client
# (the federation sync) runs protoc at build time, with the well-known types.
want protobuf-compiler protoc
want libprotobuf-dev /usr/include/google/protobuf/struct.proto /usr/include/google/protobuf/descriptor.proto
want nftables nft                  # capture rules (lab and tests)
want iproute2 ip tc                # lab namespaces, links, netem
want etcd-server etcd              # the federation store (tests start their own)
want build-essential cc c++ make   # aws-lc-sys builds C, libFuzzer (cargo fuzz) C++
want ca-certificates /etc/ssl/certs/ca-certificates.crt   # cargo fetching crates over HTTPS
want python3 python3               # the federation lab test's wan capture (a raw socket, tests/tests/federation_lab.rs)
want prometheus promtool           # promtool check metrics on every /metrics (tests/tests/telemetry.rs); only promtool is used
# The independent HTTP/3 client of the QUIC tests (aioquic, from PyPI) lives in a venv: Debian's
# python3 needs python3-venv for that (ensurepip).
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

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

# Check again what the build and the tests will open, so a package that installs without the
# file we need is reported here and not as a build error ten minutes later.
missing=()
for thing in protoc nft ip tc etcd cc c++ python3 promtool /usr/include/google/protobuf/struct.proto; do
  if [[ $thing == /* ]]; then [ -e "$thing" ] || missing+=("$thing"); else command -v "$thing" >/dev/null 2>&1 || missing+=("$thing"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: still missing after installing: ${missing[*]}" >&2
  exit 1
fi

# aioquic, pinned, for the HBONE-over-QUIC interop tests (tests/h3/hbone_h3_client.py); the tests
# look for it here (trellis_e2e::h3_python).
H3_VENV=/var/cache/trellis/h3venv
AIOQUIC=1.7.2
if ! "$H3_VENV/bin/python" -c "import aioquic, sys; sys.exit(aioquic.__version__ != '$AIOQUIC')" >/dev/null 2>&1; then
  echo "install-deps: installing aioquic $AIOQUIC into $H3_VENV"
  rm -rf "$H3_VENV"
  python3 -m venv "$H3_VENV"
  "$H3_VENV/bin/pip" install -q --disable-pip-version-check "aioquic==$AIOQUIC"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: no Rust toolchain; install rustup (https://rustup.rs) and run this again" >&2
  exit 1
fi
