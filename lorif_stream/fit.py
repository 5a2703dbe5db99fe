"""fit: the per-layer curvature of an index, from its streaming statistics and stored factors.

Three preconditioners (CurvatureConfig.preconditioner): `lowrank`, the paper's top-r eigenpairs
of Σ g gᵀ from D x k Nyström sketches; `ekfac`, a diagonal in the whitening's Kronecker eigenbasis
(ekfac.py, D numbers per layer); `none`, the plain dot product. Each has a statistics object with
the same life cycle: fed during the build, caught up from the stored factors, saved; then
finalize_curvature, one step for every index and world, sums the saved statistics of the
environments a rank holds over the ranks and stores the curvature once.

Sketches are additive over rows, so they are kept in the index with the row count each covers
and only ever *caught up*: a resumed build, an append, or a post-build pass for layers whose
sketch did not fit in memory during the build reads just the missing rows of just those layers
(one LMDB key range per layer). Finalizing turns each sketch into top-r eigenpairs, optionally
refined by streaming passes, and a damping λ; the result is stored for queries.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .comm import Comm, current
from .config import CurvatureConfig, budget_groups, default_memory_budget, factor_key_of_index, parse_size
from .curvature import DampingPolicy, LayerCurvature, fit_layer_curvature, precondition
from .ekfac import EkfacPreconditioner, LayerEigenStats
from .device import notice, resolve_device
from .gpu import DeviceTimer
from .loader import BlockLoader
from .progress import Progress
from .sketch import DENSE_MAX_D, LayerSketch
from .store import IndexLayout, IndexWriter, Snapshot
from .store.placement import Placement, StoredIndex
from .whitening import WHITENING_META, load_eigenbases, tokens_per_example

SKETCH_META = "sketch"
CURVATURE_META = "curvature"
EKFAC_META = "ekfac"


class BudgetTooSmallError(MemoryError):
    pass


def sketch_seed(seed: int, layer_name: str) -> int:
    digest = hashlib.sha256(f"lorif-sketch\0{seed}\0{layer_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def sketch_memory_bytes(D: int, k: int) -> int:
    return 2 * D * min(k, D) * 4  # Y and the cached test matrix Ω (or the fp64 Gram of a dense sketch)


def finalize_memory_bytes(D: int, k: int) -> int:
    """What finalizing one lowrank layer needs: its sketch plus a dense sketch's eigh (~3 more D x D
    fp64: symmetrized copy, eigenvectors, workspace) or a Nyström sketch's D x k product."""
    dense = k >= D and D <= DENSE_MAX_D
    return sketch_memory_bytes(D, k) + (24 * D * D if dense else D * min(k, D) * 4)


def check_finalize_budget(layers, config: CurvatureConfig, budget: int) -> None:
    """Refuse a budget in which some layer's curvature cannot be finalized (build checks it up front)."""
    for layer in layers:
        need = finalize_memory_bytes(layer.D, config.sketch_width)
        if need > budget:
            raise BudgetTooSmallError(
                f"memory budget {budget / 1e6:.0f} MB is too small for even one layer: layer {layer.name!r} "
                f"(D={layer.D:,}, k={config.sketch_width}) needs {need / 1e6:.0f} MB; raise --memory-budget or lower --sketch-rank"
            )


def state_array_name(kind: str, layer: str, field: str) -> str:
    return f"{kind}/{layer}/{field}"


class SketchSet:
    """The in-memory sketches of some of an index's layers (by layer position)."""

    def __init__(self, writer: IndexWriter, config: CurvatureConfig, device: torch.device):
        self.config = config
        self.device = device
        self.layout = writer.layout
        self.sketches: dict[int, LayerSketch] = {}
        self.timer = DeviceTimer(device)

    @property
    def seconds(self) -> float:
        """Spent in sketch updates during the build, device work included (benchmarks report it)."""
        return self.timer.seconds

    # -- choosing and loading
    @classmethod
    def for_build(cls, writer: IndexWriter, device: torch.device, config: CurvatureConfig, budget: int) -> "SketchSet":
        """Sketch during the build every layer that fits the budget (in layer order); say which do not."""
        self = cls(writer, config, device)
        used, skipped = 0, []
        for i, layer in enumerate(self.layout.layers):
            need = sketch_memory_bytes(layer.D, config.sketch_width)
            if used + need <= budget // 2:
                self.sketches[i] = self._load_or_new(writer, i)
                used += need
            else:
                skipped.append(layer.name)
        if skipped:
            notice(f"memory budget {budget / 1e9:.2f} GB: {len(skipped)} layer sketch(es) do not fit during the build "
                   f"and get a post-build pass over their own blocks ({', '.join(skipped[:4])}{'...' if len(skipped) > 4 else ''})")
        return self

    def _load_or_new(self, writer: IndexWriter, i: int) -> LayerSketch:
        layer = self.layout.layers[i]
        meta = writer.get_state_meta(SKETCH_META) or {}
        stored = meta.get("layers", {}).get(layer.name)
        if meta.get("key") == self.config.sketch_key() and stored is not None:
            Y = writer.get_array(state_array_name("sketch", layer.name, "Y"))
            if Y is not None:
                return LayerSketch.from_state(dict(stored, Y=Y), device=self.device)
        return LayerSketch(D=layer.D, k=self.config.sketch_width, seed=sketch_seed(self.config.sketch_seed, layer.name),
                           device=self.device)

    # -- feeding
    @torch.no_grad()
    def update(self, Ls: list[torch.Tensor], Rs: list[torch.Tensor]) -> None:
        with self.timer.section():
            for i, sketch in self.sketches.items():
                sketch.update(Ls[i].to(self.device), Rs[i].to(self.device))

    def catch_up(self, writer: IndexWriter, progress: bool = True) -> None:
        """Replay rows the in-memory sketches miss (an interrupted build, an append) from the index."""
        target = writer.rows
        behind = {i: s for i, s in self.sketches.items() if s.rows < target}
        if not behind:
            return
        for start in sorted({s.rows for s in behind.values()}):
            group = sorted(i for i, s in behind.items() if s.rows == start)
            self._replay(writer, group, start, target, progress)

    def _replay(self, writer: IndexWriter, group: list[int], start: int, stop: int, progress: bool) -> None:
        replay_rows(writer, group, start, stop, self.device, progress, "sketch",
                    lambda i, L, R: self.sketches[i].update(L, R))

    # -- persistence
    def save(self, writer: IndexWriter) -> None:
        """Store the in-memory sketches with the rows each covers (atomically)."""
        if not self.sketches:
            return
        meta = writer.get_state_meta(SKETCH_META) or {}
        if meta.get("key") != self.config.sketch_key():
            meta = {"key": self.config.sketch_key(), "layers": {}}
        arrays = {}
        for i, sketch in self.sketches.items():
            name = self.layout.layers[i].name
            state = sketch.to_state()
            arrays[state_array_name("sketch", name, "Y")] = state.pop("Y")
            meta["layers"][name] = state
        writer.put_state(arrays, {SKETCH_META: meta})



def replay_rows(writer: IndexWriter, layers: list[int], start: int, stop: int, device: torch.device,
                progress: bool, desc: str, feed) -> None:
    """Stream rows [start, stop) of `layers` from the index into `feed(layer, L, R)` (device tensors),
    read and decoded (and on CUDA copied) ahead by the query's loader while `feed` computes."""
    reader = writer.reader()
    with reader.snapshot() as snap, Progress(desc, total=stop - start, unit="rows", enabled=progress) as bar:
        for _, n, factors in BlockLoader(snap, layers, device, start=start, stop=stop):
            for i, (L, R) in zip(layers, factors):
                feed(i, L, R)
            bar.update(n)


# ------------------------------------------------------------------------------------ EK-FAC / none


class EkfacSet:
    """The EK-FAC statistic Λ of every layer (d_out x d_in each: small, always in memory)."""

    def __init__(self, writer: IndexWriter, device: torch.device, resume: bool = True):
        self.layout = writer.layout
        self.device = device
        meta = writer.get_state_meta(EKFAC_META) or {}
        self.stats: dict[int, LayerEigenStats] = {}
        self.timer = DeviceTimer(device)
        for i, layer in enumerate(self.layout.layers):
            q_out, q_in = load_eigenbases(writer.get_array, layer.name, device)
            stored = meta.get("layers", {}).get(layer.name)
            sums = writer.get_array(state_array_name("ekfac", layer.name, "sums")) if stored and resume else None
            if sums is None:
                self.stats[i] = LayerEigenStats.empty(q_out, q_in)
            else:
                self.stats[i] = LayerEigenStats(q_out, q_in, torch.from_numpy(np.array(sums)).to(device),
                                                int(stored["rows"]))

    @classmethod
    def for_build(cls, writer: IndexWriter, device: torch.device, config: CurvatureConfig, budget: int) -> "EkfacSet":
        return cls(writer, device)

    @property
    def seconds(self) -> float:
        return self.timer.seconds

    @torch.no_grad()
    def update(self, Ls: list[torch.Tensor], Rs: list[torch.Tensor]) -> None:
        with self.timer.section():
            for i, stats in self.stats.items():
                stats.update(Ls[i], Rs[i])

    def catch_up(self, writer: IndexWriter, progress: bool = True) -> None:
        target = writer.rows
        for start in sorted({s.rows for s in self.stats.values() if s.rows < target}):
            group = [i for i, s in self.stats.items() if s.rows == start]
            replay_rows(writer, group, start, target, self.device, progress, "ekfac",
                        lambda i, L, R: self.stats[i].update(L, R))

    def save(self, writer: IndexWriter) -> None:
        arrays = {state_array_name("ekfac", self.layout.layers[i].name, "sums"): s.to_numpy() for i, s in self.stats.items()}
        meta = {"layers": {self.layout.layers[i].name: {"rows": s.rows} for i, s in self.stats.items()}}
        writer.put_state(arrays, {EKFAC_META: meta})


def store_ekfac_curvature(writer: IndexWriter, totals: dict[int, tuple[torch.Tensor, int]], rows: int,
                          config: CurvatureConfig) -> dict:
    """Store each layer's Λ (`totals[layer] = (sums, rows covered)`) and damping as a new curvature
    generation of `writer`'s index, covering `rows` rows (queries switch atomically)."""
    layout = writer.layout
    old = writer.get_state_meta(CURVATURE_META) or {}
    generation = int(old.get("generation", 0)) + 1
    policy = _policy(config)
    arrays, layers = {}, {}
    for i, (sums, covered) in totals.items():
        layer = layout.layers[i]
        eig = sums.to(torch.float32)
        trace = float(sums.sum())
        damping = policy.value(eig.flatten(), trace, layer.D)
        arrays[state_array_name(f"curvature/{generation}", layer.name, "ekfac")] = eig.cpu().numpy()
        top = torch.topk(eig.flatten(), min(8, layer.D)).values.tolist()
        layers[layer.name] = {"rank": layer.D, "damping": damping, "trace": trace, "captured_energy": 1.0,
                              "rows": int(covered), "top_eigenvalues": top}
    summary = {"generation": generation, "config": asdict(config), "rows": int(rows), "layers": layers}
    writer.put_state(arrays, {CURVATURE_META: summary}, drop=stale_generation(old))
    return summary


class NoStatistics:
    """Plain dot-product scoring: nothing to accumulate, a summary that says so."""

    seconds = 0.0

    @classmethod
    def for_build(cls, writer: IndexWriter, device: torch.device, config: CurvatureConfig, budget: int) -> "NoStatistics":
        return cls()

    def update(self, Ls, Rs) -> None:
        pass

    def catch_up(self, writer: IndexWriter, progress: bool = True) -> None:
        pass

    def save(self, writer: IndexWriter) -> None:
        pass


def store_no_curvature(writer: IndexWriter, rows: int, config: CurvatureConfig) -> dict:
    """The `none` preconditioner's curvature generation: a summary that says so, covering `rows` rows."""
    old = writer.get_state_meta(CURVATURE_META) or {}
    layers = {l.name: {"rank": 0, "damping": 1.0, "trace": 0.0, "captured_energy": 0.0, "rows": int(rows),
                       "top_eigenvalues": []} for l in writer.layout.layers}
    summary = {"generation": int(old.get("generation", 0)) + 1, "config": asdict(config), "rows": int(rows),
               "layers": layers}
    writer.put_state({}, {CURVATURE_META: summary}, drop=stale_generation(old))
    return summary


def curvature_statistics(writer: IndexWriter, device: torch.device, config: CurvatureConfig, budget: int):
    """What the build feeds its factor blocks into, by preconditioner (sketches only for lowrank)."""
    kinds = {"lowrank": SketchSet, "ekfac": EkfacSet, "none": NoStatistics}
    return kinds[config.preconditioner].for_build(writer, device, config, budget)


def stale_generation(old: dict) -> list[str]:
    if not old:
        return []
    fields = ("V", "sigma2", "ekfac")
    return [state_array_name(f"curvature/{old['generation']}", name, f) for name in old.get("layers", {}) for f in fields]


# ------------------------------------------------------------------------------------ layers


def _policy(config: CurvatureConfig) -> DampingPolicy:
    if config.damping is not None:
        return DampingPolicy("explicit", config.damping)
    return DampingPolicy(config.damping_policy, config.damping_scale)


def finalize_layer(writer: IndexWriter, sketch: LayerSketch, i: int, config: CurvatureConfig,
                    device: torch.device, generation: int) -> dict:
    layer = writer.layout.layers[i]

    def blocks():
        reader = writer.reader()
        with reader.snapshot() as snap:
            for _, _, [(L, R)] in BlockLoader(snap, [i], device, stop=sketch.rows):
                yield L, R

    # the last refinement pass ends with a Nystrom step on the refined subspace: at equal passes it
    # is 2-4x more accurate than a Rayleigh-Ritz finish (benchmarks/bench_curvature.py)
    curv = fit_layer_curvature(sketch, config.sketch_rank, _policy(config), config.refine,
                               block_source=blocks if config.refine else None, finalize="nystrom")
    sketch.drop_omega()
    writer.put_state({state_array_name(f"curvature/{generation}", layer.name, "V"): curv.V.cpu().numpy(),
                      state_array_name(f"curvature/{generation}", layer.name, "sigma2"): curv.sigma2.cpu().numpy()})
    return {"rank": curv.rank, "damping": curv.damping, "trace": curv.trace,
            "captured_energy": curv.captured_energy, "rows": sketch.rows, "top_eigenvalues": curv.sigma2[:8].tolist()}


def stored_preconditioner(meta: dict | None) -> str:
    """The preconditioner a curvature summary was made for (format version 1 knew only lowrank)."""
    return ((meta or {}).get("config") or {}).get("preconditioner", "lowrank")


@dataclass(frozen=True)
class LowRankPreconditioner:
    curvature: LayerCurvature

    def apply(self, G: torch.Tensor) -> torch.Tensor:
        return precondition(G.reshape(G.shape[0], -1), self.curvature).reshape(G.shape)


class IdentityPreconditioner:
    def apply(self, G: torch.Tensor) -> torch.Tensor:
        return G


def load_preconditioner(snap: Snapshot, layer: int, device: torch.device):
    """The stored preconditioner of one layer, as the query sees it in its snapshot: `.apply(G)` maps
    query gradients (Q, d_out, d_in) to the matrices H_q scored against the stored rows."""
    name = snap.layout.layers[layer].name
    meta = snap.state_meta(CURVATURE_META)
    if not meta or name not in meta.get("layers", {}):
        raise ValueError(f"index has no curvature for layer {name!r}: run `lorif-stream fit --index ...`")
    info = meta["layers"][name]
    kind = stored_preconditioner(meta)
    if kind == "none":
        return IdentityPreconditioner()
    if kind == "ekfac":
        q_out, q_in = load_eigenbases(snap.array, name, device)
        eig = snap.array(state_array_name(f"curvature/{meta['generation']}", name, "ekfac"))
        return EkfacPreconditioner(q_out, q_in, torch.from_numpy(np.array(eig)).to(device), float(info["damping"]))
    V = snap.array(state_array_name(f"curvature/{meta['generation']}", name, "V"))
    sigma2 = snap.array(state_array_name(f"curvature/{meta['generation']}", name, "sigma2"))
    return LowRankPreconditioner(LayerCurvature(torch.from_numpy(sigma2).to(device), torch.from_numpy(V).to(device),
                                                float(info["damping"]), float(info["trace"])))


# ------------------------------------------------------------------------------------ finalize
# One finalization for every index and world: every environment keeps its own running statistic
# over its own rows (the EK-FAC sums, or the lowrank sketches with their traces and row counts),
# saved in it and caught up from its blocks, so a killed rank resumes from its own shard. A rank
# adds up the statistics of the environments it holds, the ranks all-reduce them (the identity in
# one process), and rank 0 alone turns the totals into a curvature generation stored in the head
# environment, where queries read it.


class ShardedRefineError(ValueError):
    pass


def check_sharded_curvature(config: CurvatureConfig) -> None:
    """Refinement streams every row through one subspace per pass: not across shards (yet)."""
    if config.preconditioner == "lowrank" and config.refine:
        raise ShardedRefineError(f"refine={config.refine} is not supported on a sharded index (the refinement passes "
                                 f"would stream every shard through one process): use refine=0")


def finalize_curvature(comm: Comm, placement: Placement, config: CurvatureConfig, device: torch.device, budget: int,
                       progress: bool = True, fresh: bool = False) -> dict:
    """Finalize the curvature of the index from the statistics of the environments this rank holds
    and those of the other ranks; store it in the head environment. `fresh` recomputes the EK-FAC
    sums from row 0 (fit never trusts stored ones). Returns the summary. Every rank calls it: what
    one rank does alone (its statistics, rank 0's finalization) is agreed on before the next
    collective, so a failure there is raised on every rank."""
    if placement.sharded:
        check_sharded_curvature(config)
    writers = placement.held
    head = placement.head if comm.root else None
    rows = comm.sum_int(comm.together(lambda: sum(w.rows for w in writers)))
    layout = IndexLayout.from_dict(comm.on_root(lambda: head.layout.to_dict()))
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
    """The EK-FAC sums and row counts of this rank's environments, each caught up and saved first."""
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
    comm.together(lambda: check_finalize_budget(layout.layers, config, budget))
    old = comm.on_root(lambda: head.get_state_meta(CURVATURE_META) or {})
    # each fit writes a new generation of arrays and switches to it in one transaction at the end,
    # so a query running meanwhile sees the old curvature or the new one, never a mix of layers
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
            layers[layer.name] = comm.on_root(lambda: finalize_layer(head, sketch, i, config, device, generation))
    summary = {"generation": generation, "config": asdict(config), "rows": rows, "layers": layers}
    comm.on_root(lambda: head.put_state({}, {CURVATURE_META: summary}, drop=stale_generation(old)))
    return summary


def _own_sketches(writers, group: list[int], config, device, progress: bool) -> dict[int, LayerSketch]:
    """The sketches of the layers of `group` summed over this rank's environments, each caught up and saved first."""
    totals: dict[int, LayerSketch] = {}
    for w in writers:
        sketches = SketchSet(w, config, device)
        sketches.sketches = {i: sketches._load_or_new(w, i) for i in group}
        behind = any(sketch.rows < w.rows for sketch in sketches.sketches.values())
        sketches.catch_up(w, progress)
        if behind:  # a sketch the build saved with every row is not written again (D x k per layer)
            sketches.save(w)
        for i in group:
            totals[i] = totals[i].merge(sketches.sketches[i]) if i in totals else sketches.sketches[i]
    return totals


# ------------------------------------------------------------------------------------ public


def fit(index, config: CurvatureConfig | None = None, *, device: str = "auto", memory_budget=None,
        progress: bool = True, **options) -> dict:
    """Recompute the curvature of `index` from its stored factors (factors are not touched).

    Options are the fields of CurvatureConfig. Stored sketches are reused when the sketch width
    and seed are unchanged (then only rank, damping and refinement change); otherwise the
    sketches are rebuilt with one pass per group of layers that fits `memory_budget`. Under
    torchrun every rank fits the shards it holds (a single environment is rank 0's alone).
    """
    if config is not None and options:
        raise TypeError("pass either a CurvatureConfig or keyword options, not both")
    config = config or CurvatureConfig(**options)
    budget = parse_size(memory_budget) if memory_budget is not None else default_memory_budget(device)
    comm = current()
    path = Path(index)
    index = comm.on_root(lambda: _finished_index(path))
    with Placement(path, index.manifest) as placement:
        if placement.sharded:
            check_sharded_curvature(config)
        # every environment of the index, each on the rank that holds it (a single environment: rank 0)
        comm.together(lambda: placement.hold([part.position for part in index.all_parts()], comm.owns))
        config = CurvatureConfig(**comm.on_root(lambda: asdict(_resolved_for_fit(placement.head, path, config))))
        comm.together(lambda: [w.update_settings(dict(w.settings, curvature=asdict(config))) for w in placement.held])
        return finalize_curvature(comm, placement, config, comm.device_for(resolve_device(device)), budget,
                                  progress and comm.root, fresh=config.preconditioner == "ekfac")


def _finished_index(path: Path) -> StoredIndex:
    """Rank 0: the index; an unfinished build or append of its shards is refused (each shard may lack
    its rows)."""
    index = StoredIndex.read(path, must_exist=True)
    if index.sharded and not index.last.get("finalized"):
        raise ValueError(f"index {path} has an unfinished {index.last['kind']}: rerun it before `fit`")
    return index


def _resolved_for_fit(head: IndexWriter, path: Path, config: CurvatureConfig) -> CurvatureConfig:
    """Rank 0: `auto` resolved for the index's projections and its whitening sample's tokens."""
    resolved = config.resolved(factor_key_of_index(head.settings["factors"])["projection_kind"],
                               tokens_per_example(head.get_state_meta(WHITENING_META)))
    if resolved.preconditioner == "auto":
        raise ValueError(f"index {path} has no finished whitening pre-pass: rerun its build first")
    return resolved
