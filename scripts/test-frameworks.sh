#!/usr/bin/env bash
# The PyTorch and TensorFlow examples under --exec, killed and restored
# (tests/frameworks.rs), plus the Python client's adapter tests. Installs
# torch and tensorflow-cpu with pip into a virtual environment (about 6 GB:
# PyPI's torch wheel brings its CUDA libraries), so it is not part of the
# default test run (scripts/test.sh).
#   FLOTILLA_VENV   where the environment goes (default: .venv-frameworks)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FLOTILLA_VENV:-.venv-frameworks}"

echo "--- a virtual environment with torch and tensorflow-cpu in $venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check torch tensorflow-cpu numpy msgpack pytest
"$venv/bin/pip" install --quiet --disable-pip-version-check ./python
"$venv/bin/python" -c 'import torch, tensorflow as tf; print("torch", torch.__version__, "tensorflow", tf.__version__)'

echo "--- the Python client's tests, adapters included"
"$venv/bin/python" -m pytest -q python/tests

echo "--- PyTorch DDP and TensorFlow jobs: a worker SIGKILLed, the whole job restored, bit-identical ends; a changed model blocked"
FLOTILLA_PYTHON="$(realpath "$venv")/bin/python" cargo test --release --locked --test frameworks -- --ignored --nocapture --test-threads 1
