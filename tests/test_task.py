"""Task protocol, task loading (every error path) and the built-in HF causal-LM task."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from helpers_models import EOS_ID, PAD_ID, save_tiny_hf_model, tiny_gpt2, tiny_tokenizer
from lorif_stream.hf_task import HFCausalLMTask
from lorif_stream.task import Task, TaskLoadError, load_task, resolve_task

DUCK_TASK = '''
import torch

class Duck:
    """Has the required methods, does not subclass Task."""
    def model(self): return torch.nn.Linear(2, 1)
    def train_examples(self): return [1, 2, 3]
    def query_examples(self): return [4]
    def collate(self, examples): return torch.tensor(examples, dtype=torch.float32)[:, None].repeat(1, 2)
    def loss(self, model, batch): return model(batch).squeeze(1) ** 2
    extra = "kept"

def make_duck():
    return Duck()

duck_instance = Duck()
'''


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------------------------
# protocol and resolve_task


class Complete(Task):
    def model(self):
        return torch.nn.Linear(2, 1)

    def train_examples(self):
        return ["a", "b"]

    def query_examples(self):
        return []

    def collate(self, examples):
        return torch.ones(len(examples), 2)

    def loss(self, model, batch):
        return model(batch).squeeze(1)


def test_task_defaults_and_resolve_is_idempotent():
    task = resolve_task(Complete)
    assert isinstance(task, Complete)
    assert resolve_task(task) is task
    assert task.tracked_modules is None
    assert task.example_id("anything", 7) == "7"
    model, batch = task.model(), task.collate(["a", "b"])
    torch.testing.assert_close(task.measurement(model, batch), task.loss(model, batch))


def test_resolve_task_wraps_duck_typed_objects(tmp_path):
    duck_cls = load_task(f"{write(tmp_path / 'duck.py', DUCK_TASK)}:Duck")
    assert isinstance(duck_cls, Task)
    assert duck_cls.tracked_modules is None
    assert duck_cls.example_id(None, 3) == "3"
    assert duck_cls.extra == "kept"  # the user's own attributes stay reachable
    model, batch = duck_cls.model(), duck_cls.collate([1.0, 2.0])
    torch.testing.assert_close(duck_cls.measurement(model, batch), duck_cls.loss(model, batch))


def test_resolve_task_names_missing_methods():
    class Partial(Task):
        def model(self):
            return torch.nn.Linear(1, 1)

    with pytest.raises(TaskLoadError, match="train_examples, query_examples, collate, loss"):
        resolve_task(Partial)
    with pytest.raises(TaskLoadError, match="collate, loss"):
        resolve_task(type("Half", (), {"model": lambda s: 0, "train_examples": lambda s: [],
                                       "query_examples": lambda s: []})())

    class BadRegex(Complete):
        tracked_modules = "(mlp"

    with pytest.raises(TaskLoadError, match=r"not a valid regex"):
        resolve_task(BadRegex)


# --------------------------------------------------------------------------------------------
# load_task


def test_load_task_from_file_class_factory_and_instance(tmp_path):
    path = write(tmp_path / "duck.py", DUCK_TASK)
    for name in ("Duck", "make_duck", "duck_instance"):
        task = load_task(f"{path}:{name}")
        assert list(task.train_examples()) == [1, 2, 3]


def test_load_task_from_module_and_sibling_imports(tmp_path, monkeypatch):
    write(tmp_path / "helper_data_xq.py", "EXAMPLES = ['x', 'y']\n")
    write(tmp_path / "my_tasks_xq.py", '''
        import torch
        from lorif_stream.task import Task
        from helper_data_xq import EXAMPLES

        class Small(Task):
            tracked_modules = "lin"
            def model(self): return torch.nn.Linear(2, 1)
            def train_examples(self): return EXAMPLES
            def query_examples(self): return []
            def collate(self, examples): return torch.ones(len(examples), 2)
            def loss(self, model, batch): return model(batch).squeeze(1)
    ''')
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("my_tasks_xq:Small")
    assert task.train_examples() == ["x", "y"] and task.tracked_modules == "lin"


def test_two_task_files_with_the_same_name_do_not_collide(tmp_path):
    for sub, examples in (("a", [1]), ("b", [2, 2])):
        (tmp_path / sub).mkdir()
        write(tmp_path / sub / "task.py", DUCK_TASK.replace("[1, 2, 3]", repr(examples)))
    assert load_task(f"{tmp_path / 'a' / 'task.py'}:Duck").train_examples() == [1]
    assert load_task(f"{tmp_path / 'b' / 'task.py'}:Duck").train_examples() == [2, 2]


def test_load_task_errors_are_one_line_and_helpful(tmp_path):
    good = write(tmp_path / "duck.py", DUCK_TASK + "\nNUMBER = 42\n\ndef broken():\n    raise RuntimeError('boom')\n")
    write(tmp_path / "bad_import.py", "import not_a_real_module_qq\n")
    write(tmp_path / "bad_syntax.py", "def f(:\n")
    write(tmp_path / "bad_init.py", "class Duck:\n    def __init__(self):\n        raise OSError('no weights')\n"
          + "".join(f"    def {m}(self, *a): pass\n" for m in ("model", "train_examples", "query_examples", "collate", "loss")))
    cases = [
        ("duck.py", r"missing ':NAME'"),
        (f"{tmp_path}/missing.py:Task", r"task file not found: .*missing\.py"),
        (f"{tmp_path}/bad_import.py:Task", r"bad_import\.py.*No module named 'not_a_real_module_qq'"),
        (f"{tmp_path}/bad_syntax.py:Task", r"bad_syntax\.py: SyntaxError"),
        ("not_a_module_zzq.sub:Task", r"cannot import module 'not_a_module_zzq\.sub'"),
        (f"{good}:Nope", r"has no attribute 'Nope'; it defines: Duck, broken, make_duck"),
        (f"{good}:NUMBER", r"NUMBER .* is a int, not a task class"),
        (f"{good}:broken", r"task factory broken\(\) .* RuntimeError: boom"),
        (f"{tmp_path}/bad_init.py:Duck", r"could not instantiate .*OSError: no weights"),
        (f"{good}:", r"must look like"),
    ]
    for spec, message in cases:
        with pytest.raises(TaskLoadError, match=message) as info:
            load_task(spec)
        assert "\n" not in str(info.value), spec
        assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------------------------
# HFCausalLMTask


TEXTS = [
    "the cat sat on the mat",
    "a dog ran",
    "influence functions trace a prediction to training data and the quick brown fox",
    "streaming",
]


def write_jsonl(path, records, blank_line_after=None):
    lines = []
    for i, record in enumerate(records):
        lines.append(json.dumps(record))
        if i == blank_line_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("tiny_gpt2"))


def hand_loss(model, token_ids: list[int]) -> torch.Tensor:
    """Sum over positions of -log p(next token), one unpadded example, no library CE."""
    ids = torch.tensor([token_ids])
    logits = model(input_ids=ids).logits[0].double()
    logp = logits.log_softmax(-1)
    return -sum(logp[t, token_ids[t + 1]] for t in range(len(token_ids) - 1))


def test_hf_task_end_to_end(hf_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS], blank_line_after=1)
    query = write_jsonl(tmp_path / "query.jsonl", [{"text": "the cat ran", "key": "q-7"}])
    task = resolve_task(HFCausalLMTask(hf_dir, train, query_data=query, max_length=512))
    assert task.tracked_modules is None

    examples = task.train_examples()
    assert [task.example_id(e, i) for i, e in enumerate(examples)] == ["1", "2", "4", "5"]  # line numbers
    assert [e["text"] for e in examples] == TEXTS
    by_field = HFCausalLMTask(hf_dir, train, query, id_field="key")
    assert [by_field.example_id(e, 0) for e in by_field.query_examples()] == ["q-7"]

    model = task.model().eval()
    reference = tiny_gpt2(0)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)  # weights really loaded

    batch = task.collate(examples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # padding happened
    for row, n in enumerate(lengths.tolist()):  # right padding: ones first, then zeros
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == PAD_ID).all()
    assert torch.equal(labels, ids.masked_fill(mask == 0, -100))

    with torch.no_grad():
        losses = task.loss(model, batch)
        assert losses.shape == (len(TEXTS),) and losses.dtype == torch.float32
        tokenizer = tiny_tokenizer()
        for i, text in enumerate(TEXTS):
            expected = hand_loss(reference, tokenizer(text)["input_ids"])
            torch.testing.assert_close(losses[i].double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(task.measurement(model, batch), losses)


def test_hf_task_truncates_to_the_model_context(hf_dir, tmp_path):
    long_text = " ".join(["the cat sat on the mat"] * 20)  # far more than 32 tokens
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": long_text}])
    task = HFCausalLMTask(hf_dir, train, max_length=512)
    batch = task.collate(task.train_examples())
    assert batch["input_ids"].shape[1] == 32
    assert torch.isfinite(task.loss(task.model(), batch)).all()
    assert task.query_examples() == []
    short = HFCausalLMTask(hf_dir, train, max_length=5)
    assert short.collate(short.train_examples())["input_ids"].shape[1] == 5


def test_hf_task_sets_a_pad_token_when_missing(hf_dir, tmp_path):
    import shutil

    from transformers import PreTrainedTokenizerFast

    no_pad = tmp_path / "no_pad"
    shutil.copytree(hf_dir, no_pad)
    raw = tiny_tokenizer().backend_tokenizer
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>").save_pretrained(no_pad)
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS[:2]])
    task = HFCausalLMTask(no_pad, train)
    batch = task.collate(task.train_examples())
    assert task.tokenizer.pad_token_id == EOS_ID
    assert (batch["input_ids"][batch["attention_mask"] == 0] == EOS_ID).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_hf_task_errors(hf_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    with pytest.raises(TaskLoadError, match="model directory not found"):
        HFCausalLMTask(tmp_path / "nope", train)
    with pytest.raises(TaskLoadError, match="no config.json"):
        HFCausalLMTask(tmp_path, train)
    with pytest.raises(TaskLoadError, match="train data file not found: .*missing.jsonl"):
        HFCausalLMTask(hf_dir, tmp_path / "missing.jsonl")
    with pytest.raises(TaskLoadError, match="query data file not found"):
        HFCausalLMTask(hf_dir, train, tmp_path / "q.jsonl")

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(TaskLoadError, match=r"bad\.jsonl:2: invalid JSON"):
        HFCausalLMTask(hf_dir, bad_json).train_examples()
    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"body": "x"}])
    with pytest.raises(TaskLoadError, match=r"nofield\.jsonl:2: no field 'text' \(fields: body\)"):
        HFCausalLMTask(hf_dir, no_field).train_examples()
    with pytest.raises(TaskLoadError, match=r"nofield\.jsonl:1: no id field 'key'"):
        HFCausalLMTask(hf_dir, no_field, id_field="key").train_examples()
    not_text = write_jsonl(tmp_path / "num.jsonl", [{"text": 5}])
    with pytest.raises(TaskLoadError, match=r"num\.jsonl:1: field 'text' must be a string"):
        HFCausalLMTask(hf_dir, not_text).train_examples()
    with pytest.raises(TaskLoadError, match="max_length"):
        HFCausalLMTask(hf_dir, train, max_length=1)


# --------------------------------------------------------------------------------------------
# Lazy jsonl: one pass of line offsets, then one line read per row


def _eager_jsonl(path):
    """(line number, record) of every non-blank line: what reading the whole file gives."""
    with open(path, encoding="utf-8") as handle:
        return [(n, json.loads(line)) for n, line in enumerate(handle, start=1) if line.strip()]


def test_lazy_jsonl_random_access_equals_eager_parse(tmp_path):
    import pickle
    import random
    import threading

    from lorif_stream.readers import JsonlRecords

    rng = random.Random(0)
    lines = []
    for i in range(500):
        text = "".join(rng.choice("ab \u00e9\u4e2d\"\\\n") for _ in range(rng.randrange(0, 300)))
        lines.append(json.dumps({"id": f"r{i}", "text": text}, ensure_ascii=rng.random() < 0.5))
        lines.extend([""] * (rng.random() < 0.1) + ["   "] * (rng.random() < 0.05))  # blank runs
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([""] + lines), encoding="utf-8")  # a leading blank line, no final newline
    eager = _eager_jsonl(path)
    records = JsonlRecords(path)
    assert len(records) == len(eager) == 500
    order = list(range(500))
    rng.shuffle(order)
    for i in order:  # random order: each row is read on its own
        assert records[i] == eager[i][1]
        assert records.default_id(i) == str(eager[i][0]) and records.where(i) == f"{path}:{eager[i][0]}"
    assert records[-1] == eager[-1][1] and records[10:13] == [r for _, r in eager[10:13]]
    with pytest.raises(IndexError):
        records[500]
    copy = pickle.loads(pickle.dumps(records))  # no open handle travels; the copy reopens
    assert copy[123] == eager[123][1]
    seen = {}
    threads = [threading.Thread(target=lambda k=k: seen.update({j: records[j] for j in range(k, 500, 4)}))
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [seen[j] for j in range(500)] == [r for _, r in eager]  # pread: no shared file position


def test_lazy_jsonl_memory_does_not_grow_with_the_text(tmp_path):
    import tracemalloc

    from lorif_stream.readers import JsonlRecords

    path = tmp_path / "big.jsonl"
    rows, text_bytes = 400, 50_000  # 20 MB of text
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            handle.write(json.dumps({"id": i, "text": chr(ord("a") + i % 26) * text_bytes}) + "\n")
    tracemalloc.start()
    try:
        records = JsonlRecords(path)
        kept, peak = tracemalloc.get_traced_memory()
        assert records[rows - 1]["text"] == chr(ord("a") + (rows - 1) % 26) * text_bytes
    finally:
        tracemalloc.stop()
    assert len(records) == rows
    assert kept < 64 * 1024, kept            # offsets, not texts: 8 bytes a row (20 MB on disk)
    assert peak < 4 * text_bytes * 4, peak   # one line at a time while the offsets are taken


def test_lazy_jsonl_refuses_a_file_changed_after_opening(hf_dir, tmp_path):
    from lorif_stream.readers import JsonlRecords

    path = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    records = JsonlRecords(path)
    assert records[1] == {"text": TEXTS[1]}
    write_jsonl(path, [{"text": t.upper()} for t in TEXTS])  # same length: only the stamp tells
    with pytest.raises(TaskLoadError, match=r"train\.jsonl changed since it was opened"):
        records[1]


def test_hf_task_jsonl_examples_are_a_lazy_view_validated_at_open(hf_dir, tmp_path):
    from lorif_stream.readers import JsonlRecords

    train = write_jsonl(tmp_path / "train.jsonl", [{"doc": f"d{i}", "text": t} for i, t in enumerate(TEXTS)])
    examples = HFCausalLMTask(hf_dir, train, id_field="doc").train_examples()
    assert isinstance(examples.records, JsonlRecords)  # not a list of every text
    assert [examples[i] for i in range(len(TEXTS))] == [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)]
    late = write_jsonl(tmp_path / "late.jsonl", [{"doc": "d0", "text": "ok"}] * 3 + [{"doc": "d3", "body": "x"}])
    with pytest.raises(TaskLoadError, match=r"late\.jsonl:4: no field 'text'"):
        HFCausalLMTask(hf_dir, late, id_field="doc").train_examples()  # the bad last line is found before any work
