#!/usr/bin/env bash
# A meshid sidecar pair in front of a backend, for shared/bench/peer-pairs.sh (EXTRA_START_CMD):
#
#   client --HTTP--> sidecar A (outbound :$A_OUT) --mTLS 1.3 + bearer token--> sidecar B --HTTP--> backend
#
# with a CA of its own (the pair needs SVIDs, tokens and a policy). B checks A's certificate, the
# allowed callers, the route and the token (scope b:read) on every request, as in production.
#
#   meshid-pair.sh BACKEND_HOST:PORT A_OUT_PORT [WORK_DIR]
#
# MESHID is the binary (default: target/release/meshid); B_ARGS, more flags for sidecar B (e.g.
# "--access-log FILE --access-log-allowed"). Runs until killed; writes the PIDs of the sidecars
# to WORK_DIR/pids.
set -euo pipefail
backend=$1
a_out=$2
work=${3:-$(mktemp -d)}
here=$(cd "$(dirname "$0")/.." && pwd)
MESHID=${MESHID:-$here/target/release/meshid}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

mkdir -p "$work"
cat > "$work/policy.yaml" <<POLICY
trust_domain: cluster.local
services:
  b:
    id: spiffe://cluster.local/ns/default/sa/b
    scopes: [b:read]
    routes:
      - { path: /healthz }
      - { path: /, scope: b:read }
    callers:
      a: [b:read]
  a:
    id: spiffe://cluster.local/ns/default/sa/a
POLICY
grpc=$(free_port); https=$(free_port); admin=$(free_port); b_in=$(free_port)
"$MESHID" --log warn ca serve --data-dir "$work/ca" --policy "$work/policy.yaml" \
  --grpc-addr "127.0.0.1:$grpc" --http-addr "127.0.0.1:$https" --admin-addr "127.0.0.1:$admin" 2>"$work/ca.log" &
wait_port "$grpc"
"$MESHID" ca bundle --data-dir "$work/ca" > "$work/bundle.pem"
sidecar() { # name app inbound outbound admin [route] [extra flags]
  local token
  token=$("$MESHID" ca join-token --data-dir "$work/ca" --spiffe-id "spiffe://cluster.local/ns/default/sa/$1" --reusable)
  "$MESHID" --log warn sidecar --ca "127.0.0.1:$grpc" --ca-bundle "$work/bundle.pem" --join-token "$token" \
    --cert-dir "$work/$1" --app "$2" --inbound-addr "127.0.0.1:$3" --outbound-addr "127.0.0.1:$4" \
    --admin-addr "127.0.0.1:$5" ${6:+--route "$6"} ${7:-} 2>"$work/sidecar-$1.log" &
  echo "$1=$! admin=$5" >> "$work/pids"
}
: > "$work/pids"
sidecar b "$backend" "$b_in" "$(free_port)" "$(free_port)" "" "${B_ARGS:-}"
sidecar a "127.0.0.1:9" "$(free_port)" "$a_out" "$(free_port)" "b=127.0.0.1:$b_in"
echo "b_inbound=$b_in" >> "$work/pids"
wait
