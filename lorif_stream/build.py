"""build / append: training examples -> rank-c factor blocks in the index (+ streaming sketches).

Pipeline (DESIGN §3): the producer (this thread) runs forward/backward with capture hooks,
factorizes on the device, rounds to the storage dtype, feeds the curvature sketches from those
rounded factors (the very values that are stored, so sketch replay from the index is exact) and
hands each block, copied to the host (pinned, async on CUDA), to the store's BlockSink: a bounded
queue into an encoder thread and a committer thread, so block n+1 encodes while block n commits,
with the new row count, in one transaction. The queue bounds memory and gives back-pressure; zstd,
numba and torch release the GIL so all stages overlap.

Opening the index differs by its layout: one environment is created, resumed or extended in place;
a shard directory is planned by rank 0 and each rank opens its own shard. Everything after is one
pipeline over a placement (store/placement.py) and a communicator (comm.py; one process: every
collective the identity): whitening, rows, ids, curvature, the segment record (_write_segment).

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
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .capture import LayerInfo
from .comm import LOCAL, Comm, GlobalProgress, current
from .config import FACTOR_FIELDS, BuildConfig, CurvatureConfig, factor_key_of_index, factor_options
from .device import notice, resolve_device
from .estimate import InsufficientDiskError, announce, check_budget, check_fits, estimate_build, tokens_bound
from .factorize import factorize_layers
from .fit import CURVATURE_META, check_sharded_curvature, curvature_statistics, finalize_curvature
from .gradients import GradientSource, NonFiniteGradientError, describe_nonfinite
from .projection import ProjectionSpec
from .shard_ids import first_duplicate
from .store import IndexLayout, IndexReader, IndexWriter, WriteRefusedError
from .store.placement import Placement
from .store.sink import BlockSink
from .store.format import DATA_FILE, LMDB_LOCK_FILE, WRITER_LOCK_FILE
from .store.shards import (ShardEntry, ShardManifest, is_sharded, read_manifest, shard_message, shard_name, split_rows,
                           write_manifest)
from .segments import SEGMENT_CHECK_META, segment_check, store_check, stored_check, task_mismatch
from .task import load_task, resolve_task
from .task_check import PROBES_KEY, TaskMismatchError, check_options, task_record
from .task_view import ShardTask
from .whitening import WHITENING_META, ensure_whitening, tokens_per_example

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
    """Open the index for the build's segment by its layout (a torchrun job, or a rerun on a sharded
    index: shards; a plain process: one environment), then the one write pipeline."""
    comm = current()
    if comm.active or is_sharded(path):
        opened = _open_shards_for_build(task, path, config, comm, progress)
    else:
        opened = _open_environment_for_build(task, path, config, progress, whiten_only)
    return _write(comm, opened, task, progress, whiten_only)


def _write(comm: Comm, opened: "_Opened | BuildResult", task, progress: bool, whiten_only: bool) -> BuildResult:
    """The opened segment through the write pipeline (a BuildResult: the segment was complete already)."""
    if isinstance(opened, BuildResult):
        return opened
    with opened.placement:
        return _write_segment(comm, opened.placement, opened.source, task, opened.view, opened.config, progress,
                              whiten_only, opened.started)


def _open_environment_for_build(task, path: Path, config: BuildConfig, progress: bool,
                                whiten_only: bool) -> "_Opened | BuildResult":
    source = None
    if (path / DATA_FILE).exists():
        writer = IndexWriter.open(path, durability=config.durability)
        try:
            changed, source = _changed_empty_build(writer, task, config)
        except BaseException:
            writer.close()
            raise
        if changed is None:
            return _resume_or_extend(writer, task, config, progress, kind="build", whiten_only=whiten_only,
                                     source=source)
        # the old build holds no row, at most a whitening pre-pass made for other settings, model or
        # data: refusing would leave the user a directory that no corrected rerun can use
        writer.close()
        notice(f"index {path} has no rows yet (its build stopped before the first row) and {changed}: "
               f"re-creating it with this command's settings")
        for name in (DATA_FILE, LMDB_LOCK_FILE):
            (path / name).unlink(missing_ok=True)
    else:
        _check_new_directory(path)
    if source is None:
        source, _ = _open_source(LOCAL, task, config)
    config = _clamp_rank(config, source.layers)
    examples = task.train_examples()
    n = len(examples)
    if n == 0:
        raise ValueError("the task has no training examples (train_examples() is empty)")
    # everything that can refuse the build does so before the index exists
    layout = new_layout(source, config)
    check_plan(path, source, task, examples, config, layout, n, progress)
    writer = _create_environment(path, layout, new_settings(task, source, config, n), task, config)
    return _opened_environment(writer, source, task, config)


def _create_environment(path: Path, layout: IndexLayout, settings: dict, task, config: BuildConfig) -> IndexWriter:
    """A new environment (an index, or a shard of one) whose first segment holds `task`'s examples,
    with the content digests that later reruns are checked against (segments.py)."""
    writer = IndexWriter.create(path, layout, settings, durability=config.durability)
    try:
        examples = task.train_examples()
        store_check(writer, settings["segments"][0], segment_check(task, examples, len(examples)))
    except BaseException:
        writer.close()
        raise
    return writer


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


def _changed_empty_build(writer: IndexWriter, task, config: BuildConfig):
    """For an index whose build stopped before its first row: what differs between it and this build
    (settings, model, tracked layers, number of examples), or None; and the task's GradientSource
    when it was opened to find out (else None). Indexes with rows are resumed or refused as usual."""
    settings = writer.settings
    segments = settings.get("segments") or []
    if writer.rows or len(segments) != 1 or segments[0]["kind"] != "build":
        return None, None
    source, n = _open_source(LOCAL, task, config)
    config = _clamp_rank(config, source.layers)
    stored = factor_key_of_index(settings["factors"])
    if stored != config.factor_key():
        return f"its settings differ ({_diff(stored, config.factor_key())})", source
    if [l.to_dict() for l in source.layers] != settings["layers"]:
        return "the task's model tracks other layers", source
    if source.fingerprint != settings["fingerprint"]:
        return "the task's model differs from the one it was started with", source
    if n != segments[0]["count"]:
        return f"the task has {n:,} examples, not the {segments[0]['count']:,} it was started with", source
    return None, source


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
    if comm.active or is_sharded(index):
        # new rows go to new shards, one per rank (of this job, or this process)
        opened = _open_shards_for_append(task, Path(index), config, comm, progress, given)
    else:
        writer = IndexWriter.open(index, durability=config.durability)
        opened = _resume_or_extend(writer, task, config, progress, kind="append", given=given)
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


def check_plan(path: Path, source: GradientSource, task, examples, config: BuildConfig, layout: IndexLayout,
               n_rows: int, progress: bool, whitened: frozenset[str] | set[str] = frozenset()) -> None:
    """Refuse, before any work, a build or append of `n_rows` rows that the memory budget, the GPU or
    the disk cannot hold (estimate.py); else announce the estimate."""
    check_budget(source.layers, source.spec, config, whitened)
    estimate = estimate_build(source.layers, source.spec, config, layout, n_rows,
                              tokens_bound(task, examples, config.batch_size), whitened)
    check_fits(estimate, path, config, source.device)
    if progress:
        announce(estimate, layout, len(source.layers), config)


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
    if source.fingerprint != settings["fingerprint"]:
        raise SettingsMismatchError(
            f"the task's model differs from the one index {path} was built with "
            f"(fingerprint {source.fingerprint[:12]} vs {settings['fingerprint'][:12]}): different weights, weight dtype or layers"
        )


def _say_curvature_is_kept(writer: IndexWriter, config: BuildConfig) -> None:
    """Curvature options live with an index that has rows: name those of this command that differ."""
    kind = config.projection_kind
    tokens = tokens_per_example(writer.get_state_meta(WHITENING_META))
    try:
        theirs = asdict(CurvatureConfig(**writer.settings["curvature"]).resolved(kind, tokens))
        mine = asdict(config.curvature.resolved(kind, tokens))
    except (TypeError, ValueError):
        return
    if theirs != mine:
        notice(f"curvature options differ from index {writer.path}'s ({_diff(theirs, mine)}): the index keeps its own; "
               f"change them with `lorif-stream fit --index {writer.path}`")


def _finalized(writer: IndexWriter, segment: dict) -> bool:
    """Whether the curvature covers every row: the segment's flag, or (killed between the curvature
    switch and the flag, or an index from before the flag) the curvature's own row count."""
    if segment.get("finalized"):
        return True
    return (writer.get_state_meta(CURVATURE_META) or {}).get("rows") == writer.rows


def _resume_or_extend(writer: IndexWriter, task, config: BuildConfig, progress: bool, kind: str,
                      whiten_only: bool = False, given: set[str] = frozenset(FACTOR_FIELDS),
                      source: GradientSource | None = None) -> "_Opened | BuildResult":
    """A single environment that exists, opened for this build or append: its unfinished segment
    resumed, its complete one recognised, or a new append segment recorded."""
    try:
        settings = writer.settings
        config = _index_factors(config, settings, given)
        if kind == "build" and writer.rows == 0:
            # nothing is fitted yet (a failed start, or `whiten` alone): this command's curvature applies
            settings = dict(settings, curvature=asdict(config.curvature))
            writer.update_settings(settings)
        elif kind == "build":
            _say_curvature_is_kept(writer, config)
        # curvature settings live with the index (change them with `fit`)
        config = replace(config, curvature=CurvatureConfig(**settings["curvature"]).resolved(config.projection_kind))

        if source is None:
            source, _ = _open_source(LOCAL, task, config, _index_layers(settings))
        _check_same_model(source, settings, writer.path)
        _check_reopened(writer, source, task, settings, kind, writer.path)
        segments = settings["segments"]
        last = segments[-1]
        examples = task.train_examples()
        n = len(examples)
        step = _next_step(writer.path, kind, last, writer.rows < last["start"] + last["count"], n, writer.rows,
                          lambda: task_mismatch(writer, last, task, examples, n))
        if step == "resume":
            _check_resumed_segment(writer, last, task, examples)
            return _opened_environment(writer, source, task, config)
        if step == "complete":
            return _complete(writer, source, task, config, progress, whiten_only, last)
        if n == 0:
            raise ValueError("the task has no training examples to append")
        check_plan(writer.path, source, task, examples, config, writer.layout, n, progress, _whitened_layers(writer))
        segment = {"kind": "append", "start": writer.rows, "count": n}
        store_check(writer, segment, segment_check(task, examples, n), keep=(last["start"],))
        settings = dict(settings, segments=segments + [segment])
        settings["allow_duplicate_ids"] = settings.get("allow_duplicate_ids") or config.allow_duplicate_ids
        writer.update_settings(settings)
        return _opened_environment(writer, source, task, config)
    except BaseException:
        writer.close()
        raise


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


def _check_reopened(writer: IndexWriter, source: GradientSource, task, settings: dict, kind: str, index) -> None:
    """Rows added with another encoding than the stored ones' would be scored silently wrong: a reopened
    environment (an index, or a shard of one) takes rows only from a task with the recorded options
    that reproduces a few of its stored rows (task_check.py). `index` names it in errors."""
    check_options(settings, task, index, kind)
    _check_recomputed_rows(writer, source, task, settings, kind, index)


def _check_reopened_shard(writer: IndexWriter, path: Path, entry: ShardEntry, source: GradientSource, task,
                          kind: str) -> None:
    """The same checks on a shard's own rows, which it numbers from 0 (`task`: their examples, or a
    task that holds none of them); an error names the shard and the index's row, in one line."""
    settings = dict(writer.settings, **_shard_probes(writer.settings, entry))
    try:
        _check_reopened(writer, source, task, settings, kind, path)
    except TaskMismatchError as e:
        raise TaskMismatchError(shard_message(path, entry, str(e))) from None


def _shard_probes(settings: dict, entry: ShardEntry) -> dict:
    """The recorded probe examples (the index's rows: every shard copies the head's record) that are
    this shard's rows, renumbered as its own; none recorded: none."""
    probes = settings.get(PROBES_KEY)
    if not probes:
        return {}
    return {PROBES_KEY: [dict(p, row=p["row"] - entry.start) for p in probes if entry.start <= p["row"] < entry.stop]}


def _check_recomputed_rows(writer: IndexWriter, source: GradientSource, task, settings: dict, kind: str,
                           index) -> None:
    """An append (or a resumed build) recomputes a few stored rows with its task (task_check.py): the
    index's own probe examples, or the task's examples where they are rows already committed."""
    if not writer.rows:
        return
    from .task_check import check_gradients
    from .whitening import load_projections

    saved = source.projections
    try:
        if factor_key_of_index(settings["factors"]).get("projection_kind") == "whitened":
            source.projections = load_projections(writer.get_array, source.layers, source.spec, source.device)
        with writer.reader().snapshot() as snap:
            check_gradients(task, source, snap, settings, index, kind, quiet_if_unchecked=True)
    finally:
        source.projections = saved


def _check_resumed_segment(writer: IndexWriter, segment: dict, task, examples) -> None:
    """An unfinished segment continues only with the examples it started with (as far as committed)."""
    committed = writer.rows - segment["start"]
    mismatch = task_mismatch(writer, segment, task, examples, committed)
    if mismatch:
        raise SettingsMismatchError(f"{mismatch}: index {writer.path} holds an unfinished {segment['kind']} of "
                                    f"other examples; resume it with the task it started with, or use a new --index")
    # rows not committed yet may have changed (a fixed bad example): record what is indexed from now on
    check = segment_check(task, examples, segment["count"])
    if check != stored_check(writer, segment):
        meta = writer.get_state_meta(SEGMENT_CHECK_META) or {}
        store_check(writer, segment, check, keep=tuple(int(k) for k in meta))


def _complete(writer: IndexWriter, source: GradientSource, task, config: BuildConfig, progress: bool,
              whiten_only: bool, segment: dict) -> "_Opened | BuildResult":
    """A rerun of a build or append whose rows are all committed: finish its curvature step if a kill
    (or a full disk) stopped it there, else there is nothing to do."""
    if whiten_only:  # `whiten` on an index with rows: its pre-pass is done, nothing else is asked
        return _opened_environment(writer, source, task, config)
    what = f"{segment['kind']} of {segment['count']:,} rows"
    if _finalized(writer, segment):
        notice(f"index {writer.path}: the {what} is already complete (rows {segment['start']:,}.."
               f"{segment['start'] + segment['count'] - 1:,}); nothing to do")
        writer.close()
        return BuildResult(str(writer.path), writer.rows, 0, 0.0, 0)
    notice(f"index {writer.path}: every row of the {what} is committed but its curvature was not finalized "
           f"(interrupted): finishing it")
    return _opened_environment(writer, source, task, config)


def _whitened_layers(writer: IndexWriter) -> set[str]:
    return set(((writer.get_state_meta(WHITENING_META) or {}).get("layers") or {}))


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


def _opened_environment(writer: IndexWriter, source: GradientSource, task, config: BuildConfig) -> _Opened:
    """A single environment's segment, to be written by this process (its only writer)."""
    return _Opened(Placement.environment(writer), source, task, config, time.perf_counter())


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
    comm.together(lambda: check_budget(source.layers, source.spec, config, _whitened_layers(own)))
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


# ------------------------------------------------------------------------------------ shards
# Opening a sharded index for a build or an append, by the ranks of a torchrun job (or one
# process); what follows is the one write pipeline (_write_segment). The index directory holds
# `shards.json` and one shard per rank per segment (store/shards.py). A segment (the build, then
# each append) is split into one contiguous run of rows per rank; rank r writes shard `first + r`
# of it over a view of its rows (task_view.py). Rank 0 plans the segment and writes the manifest
# before any shard exists; a rank opens only the shards it writes or holds (shard s is held by rank
# s % world), so shards may sit on node-local disks. A rerun of the same command resumes: every
# shard continues at its first missing row. The world size of a resumed segment must be the one it
# started with (one shard per rank); another is refused in one line.


def _rank_budget(config: BuildConfig, comm: Comm) -> BuildConfig:
    """The default budget (half the RAM) is the node's: its ranks share it. The smallest rank's is
    every rank's, so that all plan the same passes (whitening groups), hence the same collectives."""
    budget = config.budget() if config.memory_budget is not None else max(config.budget() // comm.local_world, 1)
    return replace(config, memory_budget=min(comm.gather(budget)))


def _single_process_index(path: Path, what: str) -> SettingsMismatchError:
    return SettingsMismatchError(f"index {path} was written by a single process (one LMDB environment, not shards): "
                                 f"{what} it without torchrun, or build a sharded index into a new --index")


# ------------------------------------------------------------------------------------ build


def _open_shards_for_build(task, path: Path, config: BuildConfig, comm: Comm, progress: bool) -> "_Opened | BuildResult":
    """This rank's shard of a sharded build: planned by rank 0 (a new manifest, or the unfinished
    build to resume), created or reopened by each rank."""
    t0 = time.perf_counter()
    check_sharded_curvature(config.curvature)
    config = _rank_budget(config, comm)
    source, n = _open_source(comm, task, config)
    config = _clamp_rank(config, source.layers)
    if n == 0:
        raise ValueError("the task has no training examples (train_examples() is empty)")
    check_budget(source.layers, source.spec, config)
    plan = comm.on_root(lambda: _plan_build(path, n, comm, config, source, task, progress))
    manifest = ShardManifest.from_dict(plan["manifest"])
    segment = manifest.segments[-1]
    if plan["started"]:
        step = _next_step(path, "build", segment, not segment.get("finalized"), n, manifest.planned_rows,
                          lambda: _other_examples(comm, path, manifest, segment, task))
        if step == "complete":
            if comm.root:
                notice(f"index {path}: the build of {n:,} rows is already complete ({len(manifest.shards)} shards); "
                       f"nothing to do")
            return BuildResult(str(path), manifest.planned_rows, 0, 0.0, 0)
        _check_world(path, segment, comm)
    placement, view = _open_own_shard(comm, path, manifest, IndexLayout.from_dict(plan["layout"]),
                                      lambda entry: new_settings(task, source, config, entry.count), task, config,
                                      source)
    return _Opened(placement, source, view, config, t0)


def _open_own_shard(comm: Comm, path: Path, manifest: ShardManifest, layout: IndexLayout, new_shard_settings, task,
                    config: BuildConfig, source: GradientSource) -> tuple[Placement, ShardTask]:
    """This rank's shard of the manifest's last segment (a build's or an append's), created with
    `new_shard_settings(entry)` or reopened and checked, in a placement; and the task's rows there."""
    segment = manifest.segments[-1]
    position = segment["shards"][0] + comm.rank
    entry = manifest.shards[position]
    view = ShardTask(task, entry.start - segment["start"], entry.count)
    settings = dict(new_shard_settings(entry), shard=_shard_record(entry, position))
    writer = comm.together(lambda: _open_or_create(path, entry, position, layout, settings, view, config, source,
                                                     segment["kind"]))
    return Placement(path, manifest, {position: writer}, writer), view


def _same_everywhere(comm: Comm, n: int, fingerprint: str) -> None:
    seen = comm.gather((n, fingerprint))
    for rank, (n_r, f_r) in enumerate(seen):
        if (n_r, f_r) != seen[0]:
            raise ValueError(f"rank {rank} loaded {n_r:,} training examples and model {f_r[:12]}, rank 0 "
                             f"{seen[0][0]:,} and {seen[0][1][:12]}: every rank must load the same task")


def _plan_build(path: Path, n: int, comm: Comm, config: BuildConfig, source, task, progress: bool) -> dict:
    """Rank 0: the started index (its manifest, and the layout of its shards), or the shards of a new
    build (the manifest written before any shard)."""
    if (path / DATA_FILE).exists():
        raise _single_process_index(path, "resume or extend")
    if is_sharded(path):
        manifest = read_manifest(path)
        layout = _started_layout(path, manifest) or new_layout(source, config)
        return {"manifest": manifest.to_dict(), "started": True, "layout": layout.to_dict()}
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
    return {"manifest": manifest.to_dict(), "started": False, "layout": layout.to_dict()}


def _check_world(path: Path, segment: dict, comm: Comm) -> None:
    """An unfinished segment resumes only with the world size it started with (a shard is one rank's)."""
    shards = segment["shards"][1] - segment["shards"][0]
    if shards != comm.world:
        raise SettingsMismatchError(f"index {path} has an unfinished {segment['kind']} of {shards} shards (one per "
                                    f"rank): resume it with {shards} ranks, not {comm.world}")


def _started_layout(path: Path, manifest: ShardManifest) -> IndexLayout | None:
    """The layout of a started sharded index, from whichever of its shards rank 0 can see."""
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
        return _create_environment(shard_path, layout, settings, view, config)
    writer = IndexWriter.open(shard_path, durability=config.durability)
    try:
        _check_reopened_shard_is_this_run(writer, path, entry, settings, source, view, kind)
        return writer
    except BaseException:
        writer.close()
        raise


def _check_reopened_shard_is_this_run(writer: IndexWriter, path: Path, entry: ShardEntry, settings: dict,
                                      source: GradientSource, view, kind: str) -> None:
    """A reopened shard continues only the run that created it: its place in the index, factor
    settings and model, the task's options and recomputed rows (as one environment's reopening
    checks), and the same examples as far as committed."""
    stored = writer.settings
    if stored.get("shard") != settings["shard"]:
        raise SettingsMismatchError(f"shard {writer.path} is for rows {stored.get('shard')}, not {settings['shard']}")
    _check_same({"factors": factor_key_of_index(stored["factors"])}, "factors",
                factor_key_of_index(settings["factors"]), "factor settings")
    if stored["fingerprint"] != source.fingerprint or stored["layers"] != settings["layers"]:
        raise SettingsMismatchError(f"the task's model differs from the one index {path} was built with "
                                    f"(fingerprint {source.fingerprint[:12]} vs {stored['fingerprint'][:12]})")
    _check_reopened_shard(writer, path, entry, source, view, kind)
    segment = stored["segments"][-1]
    if segment["kind"] != kind or segment["count"] != entry.count:
        raise SettingsMismatchError(f"shard {writer.path} holds a {segment['kind']} of {segment['count']:,} rows, "
                                    f"not this {kind}'s {entry.count:,}")
    if writer.rows < entry.count:
        _check_resumed_segment(writer, segment, view, view.train_examples())
        return
    mismatch = task_mismatch(writer, segment, view, view.train_examples(), entry.count)
    if mismatch:
        raise SettingsMismatchError(f"{mismatch}: index {path} holds a {kind} of other examples")


# ------------------------------------------------------------------------------------ append


def _open_shards_for_append(task, path: Path, config: BuildConfig, comm: Comm, progress: bool,
                            given: set[str] = frozenset(FACTOR_FIELDS)) -> "_Opened | BuildResult":
    """This rank's new shard of an append to a sharded index (the segment planned by rank 0, or
    resumed), and the older shards it holds, whose statistics enter the curvature."""
    t0 = time.perf_counter()
    config = _rank_budget(config, comm)
    plan = comm.on_root(lambda: _plan_append_head(path))
    manifest = ShardManifest.from_dict(plan["manifest"])
    config = _index_factors(config, plan["settings"], given)
    # curvature settings live with the index (change them with `fit`)
    config = replace(config, curvature=CurvatureConfig(**plan["settings"]["curvature"]).resolved(config.projection_kind))
    check_sharded_curvature(config.curvature)
    source, n = _open_source(comm, task, config, _index_layers(plan["settings"]))
    _check_same_model(source, plan["settings"], path)
    # the same recorded-encoding check as one process's append: every rank holds the same settings
    # and task options, so each refuses alike, before any collective
    check_options(plan["settings"], task, path, "append")
    manifest, resumed = _plan_append_segment(comm, path, manifest, task, n)
    if manifest is None:
        if comm.root:
            notice(f"index {path}: the append of {n:,} rows is already complete; nothing to do")
        return BuildResult(str(path), resumed, 0, 0.0, 0)
    allow_duplicate_ids = bool(plan["settings"].get("allow_duplicate_ids") or config.allow_duplicate_ids)
    placement, view = _open_own_shard(
        comm, path, manifest, IndexLayout.from_dict(plan["layout"]),
        lambda entry: dict(plan["settings"], segments=[{"kind": "append", "start": 0, "count": entry.count}],
                           nonfinite_rows=[], allow_duplicate_ids=allow_duplicate_ids),
        task, config, source)
    first_new = manifest.segments[-1]["shards"][0]
    try:
        comm.together(lambda: placement.hold(range(first_new), comm.owns, config.durability))
        # as one process's append recomputes rows of its index: here of the older shards this rank holds
        comm.together(lambda: _check_older_shards(placement, first_new, source, task))
    except BaseException:
        placement.close()
        raise
    return _Opened(placement, source, view, config, t0)


def _check_older_shards(placement: Placement, first_new: int, source: GradientSource, task) -> None:
    for position in range(first_new):
        if position in placement.writers:
            _check_reopened_shard(placement.writers[position], placement.path, placement.manifest.shards[position],
                                  source, task, "append")


def _plan_append_head(path: Path) -> dict:
    """Rank 0: the manifest, and the settings and layout that new shards copy from the head shard."""
    if not is_sharded(path):
        if (path / DATA_FILE).exists():
            raise _single_process_index(path, "append to")
        raise SettingsMismatchError(f"no index at {path} to append to")
    manifest = read_manifest(path)
    with IndexReader(path / manifest.shards[0].name) as head:
        settings = {k: v for k, v in head.settings.items() if k not in ("segments", "nonfinite_rows", "shard")}
        return {"manifest": manifest.to_dict(), "settings": settings, "layout": head.layout.to_dict()}


def _plan_append_segment(comm: Comm, path: Path, manifest: ShardManifest, task, n: int):
    """(manifest with the segment to write, None) for a new or resumed append; (None, rows) when the
    same append is complete already. Recognising the same data takes every rank: each checks the
    shards of the last segment it holds."""
    last = manifest.segments[-1]
    step = _next_step(path, "append", last, not last.get("finalized"), n, manifest.planned_rows,
                      lambda: _other_examples(comm, path, manifest, last, task))
    if step == "complete":
        return None, manifest.planned_rows
    if step == "resume":
        _check_world(path, last, comm)
        return manifest, None
    new = manifest.with_segment({"kind": "append", "start": manifest.planned_rows, "count": n}, split_rows(n, comm.world))
    comm.on_root(lambda: write_manifest(path, new))
    return new, None


def _other_examples(comm: Comm, path: Path, manifest: ShardManifest, segment: dict, task) -> str | None:
    """How the rows of `segment` differ from the task's examples (ids, and content digests of a
    sample: segments.task_mismatch), as the first rank that holds a differing shard says; None: they
    are its examples. Every rank checks the shards of `segment` it holds."""
    return next((m for m in comm.gather(comm.together(lambda: _other_examples_held(comm, path, manifest, segment,
                                                                                      task))) if m), None)


def _other_examples_held(comm: Comm, path: Path, manifest: ShardManifest, segment: dict, task) -> str | None:
    for position in manifest.segment_shards(segment):
        if not comm.owns(position):
            continue
        entry = manifest.shards[position]
        view = ShardTask(task, entry.start - segment["start"], entry.count)
        with IndexWriter.open(path / entry.name) as w:
            mismatch = task_mismatch(w, w.settings["segments"][-1], view, view.train_examples(), entry.count)
        if mismatch:
            return shard_message(path, entry, mismatch)
    return None
