"""A minimal reader for W&B offline run files (wandb ships none), used to check what was logged.

The ``run-*.wandb`` file is a LevelDB-log-framed stream: a 7-byte file header, then 32 KiB blocks of
records, each with a 7-byte header (CRC32C, little-endian length, type: full/first/middle/last),
carrying serialised ``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """Yield every ``Record`` message in an offline run file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history(path: Path) -> list[dict]:
    """Every logged history row as a dict of key -> value."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def summary_and_config(path: Path) -> tuple[dict, dict]:
    """The final summary and the logged config of a run file."""
    summary, config = {}, {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "run":
            for item in record.run.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary, config


def wait_until_complete(path: Path, timeout: float = 60.0) -> Path:
    """Wait for wandb's background writer to finish the file (its ``exit`` record), then return it.

    ``wandb.finish`` returns before the offline file is fully written.
    """
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in records(path)):
                time.sleep(0.5)  # the records after the exit record (final summary) follow at once
                return path
        except Exception:  # noqa: BLE001 - a record may be half-written while we read
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{path} was not completed within {timeout}s")
