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
import zlib
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class LmdbHeader:
    psize: int
    last_pg: tuple[int, int]
    txnid: tuple[int, int]
    file_size: int

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
        magic, version, _, _, db0, _, last0, txn0 = _META.unpack_from(head, _PAGE_HEADER)
        psize = struct.unpack_from("<I", db0, 0)[0]
        if magic != _MDB_MAGIC or not 512 <= psize <= _MAX_PSIZE or psize & (psize - 1):
            return None
        fh.seek(psize)
        page1 = fh.read(_PAGE_HEADER + _META.size)
    if len(page1) < _PAGE_HEADER + _META.size:
        raise IndexCorruptError(f"index {path} is truncated: {DATA_FILE} has {size} bytes, "
                                f"LMDB needs at least {2 * psize}")
    magic1, _, _, _, _, _, last1, txn1 = _META.unpack_from(page1, _PAGE_HEADER)
    if magic1 != _MDB_MAGIC:
        raise IndexCorruptError(f"index {path} is corrupt: LMDB's second header page has a bad magic number")
    return LmdbHeader(psize, (last0, last1), (txn0, txn1), size)


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
