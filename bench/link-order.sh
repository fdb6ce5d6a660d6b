#!/usr/bin/env bash
# Regenerates ztunnel/link-order.txt, the functions an idle ztunnel with a few tunnels runs, which
# release builds link first and together (see ztunnel/build.rs). Run as root after changes that
# move ztunnel's start-up or data path; then rebuild. Running it twice tightens the list.
#
# How: the bench build of ztunnel runs in a lab (the demo, calling through tunnels) with
# bench/link-order/split.c preloaded, which defeats the kernel's 64 KiB fault-around so that the
# code pages resident after 20 s are exactly those used; every function on such a page is listed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "link-order.sh needs root (it builds a network-namespace lab)" >&2; exit 1; }
cargo build --profile bench -p trellis-control --bin trellisd -p trellis-ztunnel --bin ztunnel -p trellis-cli --bin trellis
bin=target/release
work=$(mktemp -d)
trap '"$bin/trellis" lab down --name order --state-dir "$work/state" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
gcc -O2 -shared -fPIC -o "$work/split.so" bench/link-order/split.c
LD_PRELOAD="$work/split.so" "$bin/trellis" lab up --name order --state-dir "$work/state" --bin-dir "$bin" >"$work/up.log" 2>&1 ||
  { cat "$work/up.log" >&2; exit 1; }
sleep 20
mapfile -t pids < <(pgrep -f "ztunnel --node .*$work/state")
[ "${#pids[@]}" -gt 0 ] || { echo "no ztunnel of the lab is running" >&2; exit 1; }
python3 bench/link-order/touched.py "${pids[@]}" >"$work/order.txt"
mv "$work/order.txt" ztunnel/link-order.txt
echo "ztunnel/link-order.txt: $(wc -l <ztunnel/link-order.txt) functions from ${#pids[@]} ztunnels; rebuild to use it"
