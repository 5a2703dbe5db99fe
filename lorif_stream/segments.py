"""Is it the same data? What recognises the examples of an index segment (a build or an append).

A resumed or rerun segment continues only with the examples it started with. It is compared on
the ids of its committed rows and on content digests (SHA-256 of id + example) of a sample of its
examples, stored in the index when the segment starts; the first differing row is named.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import numpy as np
import torch

from .store import IndexWriter

# What a resumed or rerun segment is compared on (see task_mismatch): the ids of its committed rows
# (every one up to _ID_CHECK_ALL, else an evenly spaced sample) and content digests of a sample of
# its examples, stored (state record SEGMENT_CHECK_META) when the segment starts.
_ID_CHECK_ALL = 100_000
_ID_CHECK_SAMPLE = 10_000
_DIGEST_HEAD = 16
_DIGEST_SPREAD = 128
SEGMENT_CHECK_META = "segment_checks"  # state record: {first row of a segment: its digests}


def _digest_positions(n: int) -> list[int]:
    """Positions of a segment whose examples are digested: the first few, a geometric run (so a segment
    killed early still has several committed positions in its sample) and evenly spaced ones."""
    positions = set(range(min(n, _DIGEST_HEAD)))
    p = _DIGEST_HEAD
    while p < n:
        positions.add(p)
        p = p * 3 // 2
    positions.update(int(i) for i in np.linspace(0, n - 1, min(n, _DIGEST_SPREAD)).round())
    return sorted(positions)


def _feed(h, value, depth: int = 0) -> None:
    """Hash an example's content in a form that is the same in every process (no reprs of objects,
    no set or hash order); a type without such a form contributes its name only."""
    if depth > 32:
        h.update(b"<deep>")
    elif value is None or isinstance(value, (bool, int, float, complex)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(raw) + raw)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        h.update(b"b%d:" % len(raw) + raw)
    elif isinstance(value, torch.Tensor):
        t = value.detach()
        h.update(f"t{t.dtype}{tuple(t.shape)}:".encode())
        try:
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        except (RuntimeError, TypeError):  # sparse, nested, ...: dtype and shape only
            pass
    elif isinstance(value, (np.ndarray, np.generic)):
        a = np.asarray(value)
        h.update(f"a{a.dtype.str}{a.shape}:".encode())
        if a.dtype.hasobject:
            for item in a.flat:
                _feed(h, item, depth + 1)
        else:
            h.update(np.ascontiguousarray(a).tobytes())
    elif isinstance(value, Mapping):
        # keys in one order whatever the insertion order: by their own digests
        items = sorted(((_digest_of(k), v) for k, v in value.items()), key=lambda item: item[0])
        h.update(b"m%d:" % len(items))
        for key, v in items:
            h.update(key.encode())
            _feed(h, v, depth + 1)
    elif isinstance(value, (list, tuple)):
        h.update(b"l%d:" % len(value))
        for item in value:
            _feed(h, item, depth + 1)
    elif isinstance(value, (set, frozenset)):
        h.update(b"S%d:" % len(value) + "".join(sorted(_digest_of(v) for v in value)).encode())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(type(value).__qualname__.encode())
        for f in dataclasses.fields(value):
            _feed(h, f.name, depth + 1)
            _feed(h, getattr(value, f.name), depth + 1)
    else:
        h.update(f"<{type(value).__module__}.{type(value).__qualname__}>".encode())


def _digest_of(value) -> str:
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def example_digest(task, examples, i: int) -> str:
    example = examples[i]
    h = hashlib.sha256(str(task.example_id(example, i)).encode("utf-8", "surrogatepass") + b"\0")
    _feed(h, example)
    return h.hexdigest()[:16]


def segment_check(task, examples, n: int) -> dict:
    """What recognises a segment's data: digests (id + content) of a sample of its examples."""
    positions = _digest_positions(n)
    return {"count": n, "positions": positions, "digests": [example_digest(task, examples, p) for p in positions]}


def stored_check(writer: IndexWriter, segment: dict) -> dict:
    """The digests stored for `segment` ({} for an index from before them, or a mismatching record)."""
    check = (writer.get_state_meta(SEGMENT_CHECK_META) or {}).get(str(segment["start"])) or {}
    return check if check.get("count") == segment["count"] else {}


def store_check(writer: IndexWriter, segment: dict, check: dict, keep: tuple[int, ...] = ()) -> None:
    """Record a segment's digests, keyed by its first row; of the others only those starting at `keep`
    stay (the previous segment's: enough to recognise a rerun, without growing with every append).
    Written before the segment record of an append: a record never names digests it lacks."""
    meta = writer.get_state_meta(SEGMENT_CHECK_META) or {}
    meta = {k: v for k, v in meta.items() if k in {str(start) for start in keep}}
    meta[str(segment["start"])] = check
    writer.put_state({}, {SEGMENT_CHECK_META: meta})


def task_mismatch(writer: IndexWriter, segment: dict, task, examples, committed: int) -> str | None:
    """Where the task's examples disagree with the first `committed` rows of `segment`, or None: the
    ids stored in the index (all of them up to _ID_CHECK_ALL rows, else a sample) and the content
    digests the segment recorded when it started. Names the first differing row found."""
    start, kind = segment["start"], segment["kind"]
    found: list[tuple[int, str]] = []
    check = stored_check(writer, segment)
    for p, digest in zip(check.get("positions", []), check.get("digests", [])):
        if p >= committed:
            break
        if example_digest(task, examples, p) != digest:
            found.append((p, f"row {start + p} (id {str(task.example_id(examples[p], p))!r}): the task's example "
                             f"differs from the one the index's {kind} holds there"))
            break
    if committed <= _ID_CHECK_ALL:
        positions = list(range(committed))
    else:  # evenly spaced, and the last rows (a resume continues right after them)
        positions = sorted(set(np.linspace(0, committed - 1, _ID_CHECK_SAMPLE).round().astype(int).tolist())
                           | set(range(committed - 100, committed)))
    if found:
        positions = [p for p in positions if p <= found[0][0]]  # an id differing there is the better message
    with writer.reader().snapshot() as snap:
        if positions == list(range(len(positions))):
            stored = snap.ids(start, start + len(positions))
        else:
            stored = [snap.id_of(start + p) for p in positions]
    for p, have in zip(positions, stored):
        want = str(task.example_id(examples[p], p))
        if have != want:
            return f"row {start + p}: the index has id {have!r} but the task gives {want!r}"
    return found[0][1] if found else None
