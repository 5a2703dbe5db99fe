"""Rerank: rescore each query's best and worst index candidates at full dimension.

The streaming query ranks every row by a compressed score (projected, rank-c, bf16). People read
the top of that list, and its top-10 is where compression costs most, while the true top-10 lies
almost always within the index's top few hundred. So `query(..., rerank=K)` takes each query's
top-K and bottom-K rows, recomputes those candidates' gradients with the task's model and scores
them against the queries with the index's curvature at full dimension: whitened, unprojected,
untruncated. The cost grows with K and the number of queries, never with N.

**The metric.** A layer's full-dimension K-FAC influence is

    s(q, i) = tr(∇W_qᵀ (A_out+λ)⁻¹ ∇W_i (A_in+λ)⁻¹) = <M_outᵀ ∇W_q M_in, M_outᵀ ∇W_i M_in>

with ``M = U diag((e + λ)^-1/2)`` per side, ``A = U diag(e) Uᵀ`` the token moment of the whitening
pre-pass. Every side is a :class:`SideMap` ``v -> (v U) * scale``, applied to token vectors:

* a sketched side stores its full-dimension diagonal whitening ``w`` (``U = I``, ``scale = w``);
* a dense side that was not shrunk (``d == dim``) stores ``P' = W`` itself: ``U, scale = eigh(W)``;
* a dense side that was shrunk stores only ``W P`` (dim x d, d < dim), which does not determine
  ``W``. The pre-pass's moments are recomputed from its own sample (the build segment's
  ``sample_indices``, one forward+backward per sample example, 512 by default: the cost of ~512
  candidates, once per index: the metric is cached), then checked: the recomputed ``W`` applied to the seeded
  random ``P`` must give the stored ``P'`` (and the token counts must match), else the rerank
  refuses rather than rescore with another metric;
* an index built with ``projection_kind="random"`` has no whitening: the rerank is the plain
  gradient inner product (identity preconditioner; its low-rank curvature lives in the projected
  space and has no full-dimension counterpart).

**EK-FAC.** Where the index uses ``ekfac``, the full-dimension equivalent rescales the whitened
gradient in the eigenbasis of both moments (the basis of ``M``, since ``W`` is a function of
``A``) by ``1/(Λ̃ + λ̃)``, with ``Λ̃ = (N/m) Σ_{i ∈ sample} (M_outᵀ ∇W_i M_in)²`` estimated on the
same m-example whitening sample (N = rows the index's curvature covers) and ``λ̃`` the index's
damping rule (``damping`` if explicit, else ``damping_scale · mean(Λ̃)``). Kronfluence measures Λ
over the whole training set: a full pass, which a rerank must not cost.

**Cost.** The metric is folded into the query side once per query batch
(``H_q = M_out H̃_q M_inᵀ``, :class:`_QueryLayer`), so a candidate is scored from its *raw* tokens:
per layer either through its dense gradient ``G = δᵀ x`` (T·O·I to form, O·I per query) or, for
K-FAC only, in the per-token form ``Σ_{t,s} (δ_qt'·δ_is)(x_qt'·x_is)`` (Q·T_q·T·(O+I)), whichever
costs fewer multiplies (:func:`layer_plan`); no parameter gradient is ever formed by autograd.
Candidates go through the model in batches packed by size, shortest first (:func:`packed_batches`:
little padding, no batch larger than a --batch-size batch of the longest candidates), their
contributions summed inside the backward hooks one layer at a time. What remains is the model's
own forward and backward per candidate (~85% of the rerank on the benchmark's tiny GPT-2).

**Cache.** The metric depends on the index, the model and the whitening sample, not on the
queries, so :func:`index_metrics` keeps it in the index's directory (``rerank-metric.npz``, see
:func:`metric_cache_key`): only an index's first rerank pays the two sample passes.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .atomic import discard, publish, temp_beside
from .capture import LayerHooks, LayerInfo
from .device import notice, to_device
from .progress import Progress

Tensor = torch.Tensor

DENSE, TOKENS = "dense", "tokens"
# |W P - P'| / |P'| of a recomputed whitening: the build's fp32 eigendecomposition (sides > 1024)
# differs from fp64 by ~1e-5; another sample or model gives O(1e-1).
WHITENING_TOLERANCE = 1e-3
# values of one candidate chunk's intermediates (the dense G̃ or the token-product matrices)
_CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------------ the metric


@dataclass(frozen=True)
class SideMap:
    """``v -> (v U) * scale`` on one side's token vectors; None stands for the identity."""

    dim: int
    basis: Tensor | None = None  # (dim, dim), orthonormal columns
    scale: Tensor | None = None  # (dim,)

    def __post_init__(self):
        if self.basis is not None and tuple(self.basis.shape) != (self.dim, self.dim):
            raise ValueError(f"a side map of dim {self.dim} needs a ({self.dim}, {self.dim}) basis, "
                             f"got {tuple(self.basis.shape)}")
        if self.scale is not None and tuple(self.scale.shape) != (self.dim,):
            raise ValueError(f"a side map of dim {self.dim} needs a ({self.dim},) scale, got {tuple(self.scale.shape)}")

    def apply(self, v: Tensor) -> Tensor:
        if self.basis is not None:
            v = v @ self.basis
        return v * self.scale if self.scale is not None else v

    def transpose_apply(self, v: Tensor) -> Tensor:
        """``v -> (v * scale) Uᵀ``: the adjoint, so that ``<apply(a), b> = <a, transpose_apply(b)>``."""
        if self.scale is not None:
            v = v * self.scale
        return v @ self.basis.T if self.basis is not None else v

    def to(self, device) -> "SideMap":
        move = lambda t: None if t is None else t.to(device, torch.float32)  # noqa: E731
        return SideMap(self.dim, move(self.basis), move(self.scale))


@dataclass(frozen=True)
class LayerMetric:
    """One layer's full-dimension curvature: both side maps, and the EK-FAC rescaling
    ``1/(Λ̃ + λ̃)`` (O x I) of the rotated gradient, None for K-FAC."""

    inp: SideMap
    out: SideMap
    inverse: Tensor | None = None

    def __post_init__(self):
        if self.inverse is not None and tuple(self.inverse.shape) != (self.out.dim, self.inp.dim):
            raise ValueError(f"an EK-FAC rescaling of shape {tuple(self.inverse.shape)} does not fit a "
                             f"{self.inp.dim}->{self.out.dim} layer")

    def to(self, device) -> "LayerMetric":
        return LayerMetric(self.inp.to(device), self.out.to(device),
                           None if self.inverse is None else self.inverse.to(device, torch.float32))


def identity_metric(layer: LayerInfo) -> LayerMetric:
    return LayerMetric(SideMap(layer.in_features), SideMap(layer.out_features))


@torch.no_grad()
def side_map_of_whitening(W: Tensor) -> SideMap:
    """A stored full-dimension whitening ``W`` (symmetric) as ``U diag(w)``: the same inner products,
    and ``U`` is the moment's eigenbasis that EK-FAC rescales in."""
    W = W.to(torch.float64)
    w, U = torch.linalg.eigh((W + W.T) / 2)
    return SideMap(W.shape[0], U.to(torch.float32), w.to(torch.float32))


@torch.no_grad()
def side_map_of_moment(eigenvalues: Tensor, eigenvectors: Tensor, damping: float) -> SideMap:
    scale = (eigenvalues.to(torch.float64) + damping).rsqrt()
    return SideMap(eigenvalues.shape[0], eigenvectors.to(torch.float32), scale.to(torch.float32))


@torch.no_grad()
def whitened_tokens(metric: LayerMetric, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T, I) inputs and (B, T, O) output gradients -> their images under both side maps (fp32)."""
    return metric.inp.apply(x.to(torch.float32)), metric.out.apply(delta.to(torch.float32))


@torch.no_grad()
def rotated_gradients(xt: Tensor, dt: Tensor) -> Tensor:
    """(B, O, I) ``G̃_b = δ̃_bᵀ x̃_b``: the per-example gradient in the metric's frame."""
    return torch.einsum("bto,bti->boi", dt, xt)


@torch.no_grad()
def dense_scores(H: Tensor, G: Tensor) -> Tensor:
    """(Q, B) ``<H_q, G̃_b>`` for H (Q, O, I), G̃ (B, O, I)."""
    return H.reshape(H.shape[0], -1) @ G.reshape(G.shape[0], -1).T


@torch.no_grad()
def token_scores(qx: Tensor, qd: Tensor, cx: Tensor, cd: Tensor) -> Tensor:
    """(Q, B) ``Σ_{t,s} (δ̃_qt·δ̃_bs)(x̃_qt·x̃_bs)``: the dense score without forming any O x I
    matrix (padded positions have δ = 0 and add nothing)."""
    Q, Tq, _ = qx.shape
    B, T, _ = cx.shape
    out = torch.empty(Q, B, dtype=torch.float32, device=qx.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, Q * Tq * T))
    for s in range(0, B, step):
        e = min(B, s + step)
        kd = torch.einsum("qto,bso->qbts", qd, cd[s:e])
        kx = torch.einsum("qti,bsi->qbts", qx, cx[s:e])
        out[:, s:e] = (kd * kx).sum((2, 3))
    return out


def layer_plan(layer: LayerInfo, queries: int, query_tokens: float, candidate_tokens: float, kronecker: bool) -> str:
    """DENSE or TOKENS for one layer: the form with fewer multiplies per candidate. EK-FAC's
    rescaling is not a Kronecker product, so it is always DENSE."""
    O, I = layer.out_features, layer.in_features
    dense = candidate_tokens * O * I + queries * O * I
    tokens = queries * query_tokens * candidate_tokens * (O + I + 1)
    return TOKENS if kronecker and tokens < dense else DENSE


# ------------------------------------------------------------------------------------ hooks


class _TokenHooks(LayerHooks):
    """Hands each tracked call's (inputs, output gradients), as (B, T, dim), to `consume`."""

    def __init__(self, model, layers: Sequence[LayerInfo], consume: Callable[[str, Tensor, Tensor], None]):
        super().__init__(model, layers)
        self._consume_fn = consume

    def _keep_input(self, name: str, x: Tensor) -> Tensor:
        return x  # an alias of what autograd keeps anyway for the weight gradient

    def _consume(self, name: str, x: Tensor, delta: Tensor) -> None:
        B = delta.shape[0]
        self._consume_fn(name, x.reshape(B, -1, x.shape[-1]), delta.reshape(B, -1, delta.shape[-1]))

    def run(self, losses: Tensor) -> None:
        try:
            self._backward(losses)
        finally:
            self.reset()


def _losses(task, model, examples: list, device, objective: str) -> Tensor:
    batch = to_device(task.collate(examples), device)
    fn = task.loss if objective == "loss" else task.measurement
    values = fn(model, batch)
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.shape[0] != len(examples):
        raise ValueError(f"task.{objective}() must return a ({len(examples)},) tensor of per-example values")
    return values


def _batches(n: int, size: int):
    for b0 in range(0, n, size):
        yield b0, min(n, b0 + size)


# a packed candidate batch holds at most this many times --batch-size examples, however short:
# some per-example costs (a classifier's logits, the loss, the score window) do not shrink with length
_PACK_FACTOR = 4


def _collated_size(value) -> int:
    """Values in a collated batch (tensors, arrays, nested dicts/lists/tuples): a task-agnostic
    proxy for what one example costs the model."""
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, np.ndarray):
        return int(value.size)
    if isinstance(value, dict):
        return sum(_collated_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_collated_size(v) for v in value)
    return 0


def packed_batches(task, examples: list, batch_size: int) -> list[list[int]]:
    """Positions of `examples` in batches, shortest first, each holding at most `batch_size` x the
    longest example's size (its collated values) and `_PACK_FACTOR` x `batch_size` examples.

    A batch pads to its longest member, so batches of similar lengths waste no forward/backward
    on padding (random batches of 16 of the benchmark's texts pad 50 tokens to 64), and short
    examples go in larger batches, which amortize the per-op overhead; no batch holds more than a
    batch of `batch_size` longest examples, so memory stays what `batch_size` allows. Each
    example's gradient is its own (the loss of a batch is a sum of per-example losses), so the
    scores do not depend on the batches. Examples of one size (a fixed-shape task) keep their
    order and `batch_size`."""
    sizes = [_collated_size(task.collate([e])) for e in examples]
    if not sizes or max(sizes) <= 0:
        return [list(range(b0, b1)) for b0, b1 in _batches(len(examples), batch_size)]
    budget, cap = batch_size * max(sizes), _PACK_FACTOR * batch_size
    out, current = [], []
    for j in sorted(range(len(examples)), key=lambda j: sizes[j]):  # stable: equal sizes keep their order
        if current and (len(current) >= cap or (len(current) + 1) * sizes[j] > budget):
            out.append(current)
            current = []
        current.append(j)
    return out + [current] if current else out


def _pad_cat(parts: list[Tensor]) -> Tensor:
    """(b, T_j, dim) tensors of different T -> one (Σb, max T, dim), zero-padded (zero δ adds nothing)."""
    T = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, T - p.shape[1])) for p in parts])


# ------------------------------------------------------------------------------------ scores


@dataclass
class _QueryLayer:
    """One layer's query representation with the metric folded in, so that a candidate's *raw*
    tokens score against it: ``<H̃_q, M_outᵀ G M_in> = <M_out H̃_q M_inᵀ, G>`` for G = δᵀx, and
    ``(δ̃_qt·δ̃_s)(x̃_qt·x̃_s)`` with ``δ̃_s = δ_s M_out`` is ``(δ̃_qt M_outᵀ·δ_s)(x̃_qt M_inᵀ·x_s)``.
    Mapping the candidates' tokens instead cost T·(O² + I²) per candidate and layer, 4x the
    gradient itself on the benchmark's model; the fold costs Q·(O²I + OI²) once per query batch."""

    plan: str
    H: Tensor | None = None  # DENSE: (Q, O, I) = M_out H̃ M_inᵀ, H̃ rescaled by the EK-FAC inverse if any
    qx: Tensor | None = None  # TOKENS: (Q, Tq, I) = x̃ M_inᵀ
    qd: Tensor | None = None  # TOKENS: (Q, Tq, O) = δ̃ M_outᵀ


def _query_side(source, metrics: dict[str, LayerMetric], queries: list, batch_size: int) -> dict[str, _QueryLayer]:
    """Each layer's query representation: whitened tokens first, then the dense form where cheaper,
    then the metric folded back in (see _QueryLayer)."""
    layers, device = [l for l in source.layers if l.name in metrics], source.device
    tokens: dict[str, list] = {l.name: [] for l in layers}
    calls: dict[str, list] = {}

    def keep(name, x, delta):
        calls.setdefault(name, []).append(whitened_tokens(metrics[name], x, delta))

    counts = []
    with _TokenHooks(source.model, layers, keep) as hooks:
        for b0, b1 in _batches(len(queries), batch_size):
            calls.clear()
            with torch.enable_grad():
                values = _losses(source.task, source.model, queries[b0:b1], device, "measurement")
                if not bool(torch.isfinite(values.detach()).all()):
                    raise ValueError(f"a query among {b0}..{b1 - 1} has a non-finite measurement: it cannot be reranked")
                hooks.run(values)
            for l in layers:
                got = calls.get(l.name) or [(torch.zeros(b1 - b0, 1, l.in_features, device=device),
                                             torch.zeros(b1 - b0, 1, l.out_features, device=device))]
                # a module called twice: its tokens are those of both calls
                tokens[l.name].append((torch.cat([x for x, _ in got], 1), torch.cat([d for _, d in got], 1)))
            d0 = tokens[layers[0].name][-1][1]
            counts.extend((d0.abs().amax(-1) > 0).sum(1).tolist())
    Q, t_mean = len(queries), max(1.0, float(np.mean(counts)))
    out = {}
    for l in layers:
        qx, qd = _pad_cat([x for x, _ in tokens[l.name]]), _pad_cat([d for _, d in tokens[l.name]])
        metric = metrics[l.name]
        plan = layer_plan(l, Q, t_mean, t_mean, metric.inverse is None)
        if plan == TOKENS:
            out[l.name] = _QueryLayer(TOKENS, qx=metric.inp.transpose_apply(qx), qd=metric.out.transpose_apply(qd))
        else:
            H = rotated_gradients(qx, qd)
            H = H if metric.inverse is None else H * metric.inverse
            H = metric.inp.transpose_apply(H)  # (Q, O, I) @ ... along I
            H = metric.out.transpose_apply(H.transpose(1, 2)).transpose(1, 2).contiguous()
            out[l.name] = _QueryLayer(DENSE, H=H)
    return out


@torch.no_grad()
def rerank_scores(source, metrics: dict[str, LayerMetric], queries: list, candidates: list, batch_size: int,
                  progress: bool = False) -> Tensor:
    """(Q, n) full-dimension scores of `queries` (their measurement) against `candidates` (their
    training loss), summed over `source`'s tracked layers. A candidate whose loss is not finite
    scores 0, as its index row does (--skip-nonfinite stores zeros)."""
    metrics = {name: m.to(source.device) for name, m in metrics.items()}
    side = _query_side(source, metrics, queries, batch_size)
    Q, n = len(queries), len(candidates)
    scores = torch.zeros(Q, n, dtype=torch.float32, device=source.device)
    window = {}

    def score(name, x, delta):
        # the candidates' raw tokens: the metric is folded into the query side
        x, delta = x.to(torch.float32), delta.to(torch.float32)
        rep = side[name]
        if rep.plan == TOKENS:
            window["s"] += token_scores(rep.qx, rep.qd, x, delta)
            return
        step = max(1, _CHUNK_ELEMENTS // max(1, rep.H[0].numel()))
        for s in range(0, x.shape[0], step):
            window["s"][:, s:s + step] += dense_scores(rep.H, rotated_gradients(x[s:s + step], delta[s:s + step]))

    with _TokenHooks(source.model, [l for l in source.layers if l.name in metrics], score) as hooks, \
            Progress("rerank", total=n, unit="ex", enabled=progress) as bar:
        for batch in packed_batches(source.task, candidates, batch_size):
            window["s"] = torch.zeros(Q, len(batch), dtype=torch.float32, device=source.device)
            with torch.enable_grad():
                values = _losses(source.task, source.model, [candidates[j] for j in batch], source.device, "loss")
                hooks.run(values)
            finite = torch.isfinite(values.detach()) & torch.isfinite(window["s"]).all(0)
            scores[:, torch.as_tensor(batch, device=source.device)] = \
                torch.where(finite[None, :], window["s"], torch.zeros_like(window["s"]))
            bar.update(len(batch))
    return scores


# ------------------------------------------------------------------------------------ the index's metric


def build_examples(task, settings: dict) -> list:
    """The training examples of the index's build segment (the ones its whitening sample came from)."""
    segments = settings.get("segments") or []
    build = next((s for s in segments if s.get("kind") == "build" and s.get("start") == 0), None)
    examples = task.train_examples()
    if build is None or len(examples) != build["count"]:
        raise ValueError(f"the rerank recomputes the index's whitening sample from its build's training examples, "
                         f"but the task gives {len(examples):,} training examples and the build had "
                         f"{'none recorded' if build is None else format(build['count'], ',')}: "
                         f"query with the task the index was built with")
    return examples


@torch.no_grad()
def recomputed_moments(source, layers: Sequence[LayerInfo], sample: list, batch_size: int, budget: int,
                       progress: bool) -> dict[str, tuple]:
    """{layer: (A_in, A_out, tokens)} summed token moments over `sample`, as the build's pre-pass
    forms them (whitening.MomentCapture: same token rule, fp64 sums, budget groups)."""
    from .whitening import MomentCapture, moment_groups

    out = {}
    with Progress("rerank: whitening sample", total=len(sample) * len(moment_groups(layers, source.spec, budget)),
                  unit="ex", enabled=progress) as bar:
        for group in moment_groups(layers, source.spec, budget):
            capture = MomentCapture(source.model, group, source.spec, source.device)
            with capture:
                for b0, b1 in _batches(len(sample), batch_size):
                    with torch.enable_grad():
                        losses = _losses(source.task, source.model, sample[b0:b1], source.device, "loss")
                        if not bool(torch.isfinite(losses.detach()).all()):
                            capture.reset()  # the build skipped them too
                            continue
                        capture.accumulate(losses)
                    bar.update(b1 - b0)
            tokens = capture.tokens
            out.update({l.name: (capture.A_in[l.name], capture.A_out[l.name], tokens[l.name]) for l in group})
    return out


def _stored(snap, layer: str, field: str):
    from .whitening import array_name

    value = snap.array(array_name(layer, field))
    return None if value is None else torch.from_numpy(np.array(value, np.float32))


def whitening_metrics(source, snap, settings: dict, task, batch_size: int, budget: int,
                      progress: bool) -> dict[str, LayerMetric]:
    """The index's K-FAC whitening at full dimension, per layer (see the module docstring)."""
    from .projection import make_projections
    from .whitening import WHITENING_META, same_moment_sides, sample_indices, side_whitening

    meta = snap.state_meta(WHITENING_META) or {}
    summaries = meta.get("layers") or {}
    sides: dict[tuple[str, str], SideMap] = {}
    shrunk: list[LayerInfo] = []
    for l in source.layers:
        for side, dim, d in (("in", l.in_features, l.d_in), ("out", l.out_features, l.d_out)):
            P, w = _stored(snap, l.name, f"P_{side}"), _stored(snap, l.name, f"w_{side}")
            if P is None and w is None:
                raise ValueError(f"the index has no whitening for layer {l.name!r}: its pre-pass did not finish")
            if not (summaries.get(l.name, {}).get(side) or {}).get("whitened", True):
                sides[l.name, side] = SideMap(dim)  # a format-2 wide side kept its plain random projection
            elif w is not None:
                sides[l.name, side] = SideMap(dim, scale=w)
            elif d == dim:
                sides[l.name, side] = side_map_of_whitening(P)  # not shrunk: P' = W P = W
            elif l not in shrunk:
                shrunk.append(l)
    if shrunk:
        examples = build_examples(task, settings)
        positions = sample_indices(len(examples), int(meta["examples"]))
        moments = recomputed_moments(source, shrunk, [examples[int(p)] for p in positions], batch_size, budget, progress)
        base = make_projections(shrunk, source.spec, "cpu")
        for l in shrunk:
            tokens = moments[l.name][2]
            if tokens != summaries[l.name]["tokens"]:
                raise ValueError(f"the rerank cannot recompute the index's whitening of layer {l.name!r}: its sample "
                                 f"has {tokens:,} tokens now, {summaries[l.name]['tokens']:,} at the build")
        side_moments = {(l.name, side): moments[l.name][0 if side == "in" else 1] for l in shrunk for side in ("in", "out")
                        if (l.name, side) not in sides}
        tokens = {l.name: moments[l.name][2] for l in shrunk}
        # layers that read one input (q/k/v, gate/up) share its eigendecomposition, as in the build
        for members in same_moment_sides(list(side_moments), side_moments, tokens):
            name = members[0][0]
            sw = side_whitening(side_moments[members[0]].cpu(), float(meta["rho"]), 1.0 / max(tokens[name], 1))
            shared = side_map_of_moment(sw.eigenvalues, sw.eigenvectors, sw.damping)
            for layer, side in members:
                P_base = getattr(base[layer], "inp" if side == "in" else "out").matrix().to(torch.float64)
                stored = _stored(snap, layer, f"P_{side}").to(torch.float64)
                error = float((sw.apply(P_base) - stored).norm() / stored.norm().clamp_min(1e-30))
                if not error <= WHITENING_TOLERANCE:
                    raise ValueError(f"the rerank's recomputed whitening of layer {layer!r} ({side}put side) differs "
                                     f"from the index's by {error:.1e} (relative; same sample and model: < "
                                     f"{WHITENING_TOLERANCE:.0e}): the task's data or model changed since the build")
                sides[layer, side] = shared
    return {l.name: LayerMetric(sides[l.name, "in"], sides[l.name, "out"]) for l in source.layers}


@torch.no_grad()
def ekfac_metrics(source, metrics: dict[str, LayerMetric], sample: list, rows: int, curvature: dict,
                  batch_size: int, progress: bool) -> dict[str, LayerMetric]:
    """Add EK-FAC's rescaling to K-FAC metrics: Λ̃ on `sample`, scaled to the `rows` the index's Λ sums
    over, damped by the index's rule (`curvature` is its stored CurvatureConfig)."""
    on = {name: m.to(source.device) for name, m in metrics.items()}
    sums = {l.name: torch.zeros(l.out_features, l.in_features, dtype=torch.float64, device=source.device)
            for l in source.layers}

    def add(name, x, delta):
        xt, dt = whitened_tokens(on[name], x, delta)
        step = max(1, _CHUNK_ELEMENTS // max(1, sums[name].numel()))
        for s in range(0, xt.shape[0], step):
            sums[name] += (rotated_gradients(xt[s:s + step], dt[s:s + step]) ** 2).sum(0).to(torch.float64)

    used = 0
    with _TokenHooks(source.model, source.layers, add) as hooks, \
            Progress("rerank: EK-FAC sample", total=len(sample), unit="ex", enabled=progress) as bar:
        for b0, b1 in _batches(len(sample), batch_size):
            with torch.enable_grad():
                losses = _losses(source.task, source.model, sample[b0:b1], source.device, "loss")
                if not bool(torch.isfinite(losses.detach()).all()):
                    hooks.reset()
                    continue
                hooks.run(losses)
            used += b1 - b0
            bar.update(b1 - b0)
    out = {}
    for name, metric in metrics.items():
        Lam = sums[name].cpu() * (rows / max(used, 1))
        explicit = curvature.get("damping")
        lam = float(explicit) if explicit is not None else curvature.get("damping_scale", 0.1) * float(Lam.mean())
        lam = lam if lam > 0 else 1e-12
        out[name] = LayerMetric(metric.inp, metric.out, (1.0 / (Lam + lam)).to(torch.float32))
    return out


def index_metrics(source, snap, settings: dict, task, batch_size: int, budget: int, rows: int,
                  progress: bool, cache: str | os.PathLike | None = None) -> tuple[dict[str, LayerMetric], str]:
    """The full-dimension counterpart of the index's scores, per layer, and its name for the results.

    With `cache` (the index's directory), a whitened index's metric is read from ``cache /
    CACHE_FILE`` when that was written for the same index state, model, whitening sample and batch
    size, and written there after it is computed (see :func:`metric_cache_key`): the two passes
    over the whitening sample cost the same for every query run (~1,000 forward+backward passes)."""
    from .config import factor_key_of_index
    from .fit import CURVATURE_META, stored_preconditioner

    if factor_key_of_index(settings["factors"])["projection_kind"] != "whitened":
        return {l.name: identity_metric(l) for l in source.layers}, "gradient dot product"
    curvature = snap.state_meta(CURVATURE_META) or {}
    name = "EK-FAC" if stored_preconditioner(curvature) == "ekfac" else "K-FAC"
    key = None
    if cache is not None:
        try:
            key = metric_cache_key(source, snap, settings, task, batch_size, rows)
        except ValueError:
            key = None  # no build segment of the task's size: the computation below says so if it matters
    file = None if key is None else Path(cache) / CACHE_FILE
    if file is not None:
        cached = load_cached_metrics(file, key, [l.name for l in source.layers])
        if cached is not None:
            return cached, name
    metrics = whitening_metrics(source, snap, settings, task, batch_size, budget, progress)
    if name == "EK-FAC":
        from .whitening import WHITENING_META, sample_indices

        examples = build_examples(task, settings)
        positions = sample_indices(len(examples), int((snap.state_meta(WHITENING_META) or {})["examples"]))
        metrics = ekfac_metrics(source, metrics, [examples[int(p)] for p in positions],
                                int(curvature.get("rows") or rows), curvature.get("config") or {}, batch_size, progress)
    if file is not None:
        save_cached_metrics(file, key, metrics)
    return metrics, name


# ------------------------------------------------------------------------------------ the metric's cache

# The cached metric: one .npz in the index's directory (no pickle), its arrays' SHA-256 and the key
# in a JSON header. A version bump, another key or a failed checksum means the metric is recomputed.
CACHE_FILE = "rerank-metric.npz"
CACHE_VERSION = 1
_HEADER = "header"
# An LLM's full-dimension metric holds O² + I² (+ O·I for EK-FAC) floats per layer: tens of GB at
# Llama widths. Past this size it is not written beside the index (the rerank recomputes it).
CACHE_MAX_BYTES = 2 << 30


def _hash_value(h, value) -> None:
    """Feed a collated batch (tensors, arrays, nested containers, plain values) to a hash."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous().numpy() if value.dtype != torch.bfloat16 else \
            value.detach().cpu().to(torch.float32).numpy()
    if isinstance(value, np.ndarray):
        h.update(f"<{value.dtype.str}{value.shape}>".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value, key=str):
            h.update(repr(k).encode())
            _hash_value(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _hash_value(h, v)
        h.update(b"]")
    else:
        h.update(repr(value).encode())


@torch.no_grad()
def _model_digest(model) -> str:
    """Every parameter and buffer: name, shape, dtype, and its sum and sum of squares in fp64 (on
    its device: no copy of the weights), so that a change anywhere in the model -- the sample's
    token moments depend on untracked layers too -- gives another key."""
    h = hashlib.sha256()
    for kind, named in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in named:
            v = t.detach().to(torch.float64)
            h.update(f"{kind}:{name}:{tuple(t.shape)}:{t.dtype}:{float(v.sum())!r}:{float((v * v).sum())!r}".encode())
    return h.hexdigest()


def metric_cache_key(source, snap, settings: dict, task, batch_size: int, rows: int) -> str:
    """What the metric depends on: the index's whitening (its stored arrays and meta), curvature
    meta, factors, layers and row count; the model; the whitening sample's data (its collated
    batches); the batch size (a non-finite batch is skipped whole) and the device type."""
    from .fit import CURVATURE_META
    from .whitening import WHITENING_META, sample_indices

    meta = snap.state_meta(WHITENING_META) or {}
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "whitening": meta, "curvature": snap.state_meta(CURVATURE_META),
                         "factors": settings.get("factors"), "layers": [l.to_dict() for l in source.layers],
                         "rows": rows, "batch_size": batch_size, "device": source.device.type,
                         "fingerprint": source.fingerprint}, sort_keys=True, default=str).encode())
    for l in source.layers:
        for field in ("P_in", "P_out", "w_in", "w_out"):
            _hash_value(h, (field, _stored(snap, l.name, field)))
    h.update(_model_digest(source.model).encode())
    examples = build_examples(task, settings)
    positions = sample_indices(len(examples), int(meta.get("examples") or 0)) if meta.get("examples") else []
    _hash_value(h, ("sample", len(examples), np.asarray(positions)))
    for b0, b1 in _batches(len(positions), batch_size):
        _hash_value(h, task.collate([examples[int(p)] for p in positions[b0:b1]]))
    return h.hexdigest()


def _metric_arrays(metrics: dict[str, LayerMetric]) -> tuple[dict[str, np.ndarray], list]:
    arrays, layers = {}, []
    for i, (name, m) in enumerate(metrics.items()):
        layers.append({"name": name, "in": m.inp.dim, "out": m.out.dim})
        for side, sm in (("in", m.inp), ("out", m.out)):
            for field in ("basis", "scale"):
                t = getattr(sm, field)
                if t is not None:
                    arrays[f"{i}.{side}.{field}"] = t.detach().cpu().numpy()
        if m.inverse is not None:
            arrays[f"{i}.inverse"] = m.inverse.detach().cpu().numpy()
    return arrays, layers


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        _hash_value(h, (name, arrays[name]))
    return h.hexdigest()


def save_cached_metrics(file: Path, key: str, metrics: dict[str, LayerMetric]) -> bool:
    """Write the metric atomically (a temporary file, then a rename); where it cannot be written,
    say so once and go on: the rerank is the same, only the next one recomputes it."""
    arrays, layers = _metric_arrays(metrics)
    size = sum(a.nbytes for a in arrays.values())
    if size > CACHE_MAX_BYTES:
        notice(f"rerank: the full-dimension metric ({size / 1e9:.1f} GB) is over the {CACHE_MAX_BYTES / 1e9:.1f} GB "
               f"kept beside an index: not cached, every rerank of this index recomputes it")
        return False
    header = {"version": CACHE_VERSION, "key": key, "layers": layers, "sha256": _checksum(arrays)}
    tmp = None
    try:
        tmp = temp_beside(file)
        with open(tmp, "wb") as fh:
            np.savez(fh, **{_HEADER: np.frombuffer(json.dumps(header).encode(), np.uint8)}, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, file)
        return True
    except OSError as e:
        notice(f"rerank: cannot cache the full-dimension metric in {file} ({e.strerror or e}): "
               f"every rerank of this index recomputes it")
        try:
            discard(tmp)
        except OSError:
            pass
        return False


def load_cached_metrics(file: Path, key: str, names: Sequence[str]) -> dict[str, LayerMetric] | None:
    """The cached metric if `file` holds one for `key` whose checksum holds; None (recompute)
    otherwise, with a notice when the file is there but unreadable or corrupt."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            header = json.loads(bytes(z[_HEADER]).decode())
            if header.get("version") != CACHE_VERSION or header.get("key") != key:
                return None  # another index state, model or sample: not this metric (it is rewritten below)
            arrays = {n: z[n] for n in z.files if n != _HEADER}
        if _checksum(arrays) != header.get("sha256"):
            raise ValueError("checksum mismatch")
        layers = header["layers"]
        if [l["name"] for l in layers] != list(names):
            raise ValueError("other layers")
        out = {}
        for i, l in enumerate(layers):
            get = lambda n: None if n not in arrays else torch.from_numpy(np.array(arrays[n], np.float32))  # noqa: E731
            sides = [SideMap(int(l[side]), get(f"{i}.{side}.basis"), get(f"{i}.{side}.scale")) for side in ("in", "out")]
            out[l["name"]] = LayerMetric(sides[0], sides[1], get(f"{i}.inverse"))
        return out
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as e:
        notice(f"rerank: the cached full-dimension metric {file} is unreadable ({e}): recomputing it")
        return None


# ------------------------------------------------------------------------------------ results


def candidate_examples(task, settings: dict, rows: Sequence[int], ids: Sequence[str]) -> list:
    """The task's training example at each index row (whose id the results give): rows of a segment
    whose example count is the task's, with matching ids; any other row is refused by name (its
    example is not available)."""
    examples = task.train_examples()
    n = len(examples)
    spans = [(s["start"], s["count"]) for s in settings.get("segments") or [] if s["count"] == n]
    out = []
    for row, row_id in zip(rows, ids):
        span = next(((start, count) for start, count in spans if start <= row < start + count), None)
        pos = None if span is None else row - span[0]
        if pos is None or str(task.example_id(examples[pos], pos)) != row_id:
            raise ValueError(f"the rerank needs the training example of row {row} (id {row_id!r}) but the "
                             f"task's {n:,} training examples do not hold it (an appended segment?): query with the "
                             f"task that gives those rows, or without --rerank")
        out.append(examples[pos])
    return out


def candidate_rows(results: list[dict], k: int) -> list[list[int]]:
    """Per query, the rows of its top-k proponents and top-k opponents (index order, no repeats)."""
    return [list(dict.fromkeys([e["row"] for e in r["proponents"][:k]] + [e["row"] for e in r["opponents"][:k]]))
            for r in results]


def reranked(result: dict, rows: list[int], scores: Sequence[float], top_k: int) -> dict:
    """One query's result with proponents and opponents re-chosen among `rows` by their full-dimension
    `scores`; each entry keeps the index's score as `index_score` (ties: lower row first)."""
    index = {e["row"]: e for e in result["proponents"] + result["opponents"]}
    entries = [{"id": index[r]["id"], "row": r, "score": float(s), "index_score": index[r]["score"]}
               for r, s in zip(rows, scores)]
    by_row = sorted(entries, key=lambda e: e["row"])
    top = sorted(by_row, key=lambda e: -e["score"])[:top_k]
    bottom = sorted(by_row, key=lambda e: e["score"])[:top_k]
    return dict(result, proponents=top, opponents=bottom)


def rerank_results(results: list[dict], source, snap, settings: dict, queries: list, k: int, top_k: int,
                   batch_size: int, budget: int, rows: int, progress: bool = True,
                   layers: Sequence[int] | None = None, cache: str | os.PathLike | None = None) -> tuple[list[dict], dict]:
    """Rescore each query's top-k and bottom-k rows of `results` (the streaming pass's, at least k per
    list) at full dimension and re-choose its top_k proponents and opponents among them.

    `source` is the query's GradientSource (the task's model, the index's layers), `queries` the
    task's query examples in the order of `results`, `rows` the index's (all shards'), `layers` the
    positions in `source.layers` the index scores were summed over (None: all), `cache` the index's
    directory for the metric's cache (None: no cache). Returns the new results and stats
    (candidates, seconds, the metric used and its seconds)."""
    if k < 1:
        raise ValueError(f"rerank k={k} must be >= 1")
    if len(results) != len(queries):
        raise ValueError(f"{len(results)} results for {len(queries)} queries")
    t0 = time.perf_counter()
    task = source.task
    metrics, metric_name = index_metrics(source, snap, settings, task, batch_size, budget, rows, progress, cache)
    metric_seconds = time.perf_counter() - t0
    if layers is not None:
        chosen = {source.layers[i].name for i in layers}
        metrics = {name: m for name, m in metrics.items() if name in chosen}
    per_query = candidate_rows(results, k)
    union = sorted(set(r for rows in per_query for r in rows))
    id_of = {e["row"]: e["id"] for r in results for e in r["proponents"] + r["opponents"]}
    examples = candidate_examples(task, settings, union, [id_of[r] for r in union])
    column = {r: j for j, r in enumerate(union)}
    out = []
    for q0, q1 in _batches(len(queries), _query_batch([l for l in source.layers if l.name in metrics], budget)):
        # each query batch rescores the candidates of its own queries only
        mine = sorted(set(r for rows in per_query[q0:q1] for r in rows))
        scores = rerank_scores(source, metrics, queries[q0:q1], [examples[column[r]] for r in mine], batch_size,
                               progress).cpu()
        at = {r: j for j, r in enumerate(mine)}
        for q in range(q0, q1):
            rows = per_query[q]
            out.append(reranked(results[q], rows, scores[q - q0, [at[r] for r in rows]].tolist(), top_k))
    return out, {"rerank": k, "rerank_candidates": len(union), "rerank_metric": metric_name,
                 "rerank_metric_seconds": metric_seconds, "rerank_seconds": time.perf_counter() - t0}


def _query_batch(layers: Sequence[LayerInfo], budget: int) -> int:
    """Queries whose dense representation (O·I fp32 per layer, the bound of either form's size at
    the token counts where it is chosen) fits a quarter of the budget."""
    per_query = sum(l.in_features * l.out_features * 4 for l in layers)
    return max(1, budget // 4 // max(per_query, 1))
