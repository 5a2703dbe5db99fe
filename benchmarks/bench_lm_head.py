"""LM head and sketched-side whitening benchmark: LDS of LoRIF on bench_quality's fortunes task.

Two questions, answered on bench_quality.py's `fortunes` task (tiny GPT-2, 2 blocks, 64 wide, a
512-token BPE vocabulary, tied lm_head; the same attributed model, LDS utilities and cache), at the
engine's default build options (f = 4, c = 1, whitened projections, preconditioner auto = EK-FAC
on text, max_side 256):

  Q1. Should the built-in HF task track the LM head by default?
      (a) the transformer blocks only (tracked_modules r"^transformer\\.h\\.", bench_quality's setting)
      (b) blocks + the LM head (tracked_modules None: the tied lm_head is tracked as an nn.Linear;
          its captured gradient is the head's part of the tied weight's gradient, checked below
          against autograd on an untied copy)
      with LDS (95% bootstrap CI over queries), index bytes per example and build time.
  Q2. For sides too wide for a dense eigendecomposition (CountSketch projection), is the engine's
      diagonal whitening better than none? With the head tracked, max_dense_side = 256 sends the
      vocabulary side (512) into the sketched path; max_dense_side = 128 also the MLP sides (256)
      and the attention's qkv side (192):
      (c) sketched sides whitened by the diagonal of their token moment (the engine)
      (d) sketched sides not whitened (lorif_stream.whitening.diagonal_whitening monkeypatched to
          return w = 1, same summary dict)
      vs (b), dense projection + full whitening. To split the projection change from the
      whitening change, and to price cheap alternatives to the diagonal, the same wide sides are
      also run with the DENSE projection and a whitening from a modified moment
      (lorif_stream.whitening.side_whitening monkeypatched, only on sides wider than the threshold):
      block-diagonal (blocks of 64 coordinates), diagonal, or none (W = I). Same damping rule
      (λ = ρ·trace/dim) in every variant.
  Peer: Kronfluence EK-FAC (full dimension, no index) on the same modules and ground truth, at
      Kronfluence's default damping 1e-8 and its 0.1·mean-eigenvalue heuristic, as bench_quality.

Every LoRIF variant is built with several projection seeds (full: 0, 1, 2; --quick: 0); a
variant's per-query Spearman is averaged over the seeds before the LDS and its CI are taken, and
differences between variants are PAIRED over queries (bootstrap CI of the mean difference), which
cancels query difficulty. Build time is the median over the seeds of lorif_stream.build (whitening
pre-pass + indexing + curvature fit), on a shared CPU: read it as relative.

    python benchmarks/bench_lm_head.py --threads 1           # bench_quality's full fortunes plan (400 train, 40 queries,
                                                             # 48 subsets x 3 seeds of utilities, shared cache)
    python benchmarks/bench_lm_head.py --quick --threads 1   # the first 24 of those subsets, seed 0, Q1/Q2 + Kronfluence rows

On the shared 2-core CPU the utilities took 21 min to compute (cached, bench_quality's cache
is reused); with them cached the full run takes 2 min and --quick 45 s when the CPU is idle.
Writes benchmarks/results/lm_head[_quick].json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_quality as bq  # noqa: E402  (also puts the checkout and tools/ on sys.path)

ls = bq.ls
import lds  # noqa: E402  (tools/lds.py, on sys.path via bench_quality)
import lorif_stream.whitening as whitening_mod  # noqa: E402
from lorif_stream.gradients import GradientSource  # noqa: E402
from lorif_stream.projection import ProjectionSpec  # noqa: E402
from lorif_stream.task import resolve_task  # noqa: E402

RESULTS = HERE / "results"
BLOCKS = r"^transformer\.h\."

# name -> (tracked_modules, build options beyond the defaults, whitening patch)
# patch: None | ("sketch_none",) | (dense_kind, threshold) with dense_kind in blockdiag64/diag/none
VARIANTS = {
    "a blocks": (BLOCKS, {}, None),
    "b blocks+head": (None, {}, None),
    "c head sketched, diag-whitened (mds256)": (None, {"max_dense_side": 256}, None),
    "d head sketched, unwhitened (mds256)": (None, {"max_dense_side": 256}, ("sketch_none",)),
    "c' head+MLP+qkv sketched, diag-whitened (mds128)": (None, {"max_dense_side": 128}, None),
    "d' head+MLP+qkv sketched, unwhitened (mds128)": (None, {"max_dense_side": 128}, ("sketch_none",)),
    # the same comparisons with a plain dot product (no EK-FAC on top of the whitening)
    "b/dot blocks+head": (None, {"preconditioner": "none"}, None),
    "c/dot head sketched, diag-whitened (mds256)": (None, {"max_dense_side": 256, "preconditioner": "none"}, None),
    "d/dot head sketched, unwhitened (mds256)": (None, {"max_dense_side": 256, "preconditioner": "none"},
                                                 ("sketch_none",)),
    # dense projections, the wide sides whitened from a cut-down moment
    "b-bd64 dense proj, head side block-diag(64) whitened": (None, {}, ("blockdiag64", 256)),
    "b-diag dense proj, head side diag-whitened": (None, {}, ("diag", 256)),
    "b-none dense proj, head side unwhitened": (None, {}, ("none", 256)),
    "b-bd64' dense proj, sides>128 block-diag(64) whitened": (None, {}, ("blockdiag64", 128)),
    "b-diag' dense proj, sides>128 diag-whitened": (None, {}, ("diag", 128)),
}
QUICK_VARIANTS = ("a blocks", "b blocks+head", "c head sketched, diag-whitened (mds256)",
                  "d head sketched, unwhitened (mds256)", "c' head+MLP+qkv sketched, diag-whitened (mds128)",
                  "d' head+MLP+qkv sketched, unwhitened (mds128)")
QUICK_SUBSETS = 24  # --quick: the first 24 of the full plan's 48 subsets (same cache, a prefix)
# paired comparisons reported (first minus second)
PAIRS = (
    ("b blocks+head", "a blocks"),
    ("c head sketched, diag-whitened (mds256)", "d head sketched, unwhitened (mds256)"),
    ("c head sketched, diag-whitened (mds256)", "b blocks+head"),
    ("d head sketched, unwhitened (mds256)", "b blocks+head"),
    ("c' head+MLP+qkv sketched, diag-whitened (mds128)", "d' head+MLP+qkv sketched, unwhitened (mds128)"),
    ("c' head+MLP+qkv sketched, diag-whitened (mds128)", "b blocks+head"),
    ("c head sketched, diag-whitened (mds256)", "a blocks"),
    ("b-diag dense proj, head side diag-whitened", "b-none dense proj, head side unwhitened"),
    ("b-bd64 dense proj, head side block-diag(64) whitened", "b-diag dense proj, head side diag-whitened"),
    ("b-bd64 dense proj, head side block-diag(64) whitened", "c head sketched, diag-whitened (mds256)"),
    ("b blocks+head", "b-bd64 dense proj, head side block-diag(64) whitened"),
    ("c head sketched, diag-whitened (mds256)", "b-diag dense proj, head side diag-whitened"),
    ("c/dot head sketched, diag-whitened (mds256)", "d/dot head sketched, unwhitened (mds256)"),
    ("c/dot head sketched, diag-whitened (mds256)", "b/dot blocks+head"),
    ("b-none dense proj, head side unwhitened", "d head sketched, unwhitened (mds256)"),
    ("b-bd64' dense proj, sides>128 block-diag(64) whitened", "b-diag' dense proj, sides>128 diag-whitened"),
    ("b-bd64' dense proj, sides>128 block-diag(64) whitened", "c' head+MLP+qkv sketched, diag-whitened (mds128)"),
    ("b blocks+head", "b-bd64' dense proj, sides>128 block-diag(64) whitened"),
    ("Kronfluence EK-FAC blocks+head", "Kronfluence EK-FAC blocks"),
    ("Kronfluence EK-FAC heur blocks+head", "Kronfluence EK-FAC heur blocks"),
)


# ------------------------------------------------------------------------------------ patches


def _masked_moment(M: torch.Tensor, kind: str) -> torch.Tensor:
    """The moment the alternative whitening sees: its 64-blocks (blockdiag64) or its diagonal."""
    if kind == "diag":
        return torch.diag(torch.diagonal(M))
    block = 64
    idx = torch.arange(M.shape[0], device=M.device) // block
    return M * (idx[:, None] == idx[None, :]).to(M.dtype)


@contextlib.contextmanager
def whitening_patch(patch):
    """Monkeypatch lorif_stream.whitening for one build (restored after, whatever happens)."""
    if patch is None:
        yield
        return
    orig_diag, orig_side = whitening_mod.diagonal_whitening, whitening_mod.side_whitening
    if patch[0] == "sketch_none":
        def diagonal_whitening(diagonal, rho):  # w = 1: the sketch alone; same summary dict shape
            w, summary = orig_diag(diagonal, rho)
            return torch.ones_like(w), summary
        whitening_mod.diagonal_whitening = diagonal_whitening
    else:
        kind, threshold = patch

        def side_whitening(moment, rho):
            if moment.shape[0] <= threshold:
                return orig_side(moment, rho)
            M = moment.to(torch.float64)
            if kind == "none":  # W = (0 + 1·I)^-1/2 = I
                dim = M.shape[0]
                return whitening_mod.SideWhitening(torch.zeros(dim, dtype=torch.float64),
                                                   torch.eye(dim, dtype=torch.float64), 1.0)
            # same trace, so the same λ = ρ·mean eig as the full whitening
            return orig_side(_masked_moment((M + M.T) / 2, kind), rho)
        whitening_mod.side_whitening = side_whitening
    try:
        yield
    finally:
        whitening_mod.diagonal_whitening, whitening_mod.side_whitening = orig_diag, orig_side


# ------------------------------------------------------------------------------------ runs


def with_modules(task, tracked):
    t = copy.copy(task)  # shares the attributed model, data and retrain recipe
    t.tracked_modules = tracked
    return t


def run_variant(task, util, name: str, seeds, workdir: Path, batch_size: int) -> dict:
    tracked, options, patch = VARIANTS[name]
    t = with_modules(task, tracked)
    per_seed, per_query, build_s, query_s = [], [], [], []
    info = None
    for seed in seeds:
        index, scores = workdir / f"idx-{seed}", workdir / f"scores-{seed}.npy"
        with whitening_patch(patch):
            t0 = time.perf_counter()
            ls.build(t, index, dtype="bf16", device="cpu", batch_size=batch_size, progress=False, seed=seed, **options)
            t1 = time.perf_counter()
        ls.query(t, index, None, scores, top_k=1, device="cpu", batch_size=batch_size, progress=False)
        t2 = time.perf_counter()
        info = ls.info(index)
        res = util.score(np.load(scores))
        per_seed.append(res.mean)
        per_query.append(res.per_query)
        build_s.append(t1 - t0)
        query_s.append(t2 - t1)
        shutil.rmtree(index, ignore_errors=True)
        scores.unlink()
    pq = np.nanmean(np.stack(per_query), axis=0)
    ok = pq[np.isfinite(pq)]
    lo, hi = lds.bootstrap_ci(ok)
    sides = {}
    for layer in info["layers"]:
        w = layer.get("whitening") or {}
        sides[layer["name"]] = {"d_out": layer["d_out"], "d_in": layer["d_in"], "damping": layer["damping"],
                                "in": (w.get("in") or {}).get("whitened"), "out": (w.get("out") or {}).get("whitened")}
    return {"variant": name, "tracked_modules": tracked, "options": options,
            "patch": list(patch) if patch else None, "lds": float(ok.mean()), "ci_low": lo, "ci_high": hi,
            "lds_per_seed": per_seed, "bytes_per_example": float(info["bytes_per_example"]),
            "raw_bytes_per_example": float(info["raw_bytes_per_example"]),
            "build_s_median": statistics.median(build_s), "build_s": build_s,
            "query_s_median": statistics.median(query_s), "preconditioner": info["preconditioner"],
            "layers": sides, "per_query": pq.tolist()}


def run_kronfluence(task, util, workdir: Path, batch_size: int) -> list[dict]:
    try:
        import peer_kronfluence as peer
    except ImportError as e:
        print(f"[bench_lm_head] skipping Kronfluence ({e})", flush=True)
        return []
    rows = []
    for label, tracked in (("blocks", BLOCKS), ("blocks+head", None)):
        for damping in ("default", None):
            scores, stats = peer.kronfluence_scores(with_modules(task, tracked), "ekfac", damping,
                                                    batch_size=batch_size, workdir=workdir)
            res = util.score(scores)
            name = f"Kronfluence EK-FAC{'' if damping == 'default' else ' heur'} {label}"
            rows.append({"variant": name, "tracked_modules": tracked,
                         "damping": "default 1e-8" if damping == "default" else "heuristic 0.1·mean eig",
                         "lds": res.mean, "ci_low": res.ci_low, "ci_high": res.ci_high, "lds_per_seed": [res.mean],
                         "bytes_per_example": 0.0, "build_s_median": stats["fit_s"], "query_s_median": stats["score_s"],
                         "modules": stats["modules"], "per_query": res.per_query.tolist()})
            print(line(rows[-1]), flush=True)
    return rows


def paired(a: dict, b: dict) -> dict:
    d = np.array(a["per_query"]) - np.array(b["per_query"])
    d = d[np.isfinite(d)]
    lo, hi = lds.bootstrap_ci(d)
    return {"a": a["variant"], "b": b["variant"], "diff": float(d.mean()), "ci": [lo, hi]}


def tied_head_check(task) -> dict:
    """The engine's lm_head gradient (f = 1) vs autograd on an untied head: it must be the head's
    part of the tied weight's gradient (not the embedding's, not their sum)."""
    t = with_modules(task, None)
    source = GradientSource.open(resolve_task(t), ProjectionSpec(f=1), torch.device("cpu"))
    names = [l.name for l in source.layers]
    k = names.index("lm_head")
    ex = task.train_examples()[:4]
    G = bq.projected_gradients(t, ex, f=1)[k]  # (4, out*in)
    model = task.model()
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    errs_head, errs_tied = [], []
    for i, e in enumerate(ex):
        batch = task.collate([e])
        # head only: logits = h Wᵀ with W a separate leaf
        W = model.lm_head.weight.detach().clone().requires_grad_(True)
        h = model.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = (h @ W.T)[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                               ignore_index=-100, reduction="sum")
        (g_head,) = torch.autograd.grad(ce, W)
        model.zero_grad(set_to_none=True)
        task.loss(model, batch).sum().backward()
        g_tied = model.lm_head.weight.grad.detach().clone()
        model.zero_grad(set_to_none=True)
        g = G[i].to(torch.float64)
        best = lambda ref: min(float((g - r.reshape(-1).to(torch.float64)).norm() / r.norm()) for r in (ref, ref.T))  # noqa: E731
        errs_head.append(best(g_head))
        errs_tied.append(best(g_tied))
    return {"tracked_layers": [(l.name, l.in_features, l.out_features) for l in source.layers], "head_is_tied": tied,
            "rel_err_vs_head_only_grad": max(errs_head), "rel_err_vs_tied_weight_grad": min(errs_tied)}


def line(r: dict) -> str:
    ci = (r["ci_high"] - r["ci_low"]) / 2
    seeds = "" if len(r["lds_per_seed"]) < 2 else " seeds " + "/".join(f"{v:.3f}" for v in r["lds_per_seed"])
    return (f"{r['variant']:<58} {r['lds']:.3f} ± {ci:.3f} {r['bytes_per_example']:>8.0f} B "
            f"build {r['build_s_median']:5.1f} s{seeds}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the first 24 utility subsets, one projection seed, the Q1/Q2 "
                   "variants only")
    p.add_argument("--no-kronfluence", action="store_true", help="skip the Kronfluence EK-FAC peer rows")
    p.add_argument("--seeds", default=None, help="projection seeds, comma-separated (default 0,1,2; --quick: 0)")
    p.add_argument("--variants", default=None, help="comma-separated variant letters/prefixes to run (default: all)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lorif-stream" / "lds"),
                   help="LDS utility cache root (bench_quality's; resumable)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=32, help="examples per capture pass")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/lm_head[_quick].json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or RESULTS / f"lm_head{'_quick' if args.quick else ''}.json")
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    names = list(QUICK_VARIANTS if args.quick else VARIANTS)
    if args.variants:
        want = [v.strip() for v in args.variants.split(",")]
        names = [n for n in names if any(n.split(" ")[0] == w for w in want)]
    plan = dict(bq.PLANS[("fortunes", False)])
    if args.quick:
        plan["subsets"] = QUICK_SUBSETS
    t0 = time.perf_counter()
    task = bq.make_task("fortunes", plan["task"])
    if task is None:
        return 1
    t_model = time.perf_counter() - t0
    key = hashlib.sha1(task.retrain_key.encode()).hexdigest()[:10]
    cache = Path(args.cache) / f"fortunes-{key}"
    t1 = time.perf_counter()
    util = lds.compute_utilities(task, cache, lds.LDSConfig(n_subsets=plan["subsets"], n_seeds=plan["seeds"]),
                                 progress=True)
    t_util = time.perf_counter() - t1
    print(f"[bench_lm_head] utilities: {len(util.subset_ids)} subsets x {plan['seeds']} seeds ({t_util:.0f} s this run, "
          f"{cache}); seed-to-seed Spearman {util.seed_agreement():.2f}", flush=True)
    check = tied_head_check(task)
    print(f"[bench_lm_head] tied lm_head: {check}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorif-lmhead-") as tmp:
        for name in names:
            rows.append(run_variant(task, util, name, seeds, Path(tmp), args.batch_size))
            print(line(rows[-1]), flush=True)
        if not args.no_kronfluence:
            rows += run_kronfluence(task, util, Path(tmp), args.batch_size)
    by = {r["variant"]: r for r in rows}
    pairs = [paired(by[a], by[b]) for a, b in PAIRS if a in by and b in by]
    report = {"command": " ".join(["python benchmarks/bench_lm_head.py"] + (argv if argv is not None else sys.argv[1:])),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": args.threads},
              "task": task.retrain_key, "n_train": len(task.train_examples()), "n_queries": len(task.query_examples()),
              "lds": {"n_subsets": plan["subsets"], "n_seeds": plan["seeds"]}, "seed_agreement": util.seed_agreement(),
              "projection_seeds": seeds, "defaults": "f=4 c=1 whitened, preconditioner auto, max_side 256, bf16",
              "model_train_s": t_model, "utilities_s_this_run": t_util, "tied_head_check": check,
              "rows": rows, "paired": pairs}
    report["total_s"] = time.perf_counter() - t0
    print()
    for r in rows:
        print(line(r))
    print("\npaired differences (a − b, 95% bootstrap CI over queries):")
    for d in pairs:
        print(f"  {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]  {d['a']}  −  {d['b']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
