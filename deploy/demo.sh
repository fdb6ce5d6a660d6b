#!/usr/bin/env bash
# The demo: a one-cluster ambient mesh in the network-namespace lab (root needed).
#   1. `trellis lab up` builds the lab from deploy/lab/demo.yaml: two nodes, trellisd, one
#      ztunnel per node, the `demo` namespace enrolled, two versions of the hello service and a
#      client pod calling it every second through the mesh;
#   2. the client's calls succeed, answered by both versions across nodes;
#   3. ztunnel's metrics prove it: connections and bytes with connection_security_policy="mutual_tls";
#   4. `trellis lab status` sums it up. The lab stays up for you to explore.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/debug
for b in trellisd ztunnel trellis; do
  [ -x "$bin/$b" ] || { echo "demo: $bin/$b is missing; run: cargo build --workspace --bins" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "demo: the lab needs root (network namespaces, nftables): run it with sudo" >&2; exit 1; }

echo "== 1. trellis lab up"
"$bin/trellis" lab up --bin-dir "$bin" | sed 's/^/   /'

echo "== 2. the client pod calls http://hello.demo/ (VIP 10.101.0.10) every second"
log=/run/trellis-lab/demo/logs/pod-east-demo-client.log
for _ in $(seq 50); do [ "$(grep -c ' ok 200 ' "$log" 2>/dev/null)" -ge 4 ] && break; sleep 0.2; done
tail -n 4 "$log" | sed 's/^/   /'
grep -q ' ok 200 hello from hello-v' "$log" || { echo "demo: the client's calls did not succeed" >&2; exit 1; }

echo "== 3. node-1's ztunnel: connections it carried in mutual TLS (Prometheus, :15020)"
ip netns exec tl-demo-east-node-1 "$bin/trellis" demo call --url http://127.0.0.1:15020/metrics \
  | grep -E '^trellis_tcp_(connections_opened|received_bytes|sent_bytes)_total\{reporter="source"' \
  | grep 'connection_security_policy="mutual_tls"' \
  | sed -E 's/source_principal="[^"]*",//; s/destination_principal="[^"]*",//; s/^/   /'

echo "== 4. trellis lab status"
"$bin/trellis" lab status | sed 's/^/   /'
echo
echo "The lab is still up. Enrol, deny, look around, then: $bin/trellis lab down"
