"""report: one self-contained HTML page of query results, readable offline in any browser.

    gather_report(results.jsonl, index, train texts, query texts) -> Report   (reads)
    render_html(Report) -> str                                                (pure)

The page shows, per query, its text and its proponents and opponents with their texts and score
bars, a search box (an inline script filters the queries as you type; ``#q=word`` in the URL
pre-fills it), the index summary that ``lorif-stream info`` prints, and each layer's curvature
spectrum as captured-energy curves and its whitening spectrum as bars, both as inline SVG.

Nothing is fetched when the page opens: no external script, style, font or image, and a
Content-Security-Policy that allows only the page's own script (by hash) forbids anything
else, so a training text that holds ``<script>`` is escaped text and could not run even if it
were not. Memory and time are bounded by the results, not by the corpus: only the rows that
appear in the results are read from the data (one row at a time; a plain ``.jsonl`` needs one
newline scan to find its rows, a ``.jsonl.gz`` is decompressed whole, being unseekable).
"""
from __future__ import annotations

import base64
import bisect
import hashlib
import html
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

__all__ = ["ReportError", "Entry", "Attribution", "Text", "ExampleTexts", "RecordTexts", "TaskTexts",
           "LayerSpectrum", "cumulative_energy", "Report", "read_results", "gather_report", "render_html", "write_report", "make_report"]

# Texts longer than this are clipped on the page (the rest is counted): a page stays readable and
# its size bounded by the results even when the corpus holds whole documents.
DEFAULT_MAX_CHARS = 4000
_CURVE_POINTS = 96


class ReportError(ValueError):
    """The results, index or data cannot make a report; the message names the offending value."""


# ------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Entry:
    """One proponent or opponent: a training example by id and index row, with its score (and, in the
    results of `query --rerank`, the index's own score beside the full-dimension one)."""

    id: str
    row: int
    score: float
    index_score: float | None = None

    def __post_init__(self):
        if not isinstance(self.id, str) or isinstance(self.row, bool) or not isinstance(self.row, int) or self.row < 0 \
                or isinstance(self.score, bool) or not isinstance(self.score, (int, float)):
            raise ValueError(f"an entry needs id (string), row (int >= 0) and score (number), got "
                             f"{{'id': {self.id!r}, 'row': {self.row!r}, 'score': {self.score!r}}}")
        if self.index_score is not None and (isinstance(self.index_score, bool)
                                             or not isinstance(self.index_score, (int, float))):
            raise ValueError(f"an entry's index_score must be a number, got {self.index_score!r}")


@dataclass(frozen=True)
class Attribution:
    """One line of results.jsonl: a query and its proponents (helped) and opponents (hurt)."""

    id: str
    proponents: tuple[Entry, ...]
    opponents: tuple[Entry, ...]
    line: int  # in the results file, for error messages

    def __post_init__(self):
        if not isinstance(self.id, str):
            raise ValueError(f"a query id must be a string, got {self.id!r}")

    def entries(self) -> Iterator[tuple[str, Entry]]:
        for e in self.proponents:
            yield "proponent", e
        for e in self.opponents:
            yield "opponent", e


def read_results(path: str | os.PathLike) -> list[Attribution]:
    """The queries of a results.jsonl file written by ``lorif-stream query``, validated line by line."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"results file not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    results = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if raw.strip():
                results.append(_attribution(raw, f"{path}:{lineno}", lineno))
    if not results:
        raise ReportError(f"results file {path} is empty: run `lorif-stream query ... --out {path}` first")
    return results


def _attribution(raw: bytes, where: str, lineno: int) -> Attribution:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "invalid UTF-8"
        raise ReportError(f"{where}: not a JSON line ({reason}): is this a results.jsonl from `lorif-stream query`?") from None
    if not isinstance(record, dict) or not {"id", "proponents", "opponents"} <= set(record):
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ReportError(f"{where}: expected an object with id, proponents and opponents (a line of "
                          f"`lorif-stream query` results), got {got}")
    sides = {}
    for side in ("proponents", "opponents"):
        if not isinstance(record[side], list):
            raise ReportError(f"{where}: {side} must be a list, got {record[side]!r:.60}")
        try:
            sides[side] = tuple(_entry(e) for e in record[side])
        except ValueError as e:
            raise ReportError(f"{where}: {side}: {e}") from None
    try:
        return Attribution(record["id"], sides["proponents"], sides["opponents"], lineno)
    except ValueError as e:
        raise ReportError(f"{where}: {e}") from None


def _entry(value: Any) -> Entry:
    if not isinstance(value, dict):
        raise ValueError(f"an entry must be an object with id, row and score, got {value!r:.60}")
    return Entry(value.get("id"), value.get("row"), value.get("score"), value.get("index_score"))


def check_against_index(results: Sequence[Attribution], id_of: Callable[[int], str], rows: int,
                        results_path: str, index: str) -> None:
    """Refuse results whose rows or ids are not the index's: they were made from another index."""
    for a in results:
        for side, e in a.entries():
            if e.row >= rows:
                raise ReportError(f"{results_path}:{a.line}: query {a.id!r}: {side} row {e.row} is beyond the "
                                  f"{rows:,} rows of index {index}: results from a different index?")
            actual = id_of(e.row)
            if actual != e.id:
                raise ReportError(f"{results_path}:{a.line}: query {a.id!r}: {side} row {e.row} is {e.id!r} in the "
                                  f"results but {actual!r} in index {index}: results from a different index?")


# ------------------------------------------------------------------------------------ texts


@dataclass(frozen=True)
class Text:
    """An example's text as labelled parts: ``(("text", ...),)`` or ``(("prompt", ...), ("completion", ...))``."""

    parts: tuple[tuple[str, str], ...]

    def __post_init__(self):
        if not self.parts or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.parts):
            raise ValueError(f"a text needs (label, string) parts, got {self.parts!r:.80}")

    @property
    def plain(self) -> str:
        return " ".join(v for _, v in self.parts)


class ExampleTexts:
    """Examples by position (index row, or query position): ``len()``, ``at(i) -> (id, Text)``."""

    what: str  # names the source in notes and errors

    def __len__(self) -> int:
        raise NotImplementedError

    def at(self, i: int) -> tuple[str, Text]:
        raise NotImplementedError


class RecordTexts(ExampleTexts):
    """Texts from data files (the HF task's formats), concatenated in the order given: build's
    file first, then each appended one, as the index numbers its rows. Opening reads what a
    length needs (parquet metadata, a jsonl file's line starts); rows are then read one at a time."""

    def __init__(self, paths: Sequence[str | os.PathLike], text_field: str = "text", id_field: str | None = None,
                 prompt_field: str | None = None, completion_field: str | None = None):
        from .readers import example_converter, open_records

        if not paths:
            raise ValueError("RecordTexts needs at least one data file")
        if (prompt_field is None) != (completion_field is None):
            raise ValueError("give prompt_field and completion_field together")
        self.fields = {"prompt": prompt_field, "completion": completion_field} if prompt_field else {"text": text_field}
        self.id_field = id_field
        columns = list(self.fields.values()) + ([id_field] if id_field else [])
        # a plain jsonl file is opened by a newline scan only: each wanted row is parsed when read
        self.sources = [open_records(p, columns, validate=False) for p in paths]
        self.converters = [example_converter(records, self.fields, id_field) for records in self.sources]
        self.starts = [0]
        for s in self.sources:
            self.starts.append(self.starts[-1] + len(s))
        self.what = " + ".join(str(p) for p in paths)

    def __len__(self) -> int:
        return self.starts[-1]

    def at(self, i: int) -> tuple[str, Text]:
        k = bisect.bisect_right(self.starts, i) - 1
        j = i - self.starts[k]
        example = self.converters[k](self.sources[k][j], j)
        return example["id"], Text(tuple((key, example[key]) for key in self.fields))


class TaskTexts(ExampleTexts):
    """Texts of a Task's examples: ``example_text(example)`` when the task has it, else the example
    itself when it is a string, its ``text`` (or ``prompt``/``completion``) when a dict, else its repr."""

    def __init__(self, task: Any, split: str):
        self.task = task
        self.examples = task.train_examples() if split == "train" else task.query_examples()
        self.what = f"the task's {split} examples"

    def __len__(self) -> int:
        return len(self.examples)

    def at(self, i: int) -> tuple[str, Text]:
        example = self.examples[i]
        return str(self.task.example_id(example, i)), _text_of_example(self.task, example)


def _text_of_example(task: Any, example: Any) -> Text:
    if isinstance(example, dict) and isinstance(example.get("prompt"), str) and isinstance(example.get("completion"), str):
        return Text((("prompt", example["prompt"]), ("completion", example["completion"])))
    text_of = getattr(task, "example_text", None)
    if callable(text_of):
        return Text((("text", str(text_of(example))),))
    if isinstance(example, str):
        return Text((("text", example),))
    if isinstance(example, dict) and isinstance(example.get("text"), str):
        return Text((("text", example["text"]),))
    return Text((("text", repr(example)),))


def fetch_texts(source: ExampleTexts, wanted: dict[int, str], hint: str) -> tuple[dict[int, Text], list[str]]:
    """Texts of the wanted positions ``{position: expected id}``, read by position in increasing
    order (row groups and pages are then read once each). A position whose example has another
    id (examples skipped at build time shift the rows; --data files given in another order) is
    looked up by id in one streaming pass that keeps only the wanted ids. Returns the texts found
    and notes on what was not; none found at all is an error ending with ``hint``."""
    texts: dict[int, Text] = {}
    stray: dict[str, list[int]] = {}
    for pos in sorted(wanted):
        if pos < len(source):
            got_id, text = source.at(pos)
            if got_id == wanted[pos]:
                texts[pos] = text
                continue
        stray.setdefault(wanted[pos], []).append(pos)
    notes = []
    if stray:
        notes.append(f"{sum(map(len, stray.values()))} of {len(wanted)} examples were not at their position in "
                     f"{source.what} (ids shifted, e.g. by --skip-empty): looked up by id in one pass over it")
        for i in range(len(source)):
            got_id, text = source.at(i)
            for pos in stray.pop(got_id, ()):
                texts[pos] = text
            if not stray:
                break
    if stray:
        missing = sorted(stray)
        notes.append(f"{len(missing)} ids are not in {source.what}, e.g. {missing[0]!r}: their text is left out")
        if len(missing) == len(wanted):
            raise ReportError(f"none of the {len(wanted)} ids wanted are in {source.what} (e.g. {missing[0]!r}): {hint}")
    return texts, notes


# ------------------------------------------------------------------------------------ index


@dataclass(frozen=True)
class LayerSpectrum:
    """One layer's curvature spectrum as a captured-energy curve: ``curve[j] = (k, fraction of the
    curvature's trace held by its top k eigenvalues)``, k log-spaced over 1..len(eigenvalues);
    ``k90`` the exact fewest directions holding 90% (None: the stored ones hold less)."""

    name: str
    kind: str                      # "ekfac" (all D eigenvalues) or "lowrank" (top r of a trace)
    dim: int
    curve: tuple[tuple[int, float], ...]
    k90: int | None

    def __post_init__(self):
        if self.kind not in ("ekfac", "lowrank") or self.dim < 1 or not self.curve:
            raise ValueError(f"bad layer spectrum {self.name!r}: kind {self.kind!r}, dim {self.dim}, {len(self.curve)} points")

    @classmethod
    def of(cls, name: str, kind: str, dim: int, eigenvalues, trace: float | None = None) -> "LayerSpectrum | None":
        """From the stored eigenvalues (and, for a top-r set, the full trace); None when they hold no energy."""
        cum = cumulative_energy(eigenvalues, trace)
        if cum.size == 0:
            return None
        return cls(name, kind, dim, sample_curve(cum), directions_for(cum, 0.9))


def cumulative_energy(eigenvalues, trace: float | None = None):
    """``cum[k-1]`` = fraction of ``trace`` (default: their sum) held by the top-k ``eigenvalues``."""
    import numpy as np

    e = np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64).ravel(), 0, None))[::-1]
    total = float(trace) if trace else float(e.sum())
    if e.size == 0 or not total > 0:
        return np.zeros(0)
    return np.minimum(np.cumsum(e) / total, 1.0)


def sample_curve(cum, points: int = _CURVE_POINTS) -> tuple[tuple[int, float], ...]:
    """About ``points`` log-spaced samples of a cumulative curve (the page need not carry every eigenvalue)."""
    import numpy as np

    ks = np.unique(np.round(np.logspace(0, math.log10(len(cum)), points)).astype(np.int64))
    return tuple((int(k), float(cum[k - 1])) for k in ks)


def directions_for(cum, fraction: float) -> int | None:
    """The fewest top directions holding ``fraction`` of the energy (None: all of them hold less)."""
    import numpy as np

    k = int(np.searchsorted(cum, fraction - 1e-12)) + 1
    return k if k <= len(cum) else None


def layer_spectra(snap) -> list[LayerSpectrum]:
    """The curvature eigenvalues the index stores per layer (EK-FAC: all of them; low-rank: the top
    r and the trace); none for the dot-product preconditioner."""
    from .fit import CURVATURE_META, state_array_name as _array_name, stored_preconditioner

    meta = snap.state_meta(CURVATURE_META) or {}
    kind = stored_preconditioner(meta) if meta else None
    if kind not in ("ekfac", "lowrank"):
        return []
    out = []
    for layer in snap.layout.layers:
        info = meta.get("layers", {}).get(layer.name)
        if not info:
            continue
        field_name = "ekfac" if kind == "ekfac" else "sigma2"
        values = snap.array(_array_name(f"curvature/{meta['generation']}", layer.name, field_name))
        if values is None:
            continue
        spectrum = LayerSpectrum.of(layer.name, kind, layer.D, values, None if kind == "ekfac" else info.get("trace"))
        if spectrum is not None:
            out.append(spectrum)
    return out


# ------------------------------------------------------------------------------------ gather


@dataclass(frozen=True)
class Report:
    """Everything the page shows; ``texts`` maps index rows, ``query_texts`` query positions."""

    results_path: str
    index: dict                    # lorif_stream.info(index)
    results: tuple[Attribution, ...]
    texts: dict[int, Text]
    query_texts: dict[int, Text]
    spectra: tuple[LayerSpectrum, ...]
    notes: tuple[str, ...] = ()
    title: str = "lorif-stream attribution report"
    max_chars: int = DEFAULT_MAX_CHARS

    def __post_init__(self):
        if not self.results:
            raise ValueError("a report needs at least one query")
        if self.max_chars < 0:
            raise ValueError(f"max_chars must be >= 0 (0 = no limit), got {self.max_chars}")


def gather_report(results_path: str | os.PathLike, index: str | os.PathLike, train: ExampleTexts | None = None,
                  queries: ExampleTexts | None = None, title: str | None = None,
                  max_chars: int = DEFAULT_MAX_CHARS) -> Report:
    """Read the results, check them against the index, and fetch only the texts they name."""
    from .inspect_index import info
    from .store import open_index

    results_path = str(results_path)
    results = read_results(results_path)
    summary = info(index)
    with open_index(index) as reader, reader.snapshot() as snap:  # one index or a sharded one, global rows
        check_against_index(results, snap.id_of, snap.rows, results_path, str(index))
        spectra = layer_spectra(snap)
    notes: list[str] = []
    texts: dict[int, Text] = {}
    if train is not None and len(train):
        wanted = {e.row: e.id for a in results for _, e in a.entries()}
        texts, more = fetch_texts(train, wanted, "give the data files the index was built from, build's first "
                                                 "then each append's (repeat --data)")
        notes += more
    query_texts: dict[int, Text] = {}
    if queries is not None and len(queries):
        query_texts, more = fetch_texts(queries, {i: a.id for i, a in enumerate(results)},
                                        "give the --queries file that query scored")
        notes += more
    return Report(results_path, summary, tuple(results), texts, query_texts, tuple(spectra), tuple(notes),
                  title or f"lorif-stream report: {Path(results_path).name}", max_chars)


# ------------------------------------------------------------------------------------ render

_CSS = """
:root{--pro:#1a7f37;--con:#c62828;--mute:#666;--line:#ddd;font-family:system-ui,-apple-system,"Segoe UI",sans-serif}
body{margin:0 auto;max-width:1100px;padding:1em 1.5em 4em;color:#222;line-height:1.4}
h1{font-size:1.4em;margin:.4em 0}h2{font-size:1.15em;margin:0 0 .3em}h3{font-size:1em;margin:.8em 0 .3em}
.mute{color:var(--mute)}.small{font-size:.85em}code,.id{font-family:ui-monospace,Menlo,Consolas,monospace}
#search{position:sticky;top:0;background:#fff;padding:.6em 0;border-bottom:1px solid var(--line);z-index:1}
#filter{width:60%;font-size:1em;padding:.35em .5em}
section.query{border:1px solid var(--line);border-radius:6px;padding:.8em 1em;margin:1em 0}
.qtext{background:#f6f8fa;border-left:3px solid #888;padding:.4em .7em;white-space:pre-wrap;word-break:break-word}
table{border-collapse:collapse;width:100%}td,th{padding:.25em .4em;vertical-align:top;text-align:left}
tr.entry{border-top:1px solid #eee}tr.entry.hit{background:#fff8c5}
td.score{width:11em;white-space:nowrap;font-variant-numeric:tabular-nums}
.track{display:inline-block;width:6em;margin-right:.5em;vertical-align:middle}
.bar{display:block;height:.7em;border-radius:2px}
.pro .bar{background:var(--pro)}.con .bar{background:var(--con)}
.text{white-space:pre-wrap;word-break:break-word;max-height:9em;overflow:auto}
.text,.qtext,.id,bdi{unicode-bidi:isolate}.ctl{color:#b00;background:#fde;border-radius:2px;font-size:.85em}
.prompt{color:var(--mute)}.completion{font-weight:600}.clip{color:var(--mute);font-style:italic}
table.kv td:first-child{color:var(--mute);width:12em}table.layers td,table.layers th{font-size:.85em;border-top:1px solid #eee}
svg{max-width:100%;height:auto;font-size:11px}svg text{fill:#333}
.legend span{display:inline-block;margin:0 1em .2em 0;white-space:nowrap}
.legend i{display:inline-block;width:1.2em;height:.3em;margin-right:.3em;vertical-align:middle}
.notes{background:#fff4e5;border:1px solid #f0c36d;padding:.5em 1em;border-radius:6px}
"""

# Filters the queries by the search box (case-insensitive substring of a query's whole text) and
# marks matching entries; `#q=word` in the URL pre-fills the box. No data lives in the script.
_JS = """
(function(){
  var box=document.getElementById('filter'),shown=document.getElementById('shown');
  var items=Array.prototype.slice.call(document.querySelectorAll('section.query'));
  var hay=items.map(function(s){return s.textContent.toLowerCase();});
  var rows=items.map(function(s){return Array.prototype.slice.call(s.querySelectorAll('tr.entry'));});
  function apply(){
    var q=box.value.trim().toLowerCase(),n=0;
    items.forEach(function(s,i){
      var hit=!q||hay[i].indexOf(q)>=0;s.hidden=!hit;if(hit){n++;}
      rows[i].forEach(function(r){r.classList.toggle('hit',!!q&&r.textContent.toLowerCase().indexOf(q)>=0);});
    });
    shown.textContent=n+' of '+items.length+' queries shown';
  }
  var m=/[#&]q=([^&]*)/.exec(location.hash);
  if(m){try{box.value=decodeURIComponent(m[1].replace(/\\+/g,' '));}catch(e){}}
  box.addEventListener('input',apply);apply();
})();
"""


def _e(value: Any) -> str:
    """Escaped, for our own labels and paths (a lone surrogate, e.g. from an undecodable file name,
    becomes U+FFFD: UTF-8 cannot hold it)."""
    return _SURROGATE.sub("\ufffd", html.escape(str(value), quote=True))


_SURROGATE = re.compile("[\ud800-\udfff]")


# C0 and C1 controls but newline and tab, DEL, and lone surrogates (which UTF-8 cannot hold): shown as
# a visible mark, never written into the page as they are (a NUL would end some readers' text)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _mark(ch: str) -> str:
    code = ord(ch)
    shown = chr(0x2400 + code) if code < 0x20 else "\u2421" if code == 0x7f else f"\\x{code:02x}" if code < 0x100 \
        else f"\\u{code:04x}"
    return f'<span class="ctl" title="U+{code:04X}">{shown}</span>'


def _plain(value: Any) -> str:
    """Like _t for where no markup may go (the <title>): each control character as its visible mark."""
    return _CONTROL.sub(lambda m: chr(0x2400 + ord(m.group())) if ord(m.group()) < 0x20 else "\ufffd",
                        html.escape(str(value), quote=True))


def _t(value: Any) -> str:
    """Escaped text with its control characters made visible (ids and texts from the data)."""
    return _CONTROL.sub(lambda m: _mark(m.group()), html.escape(str(value), quote=True))


def _bdi(value: Any, css: str = "id") -> str:
    """An id isolated from the text around it: a right-to-left override inside stays inside."""
    return f'<bdi class="{css}">{_t(value)}</bdi>'


SCORE_DIGITS = 4  # significant digits of every score on the page


def _score_format(scores: Sequence[float]) -> Callable[[float], str]:
    """One format for every score of a query (both columns): each score to SCORE_DIGITS significant
    digits, so an opponent 1000x smaller than the top proponent is not cut to one digit; in
    scientific notation for all of them when any lies outside [1e-3, 1e5), where decimals read badly."""
    sizes = [abs(v) for v in scores if v != 0 and math.isfinite(v)]
    scientific = any(not 1e-3 <= v < 1e5 for v in sizes)

    def fmt(v: float) -> str:
        if scientific or not math.isfinite(v):
            return f"{v:+.{SCORE_DIGITS - 1}e}"
        if v == 0:
            return f"{0:+.{SCORE_DIGITS - 1}f}"
        rounded = float(f"{v:.{SCORE_DIGITS - 1}e}")  # 9.9996 -> 10.00, not 9.9996's 10.000
        return f"{v:+.{max(0, SCORE_DIGITS - 1 - math.floor(math.log10(abs(rounded))))}f}"

    return fmt


def _clipped(text: str, max_chars: int) -> str:
    if max_chars and len(text) > max_chars:
        return f'{_t(text[:max_chars])}<span class="clip"> … ({len(text) - max_chars:,} more characters)</span>'
    return _t(text)


def _text_html(text: Text | None, max_chars: int, missing: str) -> str:
    if text is None:
        return f'<span class="mute">{_e(missing)}</span>'
    if len(text.parts) == 1:
        return _clipped(text.parts[0][1], max_chars)
    return "".join(f'<span class="{_e(label)}" title="{_e(label)}">{_clipped(value, max_chars)}</span>'
                   + ("\n" if i + 1 < len(text.parts) else "") for i, (label, value) in enumerate(text.parts))


def _entries_html(kind: str, entries: Sequence[Entry], texts: dict[int, Text], scale: float,
                  fmt: Callable[[float], str], max_chars: int, missing: str) -> str:
    css = "pro" if kind == "proponents" else "con"
    head = ("proponents — training on these lowered the query's loss most (they helped)" if css == "pro"
            else "opponents — training on these raised it most (they hurt)")
    if not entries:
        return f'<h3>{head}</h3><p class="mute">none</p>'
    rows = []
    for rank, e in enumerate(entries, 1):
        width = 100.0 * abs(e.score) / scale if scale > 0 else 0.0
        rows.append(f'<tr class="entry {css}"><td class="mute">{rank}</td>'
                    f'<td class="score"><span class="track"><span class="bar" style="width:{width:.1f}%"></span></span>'
                    f'{fmt(e.score)}{_index_score_html(e, fmt)}</td>'
                    f'<td>{_bdi(e.id)} <span class="mute small">row {e.row:,}</span>'
                    f'<div class="text">{_text_html(texts.get(e.row), max_chars, missing)}</div></td></tr>')
    return f'<h3>{head}</h3><table>{"".join(rows)}</table>'


def _index_score_html(e: Entry, fmt: Callable[[float], str]) -> str:
    """A reranked entry's index score under its full-dimension one (the list is in reranked order)."""
    if e.index_score is None:
        return ""
    return f'<div class="mute small" title="the index\'s compressed score; the rerank\'s is above">index {fmt(e.index_score)}</div>'


def _query_html(i: int, a: Attribution, report: Report, train_missing: str, query_missing: str) -> str:
    scores = [e.score for _, e in a.entries()]
    scale = max(map(abs, scores), default=0.0)
    fmt = _score_format(scores)
    body = "".join(_entries_html(kind, entries, report.texts, scale, fmt, report.max_chars, train_missing)
                   for kind, entries in (("proponents", a.proponents), ("opponents", a.opponents)))
    return (f'<section class="query" id="query-{i}"><h2>query {_bdi(a.id)}</h2>'
            f'<div class="qtext">{_text_html(report.query_texts.get(i), report.max_chars, query_missing)}</div>'
            f'{body}</section>')


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def _summary_html(info: dict) -> str:
    p = info["projection"]
    bpe = info.get("bytes_per_example")
    rows = [
        ("index", f'<code>{_e(info["index"])}</code>'),
        ("rows", f'{info["rows"]:,} (segments {len(info.get("segments") or [])}, non-finite rows {info["nonfinite_rows"]})'),
        ("format", f'version {_e(info["format_version"])}'),
        ("factors", f'f={_e(p["f"])}, min-side={_e(p["min_side"])}, c={_e(info["c"])}, {_e(info["dtype"])}, '
                    f'block {_e(info["block_size"])} rows'),
        ("projection", _e(f'whitened ({p["matrices"]}): K-FAC moments of {p["whiten_examples"]} examples, '
                          f'ρ={p["whiten_damping"]}, {p["whitened_layers"]}/{len(info["layers"])} layers'
                          if p["kind"] == "whitened" else f'random ({p["matrices"]}): the LoRIF paper\'s projections')),
        ("size", _e(f'{info["disk_bytes"] / 1e6:,.1f} MB on disk, factors {info["factor_bytes"] / 1e6:,.1f} MB'
                    + (f' ({bpe:,.0f} B/example, {bpe / info["raw_bytes_per_example"]:.2f}× raw {info["dtype"]})' if bpe else ""))),
        ("preconditioner", _e(f'{info["preconditioner"]}, covering {info["curvature"].get("rows")} rows')),
    ]
    return '<table class="kv">' + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _side(w: dict | None, side: str) -> str:
    if not w or side not in w:
        return "–"
    s = w[side]
    if not s.get("whitened", True):
        return f'not whitened ({s["dim"]:,} wide)'
    return f'{s["eig_max"]:.2g} / {s["eig_mean"]:.2g}, {s["effective_rank"]:.1f} of {s["dim"]:,}'


def _layers_html(info: dict, spectra: Sequence[LayerSpectrum]) -> str:
    k90 = {s.name: s.k90 for s in spectra}
    head = ("<tr><th>layer</th><th>d_out × d_in</th><th>r</th><th>λ</th><th>captured energy</th>"
            "<th>curvature: directions for 90% energy</th><th>whitening in: eig max / mean, effective rank</th>"
            "<th>whitening out</th></tr>")
    rows = []
    for l in info["layers"]:
        d90 = k90.get(l["name"])
        directions = "–" if d90 is None else f'{d90:,} of {l["D"]:,}'
        rows.append(f'<tr><td class="id">{_e(l["name"])}</td><td>{l["d_out"]:,} × {l["d_in"]:,}</td>'
                    f'<td>{_e(l["rank"] if l["rank"] is not None else "–")}</td><td>{_fmt(l["damping"])}</td>'
                    f'<td>{_fmt(l["captured_energy"], ".3f")}</td>'
                    f'<td>{directions}</td>'
                    f'<td>{_e(_side(l["whitening"], "in"))}</td><td>{_e(_side(l["whitening"], "out"))}</td></tr>')
    return f'<table class="layers">{head}{"".join(rows)}</table>'


def _color(i: int, n: int) -> str:
    return f"hsl({int(360 * i / max(n, 1))},65%,42%)"


def energy_svg(spectra: Sequence[LayerSpectrum], width: int = 720, height: int = 300) -> str:
    """Captured-energy curves, one per layer: fraction of the curvature's trace (y) held by its
    top-k eigendirections (x, log scale). Hover a curve for its layer."""
    if not spectra:
        return ""
    left, right, top, bottom = 48, 16, 12, 40
    w, h = width - left - right, height - top - bottom
    kmax = max(s.curve[-1][0] for s in spectra)
    span = max(math.log10(kmax), 1e-9)

    def x(k: int) -> float:
        return left + w * math.log10(k) / span

    def y(f: float) -> float:
        return top + h * (1 - f)

    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="captured energy per layer">',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>']
    for f in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y(f):.1f}" y2="{y(f):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y(f) + 4:.1f}" text-anchor="end">{f:g}</text>')
    decade = 1
    while decade <= kmax:
        parts.append(f'<line x1="{x(decade):.1f}" x2="{x(decade):.1f}" y1="{top}" y2="{top + h}" stroke="#eee"/>'
                     f'<text x="{x(decade):.1f}" y="{top + h + 14}" text-anchor="middle">{decade:,}</text>')
        decade *= 10
    for i, s in enumerate(spectra):
        points = " ".join(f"{x(k):.1f},{y(f):.1f}" for k, f in s.curve)
        parts.append(f'<polyline points="{points}" fill="none" stroke="{_color(i, len(spectra))}" stroke-width="1.5" '
                     f'opacity="0.8"><title>{_e(s.name)} ({s.kind}, {s.dim:,} dims)</title></polyline>')
    parts.append(f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle">top-k eigendirections '
                 f'(log scale)</text><text x="12" y="{top + h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + h / 2})">fraction of trace</text></svg>')
    return "".join(parts)


def legend_html(spectra: Sequence[LayerSpectrum]) -> str:
    """The curves' colours by layer (the same order and colours as energy_svg)."""
    return '<p class="legend small">' + " ".join(
        f'<span><i style="background:{_color(i, len(spectra))}"></i>{_e(s.name)}</span>'
        for i, s in enumerate(spectra)) + "</p>"


def _abbreviated(name: str, chars: int) -> str:
    """``name`` in at most ``chars`` characters, its middle elided: a layer's path begins with its
    block and ends with its module, the two parts that tell layers apart."""
    if len(name) <= chars:
        return name
    head = (chars - 1) // 3
    return name[:head] + "…" + name[len(name) - (chars - 1 - head):]


# Whitening chart geometry (px, in the SVG's own units): one row per layer, its name at the left
# (abbreviated to fit, whole in the tooltip), its two bars stacked on separate baselines, each
# bar's value just right of it. Text heights stay below the spacing they sit on, so labels do not
# collide at any number of layers; CHAR is a generous average glyph width of the 11 px font.
_W_LABEL, _W_RIGHT, _W_TOP, _W_BAR, _W_GAP, _W_CHAR = 260, 56, 34, 13, 9, 7.0


def whitening_svg(layers: Sequence[dict], width: int = 720) -> str:
    """Per layer, the effective rank of its input and output token moments as a fraction of their
    width: a short bar is a moment concentrated in few directions, a full one a flat spectrum."""
    shown = [l for l in layers if l.get("whitening")]
    if not shown:
        return ""
    label, top, bar = _W_LABEL, _W_TOP, _W_BAR
    w = width - label - _W_RIGHT
    row = 2 * bar + _W_GAP
    height = top + row * len(shown)
    sides = (("in", "in (A_in)", _color(0, 3)), ("out", "out (A_out)", _color(2, 5)))
    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="whitening effective rank per layer">']
    for j, (_, name, color) in enumerate(sides):
        x0 = label + 110 * j
        parts.append(f'<rect x="{x0}" y="3" width="10" height="9" fill="{color}"/>'
                     f'<text x="{x0 + 14}" y="12">{name}</text>')
    parts.append(f'<text x="{label + 220}" y="12">effective rank ÷ width</text>')
    for tick in (0, 0.25, 0.5, 0.75, 1):
        x = label + w * tick
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 6}" y2="{height}" stroke="#eee"/>'
                     f'<text x="{x:.1f}" y="{top - 9}" text-anchor="middle" font-size="10">{tick:g}</text>')
    chars = int((label - 10) / _W_CHAR)
    for i, l in enumerate(shown):
        y0 = top + i * row
        parts.append(f'<text x="{label - 8}" y="{y0 + bar + 4}" text-anchor="end"><title>{_e(l["name"])}</title>'
                     f'{_e(_abbreviated(l["name"], chars))}</text>')
        for j, (side, _, color) in enumerate(sides):
            s = l["whitening"].get(side) or {}
            yy = y0 + j * bar
            if not s.get("whitened", True) or not s.get("dim"):
                wide = f' ({s["dim"]:,} wide)' if s.get("dim") else ""
                parts.append(f'<text x="{label + 4}" y="{yy + bar - 3}" font-size="10">{side}: not whitened{wide}</text>')
                continue
            frac = min(max(s["effective_rank"] / s["dim"], 0.0), 1.0)
            parts.append(f'<rect x="{label}" y="{yy + 1}" width="{max(w * frac, 0.5):.1f}" height="{bar - 2}" '
                         f'fill="{color}"><title>{_e(l["name"])} {side}: effective rank {s["effective_rank"]:.1f} '
                         f'of {s["dim"]:,}</title></rect><text x="{label + w * frac + 4:.1f}" y="{yy + bar - 3}" '
                         f'font-size="10">{s["effective_rank"]:.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: Report) -> str:
    """The page: a complete HTML document with its style, script and plots inline."""
    script_hash = base64.b64encode(hashlib.sha256(_JS.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; script-src 'sha256-{script_hash}'; style-src 'unsafe-inline'; "
           "base-uri 'none'; form-action 'none'")
    info = report.index
    n_entries = sum(len(a.proponents) + len(a.opponents) for a in report.results)
    train_missing = "(text not available: pass the training data with --data)" if not report.texts else "(text not found)"
    query_missing = "(text not available: pass --queries)" if not report.query_texts else "(text not found)"
    queries = "".join(_query_html(i, a, report, train_missing, query_missing) for i, a in enumerate(report.results))
    notes = ("<div class=\"notes\">" + "".join(f"<p>{_t(n)}</p>" for n in report.notes) + "</div>") if report.notes else ""
    energy = energy_svg(report.spectra)
    whitening = whitening_svg(info["layers"])
    plots = ""
    if energy:
        plots += (f'<h3>curvature spectrum ({_e(report.spectra[0].kind)}): captured energy per layer</h3>'
                  '<p class="small mute">fraction of each layer\'s curvature trace held by its top-k eigendirections'
                  ' in the projected space; a curve that rises early is a layer whose gradients live in few '
                  'directions. Hover a curve for its layer.</p>' + energy + legend_html(report.spectra))
    if whitening:
        plots += ('<h3>whitening spectrum: effective rank of the token moments</h3><p class="small mute">'
                  'participation ratio (Σλ)²/Σλ² of each side\'s K-FAC moment, as a fraction of the side\'s width'
                  '</p>' + whitening)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_plain(report.title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_t(report.title)}</h1>"
        f'<p class="mute">{len(report.results):,} queries, {n_entries:,} proponents and opponents from '
        f'<code>{_t(report.results_path)}</code>, scored against {info["rows"]:,} training examples in '
        f'<code>{_e(info["index"])}</code>. Scores add up over layers and compare within a query.</p>'
        f"{notes}"
        '<div id="search"><input id="filter" type="search" placeholder="filter: query id, training id or any text" '
        'aria-label="filter queries" autocomplete="off"> <span id="shown" class="mute small">'
        f"{len(report.results):,} queries</span></div>"
        f"<main>{queries}</main>"
        f'<h2 id="index">index</h2>{_summary_html(info)}{plots}<h3>layers</h3>{_layers_html(info, report.spectra)}'
        f'<p class="small mute">made by lorif-stream report; this page loads nothing from anywhere.</p>'
        f"<script>{_JS}</script></body></html>\n"
    )


def write_report(path: str | os.PathLike, page: str) -> Path:
    """Write the page atomically (a reader never sees half a page)."""
    from .atomic import write_text

    path = Path(path)
    if path.is_dir():
        raise ReportError(f"--out {path} is a folder: give a file name such as {path / 'report.html'}")
    return write_text(path, page)


# ------------------------------------------------------------------------------------ entry point


def _check_options(index, given: dict) -> None:
    """The HF options given to `report` (copied from the query) must be the build's: texts read with
    other fields, or results a query made with other options, would be shown as if they were right."""
    from .store import open_index
    from .task_check import hf_option_mismatch

    if not given:
        return
    with open_index(index) as reader:
        mismatch = hf_option_mismatch(reader.settings, given)
    if mismatch:
        raise ReportError(f"the report's options differ from index {index}'s build: {mismatch}; give the build's")


def make_report(results: str | os.PathLike, index: str | os.PathLike, out: str | os.PathLike = "report.html", *,
                data: Sequence[str | os.PathLike] = (), queries: str | os.PathLike | None = None,
                task: Any = None, text_field: str = "text", id_field: str | None = None,
                prompt_field: str | None = None, completion_field: str | None = None,
                title: str | None = None, max_chars: int = DEFAULT_MAX_CHARS,
                options: dict | None = None) -> tuple[Path, Report]:
    """``lorif-stream report``: texts come from ``data`` (the training files in index order) and
    ``queries`` with the HF task's field names, or from ``task`` (a Task or ``file.py:NAME``).
    ``options``: the HF task options the command was given (``max_length``, ``chat_template``,
    ``skip_empty``; None = not given), refused when they differ from the index's build."""
    if task is not None and (data or queries):
        raise ReportError("give either a task or data/queries files for the texts, not both")
    # the fields only choose what is displayed (texts are matched by id), so they are not compared
    _check_options(index, options or {})
    train_texts: ExampleTexts | None = None
    query_texts: ExampleTexts | None = None
    if task is not None:
        from .task import load_task, resolve_task

        task = load_task(task) if isinstance(task, str) else resolve_task(task)
        train_texts, query_texts = TaskTexts(task, "train"), TaskTexts(task, "query")
    fields = dict(text_field=text_field, id_field=id_field, prompt_field=prompt_field, completion_field=completion_field)
    if data:
        train_texts = RecordTexts(list(data), **fields)
    if queries is not None:
        query_texts = RecordTexts([queries], **fields)
    report = gather_report(results, index, train_texts, query_texts, title, max_chars)
    return write_report(out, render_html(report)), report
