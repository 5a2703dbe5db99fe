"""verify: read every record of an index, check each, and name each one that is damaged.

Not in key order only: ids are checked both ways (row -> id -> row for every row, and every
reverse entry id -> row -> id), so a damaged key that LMDB's ordered walk would step over is
still found. LMDB itself can abort (an mdb.c assertion) or fault on damaged pages, so the CLI
runs the walk in a child process (`run_isolated`): a crash there becomes a report line.

The child writes JSON lines on stdout: start, progress, each error as found (so that those found
before a crash are kept), done.
"""
from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from . import format as fmt
from . import keys
from .codec import BlockDecoder
from .format import DB_FACTORS, DB_IDS, DB_META, DB_SKETCH, META_COMMIT, META_FORMAT_VERSION, META_LAYOUT, \
    META_MANIFEST, META_ROWS, META_SETTINGS, META_STATE_PREFIX, CorruptBlockError
from .integrity import crc32, header_problem, read_lmdb_header, unframe_json, unpack_checked_u64, unpack_id_value
from .lmdb_store import BlockBuffers, IndexReader, Snapshot, array_head, array_record, can_register, \
    check_pages, meta_record, state_key


@dataclass
class VerifyReport:
    rows: int
    blocks: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify_snapshot(snap: Snapshot, max_errors: int = 20, progress=None, on_error=None) -> VerifyReport:
    report = VerifyReport(rows=snap.rows)
    seen: set[str] = set()

    def err(msg: str) -> None:
        if msg in seen:  # the same damage seen from two sides (open and walk) is one line
            return
        seen.add(msg)
        if len(report.errors) < max_errors:
            report.errors.append(msg)
            if on_error is not None:
                on_error(msg)

    reader = snap._reader
    try:
        header = read_lmdb_header(reader.path)
        problem = header and header_problem(header)
        if problem:
            err(problem)
    except CorruptBlockError as e:
        err(str(e))
    for problem in reader.problems + snap.problems:
        err(problem)
    for section in (_verify_blocks, _verify_ids, _verify_meta, _verify_arrays):
        try:
            section(snap, report, err, progress)
        except lmdb.Error as e:
            # a damaged LMDB page ends this section's walk, not the others'
            err(f"{section.__name__[8:]}: LMDB cannot read on ({str(e).strip()}): the file is damaged")
        except CorruptBlockError as e:
            err(str(e))
    return report


# counted per id entry read, far more than it maps: id -> row lookups come in random key order, and
# each fault maps up to 64 KB around it (readahead on), so the walk releases the map every 1k entries
# (1M rows: peak file-backed RSS 166 MB instead of 307-376, no measurable time)
_ID_ENTRY_BYTES = 1 << 18


def _verify_blocks(snap: Snapshot, report: VerifyReport, err, progress) -> None:
    layers = snap.layout.layers
    rows = snap.rows
    buffers, decoder = BlockBuffers(snap.layout), BlockDecoder()
    expected = [0] * len(layers)
    layer0: dict[int, int] = {}  # first row -> rows of layer 0's blocks: the others must align
    for key, value in snap._txn.cursor(db=snap._reader._dbs[DB_FACTORS]):
        try:
            layer, first_row = keys.parse_factor_key(key)
        except CorruptBlockError as e:
            err(str(e))
            continue
        if layer >= len(layers):
            err(f"factors: block of layer number {layer} at row {first_row}, the index has {len(layers)} layers")
            continue
        name = layers[layer].name
        if first_row >= rows:
            err(f"layer {name!r}: block at row {first_row} is past the index's {rows} rows")
            continue
        report.blocks += 1
        try:
            snap.check_value(value, layer, first_row)
            n = snap.decode(layer, first_row, value, buffers, decoder)[0].shape[0]
        except CorruptBlockError as e:
            err(str(e))
            n = layer0.get(first_row, 0)  # keep checking contiguity with layer 0's row count
        if first_row != expected[layer]:
            err(f"layer {name!r}: rows {expected[layer]}..{first_row - 1} are missing" if first_row > expected[layer]
                else f"layer {name!r}: block at row {first_row} overlaps rows before {expected[layer]}")
        if layer == 0:
            layer0[first_row] = n
        elif layer0.get(first_row) != n:
            err(f"layer {name!r}: block at row {first_row} is not aligned with layer {layers[0].name!r}'s blocks")
        expected[layer] = max(expected[layer], first_row + n)
        if progress is not None:
            progress(n)
    for layer, shape in enumerate(layers):
        if expected[layer] != rows:
            err(f"layer {shape.name!r}: blocks cover rows 0..{expected[layer] - 1}, the index says {rows} rows"
                if expected[layer] else f"layer {shape.name!r}: no blocks, the index says {rows} rows")


def _verify_ids(snap: Snapshot, report: VerifyReport, err, progress) -> None:
    txn, db, rows, bounds = snap._txn, snap._reader._dbs[DB_IDS], snap.rows, snap._bounds
    duplicates_allowed = snap._reader.settings.get("allow_duplicate_ids") is True

    def id_at(row: int) -> str | None:
        key, record = keys.row_to_id_key(row), f"ids: id of row {row}"
        raw = bounds.check(txn.get(key, db=db), record)
        snap.note_read(_ID_ENTRY_BYTES)  # the id pages must not stay mapped: RSS would grow with N
        return None if raw is None else unpack_id_value(key, raw, record)

    max_key = snap._reader._env.max_key_size()

    def row_at(example_id: str) -> int | None:
        key = keys.id_to_row_key(example_id)
        if len(key) > max_key:  # too long to be a key: a damaged id of an older index (no checksum)
            return None
        record = f"ids: reverse entry of {example_id!r}"
        raw = bounds.check(txn.get(key, db=db), record)
        return None if raw is None else unpack_checked_u64(key, raw, record)

    # row -> id -> row, by lookup (not in stored key order: a damaged key must not be stepped over)
    for row in range(rows):
        try:
            example_id = id_at(row)
            if example_id is None:
                err(f"ids: row {row} has no id")
                continue
            back = row_at(example_id)
        except CorruptBlockError as e:
            err(str(e))
            continue
        if back is None:
            err(f"ids: id {example_id!r} of row {row} has no reverse entry")
        elif back != row and not (duplicates_allowed and back < row and _same(id_at, back, example_id)):
            err(f"ids: id {example_id!r} of row {row} maps back to row {back}")
    # id -> row -> id for every stored entry (stale or damaged reverse entries), and the counts
    n_rows = n_ids = 0
    for key, value in txn.cursor(db=db):
        key = bytes(key)
        snap.note_read(_ID_ENTRY_BYTES)
        try:
            if key[:1] == keys.ROW_PREFIX and len(key) == 9:
                n_rows += 1
                row = struct.unpack(">Q", key[1:])[0]
                if row >= rows:
                    err(f"ids: row {row} has an id, past the index's {rows} rows")
                else:
                    record = f"ids: id of row {row}"
                    unpack_id_value(key, bounds.check(value, record), record)  # its crc covers the key
            elif key[:1] == keys.ID_PREFIX:
                n_ids += 1
                example_id = key[1:].decode("utf-8", "replace")
                record = f"ids: reverse entry of {example_id!r}"
                row = unpack_checked_u64(key, bounds.check(value, record), record)
                held = id_at(row) if row < rows else None
                if held != example_id:
                    err(f"ids: reverse entry {example_id!r} -> row {row}, but row {row} holds "
                        + (f"id {held!r}" if row < rows else f"nothing (the index has {rows} rows)"))
            else:
                err(f"ids: record with an unknown key {key[:16]!r}")
        except CorruptBlockError as e:
            err(str(e))
    if n_rows != rows:
        err(f"ids: {n_rows} row ids stored for {rows} rows")
    if n_ids > rows or (n_ids != rows and not duplicates_allowed):
        err(f"ids: {n_ids} reverse entries for {rows} rows")


def _same(id_at, row: int, example_id: str) -> bool:
    try:
        return id_at(row) == example_id
    except CorruptBlockError:
        return False


def _verify_meta(snap: Snapshot, report: VerifyReport, err, progress) -> None:
    required = {META_FORMAT_VERSION, META_LAYOUT, META_SETTINGS, META_ROWS}
    for key, value in snap._txn.cursor(db=snap._reader._dbs[DB_META]):
        key = bytes(key)
        record = meta_record(key)
        required.discard(key)
        try:
            value = snap._bounds.check(value, record)
            if key == META_FORMAT_VERSION:
                if not bytes(value).isdigit():
                    err(f"{record} is not a number ({bytes(value)[:20]!r})")
            elif key in (META_LAYOUT, META_SETTINGS, META_MANIFEST) or key.startswith(META_STATE_PREFIX):
                unframe_json(value, record, key)
            elif key in (META_ROWS, META_COMMIT):
                unpack_checked_u64(key, value, record)
            else:
                err(f"meta: unknown record {key[:40]!r} (a damaged key?)")
        except CorruptBlockError as e:
            err(str(e))
    for key in sorted(required):
        err(f"{meta_record(key)} is missing")
    manifest = _manifest(snap, err)
    if manifest is not None:
        stored = {bytes(k)[len(META_STATE_PREFIX):].decode("utf-8", "replace")
                  for k, _ in snap._txn.cursor(db=snap._reader._dbs[DB_META]) if bytes(k).startswith(META_STATE_PREFIX)}
        for name in sorted(set(manifest["state"]) - stored):
            err(f"{meta_record(state_key(name))} is missing, yet the index's manifest lists it (a damaged key)")
        for name in sorted(stored - set(manifest["state"])):
            err(f"{meta_record(state_key(name))} is not in the index's manifest (a damaged key?)")


def _manifest(snap: Snapshot, err) -> dict | None:
    try:
        return snap.manifest()
    except CorruptBlockError as e:
        err(str(e).split(": ", 1)[1] if str(e).startswith("index ") else str(e))
        return None


def _verify_arrays(snap: Snapshot, report: VerifyReport, err, progress) -> None:
    heads: dict[str, bytes] = {}
    chunks: dict[str, dict[int, memoryview]] = {}
    for key, value in snap._txn.cursor(db=snap._reader._dbs[DB_SKETCH]):
        key = bytes(key)
        name, sep, tail = key.partition(b"\x00")
        text = name.decode("utf-8", "replace")
        if sep and tail == b"head":
            try:
                heads[text] = bytes(snap._bounds.check(value, f"{array_record(text)} head"))
            except CorruptBlockError as e:
                err(str(e))
        elif sep and len(tail) == 4:
            chunks.setdefault(text, {})[struct.unpack(">I", tail)[0]] = value
        else:
            err(f"sketch: record with an unknown key {key[:40]!r} (a damaged key?)")
    for name, raw in heads.items():
        record = array_record(name)
        held = chunks.pop(name, {})
        try:
            head = array_head(name, raw)
        except CorruptBlockError as e:
            err(str(e))
            continue
        size = 0
        for i in range(head["chunks"]):
            chunk = held.pop(i, None)
            if chunk is None:
                err(f"{record} chunk {i} is missing")
                continue
            try:
                snap._bounds.check(chunk, f"{record} chunk {i}")
            except CorruptBlockError as e:
                err(str(e))
                continue
            size += len(chunk)
            if head["crc32"] is not None and crc32(chunk) != head["crc32"][i]:
                err(f"{record} chunk {i}: checksum mismatch")
        want = 1
        for d in head["shape"]:
            want *= d
        if size != want * head["dtype"].itemsize and not any(f"{record} chunk" in e for e in report.errors):
            err(f"{record}: holds {size} bytes, its head says {want * head['dtype'].itemsize}")
        for i in sorted(held):
            err(f"{record} chunk {i} is not in its head (a damaged key?)")
    for name in sorted(chunks):
        err(f"{array_record(name)}: chunks without a head (a damaged key?)")
    manifest = _manifest(snap, err)
    if manifest is not None:
        for name in sorted(set(manifest["arrays"]) - set(heads)):
            err(f"{array_record(name)} is missing, yet the index's manifest lists it (a damaged key)")
        for name in sorted(set(heads) - set(manifest["arrays"])):
            err(f"{array_record(name)} is not in the index's manifest (a damaged key?)")


# ------------------------------------------------------------------------------ isolation

_OPEN_ERRORS = {cls.__name__: cls for cls in (fmt.NotAnIndexError, fmt.UnsupportedVersionError, fmt.IndexCorruptError,
                                              fmt.WriterBusyError, fmt.IndexWriteError)}


# The child imports this package's store only: a stand-in `lorif_stream` package object keeps
# lorif_stream/__init__ (torch, the model code) from loading, which would triple its start-up time.
_CHILD = """if True:
    import sys, types
    package = types.ModuleType("lorif_stream")
    package.__path__ = [sys.argv[1]]
    sys.modules["lorif_stream"] = package
    from lorif_stream.store.verify import _child
    _child(sys.argv[2], int(sys.argv[3]))
"""


def run_isolated(index, max_errors: int = 20, progress=None) -> VerifyReport:
    """Verify `index` in a child process. `progress(total)` returns a callable taking row counts.

    Errors opening the index (not an index, version, truncated) are raised as in this process; a
    child killed by a signal (an LMDB assertion, a fault on a damaged page) is a report line."""
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(Path(__file__).resolve().parents[1]), str(index),
                                 str(max_errors)], stdout=subprocess.PIPE, stderr=stderr, text=True)
        report, done, bar = VerifyReport(rows=0), False, None
        try:
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "start" in msg:
                    report.rows = msg["start"]["rows"]
                    if progress is not None:
                        bar = progress(msg["start"]["rows"] * msg["start"]["layers"])
                elif "progress" in msg and bar is not None:
                    bar(msg["progress"])
                elif "error" in msg:
                    report.errors.append(msg["error"])
                elif "done" in msg:
                    report.blocks, done = msg["done"]["blocks"], True
                elif "raise" in msg:
                    proc.wait()
                    raise _OPEN_ERRORS.get(msg["raise"], fmt.CorruptBlockError)(msg["message"])
        finally:
            rc = proc.wait()
        stderr.seek(0)
        lines = [l.strip() for l in stderr.read().splitlines() if l.strip()]
    for line in lines:
        if line.startswith("[lorif-stream]"):  # the child's notices are the user's too
            print(line, file=sys.stderr, flush=True)
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else "?"
        said = next((l for l in lines if "mdb.c" in l or "Assertion" in l), None)
        report.errors.append(f"the LMDB walk crashed with signal {-rc} ({name}{': ' + said if said else ''}): "
                             f"the file is damaged")
    elif not done:
        last = next((l for l in reversed(lines) if not l.startswith("[lorif-stream]")), f"exit status {rc}")
        report.errors.append(f"the verify walk failed: {last}")
    return report


def _child(index: str, max_errors: int) -> None:
    out = sys.stdout

    def emit(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    try:
        with IndexReader(index, strict=False) as reader, reader.snapshot(strict=False) as snap:
            emit({"start": {"rows": snap.rows, "layers": len(reader.layout.layers)}})
            pending, last = 0, time.monotonic()

            def progress(n: int) -> None:
                nonlocal pending, last
                pending += n
                if time.monotonic() - last >= 0.1:
                    emit({"progress": pending})
                    pending, last = 0, time.monotonic()

            report = verify_snapshot(snap, max_errors=max_errors, progress=progress, on_error=lambda m: emit({"error": m}))
            if pending:
                emit({"progress": pending})
            emit({"done": {"blocks": report.blocks}})
    except fmt.IndexError_ as e:
        if not isinstance(e, fmt.CorruptBlockError) or "is truncated" in str(e) or "LMDB's" in str(e):
            emit({"raise": type(e).__name__, "message": str(e)})
            return
        # damage the opening itself ran into (the layout, LMDB pages of the metadata): say what
        # the page walk finds besides, then that; nothing else can be checked
        for problem in _page_problems(Path(index)):
            emit({"error": problem})
        emit({"error": str(e)})
        emit({"done": {"blocks": 0}})


def _page_problems(path: Path) -> list[str]:
    problems: list[str] = []
    try:
        env = lmdb.open(str(path), readonly=True, lock=can_register(path), max_dbs=8)
    except lmdb.Error:
        return problems
    try:
        check_pages(env, path, problems, None)
    except fmt.IndexError_:
        pass
    finally:
        env.close()
    return problems

