"""The index: one LMDB environment holding factor blocks, ids, metadata and curvature state.

One writer, many readers. Every write is one transaction that also moves the committed row
count, so a crash (even SIGKILL) leaves the index exactly at its last committed block. Readers
open the environment read-only but *registered* (lock=True): an unregistered reader would be
invisible to the writer, which could then recycle the pages under it during an append.

Writers are exclusive across processes (writer_lock.py): LMDB serializes transactions, not
writers. Every record is checksummed (integrity.py) and every read of one is checked; damage
is raised naming the record, never returned.
"""
from __future__ import annotations

import os
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import lmdb
import numpy as np

from . import keys
from .codec import BlockDecoder, BlockEncoder, NonFiniteError, parse_header
from .format import (
    DATA_FILE,
    DB_FACTORS,
    DB_IDS,
    DB_META,
    DB_SKETCH,
    FORMAT_VERSION,
    LMDB_LOCK_FILE,
    META_COMMIT,
    META_FORMAT_VERSION,
    META_LAYOUT,
    META_MANIFEST,
    META_ROWS,
    META_SETTINGS,
    META_STATE_PREFIX,
    SUPPORTED_VERSIONS,
    CorruptBlockError,
    IndexCorruptError,
    IndexWriteError,
    NotAnIndexError,
    UnsupportedVersionError,
    WriteRefusedError,
)
from .integrity import (
    NO_BOUNDS,
    check_lmdb_header,
    crc32,
    frame_json,
    lmdb_page_problems,
    map_bounds,
    pack_checked_u64,
    pack_id_value,
    unframe_json,
    unpack_checked_u64,
    unpack_id_value,
)
from .layout import IndexLayout
from .pages import MapReleaser, release_pages
from .writer_lock import WriterLock, shared_read_lock

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


# LMDB errors that say something about the environment (limits, locks, the disk), not damage
_ENVIRONMENT_ERRORS = (lmdb.MapFullError, lmdb.MapResizedError, lmdb.ReadersFullError, lmdb.DiskError,
                       lmdb.LockError, lmdb.ReadonlyError, lmdb.TlsFullError, lmdb.DbsFullError, lmdb.MemoryError)
# ... and those that can only mean damaged pages
_DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.InvalidError,
                  lmdb.IncompatibleError, lmdb.CursorFullError, lmdb.BadValsizeError, lmdb.ProblemError)


def lmdb_failure(path, e: lmdb.Error) -> Exception:
    """One line for an LMDB error: damage (or an I/O error while reading) names the index and says what to run."""
    if isinstance(e, _ENVIRONMENT_ERRORS):
        return IndexWriteError(f"index {path}: LMDB failed ({str(e).strip()})")
    return IndexCorruptError(f"index {path} is corrupt: LMDB says {str(e).strip()}; "
                             f"run `lorif-stream verify --index {path}`")


@contextmanager
def _lmdb_errors(path):
    try:
        yield
    except lmdb.Error as e:
        raise lmdb_failure(path, e) from None


def can_register(path: Path) -> bool:
    """Whether this process may take LMDB's reader lock (it writes its reader slot into lock.mdb)."""
    lock = path / LMDB_LOCK_FILE
    return os.access(lock, os.R_OK | os.W_OK) if lock.exists() else os.access(path, os.W_OK)


_UNREGISTERED_NOTICES: set[str] = set()


# Opening walks LMDB's page trees (integrity.lmdb_page_problems) of every named db of at most this
# many pages: all of the small ones (metadata, blocks, arrays) and the ids of up to ~100k rows.
# verify walks everything.
PAGE_WALK_LIMIT = 2048


def _open_env(path: Path, readonly: bool, map_size: int, durability: str = "sync") -> lmdb.Environment:
    env, _ = _open_env_locked(path, readonly, map_size, durability)
    return env


def check_pages(env: lmdb.Environment, path: Path, problems: list[str] | None, walk_limit: int | None) -> None:
    for _ in range(5):
        with _lmdb_errors(path):
            try:
                txn = env.begin()
            except lmdb.MapResizedError:
                env.set_mapsize(0)
                txn = env.begin()
        try:  # inside a read transaction: the pages of its state cannot be reused while they are walked
            found = lmdb_page_problems(path, txn.id(), walk_limit)
        finally:
            txn.abort()
        if found is not None:
            break
    else:
        return  # five commits overtook the walk: a busy writer, and nothing to say about these pages
    if found and problems is None:
        raise IndexCorruptError(f"index {path} is corrupt: {found[0]}; run `lorif-stream verify --index {path}`")
    if found:
        problems.extend(found)


def _open_env_locked(path: Path, readonly: bool, map_size: int, durability: str = "sync",
                     problems: list[str] | None = None,
                     walk_all: bool = False) -> tuple[lmdb.Environment, int | None]:
    """Open the environment and check LMDB's page trees before anything reads them (damage there
    is refused, or listed in `problems`); for a reader that cannot write lock.mdb (another user's
    index) open it without LMDB's lock and hold writer.lock shared instead (the descriptor is returned)."""
    if durability not in DURABILITY:
        raise ValueError(f"durability {durability!r} is not one of {sorted(DURABILITY)}")
    if (path / DATA_FILE).exists():
        # before mapping: LMDB reads pages past a truncated file's end and dies of SIGBUS
        check_lmdb_header(path)
    lock, shared_fd = True, None
    if readonly and not can_register(path):
        # lock.mdb is how readers register, and an unregistered reader is invisible to a writer
        # that could then reuse pages under it. This user cannot register, so instead it holds
        # writer.lock shared: no writer of ours can start while it reads (and none is running now).
        shared_fd = shared_read_lock(path)
        lock = False
        message = (f"index {path}: lock.mdb is not writable by you, so reads go without LMDB's reader lock; "
                   + ("writer.lock is held shared meanwhile, so no writer can start until this read ends"
                      if shared_fd is not None else
                      "there is no writer.lock to hold either: do not write to this index while reading it"))
        if message not in _UNREGISTERED_NOTICES:
            _UNREGISTERED_NOTICES.add(message)
            print(f"[lorif-stream] {message}", file=sys.stderr, flush=True)
    try:
        env = lmdb.open(
            str(path), subdir=True, readonly=readonly, lock=lock, max_dbs=_MAX_DBS,
            # readahead on: queries and verify stream blocks in file order, and a block's overflow
            # pages are contiguous (off, a cold scan read 4 KiB at a time: 0.07 GB/s vs 0.79 GB/s)
            map_size=map_size, readahead=True, meminit=False, max_readers=256,
            **DURABILITY[durability],
        )
    except lmdb.Error as e:
        if shared_fd is not None:
            os.close(shared_fd)
        raise NotAnIndexError(f"{path} is not a readable lorif-stream index ({e})") from None
    try:
        check_pages(env, path, problems, None if walk_all else PAGE_WALK_LIMIT)
    except BaseException:
        env.close()
        if shared_fd is not None:
            os.close(shared_fd)
        raise
    return env, shared_fd


def meta_record(key: bytes) -> str:
    return f"metadata record {key.decode('utf-8', 'replace')!r}"


def _read_header_meta(env: lmdb.Environment, path: Path,
                      problems: list[str] | None = None) -> tuple[IndexLayout, dict, int]:
    """Layout, settings and format version. With `problems` (verify), damaged settings are listed there, not raised."""
    try:
        meta = env.open_db(DB_META, create=False)
    except lmdb.NotFoundError:
        raise NotAnIndexError(f"{path} is an LMDB environment but not a lorif-stream index (no meta db)") from None
    except lmdb.Error as e:
        raise lmdb_failure(path, e) from None
    bounds = map_bounds(path)
    with _lmdb_errors(path), env.begin(db=meta, buffers=True) as txn:
        values = []
        for key in (META_FORMAT_VERSION, META_LAYOUT, META_SETTINGS):
            try:
                value = bounds.check(txn.get(key), meta_record(key))
            except CorruptBlockError as e:
                raise CorruptBlockError(f"index {path}: {e}") from None
            values.append(None if value is None else bytes(value))
        version, layout, settings = values
        others = txn.stat(meta)["entries"] > (version is not None) + (layout is not None) + (settings is not None)
    if version is None or layout is None:
        if version is not None or layout is not None or settings is not None or others:
            # a lorif-stream metadata db missing one of its records: a damaged key, not some other LMDB file
            missing = meta_record(META_FORMAT_VERSION if version is None else META_LAYOUT)
            raise CorruptBlockError(f"index {path}: {missing} is missing (a damaged index: run `lorif-stream verify`)")
        raise NotAnIndexError(f"{path} is not a lorif-stream index (no format version in its metadata)")
    try:
        v = int(version)
    except ValueError:
        # kept as plain ascii (no frame) so that any older reader can still read and refuse it
        raise CorruptBlockError(f"index {path}: {meta_record(META_FORMAT_VERSION)} is not a number "
                                f"({bytes(version)[:20]!r})") from None
    if v not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            f"index {path} has format version {v}; this lorif-stream reads versions {list(SUPPORTED_VERSIONS)}"
        )
    try:
        layout = IndexLayout.from_dict(_layout_from(META_LAYOUT, layout))
    except CorruptBlockError as e:
        raise CorruptBlockError(f"index {path}: {e}") from None
    try:
        if settings is None:
            raise CorruptBlockError(f"{meta_record(META_SETTINGS)} is missing")
        settings = unframe_json(settings, meta_record(META_SETTINGS), META_SETTINGS)
    except CorruptBlockError as e:
        if problems is None:
            raise CorruptBlockError(f"index {path}: {e}") from None
        problems.append(str(e))
        settings = {}
    return layout, settings, v


def _layout_from(key: bytes, raw) -> dict:
    d = unframe_json(raw, meta_record(key), key)
    try:
        IndexLayout.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptBlockError(f"{meta_record(key)} does not describe a layout ({e})") from None
    return d


def array_record(name: str) -> str:
    return f"array {name!r}"


def _put_array(txn, db, name: str, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    raw = arr.view(np.uint8).reshape(-1)
    n_chunks = max(1, -(-raw.size // _ARRAY_CHUNK))
    chunks = [raw[i * _ARRAY_CHUNK : (i + 1) * _ARRAY_CHUNK] for i in range(n_chunks)]
    head = {"dtype": arr.dtype.str, "shape": list(arr.shape), "chunks": n_chunks,
            "crc32": [crc32(chunk) for chunk in chunks]}
    prefix = name.encode() + b"\x00"
    _delete_array(txn, db, name)
    txn.put(prefix + b"head", frame_json(head, key=prefix + b"head"), db=db)
    for i, chunk in enumerate(chunks):
        txn.put(prefix + struct.pack(">I", i), chunk.tobytes(), db=db)


def array_head(name: str, raw) -> dict:
    prefix = name.encode() + b"\x00"
    head = unframe_json(raw, f"{array_record(name)} head", prefix + b"head")
    try:
        shape = [int(d) for d in head["shape"]]
        dtype = np.dtype(head["dtype"])
        chunks = int(head["chunks"])
        crcs = head.get("crc32")
        if any(d < 0 for d in shape) or chunks < 1 or (crcs is not None and len(crcs) != chunks):
            raise ValueError("inconsistent shape/chunks/crc32")
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptBlockError(f"{array_record(name)} head is not an array head ({e})") from None
    return {"shape": shape, "dtype": dtype, "chunks": chunks, "crc32": crcs}


def _delete_array(txn, db, name: str) -> None:
    prefix = name.encode() + b"\x00"
    head = txn.get(prefix + b"head", db=db)  # a write transaction: its values are copies, not the map
    if head is None:
        return
    for i in range(array_head(name, head)["chunks"]):
        txn.delete(prefix + struct.pack(">I", i), db=db)
    txn.delete(prefix + b"head", db=db)


def _get_array(txn, db, name: str, bounds=NO_BOUNDS) -> np.ndarray | None:
    prefix = name.encode() + b"\x00"
    raw = bounds.check(txn.get(prefix + b"head", db=db), f"{array_record(name)} head")
    if raw is None:
        return None
    head = array_head(name, raw)
    out = np.empty(int(np.prod(head["shape"])) * head["dtype"].itemsize, np.uint8)
    pos = 0
    for i in range(head["chunks"]):
        chunk = bounds.check(txn.get(prefix + struct.pack(">I", i), db=db), f"{array_record(name)} chunk {i}")
        if chunk is None:
            raise CorruptBlockError(f"{array_record(name)} chunk {i} is missing")
        chunk = memoryview(chunk)
        if head["crc32"] is not None and crc32(chunk) != head["crc32"][i]:
            raise CorruptBlockError(f"{array_record(name)} chunk {i}: checksum mismatch")
        if pos + len(chunk) > out.size:
            raise CorruptBlockError(f"{array_record(name)}: chunks hold more than the {out.size} bytes its head says")
        out[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
        pos += len(chunk)
    if pos != out.size:
        raise CorruptBlockError(f"{array_record(name)}: holds {pos} bytes, its head says {out.size}")
    return out.view(head["dtype"]).reshape(head["shape"])


def _read_rows(txn, db, bounds=NO_BOUNDS) -> int:
    raw = bounds.check(txn.get(META_ROWS, db=db), meta_record(META_ROWS))
    if raw is None:
        raise CorruptBlockError(f"{meta_record(META_ROWS)} is missing")
    return unpack_checked_u64(META_ROWS, raw, meta_record(META_ROWS))


def _read_manifest(txn, meta_db, bounds=NO_BOUNDS) -> dict | None:
    raw = bounds.check(txn.get(META_MANIFEST, db=meta_db), meta_record(META_MANIFEST))
    if raw is None:
        return None  # an index from before format 2's manifest
    manifest = unframe_json(raw, meta_record(META_MANIFEST), META_MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("arrays"), list) \
            or not isinstance(manifest.get("state"), list):
        raise CorruptBlockError(f"{meta_record(META_MANIFEST)} is not a manifest")
    return manifest


def _scan_manifest(txn, meta_db, sketch_db) -> dict:
    """The manifest of an older index, from the keys it holds (written once, by its first put_state)."""
    arrays = sorted(bytes(k)[:-5].decode("utf-8", "replace") for k, _ in txn.cursor(db=sketch_db)
                    if bytes(k).endswith(b"\x00head"))
    state = sorted(bytes(k)[len(META_STATE_PREFIX):].decode("utf-8", "replace") for k, _ in txn.cursor(db=meta_db)
                   if bytes(k).startswith(META_STATE_PREFIX))
    return {"arrays": arrays, "state": state}


def _listed_but_missing(manifest: dict | None, kind: str, name: str, record: str) -> None:
    if manifest is not None and name in manifest[kind]:
        raise CorruptBlockError(f"{record} is missing, yet the index's manifest lists it (a damaged key)")


def state_key(name: str) -> bytes:
    return META_STATE_PREFIX + name.encode()


def _get_state_meta(txn, db, name: str, bounds=NO_BOUNDS):
    key = state_key(name)
    raw = bounds.check(txn.get(key, db=db), meta_record(key))
    return None if raw is None else unframe_json(raw, meta_record(key), key)


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

    def __init__(self, path: str | os.PathLike, env: lmdb.Environment, layout: IndexLayout, settings: dict,
                 lock: WriterLock | None = None):
        self.path = Path(path)
        self.layout = layout
        self.settings = settings
        self._env = env
        self._lock = lock
        self.format_version = FORMAT_VERSION  # of a new index; open() sets the stored one
        with _lmdb_errors(self.path):
            # create=False: every db exists since create(); opening one must not be a write transaction
            self._dbs = {name: env.open_db(name, create=False) for name in (DB_FACTORS, DB_META, DB_IDS, DB_SKETCH)}
            with env.begin(db=self._dbs[DB_META], buffers=True) as txn:
                try:
                    self.rows = _read_rows(txn, self._dbs[DB_META], map_bounds(self.path))
                except CorruptBlockError as e:
                    raise CorruptBlockError(f"index {self.path}: {e}") from None
        self._local = threading.local()
        self._commit_lock = threading.Lock()
        # the id B-tree's pages, read to insert each block's ids, would otherwise stay mapped: ~85 B a row
        self._releaser = MapReleaser(lambda: map_bounds(self.path))

    # -- opening
    @classmethod
    def create(cls, path, layout: IndexLayout, settings: dict, *, map_size: int = DEFAULT_MAP_SIZE,
               durability: str = "sync") -> "IndexWriter":
        """Create a new, empty index at `path` (a directory that must not already hold one)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # lock first, then look: two creators may both have seen no data.mdb a moment ago, and the
        # one that lost must hear that the other is writing it, not that an index is in the way
        lock = WriterLock.acquire(path)
        try:
            if (path / DATA_FILE).exists():
                raise WriteRefusedError(f"{path} already holds an index; open it instead of creating one")
            env = _open_env(path, readonly=False, map_size=map_size, durability=durability)
            try:
                with _lmdb_errors(path), env.begin(write=True) as txn:
                    meta = env.open_db(DB_META, txn=txn)
                    for name in (DB_FACTORS, DB_IDS, DB_SKETCH):
                        env.open_db(name, txn=txn)
                    # format_version stays plain ascii: any reader, however old, can read it and refuse
                    txn.put(META_FORMAT_VERSION, str(FORMAT_VERSION).encode(), db=meta)
                    txn.put(META_LAYOUT, frame_json(layout.to_dict(), META_LAYOUT), db=meta)
                    txn.put(META_SETTINGS, frame_json(settings, META_SETTINGS, sort_keys=True), db=meta)
                    txn.put(META_ROWS, pack_checked_u64(META_ROWS, 0), db=meta)
                    txn.put(META_MANIFEST, frame_json({"arrays": [], "state": []}, META_MANIFEST), db=meta)
                    txn.put(META_COMMIT, pack_checked_u64(META_COMMIT, txn.id()), db=meta)
                return cls(path, env, layout, settings, lock)
            except BaseException:
                env.close()
                raise
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open(cls, path, *, durability: str = "sync") -> "IndexWriter":
        """Open an existing index for writing (resume a build, append rows, store curvature)."""
        path = Path(path)
        _check_index_dir(path)
        lock = WriterLock.acquire(path)  # before anything is read: a second writer reads stale rows
        try:
            env = _open_env(path, readonly=False, map_size=DEFAULT_MAP_SIZE, durability=durability)
            try:
                layout, settings, version = _read_header_meta(env, path)
                writer = cls(path, env, layout, settings, lock)
                writer.format_version = version
                return writer
            except BaseException:
                env.close()
                raise
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        if self._env is not None:
            try:
                self._env.sync(True)
                self._env.close()
            finally:
                self._env = None
                if self._lock is not None:
                    self._lock.release()  # only once the environment is closed and synced
                    self._lock = None

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
            self._releaser.note(block.nbytes)

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
        row_keys = [keys.row_to_id_key(row) for row in rows]
        id_keys = [keys.ID_PREFIX + eid for eid in encoded_ids]
        with txn.cursor(db=idb) as cur:
            cur.putmulti([(k, pack_id_value(k, eid)) for k, eid in zip(row_keys, encoded_ids)], append=True)
            _, added = cur.putmulti([(k, pack_checked_u64(k, row)) for k, row in zip(id_keys, rows)], overwrite=False)
        if added != block.rows and not allow_duplicate_ids:
            raise self._duplicate_id_error(txn, idb, block)
        txn.put(META_ROWS, pack_checked_u64(META_ROWS, block.first_row + block.rows), db=mdb)

    @staticmethod
    def _duplicate_id_error(txn, idb, block: PendingBlock) -> WriteRefusedError:
        """Name the first id of `block` that an earlier row (of the index or the block) holds."""
        first_seen: dict[str, int] = {}
        for row, example_id in enumerate(block.ids, start=block.first_row):
            if example_id in first_seen:
                return WriteRefusedError(f"example id {example_id!r} (row {row}) is already in the index at row "
                                         f"{first_seen[example_id]} (this block)")
            first_seen[example_id] = row
            key = keys.id_to_row_key(example_id)
            held = unpack_checked_u64(key, txn.get(key, db=idb), f"ids: reverse entry of {example_id!r}")
            if held != row:
                return WriteRefusedError(f"example id {example_id!r} (row {row}) is already in the index at row {held}")
        raise AssertionError("putmulti reported a duplicate id that is not there")

    # -- metadata and curvature state
    def update_settings(self, settings: dict) -> None:
        blob = frame_json(settings, META_SETTINGS, sort_keys=True)
        self._write(lambda txn: txn.put(META_SETTINGS, blob, db=self._dbs[DB_META]))
        self.settings = settings

    def put_state(self, arrays: dict[str, np.ndarray], meta: dict[str, object] | None = None,
                  drop: Sequence[str] = ()) -> None:
        """Store named arrays (sketches, eigenpairs) and JSON metadata atomically in one transaction."""

        def write(txn):
            mdb, sdb = self._dbs[DB_META], self._dbs[DB_SKETCH]
            manifest = _read_manifest(txn, mdb) or _scan_manifest(txn, mdb, sdb)
            for name in drop:
                _delete_array(txn, sdb, name)
            for name, arr in arrays.items():
                _put_array(txn, sdb, name, arr)
            for name, value in (meta or {}).items():
                txn.put(state_key(name), frame_json(value, state_key(name)), db=mdb)
            manifest = {"arrays": sorted((set(manifest["arrays"]) - set(drop)) | set(arrays)),
                        "state": sorted(set(manifest["state"]) | set(meta or {}))}
            txn.put(META_MANIFEST, frame_json(manifest, META_MANIFEST), db=mdb)

        with self._commit_lock:
            self._write(write)

    def get_state_meta(self, name: str):
        # buffers=True: the value is checked to lie inside the file before a byte of it is read
        with self._reading(), self._env.begin(db=self._dbs[DB_META], buffers=True) as txn:
            bounds = map_bounds(self.path)
            value = _get_state_meta(txn, self._dbs[DB_META], name, bounds)
            if value is None:
                _listed_but_missing(_read_manifest(txn, self._dbs[DB_META], bounds), "state", name,
                                    meta_record(state_key(name)))
            return value

    def get_array(self, name: str) -> np.ndarray | None:
        with self._reading(), self._env.begin(buffers=True) as txn:
            bounds = map_bounds(self.path)
            value = _get_array(txn, self._dbs[DB_SKETCH], name, bounds)
            if value is None:
                _listed_but_missing(_read_manifest(txn, self._dbs[DB_META], bounds), "arrays", name,
                                    array_record(name))
            return value

    @contextmanager
    def _reading(self):
        try:
            with _lmdb_errors(self.path):
                yield
        except CorruptBlockError as e:
            if str(e).startswith("index "):
                raise
            raise CorruptBlockError(f"index {self.path}: {e}") from None

    def reader(self) -> "IndexReader":
        """A reader sharing this writer's environment (LMDB allows one env per process per file)."""
        reader = IndexReader(self.path, _env=self._env, _layout=self.layout, _settings=self.settings)
        reader.format_version = self.format_version
        return reader

    # -- transactions with map growth
    def _write(self, fn) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    fn(txn)
                    # the id LMDB gives this commit, checked by readers against the header page they got
                    txn.put(META_COMMIT, pack_checked_u64(META_COMMIT, txn.id()), db=self._dbs[DB_META])
                return
            except lmdb.MapFullError:
                # the failed transaction is aborted; no transaction is open while the map grows
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.Error as e:
                if isinstance(e, _DAMAGE_ERRORS):
                    raise lmdb_failure(self.path, e) from None
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


def _pinned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """fp32 page-locked host memory (a CUDA torch is imported only by whoever asks for it)."""
    import torch

    return torch.empty(shape, dtype=torch.float32, pin_memory=True).numpy()


class BlockBuffers:
    """Reusable fp32 decode targets for one block of every layer (L and R per layer).

    `pin`: page-locked, so that host->device copies from them can be asynchronous; kept when the
    buffers grow, since blocks larger than block_size are the normal case (a build cuts a block at
    the first batch that reaches block_size, so blocks run up to batch_size - 1 rows over)."""

    def __init__(self, layout: IndexLayout, rows: int | None = None, pin: bool = False):
        self._layout = layout
        self.pin = pin
        self.rows = 0
        self.ensure(rows or layout.block_size)

    def ensure(self, rows: int) -> None:
        """Grow (never shrink) so that a block of `rows` rows fits."""
        if rows <= self.rows:
            return
        self.rows = rows
        empty = _pinned_empty if self.pin else (lambda shape: np.empty(shape, np.float32))
        self.L = [empty((rows, l.d_out, self._layout.c)) for l in self._layout.layers]
        self.R = [empty((rows, l.d_in, self._layout.c)) for l in self._layout.layers]


class Snapshot:
    """One consistent view of the index (one LMDB read transaction, zero-copy buffers).

    Opening one checks that the row count, LMDB's header page and the blocks agree (a strict
    snapshot raises; verify's lenient one lists the problems in `problems`)."""

    def __init__(self, reader: "IndexReader", txn, strict: bool = True):
        self._reader = reader
        self._txn = txn
        self.layout = reader.layout
        self.strict = strict
        self.problems: list[str] = []
        self._bounds = map_bounds(reader.path)
        self._releaser = MapReleaser(lambda: self._bounds)
        meta = reader._dbs[DB_META]
        with self._guard():
            try:
                self.rows = _read_rows(txn, meta, self._bounds)
            except CorruptBlockError as e:
                self._problem(str(e))
                try:
                    self.rows = self._layer_end(0)  # verify still checks what the blocks hold
                except CorruptBlockError:
                    self.rows = 0
            self._check_commit(txn, meta)
            if strict:
                self._check_layer_ends()

    # -- opening checks
    def _problem(self, message: str) -> None:
        if self.strict:
            raise CorruptBlockError(f"index {self._reader.path}: {message}")
        self.problems.append(message)

    @contextmanager
    def _guard(self):
        """LMDB errors and unnamed record errors of this snapshot's reads become one line naming the index."""
        try:
            yield
        except lmdb.Error as e:
            raise lmdb_failure(self._reader.path, e) from None
        except CorruptBlockError as e:
            if str(e).startswith(("index ", "layer ")):
                raise
            raise type(e)(f"index {self._reader.path}: {e}") from None

    def _check_commit(self, txn, meta) -> None:
        try:
            raw = self._bounds.check(txn.get(META_COMMIT, db=meta), meta_record(META_COMMIT))
            if raw is None:  # written by every write since format 2; older indexes have none
                return
            stored = unpack_checked_u64(META_COMMIT, raw, meta_record(META_COMMIT))
        except CorruptBlockError as e:
            self._problem(str(e))
            return
        got = txn.id()
        # a compacting copy (mdb_copy -c) renumbers its one transaction 1: nothing to compare then
        if got != stored and got != 1:
            self._problem(f"LMDB read transaction {got} but the index's last commit was {stored}: a damaged LMDB "
                          f"header page made it pick an older state (or a program other than lorif-stream wrote to it)")

    def _block_rows(self, layer: int, first_row: int, value) -> int:
        self.check_value(value, layer, first_row)
        try:
            return parse_header(value).rows
        except CorruptBlockError as e:
            raise CorruptBlockError(f"layer {self.layout.layers[layer].name!r} block at row {first_row}: {e}") from None

    def _layer_end(self, layer: int) -> int:
        """One past the last row of `layer`'s last block (0 when it has none)."""
        cur = self._txn.cursor(db=self._reader._dbs[DB_FACTORS])
        found = cur.set_range(keys.factor_key(layer + 1, 0)) if layer + 1 < 1 << 16 else False
        if not (cur.prev() if found else cur.last()):
            return 0
        last_layer, first_row = keys.parse_factor_key(cur.key())
        if last_layer != layer:
            return 0
        return first_row + self._block_rows(layer, first_row, cur.value())

    def _check_layer_ends(self) -> None:
        # a row count larger than the blocks (or smaller) would otherwise read as rows of nothing
        for i, shape in enumerate(self.layout.layers):
            end = self._layer_end(i)
            if end < self.rows:
                self._problem(f"the index claims {self.rows} rows but layer {shape.name!r} has blocks only for rows "
                              f"0..{end - 1}: blocks for rows {end}..{self.rows - 1} are missing; run "
                              f"`lorif-stream verify --index {self._reader.path}`")
            elif end > self.rows:
                self._problem(f"layer {shape.name!r} has blocks up to row {end - 1}, past the index's {self.rows} "
                              f"rows; run `lorif-stream verify --index {self._reader.path}`")

    # -- raw encoded values (zero-copy memoryviews, valid while the snapshot is open)
    def layer_values(self, layer: int, start: int = 0, stop: int | None = None,
                     check: bool = True) -> Iterator[tuple[int, memoryview]]:
        """(first_row, encoded block) of one layer's blocks overlapping rows [start, stop), in row order.
        With `check`, a gap between blocks (or a missing last block) raises instead of skipping rows."""
        stop = self.rows if stop is None else min(stop, self.rows)
        if start >= stop:
            return
        name = self.layout.layers[layer].name
        expected = start
        try:
            cur = self._txn.cursor(db=self._reader._dbs[DB_FACTORS])
            if self._seek_block(cur, layer, start):
                for key, value in cur:
                    layer_idx, first_row = keys.parse_factor_key(key)
                    if layer_idx != layer or first_row >= stop:  # _seek_block never lands before `layer`
                        break
                    self.check_value(value, layer, first_row)
                    if check:
                        if first_row > expected:
                            raise CorruptBlockError(f"layer {name!r}: rows {expected}..{first_row - 1} have no block "
                                                    f"(index {self._reader.path} is damaged: run verify)")
                        expected = first_row + self._block_rows(layer, first_row, value)
                    yield first_row, value
        except lmdb.Error as e:
            raise lmdb_failure(self._reader.path, e) from None
        if check and expected < stop:
            raise CorruptBlockError(f"layer {name!r}: rows {expected}..{stop - 1} have no block "
                                    f"(index {self._reader.path} is damaged: run verify)")

    def _seek_block(self, cur, layer: int, row: int) -> bool:
        """Position `cur` on the first block of `layer` that holds a row >= `row`."""
        found = cur.set_range(keys.factor_key(layer, row))
        if found and keys.parse_factor_key(cur.key()) == (layer, row):
            return True
        # `row` may fall inside the block just before: step back when that block is ours and holds it
        if cur.prev() if found else cur.last():
            prev_layer, prev_first = keys.parse_factor_key(cur.key())
            if prev_layer == layer and prev_first + self._block_rows(layer, prev_first, cur.value()) > row:
                return True
            return cur.next()
        return found and cur.first()

    def value_at(self, layer: int, first_row: int) -> memoryview:
        with self._guard():
            value = self._txn.get(keys.factor_key(layer, first_row), db=self._reader._dbs[DB_FACTORS])
        if value is None:
            name = self.layout.layers[layer].name
            raise CorruptBlockError(f"layer {name!r}: no block starts at row {first_row} (index blocks misaligned)")
        return self.check_value(value, layer, first_row)

    def check_value(self, value, layer: int, first_row: int):
        """A block value, refused when LMDB (a damaged page) places it past the end of the file."""
        return self._bounds.check(value, f"layer {self.layout.layers[layer].name!r} block at row {first_row}")

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
            if any(L.shape[0] != n for L, _ in out):
                raise CorruptBlockError(f"blocks at row {first_row} hold different row counts in different layers "
                                        f"(index {self._reader.path} is damaged: run verify)")
            lo, hi = max(start, first_row), min(stop, first_row + n)
            yield lo, hi - lo, [(L[lo - first_row : hi - first_row], R[lo - first_row : hi - first_row]) for L, R in out]

    def note_read(self, nbytes: int) -> None:
        """Count bytes read through the map; past a threshold the whole map is unmapped (pages.py)."""
        self._releaser.note(nbytes)

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
            self.note_read(value.nbytes)
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
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} is outside the index's {self.rows} rows")
        key = keys.row_to_id_key(row)
        with self._guard():
            raw = self._bounds.check(self._txn.get(key, db=self._reader._dbs[DB_IDS]), f"ids: id of row {row}")
            if raw is None:
                raise CorruptBlockError(f"ids: row {row} has no id")
            return unpack_id_value(key, raw, f"ids: id of row {row}")

    def ids(self, start: int, stop: int) -> list[str]:
        stop = min(stop, self.rows)
        out: list[str] = []
        if start >= stop:
            return out
        with self._guard():
            cur = self._txn.cursor(db=self._reader._dbs[DB_IDS])
            if cur.set_key(keys.row_to_id_key(start)):
                for key, value in cur:
                    row = start + len(out)
                    if row >= stop:
                        break
                    expected = keys.row_to_id_key(row)
                    if bytes(key) != expected:
                        break
                    record = f"ids: id of row {row}"
                    out.append(unpack_id_value(expected, self._bounds.check(value, record), record))
            if len(out) != stop - start:
                raise CorruptBlockError(f"ids: row {start + len(out)} has no id")
        return out

    def row_of(self, example_id: str) -> int | None:
        key = keys.id_to_row_key(example_id)
        with self._guard():
            raw = self._bounds.check(self._txn.get(key, db=self._reader._dbs[DB_IDS]),
                                     f"ids: reverse entry of {example_id!r}")
            if raw is None:
                return None
            row = unpack_checked_u64(key, raw, f"ids: reverse entry of {example_id!r}")
        return row if row < self.rows else None

    # -- state
    def array(self, name: str) -> np.ndarray | None:
        with self._guard():
            value = _get_array(self._txn, self._reader._dbs[DB_SKETCH], name, self._bounds)
            if value is None:
                _listed_but_missing(self.manifest(), "arrays", name, array_record(name))
            return value

    def state_meta(self, name: str):
        with self._guard():
            value = _get_state_meta(self._txn, self._reader._dbs[DB_META], name, self._bounds)
            if value is None:
                _listed_but_missing(self.manifest(), "state", name, meta_record(state_key(name)))
            return value

    def manifest(self) -> dict | None:
        """Names of the stored arrays and state records (None for an index older than the manifest)."""
        if not hasattr(self, "_manifest"):
            with self._guard():
                self._manifest = _read_manifest(self._txn, self._reader._dbs[DB_META], self._bounds)
        return self._manifest


class IndexReader:
    """Read-only access to an index; take a `snapshot()` for a consistent view.

    `strict=False` (verify) opens an index whose settings are damaged and lists that in `problems`."""

    def __init__(self, path: str | os.PathLike, *, strict: bool = True, _env=None, _layout=None, _settings=None):
        self.path = Path(path)
        self.strict = strict
        self.problems: list[str] = []
        self._owns_env = _env is None
        self._shared_lock = None
        self.format_version: int = FORMAT_VERSION
        if _env is None:
            _check_index_dir(self.path)
            _env, self._shared_lock = _open_env_locked(self.path, readonly=True, map_size=DEFAULT_MAP_SIZE,
                                                       problems=None if strict else self.problems,
                                                       walk_all=not strict)
            try:
                _layout, _settings, self.format_version = _read_header_meta(_env, self.path,
                                                                            None if strict else self.problems)
            except BaseException:
                self._env = _env
                self.close()
                raise
        self._env = _env
        self.layout: IndexLayout = _layout
        self.settings: dict = _settings
        try:
            with _lmdb_errors(self.path):
                self._dbs = {name: _env.open_db(name, create=False) for name in (DB_FACTORS, DB_META, DB_IDS, DB_SKETCH)}
        except BaseException:
            self.close()
            raise

    @contextmanager
    def snapshot(self, strict: bool | None = None) -> Iterator[Snapshot]:
        txn = self._begin()
        try:
            yield Snapshot(self, txn, self.strict if strict is None else strict)
        finally:
            txn.abort()

    def _begin(self):
        with _lmdb_errors(self.path):
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
        with _lmdb_errors(self.path), self._env.begin() as txn:
            st = txn.stat(self._dbs[DB_FACTORS])
        return (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"]

    def close(self) -> None:
        if self._owns_env and self._env is not None:
            self._env.close()
        self._env = None
        if self._shared_lock is not None:
            os.close(self._shared_lock)
            self._shared_lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
