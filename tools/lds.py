"""Linear datamodeling score (LDS, DESIGN §2): how well attribution scores predict retraining.

For M random subsets S_m of the training set (each a fraction α = 0.5 of it, drawn from a seed),
retrain the model on S_m with several seeds and record, per query q, the utility

    u[m, q] = −(the task's measurement of q), averaged over the seeds

(the measurement defaults to the loss, so a higher utility is a better fit of the query). A
score matrix s (queries × train rows) predicts p[m, q] = Σ_{i∈S_m} s(q, i); the LDS of s is the
Spearman rank correlation of u[:, q] and p[:, q] over the M subsets, averaged over queries, with
a bootstrap confidence interval over queries.

The retrainable task
--------------------
A lorif-stream Task (see ``lorif_stream/task.py``) that also has

    retrain(subset_indices: np.ndarray, seed: int) -> torch.nn.Module

``subset_indices`` are sorted int64 positions in ``train_examples()``; the method trains a
fresh model on those examples only, with all its randomness (init, data order) drawn from
``seed``, and returns it. It must be deterministic: the same (indices, seed) give the same
model, which is what makes a resumed utility computation equal an uninterrupted one. The tool
calls ``torch.manual_seed(seed)`` before each call as a safety net for tasks that forget.
The returned model is evaluated with ``task.measurement`` (default ``task.loss``) on
``task.query_examples()`` in eval mode without gradients.
Optionally the task names its retraining recipe with ``retrain_key`` (a string attribute or a
zero-argument method): it is written into the cache manifest, so a cache made with another
recipe (more steps, another learning rate) is refused instead of silently mixed in.

The cache
---------
One directory per (task, α, subset seed, seeds): ``manifest.json`` and one
``subset_<m>.npz`` per finished subset (its indices, seeds and raw (S, Q) measurements), each
written to a temporary file and renamed, so a killed run keeps every finished subset and the
next run computes only the missing ones. Subset m depends only on (seed, m, N, α), not on M, so
a cache made with M subsets also serves any M' ≤ M and is extended in place for M' > M.

Command line::

    python tools/lds.py utilities --task tests/tasks/seq_task.py:retrainable --cache runs/lds --subsets 64 --seeds 2
    python tools/lds.py score --cache runs/lds --scores scores.npy
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

try:
    from lorif_stream.device import to_device
    from lorif_stream.task import load_task
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lorif_stream.device import to_device
    from lorif_stream.task import load_task

MANIFEST = "manifest.json"
CACHE_VERSION = 1


class CacheMismatchError(ValueError):
    """The cache directory was made for another task, data size, α, seed or seed count."""


# ------------------------------------------------------------------------------------ subsets


def subset_size(n_train: int, alpha: float) -> int:
    if n_train < 2:
        raise ValueError(f"n_train={n_train}: LDS needs at least 2 training examples")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")
    return int(min(n_train - 1, max(1, round(alpha * n_train))))


def draw_subset(n_train: int, m: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Subset m: sorted int64 indices, round(α·N) of them, a function of (seed, m, N, α) only."""
    if m < 0:
        raise ValueError(f"subset index m={m} must be >= 0")
    # one generator per subset (not one stream for all): subset m is the same whatever M is
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(m)]))
    return np.sort(rng.choice(n_train, size=subset_size(n_train, alpha), replace=False)).astype(np.int64)


def draw_subsets(n_train: int, n_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """(M, round(α·N)) int64: the first M subsets of the seed's sequence, each row sorted."""
    if n_subsets < 1:
        raise ValueError(f"n_subsets={n_subsets} must be >= 1")
    return np.stack([draw_subset(n_train, m, alpha, seed) for m in range(n_subsets)])


def subset_masks(subsets: np.ndarray, n_train: int) -> np.ndarray:
    """(M, N) float64 0/1 membership matrix of the subsets."""
    subsets = np.asarray(subsets)
    if subsets.size and (subsets.min() < 0 or subsets.max() >= n_train):
        raise ValueError(f"subset indices must lie in [0, {n_train}), got [{subsets.min()}, {subsets.max()}]")
    masks = np.zeros((subsets.shape[0], n_train), dtype=np.float64)
    np.put_along_axis(masks, subsets.astype(np.int64), 1.0, axis=1)
    return masks


# ------------------------------------------------------------------------------------ Spearman


def rankdata(x) -> np.ndarray:
    """1-based ranks of a 1-D array; tied values share the average of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"rankdata expects a 1-D array, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError("rankdata: the input contains NaN")
    n = x.shape[0]
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts_group = np.r_[True, xs[1:] != xs[:-1]] if n else np.zeros(0, dtype=bool)
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], n]
    average = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = average[group]
    return ranks


def spearman(a, b) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman expects two 1-D arrays of one length, got {a.shape} and {b.shape}")
    if a.shape[0] < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / denom if denom > 0 else float("nan")


# ------------------------------------------------------------------------------------ LDS


@dataclass(frozen=True)
class LDSResult:
    mean: float              # mean per-query Spearman over the queries where it is defined
    ci_low: float            # bootstrap percentile interval of that mean (queries resampled)
    ci_high: float
    confidence: float
    per_query: np.ndarray = field(repr=False)  # (Q,) NaN where u or p is constant over the subsets
    n_subsets: int = 0

    @property
    def n_valid(self) -> int:
        return int(np.isfinite(self.per_query).sum())

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2

    def to_dict(self) -> dict:
        return {"lds": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high, "confidence": self.confidence,
                "n_queries": int(self.per_query.shape[0]), "n_valid": self.n_valid, "n_subsets": self.n_subsets,
                "per_query": [None if not np.isfinite(v) else float(v) for v in self.per_query]}

    def __str__(self) -> str:
        return (f"LDS {self.mean:.4f}  [{self.ci_low:.4f}, {self.ci_high:.4f}] ({self.confidence:.0%} CI, "
                f"{self.n_valid}/{self.per_query.shape[0]} queries, {self.n_subsets} subsets)")


def predictions(scores: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """p[m, q] = Σ_{i∈S_m} s(q, i), (M, Q) float64 (fp64: sums of hundreds of fp32 scores)."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a (queries, rows) matrix, got shape {scores.shape}")
    return subset_masks(subsets, scores.shape[1]) @ scores.astype(np.float64).T


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0):
    """Percentile interval of the mean of `values` (resampled with replacement)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1")
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def lds(scores, subsets, utilities, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> LDSResult:
    """LDS of a (Q, N) score matrix, given the (M, k) subsets and their (M, Q) utilities."""
    scores = np.asarray(scores)
    utilities = np.asarray(utilities, dtype=np.float64)
    subsets = np.asarray(subsets)
    if utilities.ndim != 2 or utilities.shape != (subsets.shape[0], scores.shape[0]):
        raise ValueError(f"utilities must be (subsets, queries) = ({subsets.shape[0]}, {scores.shape[0]}), "
                         f"got {utilities.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    p = predictions(scores, subsets)
    per_query = np.array([spearman(utilities[:, q], p[:, q]) for q in range(scores.shape[0])])
    valid = per_query[np.isfinite(per_query)]
    mean = float(valid.mean()) if valid.size else float("nan")
    lo, hi = bootstrap_ci(valid, n_boot, confidence, seed)
    return LDSResult(mean, lo, hi, confidence, per_query, int(subsets.shape[0]))


# ------------------------------------------------------------------------------------ utilities


@dataclass(frozen=True)
class LDSConfig:
    """How the retraining experiment behind the LDS is drawn."""

    n_subsets: int = 64      # M
    n_seeds: int = 2         # S retrainings per subset, utilities averaged over them
    alpha: float = 0.5       # subset fraction of the training set
    seed: int = 0            # draws the subsets
    first_seed: int = 0      # retraining seeds are first_seed .. first_seed + S - 1, shared by all subsets
    eval_batch_size: int = 64

    def __post_init__(self):
        if self.n_subsets < 1:
            raise ValueError(f"n_subsets={self.n_subsets} must be >= 1")
        if self.n_seeds < 1:
            raise ValueError(f"n_seeds={self.n_seeds} must be >= 1")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha={self.alpha} must be in (0, 1)")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={self.eval_batch_size} must be >= 1")

    @property
    def seeds(self) -> tuple[int, ...]:
        # the same seeds for every subset: the subsets then differ in their data only (common
        # random numbers), which lowers the noise of the comparison across subsets
        return tuple(self.first_seed + s for s in range(self.n_seeds))


@dataclass(frozen=True)
class Utilities:
    """Finished subsets of a utility computation (possibly a prefix, when interrupted)."""

    subset_ids: np.ndarray      # (M',) which subsets m these rows are
    subsets: np.ndarray         # (M', k) int64 indices
    measurement: np.ndarray     # (M', S, Q) raw query measurements of each retrained model
    complete: bool              # every requested subset is there

    @property
    def u(self) -> np.ndarray:
        """(M', Q) utilities: −measurement averaged over seeds."""
        return -self.measurement.mean(axis=1)

    def score(self, scores, **kwargs) -> LDSResult:
        return lds(scores, self.subsets, self.u, **kwargs)

    def seed_agreement(self) -> float:
        """Mean over queries of Spearman(seed 0's utilities, seed 1's) across the subsets: how
        much of u is the subset rather than retraining noise (NaN with one seed). The LDS of
        any scores is bounded by how reliable u is, so read the LDS against this."""
        if self.measurement.shape[1] < 2:
            return float("nan")
        rho = [spearman(self.measurement[:, 0, q], self.measurement[:, 1, q]) for q in range(self.measurement.shape[2])]
        rho = [r for r in rho if np.isfinite(r)]
        return float(np.mean(rho)) if rho else float("nan")


def _unwrap(task):
    # lorif_stream.resolve_task wraps duck-typed tasks; retrain lives on the wrapped object
    return getattr(task, "wrapped", task)


def _retrain_key(task) -> str | None:
    key = getattr(_unwrap(task), "retrain_key", None)
    return str(key()) if callable(key) else (None if key is None else str(key))


def _measure(task, model: torch.nn.Module, queries, batch_size: int) -> np.ndarray:
    inner = _unwrap(task)
    measure = getattr(inner, "measurement", None) or inner.loss
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    out = []
    with torch.no_grad():
        for b in range(0, len(queries), batch_size):
            batch = to_device(inner.collate([queries[j] for j in range(b, min(len(queries), b + batch_size))]), device)
            values = measure(model, batch)
            if not isinstance(values, torch.Tensor) or values.dim() != 1:
                raise ValueError(f"measurement must return a (B,) tensor, got {getattr(values, 'shape', type(values))}")
            out.append(values.detach().to("cpu", torch.float64).numpy())
    values = np.concatenate(out)
    if not np.isfinite(values).all():
        raise ValueError("a retrained model gave a non-finite query measurement (diverged training?)")
    return values


def _check_manifest(cache: Path, want: dict) -> None:
    path = cache / MANIFEST
    if path.exists():
        have = json.loads(path.read_text())
        diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
        if diff:
            named = ", ".join(f"{k}: cache {a!r} vs {b!r}" for k, (a, b) in diff.items())
            raise CacheMismatchError(f"cache {cache} was made with other settings ({named}); use another cache dir")
        return
    cache.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(want, indent=1).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # a kill leaves either the old file or the whole new one


def _subset_path(cache: Path, m: int) -> Path:
    return cache / f"subset_{m:05d}.npz"


def _load_subset(path: Path, indices: np.ndarray, seeds: tuple[int, ...], n_queries: int) -> np.ndarray:
    with np.load(path) as z:
        if not np.array_equal(z["subset"], indices) or tuple(z["seeds"].tolist()) != seeds:
            raise CacheMismatchError(f"{path} holds another subset or seeds than this run draws")
        values = z["measurement"]
    if values.shape != (len(seeds), n_queries):
        raise CacheMismatchError(f"{path} has measurements of shape {values.shape}, expected ({len(seeds)}, {n_queries})")
    return values


def _manifest(config: LDSConfig, n_train: int, n_queries: int, task_key: str | None) -> dict:
    return {"version": CACHE_VERSION, "n_train": n_train, "n_queries": n_queries, "alpha": config.alpha,
            "subset_seed": config.seed, "seeds": list(config.seeds), "task_key": task_key}


def compute_utilities(task, cache_dir, config: LDSConfig | None = None, *, max_new: int | None = None,
                      progress: bool = True, task_key: str | None = None) -> Utilities:
    """Retrain on each of the config's subsets × seeds and measure the queries, caching per subset.

    Subsets already in `cache_dir` are loaded, the others computed in order and written as they
    finish. `max_new` caps how many are computed in this call (a time box; the result is then
    the finished prefix, `complete=False`). `task_key` (default: the task's `retrain_key`, else
    its class name) is stored in the manifest and must match on reuse.
    """
    config = config or LDSConfig()
    if max_new is not None and max_new < 0:
        raise ValueError(f"max_new={max_new} must be >= 0")
    inner = _unwrap(task)
    retrain = getattr(inner, "retrain", None)
    if not callable(retrain):
        raise TypeError(f"task {type(inner).__name__} has no retrain(subset_indices, seed) method: LDS needs one")
    n_train = len(inner.train_examples())
    queries = inner.query_examples()
    if len(queries) == 0:
        raise ValueError("the task has no query examples")
    task_key = task_key or _retrain_key(task) or type(inner).__name__
    cache = Path(cache_dir)
    _check_manifest(cache, _manifest(config, n_train, len(queries), task_key))

    ids, subsets, values = [], [], []
    computed, t0 = 0, time.perf_counter()
    for m in range(config.n_subsets):
        indices = draw_subset(n_train, m, config.alpha, config.seed)
        path = _subset_path(cache, m)
        if path.exists():
            vals = _load_subset(path, indices, config.seeds, len(queries))
        else:
            if max_new is not None and computed >= max_new:
                break
            start = time.perf_counter()
            rows = []
            for s in config.seeds:
                torch.manual_seed(s)
                model = retrain(indices.copy(), int(s))
                rows.append(_measure(task, model, queries, config.eval_batch_size))
            vals = np.stack(rows)
            buf = _npz_bytes(subset=indices, seeds=np.array(config.seeds, dtype=np.int64), measurement=vals,
                             seconds=np.float64(time.perf_counter() - start))
            _atomic_write(path, buf)
            computed += 1
            if progress:
                rate = (time.perf_counter() - t0) / computed
                print(f"[lds] subset {m + 1}/{config.n_subsets} done ({rate:.1f} s/subset)", file=sys.stderr, flush=True)
        ids.append(m)
        subsets.append(indices)
        values.append(vals)
    if not ids:
        return Utilities(np.zeros(0, np.int64), np.zeros((0, subset_size(n_train, config.alpha)), np.int64),
                         np.zeros((0, len(config.seeds), len(queries))), False)
    return Utilities(np.array(ids), np.stack(subsets), np.stack(values), len(ids) == config.n_subsets)


def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_utilities(cache_dir, n_subsets: int | None = None) -> Utilities:
    """The finished subsets of a cache (all of them, or the first `n_subsets`), without a task."""
    cache = Path(cache_dir)
    if not (cache / MANIFEST).exists():
        raise FileNotFoundError(f"{cache} is not an LDS cache (no {MANIFEST})")
    manifest = json.loads((cache / MANIFEST).read_text())
    seeds = tuple(manifest["seeds"])
    ids, subsets, values = [], [], []
    m = 0
    while _subset_path(cache, m).exists() and (n_subsets is None or m < n_subsets):
        indices = draw_subset(manifest["n_train"], m, manifest["alpha"], manifest["subset_seed"])
        values.append(_load_subset(_subset_path(cache, m), indices, seeds, manifest["n_queries"]))
        ids.append(m)
        subsets.append(indices)
        m += 1
    if not ids:
        raise FileNotFoundError(f"{cache} holds no finished subset yet")
    return Utilities(np.array(ids), np.stack(subsets), np.stack(values), n_subsets is None or len(ids) == n_subsets)


# ------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/lds.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("utilities", help="retrain on random subsets and cache the query utilities (resumable)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    u.add_argument("--task", required=True, help="retrainable task, path/file.py:NAME or module:NAME")
    u.add_argument("--cache", required=True, help="cache directory (one file per finished subset)")
    defaults = LDSConfig()
    u.add_argument("--subsets", type=int, default=defaults.n_subsets, help="M, number of random subsets")
    u.add_argument("--seeds", type=int, default=defaults.n_seeds, help="S, retrainings per subset")
    u.add_argument("--alpha", type=float, default=defaults.alpha, help="subset fraction of the training set")
    u.add_argument("--seed", type=int, default=defaults.seed, help="seed drawing the subsets")
    u.add_argument("--first-seed", type=int, default=defaults.first_seed, help="first retraining seed")
    u.add_argument("--max-new", type=int, default=None, help="compute at most this many subsets now (time box)")
    s = sub.add_parser("score", help="LDS of a (queries x rows) score matrix .npy against a cache",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--cache", required=True, help="cache directory made by `utilities`")
    s.add_argument("--scores", required=True, nargs="+", help="score matrices (.npy, queries x rows)")
    s.add_argument("--subsets", type=int, default=None, help="use only the first M subsets (default: all finished)")
    s.add_argument("--boot", type=int, default=2000, help="bootstrap resamples of the queries")
    s.add_argument("--confidence", type=float, default=0.95, help="confidence level of the interval")
    s.add_argument("--json", default=None, help="also write the results here")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "utilities":
            config = LDSConfig(args.subsets, args.seeds, args.alpha, args.seed, args.first_seed)
            res = compute_utilities(load_task(args.task), args.cache, config, max_new=args.max_new, task_key=args.task)
            state = "complete" if res.complete else "incomplete (run again to continue)"
            print(f"{len(res.subset_ids)}/{config.n_subsets} subsets in {args.cache}: {state}")
            return 0
        res = load_utilities(args.cache, args.subsets)
        out = {}
        for path in args.scores:
            result = res.score(np.load(path, mmap_mode="r"), n_boot=args.boot, confidence=args.confidence)
            print(f"{path}: {result}")
            out[path] = result.to_dict()
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        return 0
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
