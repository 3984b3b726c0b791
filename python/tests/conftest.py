"""Fixtures: a fake worker on a Unix socket, with FLOTILLA_SOCKET pointing at it."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakeworker import FakeWorker

# TensorFlow and Triton (which torch imports lazily) both bundle LLVM, and
# loading Triton after TensorFlow aborts the process: where both frameworks
# are installed, the torch and TF tests share one, so load Triton first.
try:
    import triton  # noqa: F401
except ImportError:
    pass


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeWorker]:
    # A short directory: Unix socket paths are limited to ~107 bytes.
    with tempfile.TemporaryDirectory(prefix="flotilla-") as directory:
        fake = FakeWorker(Path(directory))
        monkeypatch.setenv("FLOTILLA_SOCKET", fake.socket_path)
        yield fake
        fake.close()
