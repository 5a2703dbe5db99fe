"""The CUDA paths against the CPU results: device factorisation, capture on the device (fp32,
bf16, bf16 autocast), builds on the device (fp32 and under bf16 autocast), and the device query
(pinned host buffers, a side stream copying block n+1 while block n is scored) in the regime
where a stream race would show: many queries, no scores file, rings of 1-3 buffers, blocks
longer than block_size, top-k results compared, not only scores. Marked `cuda`: skipped cleanly without a GPU; run by
benchmarks/gpu_check.sh. Every path here has its CPU twin in the rest of the suite.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lorif_stream as ls
from lorif_stream.capture import GradientCapture, tracked_layers
from lorif_stream.factorize import factorize
from lorif_stream.projection import ProjectionSpec, make_projections

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests" / "tasks"))
sys.path.insert(0, str(ROOT / "tests"))
import seq_task  # noqa: E402
from helpers_models import tiny_gpt2  # noqa: E402


def gradient_like(B: int, d_out: int, d_in: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, 64)
    a = torch.randn(B, 64, d_out, generator=g) * scale[:, None]
    return a.mT @ torch.randn(B, 64, d_in, generator=g)


@pytest.mark.parametrize("c", [1, 4])
def test_device_factorisation_matches_cpu_svd(c):
    G = gradient_like(16, 96, 160, seed=c)
    L, R = factorize(G.cuda(), c, "power")  # Cholesky-QR power iteration: the GPU path
    Ls, Rs = factorize(G, c, "svd")
    residual = (G - (L @ R.mT).cpu()).flatten(1).norm(dim=1)
    optimum = (G - Ls @ Rs.mT).flatten(1).norm(dim=1)  # Eckart-Young: the best rank-c error
    assert float((residual / optimum).max()) < 1.001
    np.testing.assert_allclose(L.norm(dim=1).cpu(), Ls.norm(dim=1), rtol=1e-3)


def gpt2_losses(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_capture_matches_cpu(dtype):
    ids = torch.randint(3, 97, (6, 16), generator=torch.Generator().manual_seed(2))
    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_gpt2().to(device)
        if device == "cuda":
            model = model.to(dtype)
        layers = tracked_layers(model, None, 2, 1)
        projections = make_projections(layers, ProjectionSpec(f=2, seed=4), device)
        with GradientCapture(model, layers, projections) as cap:
            results[device] = cap.projected_gradients(gpt2_losses(model, ids.to(device)))
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for name, G in results["cpu"].items():
        got = results["cuda"][name]
        assert got.dtype == torch.float32 and got.device.type == "cuda"
        err = (got.cpu() - G).norm() / G.norm()
        assert err < tol, f"{name}: relative error {err:.3g} ({dtype})"


def test_device_build_and_query_match_cpu(tmp_path):
    task = seq_task.retrainable()
    scores = {}
    for build_dev in ("cpu", "cuda"):
        idx = tmp_path / f"idx-{build_dev}"
        ls.build(task, idx, device=build_dev, batch_size=8, block_size=16, progress=False)
        for query_dev in ("cpu", "cuda"):
            out = tmp_path / f"s-{build_dev}-{query_dev}.npy"
            ls.query(task, idx, tmp_path / "r.jsonl", out, device=query_dev, progress=False)
            scores[build_dev, query_dev] = np.load(out)
    ref = scores["cpu", "cpu"]
    scale = np.abs(ref).max()
    assert scale > 0
    # the device query of the same index: only summation order differs
    np.testing.assert_allclose(scores["cpu", "cuda"], ref, rtol=1e-4, atol=1e-5 * scale)
    # an index built on the device: factors rounded to bf16 on another device's arithmetic
    for key in (("cuda", "cpu"), ("cuda", "cuda")):
        np.testing.assert_allclose(scores[key], ref, rtol=2e-2, atol=2e-2 * scale)


# ---------------------------------------------------------------- the streaming query under load


class ManyQueries(seq_task.SeqTask):
    """The sequence task with every training example as a query too: enough queries that the
    scorer, not the decoding, sets the pace (the regime where a stream race shows)."""

    def query_examples(self):
        return list(self.queries) + list(self.train)


class AutocastTask(seq_task.SeqTask):
    """The sequence task with its loss under bf16 autocast on CUDA (a mixed-precision model)."""

    def loss(self, model, batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch[0].is_cuda):
            return super().loss(model, batch)


def _many_queries() -> ManyQueries:
    task = ManyQueries.__new__(ManyQueries)
    task.__dict__.update(seq_task.retrainable().__dict__)
    return task


def assert_same_topk(got: list[dict], want: list[dict], rtol: float):
    """Same ids, rows and scores per query; rows may differ only where the scores they swap are
    equal within rtol (summation order differs between devices)."""
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want):
        for side in ("proponents", "opponents"):
            gs, ws = [p["score"] for p in g[side]], [p["score"] for p in w[side]]
            scale = max(abs(s) for s in ws) or 1.0
            np.testing.assert_allclose(gs, ws, rtol=rtol, atol=rtol * scale)
            for i, (gp, wp) in enumerate(zip(g[side], w[side])):
                if gp["row"] == wp["row"]:
                    assert gp["id"] == wp["id"]
                else:
                    near = [p["score"] for p in w[side] if abs(p["score"] - wp["score"]) <= rtol * scale]
                    assert len(near) > 1, f"{g['id']} {side}[{i}]: row {gp['row']} vs {wp['row']}, no tie"


@pytest.fixture(scope="module")
def uneven_index(tmp_path_factory):
    """Blocks larger than block_size (10 rows: batches of 5 against a block size of 8)."""
    path = tmp_path_factory.mktemp("cuda-uneven") / "idx"
    ls.build(seq_task.retrainable(), path, device="cpu", batch_size=5, block_size=8, progress=False)
    return path


@pytest.mark.parametrize("opts", [dict(), dict(buffers=1), dict(buffers=1, loader_threads=0),
                                  dict(buffers=2, loader_threads=0), dict(buffers=3, loader_threads=2)])
def test_gpu_bound_query_without_scores_file_matches_cpu_topk(uneven_index, tmp_path, opts):
    # no --scores: nothing in the loop synchronizes, so a block's factors freed and reused by the
    # next block's copy while still being scored would show here as wrong top-k rows
    task = _many_queries()
    ref = ls.query(task, uneven_index, tmp_path / "cpu.jsonl", top_k=8, device="cpu", scorer="dense", progress=False)
    got = ls.query(task, uneven_index, tmp_path / "cuda.jsonl", top_k=8, device="cuda", scorer="dense",
                   progress=False, **opts)
    assert len(got.results) > 100
    assert_same_topk(got.results, ref.results, rtol=1e-4)


def test_loader_under_a_slow_consumer_yields_the_stored_factors(uneven_index):
    # the consumer's kernels queue up behind a long one: a side-stream copy that reused their
    # memory too early would change what the consumer reads
    from lorif_stream.loader import BlockLoader
    from lorif_stream.store import IndexReader

    with IndexReader(uneven_index) as r, r.snapshot() as snap:
        want = [[(torch.from_numpy(L.copy()), torch.from_numpy(R.copy())) for L, R in f]
                for _, _, f in snap.blocks(layers=[0, 1])]
        big = torch.randn(4096, 4096, device="cuda")
        for buffers, threads in ((1, 1), (1, 0), (2, 1)):
            sums = []
            for _, _, factors in BlockLoader(snap, [0, 1], torch.device("cuda"), buffers=buffers, threads=threads):
                for _ in range(4):
                    big = (big @ big).tanh_()  # keep the consumer's stream busy
                sums.append([(L.double().sum(), R.double().sum()) for L, R in factors])
            torch.cuda.synchronize()
            for got, ref in zip(sums, want):
                for (gl, gr), (L, R) in zip(got, ref):
                    assert float(gl) == pytest.approx(float(L.double().sum()), rel=1e-12, abs=1e-12)
                    assert float(gr) == pytest.approx(float(R.double().sum()), rel=1e-12, abs=1e-12)


def test_scores_file_written_from_pinned_copies_matches_cpu(uneven_index, tmp_path):
    task = _many_queries()
    ls.query(task, uneven_index, None, tmp_path / "cpu.npy", device="cpu", progress=False)
    ls.query(task, uneven_index, None, tmp_path / "cuda.npy", device="cuda", buffers=1, progress=False)
    ref, got = np.load(tmp_path / "cpu.npy"), np.load(tmp_path / "cuda.npy")
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_pinned_decode_buffers_stay_pinned_when_they_grow(uneven_index):
    from lorif_stream.store import BlockBuffers, IndexReader

    with IndexReader(uneven_index) as r:
        bufs = BlockBuffers(r.layout, pin=True)
        bufs.ensure(r.layout.block_size + 5)
        assert all(torch.from_numpy(a).is_pinned() for a in bufs.L + bufs.R)


def test_memory_budget_on_cuda_is_within_the_device_memory():
    free = torch.cuda.mem_get_info()[0]
    assert ls.QueryConfig(device="cuda").budget() <= free // 2 + 1


# ---------------------------------------------------------------- mixed precision


def test_autocast_capture_on_cuda_matches_fp32():
    ids = torch.randint(3, 97, (6, 16), generator=torch.Generator().manual_seed(5))
    results = {}
    for autocast in (False, True):
        model = tiny_gpt2().cuda()
        layers = tracked_layers(model, None, 2, 1)
        projections = make_projections(layers, ProjectionSpec(f=2, seed=4), torch.device("cuda"))
        with GradientCapture(model, layers, projections) as cap:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                losses = gpt2_losses(model, ids.cuda())
            results[autocast] = cap.projected_gradients(losses.float())
    for name, G in results[False].items():
        got = results[True][name]
        assert got.dtype == torch.float32
        err = (got - G).norm() / G.norm()
        assert err < 5e-2, f"{name}: relative error {err:.3g} under bf16 autocast"


def test_bf16_autocast_build_on_cuda_end_to_end(tmp_path):
    fp32_task = seq_task.retrainable()
    task = AutocastTask.__new__(AutocastTask)
    task.__dict__.update(fp32_task.__dict__)
    ls.build(fp32_task, tmp_path / "ref", device="cpu", batch_size=8, progress=False)
    ls.build(task, tmp_path / "bf16", device="cuda", batch_size=8, dtype="bf16", progress=False)
    ref = ls.query(fp32_task, tmp_path / "ref", None, tmp_path / "ref.npy", device="cpu", progress=False)
    got = ls.query(task, tmp_path / "bf16", None, tmp_path / "bf16.npy", device="cuda", progress=False)
    a, b = np.load(tmp_path / "ref.npy"), np.load(tmp_path / "bf16.npy")
    assert np.isfinite(b).all()
    # bf16 activations and gradients: the scores agree in rank, not in digits
    for q in range(a.shape[0]):
        assert np.corrcoef(a[q], b[q])[0, 1] > 0.95
    assert [r["id"] for r in got.results] == [r["id"] for r in ref.results]
