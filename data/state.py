"""Compact, JSON-serialisable encoding of integer arrays for the data state.

Token buffers (packing buffer, shuffle buffer) are saved with the checkpoint as
``{"shape": [...], "dtype": "<u2", "z": "<base64 of zlib(little-endian bytes)>"}``,
in the narrowest integer type that holds the values: exact, plain JSON, and
about 1.5-3 bytes per token for a vocabulary below 65536.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np

_NARROW = ("<u1", "<u2", "<u4", "<i8")


def encode_array(a: np.ndarray) -> dict:
    a = np.asarray(a)
    dtype = "<i8"
    if a.size and int(a.min()) >= 0:
        top = int(a.max())
        dtype = next(d for d in _NARROW if d == "<i8" or top <= np.iinfo(np.dtype(d)).max)
    elif not a.size:
        dtype = "<u1"
    raw = np.ascontiguousarray(a.astype(dtype)).tobytes()
    return {"shape": list(a.shape), "dtype": dtype, "z": base64.b64encode(zlib.compress(raw, 1)).decode("ascii")}


def decode_array(d: dict) -> np.ndarray:
    raw = zlib.decompress(base64.b64decode(d["z"]))
    return np.frombuffer(raw, dtype=d.get("dtype", "<i8")).astype(np.int64).reshape(d["shape"])
