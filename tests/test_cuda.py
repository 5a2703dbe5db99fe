"""The CUDA paths against the CPU results: device factorisation, capture on the device (fp32 and
bf16), a build on the device, and the device query (pinned host buffers, a side stream copying
block n+1 while block n is scored). Marked `cuda`: skipped cleanly without a GPU; run by
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
