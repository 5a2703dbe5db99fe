"""`lorif-stream report`: one self-contained HTML page of query results.

Built on a real index (a tiny GPT-2, build + append + query through the CLI) whose training
texts try to break the page (markup, quotes, an event handler). Always run: the page parsed
with html.parser holds every query, proponent and opponent with its text, escaped, and
references nothing outside itself; results from another index are refused; only the rows in
the results are read. With a Chromium on the PATH (Debian: apt-get install chromium), the page
is also opened headless: its script filters, the hostile texts do not run.
"""
from __future__ import annotations

import base64
import hashlib
import html
import html.parser
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from helpers_models import CORPUS, save_tiny_hf_model  # noqa: E402
from lorif_stream import report as report_module  # noqa: E402
from lorif_stream import readers as readers_module  # noqa: E402
from lorif_stream.cli import cli  # noqa: E402
from lorif_stream.report import (  # noqa: E402
    _score_format,
    LayerSpectrum,
    RecordTexts,
    ReportError,
    cumulative_energy,
    gather_report,
    make_report,
    read_results,
)

HOSTILE = [
    "the cat <script>document.title='pwned'</script> sat on the mat",
    'a dog <img src=x onerror="document.body.setAttribute(\'data-pwned\',\'1\')"> ran to the park',
    "influence & functions \"trace\" a 'prediction' </td></table></section> to training data",
    "low rank <!-- factors --> store <b>gradients</b> cheaply ü ∑ 中",
]
TOP_K = 3


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A built (train_a), appended (train_b) and queried index with hostile training texts."""
    root = tmp_path_factory.mktemp("report")
    model = save_tiny_hf_model(root / "model")
    texts = HOSTILE + CORPUS + [t.upper() for t in CORPUS]
    records = [{"doc": f"d{i:02d}", "text": t} for i, t in enumerate(texts)]
    train_a, train_b = _jsonl(root / "a.jsonl", records[:14]), _jsonl(root / "b.jsonl", records[14:])
    queries = _jsonl(root / "q.jsonl", [{"doc": "q-cat", "text": "the cat sat <b>on</b> the mat"},
                                        {"doc": "q-fox", "text": "the quick brown fox & the lazy dog"},
                                        {"doc": "q-rank", "text": "low rank factors store gradients"}])
    common = ["--hf-model", str(model), "--id-field", "doc", "--max-length", "32", "--index", str(root / "idx"),
              "--device", "cpu"]
    runner = CliRunner()
    for args in (["build", *common, "--data", str(train_a), "--quiet"],
                 ["append", *common, "--data", str(train_b), "--quiet"],
                 ["query", *common, "--queries", str(queries), "--top-k", str(TOP_K), "--out", str(root / "r.jsonl"),
                  "--quiet"]):
        done = runner.invoke(cli, args)
        assert done.exit_code == 0, (args[0], done.output)
    return {"root": root, "model": model, "records": records, "a": train_a, "b": train_b, "queries": queries,
            "index": root / "idx", "results": root / "r.jsonl",
            "query_records": [json.loads(l) for l in queries.read_text().splitlines()]}


def _report(run, out, *extra):
    args = ["report", "--results", str(run["results"]), "--index", str(run["index"]), "--data", str(run["a"]),
            "--data", str(run["b"]), "--queries", str(run["queries"]), "--id-field", "doc", "--out", str(out), *extra]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    return out.read_text(encoding="utf-8"), done.output


class Page(html.parser.HTMLParser):
    """Every start tag with its attributes, script and style bodies, and the text of each query section."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.sections: list[str] = []
        self._in: str | None = None
        self._depth = 0
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._in = tag
            (self.scripts if tag == "script" else self.styles).append("")
        if tag == "section" and ("class", "query") in attrs:
            self.sections.append("")
            self._depth = 1
        elif tag == "section" and self._depth:
            self._depth += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._in = None
        if tag == "section" and self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if self._in == "script":
            self.scripts[-1] += data
        elif self._in == "style":
            self.styles[-1] += data
        elif self._depth:
            self.sections[-1] += data


def test_page_holds_every_query_and_entry_with_its_text(run, tmp_path):
    page, output = _report(run, tmp_path / "report.html")
    assert "report of 3 queries" in output and str(tmp_path / "report.html") in output
    results = read_results(run["results"])
    texts = {r["doc"]: r["text"] for r in run["records"]}
    parsed = Page(page)
    assert len(parsed.sections) == len(results) == 3
    for section, result, query in zip(parsed.sections, results, run["query_records"]):
        assert result.id == query["doc"] and result.id in section
        assert query["text"] in section  # unescaped by the parser: the exact text, markup included
        assert len(result.proponents) == len(result.opponents) == TOP_K
        # one format for both columns: every score to the same significant digits
        fmt = _score_format([e.score for _, e in result.entries()])
        for _, entry in result.entries():
            assert entry.id in section and f"row {entry.row:,}" in section and fmt(entry.score) in section
            assert texts[entry.id] in section, entry.id
        assert section.index("proponents") < section.index(result.proponents[0].id) < section.index("opponents")
    shown = {e.id for r in results for _, e in r.entries()}
    assert any(texts[i] in HOSTILE for i in shown)  # the escaping below was exercised on a shown text
    # the index summary and the layer spectra are on the page
    assert "index" in page and f"{len(run['records']):,} training examples" in page
    assert page.count("<polyline") >= 1 and "captured energy per layer" in page


def test_texts_are_escaped_and_nothing_external_is_referenced(run, tmp_path):
    page, _ = _report(run, tmp_path / "report.html")
    parsed = Page(page)
    assert [t for t, _ in parsed.tags].count("script") == 1  # only the page's own
    assert "img" not in [t for t, _ in parsed.tags] and "<b>gradients" not in page and "<!-- factors" not in page
    assert "&lt;script&gt;document.title" in page
    for tag, attrs in parsed.tags:
        assert not {"src", "href", "xlink:href", "action", "srcset", "data"} & set(attrs), (tag, attrs)
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)  # no event handlers
        assert tag not in ("link", "iframe", "object", "embed", "base", "img", "audio", "video", "form")
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|url\(|@import|@font-face", page, re.I)
    # the CSP lets only this script run (by hash) and forbids every fetch
    csp = [a["content"] for t, a in parsed.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert len(csp) == 1 and "default-src 'none'" in csp[0]
    digest = base64.b64encode(hashlib.sha256(parsed.scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp[0]


def test_results_from_another_index_or_not_results_are_refused(run, tmp_path):
    lines = run["results"].read_text().splitlines()
    first = json.loads(lines[0])
    wrong_id = dict(first, proponents=[dict(first["proponents"][0], id="d99")] + first["proponents"][1:])
    beyond = dict(first, opponents=[dict(first["opponents"][0], row=999)])
    cases = {
        "wrong_id.jsonl": (json.dumps(wrong_id) + "\n",
                           rf"wrong_id\.jsonl:1: query 'q-cat': proponent row {first['proponents'][0]['row']} is 'd99' in "
                           rf"the results but '{first['proponents'][0]['id']}' in index .*idx: results from a different index"),
        "beyond.jsonl": (lines[0] + "\n" + json.dumps(beyond) + "\n",
                         rf"beyond\.jsonl:2: query 'q-cat': opponent row 999 is beyond the {len(run['records'])} rows of index"),
        "queries.jsonl": (run["queries"].read_text(), r"queries\.jsonl:1: expected an object with id, proponents and opponents"),
        "garbage.jsonl": ("id,score\n", r"garbage\.jsonl:1: not a JSON line"),
        "empty.jsonl": ("\n", r"results file .*empty\.jsonl is empty"),
        "bad_entry.jsonl": (json.dumps(dict(first, proponents=[{"id": "d00", "row": -1, "score": 1.0}])) + "\n",
                            r"bad_entry\.jsonl:1: proponents: an entry needs id \(string\), row \(int >= 0\)"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ReportError, match=message):
            gather_report(tmp_path / name, run["index"])
    with pytest.raises(ReportError, match=r"results file not found: .*missing\.jsonl"):
        read_results(tmp_path / "missing.jsonl")
    # through the CLI: one line, exit status 1, nothing written
    proc = subprocess.run([sys.executable, "-m", "lorif_stream.cli", "report", "--results",
                           str(tmp_path / "wrong_id.jsonl"), "--index", str(run["index"]), "--out",
                           str(tmp_path / "no.html")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "d99" in proc.stderr
    assert not (tmp_path / "no.html").exists()


def test_only_the_rows_in_the_results_are_read(run, tmp_path, monkeypatch):
    parsed = []
    real = readers_module._parse_jsonl_line
    monkeypatch.setattr(readers_module, "_parse_jsonl_line", lambda raw, path, n: parsed.append(path.name) or real(raw, path, n))
    _, made = make_report(run["results"], run["index"], tmp_path / "r.html", data=[run["a"], run["b"]],
                          queries=run["queries"], id_field="doc")
    rows = {e.row for r in made.results for _, e in r.entries()}
    assert set(made.texts) == rows and len(rows) < len(run["records"])
    assert len(parsed) == len(rows) + len(made.results)  # one parse per wanted row and query: no full read
    assert made.notes == ()


def test_shifted_rows_are_found_by_id_and_missing_texts_named(run, tmp_path):
    # the files in the wrong order: no row is where the index says, every id is still found
    _, made = make_report(run["results"], run["index"], tmp_path / "r.html", data=[run["b"], run["a"]], id_field="doc")
    texts = {r["doc"]: r["text"] for r in run["records"]}
    assert all(made.texts[e.row].plain == texts[e.id] for r in made.results for _, e in r.entries())
    assert made.notes and "looked up by id in one pass" in made.notes[0]
    # only the appended file: the built rows' texts are named missing, the others shown
    _, made = make_report(run["results"], run["index"], tmp_path / "r.html", data=[run["b"]], id_field="doc")
    assert any("are not in" in n and "text is left out" in n for n in made.notes)
    # texts from unrelated data: refused, not a page of blanks
    other = _jsonl(tmp_path / "other.jsonl", [{"doc": f"x{i}", "text": "t"} for i in range(40)])
    with pytest.raises(ReportError, match=r"none of the \d+ ids wanted are in .*other\.jsonl"):
        make_report(run["results"], run["index"], tmp_path / "r.html", data=[other], id_field="doc")


def test_prompt_completion_texts_and_task_texts(run, tmp_path):
    pc = _jsonl(tmp_path / "pc.jsonl", [{"doc": r["doc"], "p": r["text"][:10], "c": r["text"][10:]} for r in run["records"]])
    source = RecordTexts([pc], id_field="doc", prompt_field="p", completion_field="c")
    doc, text = source.at(3)
    assert doc == "d03" and [k for k, _ in text.parts] == ["prompt", "completion"]
    _, made = make_report(run["results"], run["index"], tmp_path / "r.html", data=[pc], id_field="doc",
                          prompt_field="p", completion_field="c", max_chars=12)
    page = (tmp_path / "r.html").read_text()
    assert '<span class="prompt" title="prompt">' in page and '<span class="completion" title="completion">' in page
    assert "more characters)" in page  # max_chars clips long texts, saying how much is left out
    # a Task as the text source: example_id and example_text
    task_file = tmp_path / "t.py"
    task_file.write_text(
        "import json\n"
        f"ROWS = [json.loads(l) for l in open({str(run['a'])!r})] + [json.loads(l) for l in open({str(run['b'])!r})]\n"
        "class T:\n"
        "    def model(self): raise AssertionError('a report needs no model')\n"
        "    def train_examples(self): return ROWS\n"
        "    def query_examples(self): return []\n"
        "    def collate(self, e): return e\n"
        "    def loss(self, m, b): return b\n"
        "    def example_id(self, e, i): return e['doc']\n"
        "    def example_text(self, e): return 'TASK:' + e['text']\n")
    _, made = make_report(run["results"], run["index"], tmp_path / "t.html", task=f"{task_file}:T")
    assert made.texts and all(t.plain.startswith("TASK:") for t in made.texts.values())
    done = CliRunner().invoke(cli, ["report", "--results", str(run["results"]), "--index", str(run["index"]),
                                    "--task", f"{task_file}:T", "--data", str(run["a"])])
    assert done.exit_code != 0 and "either --task or" in done.output


def test_energy_curve_and_spectrum_plots():
    eig = np.array([1.0, 8.0, 0.0, 4.0, 2.0, 1.0] + [0.0] * 4)  # any order: sorted first
    np.testing.assert_allclose(cumulative_energy(eig)[:5], [0.5, 0.75, 0.875, 0.9375, 1.0])
    spectrum = LayerSpectrum.of("l", "ekfac", 10, eig)
    assert spectrum.k90 == 4 and dict(spectrum.curve)[1] == pytest.approx(0.5) and dict(spectrum.curve)[10] == 1.0
    lowrank = LayerSpectrum.of("l", "lowrank", 100, np.array([3.0, 1.0]), trace=8.0)  # top r of a larger trace
    assert dict(lowrank.curve) == {1: pytest.approx(0.375), 2: pytest.approx(0.5)} and lowrank.k90 is None
    big = LayerSpectrum.of("big", "ekfac", 100_000, np.arange(100_000, dtype=np.float64))
    assert len(big.curve) <= 96 and big.curve[-1] == (100_000, 1.0)  # sampled for the page ...
    cum = cumulative_energy(np.arange(100_000, dtype=np.float64))
    assert cum[big.k90 - 1] >= 0.9 > cum[big.k90 - 2]  # ... but k90 is exact
    assert LayerSpectrum.of("zero", "ekfac", 3, np.zeros(3)) is None
    with pytest.raises(ValueError, match="bad layer spectrum"):
        LayerSpectrum("l", "dense", 10, ((1, 0.5),), None)
    svg = report_module.energy_svg([spectrum, LayerSpectrum("m<x>", "ekfac", 10, ((1, 0.2), (10, 1.0)), 10)])
    assert svg.count("<polyline") == 2 and "m&lt;x&gt;" in svg and "<svg" in svg and "http" not in svg


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_browser() is None, reason="no Chromium on the PATH (Debian: apt-get install chromium)")
def test_page_in_a_headless_browser(run, tmp_path):
    out = tmp_path / "report.html"
    _report(run, out)

    def dom(fragment: str = "") -> str:
        proc = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", out.as_uri() + fragment],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "</html>" in proc.stdout, proc.stderr[-2000:]
        return proc.stdout

    whole = dom()
    assert "3 of 3 queries shown" in whole  # the page's own script ran
    assert "<title>pwned" not in whole and 'data-pwned="1"' not in whole  # the training texts' did not
    fox = dom("#q=brown%20FOX")  # the search box, pre-filled from the URL, filters case-insensitively
    assert "1 of 3 queries shown" in fox
    sections = re.findall(r'<section class="query" id="query-(\d)"( hidden="")?', fox)
    assert [(i, bool(h)) for i, h in sections] == [("0", True), ("1", False), ("2", True)]
    assert 'class="entry pro hit"' in fox or 'class="entry con hit"' in fox  # matching entries are marked
    # a link ending in a malformed escape is ignored: the page still works, unfiltered
    assert "3 of 3 queries shown" in dom("#q=%E0%A4%A")


def test_ids_and_texts_are_bidi_isolated_and_control_characters_visible(run, tmp_path):
    lines = [json.loads(l) for l in open(run["results"], encoding="utf-8")]
    lines[0]["id"] = "rlo-\u202egnp.exe\x00"
    results = _jsonl(tmp_path / "r.jsonl", lines)
    queries = _jsonl(tmp_path / "q.jsonl", [{"doc": lines[0]["id"], "text": "nul\x00here \x85 and \x1b end"}])
    make_report(results, run["index"], tmp_path / "p.html", queries=queries, id_field="doc")
    page = (tmp_path / "p.html").read_text(encoding="utf-8")
    assert "\x00" not in page and "\x85" not in page and "\x1b" not in page
    # the override stays inside its id: the label after it is not reordered
    assert '<bdi class="id">rlo-\u202egnp.exe<span class="ctl" title="U+0000">\u2400</span></bdi>' in page
    assert 'title="U+0085">\\x85</span>' in page and 'title="U+001B">\u241b</span>' in page
    for line in lines:
        for side in ("proponents", "opponents"):
            for e in line[side]:
                assert f'<bdi class="id">{html.escape(e["id"])}</bdi>' in page
    assert ".text,.qtext,.id,bdi{unicode-bidi:isolate}" in page


def test_parquet_data_reads_only_the_row_groups_holding_result_rows(run, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install 'lorif-stream[data]')")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(run["records"]), path, row_group_size=2)
    source = RecordTexts([path], id_field="doc")
    report = gather_report(run["results"], run["index"], source)
    rows = {e.row for r in report.results for _, e in r.entries()}
    texts = {r["doc"]: r["text"] for r in run["records"]}
    assert {row: t.plain for row, t in report.texts.items()} == {e.row: texts[e.id] for r in report.results
                                                                 for _, e in r.entries()}
    groups = {row // 2 for row in rows}
    assert source.sources[0].group_reads == len(groups) < len(run["records"]) // 2  # read in row order, once each


def test_rows_shifted_by_skip_empty_are_found_by_id(run, tmp_path):
    records = [{"doc": f"p{i}", "prompt": r["text"][:12], "completion": "" if i in (1, 4) else r["text"][12:]}
               for i, r in enumerate(run["records"][:10])]
    data = _jsonl(tmp_path / "pc.jsonl", records)
    pc = ["--hf-model", str(run["model"]), "--id-field", "doc", "--prompt-field", "prompt", "--completion-field",
          "completion", "--max-length", "32", "--skip-empty", "--index", str(tmp_path / "idx")]
    runner = CliRunner()
    for args in (["build", *pc, "--data", str(data), "--device", "cpu", "--quiet"],
                 ["query", *pc, "--queries", str(data), "--top-k", "2", "--out", str(tmp_path / "r.jsonl"),
                  "--device", "cpu", "--quiet"]):
        done = runner.invoke(cli, args)
        assert done.exit_code == 0, done.output
    # the task options of the query command line, reused as they are
    done = runner.invoke(cli, ["report", *pc, "--data", str(data), "--queries", str(data), "--results",
                               str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "r.html")])
    assert done.exit_code == 0, done.output
    assert "looked up by id in one pass" in done.output  # rows after p1 and p4 sit 1-2 lines later in the file
    made = gather_report(tmp_path / "r.jsonl", tmp_path / "idx", RecordTexts([data], id_field="doc",
                                                                             prompt_field="prompt",
                                                                             completion_field="completion"))
    by_id = {r["doc"]: r for r in records}
    assert len(made.texts) == len({e.row for r in made.results for _, e in r.entries()})
    for r in made.results:
        for _, e in r.entries():
            assert made.texts[e.row].parts == (("prompt", by_id[e.id]["prompt"]), ("completion", by_id[e.id]["completion"]))
    page = (tmp_path / "r.html").read_text()
    assert all(by_id[e.id]["completion"] in html.unescape(page) for r in made.results for _, e in r.entries())
