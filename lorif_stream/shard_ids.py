"""Example ids unique across shards: each shard's LMDB refuses a duplicate only among its own rows.

Every id is hashed (128-bit BLAKE2b) and dealt to rank `hash % world` in chunks, so that each rank
sorts only its share of the hashes (24 bytes a row for N / world rows, never the ids themselves)
and equal hashes meet on one rank. A 128-bit collision between different ids is not a concern
(about 1e-24 for a billion ids).
"""
from __future__ import annotations

import hashlib

import numpy as np

from .comm import Comm

_CHUNK = 1 << 16


def _hashes(ids: list[str]) -> np.ndarray:
    raw = b"".join(hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=16).digest() for i in ids)
    return np.frombuffer(raw, dtype="<u8").reshape(-1, 2)


def _chunks(sources):
    for start, snap in sources:
        for lo in range(0, snap.rows, _CHUNK):
            hi = min(snap.rows, lo + _CHUNK)
            yield np.arange(start + lo, start + hi, dtype=np.int64), _hashes(snap.ids(lo, hi))


def first_duplicate(comm: Comm, sources: list[tuple[int, object]]) -> tuple[str, int, int] | None:
    """The first id (by its later row) that two rows of the index share, as (id, row, earlier row),
    or None. `sources` are this rank's (global start row, snapshot of one shard) pairs; every rank
    of the job calls it; a rank that cannot read its ids fails it on every rank."""
    rounds = max(comm.gather(sum(-(-snap.rows // _CHUNK) for _, snap in sources)))
    chunks = _chunks(sources)
    kept_rows, kept_hashes = [np.zeros(0, np.int64)], [np.zeros((0, 2), np.uint64)]
    for _ in range(rounds):
        for part in comm.gather(comm.together(lambda: next(chunks, None))):
            if part is None:
                continue
            rows, hashes = part
            mine = hashes[:, 0] % np.uint64(comm.world) == np.uint64(comm.rank)
            kept_rows.append(rows[mine])
            kept_hashes.append(hashes[mine])
    rows, hashes = np.concatenate(kept_rows), np.concatenate(kept_hashes)
    order = np.lexsort((rows, hashes[:, 1], hashes[:, 0]))
    rows, hashes = rows[order], hashes[order]
    same = np.all(hashes[1:] == hashes[:-1], axis=1) if len(rows) > 1 else np.zeros(0, bool)
    found = None
    if same.any():
        # the earliest row of each run of equal hashes is where the id first appears
        starts = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), np.arange(len(rows)), 0))
        dup = np.nonzero(np.concatenate([[False], same]))[0]
        later = dup[np.argmin(rows[dup])]
        found = (int(rows[later]), int(rows[starts[later]]))
    candidates = [f for f in comm.gather(found) if f is not None]
    if not candidates:
        return None
    row, earlier = min(candidates)
    names = comm.together(lambda: [snap.id_of(row - start) for start, snap in sources if start <= row < start + snap.rows])
    name = next(n for part in comm.gather(names) for n in part)
    return name, row, earlier
