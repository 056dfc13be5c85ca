#!/usr/bin/env bash
# meshid's sidecar pair side by side with the nginx and HAProxy mTLS pairs of shared/bench, in one
# run on this machine, then sidecar memory idle and with 1,000 open connections.
#
#   bash benches/mesh.sh                 # DURATION=10s per run, keep-alive and close modes
#   DURATION=30s bash benches/mesh.sh
#
# Needs nginx, haproxy, wrk (shared/bench installs them with apt when run as root), python3.
# Prints shared/bench's RESULT/RATIO lines, MEMORY lines, and writes benches/results/mesh.svg.
# CA issuance and token figures: cargo bench --bench ca.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-$(cd .. && pwd)/shared}
cargo build --release --quiet
export MESHID=$PWD/target/release/meshid
work=$(mktemp -d)
pair_pid=
cleanup() {
  [[ -n $pair_pid ]] && kill -- -"$pair_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
rss_mib() { awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

a_out=$(free_port)
EXTRA_LABEL=meshid EXTRA_HOST=b EXTRA_TARGET_URL="http://127.0.0.1:$a_out/" \
EXTRA_START_CMD="exec $PWD/benches/meshid-pair.sh \"\$BACKEND\" $a_out $work/pair" \
  bash "$SHARED/bench/peer-pairs.sh" | tee "$work/results.txt"

# Memory: a fresh pair (no backend needed), idle, then 1,000 held connections on each sidecar.
ulimit -n 65536 || true
a_out=$(free_port)
setsid bash benches/meshid-pair.sh 127.0.0.1:9 "$a_out" "$work/mem" >/dev/null 2>&1 &
pair_pid=$!
for _ in $(seq 200); do [[ $(grep -c admin "$work/mem/pids" 2>/dev/null) == 2 ]] && grep -q b_inbound "$work/mem/pids" && break; sleep 0.05; done
a_pid=$(sed -n 's/^a=\([0-9]*\).*/\1/p' "$work/mem/pids"); b_pid=$(sed -n 's/^b=\([0-9]*\).*/\1/p' "$work/mem/pids")
b_in=$(sed -n 's/^b_inbound=//p' "$work/mem/pids")
for admin in $(sed -n 's/.*admin=//p' "$work/mem/pids"); do
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$admin/ready" >/dev/null && break; sleep 0.05; done
done
sleep 1
echo "MEMORY sidecar=a state=idle rss_mib=$(rss_mib "$a_pid")"
echo "MEMORY sidecar=b state=idle rss_mib=$(rss_mib "$b_pid")"
exec 7> >(python3 benches/hold_connections.py plain "127.0.0.1:$a_out" 1000 > "$work/hold-a.txt")
exec 8> >(python3 benches/hold_connections.py mtls "127.0.0.1:$b_in" 1000 "$work/mem/a/svid.pem" "$work/mem/a/svid_key.pem" > "$work/hold-b.txt")
for _ in $(seq 600); do grep -q HOLDING "$work/hold-a.txt" 2>/dev/null && grep -q HOLDING "$work/hold-b.txt" 2>/dev/null && break; sleep 0.1; done
echo "MEMORY sidecar=a state=1000_client_connections rss_mib=$(rss_mib "$a_pid") $(cat "$work/hold-a.txt")"
echo "MEMORY sidecar=b state=1000_mtls_connections rss_mib=$(rss_mib "$b_pid") $(cat "$work/hold-b.txt")"
exec 7>&- 8>&-

mkdir -p benches/results
python3 benches/chart.py "$work/results.txt" > benches/results/mesh.svg
echo "chart: benches/results/mesh.svg"
