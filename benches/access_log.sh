#!/usr/bin/env bash
# What the access log costs: two meshid pairs in front of one nginx backend, sidecar B of one
# logging nothing (--access-log off) and of the other logging every request to a file
# (--access-log FILE --access-log-allowed), measured in interleaved rounds with wrk.
#
#   bash benches/access_log.sh            # ROUNDS=3 DURATION=10s CONNECTIONS=50 MODE=keep-alive
#   MODE=close bash benches/access_log.sh # a new connection per request
#
# Per round and pair: requests/s, and CPU per request (user + system time of both sidecars
# during the run, from /proc, over the requests wrk counted). Prints each round, then the
# median and range of the per-round ratios logged/off.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10s} CONNECTIONS=${CONNECTIONS:-50} MODE=${MODE:-keep-alive}
cargo build --release --quiet
export MESHID=$PWD/target/release/meshid
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  sleep 0.2; rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

backend=$(free_port)
mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$backend;
    location / { return 200 "$(printf 'x%.0s' $(seq 100))"; }
  }
}
NGINX
setsid nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)

started= # the A_OUT port of the pair start_pair started last (not in $(...): pids must stay ours)
start_pair() { # name b_args
  local a_out; a_out=$(free_port)
  B_ARGS=$2 setsid bash benches/meshid-pair.sh "127.0.0.1:$backend" "$a_out" "$work/$1" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 400); do [[ $(grep -c admin "$work/$1/pids" 2>/dev/null) == 2 ]] && break; sleep 0.05; done
  for admin in $(sed -n 's/.*admin=//p' "$work/$1/pids"); do
    for _ in $(seq 400); do curl -sf "http://127.0.0.1:$admin/ready" >/dev/null && break; sleep 0.05; done
  done
  for _ in $(seq 100); do curl -sf -H "Host: b" "http://127.0.0.1:$a_out/" >/dev/null && break; sleep 0.1; done
  curl -sf -o /dev/null -H "Host: b" "http://127.0.0.1:$a_out/" || { echo "pair $1 does not answer" >&2; exit 1; }
  started=$a_out
}
start_pair off "--access-log off"; off_out=$started
start_pair logged "--access-log $work/access.log --access-log-allowed"; log_out=$started

headers=(-H "Host: b")
[[ $MODE == close ]] && headers+=(-H "Connection: close")
run() { # name a_out -> "rps cpu_us_per_request"
  local a b before after out rps reqs
  a=$(sed -n 's/^a=\([0-9]*\).*/\1/p' "$work/$1/pids"); b=$(sed -n 's/^b=\([0-9]*\).*/\1/p' "$work/$1/pids")
  before=$(( $(ticks "$a") + $(ticks "$b") ))
  out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" "${headers[@]}" "http://127.0.0.1:$2/")
  after=$(( $(ticks "$a") + $(ticks "$b") ))
  if grep -q "Non-2xx" <<<"$out"; then echo "pair $1 answered errors: $out" >&2; exit 1; fi
  rps=$(awk '/^Requests\/sec/ { print $2 }' <<<"$out")
  reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
  echo "$rps $(python3 -c "print(round(($after - $before) * 1e6 / $(getconf CLK_TCK) / $reqs, 2))")"
}
ratios=()
for round in $(seq "$ROUNDS"); do
  # Alternate which pair goes first, so neither always runs on a warmer machine.
  if (( round % 2 )); then order=(off logged); else order=(logged off); fi
  declare -A r=()
  for name in "${order[@]}"; do
    if [[ $name == off ]]; then r[$name]=$(run off "$off_out"); else r[$name]=$(run logged "$log_out"); fi
  done
  read -r off_rps off_cpu <<<"${r[off]}"; read -r log_rps log_cpu <<<"${r[logged]}"
  echo "ROUND $round mode=$MODE off: ${off_rps} req/s ${off_cpu} us/req; logged: ${log_rps} req/s ${log_cpu} us/req"
  ratios+=("$(python3 -c "print($log_rps / $off_rps, $log_cpu / $off_cpu)")")
  unset r
done
lines=$(wc -l < "$work/access.log")
printf '%s\n' "${ratios[@]}" | python3 -c '
import sys, statistics
rows = [tuple(map(float, l.split())) for l in sys.stdin if l.strip()]
for i, name in ((0, "requests/s"), (1, "CPU per request")):
    v = sorted(r[i] for r in rows)
    print(f"RATIO logged/off {name}: median {statistics.median(v):.3f} [{v[0]:.3f}-{v[-1]:.3f}]")
'
echo "ACCESS LOG lines written: $lines"
