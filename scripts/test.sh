#!/usr/bin/env bash
# Installs what the tests need beyond the Rust toolchain, then runs every
# check CI runs: formatting, clippy (warnings are errors) and all tests.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "--- installing test dependencies"
# Python safetensors + numpy: the interop test's reference reader
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore safetensors numpy
# a real Prometheus server (and promtool) for the scrape test and the alert rules
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

echo "--- cargo fmt --check"
cargo fmt --all -- --check

echo "--- cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "--- cargo test"
cargo test --workspace --locked

echo "--- fault injection at the storage seam (failpoints feature)"
cargo test -p flotilla-coordinator --locked --features failpoints --test failpoints
