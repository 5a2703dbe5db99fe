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
:class:`~lorif_stream.hf_task.HFCausalLMTask` (hf_task.py) is a ready-made task for a Hugging Face
causal LM over local files, reading them through readers.py.
"""


from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # annotations only: the contract imports no torch
    import torch

__all__ = [
    "TaskLoadError",
    "Task",
    "REQUIRED_METHODS",
    "resolve_task",
    "load_task",
    "top_proponent_lines",
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
