"""Single-pass curvature: how wide must the sketch be for its scores to match the exact ones?

For each sketch width k (oversampling) the curvature is refit from the stored factors with
`lorif_stream.fit` (one pass, q = 0) and every query is scored against every training row with
`lorif_stream.query`. The scores are compared (Spearman per query) with
  * exact:  the true top-r eigenpairs of each layer, from a sketch as wide as the layer (k = D,
            where Nystrom is exact up to fp32 rounding), and
  * q = 3:  three refinement passes started from the default-width sketch.
Two models, both tiny GPT-2s with the engine's default r:
  * trained: the demo's model (trained on 3,000 BSD fortunes, r = 256), queried with 24
             fortunes held out of training;
  * random:  a randomly initialised GPT-2 on random tokens (bench_build's model, r = 64,
             10,000 rows) whose gradient spectrum is nearly flat: the worst case.

    python benchmarks/bench_single_pass.py            # about 10 minutes on 2 CPU cores
    python benchmarks/bench_single_pass.py --quick    # random model only, 3,000 rows
Writes benchmarks/results/single_pass.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import lorif_stream as ls  # noqa: E402
from lorif_stream.demo import load_corpus, run_demo  # noqa: E402
from lorif_stream.hf_task import HFCausalLMTask  # noqa: E402

from bench_build import TokensTask, spearman  # noqa: E402

N_QUERIES = 24


def scores_for(task, index: Path, out: Path, **curvature) -> np.ndarray:
    ls.fit(index, progress=False, device="cpu", **curvature)
    ls.query(task, index, None, out, top_k=1, device="cpu", progress=False)
    return np.load(out)


def agreement(task, index: Path, rank: int, scratch: Path) -> dict:
    """Spearman of single-pass scores at several widths vs the exact and the q = 3 scores."""
    widest = max(layer["D"] for layer in ls.info(index)["layers"])
    t = time.perf_counter()
    exact = scores_for(task, index, scratch / "exact.npy", sketch_rank=rank, oversample=widest)
    exact_s = time.perf_counter() - t
    energy = [layer["captured_energy"] for layer in ls.info(index)["layers"]]  # of the exact top r
    t = time.perf_counter()
    q3 = scores_for(task, index, scratch / "q3.npy", sketch_rank=rank, refine=3)
    q3_s = time.perf_counter() - t
    rows = {}
    for label, oversample in (("r+16", 16), ("2r", rank), ("3r", 2 * rank), ("4r (default)", None), ("8r", 7 * rank)):
        t = time.perf_counter()
        s0 = scores_for(task, index, scratch / "q0.npy", sketch_rank=rank, oversample=oversample)
        fit_s = time.perf_counter() - t
        vs_exact = [spearman(s0[i], exact[i]) for i in range(s0.shape[0])]
        vs_q3 = [spearman(s0[i], q3[i]) for i in range(s0.shape[0])]
        rows[label] = {"vs_exact_mean": float(np.mean(vs_exact)), "vs_exact_min": float(np.min(vs_exact)),
                       "vs_q3_mean": float(np.mean(vs_q3)), "vs_q3_min": float(np.min(vs_q3)), "fit_and_query_s": fit_s}
        print(f"  k = {label:13s} vs exact {rows[label]['vs_exact_mean']:.4f} (min {rows[label]['vs_exact_min']:.4f})"
              f"   vs q=3 {rows[label]['vs_q3_mean']:.4f} (min {rows[label]['vs_q3_min']:.4f})", flush=True)
    q3_vs_exact = [spearman(q3[i], exact[i]) for i in range(q3.shape[0])]
    return {"rank": rank, "rows": ls.info(index)["rows"], "queries": int(exact.shape[0]), "single_pass": rows,
            "q3_vs_exact_mean": float(np.mean(q3_vs_exact)), "exact_fit_s": exact_s, "q3_fit_s": q3_s,
            "captured_energy_min": float(np.min(energy)), "captured_energy_max": float(np.max(energy))}


def trained_case(root: Path) -> dict:
    demo = root / "demo"
    run_demo(str(demo), progress=False, echo=lambda *a, **k: None)
    indexed = {json.loads(line)["id"] for name in ("train_a.jsonl", "train_b.jsonl")
               for line in (demo / name).read_text().splitlines()}
    held_out = [r for r in load_corpus() if r["id"] not in indexed][:N_QUERIES]
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in held_out))
    task = HFCausalLMTask(str(demo / "model"), None, str(queries), id_field="id", max_length=64)
    return agreement(task, demo / "index", 256, root)


def random_case(root: Path, rows: int) -> dict:
    index = root / "random"
    ls.build(TokensTask(rows, n_queries=N_QUERIES), index, f=4, rank=1, dtype="bf16", batch_size=32, device="cpu",
             sketch_rank=64, progress=False)
    return agreement(TokensTask(rows, n_queries=N_QUERIES), index, 64, root)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or Path(__file__).parent / "results" / ("single_pass_quick.json" if args.quick else "single_pass.json"))
    root = Path(tempfile.mkdtemp(prefix="lorif-sp-"))
    res = {}
    try:
        if not args.quick:
            print("trained tiny GPT-2 (the demo's), r = 256:", flush=True)
            res["trained"] = trained_case(root)
        print("random-init tiny GPT-2 on random tokens, r = 64:", flush=True)
        res["random"] = random_case(root, 3_000 if args.quick else 10_000)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    for name, r in res.items():
        print(f"{name}: q=3 vs exact {r['q3_vs_exact_mean']:.4f}; top-r captured energy "
              f"{r['captured_energy_min']:.2f}-{r['captured_energy_max']:.2f}")


if __name__ == "__main__":
    main()
