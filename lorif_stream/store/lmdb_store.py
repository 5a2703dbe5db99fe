"""The index: one LMDB environment holding factor blocks, ids, metadata and curvature state.

One writer, many readers. Every write is one transaction that also moves the committed row
count, so a crash (even SIGKILL) leaves the index exactly at its last committed block. Readers
open the environment read-only but *registered* (lock=True): an unregistered reader would be
invisible to the writer, which could then recycle the pages under it during an append.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import lmdb
import numpy as np

from . import keys
from .codec import BlockDecoder, BlockEncoder, NonFiniteError, parse_header
from .pages import release_pages
from .format import (
    DATA_FILE,
    DB_FACTORS,
    DB_IDS,
    DB_META,
    DB_SKETCH,
    FORMAT_VERSION,
    META_FORMAT_VERSION,
    META_LAYOUT,
    META_ROWS,
    META_SETTINGS,
    SUPPORTED_VERSIONS,
    CorruptBlockError,
    IndexWriteError,
    NotAnIndexError,
    UnsupportedVersionError,
    WriteRefusedError,
)
from .layout import IndexLayout

DURABILITY = {
    # fsync at every commit: a committed block survives power loss.
    "sync": dict(sync=True, metasync=True),
    # no fsync per commit: survives a crash of the process (SIGKILL, OOM) but not of the OS;
    # the writer fsyncs once when it closes.
    "nosync": dict(sync=False, metasync=False),
}
DEFAULT_MAP_SIZE = 1 << 30
_MAX_DBS = 8
_ARRAY_CHUNK = 64 << 20  # large arrays (eigenvectors) go in chunks, not one giant value


def _check_index_dir(path: Path) -> None:
    if not path.exists():
        raise NotAnIndexError(f"no index at {path} (the path does not exist)")
    if not path.is_dir() or not (path / DATA_FILE).exists():
        raise NotAnIndexError(f"{path} is not a lorif-stream index (no {DATA_FILE} inside)")


def _open_env(path: Path, readonly: bool, map_size: int, durability: str = "sync") -> lmdb.Environment:
    if durability not in DURABILITY:
        raise ValueError(f"durability {durability!r} is not one of {sorted(DURABILITY)}")
    try:
        return lmdb.open(
            str(path), subdir=True, readonly=readonly, lock=True, max_dbs=_MAX_DBS,
            map_size=map_size, readahead=False, meminit=False, max_readers=256,
            **DURABILITY[durability],
        )
    except lmdb.Error as e:
        raise NotAnIndexError(f"{path} is not a readable lorif-stream index ({e})") from None


def _read_header_meta(env: lmdb.Environment, path: Path) -> tuple[IndexLayout, dict]:
    try:
        meta = env.open_db(DB_META, create=False)
    except lmdb.Error:
        raise NotAnIndexError(f"{path} is an LMDB environment but not a lorif-stream index (no meta db)") from None
    with env.begin(db=meta) as txn:
        version = txn.get(META_FORMAT_VERSION)
        layout = txn.get(META_LAYOUT)
        settings = txn.get(META_SETTINGS)
    if version is None or layout is None:
        raise NotAnIndexError(f"{path} is not a lorif-stream index (no format version in its metadata)")
    v = int(version)
    if v not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            f"index {path} has format version {v}; this lorif-stream reads versions {list(SUPPORTED_VERSIONS)}"
        )
    return IndexLayout.from_dict(json.loads(layout)), json.loads(settings or b"{}")


def _put_array(txn, db, name: str, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    raw = arr.view(np.uint8).reshape(-1)
    n_chunks = max(1, -(-raw.size // _ARRAY_CHUNK))
    head = {"dtype": arr.dtype.str, "shape": list(arr.shape), "chunks": n_chunks}
    prefix = name.encode() + b"\x00"
    _delete_array(txn, db, name)
    txn.put(prefix + b"head", json.dumps(head).encode(), db=db)
    for i in range(n_chunks):
        txn.put(prefix + struct.pack(">I", i), raw[i * _ARRAY_CHUNK : (i + 1) * _ARRAY_CHUNK].tobytes(), db=db)


def _delete_array(txn, db, name: str) -> None:
    prefix = name.encode() + b"\x00"
    head = txn.get(prefix + b"head", db=db)
    if head is None:
        return
    for i in range(json.loads(bytes(head))["chunks"]):
        txn.delete(prefix + struct.pack(">I", i), db=db)
    txn.delete(prefix + b"head", db=db)


def _get_array(txn, db, name: str) -> np.ndarray | None:
    prefix = name.encode() + b"\x00"
    head = txn.get(prefix + b"head", db=db)
    if head is None:
        return None
    head = json.loads(bytes(head))
    out = np.empty(int(np.prod(head["shape"])) * np.dtype(head["dtype"]).itemsize, np.uint8)
    pos = 0
    for i in range(head["chunks"]):
        chunk = txn.get(prefix + struct.pack(">I", i), db=db)
        if chunk is None:
            raise CorruptBlockError(f"array {name!r}: chunk {i} is missing")
        chunk = memoryview(chunk)
        out[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
        pos += len(chunk)
    if pos != out.size:
        raise CorruptBlockError(f"array {name!r}: holds {pos} bytes, its header says {out.size}")
    return out.view(np.dtype(head["dtype"])).reshape(head["shape"])


# ------------------------------------------------------------------------------ writer

_POOL = None


def _encode_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="lorif-encode")
    return _POOL



@dataclass
class PendingBlock:
    """Encoded factors of rows [first_row, first_row + rows) of every layer, not yet committed."""

    first_row: int
    rows: int
    values: list[bytes]
    ids: list[str]

    @property
    def nbytes(self) -> int:
        return sum(len(v) for v in self.values)


class IndexWriter:
    """The one writer of an index. `encode` may run in several threads; `commit` is serialized."""

    def __init__(self, path: str | os.PathLike, env: lmdb.Environment, layout: IndexLayout, settings: dict):
        self.path = Path(path)
        self.layout = layout
        self.settings = settings
        self._env = env
        self._dbs = {name: env.open_db(name) for name in (DB_FACTORS, DB_META, DB_IDS, DB_SKETCH)}
        self._local = threading.local()
        self._commit_lock = threading.Lock()
        with env.begin(db=self._dbs[DB_META]) as txn:
            self.rows = keys.unpack_row(txn.get(META_ROWS))

    # -- opening
    @classmethod
    def create(cls, path, layout: IndexLayout, settings: dict, *, map_size: int = DEFAULT_MAP_SIZE,
               durability: str = "sync") -> "IndexWriter":
        """Create a new, empty index at `path` (a directory that must not already hold one)."""
        path = Path(path)
        if (path / DATA_FILE).exists():
            raise WriteRefusedError(f"{path} already holds an index; open it instead of creating one")
        path.mkdir(parents=True, exist_ok=True)
        env = _open_env(path, readonly=False, map_size=map_size, durability=durability)
        with env.begin(write=True) as txn:
            meta = env.open_db(DB_META, txn=txn)
            for name in (DB_FACTORS, DB_IDS, DB_SKETCH):
                env.open_db(name, txn=txn)
            txn.put(META_FORMAT_VERSION, str(FORMAT_VERSION).encode(), db=meta)
            txn.put(META_LAYOUT, json.dumps(layout.to_dict()).encode(), db=meta)
            txn.put(META_SETTINGS, json.dumps(settings, sort_keys=True).encode(), db=meta)
            txn.put(META_ROWS, keys.pack_row(0), db=meta)
        return cls(path, env, layout, settings)

    @classmethod
    def open(cls, path, *, durability: str = "sync") -> "IndexWriter":
        """Open an existing index for writing (resume a build, append rows, store curvature)."""
        path = Path(path)
        _check_index_dir(path)
        env = _open_env(path, readonly=False, map_size=DEFAULT_MAP_SIZE, durability=durability)
        try:
            layout, settings = _read_header_meta(env, path)
        except Exception:
            env.close()
            raise
        return cls(path, env, layout, settings)

    def close(self) -> None:
        if self._env is not None:
            self._env.sync(True)
            self._env.close()
            self._env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- writing factor blocks
    def encode(self, first_row: int, factors: Sequence[tuple[np.ndarray, np.ndarray]], ids: Sequence[str]) -> PendingBlock:
        """Check and encode one block: `factors[l] = (L, R)` float32, L (n, d_out, c), R (n, d_in, c)."""
        n = len(ids)
        last = first_row + n - 1
        if len(factors) != len(self.layout.layers):
            raise WriteRefusedError(f"rows {first_row}..{last}: got factors for {len(factors)} layers, index has {len(self.layout.layers)}")
        if n == 0:
            raise WriteRefusedError(f"empty block at row {first_row}")
        for layer, (L, R) in zip(self.layout.layers, factors):
            want_l, want_r = (n, layer.d_out, self.layout.c), (n, layer.d_in, self.layout.c)
            if tuple(L.shape) != want_l or tuple(R.shape) != want_r:
                raise WriteRefusedError(
                    f"layer {layer.name!r} rows {first_row}..{last}: factor shapes {tuple(L.shape)}/{tuple(R.shape)} "
                    f"do not match the index's {want_l}/{want_r}"
                )
            if L.dtype != np.float32 or R.dtype != np.float32:
                raise WriteRefusedError(f"layer {layer.name!r} rows {first_row}..{last}: factors must be float32, got {L.dtype}/{R.dtype}")

        def encode_layer(item):
            layer, (L, R) = item
            try:
                return self._encoder().encode(L, R)
            except NonFiniteError as e:
                raise WriteRefusedError(f"layer {layer.name!r}: non-finite value in {e.which} of row "
                                        f"{first_row + e.first_bad_row} (block rows {first_row}..{last})") from None

        items = list(zip(self.layout.layers, factors))
        # layers encode in parallel: zstd and the numba shuffle release the GIL
        values = list(_encode_pool().map(encode_layer, items)) if len(items) > 1 else [encode_layer(items[0])]
        return PendingBlock(first_row, n, values, [str(i) for i in ids])

    def commit(self, block: PendingBlock, *, allow_duplicate_ids: bool = False) -> None:
        """Write one encoded block of every layer, its ids and the new row count in one transaction."""
        with self._commit_lock:
            if block.first_row != self.rows:
                kind = "gap" if block.first_row > self.rows else "overlap"
                raise WriteRefusedError(
                    f"block at rows {block.first_row}..{block.first_row + block.rows - 1} would leave a {kind}: "
                    f"the index has {self.rows} committed rows, the next block must start at row {self.rows}"
                )
            self._write(lambda txn: self._put_block(txn, block, allow_duplicate_ids))
            self.rows += block.rows

    def append(self, first_row: int, factors, ids, *, allow_duplicate_ids: bool = False) -> None:
        self.commit(self.encode(first_row, factors, ids), allow_duplicate_ids=allow_duplicate_ids)

    def _put_block(self, txn, block: PendingBlock, allow_duplicate_ids: bool) -> None:
        fdb, idb, mdb = self._dbs[DB_FACTORS], self._dbs[DB_IDS], self._dbs[DB_META]
        for layer_idx, value in enumerate(block.values):
            txn.put(keys.factor_key(layer_idx, block.first_row), value, db=fdb)
        # putmulti: two C-level batch inserts instead of 2·rows Python calls (a third of commit time)
        rows = range(block.first_row, block.first_row + block.rows)
        encoded_ids = [example_id.encode("utf-8") for example_id in block.ids]
        if len(keys.ID_PREFIX) + max(map(len, encoded_ids)) > self._env.max_key_size():
            longest = max(range(block.rows), key=lambda j: len(encoded_ids[j]))
            raise WriteRefusedError(f"example id of row {block.first_row + longest} is {len(encoded_ids[longest])} bytes "
                                    f"long; ids must be at most {self._env.max_key_size() - len(keys.ID_PREFIX)} bytes "
                                    f"(UTF-8): {block.ids[longest][:40]!r}...")
        with txn.cursor(db=idb) as cur:
            cur.putmulti([(keys.row_to_id_key(row), eid) for row, eid in zip(rows, encoded_ids)], append=True)
            _, added = cur.putmulti([(keys.ID_PREFIX + eid, keys.pack_row(row)) for row, eid in zip(rows, encoded_ids)],
                                    overwrite=False)
        if added != block.rows and not allow_duplicate_ids:
            raise self._duplicate_id_error(txn, idb, block)
        txn.put(META_ROWS, keys.pack_row(block.first_row + block.rows), db=mdb)

    @staticmethod
    def _duplicate_id_error(txn, idb, block: PendingBlock) -> WriteRefusedError:
        """Name the first id of `block` that an earlier row (of the index or the block) holds."""
        first_seen: dict[str, int] = {}
        for row, example_id in enumerate(block.ids, start=block.first_row):
            if example_id in first_seen:
                return WriteRefusedError(f"example id {example_id!r} (row {row}) is already in the index at row "
                                         f"{first_seen[example_id]} (this block)")
            first_seen[example_id] = row
            held = keys.unpack_row(txn.get(keys.id_to_row_key(example_id), db=idb))
            if held != row:
                return WriteRefusedError(f"example id {example_id!r} (row {row}) is already in the index at row {held}")
        raise AssertionError("putmulti reported a duplicate id that is not there")

    # -- metadata and curvature state
    def update_settings(self, settings: dict) -> None:
        blob = json.dumps(settings, sort_keys=True).encode()
        self._write(lambda txn: txn.put(META_SETTINGS, blob, db=self._dbs[DB_META]))
        self.settings = settings

    def put_state(self, arrays: dict[str, np.ndarray], meta: dict[str, object] | None = None,
                  drop: Sequence[str] = ()) -> None:
        """Store named arrays (sketches, eigenpairs) and JSON metadata atomically in one transaction."""

        def write(txn):
            for name in drop:
                _delete_array(txn, self._dbs[DB_SKETCH], name)
            for name, arr in arrays.items():
                _put_array(txn, self._dbs[DB_SKETCH], name, arr)
            for name, value in (meta or {}).items():
                txn.put(b"state:" + name.encode(), json.dumps(value).encode(), db=self._dbs[DB_META])

        with self._commit_lock:
            self._write(write)

    def get_state_meta(self, name: str):
        with self._env.begin(db=self._dbs[DB_META]) as txn:
            raw = txn.get(b"state:" + name.encode())
        return None if raw is None else json.loads(raw)

    def get_array(self, name: str) -> np.ndarray | None:
        with self._env.begin() as txn:
            return _get_array(txn, self._dbs[DB_SKETCH], name)

    def reader(self) -> "IndexReader":
        """A reader sharing this writer's environment (LMDB allows one env per process per file)."""
        return IndexReader(self.path, _env=self._env, _layout=self.layout, _settings=self.settings)

    # -- transactions with map growth
    def _write(self, fn) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                # the failed transaction is aborted; no transaction is open while the map grows
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.Error as e:
                # disk full, file-size limit, I/O error: the transaction is aborted and every block
                # committed before it stays readable, so the same command resumes once fixed
                raise IndexWriteError(f"writing to index {self.path} failed ({e}): is the disk full? Blocks "
                                      f"committed before are kept; rerun the same command to resume") from None

    def _encoder(self) -> BlockEncoder:
        enc = getattr(self._local, "encoder", None)
        if enc is None:
            enc = self._local.encoder = BlockEncoder(self.layout.dtype, self.layout.zstd_level)
        return enc


# ------------------------------------------------------------------------------ reader


class BlockBuffers:
    """Reusable fp32 decode targets for one block of every layer (L and R per layer)."""

    def __init__(self, layout: IndexLayout, rows: int | None = None):
        self._layout = layout
        self.rows = 0
        self.ensure(rows or layout.block_size)

    def ensure(self, rows: int) -> None:
        """Grow (never shrink) so that a block of `rows` rows fits; blocks larger than block_size are rare."""
        if rows <= self.rows:
            return
        self.rows = rows
        self.L = [np.empty((rows, l.d_out, self._layout.c), np.float32) for l in self._layout.layers]
        self.R = [np.empty((rows, l.d_in, self._layout.c), np.float32) for l in self._layout.layers]


@dataclass
class VerifyReport:
    rows: int
    blocks: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class Snapshot:
    """One consistent view of the index (one LMDB read transaction, zero-copy buffers)."""

    def __init__(self, reader: "IndexReader", txn):
        self._reader = reader
        self._txn = txn
        self.layout = reader.layout
        self.rows = keys.unpack_row(txn.get(META_ROWS, db=reader._dbs[DB_META]))

    # -- raw encoded values (zero-copy memoryviews, valid while the snapshot is open)
    def layer_values(self, layer: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, memoryview]]:
        """(first_row, encoded block) of one layer's blocks overlapping rows [start, stop), in row order."""
        stop = self.rows if stop is None else min(stop, self.rows)
        if start >= stop:
            return
        cur = self._txn.cursor(db=self._reader._dbs[DB_FACTORS])
        if not self._seek_block(cur, layer, start):
            return
        for key, value in cur:
            layer_idx, first_row = keys.parse_factor_key(key)
            if layer_idx != layer or first_row >= stop:  # _seek_block never lands before `layer`
                break
            yield first_row, value

    @staticmethod
    def _seek_block(cur, layer: int, row: int) -> bool:
        """Position `cur` on the first block of `layer` that holds a row >= `row`."""
        found = cur.set_range(keys.factor_key(layer, row))
        if found and keys.parse_factor_key(cur.key()) == (layer, row):
            return True
        # `row` may fall inside the block just before: step back when that block is ours and holds it
        if cur.prev() if found else cur.last():
            prev_layer, prev_first = keys.parse_factor_key(cur.key())
            if prev_layer == layer and prev_first + parse_header(cur.value()).rows > row:
                return True
            return cur.next()
        return found and cur.first()

    def value_at(self, layer: int, first_row: int) -> memoryview:
        value = self._txn.get(keys.factor_key(layer, first_row), db=self._reader._dbs[DB_FACTORS])
        if value is None:
            name = self.layout.layers[layer].name
            raise CorruptBlockError(f"layer {name!r}: no block starts at row {first_row} (index blocks misaligned)")
        return value

    # -- decoded blocks
    def blocks(self, start: int = 0, stop: int | None = None, layers: Sequence[int] | None = None,
               buffers: BlockBuffers | None = None, decoder: BlockDecoder | None = None
               ) -> Iterator[tuple[int, int, list[tuple[np.ndarray, np.ndarray]]]]:
        """Yield (first_row, rows, [(L, R) per requested layer]) for rows [start, stop), decoded into
        `buffers` (reused: each yielded block is overwritten by the next)."""
        layers = list(range(len(self.layout.layers))) if layers is None else list(layers)
        buffers = buffers or BlockBuffers(self.layout)
        decoder = decoder or BlockDecoder()
        stop = self.rows if stop is None else min(stop, self.rows)
        for first_row, value0 in self.layer_values(layers[0], start, stop):
            out = []
            for j, layer in enumerate(layers):
                value = value0 if j == 0 else self.value_at(layer, first_row)
                out.append(self.decode(layer, first_row, value, buffers, decoder))
            n = out[0][0].shape[0]
            lo, hi = max(start, first_row), min(stop, first_row + n)
            yield lo, hi - lo, [(L[lo - first_row : hi - first_row], R[lo - first_row : hi - first_row]) for L, R in out]

    def decode(self, layer: int, first_row: int, value, buffers: BlockBuffers, decoder: BlockDecoder):
        shape = self.layout.layers[layer]
        try:
            h = parse_header(value)
            buffers.ensure(h.rows)
            if (h.d_out, h.d_in, h.c, h.dtype) != (shape.d_out, shape.d_in, self.layout.c, self.layout.dtype):
                raise CorruptBlockError(
                    f"block shape d_out={h.d_out} d_in={h.d_in} c={h.c} {h.dtype} differs from the layout's"
                )
            decoder.decode_into(value, buffers.L[layer], buffers.R[layer])
            release_pages(value)
        except CorruptBlockError as e:
            raise CorruptBlockError(f"layer {shape.name!r} block at row {first_row}: {e}") from None
        return buffers.L[layer][: h.rows], buffers.R[layer][: h.rows]

    def row(self, row: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Factors (L, R) of one example for every layer (copies)."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} is outside the index's {self.rows} rows")
        for _, n, factors in self.blocks(row, row + 1):
            return [(L[0].copy(), R[0].copy()) for L, R in factors]
        raise CorruptBlockError(f"row {row}: no block holds it")

    # -- ids
    def id_of(self, row: int) -> str:
        raw = self._txn.get(keys.row_to_id_key(row), db=self._reader._dbs[DB_IDS])
        if raw is None or row >= self.rows:
            raise IndexError(f"row {row} is outside the index's {self.rows} rows")
        return bytes(raw).decode("utf-8")

    def ids(self, start: int, stop: int) -> list[str]:
        cur = self._txn.cursor(db=self._reader._dbs[DB_IDS])
        out = []
        if cur.set_key(keys.row_to_id_key(start)):
            for key, value in cur:
                if key[:1] != keys.ROW_PREFIX or len(out) >= stop - start:
                    break
                out.append(bytes(value).decode("utf-8"))
        return out

    def row_of(self, example_id: str) -> int | None:
        raw = self._txn.get(keys.id_to_row_key(example_id), db=self._reader._dbs[DB_IDS])
        if raw is None:
            return None
        row = keys.unpack_row(raw)
        return row if row < self.rows else None

    # -- state
    def array(self, name: str) -> np.ndarray | None:
        return _get_array(self._txn, self._reader._dbs[DB_SKETCH], name)

    def state_meta(self, name: str):
        raw = self._txn.get(b"state:" + name.encode(), db=self._reader._dbs[DB_META])
        return None if raw is None else json.loads(bytes(raw))

    # -- integrity
    def verify(self, max_errors: int = 20, progress=None) -> VerifyReport:
        report = VerifyReport(rows=self.rows)
        buffers, decoder = BlockBuffers(self.layout), BlockDecoder()
        boundaries: list[tuple[int, int]] = []

        def err(msg):
            if len(report.errors) < max_errors:
                report.errors.append(msg)

        for layer_idx, shape in enumerate(self.layout.layers):
            expected = 0
            for j, (first_row, value) in enumerate(self.layer_values(layer_idx, 0, self.rows)):
                report.blocks += 1
                try:
                    n = self.decode(layer_idx, first_row, value, buffers, decoder)[0].shape[0]
                except CorruptBlockError as e:
                    err(str(e))
                    # keep checking contiguity with the row count layer 0 had for this block
                    n = boundaries[j][1] if j < len(boundaries) else 0
                if first_row != expected:
                    err(f"layer {shape.name!r}: rows {expected}..{first_row - 1} are missing" if first_row > expected
                        else f"layer {shape.name!r}: block at row {first_row} overlaps rows before {expected}")
                if layer_idx == 0:
                    boundaries.append((first_row, n))
                elif j >= len(boundaries) or boundaries[j][0] != first_row:
                    err(f"layer {shape.name!r}: block at row {first_row} is not aligned with layer 0's blocks")
                expected = first_row + n
                if progress is not None:
                    progress(n)
            if expected != self.rows:
                err(f"layer {shape.name!r}: blocks cover rows 0..{expected - 1}, the index says {self.rows} rows")
        ids = self.ids(0, self.rows)
        if len(ids) != self.rows:
            err(f"ids: {len(ids)} row ids stored for {self.rows} rows")
        for row, example_id in enumerate(ids):
            back = self.row_of(example_id)
            if back is None:
                err(f"ids: id {example_id!r} of row {row} has no reverse entry")
            elif back != row and self._reader.settings.get("allow_duplicate_ids") is not True:
                err(f"ids: id {example_id!r} of row {row} maps back to row {back}")
        return report


class IndexReader:
    """Read-only access to an index; take a `snapshot()` for a consistent view."""

    def __init__(self, path: str | os.PathLike, *, _env=None, _layout=None, _settings=None):
        self.path = Path(path)
        self._owns_env = _env is None
        if _env is None:
            _check_index_dir(self.path)
            _env = _open_env(self.path, readonly=True, map_size=DEFAULT_MAP_SIZE)
            try:
                _layout, _settings = _read_header_meta(_env, self.path)
            except Exception:
                _env.close()
                raise
        self._env = _env
        self.layout: IndexLayout = _layout
        self.settings: dict = _settings
        self._dbs = {name: _env.open_db(name, create=False) for name in (DB_FACTORS, DB_META, DB_IDS, DB_SKETCH)}

    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        txn = self._begin()
        try:
            yield Snapshot(self, txn)
        finally:
            txn.abort()

    def _begin(self):
        try:
            return self._env.begin(buffers=True)
        except lmdb.MapResizedError:
            # the writer grew the map since we opened: adopt the new size and retry once
            self._env.set_mapsize(0)
            return self._env.begin(buffers=True)

    @property
    def rows(self) -> int:
        with self.snapshot() as snap:
            return snap.rows

    def disk_bytes(self) -> int:
        return (self.path / DATA_FILE).stat().st_size

    def factor_bytes(self) -> int:
        """Bytes of stored factor values (headers included), from LMDB's own page statistics."""
        with self._env.begin() as txn:
            st = txn.stat(self._dbs[DB_FACTORS])
        return (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"]

    def close(self) -> None:
        if self._owns_env and self._env is not None:
            self._env.close()
        self._env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
