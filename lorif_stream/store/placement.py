"""Where an index's rows live, as one rank of a job sees them: the storage half of every pipeline.

An index is either a single LMDB environment or a directory of shards with a manifest
(shards.py). The pipelines that write (build, append, whiten, fit) are written once, over a
`Placement`: the environments this rank holds, by shard position, the one it writes rows into,
and how a segment is recorded as finished or withdrawn. A single environment is the index of one
shard, position 0, held by rank 0 and recorded by no manifest, so in one process every
"sum over the shards I hold" is that environment's own value and every collective the identity.

Before a build or an append writes, `StoredIndex` is the index as it finds it, by either layout:
whether it exists, its settings and segments, the rows this rank's environments hold, the
environment (`Part`) of a segment each rank writes, and how a new segment is recorded. So the
opening of a segment (build.py) is written once too.
"""
from __future__ import annotations

import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .format import DATA_FILE, LMDB_LOCK_FILE
from .layout import IndexLayout
from .lmdb_store import IndexReader, IndexWriter
from .shards import (MANIFEST_FILE, ShardEntry, ShardManifest, is_sharded, read_manifest, shard_message, shard_name,
                     split_rows, write_manifest)
from .writer_lock import WriterLock


@dataclass
class Placement:
    """The environments of the index at `path` that this rank holds (`writers`, by shard position;
    a single environment is position 0), and `own`, the one it writes this segment's rows into
    (None where it writes none: `fit`). `manifest` is None for a single environment."""

    path: Path
    manifest: ShardManifest | None = None
    writers: dict[int, IndexWriter] = field(default_factory=dict)
    own: IndexWriter | None = None

    @property
    def sharded(self) -> bool:
        return self.manifest is not None

    @property
    def head(self) -> IndexWriter | None:
        """The environment holding the index-wide state (whitening, curvature): shard 0, on rank 0."""
        return self.writers.get(0)

    @property
    def held(self) -> list[IndexWriter]:
        return [self.writers[p] for p in sorted(self.writers)]

    @property
    def row_offset(self) -> int:
        """The index's number of the own environment's row 0 (a shard's first global row)."""
        if self.manifest is None:
            return 0
        position = next(p for p, w in self.writers.items() if w is self.own)
        return self.manifest.shards[position].start

    def hold(self, positions, owns: Callable[[int], bool], durability: str = "sync") -> None:
        """Open, for writing their statistics, the environments at `positions` (shards; a single
        environment is 0) that this rank holds and has not opened yet."""
        for position in positions:
            if owns(position) and position not in self.writers:
                path = self.path if self.manifest is None else self.path / self.manifest.shards[position].name
                self.writers[position] = IndexWriter.open(path, durability=durability)

    # -- segments
    def finish_segment(self) -> None:
        """The own environment's last segment is covered by the curvature (a rerun has nothing to do)."""
        _set_last_segment(self.own, finalized=True)

    def record_finished(self) -> None:
        """Rank 0, once every rank has finished its part: the manifest says so too."""
        if self.manifest is not None:
            write_manifest(self.path, self.manifest.with_last_segment(finalized=True))

    def withdraw_empty_segment(self) -> None:
        """A single environment's append refused before its first row leaves the index as it was: its
        segment record would otherwise make every later append look like an unfinished one. (A
        sharded index keeps the manifest's segment: a rerun resumes its shards.)"""
        if self.manifest is not None or self.own is None:
            return
        segments = self.own.settings["segments"]
        if segments[-1]["kind"] == "append" and self.own.rows == segments[-1]["start"]:
            self.own.update_settings(dict(self.own.settings, segments=segments[:-1]))

    def close(self) -> None:
        for writer in self.writers.values():  # the own environment is among them
            writer.close()

    def __enter__(self) -> "Placement":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _set_last_segment(writer: IndexWriter, **fields) -> None:
    settings = dict(writer.settings)
    segments = list(settings["segments"])
    segments[-1] = dict(segments[-1], **fields)
    writer.update_settings(dict(settings, segments=segments))


# ------------------------------------------------------------------------------------ opening


# What an environment's settings hold of its own alone; the rest is the index's (a new shard copies it).
_OWN_SETTINGS = ("segments", "nonfinite_rows", "shard")


@dataclass(frozen=True)
class Part:
    """The environment of a segment one rank writes: a single environment (position 0, every row of
    the segment), or one shard of it. `segment` is the environment's own record of the segment (a
    shard numbers its rows from 0); its rows are the segment's examples from `first` on."""

    index: Path
    position: int
    segment: dict
    first: int = 0
    entry: ShardEntry | None = None  # a shard's place in the index; None: a single environment

    @property
    def path(self) -> Path:
        return self.index if self.entry is None else self.index / self.entry.name

    @property
    def count(self) -> int:
        return self.segment["count"]

    @property
    def whole(self) -> bool:  # it holds every example of its segment: a single environment
        return self.entry is None

    def own_rows(self, records: list[dict]) -> list[dict]:
        """Of `records` naming the index's rows (`row`), this environment's, renumbered as its own."""
        if self.entry is None:
            return records
        return [dict(r, row=r["row"] - self.entry.start) for r in records if self.entry.start <= r["row"] < self.entry.stop]

    @property
    def exists(self) -> bool:
        return (self.path / DATA_FILE).exists()

    @property
    def shard_record(self) -> dict | None:
        """A shard's place in the index, kept in its settings and checked on every open."""
        return None if self.entry is None else {"number": self.position, "start": self.entry.start,
                                                "count": self.entry.count}

    def named(self, message: str) -> str:
        """`message` about this environment's rows, as the index's: a shard's names the shard, in one
        line with the index's row numbers."""
        return message if self.entry is None else shard_message(self.index, self.entry, message)


@dataclass(frozen=True)
class StoredIndex:
    """An index as a build or an append finds it, read by rank 0 and the same on every rank: a single
    environment (`manifest` None) or a manifest of shards. `settings` are the index's (its head's,
    without what an environment holds of its own; {} while no environment exists yet), `segments`
    its segments (a manifest's, or the environment's), `meta` the head's state records asked for."""

    path: Path
    segments: tuple[dict, ...]
    settings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    layout: IndexLayout | None = None
    manifest: ShardManifest | None = None

    def __post_init__(self):
        if not self.segments:
            raise ValueError(f"index {self.path} has no segment")

    @classmethod
    def read(cls, path, metas=(), must_exist: bool = False) -> "StoredIndex | None":
        """The index at `path` (None: there is none; `must_exist`: the store's error says why)."""
        path = Path(path)
        if is_sharded(path):
            manifest = read_manifest(path)
            # the head shard's state; before it exists, whichever shard rank 0 can see (a started build)
            for entry in manifest.shards:
                if (path / entry.name / DATA_FILE).exists():
                    return cls._with_head(path / entry.name, metas, manifest.segments, manifest)
            return cls(path, manifest.segments, manifest=manifest)
        if (path / DATA_FILE).exists() or must_exist:
            return cls._with_head(path, metas)
        return None

    @classmethod
    def _with_head(cls, head: Path, metas, segments=None, manifest: ShardManifest | None = None) -> "StoredIndex":
        with IndexReader(head) as reader, reader.snapshot() as snap:
            settings = dict(reader.settings)
            return cls(head if manifest is None else head.parent, tuple(segments or settings["segments"]),
                       {k: v for k, v in settings.items() if k not in _OWN_SETTINGS},
                       {name: snap.state_meta(name) for name in metas}, reader.layout, manifest)

    @classmethod
    def new(cls, path, segment: dict, shards: int | None, layout: IndexLayout) -> "StoredIndex":
        """A new index of one segment: a single environment (`shards` None) or that many shards."""
        if shards is None:
            return cls(Path(path), (segment,), layout=layout)
        counts = split_rows(segment["count"], shards)
        entries = tuple(ShardEntry(shard_name(i), sum(counts[:i]), count) for i, count in enumerate(counts))
        manifest = ShardManifest(entries, (dict(segment, shards=[0, len(entries)], finalized=False),))
        return cls(Path(path), manifest.segments, layout=layout, manifest=manifest)

    @property
    def sharded(self) -> bool:
        return self.manifest is not None

    @property
    def last(self) -> dict:
        return self.segments[-1]

    @property
    def planned_rows(self) -> int:
        return self.last["start"] + self.last["count"]

    def all_parts(self) -> list[Part]:
        """Every environment of the index, in row order (a single environment: one, of its last segment)."""
        if self.manifest is None:
            return [Part(self.path, 0, self.last)]
        return [self._part(position) for position in range(len(self.manifest.shards))]

    def parts(self) -> list[Part]:
        """The environments of the last segment, one per rank that writes it."""
        return self.all_parts()[self._first_of_last:]

    def older_parts(self) -> list[Part]:
        """The environments of the earlier segments (a single environment holds them in its own)."""
        return self.all_parts()[:self._first_of_last]

    @property
    def _first_of_last(self) -> int:
        return 0 if self.manifest is None else self.last["shards"][0]

    def _part(self, position: int) -> Part:
        entry = self.manifest.shards[position]
        segment = next(s for s in self.segments if s["shards"][0] <= position < s["shards"][1])
        return Part(self.path, position, {"kind": segment["kind"], "start": 0, "count": entry.count},
                    entry.start - segment["start"], entry)

    def rows_held(self, owns: Callable[[int], bool]) -> int:
        """The committed rows of the environments this rank holds."""
        rows = 0
        for part in self.all_parts():
            if owns(part.position) and part.exists:
                with IndexReader(part.path) as reader:
                    rows += reader.rows
        return rows

    def with_segment(self, segment: dict, shards: int) -> "StoredIndex":
        """This index with a new last segment, split into `shards` new shards (a single environment
        holds it in its own: `shards` is 1)."""
        if self.manifest is None:
            return replace(self, segments=self.segments + (segment,))
        manifest = self.manifest.with_segment(segment, split_rows(segment["count"], shards))
        return replace(self, segments=manifest.segments, manifest=manifest)

    def record(self) -> None:
        """Rank 0, before any row of the last segment: the manifest names it with its shards (a single
        environment records it in its own settings, as it opens)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.manifest is not None:
            write_manifest(self.path, self.manifest)

    def lock(self, owns: Callable[[int], bool], stack: ExitStack) -> None:
        """Take the writer lock of every environment this rank holds until `stack` closes: one that
        another process writes (a build still in its pre-pass holds no row) is refused, not removed."""
        for part in self.all_parts():
            # a shard's directory, not its data.mdb: a creator takes the lock before writing that
            if owns(part.position) and part.path.is_dir():
                stack.callback(WriterLock.acquire(part.path).release)

    def remove(self, owns: Callable[[int], bool]) -> None:
        """Delete the environments this rank holds, and on rank 0 the manifest (an index with no row,
        re-created: every rank removes its part before anything new is written)."""
        if self.manifest is not None and owns(0):
            (self.path / MANIFEST_FILE).unlink(missing_ok=True)
        for part in self.all_parts():
            if not owns(part.position):
                continue
            if part.whole:  # the directory is the user's: only the index's own files go
                for name in (DATA_FILE, LMDB_LOCK_FILE):
                    (part.path / name).unlink(missing_ok=True)
            else:
                shutil.rmtree(part.path, ignore_errors=True)
