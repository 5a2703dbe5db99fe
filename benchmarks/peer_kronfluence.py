"""Kronfluence (K-FAC / EK-FAC influence functions) as a side-by-side peer of the quality benchmark.

Why: bench_quality.py compares LoRIF with baselines built from the engine's own gradients
(LoGRA, graddot, exact). Kronfluence (github.com/pomonam/kronfluence, Grosse et al. 2023) is the
reference open-source implementation of the other mainstream recipe: no stored index, a
Kronecker-factored curvature fitted once, and every training gradient recomputed for each batch
of queries. Scoring it on the same attributed models and the same LDS utilities (shared cache)
places LoRIF against an implementation it did not write.

What: ``kronfluence_scores(task, strategy, damping)`` runs Kronfluence's pairwise scores for a task
of bench_quality.py's protocol (``model()``, ``train_examples()``, ``query_examples()``,
``collate``, per-example ``loss``, optional ``measurement`` and ``tracked_modules``) and returns
the (Q, N) float32 scores with timings. The command line scores every data set with K-FAC and
EK-FAC at both damping rules, with and without the biases, next to the exact dense influence of
bench_quality.py (f = 1), and writes benchmarks/results/kronfluence[_quick].json:

    python benchmarks/peer_kronfluence.py --datasets digits,fortunes [--quick]   # 2 min (quick: 1)

(on the shared 2-core CPU once bench_quality's LDS utilities are cached; computing them is most
of the cost otherwise, ~20 min for the full fortunes plan).

Checked against hand-rolled K-FAC / EK-FAC on the digits MLP (same scores to 3e-5 relative) and,
on one nn.Linear whose Fisher is exactly Kronecker (loss linear in its output), against N x the
exact dense influence with λ = 0.1·trace/D (2e-7 relative: same sign, same heuristic λ x N).

How the task is mapped onto Kronfluence:
  * Sign: Kronfluence's pairwise score is ∇m(z_q)ᵀ (F + λI)⁻¹ ∇L(z_i), with m the measurement
    and L the training loss, no minus sign (kronfluence/module/tracker/pairwise_score.py). With
    m = the loss, a HIGHER score means training on z_i LOWERS the query's loss: a proponent, the
    convention of LoRIF and of tools/lds.py. Scores are returned unchanged.
  * Damping: ``ScoreArguments.damping_factor``. "default" leaves Kronfluence's default (1e-8),
    None is its heuristic, 0.1 x the mean eigenvalue per module (of the K-FAC Kronecker product
    of the factors' eigenvalues, or of the EK-FAC corrected eigenvalues), a float is used as is.
    Kronfluence's curvature is a per-example MEAN (K-FAC factors are per-token means), so an
    absolute λ is not comparable with the engine's, which is on a SUM over examples.
  * Curvature: the empirical Fisher (``use_empirical_fisher=True``, the true labels), like the
    engine's GᵀG; the true Fisher (``sample=True``) is not implemented.
  * Modules: exactly the layers the engine tracks (lorif_stream.capture.tracked_layers over the
    task's ``tracked_modules`` regex, None = every nn.Linear / HF Conv1D), passed by name through
    ``Task.get_influence_tracked_modules``. Kronfluence supports nn.Linear only, so each tracked
    HF Conv1D (weight (in, out), y = x W + b) is replaced, on a copy of the model, by the
    nn.Linear with the transposed weight; the task's loss on a training batch is checked to be
    unchanged. Kronfluence also covers each layer's bias (a homogeneous input coordinate), which
    the engine does not: ``track_bias=False`` moves each bias into an untracked add after a
    weights-only nn.Linear, so that Kronfluence attributes through the engine's parameters.
  * Padding: a dict batch with an ``attention_mask`` hands it to Kronfluence
    (``Task.get_attention_mask``), which drops padded positions from the K-FAC covariances.
  * Numerics: CPU, fp32 everywhere (no AMP), fp64 eigendecompositions (Kronfluence's default).
  * Cost: no index (bytes per example 0), but every training gradient is recomputed once per
    query batch: ceil(Q / batch_size) passes over the training set per scoring call.
Kronfluence writes its factors and scores to disk; they go to a temporary directory that is
removed before returning.

Install it without letting pip replace the CPU torch (kronfluence declares torchvision, which it
never imports):
    pip install --no-deps kronfluence && pip install --no-deps accelerate einconv einops opt_einsum
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import kronfluence
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task as KronfluenceTask
from kronfluence.utils.constants import (
    ACTIVATION_EIGENVALUES_NAME,
    ALL_MODULE_NAME,
    GRADIENT_EIGENVALUES_NAME,
    HEURISTIC_DAMPING_SCALE,
    LAMBDA_MATRIX_NAME,
    NUM_LAMBDA_PROCESSED,
)
from kronfluence.utils.dataset import DataLoaderKwargs

ROOT = Path(__file__).resolve().parents[1]
try:
    import lorif_stream  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
from lorif_stream.capture import tracked_layers  # noqa: E402
from lorif_stream.task import resolve_task  # noqa: E402

STRATEGIES = {"kfac": "K-FAC", "ekfac": "EK-FAC"}
DAMPINGS = ("default", None)  # Kronfluence's default 1e-8, and its heuristic


class _Examples(Dataset):
    def __init__(self, examples):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


class _Adapter(KronfluenceTask):
    """A lorif task seen through Kronfluence's Task interface."""

    def __init__(self, task, module_names: list[str]):
        self.task = task
        self.module_names = module_names

    def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
        if sample:
            raise NotImplementedError("only the empirical Fisher is supported (use_empirical_fisher=True)")
        return self.task.loss(model, batch).sum()

    def compute_measurement(self, batch, model) -> torch.Tensor:
        return self.task.measurement(model, batch).sum()

    def get_influence_tracked_modules(self) -> list[str]:
        return self.module_names

    def get_attention_mask(self, batch):
        return batch.get("attention_mask") if isinstance(batch, dict) else None


class _AddBias(nn.Module):
    """y = x + b: a layer's bias split off its weights-only nn.Linear, out of Kronfluence's sight."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


def _as_linear(model: nn.Module, layers, track_bias: bool) -> tuple[nn.Module, list[str], int]:
    """A copy of `model` in which every tracked layer is an nn.Linear (an HF Conv1D's weight
    transposed); with track_bias=False a layer's bias moves to an untracked _AddBias after its
    Linear. Returns the copy, the names of the Linear modules to track and how many were replaced."""
    model = copy.deepcopy(model)
    names, replaced = [], 0
    for layer in layers:
        module = model.get_submodule(layer.name)
        split_bias = not track_bias and module.bias is not None
        if layer.kind == "linear" and not split_bias:
            names.append(layer.name)
            continue
        linear = nn.Linear(layer.in_features, layer.out_features, bias=module.bias is not None and not split_bias,
                           dtype=module.weight.dtype, device=module.weight.device)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t() if layer.kind == "conv1d" else module.weight)
            if linear.bias is not None:
                linear.bias.copy_(module.bias)
        parent, _, child = layer.name.rpartition(".")
        replacement = nn.Sequential(linear, _AddBias(module.bias)) if split_bias else linear
        setattr(model.get_submodule(parent), child, replacement)
        names.append(f"{layer.name}.0" if split_bias else layer.name)
        replaced += 1
    return model, names, replaced


@torch.no_grad()
def _check_same_loss(task, original: nn.Module, converted: nn.Module, batch_size: int) -> float:
    batch = task.collate(list(task.train_examples())[:batch_size])
    a, b = task.loss(original.eval(), batch), task.loss(converted.eval(), batch)
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
        diff = float((a - b).abs().max())
        raise RuntimeError(f"rewriting the tracked layers changed the loss (max |diff| {diff:.3g})")
    return float((a - b).abs().max())


def _damping_per_module(analyzer: Analyzer, strategy: str, damping) -> dict[str, float]:
    """The λ Kronfluence adds to each module's eigenvalues (recomputed from the saved factors for
    the heuristic, which Kronfluence applies internally without reporting it)."""
    if damping is not None:
        return {}
    factors = analyzer.load_all_factors(factors_name=strategy)
    out = {}
    if strategy == "ekfac":
        for name, lam in factors[LAMBDA_MATRIX_NAME].items():
            n = float(factors[NUM_LAMBDA_PROCESSED][name])
            out[name] = HEURISTIC_DAMPING_SCALE * float(lam.double().mean()) / n
    else:  # mean of kron(a, g) = mean(a)·mean(g)
        for name, a in factors[ACTIVATION_EIGENVALUES_NAME].items():
            g = factors[GRADIENT_EIGENVALUES_NAME][name]
            out[name] = HEURISTIC_DAMPING_SCALE * float(a.double().mean()) * float(g.double().mean())
    return out


def kronfluence_scores(task, strategy: str, damping: float | None | str = "default", *, track_bias: bool = True,
                       batch_size: int = 32, workdir: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """Kronfluence's (Q, N) float32 pairwise influence scores of `task` (higher = stronger proponent).

    strategy: "kfac" or "ekfac". damping: "default" (Kronfluence's ScoreArguments default, 1e-8),
    None (its heuristic, 0.1 x the mean eigenvalue per module) or a float. track_bias: True is
    Kronfluence as it comes (each layer's weight and bias), False tracks the weights only, the
    parameters the engine attributes through. `batch_size` is the train and query batch.
    Kronfluence's files go to a temporary directory under `workdir` (default: the system's),
    removed on return. Returns the scores and a dict of timings (fit_s: factors, score_s:
    pairwise scores) and settings.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {tuple(STRATEGIES)}")
    if isinstance(damping, str) and damping != "default":
        raise ValueError(f"damping {damping!r}: use 'default', None or a float")
    task = resolve_task(task)
    original = task.model()
    layers = tracked_layers(original, task.tracked_modules, f=1)
    if any(layer.name == "" for layer in layers):
        raise ValueError("Kronfluence cannot track the model's root module: wrap it, e.g. nn.Sequential(model)")
    model, names, replaced = _as_linear(original, layers, track_bias)
    loss_diff = _check_same_loss(task, original, model, batch_size)
    adapter = _Adapter(task, names)
    train, queries = _Examples(task.train_examples()), _Examples(task.query_examples())
    score_args = ScoreArguments() if damping == "default" else ScoreArguments(damping_factor=damping)
    with tempfile.TemporaryDirectory(prefix="kronfluence-", dir=workdir) as out, warnings.catch_warnings():
        # Kronfluence builds a (disabled on CPU) torch.cuda.amp.GradScaler, deprecated in torch 2.x
        warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.GradScaler", category=FutureWarning)
        analyzer = Analyzer(analysis_name="peer", model=prepare_model(model, adapter), task=adapter, cpu=True,
                            log_level=logging.WARNING, disable_tqdm=True, output_dir=out)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=task.collate))
        t0 = time.perf_counter()
        analyzer.fit_all_factors(factors_name=strategy, dataset=train, per_device_batch_size=batch_size,
                                 factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=True))
        t1 = time.perf_counter()
        analyzer.compute_pairwise_scores(scores_name="scores", factors_name=strategy, query_dataset=queries,
                                         train_dataset=train, per_device_query_batch_size=batch_size,
                                         per_device_train_batch_size=batch_size, score_args=score_args)
        t2 = time.perf_counter()
        scores = analyzer.load_pairwise_scores(scores_name="scores")[ALL_MODULE_NAME]
        lambdas = _damping_per_module(analyzer, strategy, damping)
    info = {"strategy": strategy, "damping": damping, "track_bias": track_bias,
            "damping_factor": score_args.damping_factor, "heuristic_damping_per_module": lambdas,
            "fit_s": t1 - t0, "score_s": t2 - t1, "bytes_per_example": 0,
            "train_gradient_passes": math.ceil(len(queries) / batch_size), "batch_size": batch_size,
            "modules": names, "modules_replaced": replaced, "rewrite_max_loss_diff": loss_diff,
            "threads": torch.get_num_threads(), "kronfluence": kronfluence.__version__}
    return scores.to(torch.float32).numpy(), info


# ------------------------------------------------------------------------------------ benchmark


def _damping_label(damping) -> str:
    return "default 1e-8" if damping == "default" else "0.1·mean eig" if damping is None else f"{damping:g}"


def run_dataset(name: str, quick: bool, cache_root: Path, workdir: Path, batch_size: int) -> dict:
    """Every strategy x damping x bias tracking on one data set, plus the exact dense influence
    (f = 1, bench_quality's "exact") as a reference; ρ vs exact is the mean per-query Spearman."""
    import bench_quality as bq
    import lds

    plan = bq.PLANS[(name, quick)]
    task = bq.make_task(name, plan["task"])
    if task is None:
        return {"skipped": "fortunes data not installed"}
    key = hashlib.sha1(task.retrain_key.encode()).hexdigest()[:10]
    util = lds.compute_utilities(task, cache_root / f"{name}-{key}",
                                 lds.LDSConfig(n_subsets=plan["subsets"], n_seeds=plan["seeds"]), progress=True)
    train = bq.projected_gradients(task, task.train_examples(), 1, "loss", batch_size)
    queries = bq.projected_gradients(task, task.query_examples(), 1, "measurement", batch_size)
    exact, _ = bq.dense_scores(train, queries, damping_scale=0.1, storage=None)
    res = util.score(exact)
    rows = [{"method": "exact (reference)", "params": "W", "damping": "0.1·trace/D", "lds": res.mean,
             "ci": [res.ci_low, res.ci_high], "fit_s": None, "score_s": None, "spearman_vs_exact": 1.0,
             "per_query": res.per_query.tolist()}]
    for track_bias in (True, False):
        for strategy in STRATEGIES:
            for damping in DAMPINGS:
                scores, info = kronfluence_scores(task, strategy, damping, track_bias=track_bias,
                                                  batch_size=batch_size, workdir=workdir)
                res = util.score(scores)
                vs_exact = float(np.nanmean([lds.spearman(a, b) for a, b in zip(scores, exact)]))
                rows.append({"method": f"Kronfluence {STRATEGIES[strategy]}", "params": "W+b" if track_bias else "W",
                             "damping": _damping_label(damping), "lds": res.mean, "ci": [res.ci_low, res.ci_high],
                             "fit_s": info["fit_s"], "score_s": info["score_s"], "spearman_vs_exact": vs_exact,
                             "per_query": res.per_query.tolist(), "info": info})
                print(_table(name, rows[-1:]), flush=True)
    return {"task": task.retrain_key, "n_train": len(task.train_examples()), "n_queries": len(task.query_examples()),
            "lds": {"subsets": plan["subsets"], "seeds": plan["seeds"]}, "seed_agreement": util.seed_agreement(),
            "rows": rows}


HEADER = (f"{'dataset':<9} {'method':<20} {'params':<6} {'damping':<13} {'LDS [95% CI]':<24} {'fit s':>7} "
          f"{'score s':>8} {'ρ vs exact':>10}")


def _table(name: str, rows: list[dict]) -> str:
    lines = []
    for r in rows:
        fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        lds_ci = f"{r['lds']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
        lines.append(f"{name:<9} {r['method']:<20} {r['params']:<6} {r['damping']:<13} {lds_ci:<24} "
                     f"{fmt(r['fit_s']):>7} "
                     f"{fmt(r['score_s']):>8} {r['spearman_vs_exact']:>10.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="bench_quality's quick plans (fewer subsets, seeds, examples)")
    p.add_argument("--datasets", default="digits,fortunes", help="comma-separated names of bench_quality's PLANS")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lorif-stream" / "lds"),
                   help="LDS utility cache root, shared with bench_quality.py")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=32, help="train and query batch size")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kronfluence[_quick].json)")
    args = p.parse_args(argv)
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tools")]
    import bench_quality as bq

    torch.set_num_threads(args.threads)
    known = sorted({name for name, _ in bq.PLANS})
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    for n in names:
        if n not in known:
            p.error(f"unknown dataset {n!r} ({', '.join(known)})")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"kronfluence{'_quick' if args.quick else ''}.json")
    t0 = time.perf_counter()
    command = ["python benchmarks/peer_kronfluence.py"] + (argv if argv is not None else sys.argv[1:])
    report = {"command": " ".join(command),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "kronfluence": kronfluence.__version__, "threads": args.threads},
              "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="kronfluence-peer-") as tmp:
        for name in names:
            report["datasets"][name] = run_dataset(name, args.quick, Path(args.cache), Path(tmp), args.batch_size)
    report["total_s"] = time.perf_counter() - t0
    print()
    print(HEADER + "\n" + "-" * len(HEADER))
    for name, d in report["datasets"].items():
        print(_table(name, d["rows"]) if "rows" in d else f"{name}: skipped ({d['skipped']})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
