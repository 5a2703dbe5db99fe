"""`lorif-stream demo`: the newcomer path, run end to end at the reduced size (--quick)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from lorif_stream import demo  # noqa: E402
from lorif_stream.cli import cli  # noqa: E402

TOP_K = 3


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorif_stream.cli", "demo", *args],
                          capture_output=True, text=True, timeout=timeout)


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = _run("--quick", "--out", str(out))
    assert proc.returncode == 0, f"demo failed:\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-3000:]}"
    return out, proc


def test_bundled_corpus_is_small_real_and_packaged():
    assert demo.CORPUS_FILE.is_file()
    assert demo.CORPUS_FILE.stat().st_size < 1_000_000
    rows = demo.load_corpus()
    assert len(rows) > 5000
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(r["text"], str) and 24 <= len(r["text"]) <= 280 for r in rows)
    assert {r["source"] for r in rows} <= {"wisdom", "science", "computers", "literature", "people", "education",
                                            "humorists", "platitudes", "fortunes", "miscellaneous", "work", "art",
                                            "kids", "food", "pets", "paradoxum", "goedel"}


def test_split_places_twins_and_keeps_held_out_fortunes_out():
    rows = demo.load_corpus()
    a, b, queries = demo.split_corpus(rows, demo.QUICK, seed=0)
    assert len(a) + len(b) == demo.QUICK.examples and len(b) < len(a)
    ids_a, ids_b = {r["id"] for r in a}, {r["id"] for r in b}
    assert not ids_a & ids_b
    for q in demo.QUERIES:
        if "twin" in q:
            assert q["twin"] in (ids_a if q["split"] == "a" else ids_b)
        if "held_out" in q:
            assert q["held_out"] not in ids_a | ids_b
    assert [q["id"] for q in queries] == [q["id"] for q in demo.QUERIES]
    assert demo.split_corpus(rows, demo.QUICK, seed=0) == (a, b, queries)  # deterministic


def test_quick_demo_runs_the_cli_and_attributes_each_query(quick_demo):
    out, proc = quick_demo
    for name in ("train_a.jsonl", "train_b.jsonl", "queries.jsonl", "results.jsonl", "demo.json"):
        assert (out / name).is_file(), name
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    train_a, train_b = _jsonl(out / "train_a.jsonl"), _jsonl(out / "train_b.jsonl")
    queries, results = _jsonl(out / "queries.jsonl"), _jsonl(out / "results.jsonl")
    corpus_ids = {r["id"] for r in demo.load_corpus()}
    train_ids = [r["id"] for r in train_a + train_b]
    assert set(train_ids) <= corpus_ids
    assert [r["id"] for r in results] == [q["id"] for q in queries]
    for r in results:
        for side in ("proponents", "opponents"):
            entries = r[side]
            assert len(entries) == TOP_K
            for e in entries:
                assert 0 <= e["row"] < len(train_ids)
                assert e["id"] == train_ids[e["row"]]  # row i of the index is line i of train_a, then train_b
        assert all(p["score"] >= o["score"] for p in r["proponents"] for o in r["opponents"])
    # the real commands ran, and each query is printed with its top proponents' ids and text
    for command in ("$ lorif-stream build", "$ lorif-stream append", "$ lorif-stream query"):
        assert command in proc.stdout
    by_id = {r["id"]: r for r in train_a + train_b}
    for q, r in zip(queries, results):
        assert f"query {q['id']}" in proc.stdout
        assert q["text"][:40] in proc.stdout
        for e in r["proponents"]:
            assert e["id"] in proc.stdout and by_id[e["id"]]["text"][:30] in proc.stdout
    assert str(out / "results.jsonl") in proc.stdout and str(out / "index") in proc.stdout
    summary = json.loads((out / "demo.json").read_text())
    assert summary["finished"] and summary["rows"] == {"train_a": len(train_a), "train_b": len(train_b)}


def test_reworded_queries_find_their_training_twin(quick_demo):
    out, _ = quick_demo
    results = {r["id"]: r for r in _jsonl(out / "results.jsonl")}
    train_ids = [r["id"] for r in _jsonl(out / "train_a.jsonl") + _jsonl(out / "train_b.jsonl")]
    n_a = len(_jsonl(out / "train_a.jsonl"))
    twins = [q for q in demo.QUERIES if "twin" in q]
    assert twins
    for q in twins:
        top = results[q["id"]]["proponents"][0]
        assert top["id"] == q["twin"], (q["id"], results[q["id"]]["proponents"])
        assert (top["row"] < n_a) == (q["split"] == "a")  # one twin was built, the other appended
        assert train_ids[top["row"]] == q["twin"]


def test_demo_writes_a_report_page_and_says_where(quick_demo):
    import html.parser

    out, proc = quick_demo
    page_file = out / "report.html"
    assert page_file.is_file() and "$ lorif-stream report" in proc.stdout
    assert f"report   {page_file}" in proc.stdout and "open it in a browser" in proc.stdout
    page = page_file.read_text(encoding="utf-8")

    class Text(html.parser.HTMLParser):
        text = ""

        def handle_data(self, data):
            self.text += data

    parser = Text()
    parser.feed(page)
    by_id = {r["id"]: r["text"] for r in _jsonl(out / "train_a.jsonl") + _jsonl(out / "train_b.jsonl")}
    for q, r in zip(_jsonl(out / "queries.jsonl"), _jsonl(out / "results.jsonl")):
        assert q["id"] in parser.text and q["text"] in parser.text
        for e in r["proponents"] + r["opponents"]:
            assert e["id"] in parser.text and by_id[e["id"]] in parser.text  # texts from both data files
    summary = json.loads((out / "demo.json").read_text())
    assert summary["report"] == str(page_file) and "report" in summary["timings"]


def test_finished_demo_is_not_overwritten_without_force(quick_demo):
    out, _ = quick_demo
    proc = _run("--quick", "--out", str(out), timeout=120)
    assert proc.returncode != 0
    assert "already holds a finished demo" in proc.stderr and "--force" in proc.stderr
    assert (out / "results.jsonl").is_file()


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(demo.DemoError, match="not made by `lorif-stream demo`"):
        demo.run_demo(tmp_path, quick=True, force=True, echo=lambda *a, **k: None)
    assert (tmp_path / "model").is_dir() and (tmp_path / "notes.txt").is_file()


def test_help_explains_the_options():
    result = CliRunner().invoke(cli, ["demo", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--quick", "--device", "--force", "--top-k", "--examples", "--threads", "--quiet"):
        assert option in result.output
    assert "lorif-demo" in result.output
