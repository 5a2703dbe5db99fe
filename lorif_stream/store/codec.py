"""Block codec: storage-dtype rounding + byte shuffle + zstd, with a self-checking header.

A block is the rank-c factors of `rows` consecutive examples of one layer:
L (rows, d_out, c) and R (rows, d_in, c). Both are rounded to the storage dtype, concatenated,
byte-shuffled (all first bytes, then all second bytes, ...) and compressed as one zstd frame with
its content checksum on. Shuffling puts the low-entropy exponent bytes next to each other, which
is what lets zstd shrink gradient values at all. Decoding unshuffles and widens to fp32 in one
numba pass straight into caller-provided arrays.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numba
import numpy as np
import zstandard

from .format import FORMAT_VERSION, SUPPORTED_VERSIONS, CorruptBlockError, UnsupportedVersionError

MAGIC = b"LRFB"
CODEC_SHUFFLE_ZSTD = 1

DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
DTYPE_NAMES = {v: k for k, v in DTYPE_CODES.items()}
DTYPE_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}

# magic, version, codec, dtype, rows, c, d_out, d_in, crc32 of the zstd frame; then the crc32 of
# these header bytes. The frame crc catches flips that zstd's own content checksum cannot see
# (unused header bits, entropy-table padding): every byte of a stored block is covered.
_HEADER = struct.Struct("<4sHBBIIIII")
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _HEADER_CRC.size


@dataclass(frozen=True)
class BlockHeader:
    version: int
    codec: int
    dtype: str
    rows: int
    c: int
    d_out: int
    d_in: int
    frame_crc: int = 0

    @property
    def numel(self) -> int:
        return self.rows * self.c * (self.d_out + self.d_in)

    @property
    def payload_bytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]


def pack_header(h: BlockHeader) -> bytes:
    body = _HEADER.pack(MAGIC, h.version, h.codec, DTYPE_CODES[h.dtype], h.rows, h.c, h.d_out, h.d_in, h.frame_crc)
    return body + _HEADER_CRC.pack(zlib.crc32(body))


def parse_header(value) -> BlockHeader:
    """Parse and check a block header; raises CorruptBlockError / UnsupportedVersionError."""
    mv = memoryview(value)
    if len(mv) < HEADER_SIZE:
        raise CorruptBlockError(f"block of {len(mv)} bytes is shorter than its {HEADER_SIZE}-byte header")
    body = mv[: _HEADER.size]
    (crc,) = _HEADER_CRC.unpack(mv[_HEADER.size : HEADER_SIZE])
    if zlib.crc32(body) != crc:
        raise CorruptBlockError("block header checksum mismatch")
    magic, version, codec, dtype_code, rows, c, d_out, d_in, frame_crc = _HEADER.unpack(body)
    if magic != MAGIC:
        raise CorruptBlockError(f"bad block magic {bytes(magic)!r}")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            f"block format version {version} is not supported (this lorif-stream reads {SUPPORTED_VERSIONS})"
        )
    if codec != CODEC_SHUFFLE_ZSTD:
        raise CorruptBlockError(f"unknown block codec {codec}")
    if dtype_code not in DTYPE_NAMES:
        raise CorruptBlockError(f"unknown block dtype code {dtype_code}")
    return BlockHeader(version, codec, DTYPE_NAMES[dtype_code], rows, c, d_out, d_in, frame_crc)


# ---------------------------------------------------------------- numba kernels
# nogil so several loader threads decode at once; serial inside (the caller owns parallelism).


@numba.njit(nogil=True, cache=True)
def _shuffle_bf16_from_f32(src_bits, lo, hi):
    """Round fp32 -> bf16 and split into the low-byte and high-byte planes `lo`, `hi`.
    Returns how many inputs were NaN/inf (the caller refuses the block).
    The planes are separate arrays, not offsets into one: numba then knows the writes cannot
    alias and vectorizes the loop (5x faster than one shuffled array)."""
    bad = np.int64(0)
    for i in range(src_bits.shape[0]):
        b = src_bits[i]
        bad += np.int64(((b >> np.uint32(23)) & np.uint32(0xFF)) == np.uint32(0xFF))
        # round to nearest even, exactly as torch's float -> bfloat16
        bf = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        lo[i] = np.uint8(bf & np.uint32(0xFF))
        hi[i] = np.uint8(bf >> np.uint32(8))
    return bad


@numba.njit(nogil=True, cache=True)
def _unshuffle_bf16_to_f32(lo, hi, dst_bits):
    for i in range(dst_bits.shape[0]):
        dst_bits[i] = (np.uint32(hi[i]) << np.uint32(24)) | (np.uint32(lo[i]) << np.uint32(16))


@numba.njit(nogil=True, cache=True)
def _shuffle(src_bytes, itemsize, numel, start, dst):
    for i in range(src_bytes.shape[0] // itemsize):
        for b in range(itemsize):
            dst[b * numel + start + i] = src_bytes[i * itemsize + b]


@numba.njit(nogil=True, cache=True)
def _unshuffle(src, itemsize, numel, start, dst_bytes):
    for i in range(dst_bytes.shape[0] // itemsize):
        for b in range(itemsize):
            dst_bytes[i * itemsize + b] = src[b * numel + start + i]


def _compression_params(level: int) -> zstandard.ZstdCompressionParameters:
    """zstd's parameters for `level`, with a small match table at the fast levels.

    Shuffled gradient bytes have almost no long repeats: the bytes are saved by entropy-coding
    the exponent plane, not by matching. zstd's level-1 table (hash_log 14+) spends most of the
    time probing for matches that rarely pay; hash_log 8 keeps the few real ones (runs of
    zeros, repeated exponents) and made level 1 2.3x faster and 0.8% smaller on GPT-2-like
    factors (benchmarks/bench_store.py). Levels >= 2 use other strategies and are left as zstd
    sets them."""
    params = dict(write_checksum=1, write_content_size=1)
    if level <= 1:
        params["hash_log"] = 8
    return zstandard.ZstdCompressionParameters.from_level(level, **params)


# ---------------------------------------------------------------- encode


class BlockEncoder:
    """Encodes factor blocks. Not thread-safe (owns a zstd compressor): one per thread."""

    def __init__(self, dtype: str = "bf16", level: int = 1):
        if dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_CODES)}")
        if not -7 <= level <= 22:
            raise ValueError(f"zstd level {level} is outside [-7, 22]")
        self.dtype = dtype
        self.level = level
        self._cctx = zstandard.ZstdCompressor(compression_params=_compression_params(level))
        self._scratch = np.empty(0, np.uint8)

    def encode(self, L: np.ndarray, R: np.ndarray) -> bytes:
        """L (rows, d_out, c), R (rows, d_in, c) float32 -> header + zstd frame.

        Raises NonFiniteError when any value is NaN/inf (nothing is encoded then)."""
        rows, d_out, c = L.shape
        d_in = R.shape[1]
        parts = [np.ascontiguousarray(L, np.float32).reshape(-1), np.ascontiguousarray(R, np.float32).reshape(-1)]
        numel = parts[0].size + parts[1].size
        itemsize = DTYPE_ITEMSIZE[self.dtype]
        nbytes = numel * itemsize
        if self._scratch.size < nbytes:
            self._scratch = np.empty(nbytes, np.uint8)
        out = self._scratch[:nbytes]
        start = 0
        for name, flat in zip("LR", parts):
            if self.dtype == "bf16":
                end = start + flat.size
                bad = _shuffle_bf16_from_f32(flat.view(np.uint32), out[start:end], out[numel + start:numel + end])
            else:
                bad = int((~np.isfinite(flat)).sum())
                plain = flat.astype(np.float16) if self.dtype == "fp16" else flat
                _shuffle(plain.view(np.uint8), itemsize, numel, start, out)
            if bad:
                raise NonFiniteError(name, flat.reshape(rows, -1))
            start += flat.size
        frame = self._cctx.compress(out)
        header = BlockHeader(FORMAT_VERSION, CODEC_SHUFFLE_ZSTD, self.dtype, rows, c, d_out, d_in, zlib.crc32(frame))
        return pack_header(header) + frame


class NonFiniteError(ValueError):
    def __init__(self, which: str, values: np.ndarray):
        self.which = which
        self.first_bad_row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        super().__init__(f"non-finite value in {which} of block row {self.first_bad_row}")


# ---------------------------------------------------------------- decode


class BlockDecoder:
    """Decodes blocks into caller-provided fp32 arrays. One per thread (owns a zstd decompressor)."""

    def __init__(self):
        self._dctx = zstandard.ZstdDecompressor()
        self._scratch = np.empty(0, np.uint8)
        self._plain = np.empty(0, np.uint8)

    def decode_into(self, value, L_out: np.ndarray, R_out: np.ndarray) -> BlockHeader:
        """Decode `value` (bytes or a zero-copy buffer) into L_out[:rows], R_out[:rows].

        L_out / R_out are float32 arrays of shape (>= rows, d_out, c) / (>= rows, d_in, c).
        Raises CorruptBlockError when the header, frame or content checksum does not hold.
        """
        h = parse_header(value)
        if L_out.shape[0] < h.rows or L_out.shape[1:] != (h.d_out, h.c) or R_out.shape[1:] != (h.d_in, h.c):
            raise ValueError(
                f"output buffers {L_out.shape}/{R_out.shape} cannot hold a block of "
                f"{h.rows} rows, d_out={h.d_out}, d_in={h.d_in}, c={h.c}"
            )
        frame = memoryview(value)[HEADER_SIZE:]
        if zlib.crc32(frame) != h.frame_crc:
            raise CorruptBlockError("block data checksum mismatch")
        raw = self._decompress(frame, h.payload_bytes)
        n_l = h.rows * h.d_out * h.c
        n_r = h.rows * h.d_in * h.c
        L_flat = _flat_view(L_out, n_l)
        R_flat = _flat_view(R_out, n_r)
        if h.dtype == "bf16":
            lo, hi = raw[: h.numel], raw[h.numel :]
            _unshuffle_bf16_to_f32(lo[:n_l], hi[:n_l], L_flat.view(np.uint32))
            _unshuffle_bf16_to_f32(lo[n_l:], hi[n_l:], R_flat.view(np.uint32))
        else:
            itemsize = DTYPE_ITEMSIZE[h.dtype]
            for flat, start, n in ((L_flat, 0, n_l), (R_flat, n_l, n_r)):
                plain = self._plain_scratch(n * itemsize)
                _unshuffle(raw, itemsize, h.numel, start, plain)
                flat[:] = plain.view(np.float16 if h.dtype == "fp16" else np.float32)
        return h

    def _plain_scratch(self, nbytes: int) -> np.ndarray:
        if self._plain.size < nbytes:
            self._plain = np.empty(nbytes, np.uint8)
        return self._plain[:nbytes]

    def _decompress(self, frame: memoryview, expected: int) -> np.ndarray:
        if self._scratch.size < expected:
            self._scratch = np.empty(expected, np.uint8)
        out = self._scratch[:expected]
        try:
            reader = self._dctx.stream_reader(frame)
            view = memoryview(out)
            got = 0
            while got < expected:
                k = reader.readinto(view[got:])
                if k == 0:
                    break
                got += k
            extra = reader.read(1)
        except zstandard.ZstdError as e:
            raise CorruptBlockError(f"zstd frame does not decode ({e})") from None
        if got != expected or extra:
            raise CorruptBlockError(f"zstd frame holds a different size than its header says ({expected} bytes)")
        return out


def _flat_view(buf: np.ndarray, n: int) -> np.ndarray:
    """First n values of a C-contiguous float32 buffer, as a 1-D view (never a copy)."""
    if buf.dtype != np.float32 or not buf.flags.c_contiguous:
        raise ValueError(f"decode buffers must be C-contiguous float32, got {buf.dtype} contiguous={buf.flags.c_contiguous}")
    return buf.reshape(-1)[:n]
