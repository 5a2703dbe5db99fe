"""The curvature of a sharded index: additive statistics per shard, summed, finalized once.

Every shard keeps its own running statistic over its own rows (the EK-FAC sums Λ or the lowrank
sketches Y = AΩ with their traces and row counts), saved in the shard and caught up from its
blocks exactly like a single index's (lorif_stream/fit.py), so a killed rank resumes from its own
shard. To finalize, a rank adds up the statistics of the shards it holds, the ranks all-reduce
them, and rank 0 alone turns the totals into a curvature generation (Nyström eigenpairs or Λ and
damping) stored in the head shard, where queries read it.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from ..config import CurvatureConfig, budget_groups
from ..fit import (
    CURVATURE_META, EkfacSet, SketchSet, _finalize_layer, _stale_generation, sketch_memory_bytes, sketch_seed,
    store_ekfac_curvature, store_no_curvature,
)
from ..sketch import LayerSketch
from .comm import Comm


class ShardedRefineError(ValueError):
    pass


def check_sharded_curvature(config: CurvatureConfig) -> None:
    """Refinement streams every row through one subspace per pass: not across shards (yet)."""
    if config.preconditioner == "lowrank" and config.refine:
        raise ShardedRefineError(f"refine={config.refine} is not supported on a sharded index (the refinement passes "
                                 f"would stream every shard through one process): use refine=0")


def reduce_curvature(comm: Comm, head, writers: list, layout, config: CurvatureConfig, device: torch.device,
                     budget: int, progress: bool = True, fresh: bool = False) -> dict:
    """Finalize the curvature of a sharded index from the statistics of the shards in `writers` (this
    rank's) and those of the other ranks; `head` is rank 0's writer of shard 0 (None elsewhere).
    `fresh` recomputes the EK-FAC sums from row 0 (fit never trusts stored ones). Returns the summary.
    Every rank calls it: what one rank does alone (its shards' statistics, rank 0's finalization) is
    agreed on before the next collective, so a failure there is raised on every rank."""
    check_sharded_curvature(config)
    rows = comm.sum_int(comm.together(lambda: sum(w.rows for w in writers)))
    if config.preconditioner == "none":
        return comm.on_root(lambda: store_no_curvature(head, rows, config))
    if config.preconditioner == "ekfac":
        return _reduce_ekfac(comm, head, writers, layout, config, device, rows, progress, fresh)
    return _reduce_lowrank(comm, head, writers, layout, config, device, budget, rows, progress)


def _reduce_ekfac(comm: Comm, head, writers, layout, config, device, rows: int, progress: bool, fresh: bool):
    totals = comm.together(lambda: _own_ekfac_sums(writers, device, progress, fresh))
    out = {}
    for i, layer in enumerate(layout.layers):
        sums, covered = totals.get(i) or [torch.zeros(layer.d_out, layer.d_in, dtype=torch.float64, device=device), 0]
        out[i] = (comm.sum_(sums), comm.sum_int(covered))
    return comm.on_root(lambda: store_ekfac_curvature(head, out, rows, config))


def _own_ekfac_sums(writers, device, progress: bool, fresh: bool) -> dict[int, list]:
    """The EK-FAC sums and row counts of this rank's shards, each caught up and saved first."""
    totals: dict[int, list] = {}
    for w in writers:
        stats = EkfacSet(w, device, resume=not fresh)
        stats.catch_up(w, progress)
        stats.save(w)
        for i, s in stats.stats.items():
            if i in totals:
                totals[i][0] += s.sums
                totals[i][1] += s.rows
            else:
                totals[i] = [s.sums.clone(), s.rows]
    return totals


def _reduce_lowrank(comm: Comm, head, writers, layout, config, device, budget: int, rows: int, progress: bool):
    old = comm.on_root(lambda: head.get_state_meta(CURVATURE_META) or {})
    generation = int(old.get("generation", 0)) + 1
    # a rank adds each shard's sketch into a running total: room for two of each layer. Every rank
    # must cut the same groups (each is agreed on): the smallest share is everyone's
    share = min(comm.gather(budget // 2 // (2 if len(writers) > 1 else 1)))
    layers: dict[str, dict] = {}
    for group in budget_groups([sketch_memory_bytes(l.D, config.sketch_width) for l in layout.layers], share):
        totals = comm.together(lambda: _own_sketches(writers, group, config, device, progress))
        for i in group:
            layer = layout.layers[i]
            sketch = totals.pop(i, None) or LayerSketch(D=layer.D, k=config.sketch_width,
                                                         seed=sketch_seed(config.sketch_seed, layer.name), device=device)
            comm.sum_(sketch.Y)
            sketch.trace = comm.sum_float(sketch.trace)
            sketch.rows = comm.sum_int(sketch.rows)
            # the eigendecomposition runs once
            layers[layer.name] = comm.on_root(lambda: _finalize_layer(head, sketch, i, config, device, generation))
    summary = {"generation": generation, "config": asdict(config), "rows": rows, "layers": layers}
    comm.on_root(lambda: head.put_state({}, {CURVATURE_META: summary}, drop=_stale_generation(old)))
    return summary


def _own_sketches(writers, group: list[int], config, device, progress: bool) -> dict[int, LayerSketch]:
    """The sketches of the layers of `group` summed over this rank's shards, each caught up and saved first."""
    totals: dict[int, LayerSketch] = {}
    for w in writers:
        sketches = SketchSet(w, config, device)
        sketches.sketches = {i: sketches._load_or_new(w, i) for i in group}
        sketches.catch_up(w, progress)
        sketches.save(w)
        for i in group:
            totals[i] = totals[i].merge(sketches.sketches[i]) if i in totals else sketches.sketches[i]
    return totals
