"""Big-endian keys, so LMDB's byte order equals (layer, row) order and one layer is one key range."""
from __future__ import annotations

import struct

from .format import CorruptBlockError

_FACTOR_KEY = struct.Struct(">HQ")
_ROW_KEY = struct.Struct(">Q")
FACTOR_KEY_SIZE = _FACTOR_KEY.size

ROW_PREFIX = b"r"  # ids db: b"r" + row (u64 BE) -> example id (utf-8)
ID_PREFIX = b"i"  # ids db: b"i" + example id (utf-8) -> row (u64 BE)


def factor_key(layer: int, first_row: int) -> bytes:
    if not 0 <= layer < 1 << 16:
        raise ValueError(f"layer index {layer} does not fit in u16")
    return _FACTOR_KEY.pack(layer, first_row)


def parse_factor_key(key) -> tuple[int, int]:
    key = bytes(key)
    if len(key) != FACTOR_KEY_SIZE:
        raise CorruptBlockError(f"factors: key {key[:16].hex()} is not a (layer, row) block key")
    return _FACTOR_KEY.unpack(key)


def layer_range(layer: int) -> tuple[bytes, bytes]:
    """Half-open key range [start, end) holding every block of one layer."""
    return factor_key(layer, 0), _FACTOR_KEY.pack(layer + 1, 0) if layer + 1 < 1 << 16 else b"\xff" * 11


def row_to_id_key(row: int) -> bytes:
    return ROW_PREFIX + _ROW_KEY.pack(row)


def id_to_row_key(example_id: str) -> bytes:
    return ID_PREFIX + example_id.encode("utf-8")


def pack_row(row: int) -> bytes:
    return _ROW_KEY.pack(row)


def unpack_row(value) -> int:
    return _ROW_KEY.unpack(bytes(value))[0]
