"""The Task: everything lorif-stream needs to know about *your* model and data.

An attribution run needs a model, the training examples to index, the query examples to
explain, a way to batch examples, and the per-example loss whose gradients are attributed.
You provide them by writing a small class -- subclass :class:`Task`, or any object with the
same methods (duck typing works too) -- in a Python file, and pass it to the CLI as
``--task path/to/file.py:NAME`` (or ``package.module:NAME``)::

    import torch
    from lorif_stream import Task

    class MyTask(Task):
        tracked_modules = r"mlp"            # optional: regex over module names (None = all)

        def model(self):
            model = MyNet()
            model.load_state_dict(torch.load("weights.pt"))
            return model                      # the engine moves it and calls .eval()

        def train_examples(self):
            return my_train_list              # len() known, same order every time

        def query_examples(self):
            return my_query_list

        def collate(self, examples):
            return {"x": torch.stack([e["x"] for e in examples]),
                    "y": torch.tensor([e["y"] for e in examples])}

        def loss(self, model, batch):
            logits = model(batch["x"])
            # reduction="none": ONE loss per example, shape (B,)
            return torch.nn.functional.cross_entropy(logits, batch["y"], reduction="none")

Rules that matter for correct attributions:

* ``loss`` returns a ``(B,)`` tensor, one value per example, each depending on its own example
  only. The engine differentiates ``loss.sum()`` and reads example b's gradient from row b, so
  never average over the batch, and do not use layers that mix examples (batch norm in train
  mode; the engine puts the model in eval mode).
* For sequences, a per-example loss is the **sum** over its tokens (not the mean), with padding
  masked out, so that padded and unpadded runs of an example agree and its gradient equals the
  sum of its tokens' gradients.
* The batch ``collate`` returns is moved to the model's device by the engine when it is a
  tensor or a (nested) dict / list / tuple of tensors.
* ``measurement(model, batch)`` is the quantity a query's attribution explains; it defaults
  to ``loss``. Override it to explain, e.g., the log-probability of one answer only.
* ``example_id(example, index)`` names an example in the results; it defaults to
  ``str(index)``, the example's position in ``train_examples()`` / ``query_examples()``.

:func:`load_task` turns a ``file.py:NAME`` string into a validated task;
:class:`HFCausalLMTask` is a ready-made task for a Hugging Face causal LM over local files.
"""

from __future__ import annotations

import bisect
import collections
import gzip
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import HF_MODEL_DTYPES

__all__ = [
    "TaskLoadError",
    "Task",
    "REQUIRED_METHODS",
    "resolve_task",
    "load_task",
    "HFCausalLMTask",
    "open_records",
    "JsonlRecords",
    "GzipJsonlRecords",
    "ParquetRecords",
    "DiskDatasetRecords",
    "print_top_proponents",
]

REQUIRED_METHODS = ("model", "train_examples", "query_examples", "collate", "loss")


class TaskLoadError(ValueError):
    """A task could not be loaded or is malformed; the message says what and where."""


class Task:
    """Base class documenting the task protocol (see the module docstring for a full example).

    Subclasses implement :meth:`model`, :meth:`train_examples`, :meth:`query_examples`,
    :meth:`collate` and :meth:`loss`; :meth:`measurement`, :meth:`example_id` and
    :attr:`tracked_modules` have defaults.
    """

    #: Regex selecting the tracked ``nn.Linear`` / HF ``Conv1D`` modules by qualified name
    #: (``re.search``), e.g. ``r"\.mlp\."``; ``None`` tracks every one of them.
    tracked_modules: str | None = None

    def model(self) -> torch.nn.Module:
        """Return the model with its weights loaded. The engine moves it to the device and puts
        it in eval mode; its parameters must require grad (the default)."""
        raise NotImplementedError

    def train_examples(self) -> Sequence:
        """Return the training examples to index: a sequence with ``len()``, in the same order
        every call (row i of the index is example i)."""
        raise NotImplementedError

    def query_examples(self) -> Sequence:
        """Return the examples whose predictions are explained (may be empty when only
        building an index)."""
        raise NotImplementedError

    def collate(self, examples: list) -> Any:
        """Turn a list of examples into one batch for :meth:`loss` / :meth:`measurement`."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Per-example training loss, shape ``(B,)``: each row depends on its own example only;
        sequence losses are SUMS over tokens with padding masked."""
        raise NotImplementedError

    def measurement(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Per-example quantity whose attribution a query asks for, shape ``(B,)``; defaults to
        :meth:`loss`."""
        return self.loss(model, batch)

    def example_id(self, example: Any, index: int) -> str:
        """A string naming ``example`` (at position ``index``) in results; defaults to the
        index."""
        return str(index)


class _DuckTask(Task):
    """Adapts an object that has the task methods but does not subclass :class:`Task`."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped
        self.tracked_modules = getattr(wrapped, "tracked_modules", None)

    def model(self):
        return self.wrapped.model()

    def train_examples(self):
        return self.wrapped.train_examples()

    def query_examples(self):
        return self.wrapped.query_examples()

    def collate(self, examples):
        return self.wrapped.collate(examples)

    def loss(self, model, batch):
        return self.wrapped.loss(model, batch)

    def measurement(self, model, batch):
        method = getattr(self.wrapped, "measurement", None)
        return method(model, batch) if callable(method) else self.wrapped.loss(model, batch)

    def example_id(self, example, index):
        method = getattr(self.wrapped, "example_id", None)
        return str(method(example, index)) if callable(method) else str(index)

    def __getattr__(self, name: str):
        # Extra attributes of the user's object (a name, settings...) stay reachable.
        if name == "wrapped":  # not yet set: avoid recursion during construction
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __repr__(self) -> str:
        return f"Task({self.wrapped!r})"


def _missing_methods(obj: Any) -> list[str]:
    missing = []
    for name in REQUIRED_METHODS:
        method = getattr(obj, name, None)
        if not callable(method):
            missing.append(name)
        elif isinstance(obj, Task) and getattr(type(obj), name, None) is getattr(Task, name):
            missing.append(name)  # a Task subclass that did not override a required method
    return missing


def _check_tracked_modules(task: Task, where: str) -> None:
    pattern = task.tracked_modules
    if pattern is None:
        return
    if not isinstance(pattern, str):
        raise TaskLoadError(f"{where}: tracked_modules must be a regex string or None, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise TaskLoadError(f"{where}: tracked_modules {pattern!r} is not a valid regex: {exc}") from None


def resolve_task(obj: Any) -> Task:
    """Validate ``obj`` and return it as a :class:`Task` with every optional part filled in.

    ``obj`` may be a :class:`Task` instance (returned as is), a class (instantiated with no
    arguments) or any object providing the required methods (wrapped; ``measurement``,
    ``example_id`` and ``tracked_modules`` get their defaults when absent).
    """
    where = f"task {getattr(obj, '__name__', type(obj).__name__)}"
    if inspect.isclass(obj):
        missing = _missing_methods(obj) if not issubclass(obj, Task) else [
            name for name in REQUIRED_METHODS if getattr(obj, name, None) is getattr(Task, name)
        ]
        if missing:
            raise TaskLoadError(f"{where} is missing required method(s): {', '.join(missing)}")
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001 - any failure of user code is reported as such
            raise TaskLoadError(f"could not instantiate {where}(): {type(exc).__name__}: {exc}") from exc
    missing = _missing_methods(obj)
    if missing:
        raise TaskLoadError(
            f"{where} is missing required method(s): {', '.join(missing)} "
            f"(a task needs {', '.join(REQUIRED_METHODS)})"
        )
    task = obj if isinstance(obj, Task) else _DuckTask(obj)
    _check_tracked_modules(task, where)
    return task


def _looks_like_path(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or os.sep in module_part


def _import_file(path_text: str, spec_text: str):
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise TaskLoadError(f"task file not found: {path} (from {spec_text!r})")
    path = path.resolve()
    # A unique module name per file: two task files both called task.py must not collide.
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:10]
    module_name = f"_lorif_task_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TaskLoadError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Like running a script: the task file can import its sibling modules.
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    sys.modules[module_name] = module  # dataclasses / pickling look the module up here
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[module_name]
        if not isinstance(exc, Exception):
            raise
        raise TaskLoadError(f"error while importing task file {path}: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(name: str, spec_text: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        raise TaskLoadError(
            f"cannot import module {name!r} (from {spec_text!r}): {type(exc).__name__}: {exc}"
        ) from exc


def load_task(spec: str) -> Task:
    """Load a task from ``"path/to/file.py:NAME"`` or ``"package.module:NAME"``.

    ``NAME`` (dotted attribute paths like ``tasks.Small`` work) may be a class (instantiated
    with no arguments), a zero-argument factory function, or a task instance. Every failure
    raises :class:`TaskLoadError` with a one-line message.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise TaskLoadError(
            f"task spec {spec!r} must look like path/to/file.py:NAME or package.module:NAME "
            "(missing ':NAME')"
        )
    module_part, _, name = spec.rpartition(":")
    if not module_part or not name:
        raise TaskLoadError(
            f"task spec {spec!r} must look like path/to/file.py:NAME or package.module:NAME"
        )
    if _looks_like_path(module_part):
        module = _import_file(module_part, spec)
        source = module_part
    else:
        module = _import_module(module_part, spec)
        source = f"module {module_part}"

    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            candidates = sorted(
                attr for attr, value in vars(module).items()
                if not attr.startswith("_") and (inspect.isclass(value) or callable(value))
                and getattr(value, "__module__", None) == module.__name__
            )
            hint = f"; it defines: {', '.join(candidates)}" if candidates else ""
            raise TaskLoadError(f"{source} has no attribute {name!r}{hint}")
        obj = getattr(obj, part)

    if inspect.isclass(obj) or not _missing_methods(obj):
        return resolve_task(obj)
    if callable(obj):  # a factory function
        try:
            made = obj()
        except Exception as exc:  # noqa: BLE001
            raise TaskLoadError(f"task factory {name}() in {source} failed: {type(exc).__name__}: {exc}") from exc
        missing = _missing_methods(made)
        if missing:
            raise TaskLoadError(
                f"task factory {name}() in {source} returned a {type(made).__name__}, which is "
                f"missing required method(s): {', '.join(missing)}"
            )
        return resolve_task(made)
    raise TaskLoadError(
        f"{name} in {source} is a {type(obj).__name__}, not a task class, factory or instance "
        f"(missing method(s): {', '.join(_missing_methods(obj))})"
    )


# --------------------------------------------------------------------------------------------
# Record sources: .jsonl (lazy, by line offset), .jsonl.gz (read eagerly: gzip has no random
# access), .parquet (lazy, by row group) and datasets.save_to_disk folders (memory-mapped by the
# datasets library).


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


class _ExampleView(_Indexed):
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
        if isinstance(other, (list, tuple, _ExampleView)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented


# --------------------------------------------------------------------------------------------
# Built-in task: a Hugging Face causal LM over local files.


def _record_checker(fields: Sequence[str], id_field: str | None) -> Callable[[dict, Callable[[], str]], None]:
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


def _converter(records: RecordSource, fields: dict[str, str], id_field: str | None):
    """``record, index -> {"id": str, <key>: str for key, field in fields}``, validating."""
    check = _record_checker(list(fields.values()), id_field)

    def convert(record: dict, index: int) -> dict:
        check(record, lambda: records.where(index))
        example = {"id": records.default_id(index) if id_field is None else str(record[id_field])}
        example.update({key: record[field] for key, field in fields.items()})
        return example

    return convert


_TOKENIZER_PROBE = "Hello, world! 12345 naïve café \u4e2d\u6587 \U0001F600\n\tend"


def tokenizer_digest(tokenizer) -> str:
    """A digest of what a tokenizer does: its full definition when it is a fast one (normalizer,
    pre-tokenizer, model, added tokens; minus the padding/truncation state calls change), else its
    vocabulary; plus its special tokens, chat template and the encoding of a probe text."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    rest = {"special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "pad": str(tokenizer.pad_token), "chat_template": str(getattr(tokenizer, "chat_template", None)),
            "probe": [tokenizer(_TOKENIZER_PROBE)["input_ids"],
                      tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]]}
    h.update(json.dumps(rest, sort_keys=True).encode("utf-8"))
    return h.hexdigest()[:16]


# --hf-dtype (config.HF_MODEL_DTYPES) -> from_pretrained's dtype ("auto": the checkpoint's own)
MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}
assert tuple(MODEL_DTYPES) == HF_MODEL_DTYPES


class HFCausalLMTask(Task):
    """Attribute a Hugging Face causal LM's next-token loss to training texts, all from local files.

    Args:
        model_dir: a ``save_pretrained`` folder holding the model *and* its tokenizer (loaded
            with ``AutoModelForCausalLM`` / ``AutoTokenizer``, ``local_files_only=True``: no hub
            access).
        train_data: the training records: a ``.jsonl`` file (one JSON object per line; read
            lazily: one pass keeps each line's offset, then lines are read one by one), a
            ``.jsonl.gz`` file (parsed into memory: gzip has no random access), a ``.parquet``
            file (read lazily, one row group at a time) or a ``datasets.save_to_disk`` folder
            (memory-mapped; needs the ``data`` extra).
            ``None`` gives no training examples (enough to query an existing index).
        query_data: same formats for the queries; ``None`` gives no queries (enough to build).
        text_field: key of the text in each record (plain-text mode).
        id_field: key of the example id; ``None`` uses the 1-based line number for jsonl and the
            0-based row index for parquet / datasets folders.
        max_length: examples are truncated to this many tokens (and to the model's context size).
        prompt_field, completion_field: prompt/completion mode (give both): the loss is summed
            over the completion's tokens only; prompt tokens get label -100.
        chat_template: wrap each example with the tokenizer's chat template (a user turn holding
            the prompt, an assistant turn holding the completion); refused when the tokenizer
            has none.
        skip_empty: skip (instead of refusing) examples with no scored completion token after
            truncation; their ids are in ``skipped_ids["train" | "query"]``.
        model_dtype: the weights' dtype once loaded: ``"fp32"`` (default), ``"bf16"``, ``"fp16"``
            or ``"auto"`` (the checkpoint's own). Half precision halves the model's memory (a
            7B model: 14 GB instead of 28); projections and sums stay fp32 either way. Build and
            query must use the same dtype (it changes the gradients; the model fingerprint
            tells them apart).

    The loss of an example is the SUM over its tokens of the next-token cross-entropy, padding
    masked; batches are right-padded, so real tokens never see padding (causal attention) and
    keep their positions. If the tokenizer has no pad token, an existing special token (eos,
    unk or bos; else token 0) is used: padded positions are masked anyway, and the model's
    vocabulary is left untouched.

    Prompt/completion encoding and truncation: the prompt is tokenized with the tokenizer's
    special tokens (e.g. a BOS), the completion without (no EOS is appended: put one in the
    text, or use the chat template, whose end-of-turn marker belongs to the completion). With
    ``L`` = the token budget, ``P`` / ``C`` the prompt / completion token counts: if ``P + C > L``
    the prompt keeps its LAST ``p = min(P, max(L - C, L // 2))`` tokens and the completion its
    FIRST ``L - p`` -- the text nearest the prompt/completion boundary survives, and neither
    side is cut below half the budget while it needs it. An example with no scored completion
    token (empty completion, or a one-token completion with no prompt token before it) is
    refused naming its id, or skipped when ``skip_empty``; this is checked for every example
    (a tokenization pass) when the examples are first asked for.
    """

    tracked_modules = None

    def __init__(
        self,
        model_dir: str | os.PathLike,
        train_data: str | os.PathLike | None,
        query_data: str | os.PathLike | None = None,
        text_field: str = "text",
        id_field: str | None = None,
        max_length: int = 512,
        prompt_field: str | None = None,
        completion_field: str | None = None,
        chat_template: bool = False,
        skip_empty: bool = False,
        model_dtype: str = "fp32",
    ) -> None:
        self.model_dir = Path(model_dir).expanduser()
        if not self.model_dir.is_dir():
            raise TaskLoadError(f"model directory not found: {self.model_dir}")
        if not (self.model_dir / "config.json").is_file():
            raise TaskLoadError(f"{self.model_dir} has no config.json: not a save_pretrained folder")
        self.train_data = None if train_data is None else Path(train_data).expanduser()
        self.query_data = None if query_data is None else Path(query_data).expanduser()
        for label, path in (("train", self.train_data), ("query", self.query_data)):
            if path is not None and not path.exists():
                raise TaskLoadError(f"{label} data file not found: {path}")
        if not isinstance(text_field, str) or not text_field:
            raise TaskLoadError(f"text_field must be a non-empty string, got {text_field!r}")
        if id_field is not None and (not isinstance(id_field, str) or not id_field):
            raise TaskLoadError(f"id_field must be a non-empty string or None, got {id_field!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise TaskLoadError(f"max_length must be an int >= 2, got {max_length!r}")
        for name, value in (("prompt_field", prompt_field), ("completion_field", completion_field)):
            if value is not None and (not isinstance(value, str) or not value):
                raise TaskLoadError(f"{name} must be a non-empty string or None, got {value!r}")
        if (prompt_field is None) != (completion_field is None):
            raise TaskLoadError("give both prompt_field and completion_field (--prompt-field/--completion-field), or neither")
        if chat_template and prompt_field is None:
            raise TaskLoadError("chat_template (--chat-template) needs prompt_field and completion_field")
        if skip_empty and prompt_field is None:
            raise TaskLoadError("skip_empty (--skip-empty) needs prompt_field and completion_field")
        if model_dtype not in MODEL_DTYPES:
            raise TaskLoadError(f"model_dtype (--hf-dtype) must be one of {sorted(MODEL_DTYPES)}, got {model_dtype!r}")
        self.model_dtype = model_dtype
        self.text_field = text_field
        self.id_field = id_field
        self.max_length = max_length
        self.prompt_field = prompt_field
        self.completion_field = completion_field
        self.chat_template = bool(chat_template)
        self.skip_empty = bool(skip_empty)
        self.skipped_ids: dict[str, list[str]] = {"train": [], "query": []}
        self._tokenizer = None
        self._context = None
        self._train: Sequence | None = None
        self._query: Sequence | None = None

    @property
    def prompt_completion(self) -> bool:
        return self.prompt_field is not None

    # the index keeps a few training examples (plain JSON dicts) to recompute at query time
    records_probes = True

    def encoding_settings(self) -> dict:
        """What decides how an example becomes tokens: recorded in the index at build, compared by
        query, report and append (task_check.py), so another option is refused naming it."""
        pc = self.prompt_completion
        return {"kind": "hf-causal-lm", "text_field": None if pc else self.text_field,
                "prompt_field": self.prompt_field, "completion_field": self.completion_field,
                "chat_template": self.chat_template, "skip_empty": self.skip_empty,
                "max_length": self.max_length, "context_length": self.context_length,
                "tokenizer": tokenizer_digest(self.tokenizer)}

    def __repr__(self) -> str:
        return (
            f"HFCausalLMTask(model_dir={str(self.model_dir)!r}, train_data={str(self.train_data)!r}, "
            f"query_data={None if self.query_data is None else str(self.query_data)!r})"
        )

    # -- model and tokenizer ------------------------------------------------------------------
    def model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        try:
            import transformers

            # transformers 4.56 renamed torch_dtype to dtype (and warns about the old name)
            major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
            key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
            return AutoModelForCausalLM.from_pretrained(self.model_dir, local_files_only=True,
                                                        **{key: MODEL_DTYPES[self.model_dtype]})
        except Exception as exc:  # noqa: BLE001
            raise TaskLoadError(f"cannot load a causal LM from {self.model_dir}: {type(exc).__name__}: {exc}") from exc

    @property
    def tokenizer(self):
        """The folder's tokenizer, right-padding, with a pad token."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            except Exception as exc:  # noqa: BLE001
                raise TaskLoadError(
                    f"cannot load a tokenizer from {self.model_dir}: {type(exc).__name__}: {exc}"
                ) from exc
            tokenizer.padding_side = "right"
            if tokenizer.pad_token is None:
                fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
                tokenizer.pad_token = fallback or tokenizer.convert_ids_to_tokens(0)
            if self.chat_template and not getattr(tokenizer, "chat_template", None):
                raise TaskLoadError(
                    f"--chat-template: the tokenizer in {self.model_dir} has no chat template "
                    "(tokenizer_config.json has no 'chat_template'); drop --chat-template"
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def context_length(self) -> int:
        """``max_length`` capped by the model's position-embedding size (read from config.json)."""
        if self._context is None:
            with (self.model_dir / "config.json").open("r", encoding="utf-8") as handle:
                config = json.load(handle)
            limit = config.get("max_position_embeddings") or config.get("n_positions")
            self._context = min(self.max_length, int(limit)) if limit else self.max_length
        return self._context

    # -- data -----------------------------------------------------------------------------------
    def _fields(self) -> dict[str, str]:
        if self.prompt_completion:
            return {"prompt": self.prompt_field, "completion": self.completion_field}
        return {"text": self.text_field}

    def _load(self, path: Path, label: str) -> Sequence:
        fields = self._fields()
        columns = list(fields.values()) + ([self.id_field] if self.id_field else [])
        # jsonl records are all validated while the file is opened (one pass); the table formats
        # check their schema there and each value when read
        records = open_records(path, columns, check=_record_checker(list(fields.values()), self.id_field))
        examples: Sequence = _ExampleView(records, _converter(records, fields, self.id_field))
        if not self.prompt_completion:
            return examples
        keep, skipped = [], []
        for i in range(len(examples)):
            example = examples[i]
            if self._scored_tokens(example) > 0:
                keep.append(i)
            elif self.skip_empty:
                skipped.append(example["id"])
            else:
                raise TaskLoadError(
                    f"{label} example {example['id']!r} ({path}) has no completion token left to score after "
                    f"truncation to {self.context_length} tokens (empty completion?); fix it, or pass "
                    "--skip-empty (skip_empty=True) to skip such examples"
                )
        self.skipped_ids[label] = skipped
        if skipped:
            shown = ", ".join(repr(s) for s in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            print(f"lorif-stream: skipped {len(skipped)} of {len(examples)} {label} examples with no completion "
                  f"token left after truncation (ids: {shown})", file=sys.stderr)
        if not skipped:
            return examples
        return _ExampleView(examples.records, examples.convert, keep)

    def train_examples(self) -> Sequence:
        if self.train_data is None:
            return []
        if self._train is None:
            self._train = self._load(self.train_data, "train")
        return self._train

    def query_examples(self) -> Sequence:
        if self.query_data is None:
            return []
        if self._query is None:
            self._query = self._load(self.query_data, "query")
        return self._query

    def example_id(self, example: dict, index: int) -> str:
        return example["id"]

    def example_text(self, example: dict) -> str:
        """The example's text (prompt and completion joined by a space), for display."""
        if "text" in example:
            return example["text"]
        return f"{example['prompt']} {example['completion']}"

    # -- prompt/completion encoding -------------------------------------------------------------
    def encode_pair(self, example: dict) -> tuple[list[int], int]:
        """``(token ids, number of leading prompt tokens)`` of a prompt/completion example,
        chat template applied and truncated by the rule in the class docstring."""
        tokenizer = self.tokenizer
        prompt, completion = example["prompt"], example["completion"]
        if self.chat_template:
            user = [{"role": "user", "content": prompt}]
            head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": completion}], tokenize=False
            )
            prompt = head
            completion = full[len(head):] if full.startswith(head) else completion
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tokenizer(prompt)["input_ids"]  # with special tokens: a BOS when the tokenizer adds one
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else []
        budget = self.context_length
        n_p, n_c = len(prompt_ids), len(completion_ids)
        if n_p + n_c > budget:
            p = min(n_p, max(budget - n_c, budget // 2))
            prompt_ids = prompt_ids[n_p - p:]
            completion_ids = completion_ids[: budget - p]
        return list(prompt_ids) + list(completion_ids), len(prompt_ids)

    def _scored_tokens(self, example: dict) -> int:
        ids, n_prompt = self.encode_pair(example)
        return len(ids) - max(n_prompt, 1)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` / ``attention_mask`` and ``labels`` (-100 on padding, and on
        the prompt in prompt/completion mode)."""
        if not self.prompt_completion:
            encoded = self.tokenizer(
                [example["text"] for example in examples],
                padding=True,
                truncation=True,
                max_length=self.context_length,
                return_tensors="pt",
            )
            input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pairs = [self.encode_pair(example) for example in examples]
        width = max(1, max(len(ids) for ids, _ in pairs))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
        labels = torch.full((len(pairs), width), -100, dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(pairs):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            labels[row, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example SUM of next-token cross-entropy over scored tokens, shape ``(B,)``, fp32."""
        device = next(model.parameters()).device
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        labels = batch["labels"].to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        # Token t predicts token t+1; fp32 so bf16 models still sum losses accurately.
        logits = logits[:, :-1, :].float()
        targets = labels[:, 1:]
        token_losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
        )
        return token_losses.view(targets.shape).sum(dim=1)


# --------------------------------------------------------------------------------------------
# Terminal summary of query results.


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def top_proponent_lines(task: Any, results: Sequence[dict], width: int = 80) -> list[str]:
    """One line per query: its id, its top proponent's id and score, and the first ``width``
    characters of that proponent's text when the task can give it (``task.example_text`` and
    training examples whose id at that row matches the index)."""
    text_of = getattr(task, "example_text", None)
    examples = None
    if callable(text_of):
        try:
            examples = task.train_examples()
        except Exception:  # noqa: BLE001 - a summary never fails the command
            examples = None
    lines = []
    for result in results:
        proponents = result.get("proponents") or []
        if not proponents:
            lines.append(f"{result['id']}: no proponents")
            continue
        top = proponents[0]
        line = f"{result['id']}: top proponent {top['id']} (score {top['score']:.4g})"
        row = top.get("row")
        if examples is not None and row is not None and 0 <= row < len(examples):
            try:
                example = examples[row]
                if str(task.example_id(example, row)) == str(top["id"]):
                    line += f"  {_one_line(str(text_of(example)), width)!r}"
            except Exception:  # noqa: BLE001
                pass
        lines.append(line)
    return lines


def print_top_proponents(task: Any, results: Sequence[dict], stream=None, width: int = 80, limit: int = 20) -> bool:
    """Print :func:`top_proponent_lines` for the first ``limit`` queries to ``stream`` (default
    stdout) when it is a terminal; returns whether it printed. Piped output stays clean."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()) or not results:
        return False
    for line in top_proponent_lines(task, results[:limit], width):
        print(line, file=stream)
    if len(results) > limit:
        print(f"... {len(results) - limit} more queries in the results file", file=stream)
    return True
