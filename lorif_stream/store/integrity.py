"""Checksums of every stored record, and the sanity checks on LMDB's own header pages.

Factor blocks carry their own crcs (codec.py). Everything else written since format 2 is
framed here: JSON metadata and array heads (`JSON_MAGIC` + crc32 + JSON), array chunks (crc32
per chunk in the array's head), ids and u64 counters (a crc32 over key and value, so a value
that moved under another key is caught too). Records of older indexes have no frame and are
still read. Every check raises CorruptBlockError naming the record, never returns damaged data.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import DATA_FILE, ID_VALUE_MAGIC, JSON_MAGIC, CorruptBlockError, IndexCorruptError

_CRC = struct.Struct("<I")
_U64 = struct.Struct(">Q")
CHECKED_U64_SIZE = _U64.size + _CRC.size


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


# ---------------------------------------------------------------- JSON records


def frame_json(value, key: bytes, **dumps) -> bytes:
    """JSON_MAGIC, crc32 of key + JSON (the key too: a record whose key was damaged is caught), JSON."""
    payload = json.dumps(value, **dumps).encode()
    return JSON_MAGIC + _CRC.pack(crc32(key + payload)) + payload


def unframe_json(raw, record: str, key: bytes):
    """The JSON value of a stored record (framed or, from older indexes, plain)."""
    mv = memoryview(raw)
    if bytes(mv[:4]) == JSON_MAGIC:
        if len(mv) < 8:
            raise CorruptBlockError(f"{record}: truncated ({len(mv)} bytes)")
        payload = mv[8:]
        if crc32(key + bytes(payload)) != _CRC.unpack(mv[4:8])[0]:
            raise CorruptBlockError(f"{record}: checksum mismatch")
    else:
        payload = mv
    try:
        return json.loads(bytes(payload))
    except (UnicodeDecodeError, ValueError) as e:
        # json's own message ("Expecting value: line 1 column 532") says nothing about which record
        raise CorruptBlockError(f"{record}: not valid JSON ({e})") from None


def is_framed_json(raw) -> bool:
    return bytes(memoryview(raw)[:4]) == JSON_MAGIC


# ---------------------------------------------------------------- u64 counters and ids


def pack_checked_u64(key: bytes, value: int) -> bytes:
    body = _U64.pack(value)
    return body + _CRC.pack(crc32(key + body))


def unpack_checked_u64(key: bytes, raw, record: str) -> int:
    """A u64 BE value, checked when it carries its crc (12 bytes); 8-byte values are from older indexes."""
    b = bytes(raw)
    if len(b) == CHECKED_U64_SIZE:
        if crc32(key + b[:8]) != _CRC.unpack(b[8:])[0]:
            raise CorruptBlockError(f"{record}: checksum mismatch")
    elif len(b) != _U64.size:
        raise CorruptBlockError(f"{record}: {len(b)} bytes, expected {_U64.size} or {CHECKED_U64_SIZE}")
    return _U64.unpack(b[:8])[0]


def pack_id_value(key: bytes, example_id: bytes) -> bytes:
    return ID_VALUE_MAGIC + _CRC.pack(crc32(key + example_id)) + example_id


def unpack_id_value(key: bytes, raw, record: str) -> str:
    b = bytes(raw)
    if b[:1] == ID_VALUE_MAGIC:
        if len(b) < 5 or crc32(key + b[5:]) != _CRC.unpack(b[1:5])[0]:
            raise CorruptBlockError(f"{record}: checksum mismatch")
        b = b[5:]
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptBlockError(f"{record}: the example id is not valid UTF-8") from None


# ---------------------------------------------------------------- LMDB header pages
# MDB_meta (lmdb mdb.c, 64-bit builds) after the 16-byte page header: mm_magic u32, mm_version
# u32, mm_address, mm_mapsize, mm_dbs[2] (48 bytes each; mm_dbs[0].md_pad is the page size),
# mm_last_pg, mm_txnid. Meta page 0 is at offset 0, meta page 1 at offset psize.
_MDB_MAGIC = 0xBEEFC0DE
_PAGE_HEADER = 16
_META = struct.Struct("<IIQQ48s48sQQ")
_MAX_PSIZE = 1 << 16
# MDB_db: md_pad u32, md_flags u16, md_depth u16, md_branch_pages, md_leaf_pages, md_overflow_pages,
# md_entries, md_root (u64 each)
_DB = struct.Struct("<IHHQQQQQ")


@dataclass(frozen=True)
class LmdbHeader:
    psize: int
    last_pg: tuple[int, int]
    txnid: tuple[int, int]
    file_size: int
    main_root: tuple[int, int] = (0, 0)  # root page of the main db (the table of named dbs), per meta page

    @property
    def current(self) -> int:
        """The meta page LMDB uses: the one with the larger transaction id."""
        return 1 if self.txnid[0] < self.txnid[1] else 0  # as mdb_env_pick_meta (a tie picks page 0)

    @property
    def needed_bytes(self) -> int:
        return (self.last_pg[self.current] + 1) * self.psize


def read_lmdb_header(path: Path) -> LmdbHeader | None:
    """The two meta pages of `path`/data.mdb, or None when the file is not an LMDB file at all
    (LMDB then refuses it itself, with its own clear 'MDB_INVALID')."""
    data = Path(path) / DATA_FILE
    with open(data, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(_PAGE_HEADER + _META.size)
        if len(head) < _PAGE_HEADER + _META.size:
            return None
        magic, version, _, _, db0, main0, last0, txn0 = _META.unpack_from(head, _PAGE_HEADER)
        psize = struct.unpack_from("<I", db0, 0)[0]
        if magic != _MDB_MAGIC or not 512 <= psize <= _MAX_PSIZE or psize & (psize - 1):
            return None
        fh.seek(psize)
        page1 = fh.read(_PAGE_HEADER + _META.size)
    if len(page1) < _PAGE_HEADER + _META.size:
        raise IndexCorruptError(f"index {path} is truncated: {DATA_FILE} has {size} bytes, "
                                f"LMDB needs at least {2 * psize}")
    magic1, _, _, _, _, main1, last1, txn1 = _META.unpack_from(page1, _PAGE_HEADER)
    if magic1 != _MDB_MAGIC:
        raise IndexCorruptError(f"index {path} is corrupt: LMDB's second header page has a bad magic number")
    return LmdbHeader(psize, (last0, last1), (txn0, txn1), size,
                      (_DB.unpack(main0)[-1], _DB.unpack(main1)[-1]))


def check_lmdb_header(path: Path) -> LmdbHeader | None:
    """Refuse a data.mdb that would make LMDB read past its end (SIGBUS), or whose header pages
    LMDB could never have written (it would silently read an older state)."""
    h = read_lmdb_header(path)
    if h is None:
        return None
    if h.file_size < h.needed_bytes:
        raise IndexCorruptError(f"index {path} is truncated: {DATA_FILE} has {h.file_size} bytes, "
                                f"LMDB needs {h.needed_bytes}")
    problem = header_problem(h)
    if problem:
        raise IndexCorruptError(f"index {path} is corrupt: {problem}; run `lorif-stream verify --index {path}`")
    return h


def header_problem(h: LmdbHeader) -> str | None:
    # LMDB writes transaction t to meta page t & 1, and both pages start at transaction 0; so the
    # pages hold consecutive ids of their own parity. A flipped id breaks that, and LMDB would
    # then pick the wrong page: an older snapshot, read as if it were the latest.
    t0, t1 = h.txnid
    if (t0 and t0 & 1) or (t1 and not t1 & 1) or abs(t0 - t1) > 1:
        return f"LMDB's header pages hold transaction ids {t0} and {t1}, which LMDB never writes (a damaged header)"
    return None


# ---------------------------------------------------------------- values past the end of the file
# A damaged node header can make LMDB hand out a value longer than what is left of data.mdb;
# touching the part past the end of the file is SIGBUS, which no Python code can catch. So every
# value is checked against where this process maps the file before its bytes are read.


class MapBounds:
    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def check(self, value, record: str):
        """`value` (an LMDB memoryview), refused when it does not lie inside the mapped file."""
        if value is None or not isinstance(value, memoryview) or not value.nbytes:
            return value
        addr = np.frombuffer(value, np.uint8).ctypes.data  # the address only: no byte is read
        if addr < self.start or addr + value.nbytes > self.end:
            raise CorruptBlockError(f"{record}: LMDB says its value has {value.nbytes} bytes, which would run past the "
                                    f"end of {DATA_FILE} (a damaged LMDB page)")
        return value


class _NoBounds:
    @staticmethod
    def check(value, record: str):
        return value


NO_BOUNDS = _NoBounds()


def map_bounds(path) -> MapBounds | _NoBounds:
    """Where this process maps `path`/data.mdb now (Linux /proc/self/maps), up to the file's size."""
    if not sys.platform.startswith("linux"):
        return NO_BOUNDS
    target = os.path.realpath(Path(path) / DATA_FILE)
    try:
        with open("/proc/self/maps") as fh:
            lines = fh.read().splitlines()
        size = os.stat(target).st_size
    except OSError:
        return NO_BOUNDS
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5] == target and int(parts[2], 16) == 0:
            start = int(parts[0].split("-", 1)[0], 16)
            return MapBounds(start, start + size)
    return NO_BOUNDS


# ---------------------------------------------------------------- LMDB's page structures
# LMDB trusts its pages: a damaged node pointer or size makes it read past the page, or past the
# end of the file (SIGBUS), or trip an mdb.c assertion (abort). Walking the trees here with
# pread (never the map) turns such damage into a line naming the page, before LMDB touches it.
# Page header (16 bytes): mp_pgno u64, mp_pad u16, mp_flags u16, mp_lower u16, mp_upper u16
# (overflow pages: mp_pages u32 in place of lower/upper); then u16 node offsets. A node: mn_lo,
# mn_hi, mn_flags, mn_ksize (u16 each), the key, then the data (leaf: lo | hi << 16 bytes; an
# overflow page number when F_BIGDATA; an MDB_db when F_SUBDATA) or, in a branch, the child page
# number lo | hi << 16 | flags << 32.
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META, _P_LEAF2, _P_SUBP = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
_F_BIGDATA, _F_SUBDATA, _F_DUPDATA = 0x01, 0x02, 0x04
_P_INVALID = (1 << 64) - 1
_PAGE_HDR = struct.Struct("<QHHHH")
_NODE = struct.Struct("<HHHH")


class _Pages:
    def __init__(self, fd: int, psize: int, last_pg: int, problems: list[str], limit: int):
        self.fd, self.psize, self.last_pg, self.problems, self.limit = fd, psize, last_pg, problems, limit
        self.seen: set[int] = set()

    def problem(self, pgno: int, db: str, what: str) -> None:
        if len(self.problems) < self.limit:
            self.problems.append(f"LMDB page {pgno} ({db} db): {what}")

    def read(self, pgno: int) -> bytes:
        return os.pread(self.fd, self.psize, pgno * self.psize)

    def tree(self, root: int, db: str, subdbs: dict[str, bytes] | None = None) -> None:
        """Check every branch and leaf page under `root` (and the header of each overflow run)."""
        if root == _P_INVALID:
            return  # an empty db
        stack = [(root, 0)]
        while stack and len(self.problems) < self.limit:
            pgno, depth = stack.pop()
            if not 2 <= pgno <= self.last_pg:
                self.problem(pgno, db, f"page number outside the file's pages 2..{self.last_pg}")
                continue
            if pgno in self.seen or depth > 64:
                self.problem(pgno, db, "reached twice: the tree has a cycle")
                continue
            self.seen.add(pgno)
            page = self.read(pgno)
            stored, _, flags, lower, upper = _PAGE_HDR.unpack_from(page)
            kind = flags & (_P_BRANCH | _P_LEAF | _P_OVERFLOW | _P_META | _P_LEAF2 | _P_SUBP)
            if stored != pgno or kind not in (_P_BRANCH, _P_LEAF):
                self.problem(pgno, db, f"not a branch or leaf page (header says page {stored}, flags {flags:#x})")
                continue
            if not (_PAGE_HEADER <= lower <= upper <= self.psize and lower % 2 == 0):
                self.problem(pgno, db, f"bad free-space bounds lower={lower} upper={upper}")
                continue
            n = (lower - _PAGE_HEADER) // 2
            if n == 0:
                self.problem(pgno, db, "holds no nodes")
                continue
            for i, ptr in enumerate(struct.unpack_from(f"<{n}H", page, _PAGE_HEADER)):
                if not upper <= ptr <= self.psize - _NODE.size:
                    self.problem(pgno, db, f"node {i} at offset {ptr}, outside the page's nodes {upper}..{self.psize}")
                    break
                lo, hi, nflags, ksize = _NODE.unpack_from(page, ptr)
                data = ptr + _NODE.size + ksize
                if data > self.psize:
                    self.problem(pgno, db, f"node {i}: its {ksize}-byte key runs past the page")
                    break
                if kind == _P_BRANCH:
                    stack.append((lo | hi << 16 | nflags << 32, depth + 1))
                    continue
                size = lo | hi << 16
                if nflags & ~(_F_BIGDATA | _F_SUBDATA):  # no dupsort dbs in an index
                    self.problem(pgno, db, f"node {i}: unknown node flags {nflags:#x}")
                    break
                if nflags & _F_BIGDATA:
                    if data + 8 > self.psize:
                        self.problem(pgno, db, f"node {i}: its overflow page number runs past the page")
                        break
                    self.overflow(struct.unpack_from("<Q", page, data)[0], size, pgno, db, i)
                elif data + size > self.psize:
                    self.problem(pgno, db, f"node {i}: its {size}-byte value runs past the page")
                    break
                elif nflags & _F_SUBDATA:
                    if subdbs is None or size != _DB.size:
                        self.problem(pgno, db, f"node {i}: a sub-db record where none belongs")
                        break
                    subdbs[bytes(page[ptr + _NODE.size:data]).decode("utf-8", "replace")] = page[data:data + size]

    def overflow(self, first: int, size: int, parent: int, db: str, node: int) -> None:
        if not 2 <= first <= self.last_pg:
            self.problem(parent, db, f"node {node}: overflow page {first} outside the file's pages 2..{self.last_pg}")
            return
        stored, _, flags, pages = struct.unpack_from("<QHHI", self.read(first)[:16])
        if stored != first or not flags & _P_OVERFLOW or pages < 1 or first + pages - 1 > self.last_pg:
            self.problem(first, db, f"overflow run of node {node} of page {parent}: bad header "
                                    f"(page {stored}, flags {flags:#x}, {pages} pages)")
        elif size > pages * self.psize - _PAGE_HEADER:
            self.problem(parent, db, f"node {node}: a {size}-byte value in {pages} overflow pages")


def lmdb_page_problems(path, txnid: int, skip_larger_than: int | None = None, limit: int = 20) -> list[str] | None:
    """Problems of the page trees of the state with transaction id `txnid` (a read transaction of
    the caller keeps those pages from being reused meanwhile). None when neither header page holds
    `txnid` any more (commits went on meanwhile: the caller retries). A named db of more pages than
    `skip_larger_than` is not walked (readers bound the time they spend; verify walks everything)."""
    h = read_lmdb_header(path)
    if h is None or txnid not in h.txnid:
        return None
    which = h.txnid.index(txnid)
    problems: list[str] = []
    with open(Path(path) / DATA_FILE, "rb") as fh:
        pages = _Pages(fh.fileno(), h.psize, h.last_pg[which], problems, limit)
        subdbs: dict[str, bytes] = {}
        pages.tree(h.main_root[which], "main", subdbs)
        for name, raw in sorted(subdbs.items()):
            _, _, _, branch, leaf, _, _, root = _DB.unpack(raw)
            if skip_larger_than is not None and branch + leaf > skip_larger_than:
                continue
            pages.tree(root, name)
    return problems
