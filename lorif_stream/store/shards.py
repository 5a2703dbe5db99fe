"""Sharded indexes: one LMDB environment per rank of a torchrun build, and a manifest naming them.

LMDB has one writer per environment and must not be shared across hosts, so each rank of a
distributed build writes its own *shard*: a complete index (format 2, verifiable alone) of a
contiguous range of global rows, with rows numbered from 0 inside it. `shards.json` in the index
directory lists the shards in row order and the index's segments (docs/DISTRIBUTED.md).

Readers open a sharded index through `open_index`, which returns a `ShardedReader` whose snapshots
speak global rows and otherwise behave like a single environment's: the index-wide state (whitening,
curvature) is read from the *head* shard, shard 0.
"""
from __future__ import annotations

import bisect
import json
import os
import re
import zlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from .codec import BlockDecoder
from .format import DATA_FILE, CorruptBlockError, IndexError_, NotAnIndexError, UnsupportedVersionError
from .layout import IndexLayout
from .lmdb_store import BlockBuffers, IndexReader

MANIFEST_FILE = "shards.json"
MANIFEST_FORMAT = "lorif-stream shards"
MANIFEST_VERSION = 1
SUPPORTED_MANIFEST_VERSIONS = (1,)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def is_sharded(path) -> bool:
    return (Path(path) / MANIFEST_FILE).exists()


@dataclass(frozen=True)
class ShardEntry:
    """One shard: its directory (inside the index) and the global rows [start, start + count) it is for."""

    name: str
    start: int
    count: int

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"shard name {self.name!r} must be a plain directory name")
        if self.start < 0 or self.count < 1:
            raise ValueError(f"shard {self.name!r}: start {self.start} and count {self.count} must be >= 0 and >= 1")

    @property
    def stop(self) -> int:
        return self.start + self.count


@dataclass(frozen=True)
class ShardManifest:
    """The shards of an index in row order, and its segments (the build's, then one per append).

    A segment is `{kind, start, count, shards: [first, stop), finalized}`; it is recorded, with its
    shards, before the first of its rows is written."""

    shards: tuple[ShardEntry, ...]
    segments: tuple[dict, ...]

    def __post_init__(self):
        expected = 0
        for s in self.shards:
            if s.start != expected:
                raise ValueError(f"shard {s.name!r} starts at row {s.start}, not at {expected} where the previous ends")
            expected = s.stop
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            raise ValueError(f"shard names repeat in {names}")
        if not self.segments:
            raise ValueError("a sharded index has at least one segment")
        for seg in self.segments:
            first, stop = seg["shards"]
            if not 0 <= first < stop <= len(self.shards):
                raise ValueError(f"segment {seg} names shards outside the {len(self.shards)} listed")
            if self.shards[first].start != seg["start"] or self.shards[stop - 1].stop != seg["start"] + seg["count"]:
                raise ValueError(f"segment {seg} does not cover exactly its shards' rows")

    def with_segment(self, segment: dict, counts: Sequence[int]) -> "ShardManifest":
        """This manifest plus one segment split into shards of `counts` rows (named by position)."""
        shards = list(self.shards)
        start = segment["start"]
        first = len(shards)
        for count in counts:
            shards.append(ShardEntry(shard_name(len(shards)), start, count))
            start += count
        seg = dict(segment, shards=[first, len(shards)], finalized=False)
        return ShardManifest(tuple(shards), self.segments + (seg,))

    def without_last_segment(self) -> "ShardManifest":
        first, _ = self.segments[-1]["shards"]
        return ShardManifest(self.shards[:first], self.segments[:-1])

    def with_last_segment(self, **fields) -> "ShardManifest":
        return ShardManifest(self.shards, self.segments[:-1] + (dict(self.segments[-1], **fields),))

    # -- on disk
    def to_dict(self) -> dict:
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                "shards": [{"name": s.name, "start": s.start, "count": s.count} for s in self.shards],
                "segments": [dict(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardManifest":
        return cls(tuple(ShardEntry(**s) for s in d["shards"]), tuple(dict(s) for s in d["segments"]))


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def split_rows(n: int, parts: int) -> list[int]:
    """Row counts of `parts` contiguous shards of `n` rows, as even as possible (earlier ones larger)."""
    if n < parts:
        raise ValueError(f"{n:,} examples cannot be split into {parts} shards (one per rank): "
                         f"use at most {n} ranks")
    return [n // parts + (i < n % parts) for i in range(parts)]


def write_manifest(path, manifest: ShardManifest) -> None:
    """Replace the manifest atomically (written aside, fsynced, renamed over): a reader sees the old
    one or the new one."""
    path = Path(path)
    body = manifest.to_dict()
    body["crc32"] = zlib.crc32(_canonical(body))
    tmp = path / (MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(body, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path / MANIFEST_FILE)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path) -> ShardManifest:
    path = Path(path)
    file = path / MANIFEST_FILE
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise NotAnIndexError(f"{path} is not a sharded lorif-stream index (no {MANIFEST_FILE})") from None
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CorruptBlockError(f"index {path}: {MANIFEST_FILE} is not valid JSON ({e})") from None
    if body.get("format") != MANIFEST_FORMAT:
        raise NotAnIndexError(f"{file} is not a lorif-stream shard manifest (format {body.get('format')!r})")
    if body.get("version") not in SUPPORTED_MANIFEST_VERSIONS:
        raise UnsupportedVersionError(f"index {path} has shard manifest version {body.get('version')!r}; this "
                                      f"lorif-stream reads versions {list(SUPPORTED_MANIFEST_VERSIONS)}")
    crc = body.pop("crc32", None)
    if crc != zlib.crc32(_canonical(body)):
        raise CorruptBlockError(f"index {path}: {MANIFEST_FILE} checksum mismatch (the file is damaged)")
    try:
        return ShardManifest.from_dict(body)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptBlockError(f"index {path}: {MANIFEST_FILE} does not describe shards ({e})") from None


def open_index(path, *, strict: bool = True):
    """A reader of the index at `path`: an IndexReader for a single environment, a ShardedReader for
    a sharded index (same interface, global rows)."""
    return ShardedReader(path, strict=strict) if is_sharded(path) else IndexReader(path, strict=strict)


# ------------------------------------------------------------------------------------ reading


class ShardedReader:
    """Read access to a sharded index: its shards' readers behind global row numbers.

    `shards` restricts the reader to some shard positions (a torchrun query rank streams only its
    own); their rows keep their global numbers. The index-wide state comes from the head shard."""

    def __init__(self, path, *, strict: bool = True, manifest: ShardManifest | None = None,
                 shards: Sequence[int] | None = None):
        self.path = Path(path)
        self.strict = strict
        self.manifest = manifest or read_manifest(self.path)
        self.positions = list(range(len(self.manifest.shards))) if shards is None else sorted(shards)
        self.problems: list[str] = []
        self._stack = ExitStack()
        self.readers: dict[int, IndexReader] = {}
        # the head shard's index-wide state is read by whole-index readers; a rank's reader (shards
        # given) may not see shard 0 at all, on another node
        wanted = set(self.positions) | ({0} if shards is None else set())
        try:
            for i in sorted(wanted):
                entry = self.manifest.shards[i]
                shard_path = self.path / entry.name
                if not (shard_path / DATA_FILE).exists():
                    if self._segment_of(i).get("finalized") or i not in self.positions:
                        raise CorruptBlockError(f"index {self.path}: shard {entry.name} is missing "
                                                f"(listed in {MANIFEST_FILE}); run `lorif-stream verify --index {self.path}`")
                    continue  # a shard of an unfinished build not started yet: no rows
                reader = self._stack.enter_context(IndexReader(shard_path, strict=strict))
                self._check_shard(i, reader)
                self.readers[i] = reader
            if shards is None and 0 not in self.readers:
                raise CorruptBlockError(f"index {self.path}: its head shard {self.manifest.shards[0].name} is missing")
        except BaseException:
            self._stack.close()
            raise
        # a rank may hold no shard at all (more ranks than shards): it reads nothing
        head = self.readers.get(0) or next(iter(self.readers.values()), None)
        self.layout: IndexLayout | None = head.layout if head else None
        self.format_version = head.format_version if head else None
        self.settings = self._global_settings(head) if head else {}

    def _segment_of(self, shard: int) -> dict:
        return next(s for s in self.manifest.segments if s["shards"][0] <= shard < s["shards"][1])

    def _check_shard(self, i: int, reader: IndexReader) -> None:
        """A shard directory must be the shard the manifest names (a copied-over or mixed-up directory is refused)."""
        entry = self.manifest.shards[i]
        own = (reader.settings or {}).get("shard") or {}
        if own.get("start") != entry.start or own.get("count") != entry.count:
            raise CorruptBlockError(f"index {self.path}: shard {entry.name} holds rows {own.get('start')}.. "
                                    f"(+{own.get('count')}) but {MANIFEST_FILE} lists it for rows "
                                    f"{entry.start}.. (+{entry.count}): a shard from another index or run")
        first = next(iter(self.readers.values()), None)
        if first is not None and reader.layout != first.layout:
            raise CorruptBlockError(f"index {self.path}: shard {entry.name} has another layout than shard "
                                    f"{first.path.name}")

    def _global_settings(self, head: IndexReader) -> dict:
        settings = dict(head.settings)
        settings.pop("shard", None)
        segments = []
        for seg in self.manifest.segments:
            s = {k: seg[k] for k in ("kind", "start", "count")}
            if seg.get("finalized"):
                s["finalized"] = True
            segments.append(s)
        nonfinite = []
        for i, reader in self.readers.items():
            start = self.manifest.shards[i].start
            nonfinite += [start + r for r in (reader.settings or {}).get("nonfinite_rows", [])]
        return dict(settings, segments=segments, nonfinite_rows=sorted(nonfinite),
                    shards=len(self.manifest.shards))

    @contextmanager
    def snapshot(self, strict: bool | None = None) -> Iterator["ShardedSnapshot"]:
        with ExitStack() as stack:
            snaps = {i: stack.enter_context(r.snapshot(strict)) for i, r in self.readers.items()}
            yield ShardedSnapshot(self, snaps)

    @property
    def rows(self) -> int:
        with self.snapshot() as snap:
            return snap.rows

    def disk_bytes(self) -> int:
        return sum(r.disk_bytes() for i, r in self.readers.items() if i in self.positions)

    def factor_bytes(self) -> int:
        return sum(r.factor_bytes() for i, r in self.readers.items() if i in self.positions)

    def close(self) -> None:
        self._stack.close()
        self.readers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardedSnapshot:
    """One snapshot per shard (each consistent on its own), seen as one index with global rows.

    `rows` counts the rows readable as one contiguous run from row 0: every shard's committed rows up
    to the first shard that is not full (an unfinished build exposes no row beyond it). A reader
    restricted to some shards reads only theirs; `rows` is still the global count."""

    def __init__(self, reader: ShardedReader, snaps: dict):
        self._reader = reader
        self._snaps = snaps
        self.layout = reader.layout
        self.strict = reader.strict
        self.problems: list[str] = []
        for s in snaps.values():
            self.problems.extend(s.problems)
        manifest = reader.manifest
        self.rows = 0
        self.ranges: list[tuple[int, int, int]] = []  # (position, global start, committed rows) of readable shards
        for i, entry in enumerate(manifest.shards):
            if i in snaps:
                committed = snaps[i].rows
            elif i in reader.positions:
                committed = 0  # not created yet
            else:
                committed = entry.count  # another rank's: counted as the manifest plans it
            if i in reader.positions and committed:
                self.ranges.append((i, entry.start, committed))
            self.rows = entry.start + committed
            if committed < entry.count:
                break
        self._starts = [start for _, start, _ in self.ranges]

    def _locate(self, row: int) -> tuple:
        k = bisect.bisect_right(self._starts, row) - 1
        if k < 0 or row >= self.ranges[k][1] + self.ranges[k][2]:
            raise IndexError(f"row {row} is outside the rows this reader of index {self._reader.path} holds")
        i, start, _ = self.ranges[k]
        return self._snaps[i], start

    def _position(self, row: int) -> int:
        k = bisect.bisect_right(self._starts, row) - 1
        return self.ranges[max(k, 0)][0]

    @contextmanager
    def _named(self, position: int):
        """A shard's own errors speak its local rows: name the shard and make them the index's rows."""
        try:
            yield
        except IndexError_ as e:
            if getattr(e, "_lorif_shard_named", False):
                raise
            named = type(e)(shard_message(self._reader.path, self._reader.manifest.shards[position], str(e)))
            named._lorif_shard_named = True
            raise named from None

    def limit(self, rows: int) -> None:
        """Read no row at or past `rows` (a torchrun query: the global count its ranks agreed on)."""
        self.rows = min(self.rows, rows)
        self.ranges = [(i, s, min(n, self.rows - s)) for i, s, n in self.ranges if s < self.rows]
        self._starts = [start for _, start, _ in self.ranges]

    @property
    def held_rows(self) -> int:
        return sum(n for _, _, n in self.ranges)

    # -- blocks, in global rows
    def layer_values(self, layer: int, start: int = 0, stop: int | None = None,
                     check: bool = True) -> Iterator[tuple[int, memoryview]]:
        stop = self.rows if stop is None else min(stop, self.rows)
        for i, first, n in self.ranges:
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                with self._named(i):
                    for row, value in self._snaps[i].layer_values(layer, lo - first, hi - first, check):
                        yield first + row, value

    def value_at(self, layer: int, first_row: int) -> memoryview:
        snap, start = self._locate(first_row)
        with self._named(self._position(first_row)):
            return snap.value_at(layer, first_row - start)

    def decode(self, layer: int, first_row: int, value, buffers: BlockBuffers, decoder: BlockDecoder):
        snap, start = self._locate(first_row)
        with self._named(self._position(first_row)):
            return snap.decode(layer, first_row - start, value, buffers, decoder)

    def blocks(self, start: int = 0, stop: int | None = None, layers: Sequence[int] | None = None,
               buffers: BlockBuffers | None = None, decoder: BlockDecoder | None = None):
        stop = self.rows if stop is None else min(stop, self.rows)
        buffers = buffers or BlockBuffers(self.layout)
        decoder = decoder or BlockDecoder()
        for i, first, n in self.ranges:
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                with self._named(i):
                    for row, count, factors in self._snaps[i].blocks(lo - first, hi - first, layers, buffers, decoder):
                        yield first + row, count, factors

    def row(self, row: int):
        snap, start = self._locate(row)
        with self._named(self._position(row)):
            return snap.row(row - start)

    # -- ids
    def id_of(self, row: int) -> str:
        snap, start = self._locate(row)
        with self._named(self._position(row)):
            return snap.id_of(row - start)

    def ids(self, start: int, stop: int) -> list[str]:
        out: list[str] = []
        for i, first, n in self.ranges:
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                with self._named(i):
                    out += self._snaps[i].ids(lo - first, hi - first)
        return out

    def row_of(self, example_id: str) -> int | None:
        for i, first, _ in self.ranges:
            with self._named(i):
                row = self._snaps[i].row_of(example_id)
            if row is not None:
                return first + row
        return None

    # -- the index-wide state: the head shard's
    def _head(self):
        if 0 not in self._snaps:
            raise ValueError(f"this reader of index {self._reader.path} does not hold its head shard (shard 0)")
        return self._snaps[0]

    def array(self, name: str):
        return self._head().array(name)

    def state_meta(self, name: str):
        return self._head().state_meta(name)

    def manifest(self):
        return self._head().manifest()


_LOCAL_ROWS = re.compile(r"\b(rows?) (\d+)(?:\.\.(\d+))?")


def shard_message(path, entry: ShardEntry, message: str) -> str:
    """A shard's error, one line, naming the shard and with its rows as the index's (global) rows."""
    message = message.strip().splitlines()[0] if message.strip() else "error"
    own = f"index {Path(path) / entry.name}: "
    if message.startswith(own):
        message = message[len(own):]

    def to_global(m: re.Match) -> str:
        first = int(m.group(2)) + entry.start
        last = f"..{int(m.group(3)) + entry.start}" if m.group(3) else ""
        return f"{m.group(1)} {first}{last}"

    return (f"index {path}: shard {entry.name} (rows {entry.start}..{entry.stop - 1}): "
            f"{_LOCAL_ROWS.sub(to_global, message)}")


@dataclass
class ShardCheck:
    """What verify found about the shards as a whole (beyond each shard's own records)."""

    errors: list[str] = field(default_factory=list)


def check_manifest_against_shards(path) -> ShardCheck:
    """Every listed shard exists, is the shard the manifest says, and holds its rows when its segment
    is finalized; no directory beside them looks like an unlisted shard."""
    path = Path(path)
    out = ShardCheck()
    manifest = read_manifest(path)
    for i, entry in enumerate(manifest.shards):
        shard_path = path / entry.name
        segment = next(s for s in manifest.segments if s["shards"][0] <= i < s["shards"][1])
        if not (shard_path / DATA_FILE).exists():
            if segment.get("finalized"):  # an unfinished build or append may not have started every shard yet
                out.errors.append(f"shard {entry.name} (rows {entry.start}..{entry.stop - 1}) is missing")
            continue
        try:
            with IndexReader(shard_path, strict=False) as reader, reader.snapshot(strict=False) as snap:
                own = (reader.settings or {}).get("shard") or {}
                if own.get("start") != entry.start or own.get("count") != entry.count:
                    out.errors.append(f"shard {entry.name} says rows {own.get('start')}.. (+{own.get('count')}), "
                                      f"the manifest {entry.start}.. (+{entry.count})")
                if segment.get("finalized") and snap.rows != entry.count:
                    out.errors.append(f"shard {entry.name} holds {snap.rows} rows; its finished {segment['kind']} "
                                      f"gave it {entry.count}")
        except Exception as e:  # the shard's own verify names what is wrong inside it
            out.errors.append(f"shard {entry.name} cannot be opened: {str(e).splitlines()[0] if str(e) else e}")
    listed = {s.name for s in manifest.shards}
    for p in sorted(path.glob("shard-*")):
        if p.is_dir() and p.name not in listed:
            out.errors.append(f"directory {p.name} looks like a shard but {MANIFEST_FILE} does not list it")
    return out
