"""Kronecker-whitened projections: whiten each side of a layer with its K-FAC factor, then project.

The paper's curvature is the empirical Fisher of per-example (token-summed) gradients; on
multi-token models that is its weak point, and rank-c truncation of the raw gradient throws away
what the curvature would have weighted most. K-FAC approximates a layer's curvature by
``A_out ⊗ A_in`` with the token-level second moments

    A_in = mean_t x_t x_tᵀ (I x I),      A_out = mean_t δ_t δ_tᵀ (O x O)

(``δ_t`` the gradient of the summed loss at the layer's output, tokens with ``δ_t = 0`` -- padding,
masked positions -- not counted). Whitening both sides, ``W = (A + λI)^-1/2`` with
``λ = ρ·mean(eig A)``, and projecting afterwards, ``P' = W P``, makes the plain dot product of two
projected gradients a Johnson-Lindenstrauss estimate of K-FAC influence
``g_qᵀ (A_out+λI)⁻¹ ⊗ (A_in+λI)⁻¹ g_i``; the rank-c factorisation then truncates in the metric
the score uses. For ``f = 1`` (no random projection) it is K-FAC influence exactly.

The pre-pass streams an evenly spaced sample of the training set through the model, with layer
groups sized to the memory budget (one pass over the sample per group), checkpoints its fp64
accumulators in the index so a killed pre-pass resumes, eigendecomposes on the device and stores
per layer ``P_in'``, ``P_out'`` (used unchanged by build, append and query, so stored rows stay
comparable) plus the eigenbases of the *projected* moments, which the EK-FAC preconditioner
(``ekfac.py``) uses. It is one pre-pass in any world (a Comm: one process by default): under
torchrun each rank takes every world-th sample example and checkpoints into its own shard, the
moments are all-reduced and rank 0 eigendecomposes once.

Sides wider than the spec's ``max_dense_side`` (an LM head over a 152k vocabulary, a 14k MLP) are
whitened by the diagonal of their moment instead: their ``dim x dim`` fp64 moment (185 GB at 152k)
and its eigendecomposition would cost more than the whole build, and their projection is a
CountSketch (``projection.SketchSide``) whose weights absorb the diagonal, so the index stores
``dim`` numbers for such a side, not ``dim x d``. Their EK-FAC basis is the identity (the projected
moment of a diagonally whitened sketch is never formed); the EK-FAC statistics still correct each
coordinate. Indexes of format version 2 had no such sides: a side wider than
``MAX_WHITENED_SIDE`` kept its plain dense random projection, which they still do.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .capture import LayerHooks, LayerInfo
from .comm import Comm, GlobalProgress
from .config import budget_groups
from .device import notice, to_device
from .projection import (
    DenseSide, LayerProjection, ProjectionSpec, SideProjection, SketchSide, make_projections, side_projection,
)

WHITENING_META = "whitening"
_CHECKPOINT_SECONDS = 300.0
# Format version 2's limit: a wider side (an LM head over a 50k vocabulary) kept its plain random
# projection, its dim² fp64 moment (20 GB at 50k) and dim³ eigendecomposition costing more than the
# whole build. Newer indexes whiten sides wider than their max_dense_side by their diagonal.
MAX_WHITENED_SIDE = 8192
# Sides wider than this are eigendecomposed in fp32 (the pre-pass's fixed cost on a CPU is these
# eigendecompositions: GPT-2-small has 24 of 3072² and 24 of 2304²); narrower ones, cheap anyway, in fp64.
_FP64_EIGH_MAX_DIM = 1024


def array_name(layer: str, field: str) -> str:
    return f"whitening/{layer}/{field}"


def _partial_name(layer: str, side: str) -> str:
    return f"whitening-partial/{layer}/A_{side}"


def sample_indices(n: int, m: int) -> np.ndarray:
    """min(n, m) training positions spread evenly over [0, n): a sorted corpus is sampled whole."""
    if n < 1:
        raise ValueError(f"cannot sample whitening examples from {n} training examples")
    m = min(n, m)
    return np.unique(np.linspace(0, n - 1, m).round().astype(np.int64))


DENSE, DIAGONAL = "dense", "diagonal"


def side_whitening_kind(dim: int, spec: ProjectionSpec) -> str | None:
    """How a ``dim``-wide side is whitened: ``dense`` (eigendecomposition of its moment),
    ``diagonal`` (a sketched side) or None (a wide side of a format-2 index: not whitened)."""
    if dim <= (spec.max_dense_side or MAX_WHITENED_SIDE):
        return DENSE
    return DIAGONAL if spec.sketched(dim) else None


def moment_bytes(layer: LayerInfo, spec: ProjectionSpec) -> int:
    """fp64 accumulators of one layer: dim x dim per dense side, dim per diagonal side."""
    total = 0
    for dim in (layer.in_features, layer.out_features):
        kind = side_whitening_kind(dim, spec)
        total += 8 * (dim * dim if kind == DENSE else dim if kind == DIAGONAL else 0)
    return total


# ------------------------------------------------------------------------------------ capture


class MomentCapture(LayerHooks):
    """Hooks that sum the token-level second moments of each tracked layer's inputs and output grads.

    A position counts as a token when its output gradient is non-zero: padding and masked positions
    have ``δ = 0`` and must not dilute the input moment either. Dense sides sum ``v vᵀ`` (dim x dim),
    diagonal sides ``v²`` (dim).
    """

    def __init__(self, model, layers: Sequence[LayerInfo], spec: ProjectionSpec, device: torch.device):
        super().__init__(model, layers)

        def zeros(dim: int):
            kind = side_whitening_kind(dim, spec)
            shape = (dim, dim) if kind == DENSE else (dim,) if kind == DIAGONAL else None
            return None if shape is None else torch.zeros(shape, dtype=torch.float64, device=device)

        self.A_in = {l.name: zeros(l.in_features) for l in self.layers}
        self.A_out = {l.name: zeros(l.out_features) for l in self.layers}
        # counted on the device: an int() per hook would stop the CUDA stream every layer
        self._token_counts = {l.name: torch.zeros((), dtype=torch.int64, device=device) for l in self.layers}

    @property
    def tokens(self) -> dict[str, int]:
        return {name: int(count) for name, count in self._token_counts.items()}

    def set_tokens(self, name: str, count: int) -> None:
        self._token_counts[name].fill_(int(count))

    def _keep_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def accumulate(self, losses: torch.Tensor) -> None:
        """Add the moments of the forward pass(es) since the last call (gradient of ``losses.sum()``)."""
        try:
            self._backward(losses)
        finally:
            self.reset()

    def _consume(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        A_in, A_out = self.A_in[name], self.A_out[name]
        d = delta.reshape(-1, delta.shape[-1]).to(torch.float32)
        token = d.abs().amax(dim=1) > 0
        # multiplied by the mask, not indexed with it: boolean indexing waits for the device to
        # count the rows; a non-token's δ row is zero already, only its input needs masking
        xs = x.reshape(-1, x.shape[-1]).to(torch.float32) * token[:, None]
        for A, v in ((A_in, xs), (A_out, d)):
            if A is None:
                continue
            v = v.to(A.device)  # a model sharded over devices: the moments live on one
            # fp32 products summed in fp64 (N tokens of positive terms), in place: no fp64 copy
            if A.dim() == 2:
                add_moment(A, v)
            else:
                A += (v * v).sum(0)
        self._token_counts[name] += token.sum().to(self._token_counts[name].device)


# the upper triangle of a moment in blocks of at least this width, at most 8 per side
_MOMENT_BLOCK = 256


def add_moment(A: torch.Tensor, v: torch.Tensor) -> None:
    """``A += vᵀ v`` for a (tokens, dim) fp32 ``v`` into a (dim, dim) fp64 ``A``, bit for bit as
    one product.

    A side of 512 or more dimensions multiplies only the blocks on and above the diagonal and adds
    each off-diagonal one transposed below it: 10 of 16 block products at 4 blocks, 36 of 64 at 8.
    Measured, one thread, 512 tokens: 10.7 -> 8.0 ms at 1,024 dims (an LM head's vocabulary of a
    small model, the pre-pass's largest cost), 247 -> 117 ms at 4,096. Each block is the same
    dot products as the full product's, so no bit changes."""
    dim = v.shape[1]
    if dim < 2 * _MOMENT_BLOCK:
        A += v.T @ v
        return
    width = max(_MOMENT_BLOCK, -(-dim // 8))
    starts = range(0, dim, width)
    for a, i in enumerate(starts):
        left = v[:, i:i + width].T
        for j in starts[a:]:
            block = left @ v[:, j:j + width]
            A[i:i + width, j:j + width] += block
            if j != i:
                A[j:j + width, i:i + width] += block.T


# ------------------------------------------------------------------------------------ the math


@dataclass(frozen=True)
class SideWhitening:
    """One side's ``W = (A + λI)^-1/2`` from the token moment ``A`` (mean over tokens)."""

    eigenvalues: torch.Tensor  # (dim,) fp64, ascending, clamped at 0
    eigenvectors: torch.Tensor  # (dim, dim) fp64
    damping: float

    def __post_init__(self):
        if not self.damping > 0:
            raise ValueError(f"whitening damping must be > 0, got {self.damping}")

    def apply(self, P: torch.Tensor) -> torch.Tensor:
        """``W P`` without forming ``W``: 2·dim²·d flops instead of dim³ + dim²·d."""
        Q = self.eigenvectors
        return Q @ ((self.eigenvalues + self.damping).rsqrt()[:, None] * (Q.T @ P))

    def summary(self) -> dict:
        e = self.eigenvalues
        total = float(e.sum())
        # participation ratio: how many directions carry the moment (1 = one direction, dim = flat)
        effective = total ** 2 / float((e * e).sum()) if total > 0 else 0.0
        return {"dim": int(e.numel()), "whitened": True, "damping": self.damping, "eig_max": float(e[-1]), "eig_mean": float(e.mean()),
                "eig_min": float(e[0]), "effective_rank": effective}


@torch.no_grad()
def side_whitening(moment: torch.Tensor, rho: float, scale: float = 1.0) -> SideWhitening:
    """Eigendecompose a token moment times ``scale`` (its mean: 1/tokens) and choose λ = ρ·mean(eig)
    (floored so W stays finite). Holds at most :func:`eigendecomposition_bytes` beside ``moment``."""
    if moment.dim() != 2 or moment.shape[0] != moment.shape[1]:
        raise ValueError(f"a token moment must be square, got {tuple(moment.shape)}")
    if not bool(torch.isfinite(moment).all()):
        raise ValueError("the token moment has non-finite entries (NaN/inf activations or gradients)")
    moment = moment.to(torch.float64)
    M = moment + moment.T
    M.mul_(scale / 2)
    if M.shape[0] > _FP64_EIGH_MAX_DIM:
        # 3.4x faster at 3072 (2 CPU cores); W then differs from the fp64 one by ~1e-5 relative,
        # far inside what damping (ρ·mean eig) and bf16 storage allow. The fp64 copy goes before
        # the solver runs: at 4,864 wide (Qwen2's MLP) that is 190 MB the peak does not hold.
        M = M.to(torch.float32)
        e, Q = torch.linalg.eigh(M)
        M = None
        e, Q = e.to(torch.float64), Q.to(torch.float64)
    else:
        e, Q = torch.linalg.eigh(M)
    e = e.clamp_min(0)
    lam = rho * float(e.mean())
    # a layer that never saw a token (or all-zero inputs): any λ > 0 gives zero scores there anyway
    return SideWhitening(e, Q, lam if lam > 0 else 1e-12)


def eigendecomposition_bytes(dim: int) -> int:
    """Peak bytes :func:`side_whitening` holds beside its moment for a ``dim``-wide side, per entry:
    past 1,024 wide, the fp32 symmetrized moment, vectors and solver workspace (2·dim², syevd):
    4 + 4 + 8 (its fp64 moment and vectors are held only where these are not, 8 + 4 and 4 + 8);
    at most 1,024 wide, the same in fp64: 8 + 8 + 16."""
    return (16 if dim > _FP64_EIGH_MAX_DIM else 32) * dim * dim


@torch.no_grad()
def diagonal_whitening(diagonal: torch.Tensor, rho: float) -> tuple[torch.Tensor, dict]:
    """``(a + λ)^-1/2`` per coordinate of a (mean) diagonal moment, ``λ = ρ·mean(a)`` (the dense
    rule's λ: the mean eigenvalue is the mean diagonal entry), and the side's summary."""
    if not bool(torch.isfinite(diagonal).all()):
        raise ValueError("the token moment has non-finite entries (NaN/inf activations or gradients)")
    a = diagonal.to(torch.float64).clamp_min(0)
    lam = rho * float(a.mean())
    lam = lam if lam > 0 else 1e-12
    total = float(a.sum())
    effective = total ** 2 / float((a * a).sum()) if total > 0 else 0.0
    return (a + lam).rsqrt(), {"dim": int(a.numel()), "whitened": DIAGONAL, "damping": lam, "eig_max": float(a.max()),
                               "eig_mean": float(a.mean()), "eig_min": float(a.min()), "effective_rank": effective}


@dataclass(frozen=True)
class WhitenedSide:
    """What the index stores for one side of a layer: its whitened projection (a dense side's
    ``P' = W P``, dim x d; a sketched side's diagonal ``w``, its CountSketch being regenerated from
    the seed), the EK-FAC eigenbasis of its projected moment, and a summary."""

    q: torch.Tensor  # (d, d) fp32, eigenvectors of P'ᵀ A P'
    arrays: dict  # field -> numpy array (P_in / w_in, without the eigenbasis)
    summary: dict


@torch.no_grad()
def whiten_side(side: str, A: torch.Tensor | None, tokens: int, P: SideProjection, rho: float,
                whitening: SideWhitening | None = None) -> WhitenedSide:
    """One side's whitened projection from its moment summed over ``tokens`` tokens: a (dim, dim)
    moment whitens a dense side, a (dim,) one a sketched side by its diagonal, None keeps the
    random projection (format 2's wide sides). ``whitening``, when given, is the eigendecomposition
    of this very moment (shared by the layers that read the same input)."""
    scale = 1.0 / max(tokens, 1)
    eye = torch.eye(P.d)
    if A is None:
        return WhitenedSide(eye, {f"P_{side}": P.matrix().cpu().numpy()}, {"dim": P.dim, "whitened": False})
    if A.dim() == 1:
        if not isinstance(P, SketchSide):
            raise ValueError(f"a diagonal moment needs a sketched side, got a {type(P).__name__}")
        w, summary = diagonal_whitening(A * scale, rho)
        return WhitenedSide(eye, {f"w_{side}": w.to(torch.float32).cpu().numpy()}, summary)
    w = whitening or side_whitening(A, rho, scale)
    Pw = w.apply(P.matrix().to(A.device, torch.float64))
    # the EK-FAC eigenbasis lives in the projected space: eigenvectors of Pᵀ W A W P (A the mean moment)
    S = (Pw.T @ A @ Pw) * scale
    _, q = torch.linalg.eigh((S + S.T) / 2)
    return WhitenedSide(q.to(torch.float32).cpu(), {f"P_{side}": Pw.to(torch.float32).cpu().numpy()}, w.summary())


def layer_arrays(inp: WhitenedSide, out: WhitenedSide) -> dict:
    """A layer's stored whitening arrays: both sides' projections and eigenbases."""
    return {**inp.arrays, **out.arrays, "q_in": inp.q.numpy(), "q_out": out.q.numpy()}


def same_moment_sides(sides: Sequence[tuple], moments: dict, tokens: dict) -> list[list]:
    """``sides`` ((layer name, side) pairs) in classes of bitwise-equal dense moments over equal token
    counts, in order of first appearance; every other side is a class of its own.

    Layers that read the same input (an attention block's q/k/v projections, an MLP's gate/up)
    have the same input moment, and its eigendecomposition, the pre-pass's largest fixed cost at
    LLM widths (one 4,096² eigh per side), is then done once per class. A cheap fingerprint finds
    the candidates; ``torch.equal`` decides, so only identical moments are ever shared."""
    classes: list[list] = []
    by_print: dict[tuple, list[int]] = {}
    for key in sides:
        A = moments[key]
        if A is None or A.dim() != 2:
            classes.append([key])
            continue
        fingerprint = (tuple(A.shape), tokens[key[0]], float(A.diagonal().sum()), float(A[::7, ::5].sum()))
        for c in by_print.get(fingerprint, []):
            first = classes[c][0]
            if tokens[first[0]] == tokens[key[0]] and torch.equal(moments[first], A):
                classes[c].append(key)
                break
        else:
            by_print.setdefault(fingerprint, []).append(len(classes))
            classes.append([key])
    return classes


# ------------------------------------------------------------------------------------ pre-pass


def moment_groups(layers: Sequence[LayerInfo], spec: ProjectionSpec, budget: int) -> list[list[LayerInfo]]:
    """Layers in order, grouped so each group's fp64 accumulators fit half the budget."""
    needs = [moment_bytes(layer, spec) for layer in layers]
    for layer, need in zip(layers, needs):
        if need > budget // 2:
            raise MemoryError(f"memory budget {budget / 1e6:.0f} MB is too small to whiten layer {layer.name!r} "
                              f"({layer.in_features}x{layer.out_features}: {need / 1e6:.0f} MB of moments); "
                              f"raise --memory-budget, lower --max-dense-side or use --projection-kind random")
    return [[layers[i] for i in group] for group in budget_groups(needs, budget // 2)]


def ensure_whitening(comm: Comm, placement, source, task, config, progress: bool = True) -> dict[str, LayerProjection]:
    """The index's whitened projections, computing (or resuming) the pre-pass first if the head
    environment lacks some, and stored into the environment this rank writes if it lacks them.

    `placement` (store/placement.py) holds this rank's environment (`own`) and, on rank 0, the head;
    `task` is the whole task (the sample spans every shard); `config` is the BuildConfig
    (whiten_examples, whiten_damping, batch_size, memory budget); `source` the GradientSource whose
    random projections get whitened. Every rank calls it; a failure on one rank is raised on all.
    """
    own, head = placement.own, placement.head if comm.root else None
    meta = comm.on_root(lambda: head.get_state_meta(WHITENING_META) or {})
    todo = [l for l in source.layers if l.name not in whitened_layers(meta)]
    if comm.root:
        say_wide_sides(todo, source.spec)
    if todo:
        meta = _prepass(comm, own, head, source, task, config, todo, meta, progress)
    _copy_to_own(comm, own, head, source.layers, meta)
    return comm.together(lambda: load_projections(own.get_array, source.layers, source.spec, source.device))


def say_wide_sides(layers: Sequence[LayerInfo], spec: ProjectionSpec) -> None:
    """Once: which layers' sides are whitened by their diagonal only (or, format 2, not at all)."""
    for kind, how in ((DIAGONAL, "a CountSketch projection whitened by their diagonal"),
                      (None, "their plain random projection (format-2 index)")):
        wide = [l.name for l in layers
                if kind in (side_whitening_kind(l.in_features, spec), side_whitening_kind(l.out_features, spec))]
        if wide:
            notice(f"whitening: {len(wide)} layer(s) have a side wider than "
                   f"{spec.max_dense_side or MAX_WHITENED_SIDE:,} ({', '.join(wide[:3])}{'...' if len(wide) > 3 else ''}); "
                   f"those sides get {how}")


def _prepass(comm: Comm, own, head, source, task, config, todo: list[LayerInfo], meta: dict, progress: bool) -> dict:
    """The moments of the `todo` layers, one pass over this rank's share of the sample per layer
    group; each group's are summed over the ranks and whitened once. Each step a rank may fail in
    alone (its forward passes, rank 0's eigendecompositions, the stores) is agreed on before the
    next collective, so no rank is left waiting in one."""
    indices = sample_indices(len(task.train_examples()), config.whiten_examples)
    meta = {"examples": int(len(indices)), "rho": config.whiten_damping, "layers": dict(meta.get("layers", {})),
            "partial": meta.get("partial")}
    # the budget is the same on every rank (build.py _rank_budget): so are the groups, and the collectives
    groups = moment_groups(todo, source.spec, config.budget())
    if progress and comm.root:
        passes = f"{len(groups)} passes (layer groups within the memory budget)" if len(groups) > 1 else "one pass"
        ranks = f" on {comm.world} ranks" if comm.world > 1 else ""
        print(f"[lorif-stream] whitening: token moments of {len(todo)} layers over {len(indices):,} training "
              f"examples{ranks}, {passes}", flush=True, file=sys.stderr)
    # rank r takes every world-th sample example; its checkpoints of a group are its own environment's
    share = indices[comm.rank::comm.world]
    partial = comm.together(lambda: (own.get_state_meta(WHITENING_META) or {}).get("partial"))
    for group in groups:
        _whiten_group(comm, own, head, source, task, group, share, len(indices), meta, partial, config, progress)
    return meta


def _whiten_group(comm: Comm, own, head, source, task, group: list[LayerInfo], share: np.ndarray, sampled: int,
                  meta: dict, partial: dict | None, config, progress: bool) -> None:
    capture = MomentCapture(source.model, group, source.spec, source.device)
    start = comm.together(lambda: _resume_partial(own, capture, group, partial))
    bar = GlobalProgress(comm, "whiten", total=sampled - comm.sum_int(start), unit="ex", enabled=progress)
    try:
        comm.together(lambda: _accumulate(own, capture, source, task, group, share, start, meta, config.batch_size, bar))
    except BaseException:
        bar.close()
        raise
    bar.close(synced=True)
    tokens = {}
    for layer in group:
        for A in (capture.A_in[layer.name], capture.A_out[layer.name]):
            if A is not None:
                comm.sum_(A)
        tokens[layer.name] = comm.sum_int(capture.tokens[layer.name])
    # the eigendecompositions run once, on rank 0; every rank gets the arrays
    arrays, whitened = comm.on_root(lambda: _whitened_arrays(group, capture, tokens, source.spec, config.whiten_damping,
                                                             meta))
    meta.update(whitened)
    capture = None  # the moments are whitened: free them before the next group's
    drop = [_partial_name(layer.name, side) for layer in group for side in ("in", "out")]
    # projections, summary and the removal of the checkpoint land in one transaction
    comm.together(lambda: [w.put_state(arrays, {WHITENING_META: meta}, drop=drop) for w in _unique(own, head)])


def _accumulate(own, capture: MomentCapture, source, task, group: list[LayerInfo], share: np.ndarray, start: int,
                meta: dict, batch_size: int, bar) -> None:
    """This rank's share of the sample (from `start`) through the model, its token moments into
    `capture`, checkpointed into its environment every few minutes."""
    examples = task.train_examples()
    last_checkpoint = time.perf_counter()
    with capture:
        for b0 in range(start, len(share), batch_size):
            b1 = min(len(share), b0 + batch_size)
            batch = to_device(task.collate([examples[int(i)] for i in share[b0:b1]]), source.device)
            with torch.enable_grad():
                losses = task.loss(source.model, batch)
                finite = torch.isfinite(losses.detach())
                if not bool(finite.all()):
                    bad = [int(share[b0 + j]) for j in torch.nonzero(~finite).flatten().tolist()]
                    notice(f"whitening: skipped {len(bad)} sample example(s) with a non-finite loss (rows {bad[:5]})")
                    capture.reset()
                    continue
                capture.accumulate(losses)
            bar.update(b1 - b0)
            if time.perf_counter() - last_checkpoint > _CHECKPOINT_SECONDS and b1 < len(share):
                _save_partial(own, capture, group, meta, b1)
                last_checkpoint = time.perf_counter()


def _whitened_arrays(group: list[LayerInfo], capture: MomentCapture, tokens: dict, spec: ProjectionSpec, rho: float,
                     meta: dict) -> tuple[dict, dict]:
    """Rank 0: the whitened projections of `group` from the summed moments, and `meta` recording them.

    Sides are whitened one class of equal moments at a time (:func:`same_moment_sides`), so one
    eigendecomposition is held at a time, as before the sharing."""
    # the group's random projections only: all layers' at once would hold every dense P twice
    base = make_projections(group, spec, "cpu")
    moments = {(l.name, side): (capture.A_in if side == "in" else capture.A_out)[l.name]
               for l in group for side in ("in", "out")}
    projections = {(l.name, "in"): base[l.name].inp for l in group} | {(l.name, "out"): base[l.name].out for l in group}
    done: dict[tuple, WhitenedSide] = {}
    for members in same_moment_sides(list(moments), moments, tokens):
        (name, _), A = members[0], moments[members[0]]
        # the moment scaled exactly as whiten_side scales it: a shared side equals an unshared one bit for bit
        shared = side_whitening(A, rho, 1.0 / max(tokens[name], 1)) if len(members) > 1 else None
        for key in members:
            done[key] = whiten_side(key[1], moments[key], tokens[key[0]], projections[key], rho, shared)
        shared = None  # released before the next class's eigendecomposition, not after it
    arrays = {}
    for layer in group:
        inp, out = done[(layer.name, "in")], done[(layer.name, "out")]
        arrays.update({array_name(layer.name, field): value for field, value in layer_arrays(inp, out).items()})
        meta["layers"][layer.name] = {"tokens": int(tokens[layer.name]), "in": inp.summary, "out": out.summary}
    meta["partial"] = None
    return arrays, meta


def _unique(*writers) -> list:
    """The environments among `writers` (None left out), each once: rank 0's own is the head in a build."""
    out = []
    for w in writers:
        if w is not None and all(w is not o for o in out):
            out.append(w)
    return out


def _copy_to_own(comm: Comm, own, head, layers, meta: dict) -> None:
    """A shard that lacks the index's projections (an append's, or one killed before it stored
    them) gets rank 0's copy from the head shard."""
    names = whitened_layers(meta)
    lacking = comm.together(lambda: whitened_layers(own.get_state_meta(WHITENING_META)) != names)
    if not any(comm.gather(lacking)):
        return
    arrays = comm.on_root(lambda: {name: np.array(array) for l in layers for f in STORED_FIELDS
                                   if (array := head.get_array(name := array_name(l.name, f))) is not None})
    comm.together(lambda: own.put_state(arrays, {WHITENING_META: meta}) if lacking else None)


def _save_partial(writer, capture: MomentCapture, group: list[LayerInfo], meta: dict, done: int) -> None:
    arrays = {}
    for layer in group:
        for side, acc in (("in", capture.A_in), ("out", capture.A_out)):
            if acc[layer.name] is not None:
                arrays[_partial_name(layer.name, side)] = acc[layer.name].cpu().numpy()
    meta["partial"] = {"layers": [l.name for l in group], "examples_done": done,
                       "tokens": {l.name: capture.tokens[l.name] for l in group}}
    writer.put_state(arrays, {WHITENING_META: meta})


def _resume_partial(writer, capture: MomentCapture, group: list[LayerInfo], partial: dict | None) -> int:
    """Load `partial`, the writer's checkpoint, if it is of exactly this group (same sample); else
    start the group from scratch."""
    if not partial or partial.get("layers") != [l.name for l in group]:
        return 0
    for layer in group:
        for side, acc in (("in", capture.A_in), ("out", capture.A_out)):
            if acc[layer.name] is None:
                continue
            arr = writer.get_array(_partial_name(layer.name, side))
            if arr is None:
                return 0
            acc[layer.name].copy_(torch.from_numpy(arr))
        capture.set_tokens(layer.name, partial["tokens"][layer.name])
    notice(f"whitening: resuming at sample example {partial['examples_done']:,}")
    return int(partial["examples_done"])


# ------------------------------------------------------------------------------------ loading


def whitened_layers(meta: dict | None) -> set[str]:
    """The layers a whitening record (an environment's WHITENING_META) covers."""
    return set((meta or {}).get("layers") or {})


def tokens_per_example(meta: dict | None) -> float | None:
    """Tokens (positions carrying gradient) per sampled example, over the widest-seen layer; None
    before any layer is whitened."""
    layers = (meta or {}).get("layers") or {}
    if not layers or not meta.get("examples"):
        return None
    return max(l.get("tokens", 0) for l in layers.values()) / meta["examples"]


STORED_FIELDS = ("P_in", "P_out", "w_in", "w_out", "q_in", "q_out")  # a layer stores P or w per side, and both q


def load_projections(get_array, layers: Sequence[LayerInfo], spec: ProjectionSpec, device) -> dict[str, LayerProjection]:
    """The stored whitened projections (``get_array`` is a writer's or a snapshot's array getter);
    a diagonal side's CountSketch is regenerated from ``spec`` (that side alone: every dense random
    matrix of the model would be drawn and dropped)."""
    out = {}
    for layer in layers:
        sides = []
        for side, dim, d in (("in", layer.in_features, layer.d_in), ("out", layer.out_features, layer.d_out)):
            P, w = get_array(array_name(layer.name, f"P_{side}")), get_array(array_name(layer.name, f"w_{side}"))
            if P is None and w is None:
                raise ValueError(f"the index has no whitened projection for layer {layer.name!r} "
                                 f"(its whitening pre-pass did not finish: rerun the build to resume it)")
            if P is not None:
                if P.shape != (dim, d):
                    raise ValueError(f"the stored whitened projection of layer {layer.name!r} ({side}put side) has "
                                     f"shape {P.shape}; the layer needs ({dim}, {d})")
                sides.append(DenseSide(torch.from_numpy(np.array(P, np.float32))))
                continue
            sketch = side_projection(dim, spec, layer.name, side) if spec.sketched(dim) else None
            if w.shape != (dim,) or not isinstance(sketch, SketchSide) or sketch.d != d:
                raise ValueError(f"the stored diagonal whitening of layer {layer.name!r} ({side}put side) has shape "
                                 f"{w.shape}; the layer needs a sketched side of {dim}")
            sides.append(SketchSide(sketch.weight * torch.from_numpy(np.array(w, np.float32)), sketch.bucket, d))
        out[layer.name] = LayerProjection(*sides).to(device)
    return out


def load_eigenbases(get_array, layer: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_out, q_in): the EK-FAC eigenbases of one layer's projected moments."""
    q_in, q_out = get_array(array_name(layer, "q_in")), get_array(array_name(layer, "q_out"))
    if q_in is None or q_out is None:
        raise ValueError(f"the index has no whitening eigenbasis for layer {layer!r}")
    return (torch.from_numpy(np.array(q_out, np.float32)).to(device),
            torch.from_numpy(np.array(q_in, np.float32)).to(device))
