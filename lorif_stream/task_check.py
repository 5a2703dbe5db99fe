"""Does the task still produce the index's gradients? Checked once per query, report and append.

A query scores its examples' gradients against the stored rows; both must come from the same
encoding (fields, template, truncation, tokenizer, collate, loss). The model fingerprint catches
other weights, but not another encoding: a query with ``--max-length 32`` against an index built
at 48 would otherwise exit 0 with scores off by ~10% of the largest. Two checks:

1. **Recorded encoding.** A task with ``encoding_settings()`` (the built-in HF task: its fields,
   template, text field, length, skip-empty and a tokenizer digest) has it recorded in the index
   settings at build (``task_encoding``); a command whose task records something else is refused
   naming the option (``--max-length 32 here, 48 at build``).
2. **Recomputed rows.** A few training rows of the index are recomputed with the command's task and
   compared with their stored factors. The examples are the ones the index records for that
   purpose (``task_probes``: the HF task's example dicts, a few KB) or, for a custom task, its own
   ``train_examples()`` at rows whose id (and content digest, segments.py) match the index's.

The comparison (``excess``): the stored factors ``S = L R^T`` are the build's best rank-c
approximation of its gradient, rounded to the storage dtype. For the recomputed gradient ``G``,
``excess = sqrt(max(0, |G - S|^2 - |G - G_c|^2)) / |G|`` with ``G_c`` its own best rank-c
approximation: 0 when S is an optimal rank-c approximation of G (whatever the choice among equal
singular values), and the part of S that G does not explain otherwise. Measured (tests and the
module's calibration, tiny GPT-2 and MLP tasks): the same task gives at most ~3e-3 with bf16
storage (rounding to 8 mantissa bits: 2^-9 relative per value), ~4e-4 with fp16 and ~1e-6 with
fp32, whatever the batch the row is recomputed in; every encoding change tried (another max length
that truncates the row, another field, another tokenizer, a changed loss) gives 0.1 or more.
TOLERANCE = 0.02 sits between them. A row an encoding change does not touch (a short text under a
smaller max length) cannot tell, which is why the HF task also records its options.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .device import notice

ENCODING_KEY = "task_encoding"   # index settings: the build task's encoding_settings()
PROBES_KEY = "task_probes"       # index settings: [{"row": r, "example": {...}}] to recompute
TOLERANCE = 0.02
PROBE_ROWS = 4
_PROBE_MAX_CHARS = 4000

# what the built-in HF task's encoding keys are called on the command line
_OPTION = {"text_field": "--text-field", "prompt_field": "--prompt-field", "completion_field": "--completion-field",
           "chat_template": "--chat-template", "max_length": "--max-length", "skip_empty": "--skip-empty",
           "tokenizer": "the tokenizer of --hf-model"}


class TaskMismatchError(ValueError):
    """The command's task does not encode examples as the index's build did (names what differs)."""


# ------------------------------------------------------------------------------------ recording


def task_record(task: Any, n: int) -> dict:
    """What a new index records about its build task: its encoding settings (when it has them) and,
    when its examples are plain JSON (the HF task's), a few of them to recompute later."""
    record: dict = {}
    encoding = _encoding_of(task)
    if encoding is not None:
        record[ENCODING_KEY] = encoding
    probes = _json_probes(task, n)
    if probes:
        record[PROBES_KEY] = probes
    return record


def _encoding_of(task: Any) -> dict | None:
    method = getattr(task, "encoding_settings", None)
    return dict(method()) if callable(method) else None


def probe_rows(n: int, count: int = PROBE_ROWS) -> list[int]:
    """Evenly spread rows of a segment of n rows (first and last included)."""
    if n <= 0:
        return []
    count = min(count, n)
    return sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})


def _json_probes(task: Any, n: int) -> list[dict]:
    if not getattr(task, "records_probes", False):
        return []
    examples = task.train_examples()
    n = min(n, len(examples))
    probes = []
    # a few more candidates than needed: very long texts are passed over (the settings stay small)
    for row in probe_rows(n, 3 * PROBE_ROWS):
        example = examples[row]
        if not isinstance(example, dict) or not all(isinstance(v, str) for v in example.values()):
            continue
        if sum(len(v) for v in example.values()) > _PROBE_MAX_CHARS or not _utf8(example):
            continue
        probes.append({"row": row, "example": dict(example)})
    keep = probe_rows(len(probes), PROBE_ROWS)
    return [probes[i] for i in keep]


def _utf8(example: dict) -> bool:
    try:
        for value in example.values():
            value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ------------------------------------------------------------------------------------ comparing


def encoding_mismatch(recorded: dict | None, current: dict | None) -> str | None:
    """What differs between the build's recorded encoding and this command's, naming the option; None
    when they agree or either is unknown (an index from before the record, a task without one)."""
    if recorded is None or current is None:
        return None
    if recorded.get("kind") != current.get("kind"):
        return f"the index was built by a {recorded.get('kind')!r} task, this command's task is {current.get('kind')!r}"
    if recorded.get("kind") == "hf-causal-lm":
        return _hf_mismatch(recorded, current)
    keys = sorted(set(recorded) | set(current))
    differ = [k for k in keys if recorded.get(k) != current.get(k)]
    if not differ:
        return None
    return "encoding_settings() differ: " + ", ".join(
        f"{k}: {current.get(k)!r} here, {recorded.get(k)!r} at build" for k in differ)


def _hf_mismatch(recorded: dict, current: dict) -> str | None:
    def fields(e: dict) -> str:
        if e.get("prompt_field") is not None:
            return f"--prompt-field {e['prompt_field']} --completion-field {e['completion_field']}"
        return f"--text-field {e.get('text_field')}"

    if (recorded.get("prompt_field") is None) != (current.get("prompt_field") is None):
        return f"{fields(current)} here, {fields(recorded)} at build"
    for key in ("text_field", "prompt_field", "completion_field"):
        if recorded.get(key) != current.get(key):
            return f"{_OPTION[key]} {current.get(key)} here, {recorded.get(key)} at build"
    if recorded.get("context_length") != current.get("context_length"):
        return (f"--max-length {current.get('max_length')} here ({current.get('context_length')} tokens), "
                f"{recorded.get('max_length')} at build ({recorded.get('context_length')} tokens)")
    for key in ("chat_template", "skip_empty"):
        if bool(recorded.get(key)) != bool(current.get(key)):
            return (f"{_OPTION[key]} {'given' if current.get(key) else 'not given'} here, "
                    f"{'given' if recorded.get(key) else 'not given'} at build")
    if recorded.get("tokenizer") != current.get("tokenizer"):
        return (f"{_OPTION['tokenizer']} differs from the build's (digest {str(current.get('tokenizer'))[:12]} "
                f"here, {str(recorded.get('tokenizer'))[:12]} at build)")
    return None


def check_options(settings: dict, task: Any, index: Any, command: str = "query") -> None:
    """Refuse a task whose recorded encoding differs from the index's build (cheap: no model)."""
    mismatch = encoding_mismatch(settings.get(ENCODING_KEY), _encoding_of(task))
    if mismatch:
        raise TaskMismatchError(f"the {command}'s task encodes examples differently from index {index}'s build: "
                                f"{mismatch}; give the build's options (scores would otherwise be silently wrong)")


# ------------------------------------------------------------------------------------ recomputing


def best_residuals(G: torch.Tensor, c: int) -> torch.Tensor:
    """|G_b - L_b R_b^T|^2 for a batch G (B, d_out, d_in) factorized by the build's own rank-c
    factorization: its (tiny) distance from the exact optimum then cancels against the stored rows'
    instead of counting as a difference (measured: against exact SVD residuals, the same task's rank-1
    rows of the tiny GPT-2 gave 1.0e-2, against these < 3e-3). Costs what indexing B rows costs."""
    from .factorize import factorize

    G64 = G.detach().double().cpu()
    L, R = factorize(G.detach().float(), c)
    rest = G64 - (L.double() @ R.double().transpose(1, 2)).cpu()
    return (rest * rest).sum(dim=(1, 2))


def excess(G: torch.Tensor, L: torch.Tensor, R: torch.Tensor, best: float | None = None) -> float:
    """The part of the stored factors L R^T that the gradient G (d_out, d_in) does not explain, relative
    to |G| (module docstring); 0 for a zero G with zero factors, 1 for a zero G with non-zero ones.
    `best`: G's best rank-c residual when already computed (best_residuals, a batch at a time)."""
    G64 = G.detach().double().cpu()
    S = (L.double() @ R.double().T).cpu()
    g2 = float((G64 * G64).sum())
    if g2 == 0.0:
        return 0.0 if not bool(S.any()) else 1.0
    if best is None:
        best = float(best_residuals(G.unsqueeze(0), L.shape[1])[0])
    got = G64 - S
    return math.sqrt(max(0.0, float((got * got).sum()) - best) / g2)


def _held(snap, row: int) -> bool:
    ranges = getattr(snap, "ranges", None)
    if ranges is not None:  # a sharded snapshot: only the shards this reader holds
        return any(start <= row < start + n for _, start, n in ranges)
    return 0 <= row < snap.rows


def _candidates(task, snap, settings: dict, index) -> tuple[list[tuple[int, Any]], str | None]:
    """(row, example) pairs to recompute, and why there are none when there are none."""
    nonfinite = set(settings.get("nonfinite_rows") or ())
    probes = settings.get(PROBES_KEY)
    if probes:
        return [(p["row"], p["example"]) for p in probes if p["row"] not in nonfinite and _held(snap, p["row"])], None
    try:
        examples = task.train_examples()
    except Exception as e:  # noqa: BLE001 - a task that cannot give them (e.g. no --data) is only not checked
        return [], f"its train_examples() failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    n = len(examples)
    if n == 0:
        return [], "the task gives no training examples to recompute"
    from .segments import SEGMENT_CHECK_META, example_digest as _example_digest

    checks = snap.state_meta(SEGMENT_CHECK_META) or {}
    for segment in settings.get("segments") or []:
        if segment["count"] != n:
            continue
        start = segment["start"]
        rows = [r for r in probe_rows(n) if start + r not in nonfinite and _held(snap, start + r)]
        if not rows or any(snap.id_of(start + r) != str(task.example_id(examples[r], r)) for r in rows):
            continue
        check = checks.get(str(start)) or {}
        digests = dict(zip(check.get("positions", []), check.get("digests", []))) if check.get("count") == n else {}
        # same ids but other content: other data under default ids (str(index)), or examples whose
        # preprocessing changed; either way these rows cannot tell the encoding apart
        differing = [p for p in sorted(digests)[:: max(1, len(digests) // PROBE_ROWS)][:PROBE_ROWS]
                     if _held(snap, start + p) and _example_digest(task, examples, p) != digests[p]]
        if differing:
            p = differing[0]
            return [], (f"its training example at row {start + p} (id {snap.id_of(start + p)!r}) differs from the one "
                        f"the index's {segment['kind']} was made from (content digest); if the task's preprocessing "
                        f"changed since then, the scores are wrong")
        return [(start + r, examples[r]) for r in rows], None
    return [], (f"the task's {n:,} training examples are not the rows of any of the index's segments "
                f"(their count and ids differ)")


def check_gradients(task, source, snap, settings: dict, index, command: str = "query",
                    quiet_if_unchecked: bool = False) -> dict:
    """Recompute a few of the index's rows with `source` (the command's task, model and the index's
    projections on their device) and compare them with the stored factors. Raises
    TaskMismatchError naming the row and layer; returns {"rows": [...], "worst": float}."""
    pairs, why = _candidates(task, snap, settings, index)
    if not pairs:
        if why and not quiet_if_unchecked:
            notice(f"index {index}: the {command} could not recompute any training row to check that its task "
                   f"encodes examples as the build did: {why}")
        return {"rows": [], "worst": None}
    rows = [r for r, _ in pairs]
    ids = [snap.id_of(r) for r in rows]
    with source.capture() as capture:
        grads, finite = source.projected_gradients(capture, [e for _, e in pairs], ids, "loss")
    worst = 0.0
    stored = [snap.row(row) for row in rows]
    c = stored[0][0][0].shape[1]
    best = [best_residuals(G, c).tolist() for G in grads]  # each layer's rows in one batch
    for b, row in enumerate(rows):
        if not bool(finite[b]):
            raise TaskMismatchError(f"row {row} (id {ids[b]!r}) of index {index}: the {command}'s task gives it a "
                                    f"non-finite loss or gradient, the build a finite one: the task changed")
        for layer, G, (L, R), residual in zip(source.layers, grads, stored[b], best):
            e = excess(G[b], torch.from_numpy(L), torch.from_numpy(R), residual[b])
            worst = max(worst, e)
            if not e <= TOLERANCE:
                raise TaskMismatchError(
                    f"the {command}'s task does not reproduce index {index}'s gradients: row {row} (id {ids[b]!r}), "
                    f"layer {layer.name!r} differs from its stored factors by {e:.1%} of its norm (same encoding: "
                    f"< {TOLERANCE:.0%}); the task's collate, loss, tokenizer or options changed since the build; "
                    f"scores would be silently wrong")
    return {"rows": rows, "worst": worst}


def check_task(task, source, snap, settings: dict, index, command: str = "query") -> dict:
    """Both checks, in order: the recorded options (names the option), then the recomputed rows."""
    check_options(settings, task, index, command)
    return check_gradients(task, source, snap, settings, index, command)


def hf_option_mismatch(settings: dict, given: dict) -> str | None:
    """For `report`, which loads no model: the HF options it was given that differ from the build's
    (only those given; `given` holds encoding keys, None = not given)."""
    recorded = settings.get(ENCODING_KEY)
    if not recorded or recorded.get("kind") != "hf-causal-lm":
        return None
    if given.get("prompt_field") is not None or given.get("text_field") is not None:
        current = {k: given.get(k) for k in ("text_field", "prompt_field", "completion_field")}
        if current["prompt_field"] is not None:
            current["text_field"] = None
        for key in ("text_field", "prompt_field", "completion_field"):
            if recorded.get(key) != current[key]:
                return _hf_mismatch({k: recorded.get(k) for k in current}, current)
    if given.get("max_length") is not None and given["max_length"] != recorded.get("max_length"):
        return f"--max-length {given['max_length']} here, {recorded.get('max_length')} at build"
    for key in ("chat_template", "skip_empty"):
        if given.get(key) and not recorded.get(key):
            return f"{_OPTION[key]} given here, not at build"
    return None
