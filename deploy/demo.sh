#!/usr/bin/env bash
# The demo: the control plane of one cluster, on loopback, with real TLS 1.3 and SPIFFE IDs.
#   1. trellisd starts, creates the cluster's root CA (spiffe://demo.trellis.local) and
#      discovers a shop namespace (a service and two workloads) from a manifest directory;
#   2. an operator creates a one-time join token for node-1;
#   3. ztunnel redeems it for its node SVID over TLS, verifying trellisd's own SVID;
#   4. replaying the token is refused;
#   5. `trellis namespace label` enrols the namespace and `trellis status` shows it live.
# (The network-namespace lab with pods and HBONE tunnels replaces this demo when it lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/debug
for b in trellisd ztunnel trellis; do
  [ -x "$bin/$b" ] || { echo "demo: $bin/$b is missing; run: cargo build --workspace --bins" >&2; exit 1; }
done

work=$(mktemp -d /tmp/trellis-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 15012)
echo "== 1. trellisd (cluster 'demo') hosts the CA on 127.0.0.1:$port"
admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 15014)
mkdir -p "$work/manifests"
cat >"$work/manifests/shop.yaml" <<'YAML'
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {selector: {app: cart}, clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {name: cart-1, namespace: shop, labels: {app: cart}}
spec: {serviceAccount: cart, node: node-1, ip: 10.1.1.5}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {serviceAccount: web, node: node-2, ip: 10.1.2.5}
YAML
"$bin/trellisd" --cluster demo --ca-dir "$work/ca" --manifests "$work/manifests" \
  --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" >/dev/null 2>"$work/trellisd.log" &
pids+=($!)
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
ls -l "$work/ca" | sed 's/^/   /'

echo "== 2. a one-time join token for node-1"
"$bin/trellisd" --cluster demo --ca-dir "$work/ca" token create --node node-1 --ttl-seconds 600 >"$work/token"
echo "   token: $(cut -c1-13 "$work/token")… (only its SHA-256 is stored)"

echo "== 3. ztunnel on node-1 joins"
"$bin/ztunnel" --node node-1 --trust-domain demo.trellis.local --ca-addr "127.0.0.1:$port" \
  --ca-roots "$work/ca/root-cert.pem" --join-token-file "$work/token" >"$work/zt1.out" 2>"$work/zt1.log" &
pids+=($!)
for _ in $(seq 100); do grep -q joined "$work/zt1.out" 2>/dev/null && break; sleep 0.1; done
sed 's/^/   /' "$work/zt1.out"

echo "== 4. the same token again"
if "$bin/ztunnel" --node node-1 --trust-domain demo.trellis.local --ca-addr "127.0.0.1:$port" \
  --ca-roots "$work/ca/root-cert.pem" --join-token-file "$work/token" >/dev/null 2>"$work/zt2.log"; then
  echo "   unexpected: the replay was accepted" >&2; exit 1
fi
echo "   refused: $(grep -o 'the join token was already used' "$work/zt2.log" | head -1)"

echo "== what trellisd logged"
grep -E "issued|refused join" "$work/trellisd.log" | sed -E 's/\x1b\[[0-9;]*m//g; s/^/   /'
grep -q "joined as spiffe://demo.trellis.local/trellis/node/node-1" "$work/zt1.out"

echo "== 5. trellis status, then enrol the shop namespace"
"$bin/trellis" status --admin "127.0.0.1:$admin" | sed 's/^/   /'
"$bin/trellis" namespace label shop trellis.io/dataplane-mode=ambient --manifests "$work/manifests" | sed 's/^/   /'
for _ in $(seq 100); do
  "$bin/trellis" status --admin "127.0.0.1:$admin" | grep -q "enrolled namespaces: shop" && break
  sleep 0.1
done
"$bin/trellis" status --admin "127.0.0.1:$admin" | tee "$work/status" | sed 's/^/   /'
grep -q "enrolled namespaces: shop" "$work/status"
echo "demo: OK"
