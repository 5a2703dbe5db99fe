"""Attribution quality benchmark: LDS against index bytes per example, LoRIF vs LoGRA and friends.

Two offline real data sets, each a retrainable task (tools/lds.py):
  * digits: scikit-learn's 8x8 digits, MLP 64 -> 32 -> 10 (tanh), full-batch Adam from the
    seed's init. One-token inputs: every per-example gradient has rank 1, so c = 1 is exact.
  * fortunes: a tiny GPT-2 (2 layers, 64 wide, 2 heads, eager attention) trained from scratch on
    Debian `fortunes` texts with a byte-level BPE (512 tokens) trained offline on the training
    texts; the measurement is the summed next-token CE of a query text. Skipped, with a message,
    when /usr/share/games/fortunes is absent (apt-get install fortunes-min). The transformer
    blocks' Conv1D layers are tracked; the tied lm_head is not.
Utilities (M subsets x S seeds, α = 0.5) are cached per data set and resumed (tools/lds.py).

Methods, all scored on the same attributed model (trained on the whole training set, seed 0):
  * LoRIF: lorif_stream.build + query over a grid of f (projection), c (factor rank) and r
    (curvature rank); default damping policy (λ = 0.1·mean of the sketched top-r eigenvalues, as
    in the LoRIF paper). Bytes/example = lorif_stream.info(index)["bytes_per_example"] (bf16,
    after zstd).
  * LoGRA: the dense D-dim projected gradient (same seeded projections, captured with the
    engine's own GradientSource, rounded to bf16 like a LoGRA store) and the exact dense
    (A + λI)^-1, λ = 0.1·trace(A)/D per layer (0.1 x the mean eigenvalue, LoGRA's rule). The
    inverse is applied in fp64 by a solve with A + λI when D <= N, else through the N x N kernel
    (g_q^T (GᵀG + λI)^-1 Gᵀ = g_q^T Gᵀ (GGᵀ + λI)^-1, the same matrix, no approximation).
    Bytes/example = 2·D (uncompressed bf16). Its timings are in-memory (no index I/O).
  * graddot: the same projected gradients, identity preconditioner (no curvature).
  * exact: LoGRA at f = 1 (no projection), unrounded, in fp64: the damped Gauss-Newton influence
    (bytes/example = 4·D, the fp32 gradient).

    python benchmarks/bench_quality.py --quick     # 3.5 min on the shared 2-core CPU (fewer subsets/configs)
    python benchmarks/bench_quality.py             # 13 min there (utilities are cached: reruns take ~1 min)
Writes benchmarks/results/quality.json (--quick: quality_quick.json) and the plot
benchmarks/results/quality_front.png (--quick: quality_front_quick.png).
"""
from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
try:
    import lorif_stream as ls
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
    import lorif_stream as ls
sys.path.insert(0, str(ROOT / "tools"))
import lds  # noqa: E402

from lorif_stream.gradients import GradientSource  # noqa: E402
from lorif_stream.projection import ProjectionSpec  # noqa: E402
from lorif_stream.task import resolve_task  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FORTUNES_DIR = Path("/usr/share/games/fortunes")


# ------------------------------------------------------------------------------------ digits


class DigitsTask:
    """sklearn digits, MLP 64 -> 32 -> 10 (tanh), full-batch Adam with a little L2."""

    tracked_modules = None

    def __init__(self, n_train: int = 1000, n_query: int = 40, steps: int = 300, lr: float = 0.01,
                 weight_decay: float = 1e-3, split_seed: int = 0):
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        order = np.random.default_rng(split_seed).permutation(len(y))
        if n_train + n_query > len(y):
            raise ValueError(f"n_train + n_query = {n_train + n_query} exceeds the {len(y)} digits")
        X = torch.tensor(X / 16.0, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.long)
        self.train = [(X[i], y[i]) for i in order[:n_train]]
        # queries from the held-out part: attribution explains generalisation, not memorisation
        self.queries = [(X[i], y[i]) for i in order[n_train:n_train + n_query]]
        self.steps, self.lr, self.weight_decay = steps, lr, weight_decay
        self.retrain_key = f"digits/n{n_train}/q{n_query}/s{split_seed}/adam{steps}/lr{lr}/wd{weight_decay}"
        self._model = self.retrain(np.arange(n_train), seed=0)

    @staticmethod
    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def model(self):
        return copy.deepcopy(self._model)

    def train_examples(self):
        return self.train

    def query_examples(self):
        return self.queries

    def collate(self, examples):
        return torch.stack([e[0] for e in examples]), torch.stack([e[1] for e in examples])

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    def retrain(self, subset_indices, seed):
        model = self.make_model(seed)
        x, y = self.collate([self.train[int(i)] for i in subset_indices])
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        params = list(model.parameters())
        for _ in range(self.steps):
            opt.zero_grad(set_to_none=True)
            # L2 keeps the optimum well defined (the influence-function assumption) and stable across seeds
            obj = nn.functional.cross_entropy(model(x), y) + self.weight_decay * sum((p * p).sum() for p in params)
            obj.backward()
            opt.step()
        return model.eval()


class CancerTask(DigitsTask):
    """scikit-learn's breast-cancer table (30 features, 2 classes), MLP 30 -> 32 -> 2: a model whose
    layers are already small (the case where d = dim // f used to wreck attribution)."""

    def __init__(self, n_train: int = 400, n_query: int = 40, steps: int = 300, lr: float = 0.01,
                 weight_decay: float = 1e-3, split_seed: int = 0):
        from sklearn.datasets import load_breast_cancer

        X, y = load_breast_cancer(return_X_y=True)
        X = (X - X.mean(0)) / X.std(0)
        order = np.random.default_rng(split_seed).permutation(len(y))
        X = torch.tensor(X, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.long)
        self.train = [(X[i], y[i]) for i in order[:n_train]]
        self.queries = [(X[i], y[i]) for i in order[n_train:n_train + n_query]]
        self.steps, self.lr, self.weight_decay = steps, lr, weight_decay
        self.retrain_key = f"cancer/n{n_train}/q{n_query}/s{split_seed}/adam{steps}/lr{lr}/wd{weight_decay}"
        self._model = self.retrain(np.arange(n_train), seed=0)

    @staticmethod
    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(30, 32), nn.Tanh(), nn.Linear(32, 2))


# ------------------------------------------------------------------------------------ fortunes


def read_fortunes(directory: Path = FORTUNES_DIR, min_chars: int = 60, max_chars: int = 280) -> list[str]:
    """Every fortune (texts between lines holding only '%') of the plain files, deduplicated, in a fixed order."""
    texts, seen = [], set()
    for path in sorted(p for p in glob.glob(str(directory / "*")) if os.path.isfile(p)
                       and not p.endswith((".dat", ".u8")) and not os.path.islink(p)):
        raw = Path(path).read_text(encoding="utf-8", errors="replace")
        for text in re.split(r"^%[ \t]*$", raw, flags=re.M):
            text = text.strip()
            if min_chars <= len(text) <= max_chars and text not in seen:
                seen.add(text)
                texts.append(text)
    return texts


class FortunesTask:
    """A tiny GPT-2 trained from scratch on fortunes; loss = summed next-token CE per text."""

    tracked_modules = r"^transformer\.h\."

    # 10 epochs at lr 2e-3 with linear decay and clipping: measured on 16 subsets x 2 seeds, the
    # utilities of two seeds rank the subsets alike (Spearman 0.59 per query); 5 epochs at 3e-3
    # gave 0.10 (seed noise swamped the subset effect) and lr 4e-3 was worse too
    def __init__(self, n_train: int = 400, n_query: int = 30, epochs: int = 10, batch_size: int = 16,
                 lr: float = 2e-3, max_tokens: int = 64, vocab: int = 512, split_seed: int = 0):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import GPT2Config

        texts = read_fortunes()
        if len(texts) < n_train + n_query:
            raise ValueError(f"only {len(texts)} fortunes found, need {n_train + n_query}")
        order = np.random.default_rng(split_seed).permutation(len(texts))
        train_texts = [texts[i] for i in order[:n_train]]
        query_texts = [texts[i] for i in order[n_train:n_train + n_query]]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(train_texts, trainer)  # offline, training texts only
        self.eos = tok.token_to_id("<|endoftext|>")
        # a leading <eos> lets the model predict (and attribute) a text's first token too
        encode = lambda t: [self.eos] + tok.encode(t).ids[: max_tokens - 1]  # noqa: E731
        self.train = [torch.tensor(encode(t)) for t in train_texts]
        self.queries = [torch.tensor(encode(t)) for t in query_texts]
        self.config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=tok.get_vocab_size(),
                                 n_positions=max_tokens, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                 bos_token_id=self.eos, eos_token_id=self.eos, attn_implementation="eager")
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.retrain_key = (f"fortunes/n{n_train}/q{n_query}/s{split_seed}/t{max_tokens}/v{vocab}/"
                            f"adamw-e{epochs}-b{batch_size}-lr{lr}-decay-clip1")
        self.mean_tokens = float(np.mean([len(t) for t in self.train]))
        self._model = self.retrain(np.arange(n_train), seed=0)

    def make_model(self, seed: int) -> nn.Module:
        from transformers import GPT2LMHeadModel

        torch.manual_seed(seed)
        return GPT2LMHeadModel(self.config)

    def model(self):
        return copy.deepcopy(self._model)

    def train_examples(self):
        return self.train

    def query_examples(self):
        return self.queries

    def collate(self, examples):
        T = max(len(e) for e in examples)
        ids = torch.full((len(examples), T), self.eos, dtype=torch.long)
        mask = torch.zeros((len(examples), T), dtype=torch.long)
        for b, e in enumerate(examples):
            ids[b, : len(e)] = e
            mask[b, : len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def _token_losses(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         ignore_index=-100, reduction="none")
        return ce.view(targets.shape), targets != -100

    def loss(self, model, batch):
        ce, _ = self._token_losses(model, batch)
        return ce.sum(dim=1)  # SUM over tokens: per-example gradients add up per token (DESIGN §7)

    def retrain(self, subset_indices, seed):
        model = self.make_model(seed).train()
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)
        g = torch.Generator().manual_seed(seed)
        subset = [self.train[int(i)] for i in subset_indices]
        steps = self.epochs * -(-len(subset) // self.batch_size)
        # linear decay to 0: the last steps are small, so the final model depends much less on
        # the last few minibatches, which cuts the seed-to-seed noise of the utilities
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)
        for _ in range(self.epochs):
            perm = torch.randperm(len(subset), generator=g).tolist()
            for b in range(0, len(perm), self.batch_size):
                ce, mask = self._token_losses(model, self.collate([subset[j] for j in perm[b:b + self.batch_size]]))
                opt.zero_grad(set_to_none=True)
                (ce.sum() / mask.sum()).backward()  # token mean: the usual LM objective
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
        return model.eval()


# ------------------------------------------------------------------------------------ baselines


def projected_gradients(task, examples, f: int, objective: str = "loss", batch_size: int = 32,
                        seed: int = 0) -> list[torch.Tensor]:
    """Per tracked layer, the (N, D) fp32 projected gradients of `examples`, captured exactly as the
    engine does (same hooks, same seeded projections as an index built with f and seed)."""
    task = resolve_task(task)
    source = GradientSource.open(task, ProjectionSpec(f=f, seed=seed), torch.device("cpu"))
    out = [[] for _ in source.layers]
    with source.capture() as capture:
        for b in range(0, len(examples), batch_size):
            chunk = [examples[j] for j in range(b, min(len(examples), b + batch_size))]
            grads, finite = source.projected_gradients(capture, chunk, [str(b + j) for j in range(len(chunk))],
                                                       objective)
            if not bool(finite.all()):
                raise ValueError(f"non-finite gradient in examples {b}..{b + len(chunk) - 1}")
            for l, G in enumerate(grads):
                out[l].append(G.reshape(G.shape[0], -1))
    return [torch.cat(parts) for parts in out]


@torch.no_grad()
def dense_scores(train: list[torch.Tensor], queries: list[torch.Tensor], damping_scale: float | None = 0.1,
                 damping: float | None = None, storage: str | None = "bf16") -> tuple[np.ndarray, list[float]]:
    """Σ_layers g_q^T (A_l + λ_l I)^-1 g_i with the exact dense inverse, A_l = Σ_i g_i g_iᵀ (fp64).

    λ_l = `damping` when given, else `damping_scale`·trace(A_l)/D_l; `damping_scale=None` and
    `damping=None` is the identity preconditioner (gradient dot product). `storage="bf16"` rounds the
    training gradients as a LoGRA store would. Returns the (Q, N) scores and the λ per layer.
    """
    total, lambdas = None, []
    for G, Gq in zip(train, queries):
        if storage == "bf16":
            G = G.to(torch.bfloat16)
        G, Gq = G.to(torch.float64), Gq.to(torch.float64)
        N, D = G.shape
        if damping is None and damping_scale is None:
            s, lam = Gq @ G.T, 0.0
        else:
            lam = float(damping) if damping is not None else damping_scale * float((G * G).sum()) / D
            lam = max(lam, 1e-12)  # an all-zero layer: its scores are 0 whatever λ is
            if D <= N:
                H = torch.linalg.solve(G.T @ G + lam * torch.eye(D, dtype=G.dtype), Gq.T)  # (D, Q)
                s = H.T @ G.T
            else:  # push-through identity: same matrix via the N x N kernel
                K = G @ G.T
                s = torch.linalg.solve(K + lam * torch.eye(N, dtype=G.dtype), (Gq @ G.T).T).T
        lambdas.append(lam)
        total = s if total is None else total + s
    return total.to(torch.float32).numpy(), lambdas


# ------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class Row:
    dataset: str
    method: str
    f: int
    c: int | None
    r: int | None
    lds: float
    ci_low: float
    ci_high: float
    bytes_per_example: float
    build_s: float
    query_s: float
    note: str = ""
    per_query: tuple = ()  # per-query Spearman (NaN where undefined): paired comparisons between rows
    min_side: int = 1

    def label(self) -> str:
        parts = [f"f={self.f}"] + ([f"c={self.c}"] if self.c else []) + ([f"r={self.r}"] if self.r else [])
        parts += [f"m={self.min_side}"] if self.min_side != 1 else []
        return f"{self.method} " + " ".join(parts)


# LoRIF modes: the paper's (random projections + top-r low-rank curvature, d = dim // f) and the
# engine's whitened projections scored by a plain dot product (its default) or with EK-FAC
MODES = {
    "LoRIF": dict(projection_kind="random", preconditioner="lowrank"),
    "LoRIF-W": dict(projection_kind="whitened", preconditioner="none"),  # the engine's default
    "LoRIF-W ekfac": dict(projection_kind="whitened", preconditioner="ekfac"),
}
LORIF_METHODS = tuple(MODES)


@dataclass(frozen=True)
class LorifConfig:
    mode: str
    f: int
    c: int
    r: int | None = None  # sketch rank (lowrank only)
    min_side: int = 1  # 1 = the paper's max(1, dim // f); the engine's default is 32

    def options(self) -> dict:
        return dict(MODES[self.mode], f=self.f, rank=self.c, min_side=self.min_side,
                    **({"sketch_rank": self.r} if self.r else {}))


def run_lorif(task, name: str, util: lds.Utilities, cfg: LorifConfig, workdir: Path, batch_size: int) -> Row:
    tag = f"{name}-{cfg.mode.replace(' ', '')}-f{cfg.f}-c{cfg.c}-r{cfg.r}-m{cfg.min_side}"
    index, scores = workdir / tag, workdir / f"{tag}.npy"
    t0 = time.perf_counter()
    ls.build(task, index, dtype="bf16", device="cpu", batch_size=batch_size, progress=False, **cfg.options())
    t1 = time.perf_counter()
    ls.query(task, index, None, scores, top_k=1, device="cpu", batch_size=batch_size, progress=False)
    t2 = time.perf_counter()
    info = ls.info(index)
    res = util.score(np.load(scores))
    state_bytes = info["disk_bytes"] - info["factor_bytes"]
    shutil.rmtree(index, ignore_errors=True)
    scores.unlink()
    lam = ", ".join(f"{l['damping']:.3g}" for l in info["layers"])
    return Row(name, cfg.mode, cfg.f, cfg.c, cfg.r, res.mean, res.ci_low, res.ci_high,
               float(info["bytes_per_example"]), t1 - t0, t2 - t1, f"λ per layer {lam}; index state and free pages "
               f"{state_bytes / 1e6:.1f} MB", tuple(res.per_query.tolist()), min_side=cfg.min_side)


def run_kronfluence(task, name: str, util: lds.Utilities, workdir: Path, batch_size: int) -> list[Row]:
    """Kronfluence's K-FAC and EK-FAC (full dimension, no index: it recomputes every training
    gradient per query batch) with its default damping (1e-8) and its 0.1·mean-eigenvalue heuristic."""
    try:
        import peer_kronfluence as peer
    except ImportError as e:
        print(f"[bench_quality] skipping Kronfluence ({e}): pip install -e '.[bench]'", flush=True)
        return []
    rows = []
    for strategy in ("kfac", "ekfac"):
        for damping, label in (("default", "default 1e-8"), (None, "heuristic 0.1·mean eig")):
            scores, stats = peer.kronfluence_scores(task, strategy, damping, batch_size=batch_size, workdir=workdir)
            res = util.score(scores)
            method = "Kronfluence " + {"kfac": "K-FAC", "ekfac": "EK-FAC"}[strategy] + ("" if damping else " heur")
            rows.append(Row(name, method, 1, None, None,
                            res.mean, res.ci_low, res.ci_high, 0.0, stats["fit_s"], stats["score_s"],
                            f"damping {label}; stores nothing (recomputes training gradients per query batch)",
                            tuple(res.per_query.tolist())))
    return rows


def run_dense(task, name: str, util: lds.Utilities, f: int, batch_size: int, methods: tuple[str, ...]) -> list[Row]:
    """LoGRA / graddot / exact at projection f, sharing one gradient pass."""
    t0 = time.perf_counter()
    train = projected_gradients(task, task.train_examples(), f, "loss", batch_size)
    t_grads = time.perf_counter() - t0
    D = sum(G.shape[1] for G in train)
    rows = []
    for method in methods:
        t1 = time.perf_counter()
        queries = projected_gradients(task, task.query_examples(), f, "measurement", batch_size)
        t_q = time.perf_counter() - t1
        t2 = time.perf_counter()
        if method == "graddot":
            s, lam = dense_scores(train, queries, damping_scale=None, storage="bf16")
        elif method == "exact":
            s, lam = dense_scores(train, queries, damping_scale=0.1, storage=None)
        else:
            s, lam = dense_scores(train, queries, damping_scale=0.1, storage="bf16")
        t_score = time.perf_counter() - t2
        res = util.score(s)
        nbytes = D * (4 if method == "exact" else 2)  # exact: the fp32 gradient itself
        note = "identity preconditioner" if method == "graddot" else "λ per layer " + ", ".join(f"{v:.3g}" for v in lam)
        # the dense inverse is built and applied in one solve; count it on the query side, and
        # the gradient pass (the 'index') on the build side
        rows.append(Row(name, method, f, None, None, res.mean, res.ci_low, res.ci_high, float(nbytes),
                        t_grads, t_q + t_score, note, tuple(res.per_query.tolist())))
        if method == "exact":
            sweep[name] = {scale: util.score(dense_scores(train, queries, damping_scale=scale, storage=None)[0]).mean
                           for scale in DAMPING_SWEEP}
            print(f"[bench_quality] {name}: exact influence LDS by λ = scale·trace/D: "
                  + ", ".join(f"{k:g}: {v:.3f}" for k, v in sweep[name].items()), flush=True)
    return rows


sweep: dict[str, dict[float, float]] = {}


def pareto(rows: list[Row]) -> list[Row]:
    """Points not beaten by another with <= bytes and >= LDS (one of any exact ties), sorted by bytes."""
    def beaten(p: Row, q: Row) -> bool:
        return (q.bytes_per_example <= p.bytes_per_example and q.lds >= p.lds
                and (q.bytes_per_example < p.bytes_per_example or q.lds > p.lds))

    front, seen = [], set()
    for p in sorted(rows, key=lambda r: r.bytes_per_example):
        if not any(beaten(p, q) for q in rows) and (p.bytes_per_example, p.lds) not in seen:
            seen.add((p.bytes_per_example, p.lds))
            front.append(p)
    return front


def paired_difference(a: Row, b: Row) -> tuple[float, float, float]:
    """Mean over queries of a's minus b's Spearman, with a bootstrap CI over queries: paired, so it
    is much tighter than comparing the two rows' own intervals (query difficulty cancels)."""
    d = np.array(a.per_query) - np.array(b.per_query)
    d = d[np.isfinite(d)]
    lo, hi = lds.bootstrap_ci(d)
    return float(d.mean()), lo, hi


def dominance(lorif: list[Row], logra: list[Row]) -> dict:
    """Per LoGRA point: the best LoRIF LDS at no more bytes, the paired difference (LoRIF − LoGRA)
    with its 95% CI, and whether LoRIF is higher (point estimate) / not significantly lower."""
    out = []
    for g in sorted(logra, key=lambda r: r.bytes_per_example):
        cheaper = [p for p in lorif if p.bytes_per_example <= g.bytes_per_example]
        best = max(cheaper, key=lambda p: p.lds, default=None)
        item = {"logra": g.label(), "logra_bytes": g.bytes_per_example, "logra_lds": g.lds,
                "best_lorif": None, "lorif_higher": False, "lorif_not_worse": False}
        if best is not None:
            diff, lo, hi = paired_difference(best, g)
            item.update(best_lorif=best.label(), best_lorif_bytes=best.bytes_per_example, best_lorif_lds=best.lds,
                        paired_diff=diff, paired_diff_ci=[lo, hi], lorif_higher=best.lds >= g.lds,
                        lorif_not_worse=hi >= 0)
        out.append(item)
    return {"per_logra_point": out, "dominates": all(d["lorif_higher"] for d in out),
            "dominates_within_ci": all(d["lorif_not_worse"] for d in out)}


def plot(datasets: dict[str, list[Row]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.8), squeeze=False)
    styles = {"LoRIF": ("tab:blue", "o"), "LoRIF-W": ("tab:green", "D"), "LoRIF-W ekfac": ("tab:olive", "v"),
              "LoGRA": ("tab:orange", "s"), "graddot": ("tab:gray", "^"), "exact": ("black", "*")}
    peers = {"Kronfluence EK-FAC heur": "tab:red", "Kronfluence K-FAC heur": "tab:purple",
             "Kronfluence EK-FAC": "salmon", "Kronfluence K-FAC": "plum"}
    for ax, (name, rows) in zip(axes[0], datasets.items()):
        for method, (color, marker) in styles.items():
            pts = [r for r in rows if r.method == method]
            if not pts:
                continue
            x = [r.bytes_per_example for r in pts]
            y = [r.lds for r in pts]
            err = [[r.lds - r.ci_low for r in pts], [r.ci_high - r.lds for r in pts]]
            ax.errorbar(x, y, yerr=err, fmt=marker, color=color, alpha=0.45, ms=6, capsize=2, label=f"{method} configs")
            front = pareto(pts)
            ax.plot([r.bytes_per_example for r in front], [r.lds for r in front], "-", marker=marker, color=color,
                    lw=2, label=f"{method} front")
            if method in LORIF_METHODS:
                for r in front:
                    ax.annotate(f"f{r.f} c{r.c}" + (f" r{r.r}" if r.r else f" m{r.min_side}"),
                                (r.bytes_per_example, r.lds), fontsize=7, textcoords="offset points", xytext=(4, -10))
            elif method in ("LoGRA", "graddot"):
                for r in pts:
                    ax.annotate(f"f{r.f}", (r.bytes_per_example, r.lds), fontsize=7, textcoords="offset points",
                                xytext=(4, 4), color=color)
        for method, color in peers.items():  # no index: a level line, not a point on the bytes axis
            for r in rows:
                if r.method == method:
                    ax.axhline(r.lds, color=color, ls="--", lw=1.2, label=f"{method} (no index)")
                    ax.axhspan(r.ci_low, r.ci_high, color=color, alpha=0.08)
        ax.set_xscale("log")
        ax.set_xlabel("index bytes per example (log)")
        ax.set_ylabel("LDS (95% bootstrap CI over queries)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[Row]) -> str:
    head = f"{'dataset':<9} {'config':<34} {'LDS ± CI':>17} {'bytes/ex':>10} {'build s':>8} {'query s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ci = (r.ci_high - r.ci_low) / 2
        lines.append(f"{r.dataset:<9} {r.label():<34} {r.lds:>8.3f} ± {ci:<6.3f} {r.bytes_per_example:>10.0f} "
                     f"{r.build_s:>8.2f} {r.query_s:>8.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ plans

# LoRIF grids per data set. digits and cancer have one-token inputs: c = 1 is already exact there.
# The paper's mode keeps its d = dim // f (min_side 1); the whitened modes are run at the engine's
# default min_side (32) and, to separate the two changes, at 1 too.
def _paper(fs, cs, rs):
    return [LorifConfig("LoRIF", f, c, r) for f in fs for c in cs for r in rs]


def _whitened(fs, cs, min_sides=(32, 1), modes=("LoRIF-W",)):
    return [LorifConfig(m, f, c, None, ms) for m in modes for f in fs for c in cs for ms in min_sides]


PLANS = {
    ("digits", True): dict(task=dict(n_train=1000, n_query=40, steps=200), subsets=32, seeds=2,
                           lorif=_paper((1, 2, 4), (1,), (32, 256)) + _whitened((1, 2, 4), (1,))
                           + _whitened((1, 4), (1,), (32,), ("LoRIF-W ekfac",)), dense_f=(1, 2, 4)),
    ("digits", False): dict(task=dict(n_train=1000, n_query=50, steps=300), subsets=96, seeds=3,
                            lorif=_paper((1, 2, 4, 8), (1,), (16, 64, 256, 1024)) + _whitened((1, 2, 4, 8), (1,))
                            + _whitened((1, 2, 4, 8), (1,), (32,), ("LoRIF-W ekfac",)),
                            dense_f=(1, 2, 4, 8)),
    ("cancer", True): dict(task=dict(n_train=400, n_query=30), subsets=32, seeds=2,
                           lorif=_paper((1, 4), (1,), (256,)) + _whitened((1, 4), (1,))
                           + _whitened((1,), (1,), (32,), ("LoRIF-W ekfac",)), dense_f=(1, 4)),
    ("cancer", False): dict(task=dict(n_train=400, n_query=40), subsets=96, seeds=3,
                            lorif=_paper((1, 4), (1,), (256,)) + _whitened((1, 4), (1,))
                            + _whitened((1,), (1,), (32,), ("LoRIF-W ekfac",)), dense_f=(1, 4)),
    # (8, 8, 1024) is a diagnostic: at f = 8 every layer has min(d_out, d_in) <= 8 and r >= rank(A),
    # so it is LoGRA f=8 up to the damping rule (eigen-mean over the kept eigenvalues vs trace/D)
    ("fortunes", True): dict(task=dict(n_train=300, n_query=30), subsets=32, seeds=2,
                             lorif=_paper((4, 8), (1, 4), (1024,)) + _whitened((4, 8), (1, 4), (32, 1))
                             + _whitened((4,), (1, 4), (32,), ("LoRIF-W ekfac",)),
                             dense_f=(1, 4, 8)),
    ("fortunes", False): dict(task=dict(n_train=400, n_query=40), subsets=48, seeds=3,
                              lorif=_paper((2, 4, 8), (1, 4, 16), (128, 1024)) + [LorifConfig("LoRIF", 8, 8, 1024)]
                              + _whitened((2, 4, 8), (1, 2, 4, 16), (32, 1))
                              + _whitened((2, 4, 8), (1, 2, 4, 16), (32,), ("LoRIF-W ekfac",))
                              + [LorifConfig("LoRIF-W", 1, 64, None, 32), LorifConfig("LoRIF-W ekfac", 1, 64, None, 32)],
                              dense_f=(1, 2, 4, 8)),
}

# λ scales (x trace(A)/D) tried on the exact influence: how much of the spread between methods
# is just the damping
DAMPING_SWEEP = (0.01, 0.1, 1.0, 10.0)


DATASETS = ("digits", "cancer", "fortunes")


def make_task(name: str, settings: dict):
    if name == "digits":
        return DigitsTask(**settings)
    if name == "cancer":
        return CancerTask(**settings)
    if not FORTUNES_DIR.is_dir() or not read_fortunes():
        print(f"[bench_quality] skipping fortunes: no fortunes under {FORTUNES_DIR} "
              "(apt-get install -y fortunes-min)", flush=True)
        return None
    return FortunesTask(**settings)


def run_dataset(name: str, plan: dict, cache_root: Path, workdir: Path, batch_size: int,
                kronfluence: bool = True) -> tuple[list[Row], dict]:
    t0 = time.perf_counter()
    task = make_task(name, plan["task"])
    if task is None:
        return [], {"skipped": "fortunes data not installed"}
    t_model = time.perf_counter() - t0
    config = lds.LDSConfig(n_subsets=plan["subsets"], n_seeds=plan["seeds"])
    key = hashlib.sha1(task.retrain_key.encode()).hexdigest()[:10]
    t1 = time.perf_counter()
    util = lds.compute_utilities(task, cache_root / f"{name}-{key}", config, progress=True)
    t_util = time.perf_counter() - t1
    print(f"[bench_quality] {name}: {len(util.subset_ids)} subsets x {plan['seeds']} seeds of utilities "
          f"({t_util:.0f} s this run; cache {cache_root / f'{name}-{key}'}); seed-to-seed Spearman of the "
          f"utilities {util.seed_agreement():.2f}", flush=True)
    rows: list[Row] = []
    for f in plan["dense_f"]:
        methods = ("exact", "graddot") if f == 1 else ("LoGRA", "graddot")
        rows += run_dense(task, name, util, f, batch_size, methods)
        print(table(rows[-len(methods):]).split("\n", 2)[2], flush=True)
    for cfg in plan["lorif"]:
        rows.append(run_lorif(task, name, util, cfg, workdir, batch_size))
        print(table(rows[-1:]).split("\n", 2)[2], flush=True)
    if kronfluence:
        rows += run_kronfluence(task, name, util, workdir, batch_size)
        print(table([r for r in rows if r.method.startswith("Kronfluence")]).split("\n", 2)[2], flush=True)
    meta = {"task": task.retrain_key, "n_train": len(task.train_examples()), "n_queries": len(task.query_examples()),
            "lds": asdict(config), "model_train_s": t_model, "utilities_s_this_run": t_util,
            "seed_agreement": util.seed_agreement(),
            "exact_lds_by_damping_scale": {str(k): v for k, v in sweep.get(name, {}).items()},
            "layers": [{"name": l.name, "in": l.in_features, "out": l.out_features}
                       for l in GradientSource.open(resolve_task(task), ProjectionSpec(f=1), torch.device("cpu")).layers]}
    if name == "fortunes":
        meta["mean_tokens"] = task.mean_tokens
    return rows, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer subsets, seeds and configs (~5 min)")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated: {', '.join(DATASETS)}")
    p.add_argument("--no-kronfluence", action="store_true", help="skip the Kronfluence peer rows")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lorif-stream" / "lds"),
                   help="LDS utility cache root (resumable; reused across runs)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the machines are shared and oversubscription costs more than it gains)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per capture pass")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality[_quick].json)")
    p.add_argument("--plot", default=None, help="PNG path (default benchmarks/results/quality_front[_quick].png)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    suffix = "_quick" if args.quick else ""
    out = Path(args.out or RESULTS / f"quality{suffix}.json")
    png = Path(args.plot or RESULTS / f"quality_front{suffix}.png")
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    for n in names:
        if n not in DATASETS:
            p.error(f"unknown dataset {n!r} ({', '.join(DATASETS)})")
    t0 = time.perf_counter()
    all_rows: dict[str, list[Row]] = {}
    report = {"command": " ".join(["python benchmarks/bench_quality.py"] + (argv if argv is not None else sys.argv[1:])),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": args.threads},
              "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="lorif-quality-") as tmp:
        for name in names:
            rows, meta = run_dataset(name, PLANS[(name, args.quick)], Path(args.cache), Path(tmp), args.batch_size,
                                     kronfluence=not args.no_kronfluence)
            if not rows:
                report["datasets"][name] = meta
                continue
            all_rows[name] = rows
            lorif = [r for r in rows if r.method in LORIF_METHODS]
            logra = [r for r in rows if r.method == "LoGRA"]
            report["datasets"][name] = {**meta, "rows": [asdict(r) for r in rows],
                                        "lorif_front": [r.label() for r in pareto(lorif)],
                                        "logra_front": [r.label() for r in pareto(logra)],
                                        "lorif_vs_logra": dominance(lorif, logra)}
    report["total_s"] = time.perf_counter() - t0
    print()
    print(table([r for rows in all_rows.values() for r in rows]))
    for name, d in report["datasets"].items():
        if "lorif_vs_logra" in d:
            dom = d["lorif_vs_logra"]
            print(f"{name}: LoRIF front dominates LoGRA's: {dom['dominates']} (point estimates); "
                  f"not significantly worse anywhere (paired 95% CI): {dom['dominates_within_ci']}")
            for item in dom["per_logra_point"]:
                if item["best_lorif"]:
                    lo, hi = item["paired_diff_ci"]
                    print(f"    {item['logra']} ({item['logra_bytes']:.0f} B, LDS {item['logra_lds']:.3f}) vs "
                          f"{item['best_lorif']} ({item['best_lorif_bytes']:.0f} B, LDS {item['best_lorif_lds']:.3f}): "
                          f"LoRIF − LoGRA = {item['paired_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if all_rows:
        plot(all_rows, png)
    print(f"wrote {out} and {png} in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
