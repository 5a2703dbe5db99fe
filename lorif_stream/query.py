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
from .config import QueryConfig
from .config import factor_key_of_index
from .device import notice, resolve_device
from .fit import CURVATURE_META, load_preconditioner
from .gradients import GradientSource, NonFiniteGradientError, describe_nonfinite
from .progress import Progress
from .projection import ProjectionSpec
from .store import BlockBuffers, BlockDecoder, Snapshot
from .store.shards import open_index
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
    """Exact streaming top-k (largest = proponents) and bottom-k (smallest = opponents) per query."""

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
        best, idx = torch.topk(v, k, dim=1, largest=largest, sorted=True)
        return best, torch.gather(r, 1, idx)


# ------------------------------------------------------------------------------------ loading


class BlockLoader:
    """Iterates decoded blocks of the chosen layers as device tensors, decoding ahead in a thread.

    `buffers` host buffer sets form a ring: the loader fills a free one while the scorer uses
    another; a set returns to the ring once the scorer (and, on CUDA, its copy) is done with it.
    `threads=0` decodes inline (no overlap), which is also the reference the tests compare to.
    """

    def __init__(self, snap: Snapshot, layers: Sequence[int], device: torch.device, buffers: int = 2,
                 threads: int = 1):
        self.snap, self.layers, self.device = snap, list(layers), device
        self.threads = threads
        pin = device.type == "cuda"
        self.sets = [self._alloc(pin) for _ in range(buffers)]
        self.read_seconds = 0.0
        self.bytes_read = 0

    def _alloc(self, pin: bool) -> BlockBuffers:
        bufs = BlockBuffers(self.snap.layout)
        if pin:
            # decode straight into page-locked memory so host->device copies can be asynchronous
            bufs.L = [torch.empty(L.shape, pin_memory=True).numpy() for L in bufs.L]
            bufs.R = [torch.empty(R.shape, pin_memory=True).numpy() for R in bufs.R]
        return bufs

    def _decode(self, decoder: BlockDecoder, bufs: BlockBuffers, first_row: int, value0) -> int:
        t = time.perf_counter()
        n = 0
        for j, layer in enumerate(self.layers):
            value = value0 if j == 0 else self.snap.value_at(layer, first_row)
            self.bytes_read += len(value)
            L, _ = self.snap.decode(layer, first_row, value, bufs, decoder)
            n = L.shape[0]
        self.read_seconds += time.perf_counter() - t
        return n

    def _values(self):
        return self.snap.layer_values(self.layers[0], 0, self.snap.rows)

    def __iter__(self) -> Iterator[tuple[int, int, list[tuple[torch.Tensor, torch.Tensor]]]]:
        if self.threads == 0:
            decoder = BlockDecoder()
            for first_row, value in self._values():
                n = self._decode(decoder, self.sets[0], first_row, value)
                yield first_row, n, self._tensors(self.sets[0], n)
            return
        yield from self._threaded()

    def _threaded(self):
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        for i in range(len(self.sets)):
            free.put(i)
        stop = threading.Event()

        def work():
            decoder = BlockDecoder()
            try:
                for first_row, value in self._values():
                    i = free.get()
                    if stop.is_set() or i < 0:
                        return
                    ready.put((i, first_row, self._decode(decoder, self.sets[i], first_row, value)))
                ready.put(None)
            except BaseException as e:
                ready.put(e)

        thread = threading.Thread(target=work, name="lorif-block-loader", daemon=True)
        thread.start()
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        in_flight: list[tuple[object, int]] = []
        try:
            while True:
                item = ready.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                i, first_row, n = item
                if side is None:
                    yield first_row, n, self._tensors(self.sets[i], n)
                    free.put(i)
                    continue
                with torch.cuda.stream(side):
                    tensors = self._tensors(self.sets[i], n)
                    done = torch.cuda.Event()
                    done.record(side)
                torch.cuda.current_stream(self.device).wait_event(done)
                in_flight.append((done, i))
                still = []
                for ev, j in in_flight:
                    (free.put(j) if ev.query() else still.append((ev, j)))
                in_flight = still
                yield first_row, n, tensors
        finally:
            stop.set()
            for _, j in in_flight:
                free.put(j)
            free.put(-1)  # unblock a loader waiting for a buffer
            thread.join()

    def _tensors(self, bufs: BlockBuffers, n: int):
        out = []
        for layer in self.layers:
            L = torch.from_numpy(bufs.L[layer][:n])
            R = torch.from_numpy(bufs.R[layer][:n])
            if self.device.type != "cpu":
                L, R = L.to(self.device, non_blocking=True), R.to(self.device, non_blocking=True)
            out.append((L, R))
        return out


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
    from .shards.comm import current

    comm = current()
    if comm.active:
        from .shards.query import query_across_ranks

        return query_across_ranks(task, Path(index), out, scores, config, comm, progress, t0)
    return query_in_process(task, index, out, scores, config, progress, t0)


def query_in_process(task, index, out, scores, config: QueryConfig, progress: bool, t0: float) -> QueryResult:
    """The query in this process alone (a sharded index is read through all of its shards)."""
    device = resolve_device(config.device)
    with open_index(index) as reader, reader.snapshot() as snap:
        settings = reader.settings
        source = _open_source(task, settings, snap, device, Path(index))
        queries = task.query_examples()
        if len(queries) == 0:
            raise ValueError("the task has no query examples (query_examples() is empty)")
        if snap.rows == 0:
            raise ValueError(f"index {index} holds no rows yet")
        if config.top_k > snap.rows:
            raise ValueError(f"--top-k {config.top_k} is larger than the index's {snap.rows} rows")
        layers = source.select(config.layers)
        curv = {i: load_preconditioner(snap, i, device) for i in layers}
        covered = (snap.state_meta(CURVATURE_META) or {}).get("rows")
        if covered != snap.rows:
            notice(f"the curvature covers {covered} of the index's {snap.rows} rows (an append in progress, or run `fit`)")
        q_ids = [str(task.example_id(ex, i)) for i, ex in enumerate(queries)]
        per_query = sum(source.layers[i].D for i in layers) * 4 * 3  # G, H and one scoring intermediate
        q_batch = int(max(1, min(len(queries), config.budget() // 4 // max(per_query, 1))))
        if q_batch < len(queries):
            notice(f"{len(queries)} queries are scored in batches of {q_batch} (one index pass each) to fit the memory budget")
        results: list[dict] = []
        stats = {"read_seconds": 0.0, "score_seconds": 0.0, "bytes_read": 0, "curvature_rows": covered}
        writer = _ScoreWriter(scores, len(queries), snap.rows, create=True) if scores is not None else None
        try:
            for q0 in range(0, len(queries), q_batch):
                q1 = min(len(queries), q0 + q_batch)
                H = _preconditioned_queries(source, queries, q_ids, q0, q1, layers, curv, config.batch_size)
                top = _stream_scores(snap, H, layers, device, config, writer, q0, stats, progress)
                results.extend(_format(snap, q_ids[q0:q1], top))
            if writer is not None:
                writer.close()
            # both outputs replace their targets only now: a failed query leaves existing files as they were
            write_results(out, results)
            if writer is not None:
                writer.publish()
        finally:
            if writer is not None:
                writer.discard()
        return QueryResult(results, snap.rows, time.perf_counter() - t0, None if out is None else str(out),
                           None if scores is None else str(scores), stats)


def write_results(out, results: list[dict]) -> None:
    """results.jsonl, written beside and renamed over `out` (atomic.py): whole or not at all."""
    if out is None:
        return
    write_text(out, "".join(json.dumps(r) + "\n" for r in results))


def _open_source(task, settings: dict, snap: Snapshot, device: torch.device, index: Path) -> GradientSource:
    factors = factor_key_of_index(settings["factors"])
    spec = ProjectionSpec(f=factors["f"], kind=factors["projection"], seed=factors["seed"], min_side=factors["min_side"])
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
        source.projections = load_projections(snap.array, source.layers, device)
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
    top = TopK(Q, config.top_k, device)
    loader = BlockLoader(snap, layers, device, buffers=config.buffers, threads=config.loader_threads)
    with bar or Progress("query", total=snap.rows, unit="rows", enabled=progress) as bar:
        read_before = 0
        for first_row, n, factors in loader:
            t = time.perf_counter()
            scores = sum(score_layer(Hl, L, R, config.scorer) for Hl, (L, R) in zip(H, factors))
            top.update(scores, first_row)
            if writer is not None:
                writer.write(q0, first_row, scores.cpu().numpy())
            stats["score_seconds"] += time.perf_counter() - t
            bar.update(n, nbytes=loader.bytes_read - read_before)
            read_before = loader.bytes_read
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
