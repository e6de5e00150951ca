"""Index snapshots: a run's normalised vectors on local disk, so that a restart need not rebuild them.

One file per run, written atomically (temporary file, fsync, rename, fsync of the folder) and closed by a
SHA-256 of its content. A snapshot is only a cache of the store: reading one that is truncated, corrupt,
of another incarnation of the run, or of another dimension gives None, and the engine reconciles every
key's counters with the store (rebuilding from the store what does not match).

Layout: b"MEDSIDX1", header length (u64 little-endian), header JSON, float32 rows, SHA-256 of all before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np

from ..core.types import Group, KeyRows, MemoryKey, Snapshot

log = logging.getLogger(__name__)

MAGIC = b"MEDSIDX1"
_DIGEST = 32


def snapshot_path(folder: Path, run: str) -> Path:
    return folder / f"{run}.snapshot"


def write_snapshot(folder: Path, snapshot: Snapshot) -> Path:
    """Write atomically: readers see the old file or the new one, never a mix."""
    folder.mkdir(parents=True, exist_ok=True)
    header = json.dumps(
        {
            "run": snapshot.run,
            "created_at": snapshot.created_at,
            "dim": snapshot.dim,
            "keys": [[k.key.prompt_id, int(k.key.group), k.start, k.n] for k in snapshot.keys],
        }
    ).encode()
    path = snapshot_path(folder, snapshot.run)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    digest = hashlib.sha256()
    with tmp.open("wb") as f:
        for part in (MAGIC, struct.pack("<Q", len(header)), header):
            f.write(part)
            digest.update(part)
        for k in snapshot.keys:
            data = np.ascontiguousarray(k.rows, dtype="<f4").tobytes()
            f.write(data)
            digest.update(data)
        f.write(digest.digest())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_snapshot(folder: Path, run: str) -> Snapshot | None:
    """The run's snapshot, or None when there is none or it does not verify."""
    path = snapshot_path(folder, run)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read index snapshot %s (%s); rebuilding from the store", path, exc)
        return None
    try:
        return _parse(blob)
    except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError) as exc:
        log.warning("index snapshot %s is corrupt (%s); rebuilding from the store", path, exc)
        return None


def _parse(blob: bytes) -> Snapshot:
    if len(blob) < len(MAGIC) + 8 + _DIGEST or not blob.startswith(MAGIC):
        raise ValueError("not a snapshot")
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch")
    (size,) = struct.unpack_from("<Q", body, len(MAGIC))
    offset = len(MAGIC) + 8
    header = json.loads(body[offset : offset + size])
    dim = int(header["dim"])
    data = np.frombuffer(body, dtype="<f4", offset=offset + size)
    keys, row = [], 0
    for prompt_id, group, start, n in header["keys"]:
        count = n - start
        rows = data[row * dim : (row + count) * dim].reshape(count, dim)
        if len(rows) != count:
            raise ValueError("truncated rows")
        keys.append(KeyRows(MemoryKey(prompt_id, Group(group)), start, n, rows.astype(np.float32)))
        row += count
    if row * dim != len(data):
        raise ValueError("row count mismatch")
    return Snapshot(header["run"], float(header["created_at"]), dim, keys)


class SnapshotFolder:
    """The engine's `SnapshotStore`: one snapshot file per run in a local folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, run: str) -> Snapshot | None:
        return read_snapshot(self.folder, run)

    def write(self, snapshot: Snapshot) -> None:
        write_snapshot(self.folder, snapshot)
