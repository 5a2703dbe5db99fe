"""The built-in task: a Hugging Face causal LM's next-token loss over local files
(``--hf-model DIR --data train.jsonl --queries q.jsonl``); records come through readers.py."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from .config import HF_MODEL_DTYPES
from .readers import ExampleView, example_converter, open_records, record_checker
from .task import Task, TaskLoadError

__all__ = ["HFCausalLMTask", "MODEL_DTYPES", "tokenizer_digest"]


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

    # Every Linear, the LM head included: on the fortunes text benchmark tracking the (tied) head
    # gave +0.067 LDS [0.042, 0.099] for +23% bytes per example (benchmarks/bench_lm_head.py);
    # a vocabulary wider than max_dense_side is CountSketched, so a 152k head costs O(V) per token.
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
        records = open_records(path, columns, check=record_checker(list(fields.values()), self.id_field))
        examples: Sequence = ExampleView(records, example_converter(records, fields, self.id_field))
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
        return ExampleView(examples.records, examples.convert, keep)

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
