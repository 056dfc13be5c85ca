#!/usr/bin/env bash
# The test command (README "Run the tests"): lint, then every unit and end-to-end test.
# Sets up the Python venv the interop checks use on first run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c "import cryptography" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
fi
export MESHID_TEST_PYTHON="$PWD/.venv/bin/python"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
