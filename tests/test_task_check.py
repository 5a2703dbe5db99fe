"""Issue 24: no silently wrong answer and no lost file.

A query (and an append) checks that its task still encodes examples as the index's build did: the
HF task's recorded options are compared (the error names the option), and a few stored rows are
recomputed and compared with their factors (any task). Outputs are written atomically. Input,
fp16 and sharded-index errors name what they are about.
"""
from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "tasks"))
from helpers_models import CORPUS, save_tiny_hf_model, tiny_tokenizer  # noqa: E402
from mlp_task import MLPTask  # noqa: E402

import lorif_stream  # noqa: E402
query_module = importlib.import_module("lorif_stream.query")  # the module (lorif_stream.query is the function)
from lorif_stream import task_check  # noqa: E402
from lorif_stream.store import open_index  # noqa: E402
from lorif_stream.hf_task import HFCausalLMTask  # noqa: E402
from lorif_stream.readers import open_records, record_checker  # noqa: E402
from lorif_stream.task import TaskLoadError  # noqa: E402
from lorif_stream.task_check import ENCODING_KEY, PROBES_KEY, TOLERANCE, TaskMismatchError, excess  # noqa: E402

BUILD = dict(f=2, rank=1, sketch_rank=8, device="cpu", batch_size=4, whiten_examples=16)
LONG = " ".join(CORPUS)  # completions longer than the build's length: a shorter max length changes them


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def hf_index(tmp_path_factory):
    d = tmp_path_factory.mktemp("taskcheck")
    model = save_tiny_hf_model(d / "model")
    templated = d / "templated"
    shutil.copytree(model, templated)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}the cat {{ m['content'] }} "
                               "{% else %}{{ m['content'] }} <eos>{% endif %}{% endfor %}")
    tokenizer.save_pretrained(templated)
    retok = d / "retok"  # the same weights with another tokenizer
    shutil.copytree(model, retok)
    other = tiny_tokenizer()
    other.add_tokens(["zebra"])
    other.save_pretrained(retok)
    records = [{"doc": f"d{i}", "p": text, "c": LONG if i % 2 else text, "p2": text, "c2": LONG, "text": LONG}
               for i, text in enumerate(CORPUS * 2)]
    train = _jsonl(d / "train.jsonl", records)
    queries = _jsonl(d / "q.jsonl", records[:2])
    idx = d / "idx"
    base = dict(train_data=train, query_data=queries, id_field="doc", prompt_field="p", completion_field="c",
                max_length=20)
    lorif_stream.build(HFCausalLMTask(model, **base), idx, progress=False, **BUILD)
    return {"dir": d, "model": model, "templated": templated, "retok": retok, "idx": idx, "base": base}


def _query(fx, out=None, model=None, **changes):
    task = HFCausalLMTask(model or fx["model"], **dict(fx["base"], **changes))
    return lorif_stream.query(task, fx["idx"], out or fx["dir"] / "r.jsonl", device="cpu", top_k=2, progress=False)


def test_the_build_records_the_hf_encoding_and_probe_examples(hf_index):
    with open_index(hf_index["idx"]) as reader:
        settings = reader.settings
    enc = settings[ENCODING_KEY]
    assert enc["prompt_field"] == "p" and enc["completion_field"] == "c" and enc["text_field"] is None
    assert enc["max_length"] == enc["context_length"] == 20 and not enc["chat_template"] and not enc["skip_empty"]
    assert len(enc["tokenizer"]) == 16
    probes = settings[PROBES_KEY]
    assert 2 <= len(probes) <= task_check.PROBE_ROWS and probes[0]["row"] == 0
    assert probes[0]["example"] == {"id": "d0", "prompt": CORPUS[0], "completion": CORPUS[0]}


def test_the_same_options_pass_and_reproduce_the_rows(hf_index):
    result = _query(hf_index)
    assert len(result.results) == 2
    # the stored rows are recomputed within bf16 round-off, whatever the batch they are computed in
    with open_index(hf_index["idx"]) as reader, reader.snapshot() as snap:
        task = HFCausalLMTask(hf_index["model"], **hf_index["base"])
        source = query_module._open_source(task, reader.settings, snap, torch.device("cpu"), hf_index["idx"])
        checked = task_check.check_gradients(task, source, snap, reader.settings, hf_index["idx"])
    assert len(checked["rows"]) >= 2 and 0 <= checked["worst"] < TOLERANCE / 4


@pytest.mark.parametrize("change, named", [
    (dict(max_length=14), "--max-length 14 here (14 tokens), 20 at build"),
    (dict(prompt_field=None, completion_field=None, text_field="text"),
     "--text-field text here, --prompt-field p --completion-field c at build"),
    (dict(prompt_field="p2"), "--prompt-field p2 here, p at build"),
    (dict(completion_field="c2"), "--completion-field c2 here, c at build"),
    (dict(skip_empty=True), "--skip-empty given here, not given at build"),
])
def test_each_hf_option_that_differs_is_refused_by_name(hf_index, change, named):
    out = hf_index["dir"] / "refused.jsonl"
    with pytest.raises(TaskMismatchError, match="encodes examples differently") as e:
        _query(hf_index, out, **change)
    assert named in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_chat_template_and_tokenizer_changes_are_refused(hf_index):
    with pytest.raises(TaskMismatchError, match="--chat-template given here, not given at build"):
        _query(hf_index, model=hf_index["templated"], chat_template=True)
    with pytest.raises(TaskMismatchError, match="the tokenizer of --hf-model differs from the build's"):
        _query(hf_index, model=hf_index["retok"])


def test_recomputed_rows_catch_an_encoding_change_the_record_does_not_name(hf_index):
    """An index without the record (built before it) still refuses: the recomputed probe rows differ."""
    with open_index(hf_index["idx"]) as reader, reader.snapshot() as snap:
        settings = {k: v for k, v in reader.settings.items() if k != ENCODING_KEY}
        task = HFCausalLMTask(hf_index["model"], **dict(hf_index["base"], max_length=12))
        with pytest.raises(TaskMismatchError, match=r"does not reproduce index .*: row \d+ \(id 'd\d+'\), layer '.*' "
                                                    r"differs from its stored factors by \d+\.\d%"):
            query_module._open_source(task, settings, snap, torch.device("cpu"), hf_index["idx"])


# ------------------------------------------------------------------------------------ custom tasks


class ScaledInputs(MLPTask):
    """The build's task with a changed preprocessing in collate (the examples themselves are the same)."""

    def collate(self, examples):
        x, y = super().collate(examples)
        return x * 1.25, y


class MeanLoss(MLPTask):
    def loss(self, model, batch):
        return super().loss(model, batch) / 3.0


@pytest.fixture(scope="module")
def mlp_indexes(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlpcheck")
    built = {}
    for dtype in ("bf16", "fp16", "fp32"):
        built[dtype] = d / dtype
        lorif_stream.build(MLPTask(), built[dtype], progress=False, dtype=dtype, f=1, rank=1, device="cpu",
                           batch_size=7, whiten_examples=16, block_size=16)
    return d, built


def _worst(task, idx):
    with open_index(idx) as reader, reader.snapshot() as snap:
        source = query_module._open_source(task, reader.settings, snap, torch.device("cpu"), idx)
        return task_check.check_gradients(task, source, snap, reader.settings, idx)["worst"]


def test_the_same_custom_task_passes_at_every_storage_dtype(mlp_indexes):
    _, built = mlp_indexes
    worst = {dtype: _worst(MLPTask(), idx) for dtype, idx in built.items()}
    # round-off of the storage dtype: bf16 (2^-9 per value) > fp16 (2^-12) > fp32
    assert worst["bf16"] < TOLERANCE / 4 and worst["fp16"] < 2e-3 and worst["fp32"] < 1e-5, worst


@pytest.mark.parametrize("changed", [ScaledInputs, MeanLoss])
def test_a_changed_custom_task_is_refused_naming_row_and_layer(mlp_indexes, changed):
    d, built = mlp_indexes
    out = d / "r.jsonl"
    out.write_text("previous\n")
    with pytest.raises(TaskMismatchError, match=r"row \d+ \(id 'ex\d+'\), layer '\d' differs from its stored factors"):
        lorif_stream.query(changed(), built["bf16"], out, device="cpu", top_k=2, progress=False)
    assert out.read_text() == "previous\n"


def test_excess_is_zero_for_the_optimal_factors_and_large_for_others():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(12, 9, generator=g) + 3 * torch.outer(torch.randn(12, generator=g), torch.randn(9, generator=g))
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    L, R = U[:, :2] * S[:2], Vh[:2].T
    assert excess(G, L, R) < 1e-6
    assert excess(G, L.bfloat16().float(), R.bfloat16().float()) < 5e-3
    assert excess(G * 1.1, L, R) > 0.05 and excess(G, L[:, [1, 0]], R) > 0.05
    assert excess(torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(2, 1)) == 0.0


# ------------------------------------------------------------------------------------ atomic outputs


def _damage_late_block(idx: Path) -> None:
    """Flip a byte in the middle of the last stored block of layer 0 (read late in a query)."""
    with open_index(idx) as reader, reader.snapshot() as snap:
        last = max(first for first, _ in snap.layer_values(0, 0, snap.rows, check=False))
        value = bytes(snap.value_at(0, last))
    data = bytearray((idx / "data.mdb").read_bytes())
    at = data.find(value)
    assert at > 0
    data[at + len(value) // 2] ^= 0xFF
    (idx / "data.mdb").write_bytes(bytes(data))


def test_a_failed_query_leaves_existing_outputs_as_they_were(mlp_indexes, tmp_path):
    _, built = mlp_indexes
    idx = tmp_path / "idx"
    shutil.copytree(built["fp32"], idx)
    out, scores = tmp_path / "r.jsonl", tmp_path / "s.npy"
    lorif_stream.query(MLPTask(), idx, out, scores, device="cpu", top_k=2, progress=False)
    before = out.read_bytes(), scores.read_bytes()
    assert np.load(scores).shape == (5, 48) and len(out.read_text().splitlines()) == 5
    _damage_late_block(idx)
    with pytest.raises(Exception, match=r"block at row [1-9]\d*: block data checksum mismatch"):
        lorif_stream.query(MLPTask(), idx, out, scores, device="cpu", top_k=2, progress=False, buffers=1)
    assert (out.read_bytes(), scores.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "r.jsonl", "s.npy"]  # no temporary left


def test_report_out_is_not_replaced_by_a_failed_report(mlp_indexes, tmp_path):
    from lorif_stream.report import ReportError, make_report

    _, built = mlp_indexes
    out = tmp_path / "page.html"
    out.write_text("old page")
    bad = _jsonl(tmp_path / "results.jsonl", [{"id": "q", "proponents": [{"id": "nope", "row": 0, "score": 1.0}],
                                               "opponents": []}])
    with pytest.raises(ReportError, match="results from a different index"):
        make_report(bad, built["fp32"], out)
    assert out.read_text() == "old page" and sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "results.jsonl"]


# ------------------------------------------------------------------------------------ error messages


def test_fp16_overflow_says_fp16_and_suggests_bf16(tmp_path):
    class Huge(MLPTask):
        def loss(self, model, batch):  # gradients 1e6x larger: far past fp16's range
            return super().loss(model, batch) * 1e6

    with pytest.raises(ValueError, match=r"fp16 storage overflow: example 'ex\d+' .* beyond fp16's largest 65,504; "
                                         r"build the index with --dtype bf16"):
        lorif_stream.build(Huge(), tmp_path / "idx", progress=False, dtype="fp16", f=1, rank=1, device="cpu",
                           projection_kind="random", preconditioner="none")


def test_lone_surrogates_and_corrupt_parquet_name_the_file_and_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "bad \\ud800 text"}\n')
    with pytest.raises(TaskLoadError, match=r"bad\.jsonl:2: field 'text' holds a lone surrogate \(U\+D800"):
        open_records(bad, ["text"], check=record_checker(["text"], None))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 50 for i in range(100)]}), path, row_group_size=50,
                   compression="snappy")
    raw = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = meta.data_page_offset
    for i in range(start + 20, start + 60):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    fresh = open_records(path, ["text"])
    assert fresh[0]["text"].startswith("row 0")
    with pytest.raises(TaskLoadError, match=rf"{path.name} row 70: cannot read the record: "):
        fresh[70]


def test_a_shard_error_names_the_shard_and_the_global_row():
    from lorif_stream.store.shards import ShardEntry, shard_message

    entry = ShardEntry("shard-00001", 512, 256)
    line = shard_message("/x/idx", entry, "index /x/idx/shard-00001: layer '0' block at row 272: checksum mismatch")
    assert line == "index /x/idx: shard shard-00001 (rows 512..767): layer '0' block at row 784: checksum mismatch"
    assert shard_message("/x/idx", entry, "rows 0..15 of layer 'a'").endswith("rows 512..527 of layer 'a'")
