"""Query-side preconditioning cost of the three preconditioners, side by side.

A query batch is preconditioned once (then every stored row costs the same dot product whatever
the preconditioner: bench_query.py measures that streaming part). GPT-2-small layer shapes at f=4
(one transformer block's four Linear/Conv1D kinds), random query gradients, fp32, CPU:
  * none    the dot product (whitened rows, one-token data)
  * ekfac   q_out [(q_outᵀ G q_in) / (Λ + λ)] q_inᵀ (whitened rows, sequence data)
  * lowrank Woodbury with the top-r eigenpairs (the paper's mode), r = 256 and 2048

    python benchmarks/bench_precondition.py
Writes benchmarks/results/precondition.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import GPT2_LAYERS  # noqa: E402

from lorif_stream.curvature import LayerCurvature  # noqa: E402
from lorif_stream.ekfac import EkfacPreconditioner  # noqa: E402
from lorif_stream.fit import IdentityPreconditioner, LowRankPreconditioner  # noqa: E402


def orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g))[0]


def make(kind: str, d_out: int, d_in: int, g: torch.Generator, r: int = 0):
    if kind == "none":
        return IdentityPreconditioner()
    if kind == "ekfac":
        return EkfacPreconditioner(orthonormal(d_out, d_out, g), orthonormal(d_in, d_in, g),
                                   torch.rand(d_out, d_in, generator=g), 0.1)
    D = d_out * d_in
    r = min(r, D)
    return LowRankPreconditioner(LayerCurvature(torch.rand(r, generator=g).sort(descending=True).values,
                                                orthonormal(D, r, g), 0.1, 1.0))


def time_it(pre, G: torch.Tensor, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        pre.apply(G)
        best = min(best, time.perf_counter() - t)
    return best


def main():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    res = {"layers": GPT2_LAYERS, "threads": 1, "seconds_per_block": {}}
    for Q in (1, 64):
        row = {}
        for kind, r in (("none", 0), ("ekfac", 0), ("lowrank", 256), ("lowrank", 2048)):
            total = 0.0
            for _, d_out, d_in in GPT2_LAYERS:
                pre = make(kind, d_out, d_in, g, r)
                total += time_it(pre, torch.randn(Q, d_out, d_in, generator=g))
            row[kind + (f" r={r}" if r else "")] = total
        res["seconds_per_block"][Q] = row
        print(f"Q={Q:>2}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in row.items())
              + " (per transformer block, 1 thread)")
    out = Path(__file__).parent / "results" / "precondition.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
