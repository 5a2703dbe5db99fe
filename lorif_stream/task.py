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

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "TaskLoadError",
    "Task",
    "REQUIRED_METHODS",
    "resolve_task",
    "load_task",
    "HFCausalLMTask",
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
# Built-in task: a Hugging Face causal LM over local files.


def _read_jsonl(path: Path, text_field: str, id_field: str | None) -> list[dict]:
    """``[{"id": str, "text": str}, ...]`` from a .jsonl file; blank lines are skipped."""
    examples = []
    with path.open("r", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskLoadError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise TaskLoadError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise TaskLoadError(
                    f"{path}:{lineno}: no field {text_field!r} (fields: {', '.join(sorted(record)) or 'none'})"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise TaskLoadError(f"{path}:{lineno}: field {text_field!r} must be a string, got {text!r:.60}")
            if id_field is None:
                example_id = str(lineno)
            elif id_field not in record:
                raise TaskLoadError(f"{path}:{lineno}: no id field {id_field!r}")
            else:
                example_id = str(record[id_field])
            examples.append({"id": example_id, "text": text})
    return examples


class HFCausalLMTask(Task):
    """Attribute a Hugging Face causal LM's next-token loss to training texts, all from local files.

    Args:
        model_dir: a ``save_pretrained`` folder holding the model *and* its tokenizer (loaded
            with ``AutoModelForCausalLM`` / ``AutoTokenizer``, ``local_files_only=True``: no hub
            access).
        train_data: ``.jsonl`` file, one JSON object per line, the text under ``text_field``;
            ``None`` gives no training examples (enough to query an existing index).
        query_data: same format for the queries; ``None`` gives no queries (enough to build).
        text_field: key of the text in each object.
        id_field: key of the example id; ``None`` uses the 1-based line number in the file.
        max_length: texts are truncated to this many tokens (and to the model's context size).

    The loss of an example is the SUM over its tokens of the next-token cross-entropy, padding
    masked; batches are right-padded, so real tokens never see padding (causal attention) and
    keep their positions. If the tokenizer has no pad token, an existing special token (eos,
    unk or bos; else token 0) is used: padded positions are masked anyway, and the model's
    vocabulary is left untouched.
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
    ) -> None:
        self.model_dir = Path(model_dir).expanduser()
        if not self.model_dir.is_dir():
            raise TaskLoadError(f"model directory not found: {self.model_dir}")
        if not (self.model_dir / "config.json").is_file():
            raise TaskLoadError(f"{self.model_dir} has no config.json: not a save_pretrained folder")
        self.train_data = None if train_data is None else Path(train_data).expanduser()
        self.query_data = None if query_data is None else Path(query_data).expanduser()
        for label, path in (("train", self.train_data), ("query", self.query_data)):
            if path is not None and not path.is_file():
                raise TaskLoadError(f"{label} data file not found: {path}")
        if not isinstance(text_field, str) or not text_field:
            raise TaskLoadError(f"text_field must be a non-empty string, got {text_field!r}")
        if id_field is not None and (not isinstance(id_field, str) or not id_field):
            raise TaskLoadError(f"id_field must be a non-empty string or None, got {id_field!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise TaskLoadError(f"max_length must be an int >= 2, got {max_length!r}")
        self.text_field = text_field
        self.id_field = id_field
        self.max_length = max_length
        self._tokenizer = None
        self._context = None
        self._train: list[dict] | None = None
        self._query: list[dict] | None = None

    def __repr__(self) -> str:
        return (
            f"HFCausalLMTask(model_dir={str(self.model_dir)!r}, train_data={str(self.train_data)!r}, "
            f"query_data={None if self.query_data is None else str(self.query_data)!r})"
        )

    # -- model and tokenizer ------------------------------------------------------------------
    def model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(self.model_dir, local_files_only=True)
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
    def train_examples(self) -> list[dict]:
        if self.train_data is None:
            return []
        if self._train is None:
            self._train = _read_jsonl(self.train_data, self.text_field, self.id_field)
        return self._train

    def query_examples(self) -> list[dict]:
        if self.query_data is None:
            return []
        if self._query is None:
            self._query = _read_jsonl(self.query_data, self.text_field, self.id_field)
        return self._query

    def example_id(self, example: dict, index: int) -> str:
        return example["id"]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` / ``attention_mask`` and ``labels`` (-100 on padding)."""
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

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example SUM of next-token cross-entropy over real tokens, shape ``(B,)``, fp32."""
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
