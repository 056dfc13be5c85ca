#!/usr/bin/env bash
# The test command (README "Run the tests"): lint, then every unit and end-to-end test.
# Sets up the Python venv the interop checks use on first run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c "import cryptography, jwt, grpc, websockets, kubernetes_validate, spiffe" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
fi
export MESHID_TEST_PYTHON="$PWD/.venv/bin/python"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
mkdir -p target
set +e
# The examples as programs (`--all-targets` builds them as test harnesses): the end-to-end
# tests run examples/workload_api.rs, the README's Workload API snippet.
cargo build --workspace --examples
cargo test --workspace --all-targets 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 2; i <= NF; i++) { if ($i ~ /^passed;/) p += $(i-1); if ($i ~ /^failed;/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' target/test-output.log
exit "$status"
