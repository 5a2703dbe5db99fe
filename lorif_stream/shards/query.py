"""query across the ranks of a torchrun job: each rank streams its shards, rank 0 merges.

Rank 0 computes the preconditioned query gradients H once (it alone loads the model and reads the
head shard's projections and curvature) and broadcasts them; every rank streams the shards it
holds (shard s on rank s % world) with the single-process scorer and keeps its exact top-k; the
global top-k is a gather and a merge on rank 0 (by score, ties by row). With `--scores`, rank 0
creates the (queries x rows) .npy and each rank writes its shards' columns into it. Row numbers
are global, so the results equal a single-process query's. On a single-process index (no shards),
rank 0 runs the plain query and the other ranks wait.
"""
from __future__ import annotations

import time
from pathlib import Path


from ..config import QueryConfig
from ..device import notice, resolve_device
from ..fit import CURVATURE_META, load_preconditioner
from ..query import (
    QueryResult, TopK, _format, _open_source, _preconditioned_queries, _ScoreWriter, _stream_scores, query_in_process,
    write_results,
)
from ..store.shards import ShardedReader, ShardManifest, is_sharded, read_manifest
from .comm import Comm, GlobalProgress


def query_across_ranks(task, path: Path, out, scores, config: QueryConfig, comm: Comm, progress: bool,
                       t0: float) -> QueryResult:
    if not comm.on_root(lambda: is_sharded(path)):
        return _on_root_only(task, path, out, scores, config, comm, progress)
    manifest = ShardManifest.from_dict(comm.on_root(lambda: read_manifest(path).to_dict()))
    mine = [p for p in range(len(manifest.shards)) if comm.owns(p)]
    device = comm.device_for(resolve_device(config.device))
    reader = comm.together(lambda: ShardedReader(path, manifest=manifest, shards=mine))
    writer = None
    try:
        with reader.snapshot() as snap:
            rows = _global_rows(comm, manifest, snap)
            snap.limit(rows)
            context = {}
            plan = comm.on_root(lambda: _plan(task, path, snap, reader.settings, device, config, rows, context))
            if scores is not None:
                # columns go into a temporary beside --scores; rank 0 renames it over --scores on success
                temp = comm.on_root(lambda: _ScoreWriter(scores, plan["Q"], rows, create=True).handoff())
                writer = comm.together(lambda: _ScoreWriter(scores, plan["Q"], rows, create=False, temp=temp))
            results: list[dict] = []
            stats = {"read_seconds": 0.0, "score_seconds": 0.0, "bytes_read": 0, "curvature_rows": plan["covered"],
                     "ranks": comm.world, "rows_on_rank": snap.held_rows}
            try:
                for q0 in range(0, plan["Q"], plan["q_batch"]):
                    q1 = min(plan["Q"], q0 + plan["q_batch"])
                    specs = comm.on_root(lambda: _query_gradients(context, plan, q0, q1, config.batch_size))
                    H = [h.to(device) for h in comm.broadcast_tensors(context.get("H"), specs)]
                    bar = GlobalProgress(comm, "query", total=rows, unit="rows", enabled=progress)
                    try:
                        top = comm.together(lambda: _stream_scores(snap, H, plan["layers"], device, config, writer, q0,
                                                                   stats, progress, bar=_Unclosed(bar))
                                             if snap.held_rows else TopK(q1 - q0, config.top_k, device))
                    except BaseException:
                        bar.close()  # rank 0's bar thread would otherwise outlive the job's store
                        raise
                    bar.close(synced=True)
                    parts = comm.gather(comm.together(lambda: _format(snap, plan["q_ids"][q0:q1], top)))
                    if comm.root:
                        results.extend(merge_top(parts, config.top_k))
            finally:
                if writer is not None:
                    writer.close()
            comm.barrier()  # every rank's columns are in the scores file before rank 0 says it is done
            if comm.root:
                write_results(out, results)
                if writer is not None:
                    writer.publish()
    finally:
        reader.close()
        if writer is not None and comm.root:
            writer.discard()  # a failed query leaves an existing --scores as it was
    return QueryResult(results, rows, time.perf_counter() - t0, None if out is None else str(out),
                       None if scores is None else str(scores), stats)


def _query_gradients(context: dict, plan: dict, q0: int, q1: int, batch_size: int) -> list[tuple]:
    """Rank 0: the preconditioned gradients of queries q0..q1 (kept in `context`); their shapes and dtypes."""
    context["H"] = _preconditioned_queries(context["source"], context["queries"], plan["q_ids"], q0, q1, plan["layers"],
                                           context["curv"], batch_size)
    return [(tuple(h.shape), str(h.dtype).removeprefix("torch.")) for h in context["H"]]


class _Unclosed:
    """The job's bar lent to the single-process scorer, which closes what it is given: the job
    closes this one itself, once every rank is done."""

    def __init__(self, bar: GlobalProgress):
        self.update = bar.update

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _global_rows(comm: Comm, manifest: ShardManifest, snap) -> int:
    """The rows readable as one run from row 0 (as a single process would read them), from every
    rank's committed rows of its own shards."""
    committed = {}
    for part in comm.gather({i: n for i, _, n in snap.ranges}):
        committed.update(part)
    rows = 0
    for i, entry in enumerate(manifest.shards):
        rows = entry.start + committed.get(i, 0)
        if committed.get(i, 0) < entry.count:
            break
    return rows


def _plan(task, path: Path, snap, settings: dict, device, config: QueryConfig, rows: int, context: dict) -> dict:
    """Rank 0: the model, projections, preconditioners and query batching (as query.query decides them)."""
    source = _open_source(task, settings, snap, device, path)
    queries = task.query_examples()
    if len(queries) == 0:
        raise ValueError("the task has no query examples (query_examples() is empty)")
    if rows == 0:
        raise ValueError(f"index {path} holds no rows yet")
    if config.top_k > rows:
        raise ValueError(f"--top-k {config.top_k} is larger than the index's {rows} rows")
    layers = source.select(config.layers)
    curv = {i: load_preconditioner(snap, i, device) for i in layers}
    covered = (snap.state_meta(CURVATURE_META) or {}).get("rows")
    if covered != rows:
        notice(f"the curvature covers {covered} of the index's {rows} rows (an append in progress, or run `fit`)")
    q_ids = [str(task.example_id(ex, i)) for i, ex in enumerate(queries)]
    per_query = sum(source.layers[i].D for i in layers) * 4 * 3
    q_batch = int(max(1, min(len(queries), config.budget() // 4 // max(per_query, 1))))
    if q_batch < len(queries):
        notice(f"{len(queries)} queries are scored in batches of {q_batch} (one index pass each) to fit the memory budget")
    context.update(source=source, queries=queries, curv=curv)
    return {"Q": len(queries), "q_ids": q_ids, "q_batch": q_batch, "layers": layers, "covered": covered}


def merge_top(parts: list[list[dict]], k: int) -> list[dict]:
    """Each query's k best proponents and opponents over every rank's own top-k (ties: lower row first)."""
    merged = []
    for per_rank in zip(*parts):
        pro = sorted((p for r in per_rank for p in r["proponents"]), key=lambda p: (-p["score"], p["row"]))[:k]
        opp = sorted((p for r in per_rank for p in r["opponents"]), key=lambda p: (p["score"], p["row"]))[:k]
        merged.append({"id": per_rank[0]["id"], "proponents": pro, "opponents": opp})
    return merged


def _on_root_only(task, path: Path, out, scores, config: QueryConfig, comm: Comm, progress: bool) -> QueryResult:
    """A single-process index has one environment: rank 0 queries it, the others wait for it."""
    def run():
        notice(f"index {path} is a single-process index (no shards): rank 0 queries it alone")
        return query_in_process(task, path, out, scores, config, progress, time.perf_counter())

    return comm.on_root(run)
