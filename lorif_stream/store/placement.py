"""Where an index's rows live, as one rank of a job sees them: the storage half of every pipeline.

An index is either a single LMDB environment or a directory of shards with a manifest
(shards.py). The pipelines that write (build, append, whiten, fit) are written once, over a
`Placement`: the environments this rank holds, by shard position, the one it writes rows into,
and how a segment is recorded as finished or withdrawn. A single environment is the index of one
shard, position 0, held by rank 0 and recorded by no manifest, so in one process every
"sum over the shards I hold" is that environment's own value and every collective the identity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .lmdb_store import IndexWriter
from .shards import ShardManifest, write_manifest


@dataclass
class Placement:
    """The environments of the index at `path` that this rank holds (`writers`, by shard position;
    a single environment is position 0), and `own`, the one it writes this segment's rows into
    (None where it writes none: `fit`). `manifest` is None for a single environment."""

    path: Path
    manifest: ShardManifest | None = None
    writers: dict[int, IndexWriter] = field(default_factory=dict)
    own: IndexWriter | None = None

    @classmethod
    def environment(cls, writer: IndexWriter) -> "Placement":
        """One environment, written by this process."""
        return cls(Path(writer.path), None, {0: writer}, writer)

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
        """Open, for writing their statistics, the shards at `positions` that this rank holds and has
        not opened yet."""
        for position in positions:
            if owns(position) and position not in self.writers:
                entry = self.manifest.shards[position]
                self.writers[position] = IndexWriter.open(self.path / entry.name, durability=durability)

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
