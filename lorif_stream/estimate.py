"""What a build will cost before it starts: disk, host RAM and device memory, array by array.

A build is refused here, before the index exists, when the disk, the memory budget or the GPU
cannot hold it, with the options that shrink it named; `lorif-stream build` prints the estimate
first. The counts are the engine's own arrays, beside the model and its forward/backward:

* projections: dense sides ``dim x d`` fp32, sketched sides two ``dim`` vectors (``projection.py``);
  a whitening pre-pass also holds the random projections of the layer group it whitens;
* the pre-pass: fp64 token moments of one layer group (``dim²`` per dense side, ``dim`` per
  diagonal side; groups are cut to half the budget) and the largest eigendecomposition;
* the curvature state: EK-FAC eigenbases and ``D``-sized sums, or low-rank sketches (``D x k``);
* one batch: the per-example ``(B, d_out, d_in)`` gradient sums of every layer and their
  factorisation, and the widest layer's projected (or sketched) token tensors;
* the blocks in flight between the producer and the store's encoder and committer.

``benchmarks/bench_llm_shapes.py`` measures these against peak RSS on wide model shapes.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from .config import BuildConfig
from .device import notice
from .fit import check_finalize_budget, sketch_memory_bytes
from .projection import ProjectionSpec
from .whitening import DENSE, eigendecomposition_bytes, moment_bytes, moment_groups, side_whitening_kind

_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_COMPRESSED_FRACTION = {"bf16": 0.72, "fp16": 0.95, "fp32": 0.95}  # measured by benchmarks/bench_store.py
_BLOCKS_IN_FLIGHT = 4  # being assembled, queued, encoding, in the encoder's scratch
_FIXED_DISK = 1 << 20  # LMDB's meta pages, ids, settings, free pages: 0.65-0.8 MB measured on small indexes
# per-example gradient sums live twice in a batch: the sums and the factorisation's scratch (QR,
# power iterations, the storage-dtype copy)
_BATCH_COPIES = 3


class InsufficientDiskError(OSError):
    """The index would not fit on its disk (names both sizes)."""


class InsufficientMemoryError(MemoryError):
    """The build would not fit its memory budget or the GPU (names the options that shrink it)."""


@dataclass(frozen=True)
class BuildEstimate:
    """Bytes a build needs: on disk, in host RAM and on the compute device, with their parts."""

    rows: int
    disk: int  # the finished index
    disk_peak: int  # while it is written: copy-on-write copies of rewritten state, the pre-pass checkpoint
    ram: int
    device: int
    disk_parts: dict
    ram_parts: dict

    def describe(self) -> str:
        parts = ", ".join(f"{name} {size / 1e6:,.0f}" for name, size in self.ram_parts.items() if size >= 5e5)
        return (f"index ~{self.disk / 1e6:,.0f} MB on disk (factors {self.disk_parts['factors'] / 1e6:,.0f}, state "
                f"{self.disk_parts['state'] / 1e6:,.0f}), engine RAM ~{self.ram / 1e6:,.0f} MB ({parts} MB)")


def side_state_bytes(dim: int, d: int, spec: ProjectionSpec) -> int:
    """Bytes of one side's projection: a CountSketch's weight and bucket, a dense matrix, or none."""
    if spec.sketched(dim):
        return 4 * dim + (8 * dim if d < dim else 0)
    return 4 * dim * d


def projection_bytes(layers, spec: ProjectionSpec, whitened: bool) -> int:
    """The projections of every layer on the device (an unshrunk random side is no matrix)."""
    total = 0
    for l in layers:
        for dim, d in ((l.in_features, l.d_in), (l.out_features, l.d_out)):
            if whitened or d < dim or spec.sketched(dim):
                total += side_state_bytes(dim, d, spec)
    return total


def stored_state_bytes(layers, spec: ProjectionSpec, config: BuildConfig) -> int:
    """Bytes of curvature/whitening state a finished index stores besides its factors."""
    curvature = config.curvature
    total = 0
    for l in layers:
        if config.projection_kind == "whitened":
            # P' (or a diagonal: a sketch's buckets are regenerated, not stored) and the eigenbases
            total += projection_bytes([l], spec, True) - sum(8 * dim for dim, d in (
                (l.in_features, l.d_in), (l.out_features, l.d_out)) if spec.sketched(dim) and d < dim)
            total += 4 * (l.d_in ** 2 + l.d_out ** 2)
        if curvature.preconditioner == "lowrank":
            # a sketch as wide as the layer is the exact fp64 Gram (sketch.py), else D x k fp32
            sketch = 8 * l.D * l.D if curvature.sketch_width >= l.D else 4 * l.D * curvature.sketch_width
            total += sketch + 4 * l.D * min(curvature.sketch_rank, l.D)
        elif curvature.preconditioner in ("ekfac", "auto"):  # auto: ekfac until the pre-pass decides
            total += 12 * l.D  # fp64 running sums + one fp32 generation
    return total


def checkpoint_bytes(layers, spec: ProjectionSpec, budget: int) -> int:
    """The pre-pass's checkpoint in the index: the fp64 moments of its largest layer group."""
    return max((sum(moment_bytes(l, spec) for l in g) for g in moment_groups(layers, spec, budget)), default=0)


def _prepass_bytes(layers, spec: ProjectionSpec, budget: int) -> tuple[int, int]:
    """The whitening pre-pass: one layer group's moments and random projections, held from its
    first batch to its last eigendecomposition; and the largest eigendecomposition of a dense side
    (:func:`whitening.eigendecomposition_bytes`), which runs after the group's last batch, when the
    model's activations are freed."""
    groups = moment_groups(layers, spec, budget)
    group = max((sum(moment_bytes(l, spec) + projection_bytes([l], spec, False) for l in g) for g in groups), default=0)
    solver = max((eigendecomposition_bytes(dim) for l in layers for dim in (l.in_features, l.out_features)
                  if side_whitening_kind(dim, spec) == DENSE), default=0)
    return group, solver


def _batch_bytes(layers, spec: ProjectionSpec, batch_size: int, tokens: int) -> int:
    """One batch: every layer's (B, d_out, d_in) sums and their factorisation, and the widest layer's
    token tensors (projected Δ and X, and a sketched side's weighted copy of its input)."""
    sums = 4 * batch_size * sum(l.D for l in layers) * _BATCH_COPIES
    widest = 0
    for l in layers:
        per_token = l.d_in + l.d_out + sum(dim for dim in (l.in_features, l.out_features) if spec.sketched(dim))
        widest = max(widest, per_token)
    return sums + 4 * batch_size * tokens * widest


def _curvature_bytes(layers, config: BuildConfig, budget: int) -> int:
    curvature = config.curvature
    if curvature.preconditioner == "lowrank":
        # layers whose sketches do not fit half the budget are sketched after the build (fit.py)
        return min(sum(sketch_memory_bytes(l.D, curvature.sketch_width) for l in layers), budget // 2)
    if curvature.preconditioner in ("ekfac", "auto"):
        return sum(12 * l.D + 4 * (l.d_in ** 2 + l.d_out ** 2) for l in layers)
    return 0


def estimate_build(layers, spec: ProjectionSpec, config: BuildConfig, layout, n_rows: int,
                   tokens_per_example: int = 1, whitened: frozenset[str] | set[str] = frozenset()) -> BuildEstimate:
    """What a build (or append) of ``n_rows`` rows of ``layers`` costs; ``tokens_per_example`` bounds
    the positions per example (:func:`tokens_bound`); layers in ``whitened`` need no pre-pass."""
    budget = config.budget()
    values = layout.values_per_example()
    factors = int(n_rows * values * _BYTES[layout.dtype] * _COMPRESSED_FRACTION[layout.dtype] * 1.1)
    state = stored_state_bytes(layers, spec, config)
    checkpoint = checkpoint_bytes([l for l in layers if l.name not in whitened], spec, budget) \
        if config.projection_kind == "whitened" else 0
    disk_parts = {"factors": factors, "state": state, "fixed": _FIXED_DISK}
    # LMDB's copy-on-write needs room for the old and the new copy of rewritten state
    disk_peak = factors + 2 * (state + checkpoint) + _FIXED_DISK
    moments, solver = _prepass_bytes([l for l in layers if l.name not in whitened], spec, budget) \
        if config.projection_kind == "whitened" else (0, 0)
    ram_parts = {
        "projections": projection_bytes(layers, spec, config.projection_kind == "whitened"),
        "moments": moments,
        "eigendecomposition": solver,
        "curvature": _curvature_bytes(layers, config, budget),
        "batch": _batch_bytes(layers, spec, config.batch_size, tokens_per_example),
        "blocks": _BLOCKS_IN_FLIGHT * min(layout.block_size, max(n_rows, 1)) * values * 4,
    }
    # the pre-pass ends before the first row: its peak and the row pass's do not add up
    rows_pass = ram_parts["curvature"] + ram_parts["batch"] + ram_parts["blocks"]
    ram = ram_parts["projections"] + max(moments + solver, rows_pass)
    device = ram - ram_parts["blocks"]
    return BuildEstimate(n_rows, sum(disk_parts.values()), disk_peak, ram, device, disk_parts, ram_parts)


def tokens_bound(task, examples, batch_size: int) -> int:
    """Positions per example, read off one collated batch: the longest integer tensor (token ids)
    per example, 1 for feature vectors. Collating touches no model."""
    import torch

    batch = task.collate([examples[i] for i in range(min(batch_size, len(examples)))])
    longest = 1

    def walk(value):
        nonlocal longest
        if isinstance(value, torch.Tensor):
            if value.dim() >= 2 and not value.is_floating_point() and value.dtype != torch.bool:
                longest = max(longest, value[0].numel())
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(batch)
    return longest


def check_budget(layers, spec: ProjectionSpec, config: BuildConfig,
                 whitened: frozenset[str] | set[str] = frozenset()) -> None:
    """Refuse a memory budget that the whitening pre-pass or the final curvature step cannot work in
    (naming the layer)."""
    budget = config.budget()
    if config.projection_kind == "whitened":
        moment_groups([l for l in layers if l.name not in whitened], spec, budget)
    if config.curvature.preconditioner == "lowrank":
        check_finalize_budget(layers, config.curvature, budget)


_SHRINK = "lower --max-side, --max-dense-side or --batch-size, track fewer layers (--modules)"


def check_fits(estimate: BuildEstimate, path: Path, config: BuildConfig, device) -> None:
    """Refuse, in one line, a build that its disk, the available RAM or its GPU cannot hold; say
    once when it needs more than the memory budget (which bounds what can be split: whitening
    groups, sketches, query batches; not the projections or one batch)."""
    here = path if path.exists() else path.parent if path.parent.exists() else Path.cwd()
    free = shutil.disk_usage(here).free
    if estimate.disk_peak > free:
        raise InsufficientDiskError(
            f"the index needs about {estimate.disk_peak / 1e9:.2f} GB for {estimate.rows:,} examples but {path} has "
            f"{free / 1e9:.2f} GB free: free some space, use another --index, or {_SHRINK.split(',')[0]}")
    available = psutil.virtual_memory().available
    if estimate.ram > available:
        raise InsufficientMemoryError(
            f"the build needs ~{estimate.ram / 1e9:.2f} GB of engine RAM beside the model but {available / 1e9:.2f} GB "
            f"are available ({estimate.describe()}): {_SHRINK}")
    budget = config.budget()
    if estimate.ram > budget:
        notice(f"the build needs ~{estimate.ram / 1e6:,.0f} MB of engine RAM, more than the memory budget of "
               f"{budget / 1e6:,.0f} MB ({estimate.describe()}): it goes ahead; to stay within it, {_SHRINK}")
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        free_gpu, _ = torch.cuda.mem_get_info(device)
        if estimate.device > free_gpu:
            raise InsufficientMemoryError(
                f"the build needs ~{estimate.device / 1e9:.2f} GB on {device} beside the model but it has "
                f"{free_gpu / 1e9:.2f} GB free: {_SHRINK}")


def announce(estimate: BuildEstimate, layout, n_layers: int, config: BuildConfig) -> None:
    """The upfront estimate a user wants before a long run: disk, RAM and the budget it honours."""
    print(f"[lorif-stream] {estimate.rows:,} examples x {n_layers} layers, f={config.f} c={layout.c} {layout.dtype}, "
          f"{config.projection_kind} projections, {config.curvature.preconditioner} preconditioner: "
          f"{estimate.describe()}; budget {config.budget() / 1e6:,.0f} MB, "
          f"{layout.values_per_example() * _BYTES[layout.dtype]:,} B per example before compression, "
          f"blocks of {layout.block_size:,} rows", file=sys.stderr, flush=True)
