"""build / append / fit of a sharded index, by the ranks of a torchrun job (or one process).

The index directory holds `shards.json` and one shard per rank per segment (store/shards.py). A
segment (the build, then each append) is split into one contiguous run of rows per rank; rank r
writes shard `first + r` of it with the single-process pipeline (build.index_rows) over a view of
its rows (task_view.py). What is shared is computed once: rank 0 plans the segment and writes the
manifest, the whitening moments and the curvature statistics are all-reduced and finalized on
rank 0 (whitening.py, curvature.py of this package), ids are checked unique across shards
(ids.py). Rank 0 alone writes the manifest and the head shard's index-wide state; a rank opens
only the shards it writes or holds (shard s is held by rank s % world), so shards may sit on
node-local disks.

A rerun of the same command resumes: every shard continues at its first missing row. The world
size of a resumed segment must be the one it started with (one shard per rank); another is refused
in one line.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

from ..build import (
    PAUSE_BEFORE_FINALIZE_ENV, BuildResult, SettingsMismatchError,
    _check_new_directory, _check_resumed_segment, _clamp_rank, _diff, _resolve_preconditioner, _set_last_segment,
    _spec, index_rows, new_layout, new_settings,
)
from ..capture import LayerInfo
from ..config import FACTOR_FIELDS, BuildConfig, CurvatureConfig, factor_key_of_index, factor_options
from ..device import notice, resolve_device
from ..estimate import announce, check_budget, check_fits, estimate_build, tokens_bound
from ..gradients import GradientSource
from ..segments import segment_check, store_check, task_mismatch
from ..store import IndexLayout, IndexWriter, WriteRefusedError
from ..store.format import DATA_FILE
from ..store.shards import ShardManifest, ShardEntry, is_sharded, read_manifest, shard_name, split_rows, write_manifest
from ..whitening import WHITENING_META, tokens_per_example
from .comm import Comm, GlobalProgress
from .curvature import check_sharded_curvature, reduce_curvature
from .ids import first_duplicate
from .task_view import ShardTask
from .whitening import ensure_whitening_sharded


def _rank_budget(config: BuildConfig, comm: Comm) -> BuildConfig:
    """The default budget (half the RAM) is the node's: its ranks share it. The smallest rank's is
    every rank's, so that all plan the same passes (whitening groups), hence the same collectives."""
    budget = config.budget() if config.memory_budget is not None else max(config.budget() // comm.local_world, 1)
    return replace(config, memory_budget=min(comm.gather(budget)))


def _single_process_index(path: Path, what: str) -> SettingsMismatchError:
    return SettingsMismatchError(f"index {path} was written by a single process (one LMDB environment, not shards): "
                                 f"{what} it without torchrun, or build a sharded index into a new --index")


# ------------------------------------------------------------------------------------ build


def sharded_build(task, path: Path, config: BuildConfig, comm: Comm, progress: bool,
                  whiten_only: bool = False) -> BuildResult:
    t0 = time.perf_counter()
    check_sharded_curvature(config.curvature)
    config = _rank_budget(config, comm)
    device = comm.device_for(resolve_device(config.device))
    source, n = comm.together(lambda: (GradientSource.open(task, _spec(config), device), len(task.train_examples())))
    config = _clamp_rank(config, source.layers)
    _same_everywhere(comm, n, source.fingerprint)
    if n == 0:
        raise ValueError("the task has no training examples (train_examples() is empty)")
    check_budget(source.layers, source.spec, config)
    plan = comm.on_root(lambda: _plan_build(path, n, comm, config, source, task, progress))
    manifest = ShardManifest.from_dict(plan["manifest"])
    segment = manifest.segments[-1]
    if plan["complete"]:
        if not all(comm.gather(comm.together(lambda: _holds_task(comm, path, manifest, segment, task)))):
            raise SettingsMismatchError(f"index {path} holds a complete build of other examples; use `append` to add "
                                        f"examples or a new --index")
        if comm.root:
            notice(f"index {path}: the build of {n:,} rows is already complete ({len(manifest.shards)} shards); "
                   f"nothing to do")
        return BuildResult(str(path), manifest.planned_rows, 0, 0.0, 0)
    layout = IndexLayout.from_dict(plan["layout"])
    with ExitStack() as stack:
        position = segment["shards"][0] + comm.rank
        entry = manifest.shards[position]
        view = ShardTask(task, entry.start - segment["start"], entry.count)
        settings = dict(new_settings(task, source, config, entry.count), shard=_shard_record(entry, position))
        writer = comm.together(lambda: _open_or_create(path, entry, position, layout, settings, view, config,
                                                         source, "build"))
        stack.callback(writer.close)
        return _write_segment(comm, path, manifest, {position: writer}, writer, source, task, view, config,
                              progress, whiten_only, t0)


def _same_everywhere(comm: Comm, n: int, fingerprint: str) -> None:
    seen = comm.gather((n, fingerprint))
    for rank, (n_r, f_r) in enumerate(seen):
        if (n_r, f_r) != seen[0]:
            raise ValueError(f"rank {rank} loaded {n_r:,} training examples and model {f_r[:12]}, rank 0 "
                             f"{seen[0][0]:,} and {seen[0][1][:12]}: every rank must load the same task")


def _plan_build(path: Path, n: int, comm: Comm, config: BuildConfig, source, task, progress: bool) -> dict:
    """Rank 0: the shards of a new build (manifest written before any shard), or the unfinished one to resume."""
    if (path / DATA_FILE).exists():
        raise _single_process_index(path, "resume or extend")
    if is_sharded(path):
        manifest = read_manifest(path)
        last = manifest.segments[-1]
        first = manifest.segments[0]
        if len(manifest.segments) > 1 or last.get("finalized"):
            if len(manifest.segments) == 1 and first["count"] == n:
                # a rerun of a complete build: its shards' data are checked by the ranks that hold them
                return {"manifest": manifest.to_dict(), "complete": True, "layout": None}
            raise SettingsMismatchError(f"index {path} already holds a complete build of {manifest.planned_rows:,} "
                                        f"rows; use `append` to add examples or a new --index")
        _check_resumable(path, last, comm, n)
        layout = _started_layout(path, manifest) or new_layout(source, config)
        return {"manifest": manifest.to_dict(), "complete": False, "layout": layout.to_dict()}
    _check_new_directory(path)
    counts = split_rows(n, comm.world)
    layout = new_layout(source, config)
    if progress:
        estimate = estimate_build(source.layers, source.spec, config, layout, n,
                                  tokens_bound(task, task.train_examples(), config.batch_size))
        announce(estimate, layout, len(source.layers), config)
    shards, start = [], 0
    for i, count in enumerate(counts):
        shards.append(ShardEntry(shard_name(i), start, count))
        start += count
    manifest = ShardManifest(tuple(shards), ({"kind": "build", "start": 0, "count": n, "shards": [0, len(shards)],
                                              "finalized": False},))
    path.mkdir(parents=True, exist_ok=True)
    write_manifest(path, manifest)
    return {"manifest": manifest.to_dict(), "complete": False, "layout": layout.to_dict()}


def _check_resumable(path: Path, segment: dict, comm: Comm, n: int) -> None:
    """An unfinished segment (build or append) resumes only with its world size (a shard is one
    rank's) and its number of examples."""
    kind, shards = segment["kind"], segment["shards"][1] - segment["shards"][0]
    if shards != comm.world:
        raise SettingsMismatchError(f"index {path} has an unfinished {kind} of {shards} shards (one per rank): resume "
                                    f"it with {shards} ranks, not {comm.world}")
    if segment["count"] != n:
        raise SettingsMismatchError(f"index {path} has an unfinished {kind} of {segment['count']:,} examples; this "
                                    f"task has {n:,}: resume it with the same task")


def _started_layout(path: Path, manifest: ShardManifest) -> IndexLayout | None:
    """The layout of a started sharded index, from whichever of its shards rank 0 can see."""
    from ..store import IndexReader

    for entry in manifest.shards:
        if (path / entry.name / DATA_FILE).exists():
            with IndexReader(path / entry.name) as reader:
                return reader.layout
    return None


def _shard_record(entry: ShardEntry, position: int) -> dict:
    """A shard's place in the index, in its settings (checked against the manifest on every open)."""
    return {"number": position, "start": entry.start, "count": entry.count}


def _open_or_create(path: Path, entry: ShardEntry, position: int, layout: IndexLayout, settings: dict, view,
                    config: BuildConfig, source, kind: str) -> IndexWriter:
    """This rank's shard: created with its settings, or reopened and checked to be the same run."""
    shard_path = path / entry.name
    if not (shard_path / DATA_FILE).exists():
        estimate = estimate_build(source.layers, source.spec, config, layout, entry.count,
                                  tokens_bound(view, view.train_examples(), config.batch_size))
        check_fits(estimate, shard_path.parent, config, source.device)
        writer = IndexWriter.create(shard_path, layout, settings, durability=config.durability)
        try:
            store_check(writer, settings["segments"][0], segment_check(view, view.train_examples(), entry.count))
        except BaseException:
            writer.close()
            raise
        return writer
    writer = IndexWriter.open(shard_path, durability=config.durability)
    try:
        stored = writer.settings
        if stored.get("shard") != settings["shard"]:
            raise SettingsMismatchError(f"shard {shard_path} is for rows {stored.get('shard')}, not {settings['shard']}")
        mine = factor_key_of_index(settings["factors"])
        theirs = factor_key_of_index(stored["factors"])
        if theirs != mine:
            raise SettingsMismatchError(f"factor settings differ from the index's ({_diff(theirs, mine)})")
        if stored["fingerprint"] != source.fingerprint or stored["layers"] != settings["layers"]:
            raise SettingsMismatchError(f"the task's model differs from the one index {path} was built with "
                                        f"(fingerprint {source.fingerprint[:12]} vs {stored['fingerprint'][:12]})")
        segment = stored["segments"][-1]
        if segment["kind"] != kind or segment["count"] != entry.count:
            raise SettingsMismatchError(f"shard {shard_path} holds a {segment['kind']} of {segment['count']:,} rows, "
                                        f"not this {kind}'s {entry.count:,}")
        if writer.rows < entry.count:
            _check_resumed_segment(writer, segment, view, view.train_examples())
        else:
            mismatch = task_mismatch(writer, segment, view, view.train_examples(), entry.count)
            if mismatch:
                raise SettingsMismatchError(f"{mismatch}: index {path} holds a {kind} of other examples")
        return writer
    except BaseException:
        writer.close()
        raise


def _write_segment(comm: Comm, path: Path, manifest: ShardManifest, writers: dict[int, IndexWriter],
                   writer: IndexWriter, source, task, view, config: BuildConfig, progress: bool,
                   whiten_only: bool, t0: float) -> BuildResult:
    """Whiten (if needed), index this rank's rows into `writer`, check ids, finalize the curvature
    across the ranks. `writers` are all the shards this rank holds (by position), `writer` among them."""
    head = writers.get(0)
    ordered = [writers[p] for p in sorted(writers)]
    t_whiten = time.perf_counter()
    if config.projection_kind == "whitened":
        source.projections = ensure_whitening_sharded(comm, [writer], head if comm.root else None, source, task, config,
                                                      progress)
        # decided (and said) once: every shard stores the choice
        curvature = comm.on_root(lambda: _resolve_preconditioner(writer, config).curvature)
        config = replace(config, curvature=curvature)
        for shard in ordered:
            if shard.settings.get("curvature") != asdict(curvature):
                shard.update_settings(dict(shard.settings, curvature=asdict(curvature)))
    whiten_s = time.perf_counter() - t_whiten
    if whiten_only:
        return BuildResult(str(path), 0, 0, whiten_s, 0, whiten_seconds=whiten_s)
    segment = manifest.segments[-1]
    before = comm.sum_int(writer.rows)
    bar = GlobalProgress(comm, segment["kind"], total=segment["count"] - before, unit="ex", enabled=progress)
    try:
        statistic, written = comm.together(lambda: index_rows(writer, source, view, config, progress and comm.root, bar,
                                                              row_offset=manifest.shards[_position(writers, writer)].start))
    except BaseException:
        bar.close()
        raise
    bar.close(synced=True)
    comm.together(lambda: statistic.save(writer))
    duplicate = None
    if not writer.settings.get("allow_duplicate_ids"):
        duplicate = _duplicate(comm, manifest, writers)
    if duplicate is not None:
        _refuse_duplicate(comm, path, manifest, writers, writer, duplicate)
    pause = float(os.environ.get(PAUSE_BEFORE_FINALIZE_ENV) or 0)
    if pause > 0:
        time.sleep(pause)
    t_final = time.perf_counter()
    reduce_curvature(comm, head if comm.root else None, ordered, writer.layout, config.curvature, source.device,
                     config.budget(), progress and comm.root)
    comm.together(lambda: _set_last_segment(writer, finalized=True))
    comm.on_root(lambda: write_manifest(path, manifest.with_last_segment(finalized=True)))
    rows = comm.sum_int(sum(w.rows for w in ordered))
    new_rows = comm.sum_int(writer.rows) - before
    return BuildResult(str(path), rows, new_rows, time.perf_counter() - t0, comm.sum_int(written),
                       comm.sum_float(statistic.seconds) / comm.world, whiten_seconds=whiten_s,
                       finalize_seconds=time.perf_counter() - t_final)


def _position(writers: dict[int, IndexWriter], writer: IndexWriter) -> int:
    return next(p for p, w in writers.items() if w is writer)


def _duplicate(comm: Comm, manifest: ShardManifest, writers: dict[int, IndexWriter]):
    with ExitStack() as stack:
        sources = comm.together(lambda: [(manifest.shards[position].start, stack.enter_context(w.reader().snapshot()))
                                         for position, w in sorted(writers.items())])
        return first_duplicate(comm, sources)


def _refuse_duplicate(comm: Comm, path: Path, manifest: ShardManifest, writers, writer, duplicate) -> None:
    """A duplicate id refuses the segment; an append's new shards are withdrawn (the index is left as
    it was before it), a build's stay (its ids are the task's: fix them and use a new --index)."""
    name, row, earlier = duplicate
    segment = manifest.segments[-1]
    message = (f"example id {name!r} (row {row}) is already in the index at row {earlier}: ids must be unique "
               f"across shards (pass --allow-duplicate-ids to allow it)")
    if segment["kind"] == "append":
        comm.on_root(lambda: write_manifest(path, manifest.without_last_segment()))
        shard_path = writer.path
        writer.close()
        shutil.rmtree(shard_path)
        message += "; the append was withdrawn, the index is as it was"
    raise WriteRefusedError(message)


# ------------------------------------------------------------------------------------ append


def sharded_append(task, path: Path, config: BuildConfig, comm: Comm, progress: bool,
                   given: set[str] = frozenset(FACTOR_FIELDS)) -> BuildResult:
    t0 = time.perf_counter()
    config = _rank_budget(config, comm)
    plan = comm.on_root(lambda: _plan_append_head(path))
    manifest = ShardManifest.from_dict(plan["manifest"])
    stored = factor_key_of_index(plan["settings"]["factors"])
    config = replace(config, **{k: v for k, v in factor_options(stored).items() if k not in given},
                     curvature=CurvatureConfig(**plan["settings"]["curvature"]))
    config = _clamp_rank(config, [LayerInfo.from_dict(d) for d in plan["settings"]["layers"]],
                         stored_rank=stored.get("rank"))
    if config.factor_key() != stored:
        raise SettingsMismatchError(f"factor settings differ from the index's ({_diff(stored, config.factor_key())})")
    config = replace(config, curvature=config.curvature.resolved(config.projection_kind))
    check_sharded_curvature(config.curvature)
    device = comm.device_for(resolve_device(config.device))
    layers = [LayerInfo.from_dict(d) for d in plan["settings"]["layers"]]
    source, n = comm.together(lambda: (GradientSource.open(task, _spec(config), device, layers=layers),
                                       len(task.train_examples())))
    _same_everywhere(comm, n, source.fingerprint)
    if source.fingerprint != plan["settings"]["fingerprint"]:
        raise SettingsMismatchError(f"the task's model differs from the one index {path} was built with "
                                    f"(fingerprint {source.fingerprint[:12]} vs {plan['settings']['fingerprint'][:12]})")
    with ExitStack() as stack:
        writers: dict[int, IndexWriter] = {}
        stack.callback(lambda: [w.close() for w in writers.values()])
        manifest, resumed = _plan_append_segment(comm, path, manifest, task, n, writers)
        if manifest is None:
            if comm.root:
                notice(f"index {path}: the append of {n:,} rows is already complete; nothing to do")
            return BuildResult(str(path), resumed, 0, 0.0, 0)
        segment = manifest.segments[-1]
        position = segment["shards"][0] + comm.rank
        entry = manifest.shards[position]
        view = ShardTask(task, entry.start - segment["start"], entry.count)
        settings = dict(plan["settings"], segments=[{"kind": "append", "start": 0, "count": entry.count}],
                        nonfinite_rows=[], shard=_shard_record(entry, position),
                        allow_duplicate_ids=bool(plan["settings"].get("allow_duplicate_ids") or config.allow_duplicate_ids))
        layout = IndexLayout.from_dict(plan["layout"])
        writer = comm.together(lambda: _open_or_create(path, entry, position, layout, settings, view, config,
                                                         source, "append"))
        writers[position] = writer
        comm.together(lambda: _hold_old_shards(comm, path, manifest, writers, config))
        return _write_segment(comm, path, manifest, writers, writer, source, task, view, config, progress, False, t0)


def _plan_append_head(path: Path) -> dict:
    """Rank 0: the manifest, and the settings and layout that new shards copy from the head shard."""
    from ..store import IndexReader

    if not is_sharded(path):
        if (path / DATA_FILE).exists():
            raise _single_process_index(path, "append to")
        raise SettingsMismatchError(f"no index at {path} to append to")
    manifest = read_manifest(path)
    with IndexReader(path / manifest.shards[0].name) as head:
        settings = {k: v for k, v in head.settings.items() if k not in ("segments", "nonfinite_rows", "shard")}
        return {"manifest": manifest.to_dict(), "settings": settings, "layout": head.layout.to_dict()}


def _plan_append_segment(comm: Comm, path: Path, manifest: ShardManifest, task, n: int, writers: dict):
    """(manifest with the segment to write, None) for a new or resumed append; (None, rows) when the
    same append is complete already. Recognising the same data takes every rank: each checks the
    shards of the last segment it holds."""
    last = manifest.segments[-1]
    if not last.get("finalized"):
        if last["kind"] != "append":
            raise SettingsMismatchError(f"index {path} has an unfinished {last['kind']}: run `{last['kind']}` to resume it")
        _check_resumable(path, last, comm, n)
        return manifest, None
    if last["kind"] == "append" and last["count"] == n:
        same = comm.together(lambda: _holds_task(comm, path, manifest, last, task))
        if all(comm.gather(same)):
            return None, manifest.planned_rows
    new = manifest.with_segment({"kind": "append", "start": manifest.planned_rows, "count": n}, split_rows(n, comm.world))
    comm.on_root(lambda: write_manifest(path, new))
    return new, None


def _holds_task(comm: Comm, path: Path, manifest: ShardManifest, segment: dict, task) -> bool:
    """Whether the shards of `segment` that this rank holds hold the task's examples there (ids, and
    content digests of a sample: segments.task_mismatch)."""
    for position in manifest.segment_shards(segment):
        if not comm.owns(position):
            continue
        entry = manifest.shards[position]
        view = ShardTask(task, entry.start - segment["start"], entry.count)
        with IndexWriter.open(path / entry.name) as w:
            if task_mismatch(w, w.settings["segments"][-1], view, view.train_examples(), entry.count):
                return False
    return True


def _hold_old_shards(comm: Comm, path: Path, manifest: ShardManifest, writers: dict, config: BuildConfig) -> None:
    """The shards before this segment that this rank holds (their statistics enter the curvature)."""
    first = manifest.segments[-1]["shards"][0]
    for position in range(first):
        if comm.owns(position) and position not in writers:
            writers[position] = IndexWriter.open(path / manifest.shards[position].name, durability=config.durability)


# ------------------------------------------------------------------------------------ fit


def sharded_fit(path: Path, config: CurvatureConfig, comm: Comm, device, budget: int, progress: bool) -> dict:
    """Recompute the curvature of a sharded index from its shards' factors, across the ranks."""
    check_sharded_curvature(config)

    def plan():
        manifest = read_manifest(path)
        if not manifest.segments[-1].get("finalized"):
            last = manifest.segments[-1]
            raise ValueError(f"index {path} has an unfinished {last['kind']}: rerun it before `fit`")
        from ..store import IndexReader

        with IndexReader(path / manifest.shards[0].name) as head:
            resolved = config.resolved(factor_key_of_index(head.settings["factors"])["projection_kind"],
                                       tokens_per_example(_whitening_meta(head)))
        if resolved.preconditioner == "auto":
            raise ValueError(f"index {path} has no finished whitening pre-pass: rerun its build first")
        return manifest.to_dict(), asdict(resolved)

    manifest_dict, resolved = comm.on_root(plan)
    manifest = ShardManifest.from_dict(manifest_dict)
    config = CurvatureConfig(**resolved)
    dev = comm.device_for(resolve_device(device))
    with ExitStack() as stack:
        writers: dict[int, IndexWriter] = {}
        stack.callback(lambda: [w.close() for w in writers.values()])

        def open_mine():
            for position, entry in enumerate(manifest.shards):
                if comm.owns(position):
                    writers[position] = IndexWriter.open(path / entry.name)
                    w = writers[position]
                    w.update_settings(dict(w.settings, curvature=resolved))

        comm.together(open_mine)
        ordered = [writers[p] for p in sorted(writers)]
        layout = comm.on_root(lambda: writers[0].layout.to_dict())
        return reduce_curvature(comm, writers.get(0) if comm.root else None, ordered, IndexLayout.from_dict(layout),
                                config, dev, budget, progress and comm.root, fresh=config.preconditioner == "ekfac")


def _whitening_meta(reader):
    with reader.snapshot() as snap:
        return snap.state_meta(WHITENING_META)
