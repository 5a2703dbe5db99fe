"""Rerank benchmark (#23): how close `query --rerank K` brings the index's top-10 to full-dimension
influence, and what it costs.

Quality, on bench_quality.py's fortunes task (tiny GPT-2, 2 blocks, 64 wide, 400 training texts,
40 queries; no retraining needed): per query, the share of the top-10 proponents that are also in
a reference top-10, averaged over queries, for the default index (f = 4, bf16, whitened, EK-FAC on
text) at c in {1, 4}, reranked with K in {0 (no rerank), 50, 100, 200, 400}. References:

* Kronfluence 1.0.1 EK-FAC (peer_kronfluence.py, as it comes: weights and biases, empirical
  Fisher) at its default damping 1e-8 and at its heuristic 0.1·mean eigenvalue; their overlap with
  each other is the "Kronfluence against itself" ceiling;
* the exact whitened f = 1 scores: an index at f = 1, c = 64 (no truncation: every layer has
  min(O, I) = 64), fp32, same preconditioner (EK-FAC with Λ over all rows), queried densely.

Cost, at N >= 20k rows (the 400 texts repeated, distinct ids; the same model), 30 queries: a plain
query (top-10) against `query --rerank 100`, wall time on one thread (CPU time beside it), minimum
of --repeats interleaved runs; the rerank both cold (the index's first: it computes the
full-dimension metric from the whitening sample and caches it in the index) and warm (the cache
read); and from the measured fixed and per-row costs of the plain query the ratio estimated at 1M
rows (the rerank's cost does not grow with N).

    python benchmarks/bench_rerank.py              # ~15 min on one thread of the shared 2-core CPU
    python benchmarks/bench_rerank.py --quick      # K in {0, 100}, c = 1, N = 4k for the cost: ~4 min
    python benchmarks/bench_rerank.py --no-quality # the cost table alone (N = 24,800): ~3 min

Writes benchmarks/results/rerank[_quick].json. Needs the fortunes (apt-get install -y fortunes-min)
and Kronfluence (pip install --no-deps kronfluence accelerate einconv einops opt_einsum).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_quality as bq  # noqa: E402
import lorif_stream as ls  # noqa: E402
from lorif_stream import rerank as rerank_module  # noqa: E402
from lorif_stream.task import resolve_task  # noqa: E402

RESULTS = HERE / "results"
TOP = 10
KS, CS = (0, 50, 100, 200, 400), (1, 4)
QUICK_KS, QUICK_CS = (0, 100), (1,)


def top_rows(scores: np.ndarray, k: int = TOP) -> list[list[int]]:
    """Each query's k highest-scoring rows (ties: lower row first, as the engine ranks them)."""
    return [list(np.argsort(-s, kind="stable")[:k]) for s in scores]


def overlap(a: list[list[int]], b: list[list[int]]) -> float:
    return float(np.mean([len(set(x) & set(y)) / TOP for x, y in zip(a, b)]))


def reranked_query(task, index, k: int, batch_size: int) -> tuple[list[dict], dict]:
    """`query --rerank k` (k = 0: a plain query) and its timings."""
    t0 = time.perf_counter()
    res = ls.query(task, index, None, top_k=TOP, rerank=k, batch_size=batch_size, device="cpu", progress=False)
    total = time.perf_counter() - t0
    rerank_s = res.stats.get("rerank_seconds", 0.0)
    return res.results, {"query_s": total - rerank_s, "rerank_s": rerank_s, "candidates": res.stats.get("rerank_candidates", 0),
                         "metric": res.stats.get("rerank_metric")}


def quality(task, workdir: Path, ks, cs, batch_size: int) -> dict:
    import peer_kronfluence as peer

    refs, timing = {}, {}
    for damping, label in (("default", "kronfluence_ekfac"), (None, "kronfluence_ekfac_heur")):
        scores, stats = peer.kronfluence_scores(task, "ekfac", damping, batch_size=batch_size, workdir=workdir)
        refs[label] = top_rows(scores)
        timing[label] = stats["fit_s"] + stats["score_s"]
        print(f"[bench_rerank] {label}: {timing[label]:.0f} s", flush=True)
    exact_index, exact_scores = workdir / "exact", workdir / "exact.npy"
    t0 = time.perf_counter()
    ls.build(task, exact_index, f=1, rank=64, dtype="fp32", batch_size=batch_size, device="cpu", progress=False)
    ls.query(task, exact_index, None, exact_scores, top_k=TOP, batch_size=batch_size, device="cpu", progress=False)
    refs["exact_f1"] = top_rows(np.load(exact_scores))
    timing["exact_f1"] = time.perf_counter() - t0
    preconditioner = ls.info(exact_index)["preconditioner"]
    rows = []
    for c in cs:
        index = workdir / f"c{c}"
        ls.build(task, index, rank=c, batch_size=batch_size, device="cpu", progress=False)
        info = ls.info(index)
        for k in ks:
            results, stats = reranked_query(task, index, k, batch_size)
            mine = [[e["row"] for e in r["proponents"][:TOP]] for r in results]
            row = {"c": c, "K": k, "preconditioner": info["preconditioner"],
                   "bytes_per_example": float(info["bytes_per_example"]), **stats,
                   **{f"overlap_{name}": overlap(mine, ref) for name, ref in refs.items()}}
            rows.append(row)
            print(f"[bench_rerank] c={c} K={k}: " + ", ".join(f"{n} {row[f'overlap_{n}']:.3f}" for n in refs)
                  + f" ({stats['candidates']} candidates, query {stats['query_s']:.1f} s + rerank {stats['rerank_s']:.1f} s)",
                  flush=True)
    return {"rows": rows, "reference_seconds": timing, "exact_preconditioner": preconditioner,
            "kronfluence_self_overlap": overlap(refs["kronfluence_ekfac"], refs["kronfluence_ekfac_heur"]),
            "exact_vs_kronfluence": {n: overlap(refs["exact_f1"], refs[n])
                                     for n in ("kronfluence_ekfac", "kronfluence_ekfac_heur")}}


class Repeated:
    """The fortunes task with its training texts repeated `copies` times (distinct ids) and its first
    `queries` queries: an N >= 20k index for the cost, same model and token lengths."""

    def __init__(self, task, copies: int, queries: int):
        self.task, self.copies, self.queries = task, copies, queries
        self.tracked_modules = task.tracked_modules

    def model(self):
        return self.task.model()

    def train_examples(self):
        return self.task.train_examples() * self.copies

    def query_examples(self):
        return self.task.query_examples()[: self.queries]

    def collate(self, examples):
        return self.task.collate(examples)

    def loss(self, model, batch):
        return self.task.loss(model, batch)


def timed_query(task, index, k: int, batch_size: int) -> tuple[float, float, dict]:
    """(wall s, CPU s of this process, stats) of one query, `query --rerank k` if k > 0."""
    w0, c0 = time.perf_counter(), time.process_time()
    res = ls.query(task, index, None, top_k=TOP, rerank=k, batch_size=batch_size, device="cpu", progress=False)
    return time.perf_counter() - w0, time.process_time() - c0, res.stats


def cost(task, workdir: Path, copies: int, queries: int, k: int, batch_size: int, repeats: int) -> dict:
    """Plain and reranked query times on the big index, interleaved `repeats` times, minimum of each
    (the CPU is shared): 'cold' is a rerank that computes the full-dimension metric (no cache in
    the index, as on its first rerank), 'warm' one that reads it from the cache the cold one wrote."""
    big = resolve_task(Repeated(task, copies, queries))
    index = workdir / "big"
    t0 = time.perf_counter()
    ls.build(big, index, batch_size=batch_size, device="cpu", progress=False)
    build_s = time.perf_counter() - t0
    N = ls.info(index)["rows"]
    cache = index / getattr(rerank_module, "CACHE_FILE", "rerank-metric.npz")  # (an A/B against a tree without the cache)
    runs = {"plain": [], "cold": [], "warm": []}
    stats = {}
    for _ in range(repeats):
        runs["plain"].append(timed_query(big, index, 0, batch_size)[:2])
        cache.unlink(missing_ok=True)
        *times, stats["cold"] = timed_query(big, index, k, batch_size)
        runs["cold"].append(tuple(times))
        *times, stats["warm"] = timed_query(big, index, k, batch_size)
        runs["warm"].append(tuple(times))
    wall = {name: min(t[0] for t in ts) for name, ts in runs.items()}
    cpu = {name: min(t[1] for t in ts) for name, ts in runs.items()}
    # a plain query's fixed part (model, query gradients, task check): the same query on a 1-copy index
    small = resolve_task(Repeated(task, 1, queries))
    ls.build(small, workdir / "small", batch_size=batch_size, device="cpu", progress=False)
    fixed_s = min(timed_query(small, workdir / "small", 0, batch_size)[0] for _ in range(repeats))
    n_small = len(task.train_examples())
    per_row = max(wall["plain"] - fixed_s, 0.0) / max(N - n_small, 1)
    plain_1m = fixed_s + per_row * 1_000_000
    out = {"rows": N, "queries": queries, "K": k, "batch_size": batch_size, "repeats": repeats, "build_s": build_s,
           "plain_s": wall["plain"], "plain_cpu_s": cpu["plain"], "candidates": stats["warm"]["rerank_candidates"],
           "plain_fixed_s": fixed_s, "plain_s_per_row": per_row, "plain_1M_estimated_s": plain_1m,
           "all_wall_s": runs}
    for name in ("cold", "warm"):
        extra = wall[name] - wall["plain"]
        out[name] = {"reranked_s": wall[name], "reranked_cpu_s": cpu[name], "ratio": wall[name] / wall["plain"],
                     "cpu_ratio": cpu[name] / cpu["plain"],
                     "rerank_s": stats[name]["rerank_seconds"], "metric_s": stats[name].get("rerank_metric_seconds", 0.0),
                     "rerank_s_per_candidate": (stats[name]["rerank_seconds"] - stats[name].get("rerank_metric_seconds", 0.0))
                     / max(stats[name]["rerank_candidates"], 1),
                     "ratio_at_1M_estimated": (plain_1m + extra) / plain_1m}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="K in {0, 100}, c = 1, a 4k-row cost index")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--copies", type=int, default=None, help="training-set copies of the cost index (default 62: 24,800 rows)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of the cost queries (minimum kept)")
    p.add_argument("--no-quality", action="store_true", help="the cost only (no Kronfluence, no overlap table)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or RESULTS / f"rerank{'_cost' if args.no_quality else ''}{'_quick' if args.quick else ''}.json")
    t0 = time.perf_counter()
    task = bq.make_task("fortunes", dict(bq.PLANS[("fortunes", False)]["task"]))
    if task is None:
        return 1
    task = resolve_task(task)
    print(f"[bench_rerank] fortunes model trained in {time.perf_counter() - t0:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="lorif-rerank-") as tmp:
        q = None if args.no_quality else \
            quality(task, Path(tmp), QUICK_KS if args.quick else KS, QUICK_CS if args.quick else CS, args.batch_size)
        c = cost(task, Path(tmp), args.copies or (10 if args.quick else 62), 30, 100, args.batch_size, args.repeats)
    print(f"[bench_rerank] cost: {json.dumps(c)}", flush=True)
    result = {"benchmark": "rerank", "quick": args.quick, "threads": args.threads, "batch_size": args.batch_size,
              "task": {"n_train": len(task.train_examples()), "n_query": len(task.query_examples()),
                       "mean_tokens": task.wrapped.mean_tokens if hasattr(task, "wrapped") else None},
              "top": TOP, "quality": q, "cost": c, "torch": torch.__version__, "machine": platform.machine(),
              "seconds": time.perf_counter() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[bench_rerank] wrote {out} ({result['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
