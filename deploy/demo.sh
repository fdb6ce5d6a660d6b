#!/usr/bin/env bash
# The demo: two clusters, east and west, federated through etcd, in the network-namespace lab
# (root needed).
#   1. `trellis lab up` builds the lab from deploy/lab/demo.yaml: a real etcd on a wan, per cluster
#      trellisd, a ztunnel per node and an east-west gateway, all joined to the federation; the
#      `demo` namespace enrolled, the global service hello served by hello-v1 in east and hello-v2
#      in west, and a client pod in east calling it every second through the mesh;
#   2. `trellis federation status` in east: both members synced;
#   3. the client's calls succeed, answered from both clusters (west's through the gateways);
#   4. ztunnel's metrics prove it: connections and bytes with connection_security_policy="mutual_tls";
#   5. `trellis lab status` sums it up. The lab stays up for you to explore.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/debug
for b in trellisd ztunnel trellis; do
  [ -x "$bin/$b" ] || { echo "demo: $bin/$b is missing; run: cargo build --workspace --bins" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "demo: the lab needs root (network namespaces, nftables): run it with sudo" >&2; exit 1; }

echo "== 1. trellis lab up"
"$bin/trellis" lab up --bin-dir "$bin" | sed 's/^/   /'

echo "== 2. trellis federation status (east's trellisd)"
ip netns exec tl-demo-east-cp "$bin/trellis" federation status | sed 's/^/   /'

echo "== 3. the client pod in east calls http://hello.demo/ (VIP 10.101.0.10) every second"
log=/run/trellis-lab/demo/logs/pod-east-demo-client.log
for _ in $(seq 100); do
  grep -q ' ok 200 hello from hello-v1' "$log" 2>/dev/null && grep -q ' ok 200 hello from hello-v2' "$log" && break
  sleep 0.2
done
tail -n 4 "$log" | sed 's/^/   /'
grep -q ' ok 200 hello from hello-v1' "$log" || { echo "demo: no call was answered in east" >&2; exit 1; }
grep -q ' ok 200 hello from hello-v2' "$log" || { echo "demo: no call was answered from west" >&2; exit 1; }

echo "== 4. node-1's ztunnel: connections it carried in mutual TLS (Prometheus, :15020)"
ip netns exec tl-demo-east-node-1 "$bin/trellis" demo call --url http://127.0.0.1:15020/metrics \
  | grep -E '^trellis_tcp_(connections_opened|received_bytes|sent_bytes)_total\{reporter="source"' \
  | grep 'connection_security_policy="mutual_tls"' \
  | sed -E 's/source_principal="[^"]*",//; s/destination_principal="[^"]*",//; s/^/   /'

echo "== 5. trellis lab status"
"$bin/trellis" lab status | sed 's/^/   /'
echo
echo "The lab is still up. Enrol, deny, look around, then: $bin/trellis lab down"
