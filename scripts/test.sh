#!/usr/bin/env bash
# Installs what the tests need beyond the Rust toolchain, then runs every
# check CI runs: formatting, clippy (warnings are errors) and all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# apt-get needs root: sudo where this is not root
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

# --- totals: every test suite's output is also kept in $results_log, and on
# exit (passing or not) one closing line sums the suites run so far: cargo
# test's "test result: ok. N passed; M failed; ..." lines and pytest's
# "N passed, M failed in 1.2s" summary (its errors count as failed). The exit
# code stays the one the script would have had.
results_log=$(mktemp)
test_totals() {
  awk '
    /^test result: / {
      for (i = 1; i < NF; i++) {
        w = $(i + 1); sub(/[;,]$/, "", w)
        if (w == "passed") p += $i
        if (w == "failed") f += $i
      }
      next
    }
    /^=* *[0-9]+ (passed|failed|errors?)(,.*)? in [0-9.]+s/ {
      for (i = 1; i < NF; i++) {
        w = $(i + 1); sub(/[;,]$/, "", w)
        if (w == "passed") p += $i
        if (w == "failed" || w == "error" || w == "errors") f += $i
      }
    }
    END { printf "%d passed, %d failed", p, f }' "$1"
}
closing_line() {
  local rc=$?
  local verdict="all checks passed"
  if [ "$rc" != 0 ]; then verdict="FAILED (exit $rc)"; fi
  echo "=== tests: $(test_totals "$results_log") across every suite run; $verdict"
  rm -f "$results_log"
  exit "$rc"
}
trap closing_line EXIT
# runs a test suite, its output shown as before and kept for the totals
counted() { "$@" 2>&1 | tee -a "$results_log"; }

echo "--- installing test dependencies"
# Python safetensors + numpy: the interop test's reference reader
# kubernetes-validate (with its schemas) and PyYAML for the deployment checks
# msgpack + pytest: the Python client (python/) and its tests; the --exec
# end-to-end test runs examples/numpy with the client from python/
# mypy: the client's types, strict (python/pyproject.toml)
# A system Python that refuses pip (PEP 668, "externally-managed-environment",
# as Debian 12 and Ubuntu 23.04+ ship) gets a virtual environment under the
# repository instead; it goes first on PATH, so every test's python3 is it.
if python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
  # a venv left half-made (no pip in it) is made again
  if [ ! -x .venv-test/bin/pip ]; then
    rm -rf .venv-test
    if ! python3 -m venv .venv-test 2>/dev/null; then
      # Debian splits venv out of python3
      rm -rf .venv-test
      $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
      $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
      python3 -m venv .venv-test
    fi
  fi
  export PATH="$PWD/.venv-test/bin:$PATH"
  echo "system Python is externally managed: using the virtual environment .venv-test"
fi
# (the variable, not --root-user-action: pip before 22.1, as Ubuntu 22.04 has, lacks the flag)
PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
  safetensors numpy kubernetes-validate pyyaml msgpack pytest mypy
# a real Prometheus server (and promtool) for the scrape test and the alert rules;
# iproute2 (ip netns) and iptables for the network-partition test (tests/partition.rs)
apt_packages=()
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then apt_packages+=(prometheus); fi
if ! command -v ip >/dev/null; then apt_packages+=(iproute2); fi
if ! command -v iptables-restore >/dev/null; then apt_packages+=(iptables); fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

echo "--- deployment files: chart and plain manifests in sync, schemas, alert rules, dashboard"
python3 deploy/render.py --check
kubernetes-validate --strict --quiet deploy/k8s/flotilla.yaml
promtool check rules deploy/prometheus/rules.yml
promtool test rules deploy/prometheus/rules_test.yml
promtool check config deploy/prometheus/prometheus.yml
python3 -c 'import json, sys; d = json.load(open("deploy/grafana/flotilla.json")); assert d["panels"], "no panels"'

echo "--- cargo fmt --check"
cargo fmt --all -- --check

echo "--- cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "--- no import circle between the modules of a crate"
python3 scripts/check-import-cycles.py coordinator/src worker/src shared/src src

echo "--- the Python client's tests (python/)"
counted python3 -m pytest -q python/tests

echo "--- the Python client's types: mypy --strict (config in python/pyproject.toml)"
(cd python && python3 -m mypy)

echo "--- cargo test"
counted cargo test --workspace --locked

echo "--- fault injection at the storage seam (failpoints feature)"
counted cargo test -p flotilla-coordinator --locked --features failpoints --test failpoints
