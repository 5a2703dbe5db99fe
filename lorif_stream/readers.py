"""Data readers: training and query records from .jsonl (lazy, by line offset), .jsonl.gz (read
eagerly: gzip has no random access), .parquet (lazy, by row group) and datasets.save_to_disk
folders (memory-mapped by the datasets library), and the view that turns records into examples.

The built-in HF task reads its data through here, and the report reads the texts of the rows it
shows the same way; errors are TaskLoadError naming the file and the line or row.
"""

from __future__ import annotations

import bisect
import collections
import gzip
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from .task import TaskLoadError

__all__ = [
    "RecordSource",
    "JsonlRecords",
    "GzipJsonlRecords",
    "ParquetRecords",
    "DiskDatasetRecords",
    "open_records",
    "ExampleView",
    "record_checker",
    "example_converter",
]


class _Indexed(Sequence):
    """A Sequence whose subclass gives ``_item(i)`` for ``0 <= i < len(self)``; negative indices,
    range checks and slices are handled here once."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(len(self)))]
        return self._item(_index(index, len(self)))

    def _item(self, i: int):
        raise NotImplementedError


class RecordSource(_Indexed):
    """A read-only sequence of records (dicts) from one file or folder, with ``len()``.

    ``default_id(i)`` names record i when no id field is given and ``where(i)`` locates it in
    error messages.
    """

    path: Path

    def default_id(self, index: int) -> str:
        return str(index)

    def where(self, index: int) -> str:
        return f"{self.path} row {index}"

    def check_fields(self, fields: Sequence[str]) -> None:
        """Refuse early (before any work) when a needed column is missing; no-op by default."""

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except (TaskLoadError, IndexError):
            raise
        except Exception as exc:  # noqa: BLE001 - a reader's own error (pyarrow, datasets, OS) names no row
            where = self.where(index) if isinstance(index, int) else str(self.path)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise TaskLoadError(f"{where}: cannot read the record: {type(exc).__name__}: {reason}") from None


def _index(index: Any, n: int) -> int:
    i = index.__index__()
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"record index {index} out of range for {n} records")
    return i


def _parse_jsonl_line(raw: bytes, path: Path, lineno: int) -> dict | None:
    """One line of a jsonl file as a dict (None for a blank line); bad UTF-8, bad JSON and
    non-objects name the file and line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskLoadError(f"{path}:{lineno}: invalid UTF-8 ({exc.reason} at byte {exc.start} of the line)") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TaskLoadError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(record, dict):
        raise TaskLoadError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


class JsonlRecords(RecordSource):
    """Every JSON object of a plain ``.jsonl`` file (blank lines skipped), read lazily by row.

    Opening makes one pass that checks every line parses and keeps only where each record starts
    (8 bytes per record, plus 16 per run of blank lines): ``self[i]`` then reads and parses line
    i alone (``os.pread``, safe from several threads), so memory does not grow with the text.
    Ids default to the 1-based line number. Bad UTF-8, bad JSON and non-objects name the file and
    line; a file changed after opening is refused rather than read at stale offsets.
    ``check(record, where)``, when given, sees every record during that pass (validation
    before any work, without a second read). ``validate=False`` makes that pass a bare newline
    scan, for a reader that needs a few rows of a big file; a bad line is then found when read.
    """

    def __init__(self, path: str | os.PathLike, check: Callable[[dict, Callable[[], str]], None] | None = None,
                 validate: bool = True) -> None:
        import array

        self.path = Path(path)
        self._offsets = array.array("q")     # start of record i; one more entry: the end of the file
        self._blank_at = array.array("q")     # record indices preceded by blank lines ...
        self._blank_before = array.array("q")  # ... and how many blank lines precede them in all
        blank = 0
        try:
            with open(self.path, "rb") as handle:
                offset = 0
                for lineno, raw in enumerate(handle, start=1):
                    record = _parse_jsonl_line(raw, self.path, lineno) if validate else (raw.strip() or None)
                    if record is None:
                        blank += 1
                    else:
                        if check is not None and validate:
                            check(record, lambda: f"{self.path}:{lineno}")
                        if blank != (self._blank_before[-1] if self._blank_before else 0):
                            self._blank_at.append(len(self._offsets))
                            self._blank_before.append(blank)
                        self._offsets.append(offset)
                    offset += len(raw)
                self._offsets.append(offset)
                self._stamp = _file_stamp(os.fstat(handle.fileno()))
        except OSError as exc:
            raise TaskLoadError(f"cannot read {self.path}: {type(exc).__name__}: {exc}") from None
        self._file = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def line(self, index: int) -> int:
        """The 1-based line number of record ``index``."""
        k = bisect.bisect_right(self._blank_at, index) - 1
        return index + 1 + (self._blank_before[k] if k >= 0 else 0)

    def _read(self, start: int, size: int) -> bytes:
        with self._lock:  # opened once per process; pread itself needs no lock
            if self._file is None:
                self._file = open(self.path, "rb", buffering=0)
            if _file_stamp(os.fstat(self._file.fileno())) != self._stamp:
                raise TaskLoadError(f"{self.path} changed since it was opened: rerun the command")
            if not hasattr(os, "pread"):  # Windows: seek + read under the lock
                self._file.seek(start)
                return self._file.read(size)
        return os.pread(self._file.fileno(), size, start)

    def _item(self, i: int):
        start, end = self._offsets[i], self._offsets[i + 1]
        raw = self._read(start, end - start)  # the line and any blank lines after it
        record = _parse_jsonl_line(raw, self.path, self.line(i)) if len(raw) == end - start else None
        if record is None:
            raise TaskLoadError(f"{self.path} changed since it was opened: rerun the command")
        return record

    def default_id(self, index: int) -> str:
        return str(self.line(index))

    def where(self, index: int) -> str:
        return f"{self.path}:{self.line(index)}"

    def __getstate__(self):  # file handles and locks do not pickle: reopened on first read
        state = dict(self.__dict__)
        state["_file"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _file_stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


class GzipJsonlRecords(RecordSource):
    """Every JSON object of a ``.jsonl.gz`` file (blank lines skipped), parsed into memory at
    open: a gzip stream has no random access (reaching row i means decompressing everything
    before it), so for a corpus larger than RAM use plain ``.jsonl`` or ``.parquet``. Ids
    default to the 1-based line number; errors name the file and line."""

    def __init__(self, path: str | os.PathLike, check: Callable[[dict, Callable[[], str]], None] | None = None) -> None:
        self.path = Path(path)
        self._records: list[dict] = []
        self._lines: list[int] = []
        try:
            with gzip.open(self.path, "rb") as handle:
                for lineno, raw in enumerate(handle, start=1):
                    record = _parse_jsonl_line(raw, self.path, lineno)
                    if record is not None:
                        if check is not None:
                            check(record, lambda: f"{self.path}:{lineno}")
                        self._records.append(record)
                        self._lines.append(lineno)
        except (OSError, EOFError) as exc:  # e.g. a truncated or non-gzip .gz file
            raise TaskLoadError(f"cannot read {self.path}: {type(exc).__name__}: {exc}") from None

    def __len__(self) -> int:
        return len(self._records)

    def _item(self, i: int):
        return self._records[i]

    def default_id(self, index: int) -> str:
        return str(self._lines[index])

    def where(self, index: int) -> str:
        return f"{self.path}:{self._lines[index]}"


class ParquetRecords(RecordSource):
    """Rows of a ``.parquet`` file, read lazily with pyarrow one row group at a time.

    ``len()`` comes from the file's metadata; ``self[i]`` reads only the row group holding row i
    (only the needed ``columns``) and keeps the last ``cache_groups`` decoded row groups in an
    LRU, so sequential access decodes each row group once. ``group_reads`` counts row-group
    reads. Ids default to the 0-based row index.
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str] | None = None, cache_groups: int = 4) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise TaskLoadError(
                f"reading {path} needs pyarrow: pip install 'lorif-stream[data]' (or pip install pyarrow)"
            ) from None
        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(self.path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types
            raise TaskLoadError(f"cannot read {self.path} as parquet: {type(exc).__name__}: {exc}") from None
        metadata = self._file.metadata
        self._starts = [0]
        for g in range(metadata.num_row_groups):
            self._starts.append(self._starts[-1] + metadata.row_group(g).num_rows)
        self._n = metadata.num_rows
        self.columns = None if columns is None else list(dict.fromkeys(columns))
        if self.columns is not None:
            self.check_fields(self.columns)
        self.cache_groups = max(1, int(cache_groups))
        self._cache: collections.OrderedDict[int, list[dict]] = collections.OrderedDict()
        self.group_reads = 0

    @property
    def num_row_groups(self) -> int:
        return len(self._starts) - 1

    def check_fields(self, fields: Sequence[str]) -> None:
        names = self._file.schema_arrow.names
        missing = [f for f in fields if f not in names]
        if missing:
            raise TaskLoadError(
                f"{self.path}: no column {missing[0]!r} (columns: {', '.join(names) or 'none'})"
            )

    def __len__(self) -> int:
        return self._n

    def _group(self, g: int) -> list[dict]:
        rows = self._cache.get(g)
        if rows is not None:
            self._cache.move_to_end(g)
            return rows
        self.group_reads += 1
        rows = self._file.read_row_group(g, columns=self.columns).to_pylist()
        self._cache[g] = rows
        while len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return rows

    def _item(self, i: int):
        g = bisect.bisect_right(self._starts, i) - 1
        return self._group(g)[i - self._starts[g]]

    def __getstate__(self):  # pyarrow file handles do not pickle: reopen in the new process
        state = dict(self.__dict__)
        state["_file"] = None
        state["_cache"] = collections.OrderedDict()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        import pyarrow.parquet as pq

        self._file = pq.ParquetFile(self.path)


class DiskDatasetRecords(RecordSource):
    """Rows of a ``datasets.Dataset.save_to_disk`` folder, opened with ``datasets.load_from_disk``
    (memory-mapped Arrow files: nothing is read until a row is asked for). Ids default to the
    0-based row index."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        try:
            import datasets
        except ImportError:
            raise TaskLoadError(
                f"{self.path} is a folder: reading a datasets.save_to_disk folder needs the datasets "
                "package: pip install 'lorif-stream[data]'"
            ) from None
        if (self.path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in self.path.iterdir() if p.is_dir())
            raise TaskLoadError(
                f"{self.path} holds a DatasetDict (splits: {', '.join(splits) or 'none'}); "
                f"point at one split's folder, e.g. {self.path / (splits[0] if splits else 'train')}"
            )
        try:
            dataset = datasets.load_from_disk(str(self.path))
        except Exception as exc:  # noqa: BLE001
            raise TaskLoadError(
                f"cannot load {self.path} with datasets.load_from_disk: {type(exc).__name__}: {exc}"
            ) from None
        self._dataset = dataset
        if columns is not None:
            columns = list(dict.fromkeys(columns))
            self.check_fields(columns)
            self._dataset = dataset.select_columns(columns)

    def check_fields(self, fields: Sequence[str]) -> None:
        names = self._dataset.column_names
        missing = [f for f in fields if f not in names]
        if missing:
            raise TaskLoadError(f"{self.path}: no column {missing[0]!r} (columns: {', '.join(names) or 'none'})")

    def __len__(self) -> int:
        return len(self._dataset)

    def _item(self, i: int):
        return self._dataset[i]


def open_records(path: str | os.PathLike, columns: Sequence[str] | None = None,
                 check: Callable[[dict, Callable[[], str]], None] | None = None, validate: bool = True) -> RecordSource:
    """Open ``path`` by kind: ``.jsonl`` / ``.jsonl.gz`` (also ``.json`` lines), ``.parquet``, or a
    ``datasets.save_to_disk`` folder. ``columns`` limits what the table formats read; ``check``
    validates each jsonl record while the file is opened (the table formats check their schema);
    ``validate=False`` opens a plain jsonl file with a newline scan only (see JsonlRecords)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return DiskDatasetRecords(path, columns)
    if not path.is_file():
        raise TaskLoadError(f"data file not found: {path}")
    name = path.name.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return ParquetRecords(path, columns)
    if name.endswith((".jsonl.gz", ".json.gz", ".ndjson.gz")):
        return GzipJsonlRecords(path, check)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return JsonlRecords(path, check, validate)
    raise TaskLoadError(
        f"{path}: unknown data format (expected .jsonl, .jsonl.gz, .parquet or a datasets.save_to_disk folder)"
    )


class ExampleView(_Indexed):
    """``convert(record, index)`` applied lazily to a record source, optionally through a list
    of kept indices (deterministic: same order every time)."""

    def __init__(self, records: Sequence, convert: Callable[[Any, int], dict], keep: Sequence[int] | None = None):
        self.records = records
        self.convert = convert
        self.keep = keep

    def __len__(self) -> int:
        return len(self.records) if self.keep is None else len(self.keep)

    def _item(self, i: int):
        j = i if self.keep is None else self.keep[i]
        return self.convert(self.records[j], j)

    def __eq__(self, other):
        if isinstance(other, (list, tuple, ExampleView)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented



def record_checker(fields: Sequence[str], id_field: str | None) -> Callable[[dict, Callable[[], str]], None]:
    """``check(record, where)``: refuse a record that lacks the id field or a string in each of
    ``fields``; ``where()`` names it in the error (called only then)."""

    def check(record: dict, where: Callable[[], str]) -> None:
        if id_field is not None and record.get(id_field) is None:
            raise TaskLoadError(f"{where()}: no id field {id_field!r}")
        if id_field is not None and isinstance(record[id_field], str):
            _check_unicode(record[id_field], f"id field {id_field!r}", where)
        for field in fields:
            if field not in record:
                raise TaskLoadError(f"{where()}: no field {field!r} (fields: {', '.join(sorted(record)) or 'none'})")
            value = record[field]
            if not isinstance(value, str):
                raise TaskLoadError(f"{where()}: field {field!r} must be a string, got {value!r:.60}")
            _check_unicode(value, f"field {field!r}", where)

    return check


def _check_unicode(value: str, what: str, where: Callable[[], str]) -> None:
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer (nor UTF-8) takes: name them."""
    if value.isascii():  # O(1) for Python strings: the common case costs nothing
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TaskLoadError(f"{where()}: {what} holds a lone surrogate (U+{ord(value[exc.start]):04X} at character "
                            f"{exc.start}): not valid Unicode text") from None


def example_converter(records: RecordSource, fields: dict[str, str], id_field: str | None):
    """``record, index -> {"id": str, <key>: str for key, field in fields}``, validating."""
    check = record_checker(list(fields.values()), id_field)

    def convert(record: dict, index: int) -> dict:
        check(record, lambda: records.where(index))
        example = {"id": records.default_id(index) if id_field is None else str(record[id_field])}
        example.update({key: record[field] for key, field in fields.items()})
        return example

    return convert

