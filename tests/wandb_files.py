"""Reading W&B run files back in tests, without network or the W&B service."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any


def read_wandb_run(path: str | os.PathLike) -> dict[str, Any]:
    """History rows and config of a W&B run file (`wandb/offline-run-*/run-*.wandb`), read locally.

    The file is a LevelDB-style log (32 KiB blocks of CRC-framed chunks, ':W&B' header) of
    `wandb_internal_pb2.Record` protobufs; this reads it without network or W&B service."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", raw[:7])
    if ident != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    block, pos, chunks, pending = 32768, 7, [], b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:  # zero padding up to the block end
            pos += left
            continue
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            chunks.append(data)
        elif kind == 2:  # first
            pending = data
        elif kind == 3:  # middle
            pending += data
        else:  # last
            chunks.append(pending + data)
            pending = b""
    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    for data in chunks:
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    return {"history": history, "config": config}
