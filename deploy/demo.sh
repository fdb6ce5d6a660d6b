#!/usr/bin/env bash
# The demo: two clusters, east and west, federated through etcd, in the network-namespace lab
# (root needed).
#   1. `trellis lab up` builds the lab from deploy/lab/demo.yaml: a real etcd on a wan, per cluster
#      trellisd, a ztunnel per node and an east-west gateway, all joined to the federation; the
#      `demo` namespace enrolled, the global service hello served by hello-v1 in east and hello-v2
#      in west, and a client pod in east calling it every second through the mesh;
#   2. `trellis federation status` in east: both members synced;
#   3. the client is served by east (hello-v1): locality, its own cluster first;
#   4. `trellis lab stop` kills east's server: the calls go on, answered from west (hello-v2,
#      through the gateways), with no failed call;
#   5. `trellis lab up` starts east's server again: the calls come back to east;
#   6. `trellis traffic shift --cluster east=50,west=50` (the operator's etcd credentials): the
#      calls split between hello-v1 and hello-v2; `trellis traffic status` shows who serves;
#   7. `trellis traffic shift --clear`: back to locality, east only;
#   8. ztunnel's metrics prove it: connections and bytes with connection_security_policy="mutual_tls";
#   9. `trellis lab status` sums it up. The lab stays up for you to explore.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/debug
for b in trellisd ztunnel trellis; do
  [ -x "$bin/$b" ] || { echo "demo: $bin/$b is missing; run: cargo build --workspace --bins" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "demo: the lab needs root (network namespaces, nftables): run it with sudo" >&2; exit 1; }

state=/run/trellis-lab/demo
log=$state/logs/pod-east-demo-client.log
# The operator's etcd credentials (the lab made them): the only etcd user that may write traffic/.
pki=$state/etcd/pki
operator=(--etcd https://10.200.0.2:2379 --etcd-ca "$pki/ca.pem"
          --etcd-cert "$pki/trellis-operator.pem" --etcd-key "$pki/trellis-operator-key.pem")

# The client's log, one line per call: `<unix-ms> ok 200 hello from hello-v1 (v1) ...` or
# `<unix-ms> error <reason>`. `mark` is where it ends now; the others read the calls after a mark.
mark() { wc -l < "$log" 2>/dev/null || echo 0; }
since() { tail -n +"$(( $1 + 1 ))" "$log"; }
calls() { since "$1" | wc -l; }
failed() { since "$1" | grep -vc ' ok 200 ' || true; }
by() { since "$1" | grep -c " ok 200 hello from hello-$2 " || true; }
# Waits (up to $3 s) until the last $2 calls after mark $1 were all answered by hello-$4.
last_by() {
  local from=$1 n=$2 secs=$3 who=$4
  for _ in $(seq $(( secs * 5 ))); do
    if [ "$(calls "$from")" -ge "$n" ] && [ "$(since "$from" | tail -n "$n" | grep -c " ok 200 hello from hello-$who ")" = "$n" ]; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}
show() { since "$1" | tail -n "${2:-4}" | sed 's/^/   /'; }
no_failure() {
  local n; n=$(failed "$1")
  [ "$n" = 0 ] || { since "$1" | grep -v ' ok 200 ' | sed 's/^/   /' >&2; echo "demo: $n calls failed $2" >&2; exit 1; }
}

echo "== 1. trellis lab up"
"$bin/trellis" lab up --bin-dir "$bin" | sed 's/^/   /'

echo "== 2. trellis federation status (east's trellisd)"
ip netns exec tl-demo-east-cp "$bin/trellis" federation status | sed 's/^/   /'

echo "== 3. the client pod in east calls http://hello.demo/ (VIP 10.101.0.10) every second: east serves it (hello-v1)"
start=$(mark)
last_by "$start" 3 60 v1 || { show "$start" 8 >&2; echo "demo: the client in east was not served by east" >&2; exit 1; }
show "$start" 3

echo "== 4. trellis lab stop pod-east-demo-hello-v1: east's server is gone; the calls go on from west (hello-v2)"
at=$(mark)
"$bin/trellis" lab stop pod-east-demo-hello-v1 | sed 's/^/   /'
last_by "$at" 4 60 v2 || { show "$at" 8 >&2; echo "demo: the calls did not move to west" >&2; exit 1; }
no_failure "$at" "while east's server was stopped"
show "$at" 4
echo "   $(calls "$at") calls since the stop, $(failed "$at") failed"

echo "== 5. trellis lab up: east's server starts again, and the calls come back to east"
at=$(mark)
"$bin/trellis" lab up --bin-dir "$bin" | sed 's/^/   /'
last_by "$at" 3 60 v1 || { show "$at" 8 >&2; echo "demo: the calls did not come back to east" >&2; exit 1; }
no_failure "$at" "while east came back"
show "$at" 3

echo "== 6. trellis traffic shift -n demo hello --cluster east=50,west=50 (the operator's etcd credentials)"
ip netns exec tl-demo-etcd "$bin/trellis" traffic shift -n demo hello --cluster east=50,west=50 "${operator[@]}" \
  | sed 's/^/   /'
at=$(mark)
for _ in $(seq 150); do
  [ "$(by "$at" v1)" -ge 2 ] && [ "$(by "$at" v2)" -ge 2 ] && break
  sleep 0.2
done
[ "$(by "$at" v1)" -ge 2 ] && [ "$(by "$at" v2)" -ge 2 ] \
  || { show "$at" 10 >&2; echo "demo: the calls did not split between east and west" >&2; exit 1; }
no_failure "$at" "after the shift"
show "$at" 6
echo "   since the shift: $(by "$at" v1) calls answered by hello-v1 (east), $(by "$at" v2) by hello-v2 (west)"
ip netns exec tl-demo-east-cp "$bin/trellis" traffic status -n demo hello | sed 's/^/   /'

echo "== 7. trellis traffic shift -n demo hello --clear: back to locality, east only"
ip netns exec tl-demo-etcd "$bin/trellis" traffic shift -n demo hello --clear "${operator[@]}" | sed 's/^/   /'
at=$(mark)
last_by "$at" 3 60 v1 || { show "$at" 8 >&2; echo "demo: the calls did not return to east" >&2; exit 1; }
no_failure "$at" "after --clear"
show "$at" 3

echo "== 8. node-1's ztunnel: connections it carried in mutual TLS (Prometheus, :15020)"
ip netns exec tl-demo-east-node-1 "$bin/trellis" demo call --url http://127.0.0.1:15020/metrics \
  | grep -E '^trellis_tcp_(connections_opened|received_bytes|sent_bytes)_total\{reporter="source"' \
  | grep 'connection_security_policy="mutual_tls"' \
  | sed -E 's/source_principal="[^"]*",//; s/destination_principal="[^"]*",//; s/^/   /'

echo "== 9. trellis lab status"
"$bin/trellis" lab status | sed 's/^/   /'
echo
echo "The lab is still up. Enrol, deny, shift, stop a pod, look around, then: $bin/trellis lab down"
