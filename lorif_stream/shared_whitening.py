"""The whitening pre-pass of a torchrun build: token moments summed across ranks, whitened once.

Each rank runs its share of the (global, evenly spaced) whitening sample through the model; the
fp64 moments and token counts of each layer group are all-reduced, rank 0 eigendecomposes (the
single-process whiten_layer) and broadcasts the whitened projections, and every shard stores them,
so that each shard is a complete index whose rows were projected with the index's P'.

Unlike the single-process pre-pass this one keeps no mid-group checkpoint: a killed job redoes the
unfinished layer group (its share of at most `whiten_examples` examples per rank); finished groups
are stored and never redone.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from .device import notice, to_device
from .projection import LayerProjection, make_projections
from .whitening import (
    STORED_FIELDS, WHITENING_META, MomentCapture, array_name, load_projections, moment_groups, sample_indices,
    say_wide_sides, whiten_layer,
)
from .comm import Comm, GlobalProgress


def ensure_whitening_sharded(comm: Comm, writers: list, head, source, task, config,
                             progress: bool = True) -> dict[str, LayerProjection]:
    """The index's whitened projections, computed across the ranks if the head shard lacks some, and
    stored into every shard in `writers` that lacks them. `head` is rank 0's writer of shard 0
    (None on the other ranks); `task` is the whole task (the sample spans all shards). Every rank
    calls it; a failure on one rank is raised on all."""
    meta = comm.on_root(lambda: head.get_state_meta(WHITENING_META) or {})
    todo = [l for l in source.layers if l.name not in set(meta.get("layers", {}))]
    if todo:
        meta = _prepass(comm, writers, head, source, task, config, todo, meta, progress)
    _copy_to_shards(comm, writers, head, source.layers, meta)
    return comm.together(lambda: load_projections(writers[0].get_array, source.layers, source.spec, source.device))


def _prepass(comm: Comm, writers: list, head, source, task, config, todo, meta: dict, progress: bool) -> dict:
    """Each step a rank may fail in alone (its forward passes, rank 0's eigendecompositions, the
    stores) is agreed on before the next collective, so no rank is left waiting in one."""
    if comm.root:
        say_wide_sides(todo, source.spec)
    examples = task.train_examples()
    indices = sample_indices(len(examples), config.whiten_examples)
    mine = indices[comm.rank::comm.world]
    meta = {"examples": int(len(indices)), "rho": config.whiten_damping, "layers": dict(meta.get("layers", {})),
            "partial": None}
    # the budget is the same on every rank (build.py _rank_budget): so are the groups, and the collectives
    groups = moment_groups(todo, source.spec, config.budget())
    if progress and comm.root:
        passes = f"{len(groups)} passes (layer groups within the memory budget)" if len(groups) > 1 else "one pass"
        print(f"[lorif-stream] whitening: token moments of {len(todo)} layers over {len(indices):,} training "
              f"examples on {comm.world} ranks, {passes}", flush=True, file=sys.stderr)
    for group in groups:
        capture = MomentCapture(source.model, group, source.spec, source.device)
        bar = GlobalProgress(comm, "whiten", total=len(indices), unit="ex", enabled=progress)
        try:
            comm.together(lambda: _accumulate(capture, source, task, examples, mine, config.batch_size, bar))
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
        arrays, meta = comm.on_root(lambda: _whiten_group(group, capture, tokens, make_projections(group, source.spec, "cpu"),
                                                          config.whiten_damping, meta))
        del capture
        comm.together(lambda: _store(writers, head, arrays, meta))
    return meta


def _accumulate(capture: MomentCapture, source, task, examples, rows, batch_size: int, bar) -> None:
    """This rank's share of the sample through the model, its token moments into `capture`."""
    with capture:
        for b0 in range(0, len(rows), batch_size):
            batch_rows = rows[b0:b0 + batch_size]
            batch = to_device(task.collate([examples[int(i)] for i in batch_rows]), source.device)
            with torch.enable_grad():
                losses = task.loss(source.model, batch)
                finite = torch.isfinite(losses.detach())
                if not bool(finite.all()):
                    bad = [int(batch_rows[j]) for j in torch.nonzero(~finite).flatten().tolist()]
                    notice(f"whitening: skipped {len(bad)} sample example(s) with a non-finite loss (rows {bad[:5]})")
                    capture.reset()
                    continue
                capture.accumulate(losses)
            bar.update(len(batch_rows))


def _whiten_group(group, capture: MomentCapture, tokens: dict, base, rho: float, meta: dict) -> tuple[dict, dict]:
    """Rank 0: the whitened projections of `group` from the summed moments, and the meta that records them."""
    arrays = {}
    for layer in group:
        w = whiten_layer(capture.A_in[layer.name], capture.A_out[layer.name], tokens[layer.name], base[layer.name], rho)
        arrays.update({array_name(layer.name, field): value for field, value in w.arrays.items()})
        meta["layers"][layer.name] = w.summary
    return arrays, meta


def _store(writers: list, head, arrays: dict, meta: dict) -> None:
    for writer in writers:  # rank 0's writers include the head shard during a build
        writer.put_state(arrays, {WHITENING_META: meta})
    if head is not None and head not in writers:
        head.put_state(arrays, {WHITENING_META: meta})


def _copy_to_shards(comm: Comm, writers: list, head, layers, meta: dict) -> None:
    """Shards that lack the index's projections (those of an append, or one killed before it stored
    them) get rank 0's copy from the head shard."""
    names = set(meta.get("layers", {}))
    lacking = comm.together(lambda: [w for w in writers if _whitened(w) != names])
    if not any(comm.gather(bool(lacking))):
        return
    arrays = comm.on_root(lambda: {name: np.array(array) for l in layers for f in STORED_FIELDS
                                   if (array := head.get_array(name := array_name(l.name, f))) is not None})
    comm.together(lambda: [w.put_state(arrays, {WHITENING_META: meta}) for w in lacking])


def _whitened(writer) -> set[str]:
    return set((writer.get_state_meta(WHITENING_META) or {}).get("layers", {}))
