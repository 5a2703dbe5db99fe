"""The HF causal-LM task for LLM users: prompt/completion masking, chat templates, truncation,
empty completions, jsonl(.gz) / parquet / datasets inputs, and the terminal summary of query."""
from __future__ import annotations

import gzip
import io
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from helpers_models import CORPUS, save_tiny_hf_model, tiny_gpt2, tiny_tokenizer
from lorif_stream.hf_task import HFCausalLMTask
from lorif_stream.readers import DiskDatasetRecords, ParquetRecords, open_records
from lorif_stream.task import TaskLoadError, print_top_proponents, top_proponent_lines

PAIRS = [
    ("the cat sat on", "the mat"),
    ("a dog ran to the park", "and back"),
    ("influence functions trace", "a prediction to training data"),
    ("the quick brown fox jumps over the lazy", "dog"),
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("tiny_gpt2"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pair_records(pairs=PAIRS):
    return [{"id": f"p{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(pairs)]


def hand_masked_loss(model, prompt_ids, completion_ids):
    """-sum log p(completion token | everything before it), one unpadded example, double."""
    ids = list(prompt_ids) + list(completion_ids)
    logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    start = max(len(prompt_ids), 1)
    return -sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))


def test_prompt_completion_loss_and_gradient_equal_hand_masking(hf_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pair_records())
    task = HFCausalLMTask(hf_dir, train, id_field="id", prompt_field="prompt", completion_field="completion")
    examples = task.train_examples()
    assert [task.example_id(e, i) for i, e in enumerate(examples)] == ["p0", "p1", "p2", "p3"]
    model = task.model().eval()
    batch = task.collate(list(examples))
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # padded batch
    losses = task.loss(model, batch)
    assert losses.shape == (len(PAIRS),)

    tokenizer = tiny_tokenizer()
    reference = tiny_gpt2(0)
    params = [p for p in model.parameters()]
    ref_params = [p for p in reference.parameters()]
    for i, (prompt, completion) in enumerate(PAIRS):
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        # the prompt's tokens are masked in the labels, the completion's are not
        n = len(p_ids) + len(c_ids)
        assert batch["labels"][i, : len(p_ids)].eq(-100).all()
        assert batch["labels"][i, len(p_ids): n].tolist() == c_ids
        assert batch["labels"][i, n:].eq(-100).all()
        expected = hand_masked_loss(reference, p_ids, c_ids)
        torch.testing.assert_close(losses[i].double(), expected, rtol=1e-5, atol=1e-5)
        # the gradient of example i's (batched, padded) loss equals the hand-masked one's
        got = torch.autograd.grad(losses[i], params, retain_graph=True)
        want = torch.autograd.grad(expected, ref_params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-6)
    # a completion-only loss is smaller than the whole-text loss of the same tokens
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": p + " " + c} for p, c in PAIRS])
    whole = HFCausalLMTask(hf_dir, plain)
    with torch.no_grad():
        assert (whole.loss(model, whole.collate(whole.train_examples())) > losses.detach()).all()


def test_truncation_keeps_the_prompt_end_and_the_completion_start(hf_dir, tmp_path):
    tokenizer = tiny_tokenizer()
    long_prompt = " ".join(CORPUS[:4])
    long_completion = " ".join(CORPUS[4:])
    p_ids = tokenizer(long_prompt)["input_ids"]
    c_ids = tokenizer(long_completion, add_special_tokens=False)["input_ids"]
    assert len(p_ids) > 10 and len(c_ids) > 10
    records = [{"prompt": long_prompt, "completion": long_completion},
               {"prompt": long_prompt, "completion": "the mat"},
               {"prompt": "the cat", "completion": long_completion}]
    train = write_jsonl(tmp_path / "t.jsonl", records)
    task = HFCausalLMTask(hf_dir, train, max_length=10, prompt_field="prompt", completion_field="completion")
    both, short_c, short_p = (task.encode_pair(e) for e in task.train_examples())
    # both long: half and half; prompt's END, completion's START
    assert both == (p_ids[-5:] + c_ids[:5], 5)
    # short completion: all of it, the prompt gets the rest (its end)
    mat = tokenizer("the mat", add_special_tokens=False)["input_ids"]
    assert short_c == (p_ids[-(10 - len(mat)):] + mat, 10 - len(mat))
    # short prompt: all of it, the completion gets the rest (its start)
    cat = tokenizer("the cat")["input_ids"]
    assert short_p == (cat + c_ids[: 10 - len(cat)], len(cat))
    batch = task.collate(list(task.train_examples()))
    assert batch["input_ids"].shape == (3, 10)


def test_empty_completions_are_refused_by_id_or_skipped(hf_dir, tmp_path, capsys):
    records = pair_records() + [{"id": "empty1", "prompt": "the cat", "completion": ""},
                                {"id": "p-ok", "prompt": "a dog", "completion": "ran"},
                                {"id": "empty2", "prompt": "", "completion": "the"}]  # no token before it
    train = write_jsonl(tmp_path / "train.jsonl", records)
    kwargs = dict(id_field="id", prompt_field="prompt", completion_field="completion")
    with pytest.raises(TaskLoadError, match=r"train example 'empty1' .*--skip-empty"):
        HFCausalLMTask(hf_dir, train, **kwargs).train_examples()
    task = HFCausalLMTask(hf_dir, train, query_data=train, skip_empty=True, **kwargs)
    examples = task.train_examples()
    ids = [task.example_id(e, i) for i, e in enumerate(examples)]
    assert ids == ["p0", "p1", "p2", "p3", "p-ok"]
    assert task.skipped_ids["train"] == ["empty1", "empty2"]
    assert task.train_examples() is examples  # computed once: same Sequence, same order
    err = capsys.readouterr().err
    assert err.count("skipped 2 of 7 train examples") == 1 and "'empty1'" in err
    assert len(task.query_examples()) == 5 and task.skipped_ids["query"] == ["empty1", "empty2"]
    with torch.no_grad():
        assert torch.isfinite(task.loss(task.model(), task.collate(list(examples)))).all()


def test_option_combinations_are_checked(hf_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pair_records())
    with pytest.raises(TaskLoadError, match="both prompt_field and completion_field"):
        HFCausalLMTask(hf_dir, train, prompt_field="prompt")
    with pytest.raises(TaskLoadError, match="chat_template .* needs prompt_field"):
        HFCausalLMTask(hf_dir, train, chat_template=True)
    with pytest.raises(TaskLoadError, match="skip_empty .* needs prompt_field"):
        HFCausalLMTask(hf_dir, train, skip_empty=True)
    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"prompt": "a"}])
    with pytest.raises(TaskLoadError, match=r"nofield\.jsonl:1: no field 'completion'"):
        HFCausalLMTask(hf_dir, no_field, prompt_field="prompt", completion_field="completion").train_examples()


def test_chat_template_is_applied_or_refused(hf_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pair_records())
    task = HFCausalLMTask(hf_dir, train, prompt_field="prompt", completion_field="completion", chat_template=True)
    with pytest.raises(TaskLoadError, match="has no chat template"):
        task.train_examples()

    templated = tmp_path / "templated"
    shutil.copytree(hf_dir, templated)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}the cat {{ m['content'] }} "
                               "{% else %}{{ m['content'] }} <eos>{% endif %}{% endfor %}")
    tokenizer.save_pretrained(templated)
    task = HFCausalLMTask(templated, train, prompt_field="prompt", completion_field="completion", chat_template=True)
    example = task.train_examples()[0]
    ids, n_prompt = task.encode_pair(example)
    head = tokenizer("the cat the cat sat on ", add_special_tokens=False)["input_ids"]
    tail = tokenizer("the mat <eos>", add_special_tokens=False)["input_ids"]
    assert (ids, n_prompt) == (head + tail, len(head))
    assert ids[-1] == tokenizer.eos_token_id  # the end-of-turn marker is scored with the completion
    labels = task.collate([example])["labels"][0]
    assert labels[:n_prompt].eq(-100).all() and labels[n_prompt:].tolist() == tail


# ---------------------------------------------------------------------------------------------
# Inputs


def test_jsonl_gz_and_bad_utf8_or_json_name_the_file_and_line(hf_dir, tmp_path):
    records = [{"text": t} for t in CORPUS[:3]]
    gz = tmp_path / "train.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
    task = HFCausalLMTask(hf_dir, gz)
    assert [e["text"] for e in task.train_examples()] == CORPUS[:3]
    assert [e["id"] for e in task.train_examples()] == ["1", "2", "3"]

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(TaskLoadError, match=r"bad\.jsonl:2: invalid UTF-8"):
        HFCausalLMTask(hf_dir, bad).train_examples()
    bad_gz = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad_gz, "wb") as fh:
        fh.write(b'{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(TaskLoadError, match=r"bad\.jsonl\.gz:3: invalid JSON"):
        HFCausalLMTask(hf_dir, bad_gz).train_examples()
    with pytest.raises(TaskLoadError, match="unknown data format"):
        open_records(write_jsonl(tmp_path / "x.csv", []))


def write_parquet(path, records, row_group_size):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install 'lorif-stream[data]')")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def test_parquet_is_read_lazily_by_row_group(hf_dir, tmp_path):
    records = [{"doc": f"d{i}", "text": CORPUS[i % len(CORPUS)], "extra": "x" * 50} for i in range(10)]
    path = write_parquet(tmp_path / "train.parquet", records, row_group_size=2)
    source = ParquetRecords(path, columns=["text", "doc"], cache_groups=2)
    assert len(source) == 10 and source.num_row_groups == 5 and source.group_reads == 0  # len from metadata
    assert source[7] == {"text": records[7]["text"], "doc": "d7"}  # only the needed columns
    assert source.group_reads == 1  # one row group read for one example, not five
    assert source[6]["doc"] == "d6" and source.group_reads == 1  # same row group: cached
    source[0], source[2], source[-1]
    assert source.group_reads == 4 and source[-1]["doc"] == "d9"
    source[7]  # evicted by the LRU of 2 -> read again
    assert source.group_reads == 5
    with pytest.raises(IndexError):
        source[10]
    with pytest.raises(TaskLoadError, match=r"no column 'body' \(columns: doc, text, extra\)"):
        ParquetRecords(path, columns=["body"])

    task = HFCausalLMTask(hf_dir, path, id_field="doc")
    examples = task.train_examples()
    assert len(examples) == 10 and examples.records.group_reads == 0
    assert examples[3] == {"id": "d3", "text": records[3]["text"]}
    assert examples.records.group_reads == 1
    assert [e["id"] for e in HFCausalLMTask(hf_dir, path).train_examples()] == [str(i) for i in range(10)]
    batch = task.collate([examples[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4


def test_parquet_prompt_completion_with_skips(hf_dir, tmp_path):
    records = pair_records() + [{"id": "e", "prompt": "the cat", "completion": ""}]
    path = write_parquet(tmp_path / "pc.parquet", records, row_group_size=2)
    task = HFCausalLMTask(hf_dir, path, id_field="id", prompt_field="prompt", completion_field="completion",
                          skip_empty=True)
    examples = task.train_examples()
    assert [e["id"] for e in examples] == ["p0", "p1", "p2", "p3"] and task.skipped_ids["train"] == ["e"]
    assert examples[1] == {"id": "p1", "prompt": PAIRS[1][0], "completion": PAIRS[1][1]}


def test_datasets_folder(hf_dir, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="datasets not installed (pip install 'lorif-stream[data]')")
    records = [{"doc": f"d{i}", "text": t} for i, t in enumerate(CORPUS[:5])]
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(records).save_to_disk(str(folder))
    task = HFCausalLMTask(hf_dir, folder, id_field="doc")
    examples = task.train_examples()
    assert len(examples) == 5 and examples[4] == {"id": "d4", "text": CORPUS[4]}
    assert isinstance(examples.records, DiskDatasetRecords)
    with pytest.raises(TaskLoadError, match="no column 'body'"):
        DiskDatasetRecords(folder, columns=["body"])
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(dd))
    with pytest.raises(TaskLoadError, match=r"DatasetDict \(splits: train\).*dd/train"):
        open_records(dd)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(TaskLoadError, match=r"needs the datasets package: pip install 'lorif-stream\[data\]'"):
        open_records(folder)


# ---------------------------------------------------------------------------------------------
# The terminal summary of `lorif-stream query`


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_top_proponent_summary_only_on_a_terminal(hf_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"doc": f"d{i}", "text": t * 3} for i, t in enumerate(CORPUS)])
    task = HFCausalLMTask(hf_dir, train, id_field="doc")
    results = [{"id": "q0", "proponents": [{"id": "d2", "row": 2, "score": 12.5}], "opponents": []},
               {"id": "q1", "proponents": [{"id": "zz", "row": 1, "score": -1.0}], "opponents": []},
               {"id": "q2", "proponents": [], "opponents": []}]
    lines = top_proponent_lines(task, results)
    assert lines[0].startswith("q0: top proponent d2 (score 12.5)  'influence functions trace")
    assert lines[0].endswith("…'") and len(lines[0]) < 140  # ~80 characters of text
    assert lines[1] == "q1: top proponent zz (score -1)"  # id does not match the row: no (wrong) text
    assert lines[2] == "q2: no proponents"
    tty = FakeTTY()
    assert print_top_proponents(task, results, tty) and tty.getvalue().splitlines() == lines
    piped = io.StringIO()
    assert not print_top_proponents(task, results, piped) and piped.getvalue() == ""


def test_cli_prompt_completion_parquet_build_and_query(hf_dir, tmp_path, monkeypatch):
    from lorif_stream import task as task_module
    from lorif_stream.cli import cli

    records = pair_records(PAIRS * 2)
    train = write_parquet(tmp_path / "train.parquet", records, row_group_size=3)
    queries = write_jsonl(tmp_path / "q.jsonl", pair_records(PAIRS[:2]))
    pc = ["--hf-model", str(hf_dir), "--id-field", "id", "--prompt-field", "prompt", "--completion-field",
          "completion", "--max-length", "16"]
    runner = CliRunner()
    built = runner.invoke(cli, ["build", *pc, "--data", str(train), "--index", str(tmp_path / "idx"), "--f", "2",
                                "--rank", "2", "--sketch-rank", "8", "--device", "cpu", "--quiet"])
    assert built.exit_code == 0, built.output
    args = ["query", *pc, "--data", str(train), "--queries", str(queries), "--index", str(tmp_path / "idx"),
            "--top-k", "2", "--out", str(tmp_path / "r.jsonl"), "--device", "cpu", "--quiet"]
    piped = runner.invoke(cli, args)
    assert piped.exit_code == 0, piped.output
    assert "top proponent" not in piped.output  # piped: only the one summary line
    results = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == ["p0", "p1"]

    shown = []
    real = task_module.print_top_proponents
    monkeypatch.setattr(task_module, "print_top_proponents",
                        lambda task, res, stream=None: shown.extend(top_proponent_lines(task, res)) or real(task, res, stream))
    on_tty = runner.invoke(cli, args)
    assert on_tty.exit_code == 0, on_tty.output
    assert len(shown) == 2 and shown[0].startswith("p0: top proponent p")
    assert any(p in shown[0] for p, _ in PAIRS)  # the proponent's text is shown
    bad = runner.invoke(cli, ["query", "--hf-model", str(hf_dir), "--prompt-field", "prompt", "--queries",
                              str(queries), "--index", str(tmp_path / "idx")])
    assert bad.exit_code != 0 and "--prompt-field and --completion-field together" in bad.output
