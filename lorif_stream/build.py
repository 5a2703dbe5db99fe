"""build / append: training examples -> rank-c factor blocks in the index (+ streaming sketches).

Pipeline (DESIGN §3): the producer (this thread) runs forward/backward with capture hooks,
factorizes on the device, rounds to the storage dtype, feeds the curvature sketches from those
rounded factors (the very values that are stored, so sketch replay from the index is exact) and
hands each block, copied to the host (pinned, async on CUDA), to the store's BlockSink: a bounded
queue into an encoder thread and a committer thread, so block n+1 encodes while block n commits,
with the new row count, in one transaction. The queue bounds memory and gives back-pressure; zstd,
numba and torch release the GIL so all stages overlap.

Both are one path for either layout of the index (one LMDB environment, or a manifest of shards
written by the ranks of a torchrun job) and any world (comm.py; one process: every collective the
identity): one opening of the segment to write (_open_for_write, over the index as stored:
store/placement.py StoredIndex), then one pipeline over a placement: whitening, rows, ids,
curvature, the segment record (_write_segment).

Both operations extend the index by one *segment* of rows (the build's, then one per append),
recorded in the index settings before the first row is written. An interrupted segment resumes
at its first uncommitted row, once the task is shown to hold the same examples there (segments.py:
the ids of the committed rows, digests of a sample of examples taken when the segment started). A rerun whose
rows are all committed only finishes the curvature step if that was interrupted (the segment is
marked `finalized` after it), else says the run is complete.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .capture import LayerInfo
from .comm import Comm, GlobalProgress, current
from .config import FACTOR_FIELDS, BuildConfig, CurvatureConfig, factor_key_of_index, factor_options
from .device import notice, resolve_device
from .estimate import announce, check_budget, check_fits, estimate_build, tokens_bound
from .factorize import factorize_layers
from .fit import CURVATURE_META, check_sharded_curvature, curvature_statistics, finalize_curvature
from .gradients import GradientSource, NonFiniteGradientError, describe_nonfinite
from .projection import ProjectionSpec
from .shard_ids import first_duplicate
from .store import IndexLayout, IndexReader, IndexWriter, WriteRefusedError
from .store.placement import Part, Placement, StoredIndex
from .store.sink import BlockSink
from .store.format import DATA_FILE, LMDB_LOCK_FILE, WRITER_LOCK_FILE
from .store.shards import write_manifest
from .segments import SEGMENT_CHECK_META, segment_check, store_check, stored_check, task_mismatch
from .task import load_task, resolve_task
from .task_check import PROBES_KEY, TaskMismatchError, check_options, task_record
from .task_view import ShardTask
from .whitening import WHITENING_META, ensure_whitening, tokens_per_example, whitened_layers

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TARGET_BLOCK_BYTES = 32 << 20  # fp32 bytes of one block of every layer
_SKETCH_CHECKPOINT_SECONDS = 300.0
# Tests only: seconds to hold still between the last committed row and the curvature step, so that a
# test can SIGKILL a real process in the window a rerun has to finish (tests/test_resume_safety.py).
PAUSE_BEFORE_FINALIZE_ENV = "LORIF_TEST_PAUSE_BEFORE_FINALIZE"


class SettingsMismatchError(ValueError):
    """A resume/append asked for settings that differ from the index's (names them)."""


@dataclass(frozen=True)
class BuildResult:
    index: str
    rows: int
    new_rows: int
    seconds: float
    bytes_written: int
    sketch_seconds: float = 0.0  # feeding the curvature statistics (sketches or EK-FAC sums) during the build
    whiten_seconds: float = 0.0  # the whitening pre-pass (0 when it was already done)
    finalize_seconds: float = 0.0  # catching up and finalizing the curvature after the last row


@dataclass
class _Opened:
    """An index opened for writing one segment, by whichever layout: what the write pipeline needs."""

    placement: Placement
    source: GradientSource
    view: object  # the task's rows of the own environment (the task itself for a single environment)
    config: BuildConfig
    started: float  # perf_counter when the command started its work (BuildResult.seconds)


# ------------------------------------------------------------------------------------ public


def build(task, index, config: BuildConfig | None = None, *, progress: bool = True, **options) -> BuildResult:
    """Index every training example of `task` into `index` (a directory), then fit the curvature.

    `task` is a Task object or a 'path/file.py:NAME' / 'module:NAME' spec. An existing index
    built with the same task and settings is resumed at its first uncommitted row; different
    settings raise SettingsMismatchError naming them. Options are the fields of BuildConfig.
    """
    return _build_or_whiten(_task(task), Path(index), _config(config, options), progress, whiten_only=False)


def whiten(task, index, config: BuildConfig | None = None, *, progress: bool = True, **options) -> BuildResult:
    """Run only the whitening pre-pass of a build into `index` (created, or resumed); a later
    `build` with the same settings continues from it. Options are the fields of BuildConfig."""
    config = _config(config, options)
    if config.projection_kind != "whitened":
        raise ValueError(f"whiten needs projection_kind='whitened', got {config.projection_kind!r}")
    return _build_or_whiten(_task(task), Path(index), config, progress, whiten_only=True)


def _build_or_whiten(task, path: Path, config: BuildConfig, progress: bool, whiten_only: bool) -> BuildResult:
    comm = current()
    opened = _open_for_write(comm, task, path, config, "build", progress=progress, whiten_only=whiten_only)
    return _write(comm, opened, task, progress, whiten_only)


def _write(comm: Comm, opened: "_Opened | BuildResult", task, progress: bool, whiten_only: bool) -> BuildResult:
    """The opened segment through the write pipeline (a BuildResult: the segment was complete already)."""
    if isinstance(opened, BuildResult):
        return opened
    with opened.placement:
        return _write_segment(comm, opened.placement, opened.source, task, opened.view, opened.config, progress,
                              whiten_only, opened.started)


def new_layout(source: GradientSource, config: BuildConfig) -> IndexLayout:
    """The layout of a new index (a sharded one's is decided once, by rank 0, for every shard)."""
    return IndexLayout(source.layout_layers(), c=config.rank, dtype=config.dtype,
                       block_size=config.block_size or _default_block_size(source, config), zstd_level=config.zstd_level)


def new_settings(task, source: GradientSource, config: BuildConfig, n: int) -> dict:
    """The settings of a new index whose build segment holds `n` rows (a shard's add its `shard` record)."""
    return {
        "factors": config.factor_key(),
        "layers": [l.to_dict() for l in source.layers],
        "fingerprint": source.fingerprint,
        "tracked_modules": getattr(task, "tracked_modules", None),
        "curvature": asdict(config.curvature),
        "allow_duplicate_ids": config.allow_duplicate_ids,
        "segments": [{"kind": "build", "start": 0, "count": n}],
        "nonfinite_rows": [],
        # how the task encodes examples, and a few to recompute: later commands check theirs against it
        **task_record(task, n),
    }


def _check_new_directory(path: Path) -> None:
    """A new index goes into a new or empty directory, never among files that are not an index's."""
    if not path.exists():
        return
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a directory: give a new or empty directory for the index")
    # an index's own files may be there: another build creating it right now (its writer.lock), or a
    # creation that stopped before the index was written
    others = sorted(p.name for p in path.iterdir() if p.name not in (DATA_FILE, LMDB_LOCK_FILE, WRITER_LOCK_FILE))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise FileExistsError(f"{path} is not empty and holds no lorif-stream index ({shown}): "
                              f"give a new or empty directory for the index")


def append(task, index, config: BuildConfig | None = None, *, progress: bool = True, **options) -> BuildResult:
    """Add the task's training examples as new rows after the index's existing ones.

    Uses the index's own projections and settings (the model, tracked layers, f, c and dtype must
    match); the sketches are updated and the curvature re-finalized. An interrupted append is
    resumed by running the same append again.
    """
    # factor settings the caller named must match the index; the others are the index's own
    given = set(FACTOR_FIELDS) if config is not None else set(options) & set(FACTOR_FIELDS)
    config = _config(config, options)
    task = _task(task)
    comm = current()
    # new rows go after the index's in its one environment, or into new shards, one per rank (of this
    # job, or this process)
    opened = _open_for_write(comm, task, Path(index), config, "append", given, progress)
    return _write(comm, opened, task, progress, whiten_only=False)


# ------------------------------------------------------------------------------------ setup


def _config(config: BuildConfig | None, options: dict) -> BuildConfig:
    if config is not None and options:
        raise TypeError("pass either a BuildConfig or keyword options, not both")
    if config is not None:
        return config
    curvature_fields = set(CurvatureConfig.__dataclass_fields__)
    curvature = {k: options.pop(k) for k in list(options) if k in curvature_fields}
    return BuildConfig(**options, curvature=CurvatureConfig(**curvature))


def _task(task):
    return resolve_task(load_task(task) if isinstance(task, str) else task)


def _spec(config: BuildConfig) -> ProjectionSpec:
    return ProjectionSpec.from_factors(config.factor_key())


def _train_len(task) -> int:
    return len(task.train_examples())


def _default_block_size(source: GradientSource, config: BuildConfig) -> int:
    per_row = 4 * config.rank * sum(l.d_in + l.d_out for l in source.layers)
    # four blocks live at once (being assembled, queued, encoding, in the encoder's scratch)
    target = min(_TARGET_BLOCK_BYTES, config.budget() // 8)
    return int(np.clip(target // per_row, 16, 16384))


def _diff(theirs, mine) -> str:
    if isinstance(theirs, dict) and isinstance(mine, dict):
        return ", ".join(f"{k}: index {theirs.get(k)!r} vs {mine.get(k)!r}" for k in sorted(set(theirs) | set(mine))
                         if theirs.get(k) != mine.get(k))
    return f"index {theirs!r} vs {mine!r}"


def _check_same(index_settings: dict, key: str, mine, what: str) -> None:
    theirs = index_settings.get(key)
    if theirs != mine:
        raise SettingsMismatchError(f"{what} differ from the index's ({_diff(theirs, mine)})")


def _clamp_rank(config: BuildConfig, layers, stored_rank: int | None = None) -> BuildConfig:
    """c above every layer's min(d_out, d_in) only stores zero columns: use the largest that any layer
    can fill (an index stored with a larger c before this clamp existed keeps its own)."""
    top = max(min(l.d_out, l.d_in) for l in layers)
    if config.rank <= top or config.rank == stored_rank:
        return config
    notice(f"rank {config.rank} is more than any tracked layer can use (the largest min(d_out, d_in) of the "
           f"projected layers is {top}): storing rank-{top} factors")
    return replace(config, rank=top)


def _open_source(comm: Comm, task, config: BuildConfig, layers: list[LayerInfo] | None = None):
    """The task's GradientSource on this rank's device (`layers`: an index's tracked layers) and its
    number of training examples; every rank must load the same task."""
    device = comm.device_for(resolve_device(config.device))
    source, n = comm.together(lambda: (GradientSource.open(task, _spec(config), device, layers=layers),
                                       _train_len(task)))
    _same_everywhere(comm, n, source.fingerprint)
    return source, n


def _index_layers(settings: dict) -> list[LayerInfo]:
    return [LayerInfo.from_dict(d) for d in settings["layers"]]


def _index_factors(config: BuildConfig, settings: dict, given) -> BuildConfig:
    """`config` with the index's factor settings for those not `given` (an append uses the index's
    own, whatever today's defaults; a build gives them all) and its rank clamped as the index's was;
    a given setting that differs from the index's is refused."""
    stored = factor_key_of_index(settings["factors"])
    config = replace(config, **{k: v for k, v in factor_options(stored).items() if k not in given})
    config = _clamp_rank(config, _index_layers(settings), stored_rank=stored.get("rank"))
    _check_same({"factors": stored}, "factors", config.factor_key(), "factor settings")
    return config


def _check_same_model(source: GradientSource, settings: dict, path) -> None:
    """The task's model is the index's: the same tracked layers (named where they differ), then the
    same weights (the fingerprint)."""
    layers = _other_layers(source, settings)
    if layers:
        raise SettingsMismatchError(f"the task's model tracks other layers than index {path} ({layers}): track the "
                                    f"index's (--modules / tracked_modules)")
    if source.fingerprint != settings["fingerprint"]:
        raise SettingsMismatchError(
            f"the task's model differs from the one index {path} was built with "
            f"(fingerprint {source.fingerprint[:12]} vs {settings['fingerprint'][:12]}): different weights, weight dtype or layers"
        )


def _other_layers(source: GradientSource, settings: dict) -> str | None:
    """Which tracked layers differ between the task's model and the index's, in a few words; None: none."""
    mine, theirs = {l.name: l.to_dict() for l in source.layers}, {l["name"]: l for l in settings["layers"]}
    if list(mine.values()) == settings["layers"]:
        return None
    said = [f"{', '.join(map(repr, names[:3]))}{' and more' if len(names) > 3 else ''} {where}" for names, where in (
        ([n for n in mine if n not in theirs], "only here"), ([n for n in theirs if n not in mine], "only in the index"),
        ([n for n in mine if n in theirs and mine[n] != theirs[n]], "of other sizes")) if names]
    return "; ".join(said) or "the same layers in another order"


def _say_curvature_is_kept(index: StoredIndex, config: BuildConfig) -> None:
    """Curvature options live with an index that has rows: name those of this command that differ."""
    kind = config.projection_kind
    tokens = tokens_per_example(index.meta.get(WHITENING_META))
    try:
        theirs = asdict(CurvatureConfig(**index.settings["curvature"]).resolved(kind, tokens))
        mine = asdict(config.curvature.resolved(kind, tokens))
    except (TypeError, ValueError):
        return
    if theirs != mine:
        notice(f"curvature options differ from index {index.path}'s ({_diff(theirs, mine)}): the index keeps its own; "
               f"change them with `lorif-stream fit --index {index.path}`")


def _finalized(index: StoredIndex, rows: int) -> bool:
    """Whether the curvature covers every row: the last segment's flag, or (a single environment killed
    between the curvature switch and the flag, or from before the flag) the curvature's own row count.
    A sharded index goes by its manifest's flag, which `fit` and its readers go by."""
    if index.last.get("finalized"):
        return True
    return not index.sharded and (index.meta.get(CURVATURE_META) or {}).get("rows") == rows


def _next_step(index, kind: str, last: dict, unfinished: bool, n: int, rows: int, other_examples) -> str:
    """What a build or append of `n` examples does with an index (of `rows` rows) whose last segment
    is `last`: "resume" it (`unfinished`: rows or the curvature step of it are still to do),
    "complete" (it is this command's own, done: a rerun) or "add" a new append segment; anything
    else is refused. `other_examples()` says how the finished segment's rows differ from the task's
    (None: they are its examples). Written once, so that a sharded index and one environment resume,
    recognise and refuse alike."""
    if unfinished:
        if last["kind"] != kind:
            raise SettingsMismatchError(f"index {index} has an unfinished {last['kind']}: run `{last['kind']}` to resume it")
        if last["count"] != n:
            raise SettingsMismatchError(f"index {index} has an unfinished {kind} of {last['count']:,} examples; this "
                                        f"task has {n:,}: resume it with the same task")
        return "resume"
    if kind == "build":
        if last["kind"] != "build" or last["count"] != n:
            raise SettingsMismatchError(f"index {index} already holds a complete build of {rows:,} rows; use `append` "
                                        f"to add examples or a new --index")
        mismatch = other_examples()
        if mismatch:
            raise SettingsMismatchError(f"{mismatch}: index {index} holds a complete build of other examples; use "
                                        f"`append` to add examples or a new --index")
        return "complete"
    # the same append again (rerun after a kill during its last step, or after it finished)
    if last["kind"] == "append" and last["count"] == n and other_examples() is None:
        return "complete"
    return "add"


def _check_resumed_segment(writer: IndexWriter, part: Part, segment: dict, task, examples) -> None:
    """An unfinished segment continues only with the examples it started with (as far as committed);
    a refusal names the index's rows (a shard numbers its own from 0)."""
    committed = writer.rows - segment["start"]
    mismatch = task_mismatch(writer, segment, task, examples, committed)
    if mismatch:
        raise SettingsMismatchError(f"{part.named(mismatch)}: index {part.index} holds an unfinished {segment['kind']} "
                                    f"of other examples; resume it with the task it started with, or use a new --index")
    # rows not committed yet may have changed (a fixed bad example): record what is indexed from now on
    check = segment_check(task, examples, segment["count"])
    if check != stored_check(writer, segment):
        meta = writer.get_state_meta(SEGMENT_CHECK_META) or {}
        store_check(writer, segment, check, keep=tuple(int(k) for k in meta))


# ------------------------------------------------------------------------------------ pipeline


def _to_host(tensors: list[torch.Tensor], device: torch.device):
    """Device -> host copies; on CUDA into pinned memory, asynchronously, with an event to wait on."""
    if device.type != "cuda":
        return [t.contiguous() for t in tensors], None
    host = []
    for t in tensors:
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        host.append(h)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _write_segment(comm: Comm, placement: Placement, source: GradientSource, task, view, config: BuildConfig,
                   progress: bool, whiten_only: bool, t0: float) -> BuildResult:
    """Whiten (if needed), index this rank's rows of the last segment into its own environment, check
    ids across shards, finalize the curvature across the ranks, record the segment finished. `view`
    is the task's rows of the own environment (the task itself for a single environment). Every rank
    calls it, with the same index: a single environment (one process) or this rank's shards."""
    try:
        return _whiten_index_finalize(comm, placement, source, task, view, config, progress, whiten_only, t0)
    except BaseException:
        placement.withdraw_empty_segment()
        raise


def _whiten_index_finalize(comm: Comm, placement: Placement, source: GradientSource, task, view, config: BuildConfig,
                           progress: bool, whiten_only: bool, t0: float) -> BuildResult:
    own = placement.own
    comm.together(lambda: check_budget(source.layers, source.spec, config,
                                       whitened_layers(own.get_state_meta(WHITENING_META))))
    t_whiten = time.perf_counter()
    if config.projection_kind == "whitened":
        source.projections = ensure_whitening(comm, placement, source, task, config, progress)
        config = _agree_preconditioner(comm, placement, config)
    whiten_s = time.perf_counter() - t_whiten
    if whiten_only:
        return BuildResult(str(placement.path), _index_rows_held(comm, placement), 0, whiten_s, 0, whiten_seconds=whiten_s)
    before = comm.sum_int(own.rows)
    written, sketch_seconds = _index_own_rows(comm, placement, source, view, config, progress)
    _check_ids_across_shards(comm, placement)
    pause = float(os.environ.get(PAUSE_BEFORE_FINALIZE_ENV) or 0)
    if pause > 0:
        time.sleep(pause)
    t_final = time.perf_counter()
    finalize_curvature(comm, placement, config.curvature, source.device, config.budget(), progress and comm.root)
    # after the curvature switch (a kill in between is recognised by the curvature's row count)
    comm.together(placement.finish_segment)
    comm.on_root(placement.record_finished)
    return BuildResult(str(placement.path), _index_rows_held(comm, placement), comm.sum_int(own.rows) - before,
                       time.perf_counter() - t0, written, sketch_seconds, whiten_seconds=whiten_s,
                       finalize_seconds=time.perf_counter() - t_final)


def _index_rows_held(comm: Comm, placement: Placement) -> int:
    """The rows of every environment the ranks hold (one process: the index's)."""
    return comm.sum_int(sum(w.rows for w in placement.held))


def _index_own_rows(comm: Comm, placement: Placement, source: GradientSource, view, config: BuildConfig,
                    progress: bool) -> tuple[int, float]:
    """Every rank's uncommitted rows of the segment into its own environment, under one progress bar,
    the statistic saved with them. Returns the bytes written and the seconds spent feeding the
    statistic (the ranks' mean)."""
    own = placement.own
    segment = own.settings["segments"][-1]
    bar = GlobalProgress(comm, segment["kind"], total=comm.sum_int(segment["start"] + segment["count"] - own.rows),
                         unit="ex", enabled=progress, detail=source.overhead_text)
    try:
        statistic, written = comm.together(lambda: index_rows(own, source, view, config, progress and comm.root, bar,
                                                              row_offset=placement.row_offset))
    except BaseException:
        bar.close()
        raise
    bar.close(synced=True)
    # saved: the curvature step reloads it within the memory budget
    comm.together(lambda: statistic.save(own))
    return comm.sum_int(written), comm.sum_float(statistic.seconds) / comm.world


def _check_ids_across_shards(comm: Comm, placement: Placement) -> None:
    """Each environment's LMDB refuses a duplicate among its own rows; shards are checked against
    each other here (shard_ids.py), unless the index allows duplicates."""
    if not placement.sharded or placement.own.settings.get("allow_duplicate_ids"):
        return
    duplicate = _duplicate(comm, placement)
    if duplicate is not None:
        _refuse_duplicate(comm, placement, duplicate)


def _agree_preconditioner(comm: Comm, placement: Placement, config: BuildConfig) -> BuildConfig:
    """`auto` resolved once, on rank 0 (which says so); every environment stores the choice."""
    curvature = comm.on_root(lambda: _resolve_preconditioner(placement.own, config).curvature)

    def store():
        for env in placement.held:  # rank 0's own stored it as it resolved it
            if not (comm.root and env is placement.own) and env.settings.get("curvature") != asdict(curvature):
                env.update_settings(dict(env.settings, curvature=asdict(curvature)))

    comm.together(store)
    return replace(config, curvature=curvature)


def _resolve_preconditioner(writer: IndexWriter, config: BuildConfig) -> BuildConfig:
    """`auto` becomes ekfac or none once the pre-pass has counted tokens; the index stores the choice."""
    tokens = tokens_per_example(writer.get_state_meta(WHITENING_META))
    curvature = config.curvature.resolved(config.projection_kind, tokens)
    if curvature != config.curvature:
        writer.update_settings(dict(writer.settings, curvature=asdict(curvature)))
        notice(f"preconditioner auto -> {curvature.preconditioner} ({tokens:.1f} tokens per example in the "
               f"whitening sample: {'sequence' if tokens > 1 else 'one-token'} data)")
    return replace(config, curvature=curvature)


def _duplicate(comm: Comm, placement: Placement):
    """The first id held twice across the shards (this segment's rows against every held shard's)."""
    with ExitStack() as stack:
        sources = comm.together(lambda: [(placement.manifest.shards[position].start,
                                          stack.enter_context(w.reader().snapshot()))
                                         for position, w in sorted(placement.writers.items())])
        return first_duplicate(comm, sources)


def _refuse_duplicate(comm: Comm, placement: Placement, duplicate) -> None:
    """A duplicate id refuses the segment; an append's new shards are withdrawn (the index is left as
    it was before it), a build's stay (its ids are the task's: fix them and use a new --index)."""
    name, row, earlier = duplicate
    message = (f"example id {name!r} (row {row}) is already in the index at row {earlier}: ids must be unique "
               f"across shards (pass --allow-duplicate-ids to allow it)")
    if placement.manifest.segments[-1]["kind"] == "append":
        comm.on_root(lambda: write_manifest(placement.path, placement.manifest.without_last_segment()))
        placement.own.close()
        shutil.rmtree(placement.own.path)
        message += "; the append was withdrawn, the index is as it was"
    raise WriteRefusedError(message)


def index_rows(writer: IndexWriter, source: GradientSource, task, config: BuildConfig, progress: bool, bar,
               row_offset: int = 0):
    """Index the rows of the writer's last segment that are not committed yet, feeding the curvature
    statistic (caught up first); `bar.update(rows, nbytes=...)` hears of every commit. Returns the
    statistic (not saved, not finalized) and the bytes written. `row_offset` is the index's number
    of the writer's row 0 (a shard's first row), for the rows that messages name."""
    segment = writer.settings["segments"][-1]
    start_row = writer.rows
    end_row = segment["start"] + segment["count"]
    examples = task.train_examples()
    sketches = curvature_statistics(writer, source.device, config.curvature, config.budget())
    sketches.catch_up(writer, progress=progress)
    block_size = writer.layout.block_size
    storage = _TORCH_DTYPES[writer.layout.dtype]
    nonfinite: list[int] = []
    # With skip_nonfinite, rows are held back (as ids only: their factors are zeros) while every row of
    # the segment so far is non-finite, so that a segment with no finite row at all is refused with
    # nothing written, not stored as an all-zero index.
    held_back: list[str] | None = [] if config.skip_nonfinite and start_row == segment["start"] else None
    committer = BlockSink(writer, allow_duplicate_ids=bool(writer.settings.get("allow_duplicate_ids")),
                          on_commit=lambda block: bar.update(block.rows, nbytes=block.nbytes))
    pending: list[tuple[list[torch.Tensor], list[torch.Tensor], list[str]]] = []
    pending_rows = 0
    block_first = start_row
    last_checkpoint = time.perf_counter()

    def emit() -> None:
        nonlocal pending, pending_rows, block_first
        if not pending_rows:
            return
        n_layers = len(source.layers)
        ids = [i for p in pending for i in p[2]]
        Ls = [_stored(torch.cat([p[0][l] for p in pending]), storage, ids) for l in range(n_layers)]
        Rs = [_stored(torch.cat([p[1][l] for p in pending]), storage) for l in range(n_layers)]
        # the statistic sees the stored values, so that a resumed build (which catches up from the
        # stored rows) fits the curvature a build run in one go fits
        sketches.update(Ls, Rs)
        host, ready = _to_host([t for pair in zip(Ls, Rs) for t in pair], source.device)
        committer.put(block_first, [(L.numpy(), R.numpy()) for L, R in zip(host[0::2], host[1::2])], ids, ready)
        block_first += pending_rows
        pending, pending_rows = [], 0

    def add(grads: list[torch.Tensor], ids: list[str]) -> None:
        nonlocal pending_rows
        _add(pending, grads, ids, config.rank)
        pending_rows += len(ids)
        if pending_rows >= block_size:
            emit()

    def release_held_back() -> None:
        # the zero rows go in as the batches they were, exactly as if they had never been held
        nonlocal held_back
        for b0 in range(0, len(held_back), config.batch_size):
            ids = held_back[b0:b0 + config.batch_size]
            add([torch.zeros(len(ids), l.d_out, l.d_in, device=source.device) for l in source.layers], ids)
        held_back = None

    def take(grads: list[torch.Tensor], finite: torch.Tensor, ids: list[str], rows: list[int]) -> None:
        """One batch's verdict (a host sync on a GPU) and, when it passes, its rows."""
        nonlocal pending_rows
        if not bool(finite.all()):
            if not config.skip_nonfinite:
                ok = int(torch.nonzero(~finite)[0])
                # commit everything before the culprit, so the error leaves a clean resume point
                if ok:
                    _add(pending, [G[:ok] for G in grads], ids[:ok], config.rank)
                    pending_rows += ok
                emit()
                committer.drain()
                kept = (f"rows {row_offset}..{row_offset + block_first - 1} are committed and valid"
                        if block_first else "no rows are committed yet")
                raise NonFiniteGradientError(
                    f"{describe_nonfinite(ids, [row_offset + r for r in rows], finite)}; {kept} "
                    f"(rerun with --skip-nonfinite to store zero factors for such examples)"
                )
            nonfinite.extend(r for r, ok in zip(rows, finite.tolist()) if not ok)
            if held_back is not None and not bool(finite.any()):
                held_back.extend(ids)
                return
            grads = [torch.where(finite.view(-1, 1, 1), torch.nan_to_num(G), torch.zeros_like(G)) for G in grads]
        if held_back is not None:
            release_held_back()
        add(grads, ids)

    # On CUDA a batch's verdict is taken once the next batch's forward and backward are queued, so
    # that the GPU is not left idle while the host waits for it; batches are still stored in order,
    # each after its own verdict. On the CPU there is nothing to overlap: each batch at once.
    lookahead = source.device.type == "cuda"
    waiting = None
    try:
        with source.capture() as capture:
            for batch_start in range(start_row, end_row, config.batch_size):
                batch_end = min(batch_start + config.batch_size, end_row)
                rows = list(range(batch_start, batch_end))
                offsets = [r - segment["start"] for r in rows]
                batch_examples = [examples[i] for i in offsets]
                ids = [str(task.example_id(ex, i)) for ex, i in zip(batch_examples, offsets)]
                grads, finite = source.projected_gradients(capture, batch_examples, ids, "loss")
                batch = (grads, finite, ids, rows)
                if lookahead:
                    batch, waiting = waiting, batch
                if batch is not None:
                    take(*batch)
                if time.perf_counter() - last_checkpoint > _SKETCH_CHECKPOINT_SECONDS:
                    emit()
                    committer.drain()
                    sketches.save(writer)
                    last_checkpoint = time.perf_counter()
            if waiting is not None:
                take(*waiting)
            if held_back:
                raise NonFiniteGradientError(
                    f"every one of the {segment['count']:,} examples of this {segment['kind']} has a non-finite loss "
                    f"or gradient (the first: {held_back[0]!r}, row {row_offset + segment['start']}); nothing was stored: "
                    f"check the model and the loss (--skip-nonfinite is for a few bad examples)"
                )
            emit()
        committer.drain()
    finally:
        committer.close()
        # only rows that were committed: a row stored later is recorded by the run that stores it
        nonfinite = [r for r in nonfinite if r < writer.rows]
        if nonfinite:
            s = dict(writer.settings)
            s["nonfinite_rows"] = sorted(set(s.get("nonfinite_rows", [])) | set(nonfinite))
            writer.update_settings(s)
            notice(f"{len(nonfinite)} example(s) had non-finite gradients and were stored as zeros "
                   f"(rows {[row_offset + r for r in s['nonfinite_rows'][:10]]}"
                   f"{'...' if len(s['nonfinite_rows']) > 10 else ''})")
    committer.check()
    return sketches, committer.bytes_written


def _add(pending: list, grads: list[torch.Tensor], ids: list[str], c: int) -> None:
    """Factorize one batch and keep its fp32 factors until its block is emitted."""
    factors = factorize_layers(grads, c)
    pending.append(([L for L, _ in factors], [R for _, R in factors], ids))


def _stored(factor: torch.Tensor, storage: torch.dtype, ids: list[str] | None = None) -> torch.Tensor:
    """A block's factors rounded to the storage dtype (once per block, not per batch: on a small
    model each call is a cost), back in fp32 for the statistic. `ids`: check L's fp16 range."""
    if ids is not None and storage == torch.float16:
        _check_fp16_range(factor, ids)
    return factor.to(storage).float()


def _check_fp16_range(L: torch.Tensor, ids: list[str]) -> None:
    """L holds the singular values: past fp16's largest finite value it would be stored as inf."""
    peak = L.abs().flatten(1).amax(dim=1)
    over = torch.nonzero(peak > float(torch.finfo(torch.float16).max)).flatten().tolist()
    if over:
        b = over[0]
        raise ValueError(f"fp16 storage overflow: example {ids[b]!r} has a factor value of {float(peak[b]):.4g}, beyond "
                         f"fp16's largest 65,504; build the index with --dtype bf16 (fp32's range, 8-bit mantissa) "
                         f"or --dtype fp32")


# ------------------------------------------------------------------------------------ opening
# One opening for either layout (store/placement.py StoredIndex) and any world. A rank opens only the
# environments it writes or holds (shard s is rank s % world's), so shards may sit on node-local disks.


def _open_for_write(comm: Comm, task, path: Path, config: BuildConfig, kind: str,
                    given: set[str] = frozenset(FACTOR_FIELDS), progress: bool = True,
                    whiten_only: bool = False) -> "_Opened | BuildResult":
    """This rank's environment of the segment that a build or an append (`kind`) writes into the
    index at `path`, with what the write pipeline needs; a BuildResult when nothing is left to do.
    `given`: the factor settings the command named (an append takes the index's for the others)."""
    started = time.perf_counter()
    config = _rank_budget(config, comm)
    index = comm.on_root(lambda: _read_index(comm, path, kind))
    if index is not None:
        comm.together(lambda: _refuse_if_being_written(comm, index))
    if kind == "append":  # the index's factor settings and layers: its model is opened with them
        config = _index_factors(config, index.settings, given)
    source, n = _open_source(comm, task, config, _index_layers(index.settings) if kind == "append" else None)
    if kind == "build" and n == 0:
        raise ValueError("the task has no training examples (train_examples() is empty)")
    rows = 0 if index is None else comm.sum_int(comm.together(lambda: index.rows_held(comm.owns)))
    if kind == "build" and index is not None and not rows and _recreated(comm, index, source, config, n):
        index = None
    if index is None:  # a new index: one environment, or (torchrun) one shard per rank, laid out by rank 0
        config = _clamp_rank(config, source.layers)
        layout = IndexLayout.from_dict(comm.on_root(lambda: new_layout(source, config).to_dict()))
        index = StoredIndex.new(path, {"kind": "build", "start": 0, "count": n}, comm.world if comm.active else None,
                                layout)
        step = "add"
    else:
        # an append adopted the index's factor settings before opening its model; a build is checked
        # against them only now, once its index is known not to be re-created
        if kind == "build":
            config = _index_factors(config, index.settings, given)
        _check_same_model(source, index.settings, path)
        if kind == "build" and rows:  # curvature settings live with an index that has rows (change them with `fit`)
            comm.on_root(lambda: _say_curvature_is_kept(index, config))
        if kind == "append" or rows:  # else nothing is fitted yet (a failed start, or `whiten`): the command's apply
            config = replace(config, curvature=CurvatureConfig(**index.settings["curvature"]).resolved(
                config.projection_kind))
        check_options(index.settings, task, path, kind)
        comm.together(lambda: _check_held(comm, index, source, task, config, kind, n))
        unfinished = not index.last.get("finalized") and rows < index.planned_rows
        step = _next_step(path, kind, index.last, unfinished, n, rows, lambda: _other_examples(comm, index, task))
        if step == "complete" and (whiten_only or _finalized(index, rows)):
            # `whiten` on an index with rows: its pre-pass is done, nothing else is asked
            if comm.root and not whiten_only:
                notice(f"index {path}: the {index.last['kind']} of {n:,} rows is already complete (rows {index.last['start']:,}.."
                       f"{index.planned_rows - 1:,}); nothing to do")
            return BuildResult(str(path), rows, 0, 0.0, 0)
        if step == "add" and n == 0:
            raise ValueError("the task has no training examples to append")
        if step == "add":
            index = index.with_segment({"kind": "append", "start": index.planned_rows, "count": n}, comm.world)
        elif len(index.parts()) != comm.world:  # an unfinished segment's shards are one rank's each
            raise SettingsMismatchError(f"index {path} has an unfinished {index.last['kind']} of {len(index.parts())} "
                                        f"shards (one per rank): resume it with {len(index.parts())} ranks, not "
                                        f"{comm.world}")
        if step == "complete" and comm.root:
            notice(f"index {path}: every row of the {index.last['kind']} of {n:,} rows is committed but its curvature was not "
                   f"finalized (interrupted): finishing it")
    if index.sharded:
        check_sharded_curvature(config.curvature)
    if step == "add":  # refused before anything is written, else recorded (a manifest: with its shards)
        _check_plan(comm, index, task, source, config, progress,
                    whitened_layers(index.meta.get(WHITENING_META)))
        comm.on_root(index.record)
    return _open_own_part(comm, index, task, source, config, step, started, fresh=kind == "build" and not rows)


def _refuse_if_being_written(comm: Comm, index: StoredIndex) -> None:
    """The decision below reads the index as stored: one that another process is writing now would be
    judged mid-write (an append during a build would be told to "run `build`"). Say it is busy instead;
    the removal of an index with no rows takes the locks again and holds them (_recreated)."""
    with ExitStack() as stack:
        index.lock(comm.owns, stack)


def _read_index(comm: Comm, path: Path, kind: str) -> StoredIndex | None:
    """Rank 0: the index at `path` as its opening needs it; None where a new one goes (a new or empty
    directory). A torchrun job writes shards: it refuses a single environment, which has one writer."""
    index = StoredIndex.read(path, (WHITENING_META, CURVATURE_META), must_exist=kind == "append")
    if index is None:
        _check_new_directory(path)
    elif kind == "append" and not index.settings:  # a sharded build stopped before creating its shards
        raise SettingsMismatchError(f"index {path} has an unfinished build: run `build` to resume it")
    elif comm.active and not index.sharded:
        what = "append to" if kind == "append" else "resume or extend"
        raise SettingsMismatchError(f"index {path} was written by a single process (one LMDB environment, not "
                                    f"shards): {what} it without torchrun, or build a sharded index into a new --index")
    return index


def _recreated(comm: Comm, index: StoredIndex, source: GradientSource, config: BuildConfig, n: int) -> bool:
    """Whether an index with no rows (its build stopped before the first, at most a whitening pre-pass
    made) was removed for this build, which differs from it: refusing would leave a directory no
    corrected rerun can use. Only the ranks that wrote shards can tell that none holds a row (a shard
    may sit on another node's disk): another world size is refused, naming the directory to remove."""
    if len(index.segments) != 1 or index.last["kind"] != "build":
        return False
    changed = _changed_since_started(index, source, _clamp_rank(config, source.layers), n)
    if changed is None:
        return False
    if len(index.parts()) != comm.world:
        raise SettingsMismatchError(f"index {index.path} has no rows yet and {changed}, but {len(index.parts())} "
                                    f"ranks started it, not {comm.world}: remove {index.path} to build it anew")
    with ExitStack() as locked:
        # no row does not mean stopped: every rank's environments are removed only if no one writes them
        comm.together(lambda: index.lock(comm.owns, locked))
        if comm.root:
            notice(f"index {index.path} has no rows yet (its build stopped before the first row) and {changed}: "
                   f"re-creating it with this command's settings")
        comm.together(lambda: index.remove(comm.owns))
    return True


def _changed_since_started(index: StoredIndex, source: GradientSource, config: BuildConfig, n: int) -> str | None:
    """What differs between an index with no rows and this build (settings, model, tracked layers,
    number of examples), or None."""
    settings = index.settings
    if not settings:
        return "none of its shards was created"
    stored = factor_key_of_index(settings["factors"])
    if stored != config.factor_key():
        return f"its settings differ ({_diff(stored, config.factor_key())})"
    layers = _other_layers(source, settings)
    if layers:
        return f"the task's model tracks other layers ({layers})"
    if source.fingerprint != settings["fingerprint"]:
        return "the task's model differs from the one it was started with"
    if n != index.last["count"]:
        return f"the task has {n:,} examples, not the {index.last['count']:,} it was started with"
    return None


def _check_held(comm: Comm, index: StoredIndex, source: GradientSource, task, config: BuildConfig, kind: str,
                n: int) -> None:
    """Rows added with another encoding, model or factor settings than the stored ones' would be scored
    silently wrong: each environment of the index that this rank holds must be the index's (a shard's
    place in it), hold the command's factor settings and model, and be reproduced by the task on a
    few of its rows (the recorded probe examples, or the task's own examples where they are its rows:
    task_check.py). An error names the environment and the index's row, in one line."""
    from .task_check import check_gradients
    from .whitening import load_projections

    for part in index.all_parts():
        if not (comm.owns(part.position) and part.exists):
            continue
        rerun = part in index.parts() and n == index.last["count"]  # then the task's examples are its rows
        with IndexReader(part.path) as reader, reader.snapshot() as snap:
            settings = reader.settings
            if settings.get("shard") != part.shard_record:
                raise SettingsMismatchError(f"shard {part.path} is for rows {settings.get('shard')}, not "
                                            f"{part.shard_record}")
            _check_same({"factors": factor_key_of_index(settings["factors"])}, "factors", config.factor_key(),
                        "factor settings")
            _check_same_model(source, settings, index.path)
            if not snap.rows:
                continue
            if settings.get(PROBES_KEY):  # the index's rows (every shard copies the head's record): this one's
                settings = dict(settings, **{PROBES_KEY: part.own_rows(settings[PROBES_KEY])})
            saved = source.projections
            try:
                if factor_key_of_index(settings["factors"]).get("projection_kind") == "whitened":
                    source.projections = load_projections(snap.array, source.layers, source.spec, source.device)
                check_gradients(_rows_of(task, part) if rerun else task, source, snap, settings, index.path, kind,
                                quiet_if_unchecked=True)
            except TaskMismatchError as e:
                raise (e if part.whole else TaskMismatchError(part.named(str(e)))) from None
            finally:
                source.projections = saved


def _other_examples(comm: Comm, index: StoredIndex, task) -> str | None:
    """How the rows of the index's last segment differ from the task's examples (ids, and content
    digests of a sample: segments.task_mismatch), as the first rank holding a differing environment
    says; None: they are its examples. Every rank checks the environments of the segment it holds."""
    def held() -> str | None:
        for part in index.parts():
            if comm.owns(part.position):
                view = _rows_of(task, part)
                with IndexWriter.open(part.path) as writer:
                    mismatch = task_mismatch(writer, writer.settings["segments"][-1], view, view.train_examples(),
                                             part.count)
                if mismatch:
                    return part.named(mismatch)
        return None

    return next((m for m in comm.gather(comm.together(held)) if m), None)


def _check_plan(comm: Comm, index: StoredIndex, task, source: GradientSource, config: BuildConfig, progress: bool,
                whitened: frozenset[str] | set[str] = frozenset()) -> None:
    """Refuse, before any work, a new segment that the memory budget, the GPU or the disk cannot hold
    (estimate.py: each rank for its environment); else announce the segment's estimate."""
    part = index.parts()[comm.rank]

    def estimate(task, n: int):
        return estimate_build(source.layers, source.spec, config, index.layout, n,
                              tokens_bound(task, task.train_examples(), config.batch_size), whitened)

    def check() -> object:
        check_budget(source.layers, source.spec, config, whitened)
        mine = estimate(_rows_of(task, part), part.count)
        check_fits(mine, index.path, config, source.device)
        return mine

    mine = comm.together(check)
    if progress and comm.root:
        announce(mine if part.whole else estimate(task, index.last["count"]), index.layout, len(source.layers), config)


def _open_own_part(comm: Comm, index: StoredIndex, task, source: GradientSource, config: BuildConfig, step: str,
                   started: float, fresh: bool = False) -> _Opened:
    """This rank's environment of the last segment, created or reopened, in a placement with the
    environments of the earlier segments it holds (their statistics enter the curvature)."""
    part = index.parts()[comm.rank]
    view = _rows_of(task, part)
    placement = Placement(index.path, index.manifest)

    def open_own() -> None:
        placement.own = placement.writers[part.position] = _open_or_create(index, part, view, task, source, config,
                                                                          step, fresh)

    try:
        # in the placement as soon as it opens: when another rank fails, this one's is closed below (a
        # writer left open keeps the environment locked for the process's next command)
        comm.together(open_own)
        comm.together(lambda: placement.hold([p.position for p in index.older_parts()], comm.owns,
                                             config.durability))
    except BaseException:
        placement.close()
        raise
    return _Opened(placement, source, view, config, started)


def _open_or_create(index: StoredIndex, part: Part, view, task, source: GradientSource, config: BuildConfig,
                    step: str, fresh: bool) -> IndexWriter:
    """`part` created, or reopened (checked: _check_held) to continue its segment, with the digests of
    the examples it indexes (segments.py); one whose rows end where the segment starts (a single
    environment's append) records it first. `fresh`: no row yet, the command's curvature applies."""
    writer = (IndexWriter.open(part.path, durability=config.durability) if part.exists else
              IndexWriter.create(part.path, index.layout, _new_part_settings(index, part, task, source, config),
                                 durability=config.durability))
    try:
        segment = writer.settings["segments"][-1]
        if segment["start"] + segment["count"] == part.segment["start"] and part.segment["kind"] == "append":
            _start_segment(writer, part.segment, view, config)
        elif {k: segment[k] for k in ("kind", "start", "count")} != part.segment:
            raise SettingsMismatchError(f"{writer.path} holds a {segment['kind']} of {segment['count']:,} rows, not "
                                        f"this {part.segment['kind']}'s {part.count:,}")
        elif writer.rows < part.segment["start"] + part.count:
            _check_resumed_segment(writer, part, segment, view, view.train_examples())
        elif step == "resume":  # complete, in a segment that other environments resume
            mismatch = task_mismatch(writer, segment, view, view.train_examples(), part.count)
            if mismatch:
                raise SettingsMismatchError(f"{part.named(mismatch)}: index {index.path} holds a {segment['kind']} "
                                            f"of other examples")
        if fresh and writer.settings.get("curvature") != asdict(config.curvature):
            writer.update_settings(dict(writer.settings, curvature=asdict(config.curvature)))
        return writer
    except BaseException:
        writer.close()
        raise


def _new_part_settings(index: StoredIndex, part: Part, task, source: GradientSource, config: BuildConfig) -> dict:
    """A new environment's settings: a build's from the command; an append's new shard copies the
    index's, with its own segment. A shard's also say its place in the index."""
    if part.segment["kind"] == "build":
        settings = new_settings(task, source, config, part.count)
    else:
        settings = dict(index.settings, segments=[part.segment], nonfinite_rows=[],
                        allow_duplicate_ids=bool(index.settings.get("allow_duplicate_ids") or config.allow_duplicate_ids))
    return settings if part.whole else dict(settings, shard=part.shard_record)


def _start_segment(writer: IndexWriter, segment: dict, task, config: BuildConfig) -> None:
    """An append's segment recorded in the environment that holds the earlier ones, before its first
    row, after the content digests it is recognised by (segments.py)."""
    settings = writer.settings
    store_check(writer, segment, segment_check(task, task.train_examples(), segment["count"]),
                keep=(settings["segments"][-1]["start"],))
    settings = dict(settings, segments=settings["segments"] + [segment])
    settings["allow_duplicate_ids"] = settings.get("allow_duplicate_ids") or config.allow_duplicate_ids
    writer.update_settings(settings)


def _rows_of(task, part: Part):
    """The task's examples that `part` holds: a view of their run (a single environment: the task)."""
    return task if part.whole else ShardTask(task, part.first, part.count)


def _rank_budget(config: BuildConfig, comm: Comm) -> BuildConfig:
    """The default budget (half the RAM) is the node's: its ranks share it. The smallest rank's is
    every rank's, so that all plan the same passes (whitening groups), hence the same collectives.
    (One process keeps its own, read again as it is needed.)"""
    if not comm.active:
        return config
    budget = config.budget() if config.memory_budget is not None else max(config.budget() // comm.local_world, 1)
    return replace(config, memory_budget=min(comm.gather(budget)))


def _same_everywhere(comm: Comm, n: int, fingerprint: str) -> None:
    seen = comm.gather((n, fingerprint))
    for rank, (n_r, f_r) in enumerate(seen):
        if (n_r, f_r) != seen[0]:
            raise ValueError(f"rank {rank} loaded {n_r:,} training examples and model {f_r[:12]}, rank 0 "
                             f"{seen[0][0]:,} and {seen[0][1][:12]}: every rank must load the same task")
