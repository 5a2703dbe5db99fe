"""The factor store: codec round trips, write invariants, corruption, crashes, versions."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lorif_stream.store import (
    BlockDecoder,
    BlockEncoder,
    CorruptBlockError,
    IndexLayout,
    IndexReader,
    IndexWriter,
    LayerShape,
    NotAnIndexError,
    UnsupportedVersionError,
    WriteRefusedError,
)
from lorif_stream.store.verify import verify_snapshot

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """Torch's own rounding to the storage dtype, widened back: the oracle for every codec."""
    return torch.from_numpy(x).to(TORCH_DTYPES[dtype]).float().numpy()


def random_factors(rng, layout: IndexLayout, n: int):
    scale = np.exp(rng.uniform(-20, 10))  # gradients span many orders of magnitude
    return [
        (
            (rng.standard_normal((n, l.d_out, layout.c)) * scale).astype(np.float32),
            rng.standard_normal((n, l.d_in, layout.c)).astype(np.float32),
        )
        for l in layout.layers
    ]


def write_index(path, layout, block_rows, seed=0, durability="sync", map_size=1 << 24):
    rng = np.random.default_rng(seed)
    blocks = []
    with IndexWriter.create(path, layout, {"test": True}, durability=durability, map_size=map_size) as w:
        for n in block_rows:
            factors = random_factors(rng, layout, n)
            ids = [f"ex-{w.rows + i}" for i in range(n)]
            w.append(w.rows, factors, ids)
            blocks.append(factors)
    return blocks


def concat_layer(blocks, layer):
    return (np.concatenate([b[layer][0] for b in blocks]), np.concatenate([b[layer][1] for b in blocks]))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_codec_round_trip_matches_torch_rounding(dtype):
    rng = np.random.default_rng(1)
    L = rng.standard_normal((37, 16, 3)).astype(np.float32) * 1e-3
    R = rng.standard_normal((37, 9, 3)).astype(np.float32)
    L[0, 0, 0] = 1.00390625  # a bf16 rounding tie: round-to-nearest-even must match torch
    value = BlockEncoder(dtype).encode(L, R)
    L_out = np.full((64, 16, 3), np.nan, np.float32)
    R_out = np.full((64, 9, 3), np.nan, np.float32)
    h = BlockDecoder().decode_into(value, L_out, R_out)
    assert (h.rows, h.c, h.d_out, h.d_in, h.dtype) == (37, 3, 16, 9, dtype)
    np.testing.assert_array_equal(L_out[:37], rounded(L, dtype))
    np.testing.assert_array_equal(R_out[:37], rounded(R, dtype))
    assert np.isnan(L_out[37:]).all(), "decode wrote past the block's rows"


def test_bf16_compresses_below_raw_size():
    rng = np.random.default_rng(2)
    L = rng.standard_normal((512, 192, 1)).astype(np.float32)
    R = rng.standard_normal((512, 768, 1)).astype(np.float32)
    value = BlockEncoder("bf16").encode(L, R)
    assert len(value) <= 0.75 * (L.size + R.size) * 2


@settings(max_examples=25, deadline=None)
@given(
    dims=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20)), min_size=1, max_size=3),
    c=st.integers(1, 4),
    dtype=st.sampled_from(["bf16", "fp16", "fp32"]),
    block_rows=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    window=st.tuples(st.integers(0, 60), st.integers(0, 60)),
    seed=st.integers(0, 2**31),
)
def test_index_round_trip_property(tmp_path_factory, dims, c, dtype, block_rows, window, seed):
    layout = IndexLayout(tuple(LayerShape(f"layer{i}", o, n) for i, (o, n) in enumerate(dims)), c=c, dtype=dtype,
                         block_size=max(block_rows))
    path = tmp_path_factory.mktemp("idx") / "index"
    blocks = write_index(path, layout, block_rows, seed=seed)
    total = sum(block_rows)
    start, stop = sorted(window)
    stop = min(stop, total)
    with IndexReader(path) as reader, reader.snapshot() as snap:
        assert snap.rows == total
        for li in range(len(dims)):
            L_ref, R_ref = concat_layer(blocks, li)
            got = [(L.copy(), R.copy()) for _, _, f in snap.blocks(start, stop) for L, R in [f[li]]]
            L_got = np.concatenate([g[0] for g in got]) if got else L_ref[:0]
            R_got = np.concatenate([g[1] for g in got]) if got else R_ref[:0]
            np.testing.assert_array_equal(L_got, rounded(L_ref[start:stop] if start < stop else L_ref[:0], dtype))
            np.testing.assert_array_equal(R_got, rounded(R_ref[start:stop] if start < stop else R_ref[:0], dtype))
        row = total - 1
        L_row, R_row = snap.row(row)[0]
        np.testing.assert_array_equal(L_row, rounded(concat_layer(blocks, 0)[0][row], dtype))
        assert snap.id_of(row) == f"ex-{row}" and snap.row_of(f"ex-{row}") == row
        assert snap.ids(0, total) == [f"ex-{i}" for i in range(total)]
        assert verify_snapshot(snap).ok


def small_layout(dtype="bf16"):
    return IndexLayout((LayerShape("attn", 8, 6), LayerShape("mlp", 5, 12)), c=2, dtype=dtype, block_size=16)


def test_flipped_byte_anywhere_in_a_block_is_reported(tmp_path):
    layout = small_layout()
    path = tmp_path / "index"
    write_index(path, layout, [16, 16, 16])
    with IndexReader(path) as r, r.snapshot() as s:
        victim = bytes(s.value_at(1, 16))  # layer "mlp", rows 16..31
    data_file = path / "data.mdb"
    clean = data_file.read_bytes()
    # copy-on-write leaves stale copies of rewritten pages in the file: corrupt every copy
    offsets = _all_offsets(clean, victim)
    assert offsets
    rng = np.random.default_rng(3)
    positions = sorted({0, 5, len(victim) - 1, *rng.integers(0, len(victim), 12).tolist()})
    for pos in positions:
        corrupted = bytearray(clean)
        for offset in offsets:
            corrupted[offset + pos] ^= 0x5A
        data_file.write_bytes(bytes(corrupted))
        with IndexReader(path) as r, r.snapshot() as s:
            report = verify_snapshot(s)
            assert not report.ok, f"flip at byte {pos} went unnoticed"
            assert any("'mlp'" in e and "row 16" in e for e in report.errors), report.errors
            with pytest.raises(CorruptBlockError, match=r"layer 'mlp' block at row 16"):
                for _ in s.blocks(0, 48):
                    pass
            # blocks that were not touched still read
            assert sum(n for _, n, _ in s.blocks(0, 16)) == 16
    data_file.write_bytes(clean)
    with IndexReader(path) as r, r.snapshot() as s:
        assert verify_snapshot(s).ok


def _all_offsets(haystack: bytes, needle: bytes) -> list[int]:
    out, i = [], haystack.find(needle)
    while i >= 0:
        out.append(i)
        i = haystack.find(needle, i + 1)
    return out


def test_write_refusals_name_layer_and_rows(tmp_path):
    layout = small_layout()
    rng = np.random.default_rng(4)
    with IndexWriter.create(tmp_path / "i", layout, {}) as w:
        w.append(0, random_factors(rng, layout, 4), ["a", "b", "c", "d"])
        with pytest.raises(WriteRefusedError, match="gap"):
            w.append(6, random_factors(rng, layout, 2), ["x", "y"])
        with pytest.raises(WriteRefusedError, match="overlap"):
            w.append(2, random_factors(rng, layout, 2), ["x", "y"])
        bad = random_factors(rng, layout, 2)
        bad[1] = (bad[1][0][:, :4], bad[1][1])
        with pytest.raises(WriteRefusedError, match=r"layer 'mlp' rows 4\.\.5.*shapes"):
            w.append(4, bad, ["x", "y"])
        bad = random_factors(rng, layout, 2)
        bad[0] = (bad[0][0].astype(np.float64), bad[0][1])
        with pytest.raises(WriteRefusedError, match="float32"):
            w.append(4, bad, ["x", "y"])
        bad = random_factors(rng, layout, 2)
        bad[1][1][1, 3, 0] = np.nan
        with pytest.raises(WriteRefusedError, match=r"layer 'mlp'.*row 5"):
            w.append(4, bad, ["x", "y"])
        bad[1][1][1, 3, 0] = np.inf
        with pytest.raises(WriteRefusedError, match="non-finite"):
            w.append(4, bad, ["x", "y"])
        with pytest.raises(WriteRefusedError, match=r"'b' \(row 5\) is already in the index at row 1$"):
            w.append(4, random_factors(rng, layout, 2), ["x", "b"])
        with pytest.raises(WriteRefusedError, match=r"'x' \(row 5\) is already in the index at row 4 \(this block\)"):
            w.append(4, random_factors(rng, layout, 2), ["x", "x"])
        with pytest.raises(WriteRefusedError, match=r"example id of row 5 is 600 bytes long; ids must be at most 510"):
            w.append(4, random_factors(rng, layout, 2), ["x", "é" * 300])
        assert w.rows == 4
        w.append(4, random_factors(rng, layout, 2), ["x", "y"])
    with IndexReader(tmp_path / "i") as r, r.snapshot() as s:
        assert s.rows == 6 and s.ids(0, 6) == ["a", "b", "c", "d", "x", "y"] and verify_snapshot(s).ok


def test_allowed_duplicate_ids_keep_their_first_row(tmp_path):
    layout = small_layout()
    rng = np.random.default_rng(5)
    with IndexWriter.create(tmp_path / "i", layout, {}) as w:
        w.append(0, random_factors(rng, layout, 3), ["a", "b", "a"], allow_duplicate_ids=True)
        w.append(3, random_factors(rng, layout, 2), ["b", "c"], allow_duplicate_ids=True)
    with IndexReader(tmp_path / "i") as r, r.snapshot() as s:
        assert s.ids(0, 5) == ["a", "b", "a", "b", "c"]
        assert [s.row_of(i) for i in "abc"] == [0, 1, 4]


def test_map_grows_beyond_initial_size(tmp_path):
    layout = IndexLayout((LayerShape("big", 64, 64),), c=4, dtype="fp32", block_size=256)
    blocks = write_index(tmp_path / "i", layout, [256] * 12, map_size=1 << 20)
    with IndexReader(tmp_path / "i") as r, r.snapshot() as s:
        assert r.disk_bytes() > 4 << 20
        assert s.rows == 256 * 12 and verify_snapshot(s).ok
        L, _ = s.row(3000)[0]
        np.testing.assert_array_equal(L, concat_layer(blocks, 0)[0][3000])


def test_state_arrays_round_trip_in_chunks(tmp_path, monkeypatch):
    from lorif_stream.store import lmdb_store

    monkeypatch.setattr(lmdb_store, "_ARRAY_CHUNK", 1000)
    arr = np.random.default_rng(0).standard_normal((123, 7)).astype(np.float32)
    with IndexWriter.create(tmp_path / "i", small_layout(), {}) as w:
        w.put_state({"sketch/0/Y": arr}, {"sketch": {"rows": 5}})
        np.testing.assert_array_equal(w.get_array("sketch/0/Y"), arr)
        w.put_state({"sketch/0/Y": arr[:3]})
    with IndexReader(tmp_path / "i") as r, r.snapshot() as s:
        np.testing.assert_array_equal(s.array("sketch/0/Y"), arr[:3])
        assert s.state_meta("sketch") == {"rows": 5} and s.array("nope") is None


def test_open_errors(tmp_path):
    with pytest.raises(NotAnIndexError, match="does not exist"):
        IndexReader(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(NotAnIndexError, match="not a lorif-stream index"):
        IndexReader(tmp_path / "plain")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.mdb").write_bytes(b"\x00" * 100)
    with pytest.raises(NotAnIndexError):
        IndexReader(tmp_path / "junk")
    other = lmdb.open(str(tmp_path / "other"), max_dbs=2)
    other.open_db(b"something")
    other.close()
    with pytest.raises(NotAnIndexError, match="not a lorif-stream index"):
        IndexReader(tmp_path / "other")
    write_index(tmp_path / "i", small_layout(), [3])
    with pytest.raises(WriteRefusedError, match="already holds an index"):
        IndexWriter.create(tmp_path / "i", small_layout(), {})


def test_unknown_format_version_is_rejected(tmp_path):
    write_index(tmp_path / "i", small_layout(), [3])
    env = lmdb.open(str(tmp_path / "i"), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"format_version", b"99")
    env.close()
    for opener in (IndexReader, IndexWriter.open):
        with pytest.raises(UnsupportedVersionError, match="format version 99"):
            opener(tmp_path / "i")


def test_unknown_block_version_is_rejected(tmp_path):
    import struct
    import zlib

    from lorif_stream.store.codec import HEADER_SIZE

    value = bytearray(BlockEncoder("bf16").encode(np.ones((2, 3, 1), np.float32), np.ones((2, 4, 1), np.float32)))
    value[4:6] = struct.pack("<H", 7)
    value[HEADER_SIZE - 4 : HEADER_SIZE] = struct.pack("<I", zlib.crc32(bytes(value[: HEADER_SIZE - 4])))
    with pytest.raises(UnsupportedVersionError, match="version 7"):
        BlockDecoder().decode_into(bytes(value), np.empty((2, 3, 1), np.float32), np.empty((2, 4, 1), np.float32))


KILLED_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from lorif_stream.store import IndexLayout, IndexWriter, LayerShape
    layout = IndexLayout((LayerShape("a", 64, 48), LayerShape("b", 32, 96)), c=2, dtype="bf16", block_size=50)
    w = IndexWriter.create(sys.argv[1], layout, {}, durability=sys.argv[2], map_size=1 << 20)
    while True:
        rng = np.random.default_rng(w.rows)
        factors = [(rng.standard_normal((50, l.d_out, 2), dtype=np.float32),
                    rng.standard_normal((50, l.d_in, 2), dtype=np.float32)) for l in layout.layers]
        w.append(w.rows, factors, [f"id{w.rows + i}" for i in range(50)])
        print(w.rows, flush=True)
    """
)


@pytest.mark.parametrize("durability", ["sync", "nosync"])
def test_sigkill_mid_write_keeps_last_committed_transaction(tmp_path, durability):
    path = tmp_path / "i"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), durability],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    reported = 0
    while reported < 400:  # also exercises map growth while being killed
        line = proc.stdout.readline()
        assert line, "writer died before being killed"
        reported = int(line)
    time.sleep(np.random.default_rng().uniform(0, 0.05))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with IndexReader(path) as r, r.snapshot() as s:
        assert s.rows >= reported and s.rows % 50 == 0
        assert verify_snapshot(s).ok
        layout = r.layout
        for first_row, n, factors in s.blocks():
            rng = np.random.default_rng(first_row)
            for (L, R), l in zip(factors, layout.layers):
                np.testing.assert_array_equal(L, rounded(rng.standard_normal((50, l.d_out, 2), dtype=np.float32), "bf16"))
                np.testing.assert_array_equal(R, rounded(rng.standard_normal((50, l.d_in, 2), dtype=np.float32), "bf16"))
        assert list(s.layer_values(0, s.rows, s.rows + 1000)) == []
        assert s.ids(0, s.rows + 100) == [f"id{i}" for i in range(s.rows)]
    # the survivor can be reopened for writing and continues exactly where it stopped
    with IndexWriter.open(path) as w:
        rows = w.rows
        w.append(rows, [(np.zeros((1, l.d_out, 2), np.float32), np.zeros((1, l.d_in, 2), np.float32)) for l in layout.layers], ["last"])
    with IndexReader(path) as r, r.snapshot() as s:
        assert s.rows == rows + 1 and verify_snapshot(s).ok
