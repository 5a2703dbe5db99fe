"""query: score every indexed training example for each query, streaming the index once per
query batch with RAM bounded whatever N is.

    s(q, i) = Σ_l <H_l(q), L_l(i) R_l(i)^T>,   H_l(q) = the layer's preconditioner applied to g_l(q)

Each query is preconditioned once (EK-FAC in the whitened space, the paper's Woodbury low-rank
curvature at cost D·r, or none: fit.py); each training example then costs one GEMM per block
and layer. A loader thread decodes the next blocks into a ring of reusable
buffers (pinned, with host->device copies on a side stream, on CUDA) while the scorer works on
the current one; exact streaming top-k keeps the best and worst k per query.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .capture import LayerInfo
from .comm import LOCAL, Comm, GlobalProgress, current
from .config import QueryConfig
from .config import factor_key_of_index
from .device import notice, resolve_device
from .fit import CURVATURE_META, load_preconditioner
from .gpu import DeviceTimer, exact
from .gradients import GradientSource, NonFiniteGradientError, describe_nonfinite
from .loader import BlockLoader
from .progress import Progress
from .rerank import rerank_results
from .projection import ProjectionSpec
from .store import Snapshot
from .store.shards import ShardedReader, ShardManifest, is_sharded, open_index, read_manifest
from .atomic import discard, publish, temp_beside, write_text
from .whitening import load_projections


class ModelMismatchError(ValueError):
    pass


@dataclass
class QueryResult:
    results: list[dict]
    rows: int
    seconds: float
    out: str | None = None
    scores: str | None = None
    stats: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ scoring


# Rebuilding g_i = L R^T is memory-bound: on a 2-core CPU it costs about as much as scoring 48
# queries against it (measured with GPT-2-small shapes, c in {1, 4, 16}, Q in {1..64}).
_RECONSTRUCT_COST_IN_QUERIES = 48


def factored_cost(Q: int, c: int, D: int) -> float:
    return Q * c * D


def dense_cost(Q: int, c: int, D: int) -> float:
    return (_RECONSTRUCT_COST_IN_QUERIES + Q) * D


@torch.no_grad()
@exact
def score_layer(H: torch.Tensor, L: torch.Tensor, R: torch.Tensor, method: str = "auto",
                max_elements: int = 1 << 24) -> torch.Tensor:
    """Scores (Q, n) = <H_q, L_i R_i^T> for H (Q, d_out, d_in), L (n, d_out, c), R (n, d_in, c).

    factored: one GEMM against the factors, c·D per example per query; dense: rebuild g_i = L R^T
    (c·D per example) then one (Q, D) x (D, n) GEMM, cheaper when c > 1 and there are several queries.
    Intermediates are chunked over examples to stay under `max_elements` values.
    """
    Q, d_out, d_in = H.shape
    n, _, c = L.shape
    if method == "auto":
        method = "dense" if dense_cost(Q, c, d_out * d_in) < factored_cost(Q, c, d_out * d_in) else "factored"
    out = torch.empty(Q, n, dtype=torch.float32, device=H.device)
    per_example = Q * c * min(d_out, d_in) if method == "factored" else d_out * d_in
    step = max(1, max_elements // max(per_example, 1))
    for s in range(0, n, step):
        e = min(n, s + step)
        out[:, s:e] = _score_chunk(H, L[s:e], R[s:e], method)
    return out


def _score_chunk(H: torch.Tensor, L: torch.Tensor, R: torch.Tensor, method: str) -> torch.Tensor:
    Q, d_out, d_in = H.shape
    n, _, c = L.shape
    if method == "dense":
        G = torch.bmm(L, R.transpose(1, 2)).reshape(n, d_out * d_in)
        return H.reshape(Q, -1) @ G.T
    if d_out <= d_in:
        # contract d_in first: (Q·d_out, d_in) @ (d_in, n·c) -> (Q, d_out, n, c), then against L
        M = (H.reshape(Q * d_out, d_in) @ R.permute(1, 0, 2).reshape(d_in, n * c)).view(Q, d_out, n, c)
        return torch.einsum("qanc,anc->qn", M, L.permute(1, 0, 2))
    M = (H.transpose(1, 2).reshape(Q * d_in, d_out) @ L.permute(1, 0, 2).reshape(d_out, n * c)).view(Q, d_in, n, c)
    return torch.einsum("qbnc,bnc->qn", M, R.permute(1, 0, 2))


class TopK:
    """Exact streaming top-k (largest = proponents) and bottom-k (smallest = opponents) per query.

    Equal scores are ranked by row, lower first, on every device: torch.topk orders ties one way
    on the CPU and another on CUDA, and equal scores are common (the zero rows --skip-nonfinite
    stores, duplicated examples)."""

    def __init__(self, Q: int, k: int, device: torch.device):
        self.k = k
        self.top = torch.full((Q, 0), -float("inf"), device=device)
        self.top_rows = torch.zeros((Q, 0), dtype=torch.long, device=device)
        self.bottom = torch.full((Q, 0), float("inf"), device=device)
        self.bottom_rows = torch.zeros((Q, 0), dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, first_row: int) -> None:
        rows = torch.arange(first_row, first_row + scores.shape[1], device=scores.device).expand_as(scores)
        self.top, self.top_rows = self._merge(self.top, self.top_rows, scores, rows, largest=True)
        self.bottom, self.bottom_rows = self._merge(self.bottom, self.bottom_rows, scores, rows, largest=False)

    def _merge(self, vals, rows, new_vals, new_rows, largest):
        v = torch.cat([vals, new_vals], dim=1)
        r = torch.cat([rows, new_rows], dim=1)
        k = min(self.k, v.shape[1])
        return _ranked_by_row(v, r, k, largest)


# rank keys of _ranked_by_row: above every tie, and the base a tie's row is subtracted from
_STRICT, _TIE = 1 << 62, 1 << 61


def _ranked_by_row(v: torch.Tensor, r: torch.Tensor, k: int, largest: bool):
    """The k best of each row of v (scores) with their r (rows), ties at the cut and within the k
    broken by row, lower first; sorted best first. No host sync: all device-side."""
    kth = torch.topk(v, k, dim=1, largest=largest, sorted=True).values[:, k - 1:k]
    strict = v > kth if largest else v < kth
    # everything strictly better than the k-th score is in; the remaining places go to the scores
    # equal to it, lowest rows first
    key = torch.where(strict, torch.full_like(r, _STRICT), torch.where(v == kth, _TIE - r, torch.full_like(r, -1)))
    pick = torch.topk(key, k, dim=1).indices
    sv, sr = torch.gather(v, 1, pick), torch.gather(r, 1, pick)
    # best first, equal scores by row: a stable sort by score of the picks sorted by row
    by_row = torch.argsort(sr, dim=1, stable=True)
    sv, sr = torch.gather(sv, 1, by_row), torch.gather(sr, 1, by_row)
    order = torch.argsort(sv, dim=1, descending=largest, stable=True)
    return torch.gather(sv, 1, order), torch.gather(sr, 1, order)


# ------------------------------------------------------------------------------------ public


def query(task, index, out: str | os.PathLike | None = None, scores: str | os.PathLike | None = None,
          config: QueryConfig | None = None, *, progress: bool = True, **options) -> QueryResult:
    """Attribute each of the task's query examples to the index's training rows.

    Writes `out` (results.jsonl: per query its id, proponents and opponents as {id, row, score})
    and, when asked, `scores` (.npy float32, queries x rows, streamed to disk block by block).
    Options are the fields of QueryConfig (top_k, batch_size, device, memory_budget, layers, ...).
    """
    if config is not None and options:
        raise TypeError("pass either a QueryConfig or keyword options, not both")
    config = config or QueryConfig(**options)
    t0 = time.perf_counter()
    from .task import load_task, resolve_task

    task = resolve_task(load_task(task) if isinstance(task, str) else task)
    return _query(task, Path(index), out, scores, config, current(), progress, t0)


def _query(task, path: Path, out, scores, config: QueryConfig, comm: Comm, progress: bool, t0: float) -> QueryResult:
    """The query in a world of `comm.world` processes (one by default, every collective the identity).

    Rank 0 computes the preconditioned query gradients H once (it alone loads the model and reads
    the head shard's projections and curvature) and broadcasts them; every rank streams the rows it
    holds (shard s on rank s % world) and keeps its exact top-k; the global top-k is a gather and a
    merge on rank 0 (by score, ties by row). With `scores`, rank 0 creates the (queries x rows) .npy
    and each rank writes its own columns into it. Row numbers are global, so the results equal one
    process's."""
    if comm.active and not comm.on_root(lambda: is_sharded(path)):
        return _on_root_alone(task, path, out, scores, config, comm, progress)
    # under torchrun a rank opens only its own shards; one process opens the whole index
    manifest = ShardManifest.from_dict(comm.on_root(lambda: read_manifest(path).to_dict())) if comm.active else None
    reader = comm.together(lambda: _open_held(path, manifest, comm))
    device = comm.device_for(resolve_device(config.device))
    writer = None
    try:
        with reader.snapshot() as snap:
            rows = snap.rows if manifest is None else _global_rows(comm, manifest, snap)
            if manifest is not None:
                snap.limit(rows)
            context = {}
            plan = comm.on_root(lambda: _plan(task, path, snap, reader.settings, device, config, rows, context))
            if scores is not None:
                # columns go into a temporary beside `scores`; rank 0 renames it over `scores` on success
                temp = comm.on_root(lambda: _ScoreWriter(scores, plan["Q"], rows, create=True).handoff())
                writer = comm.together(lambda: _ScoreWriter(scores, plan["Q"], rows, create=False, temp=temp))
            held = rows if manifest is None else snap.held_rows
            results: list[dict] = []
            stats = {"read_seconds": 0.0, "score_seconds": 0.0, "bytes_read": 0, "curvature_rows": plan["covered"]}
            if comm.active:
                stats.update(ranks=comm.world, rows_on_rank=held)
            try:
                for q0 in range(0, plan["Q"], plan["q_batch"]):
                    q1 = min(plan["Q"], q0 + plan["q_batch"])
                    specs = comm.on_root(lambda: _query_gradients(context, plan, q0, q1, config.batch_size))
                    H = [h.to(device) for h in comm.broadcast_tensors(context.get("H"), specs)]
                    bar = GlobalProgress(comm, "query", total=rows, unit="rows", enabled=progress)
                    try:
                        top = comm.together(lambda: _stream_scores(snap, H, plan["layers"], device, config, writer, q0,
                                                                   stats, progress, bar=_Unclosed(bar))
                                             if held else TopK(q1 - q0, config.kept(), device))
                    except BaseException:
                        bar.close()  # rank 0's bar thread would otherwise outlive the job's store
                        raise
                    bar.close(synced=True)
                    parts = comm.gather(comm.together(lambda: _format(snap, plan["q_ids"][q0:q1], top)))
                    if comm.root:
                        results.extend(merge_top(parts, config.kept()) if len(parts) > 1 else parts[0])
            finally:
                if writer is not None:
                    writer.close()
            comm.barrier()  # every rank's columns are in the scores file before rank 0 says it is done
            if comm.root and config.rerank:
                # rank 0 alone: the candidates are few whatever N is, and it holds the model
                results, reranked = rerank_results(results, context["source"], snap, reader.settings,
                                                   list(context["queries"]), config.rerank, config.top_k,
                                                   config.batch_size, config.budget(), rows, progress, plan["layers"],
                                                   cache=path)
                stats.update(reranked)
            if comm.root:
                # both outputs replace their targets only now: a failed query leaves existing files as they were
                write_results(out, results)
                if writer is not None:
                    writer.publish()
    finally:
        reader.close()
        if writer is not None and comm.root:
            writer.discard()
    return QueryResult(results, rows, time.perf_counter() - t0, None if out is None else str(out),
                       None if scores is None else str(scores), stats)


def _open_held(path: Path, manifest: ShardManifest | None, comm: Comm):
    """A reader of the rows this rank holds: the whole index (`manifest` None), or its own shards."""
    if manifest is None:
        return open_index(path)
    return ShardedReader(path, manifest=manifest, shards=[p for p in range(len(manifest.shards)) if comm.owns(p)])


def _on_root_alone(task, path: Path, out, scores, config: QueryConfig, comm: Comm, progress: bool) -> QueryResult:
    """A single-process index has one environment: rank 0 queries it in a world of its own, the others wait."""
    def run():
        notice(f"index {path} is a single-process index (no shards): rank 0 queries it alone")
        return _query(task, path, out, scores, config, LOCAL, progress, time.perf_counter())

    return comm.on_root(run)


def _query_gradients(context: dict, plan: dict, q0: int, q1: int, batch_size: int) -> list[tuple]:
    """Rank 0: the preconditioned gradients of queries q0..q1 (kept in `context`); their shapes and dtypes."""
    context["H"] = _preconditioned_queries(context["source"], context["queries"], plan["q_ids"], q0, q1, plan["layers"],
                                           context["curv"], batch_size)
    return [(tuple(h.shape), str(h.dtype).removeprefix("torch.")) for h in context["H"]]


class _Unclosed:
    """The job's bar lent to the scorer, which closes what it is given: the job closes this one
    itself, once every rank is done."""

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
    """Rank 0: the model, projections, preconditioners and query batching."""
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
    per_query = sum(source.layers[i].D for i in layers) * 4 * 3  # G, H and one scoring intermediate
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


def write_results(out, results: list[dict]) -> None:
    """results.jsonl, written beside and renamed over `out` (atomic.py): whole or not at all."""
    if out is None:
        return
    write_text(out, "".join(json.dumps(r) + "\n" for r in results))


def _open_source(task, settings: dict, snap: Snapshot, device: torch.device, index: Path) -> GradientSource:
    factors = factor_key_of_index(settings["factors"])
    spec = ProjectionSpec.from_factors(factors)
    layers = [LayerInfo.from_dict(d) for d in settings["layers"]]
    try:
        source = GradientSource.open(task, spec, device, layers=layers)
    except ValueError as e:
        raise ModelMismatchError(str(e)) from None
    if source.fingerprint != settings["fingerprint"]:
        raise ModelMismatchError(
            f"the task's model differs from the one index {index} was built with "
            f"(fingerprint {source.fingerprint[:12]} vs {settings['fingerprint'][:12]}): different weights or weight dtype"
        )
    from .task_check import check_options

    check_options(settings, task, index)  # before the projections load: a wrong option is named at once
    if factors["projection_kind"] == "whitened":
        # queries are projected exactly like the stored rows: with the index's whitened projections
        source.projections = load_projections(snap.array, source.layers, source.spec, device)
    from .task_check import check_gradients

    check_gradients(task, source, snap, settings, index)  # a few rows recomputed, once per query
    return source


def _preconditioned_queries(source: GradientSource, queries, q_ids, q0: int, q1: int, layers: list[int],
                            curv: dict, batch_size: int) -> list[torch.Tensor]:
    H = {i: [] for i in layers}
    with source.capture() as capture:
        for b0 in range(q0, q1, batch_size):
            b1 = min(q1, b0 + batch_size)
            grads, finite = source.projected_gradients(capture, [queries[j] for j in range(b0, b1)],
                                                       q_ids[b0:b1], "measurement")
            if not bool(finite.all()):
                raise NonFiniteGradientError(f"query {describe_nonfinite(q_ids[b0:b1], list(range(b0, b1)), finite)}")
            for i in layers:
                H[i].append(curv[i].apply(grads[i]))
    return [torch.cat(H[i]) for i in layers]


def _stream_scores(snap: Snapshot, H: list[torch.Tensor], layers: list[int], device: torch.device,
                   config: QueryConfig, writer, q0: int, stats: dict, progress: bool, bar=None) -> TopK:
    """Score every row `snap` holds against H; `bar` (default: a bar over snap.rows) hears of each block."""
    Q = H[0].shape[0]
    top = TopK(Q, config.kept(), device)
    loader = BlockLoader(snap, layers, device, buffers=config.buffers, threads=config.loader_threads)
    timer = DeviceTimer(device)
    sink = _ScoreSink(writer, device) if writer is not None else None
    try:
        with bar or Progress("query", total=snap.rows, unit="rows", enabled=progress) as bar:
            read_before = 0
            for first_row, n, factors in loader:
                with timer.section():
                    scores = sum(score_layer(Hl, L, R, config.scorer) for Hl, (L, R) in zip(H, factors))
                    top.update(scores, first_row)
                if sink is not None:
                    sink.put(q0, first_row, scores)
                bar.update(n, nbytes=loader.bytes_read - read_before)
                read_before = loader.bytes_read
    finally:
        if sink is not None:
            sink.close()
    stats["score_seconds"] += timer.seconds
    stats["read_seconds"] += loader.read_seconds
    stats["bytes_read"] += loader.bytes_read
    return top


def _format(snap: Snapshot, ids: list[str], top: TopK) -> list[dict]:
    out = []
    tv, tr = top.top.cpu().tolist(), top.top_rows.cpu().tolist()
    bv, br = top.bottom.cpu().tolist(), top.bottom_rows.cpu().tolist()
    for q, qid in enumerate(ids):
        out.append({
            "id": qid,
            "proponents": [{"id": snap.id_of(r), "row": r, "score": s} for s, r in zip(tv[q], tr[q])],
            "opponents": [{"id": snap.id_of(r), "row": r, "score": s} for s, r in zip(bv[q], br[q])],
        })
    return out


class _ScoreSink:
    """Hands each block's scores to `writer` without holding up the scorer. On CUDA the scores are
    copied into pinned memory asynchronously and written by a thread once their event completes
    (a .cpu() per block would wait for the block's kernels, so the next block's copy on the side
    stream would never overlap them); on the CPU they are written in line, as they are."""

    def __init__(self, writer: "_ScoreWriter", device: torch.device, depth: int = 2):
        self.writer = writer
        self.thread = None
        if device.type == "cuda":
            # bounded: at most `depth` blocks of scores wait in pinned memory
            self.inbox: queue.Queue = queue.Queue(maxsize=depth)
            self.error: BaseException | None = None
            self.thread = threading.Thread(target=self._loop, name="lorif-score-writer", daemon=True)
            self.thread.start()

    def put(self, q0: int, first_row: int, scores: torch.Tensor) -> None:
        if self.thread is None:
            self.writer.write(q0, first_row, scores.numpy())
            return
        if self.error is not None:
            raise self.error
        host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
        host.copy_(scores, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(scores.device))
        self.inbox.put((q0, first_row, host, copied))

    def _loop(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            if self.error is None:
                q0, first_row, host, copied = item
                try:
                    copied.synchronize()
                    self.writer.write(q0, first_row, host.numpy())
                except BaseException as e:  # re-raised in the scorer's thread
                    self.error = e

    def close(self) -> None:
        """Wait for every block queued to be written; raise a write's error here."""
        if self.thread is None:
            return
        self.inbox.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class _ScoreWriter:
    """The dense (queries x rows) float32 .npy, written block by block with positional writes
    (never memory-mapped whole: RSS stays bounded whatever its size)."""

    def __init__(self, path, Q: int, N: int, create: bool, temp=None):
        """`create` makes a temporary beside `path`, writes the header and sizes it; `publish()` renames
        it over `path` once every column is in, `discard()` removes it otherwise (an existing `path`
        is untouched by a failed query). The other ranks of a torchrun query open the temporary rank 0
        created (`temp`) and write their own columns into it."""
        self.target = Path(path)
        self.N = N
        header = {"descr": "<f4", "fortran_order": False, "shape": (Q, N)}
        if create:
            self.path = temp_beside(self.target)
            with open(self.path, "wb") as fh:
                np.lib.format.write_array_header_1_0(fh, header)
                fh.truncate(fh.tell() + Q * N * 4)
        else:
            self.path = Path(temp) if temp is not None else self.target
        self.published = False
        with open(self.path, "rb") as fh:
            np.lib.format.read_magic(fh)
            shape, _, _ = np.lib.format.read_array_header_1_0(fh)
            self.offset = fh.tell()
        if shape != (Q, N):
            raise ValueError(f"scores file {self.path} has shape {shape}, this query writes {(Q, N)}")
        self.fd = os.open(self.path, os.O_WRONLY)

    def write(self, q0: int, first_row: int, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype="<f4")
        for q in range(block.shape[0]):
            os.pwrite(self.fd, block[q].tobytes(), self.offset + ((q0 + q) * self.N + first_row) * 4)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def handoff(self) -> str:
        """Close a created temporary and name it, for the ranks that open it with `temp`."""
        self.close()
        return str(self.path)

    def publish(self) -> None:
        self.close()
        if self.path != self.target:
            publish(self.path, self.target)
        self.published = True

    def discard(self) -> None:
        """Close, and remove the temporary unless it was published (rank 0's job in a torchrun query)."""
        self.close()
        if not self.published and self.path != self.target:
            discard(self.path)
