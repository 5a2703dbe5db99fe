"""The block loader's ring, the pinned decode buffers, the device-capped memory budget and the
row-stable top-k: what of the CUDA path's fixes a CPU can check (tests/test_cuda.py runs the rest)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lorif_stream import config as cfg
from lorif_stream.gpu import DeviceTimer, exact_fp32
from lorif_stream.loader import BlockLoader
from lorif_stream.query import TopK
from lorif_stream.store import BlockBuffers, IndexLayout, IndexReader, IndexWriter, LayerShape
from lorif_stream.store import lmdb_store

LAYOUT = IndexLayout((LayerShape("a", 6, 5), LayerShape("b", 4, 7)), c=2, dtype="fp32", block_size=8)
# blocks longer than block_size, as a build writes them when the batch size does not divide it
BLOCKS = [11, 8, 13, 3]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "idx"
    rng = np.random.default_rng(0)
    with IndexWriter.create(path, LAYOUT, {}, durability="nosync") as w:
        first = 0
        for n in BLOCKS:
            factors = [(rng.standard_normal((n, l.d_out, 2)).astype(np.float32),
                        rng.standard_normal((n, l.d_in, 2)).astype(np.float32)) for l in LAYOUT.layers]
            w.append(first, factors, [f"r{first + i}" for i in range(n)])
            first += n
    return path


def run_with_deadline(fn, seconds: float = 30.0):
    """fn() in a thread; fails (instead of hanging the suite) when it does not return in time."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised below
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"did not finish in {seconds}s (a deadlocked ring?)"
    if "error" in out:
        raise out["error"]
    return out["value"]


def collect(loader) -> list:
    # CPU tensors view a ring buffer until the next block: copy each block before asking for it
    return [(first, n, [(L.clone(), R.clone()) for L, R in f]) for first, n, f in loader]


def reference(snap, layers, start=0, stop=None) -> list:
    return [(first, n, [(torch.from_numpy(L.copy()), torch.from_numpy(R.copy())) for L, R in f])
            for first, n, f in snap.blocks(start, stop, layers=layers)]


def assert_same_blocks(got, want):
    assert [(f, n) for f, n, _ in got] == [(f, n) for f, n, _ in want]
    for (_, _, a), (_, _, b) in zip(got, want):
        for (La, Ra), (Lb, Rb) in zip(a, b):
            assert torch.equal(La, Lb) and torch.equal(Ra, Rb)


@pytest.mark.parametrize("buffers,threads", [(1, 1), (1, 0), (2, 1), (1, 2), (3, 0)])
def test_ring_of_any_size_never_deadlocks_and_yields_every_block(index, buffers, threads):
    with IndexReader(index) as r, r.snapshot() as snap:
        want = reference(snap, [0, 1])
        got = run_with_deadline(lambda: collect(BlockLoader(snap, [0, 1], torch.device("cpu"), buffers=buffers,
                                                            threads=threads)))
    assert sum(n for _, n, _ in got) == sum(BLOCKS)
    assert_same_blocks(got, want)


@pytest.mark.parametrize("threads", [0, 1])
def test_loader_reads_a_row_range_cut_inside_blocks(index, threads):
    with IndexReader(index) as r, r.snapshot() as snap:
        want = reference(snap, [1], 5, 30)
        got = run_with_deadline(lambda: collect(BlockLoader(snap, [1], torch.device("cpu"), buffers=1, threads=threads,
                                                            start=5, stop=30)))
    assert got[0][0] == 5 and sum(n for _, n, _ in got) == 25
    assert_same_blocks(got, want)


def test_loader_stopped_early_releases_its_thread(index):
    with IndexReader(index) as r, r.snapshot() as snap:
        def first_only():
            it = iter(BlockLoader(snap, [0, 1], torch.device("cpu"), buffers=1, threads=1))
            next(it)
            it.close()  # the consumer leaves: the loader thread waiting for a buffer must end
            return True

        assert run_with_deadline(first_only)
    assert not [t for t in threading.enumerate() if t.name == "lorif-block-loader"]


def test_loader_refuses_an_empty_ring(index):
    with IndexReader(index) as r, r.snapshot() as snap:
        with pytest.raises(ValueError, match="buffers=0"):
            BlockLoader(snap, [0], torch.device("cpu"), buffers=0)


def test_pinned_buffers_stay_pinned_when_a_block_outgrows_them(monkeypatch):
    made = []

    def fake_pinned(shape):  # stands in for page-locked memory, which needs a CUDA torch
        made.append(shape)
        return np.empty(shape, np.float32)

    monkeypatch.setattr(lmdb_store, "_pinned_empty", fake_pinned)
    bufs = BlockBuffers(LAYOUT, pin=True)
    assert made == [(8, 6, 2), (8, 4, 2), (8, 5, 2), (8, 7, 2)]
    made.clear()
    bufs.ensure(13)
    assert bufs.pin and bufs.rows == 13
    assert made == [(13, 6, 2), (13, 4, 2), (13, 5, 2), (13, 7, 2)]
    assert [L.shape for L in bufs.L] == [(13, 6, 2), (13, 4, 2)]
    made.clear()
    BlockBuffers(LAYOUT).ensure(20)  # plain buffers never ask for pinned memory
    assert made == []


def test_memory_budget_is_capped_by_the_device_memory(monkeypatch):
    class RAM:
        available = 64 * 10**9

    monkeypatch.setattr(cfg.psutil, "virtual_memory", lambda: RAM)
    assert cfg.default_memory_budget() == 32 * 10**9
    assert cfg.default_memory_budget("cuda", device_free=16 * 10**9) == 8 * 10**9
    # a device with more free memory than the host's share changes nothing
    assert cfg.default_memory_budget("cuda:0", device_free=512 * 10**9) == 32 * 10**9
    # no GPU seen: the CPU's budget
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cfg.cuda_free_memory("auto") is None and cfg.cuda_free_memory("cuda") is None
    assert cfg.cuda_free_memory("cpu") is None
    assert cfg.QueryConfig(device="cpu").budget() == 32 * 10**9
    # an explicit budget is the user's
    assert cfg.QueryConfig(device="cuda", memory_budget=10**12).budget() == 10**12


def test_query_budget_follows_the_device_memory(monkeypatch):
    class RAM:
        available = 64 * 10**9

    monkeypatch.setattr(cfg.psutil, "virtual_memory", lambda: RAM)
    monkeypatch.setattr(cfg, "cuda_free_memory", lambda device: 4 * 10**9 if str(device).startswith("cuda") else None)
    assert cfg.QueryConfig(device="cuda").budget() == 2 * 10**9
    assert cfg.BuildConfig(device="cuda:1").budget() == 2 * 10**9
    assert cfg.BuildConfig(device="cpu").budget() == 32 * 10**9


def test_topk_ranks_equal_scores_by_row_within_and_across_blocks():
    top = TopK(2, 3, torch.device("cpu"))
    # query 0: every score equal (zero rows); query 1: a tie at the cut
    top.update(torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 5.0, 2.0, 2.0]]), first_row=10)
    top.update(torch.tensor([[0.0, 0.0, 0.0], [2.0, 5.0, 0.5]]), first_row=2)
    assert top.top_rows.tolist() == [[2, 3, 4], [3, 11, 2]]  # 2.0 at rows 2, 12, 13: row 2
    assert top.top.tolist() == [[0.0, 0.0, 0.0], [5.0, 5.0, 2.0]]
    assert top.bottom_rows.tolist() == [[2, 3, 4], [4, 10, 2]]
    assert top.bottom.tolist() == [[0.0, 0.0, 0.0], [0.5, 1.0, 2.0]]


def test_topk_without_ties_equals_torch_topk():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 50, generator=g)
    top = TopK(4, 7, torch.device("cpu"))
    for s in range(0, 50, 16):
        top.update(scores[:, s:s + 16], first_row=s)
    want = torch.topk(scores, 7, dim=1)
    assert torch.equal(top.top, want.values) and torch.equal(top.top_rows, want.indices)
    low = torch.topk(scores, 7, dim=1, largest=False)
    assert torch.equal(top.bottom, low.values) and torch.equal(top.bottom_rows, low.indices)


def test_exact_fp32_pins_highest_and_restores_the_callers_setting():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with exact_fp32():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_device_timer_on_the_cpu_sums_its_sections():
    timer = DeviceTimer(torch.device("cpu"))
    with timer.section():
        sum(range(10000))
    first = timer.seconds
    assert first > 0
    with timer.section():
        sum(range(10000))
    assert timer.seconds > first
