#!/usr/bin/env bash
# meshid quick start on loopback: a CA with the shop policy, a join token, an SVID fetched,
# inspected and renewed, then an OAuth access token bound to that SVID, fetched with plain curl.
# Everything lives in a temporary directory that is removed on exit (also on Ctrl-C).
#
#   bash examples/quickstart.sh
#
# MESHID may point at a built binary; otherwise the script builds one with cargo.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${MESHID:-}" ]; then
  cargo build --quiet
  MESHID=target/debug/meshid
fi
work=$(mktemp -d)
ca_pid=
cleanup() { [ -n "$ca_pid" ] && kill "$ca_pid" 2>/dev/null && wait "$ca_pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
grpc=$(free_port)
https=$(free_port)
admin=$(free_port)
echo "== starting the CA: gRPC on 127.0.0.1:$grpc, HTTPS on 127.0.0.1:$https (data in $work/ca)"
"$MESHID" ca serve --data-dir "$work/ca" --grpc-addr "127.0.0.1:$grpc" --http-addr "127.0.0.1:$https" \
  --admin-addr "127.0.0.1:$admin" --policy k8s/base/policy.yaml --svid-ttl 10m 2>"$work/ca.log" &
ca_pid=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$https") 2>/dev/null && break
  sleep 0.1
done

echo "== the trust bundle (meshid ca bundle)"
"$MESHID" ca bundle --data-dir "$work/ca" > "$work/bundle.pem"
"$MESHID" inspect "$work/bundle.pem" | grep -E "certificate|spiffe id|not after"

echo "== a join token for spiffe://cluster.local/ns/shop/sa/frontend"
token=$("$MESHID" ca join-token --data-dir "$work/ca" --spiffe-id spiffe://cluster.local/ns/shop/sa/frontend --ttl 5m)
echo "(printed once, stored only as a hash)"

echo "== meshid svid fetch"
"$MESHID" svid fetch --ca "127.0.0.1:$grpc" --ca-bundle "$work/bundle.pem" --join-token "$token" --out "$work/frontend"
ls -l "$work/frontend"
"$MESHID" inspect "$work/frontend/svid.pem"

echo "== the same token again is refused (single use)"
if "$MESHID" svid fetch --ca "127.0.0.1:$grpc" --ca-bundle "$work/bundle.pem" --join-token "$token" --out "$work/again" --timeout 2s; then
  echo "unexpected: a replayed join token was accepted" >&2
  exit 1
fi

echo "== renewal over mutual TLS with the current SVID"
"$MESHID" svid renew --ca "127.0.0.1:$grpc" --cert-dir "$work/frontend"

echo "== an access token for orders:read, with curl and the SVID (RFC 8705 tls_client_auth)"
curl -sS --cert "$work/frontend/svid.pem" --key "$work/frontend/svid_key.pem" --cacert "$work/bundle.pem" \
  -d grant_type=client_credentials -d client_id=frontend -d scope=orders:read \
  "https://localhost:$https/token" > "$work/token.json"
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["access_token"])' "$work/token.json" > "$work/access_token"
"$MESHID" inspect "$work/access_token"

echo "== orders:write is not frontend's to have"
curl -sS --cert "$work/frontend/svid.pem" --key "$work/frontend/svid_key.pem" --cacert "$work/bundle.pem" \
  -d grant_type=client_credentials -d scope=orders:write "https://localhost:$https/token"
echo

echo "== the audit log"
cat "$work/ca/audit.log"
echo "quickstart: OK"
