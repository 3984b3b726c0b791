"""Reads a Flotilla shard with the reference Python `safetensors` library and
checks it against what the Rust side says it wrote.

usage: check_safetensors.py SHARD EXPECTED_JSON EXPECTED_BIN
"""
import json
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

DTYPES = {"F32": np.float32, "I64": np.int64}


def main() -> int:
    shard, expected_json, expected_bin = sys.argv[1:4]
    expected = json.load(open(expected_json))
    raw = open(expected_bin, "rb").read()

    with safe_open(shard, framework="numpy") as f:
        assert f.metadata() == expected["metadata"], (f.metadata(), expected["metadata"])
        names = sorted(f.keys())
        want = sorted(t["name"] for t in expected["tensors"])
        assert names == want, (names, want)

    arrays = load_file(shard)
    for t in expected["tensors"]:
        a = arrays[t["name"]]
        assert a.dtype == DTYPES[t["dtype"]], (t["name"], a.dtype, t["dtype"])
        assert list(a.shape) == t["shape"], (t["name"], a.shape, t["shape"])
        start, end = t["offset"], t["offset"] + t["bytes"]
        assert a.tobytes() == raw[start:end], f"{t['name']}: values differ"
    print(f"ok: {len(arrays)} tensors, metadata {sorted(expected['metadata'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
