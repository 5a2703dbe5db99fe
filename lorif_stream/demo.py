"""`lorif-stream demo`: the whole attribution workflow on a small real corpus, offline, on a CPU.

    lorif-stream demo                 # about 1.5 minutes on a 2-core CPU (a few on a busy one)
    lorif-stream demo --quick         # a reduced run (CI, first look): seconds of work

What it does, in ``--out DIR`` (default ``./lorif-demo``):

1. takes the bundled corpus ``lorif_stream/data/fortunes.jsonl.gz`` -- 6,185 short quotations
   and jokes from the BSD ``fortune`` databases (Debian packages ``fortunes-min`` and
   ``fortunes``, fortune-mod 1.99.1, BSD license: see ``lorif_stream/data/README.md``;
   regenerate it with ``tools/make_demo_corpus.py``) -- and writes ``train_a.jsonl`` (most
   of the training fortunes), ``train_b.jsonl`` (the rest, added later) and ``queries.jsonl``;
2. trains a byte-level BPE tokenizer and a tiny GPT-2 on ``train_a`` + ``train_b`` and saves
   both into ``DIR/model`` (``save_pretrained``);
3. runs build over ``train_a``, append of ``train_b`` and query of the queries through the
   Python API, printing for each the ``lorif-stream`` command that does the same;
4. prints, for every query, the training fortunes that helped it most (proponents) and hurt
   it most (opponents), and where the index and ``results.jsonl`` are;
5. writes ``report.html`` (what ``lorif-stream report`` writes): the same results with their texts,
   a search box and the index's spectra, one self-contained page to open in a browser.

Two queries are reworded copies of one training fortune each (one in the first build, one in
the appended part): their top proponent is that training twin. Two are held-out fortunes by
authors the corpus quotes often, one is a line written for the demo.
"""
from __future__ import annotations

import gzip
import json
import random
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

CORPUS_FILE = Path(__file__).resolve().parent / "data" / "fortunes.jsonl.gz"
CORPUS_SOURCE = "BSD fortune(6) databases, Debian fortunes-min + fortunes 1.99.1 (BSD license)"
MARKER = ".lorif-demo"          # written first: this folder is the demo's to clean
FINISHED = "demo.json"          # written last: a finished demo (its summary)
ARTIFACTS = ("model", "index", "train_a.jsonl", "train_b.jsonl", "queries.jsonl", "results.jsonl", "report.html",
             FINISHED)
EOT = "<|endoftext|>"


@dataclass(frozen=True)
class DemoSize:
    examples: int       # training fortunes (train_a + train_b)
    appended: float     # fraction of them in train_b
    vocab: int          # BPE vocabulary
    context: int        # tokens per example (model context and --max-length)
    n_embd: int
    n_layer: int
    n_head: int
    steps: int          # optimizer steps
    batch: int          # sequences per step
    lr: float


FULL = DemoSize(examples=3000, appended=0.15, vocab=1024, context=64, n_embd=128, n_layer=2, n_head=4,
                steps=400, batch=32, lr=4e-3)
QUICK = DemoSize(examples=240, appended=0.2, vocab=512, context=48, n_embd=64, n_layer=2, n_head=4,
                 steps=30, batch=16, lr=4e-3)

# Queries. "twin": the training fortune a near-duplicate was reworded from (forced into that
# split); "held_out": corpus fortunes kept out of training (and out of the index).
QUERIES = (
    {"id": "q1-reworded", "twin": "literature-0018", "split": "a",
     "text": "Always do right. That will gratify some people, and astonish all the rest. -- Mark Twain",
     "kind": "a reworded copy of training fortune literature-0018 (indexed by build)"},
    {"id": "q2-reworded-appended", "twin": "computers-0500", "split": "b",
     "text": "My sister opened a computer shop in Hawaii. She sells C shells by the seashore.",
     "kind": "a reworded copy of training fortune computers-0500 (indexed by append)"},
    {"id": "q3-held-out-twain", "held_out": "literature-0096",
     "kind": "a Mark Twain fortune held out of training"},
    {"id": "q4-held-out-wright", "held_out": "humorists-0051",
     "kind": "a Steven Wright fortune held out of training"},
    {"id": "q5-new-text",
     "text": "My computer and I have an understanding: it crashes, and I pretend to be surprised.",
     "kind": "a line written for the demo (in no file)"},
)


class DemoError(click.ClickException):
    """The output folder cannot be used (holds a finished demo, or is someone else's)."""


def load_corpus(path: Path = CORPUS_FILE) -> list[dict]:
    """The bundled fortunes: ``[{"id", "text", "source"}, ...]`` in file order."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def split_corpus(rows: list[dict], size: DemoSize, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(train_a, train_b, queries): a seeded sample of the corpus, with the queries' twins placed
    in their split and the held-out fortunes kept out."""
    by_id = {r["id"]: r for r in rows}
    twins = {q["twin"]: q["split"] for q in QUERIES if "twin" in q}
    held = {q["held_out"] for q in QUERIES if "held_out" in q}
    missing = sorted((set(twins) | held) - set(by_id))
    if missing:
        raise ValueError(f"the demo corpus {CORPUS_FILE.name} lacks {', '.join(missing)}: regenerate it with "
                         "tools/make_demo_corpus.py")
    pool = [r for r in rows if r["id"] not in twins and r["id"] not in held]
    random.Random(seed).shuffle(pool)
    n = max(min(size.examples, len(pool) + len(twins)), 8)
    n_b = max(1, round(n * size.appended))
    n_a = n - n_b
    a = pool[: n_a - sum(s == "a" for s in twins.values())]
    b = pool[len(a): len(a) + n_b - sum(s == "b" for s in twins.values())]
    rng = random.Random(seed + 1)
    for twin, split in sorted(twins.items()):
        target = a if split == "a" else b
        target.insert(rng.randrange(len(target) + 1), by_id[twin])
    queries = []
    for q in QUERIES:
        text = by_id[q["held_out"]]["text"] if "held_out" in q else q["text"]
        queries.append({"id": q["id"], "text": text, "kind": q["kind"], "twin": q.get("twin")})
    return a, b, queries


def _write_jsonl(path: Path, rows: list[dict], fields=("id", "text", "source")) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for r in rows:
            handle.write(json.dumps({k: r[k] for k in fields if r.get(k) is not None}, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------ model


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE tokenizer trained offline on `texts`, as a PreTrainedTokenizerFast whose
    single special token (id 0) is bos, eos, unk and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT)


def train_model(tokenizer, texts: list[str], size: DemoSize, device, seed: int = 0, progress: bool = True):
    """A tiny GPT-2 (eager attention) trained on `texts` with the loss the HF task attributes
    (next-token cross-entropy over each text's own tokens, no special tokens added).
    Returns (model in eval mode on the CPU, last batch's loss)."""
    import math

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from .progress import Progress

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=size.context, n_embd=size.n_embd,
                        n_layer=size.n_layer, n_head=size.n_head, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        attn_implementation="eager")
    model = GPT2LMHeadModel(config).to(device)
    encoded = tokenizer(texts, truncation=True, max_length=size.context)["input_ids"]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.lr, weight_decay=0.01)
    warmup = max(1, size.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / size.steps))))
    rng = random.Random(seed)
    batches: list[list[int]] = []
    loss = torch.tensor(float("nan"))
    model.train()
    with Progress("train", total=size.steps, unit="step", enabled=progress) as bar:
        for _ in range(size.steps):
            if not batches:  # an epoch of batches of similar lengths (little padding), in random order
                fresh = list(range(len(encoded)))
                rng.shuffle(fresh)
                fresh.sort(key=lambda i: len(encoded[i]))
                batches = [fresh[i: i + size.batch] for i in range(0, len(fresh), size.batch)]
                rng.shuffle(batches)
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in batches.pop()]}, return_tensors="pt")
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.desc = f"train (loss {loss.item():.2f})"
            bar.update(1)
    return model.eval().cpu(), loss.item()


# ------------------------------------------------------------------------------------ folder


def _check_folder(out: Path, force: bool) -> None:
    """Refuse a folder that is not ours, or that holds a finished demo (unless forced)."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file, not a folder")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not (out / MARKER).exists():
        raise DemoError(f"{out} is not empty and was not made by `lorif-stream demo`: give a new or empty --out")
    if (out / FINISHED).exists() and not force:
        raise DemoError(f"{out} already holds a finished demo (results in {out / 'results.jsonl'}): "
                        "add --force to redo it, or give another --out")


def _reset_folder(out: Path, echo) -> None:
    """Remove the previous demo's own files (never anything else), create the folder and its marker."""
    if out.is_dir() and (out / MARKER).exists():
        echo(f"removing the previous {'finished' if (out / FINISHED).exists() else 'unfinished'} demo in {out}")
        for name in ARTIFACTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `lorif-stream demo`: its files may be replaced by `lorif-stream demo --force`\n")


def _say_command(args: list[str], echo) -> None:
    """The `lorif-stream` command line that does what the demo does next through the Python API."""
    echo("$ lorif-stream " + " ".join(shlex.quote(a) for a in args))


class _Quiet:
    """While the demo runs: transformers' info/warnings and weight-loading bars silenced, and
    torch limited to `threads` intra-op threads (None: left alone)."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def __enter__(self):
        import torch

        self.torch_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            self.hf = None
            return self
        self.hf = hf_logging
        self.verbosity, self.bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.torch_threads)
        if self.hf is not None:
            self.hf.set_verbosity(self.verbosity)
            if self.bars:
                self.hf.enable_progress_bar()


# ------------------------------------------------------------------------------------ report


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def format_results(results: list[dict], queries: list[dict], texts: dict[str, str], rows_a: int, width: int = 100) -> str:
    """The human-readable report: each query, then its proponents and opponents with their text."""
    kinds = {q["id"]: q for q in queries}
    lines = []
    for r in results:
        q = kinds.get(r["id"], {"text": "?", "kind": ""})
        lines.append("")
        lines.append(click.style(f"query {r['id']}", bold=True) + (f"  ({q['kind']})" if q.get("kind") else ""))
        lines.append(f"  \"{_clip(q['text'], width - 4)}\"")
        for title, entries in (("proponents (training on these lowered the query's loss most)", r["proponents"]),
                               ("opponents (training on these raised it most)", r["opponents"])):
            lines.append(f"  {title}:")
            for rank, e in enumerate(entries, 1):
                part = "train_a" if e["row"] < rows_a else "train_b"
                twin = "  <- its twin" if e["id"] == q.get("twin") else ""
                score = click.style(f"{e['score']:+9.3f}", fg="green" if e["score"] > 0 else "red")
                head = f"    {rank}. {score}  {e['id']:<18s} [{part}]{twin}"
                lines.append(head)
                lines.append(f"         \"{_clip(texts.get(e['id'], '?'), width - 11)}\"")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ demo


def run_demo(out_dir: str = "lorif-demo", quick: bool = False, device: str = "auto", force: bool = False,
             top_k: int = 3, examples: int | None = None, threads: int | None = 1, seed: int = 0,
             progress: bool = True, echo=click.echo) -> dict:
    """Run the demo into `out_dir` and return its summary (also written to ``out_dir/demo.json``).

    quick: the reduced size (CI); device: torch device for training and for the engine
    (auto = cuda when available); force: redo a finished demo in `out_dir`; top_k: proponents and
    opponents shown per query; examples: training fortunes to use (default 3,000; quick 240);
    threads: torch CPU threads while the demo runs on the CPU (None: torch's default). One is the
    default because the demo's model is tiny: more threads barely help it, and on a busy machine
    (a CI runner, a shared box) threads that wait for each other make every step many times slower.
    """
    started = time.perf_counter()
    size = QUICK if quick else FULL
    if examples is not None:
        if examples < 8:
            raise click.BadParameter(f"--examples {examples}: need at least 8")
        size = DemoSize(**{**size.__dict__, "examples": examples})
    out = Path(out_dir)
    _check_folder(out, force)
    # the engine is imported here, not at the top: `lorif-stream --help` loads this module too
    from .build import append, build
    from .config import BuildConfig, QueryConfig
    from .device import resolve_device
    from .hf_task import HFCausalLMTask
    from .query import query
    from .report import make_report

    torch_device = resolve_device(device)  # a missing CUDA fails here, before any file is touched
    _reset_folder(out, echo)
    stages = 6
    timings: dict[str, float] = {}

    def stage(i: int, text: str) -> float:
        echo(click.style(f"[demo {i}/{stages}] {text}", fg="cyan"))
        return time.perf_counter()

    t = stage(1, f"corpus: {CORPUS_FILE.name} ({CORPUS_SOURCE})")
    rows = load_corpus()
    train_a, train_b, queries = split_corpus(rows, size, seed)
    if top_k > len(train_a) + len(train_b):
        raise click.BadParameter(f"--top-k {top_k} is larger than the {len(train_a) + len(train_b)} training examples")
    files = {name: out / f"{name}.jsonl" for name in ("train_a", "train_b", "queries")}
    _write_jsonl(files["train_a"], train_a)
    _write_jsonl(files["train_b"], train_b)
    _write_jsonl(files["queries"], queries, fields=("id", "text", "kind"))
    echo(f"  {len(rows):,} fortunes bundled; using {len(train_a):,} in train_a.jsonl (build), "
         f"{len(train_b):,} in train_b.jsonl (append), {len(queries)} queries in queries.jsonl")
    timings["corpus"] = time.perf_counter() - t

    cpu_threads = threads if torch_device.type == "cpu" else None
    with _Quiet(cpu_threads):
        where = f"{torch_device}" + (f" ({cpu_threads} thread{'s' if cpu_threads > 1 else ''})" if cpu_threads else "")
        t = stage(2, f"tokenizer + model: byte-level BPE ({size.vocab} tokens) and a {size.n_layer}-layer, "
                     f"{size.n_embd}-wide GPT-2, {size.steps} steps of {size.batch} on {where}")
        train_texts = [r["text"] for r in train_a + train_b]
        tokenizer = train_tokenizer(train_texts, size.vocab)
        model, final_loss = train_model(tokenizer, train_texts, size, torch_device, seed, progress)
        model_dir = out / "model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        n_params = sum(p.numel() for p in model.parameters())
        del model
        echo(f"  {n_params:,} parameters, final training loss {final_loss:.2f} nats/token -> {model_dir}")
        timings["train"] = time.perf_counter() - t

        index = out / "index"
        common = ["--hf-model", str(model_dir), "--id-field", "id", "--max-length", str(size.context),
                  "--index", str(index), "--device", device]
        quiet = [] if progress else ["--quiet"]

        def task(**data):
            return HFCausalLMTask(model_dir, id_field="id", max_length=size.context, **data)

        t = stage(3, f"build: index train_a ({len(train_a):,} fortunes)")
        _say_command(["build", *common, "--data", str(files["train_a"]), "--batch-size", "16", *quiet], echo)
        built = build(task(train_data=files["train_a"]), index, BuildConfig(batch_size=16, device=device),
                      progress=progress)
        echo(f"indexed {built.new_rows:,} new rows ({built.rows:,} in all) into {built.index} in {built.seconds:.1f}s")
        timings["build"] = time.perf_counter() - t
        t = stage(4, f"append: add train_b ({len(train_b):,} fortunes) as new rows")
        _say_command(["append", *common, "--data", str(files["train_b"]), "--batch-size", "16", *quiet], echo)
        appended = append(task(train_data=files["train_b"]), index, batch_size=16, device=device, progress=progress)
        echo(f"appended {appended.new_rows:,} rows ({appended.rows:,} in all) to {appended.index} "
             f"in {appended.seconds:.1f}s")
        timings["append"] = time.perf_counter() - t
        t = stage(5, f"query: score the {len(queries)} queries against all {len(train_a) + len(train_b):,} rows")
        results_file = out / "results.jsonl"
        _say_command(["query", *common, "--queries", str(files["queries"]),
                      "--top-k", str(top_k), "--out", str(results_file), *quiet], echo)
        scored = query(task(train_data=None, query_data=files["queries"]), index, results_file,
                       config=QueryConfig(top_k=top_k, device=device), progress=progress)
        echo(f"scored {len(scored.results)} queries against {scored.rows:,} rows in {scored.seconds:.1f}s "
             f"-> {results_file}")
        timings["query"] = time.perf_counter() - t

    t = stage(6, "results, and report.html to open in a browser")
    with results_file.open(encoding="utf-8") as handle:
        results = [json.loads(line) for line in handle if line.strip()]
    texts = {r["id"]: r["text"] for r in train_a + train_b}
    echo(format_results(results, queries, texts, len(train_a), width=min(shutil.get_terminal_size((100, 20)).columns, 120)))
    echo("")
    report_file = out / "report.html"
    _say_command(["report", "--results", str(results_file), "--index", str(index), "--data", str(files["train_a"]),
                  "--data", str(files["train_b"]), "--queries", str(files["queries"]), "--id-field", "id",
                  "--out", str(report_file)], echo)
    path, made = make_report(results_file, index, report_file, data=[files["train_a"], files["train_b"]],
                             queries=files["queries"], id_field="id",
                             options={"max_length": None, "chat_template": False, "skip_empty": False})
    for note in made.notes:
        click.echo(f"note: {note}", err=True)
    echo(f"report of {len(made.results)} queries ({len(made.texts):,} training texts shown) -> {path} "
         f"({path.stat().st_size / 1e3:,.0f} kB): open it in a browser")
    timings["report"] = time.perf_counter() - t
    seconds = time.perf_counter() - started
    summary = {
        "finished": True, "quick": quick, "seconds": round(seconds, 1), "timings": {k: round(v, 1) for k, v in timings.items()},
        "corpus": {"file": CORPUS_FILE.name, "source": CORPUS_SOURCE, "fortunes": len(rows)},
        "rows": {"train_a": len(train_a), "train_b": len(train_b)}, "queries": len(queries), "top_k": top_k,
        "model": str(model_dir), "index": str(index), "results": str(results_file), "report": str(report_file),
    }
    (out / FINISHED).write_text(json.dumps(summary, indent=2) + "\n")
    echo("")
    echo(f"done in {seconds:.0f}s.")
    echo(f"  index    {index}  ({len(train_a) + len(train_b):,} rows: {len(train_a):,} built + {len(train_b):,} appended)")
    echo(f"  results  {results_file}  (one JSON line per query: id, proponents, opponents as id/row/score)")
    echo(f"  report   {report_file}  (open it in a browser: every query with its proponents' and opponents' "
         "texts, a search box, the index's spectra; works offline)")
    echo(f"  model    {model_dir}  (model + tokenizer, save_pretrained)")
    echo("next: inspect the index, or ask your own questions:")
    echo(f"  lorif-stream info --index {shlex.quote(str(index))}")
    echo(f"  lorif-stream query --hf-model {shlex.quote(str(model_dir))} "
         f"--queries my_queries.jsonl --id-field id --max-length {size.context} --index {shlex.quote(str(index))} "
         f"--top-k 5 --out my_results.jsonl")
    return summary


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="lorif-demo", show_default=True,
              help="folder for the corpus files, the model, the index, results.jsonl and report.html (new, empty, or a "
                   "previous demo's)")
@click.option("--quick", is_flag=True, help="reduced size (240 fortunes, a smaller model, 30 training steps): under a minute")
@click.option("--device", default="auto", show_default=True,
              help="torch device for training and for build/append/query (auto = cuda when available, else cpu)")
@click.option("--force", is_flag=True, help="redo the demo even if --out already holds a finished one")
@click.option("--top-k", type=click.IntRange(1), default=3, show_default=True, help="proponents and opponents shown per query")
@click.option("--examples", type=click.IntRange(8), default=None,
              help="training fortunes to index (default 3,000; --quick 240; the corpus has about 6,000)")
@click.option("--threads", type=click.IntRange(0), default=1, show_default=True,
              help="torch CPU threads (0 = torch's default); the demo's model is tiny, and one thread is also the "
                   "fastest on a busy machine")
@click.option("--quiet", is_flag=True, help="no progress bars (stage lines and results are still printed)")
def demo_command(out_dir, quick, device, force, top_k, examples, threads, quiet):
    """Run the whole workflow on a small real corpus, offline: the first thing to try.

    Trains a tiny GPT-2 (and its tokenizer) on fortunes from the BSD fortune databases bundled
    with lorif-stream, then runs `build` on most of them, `append` on the rest and `query` for a
    few queries, and prints each query's top proponents and opponents with their text; `report`
    then writes them to report.html, a page to open in a browser. Two queries are reworded
    copies of training fortunes, so you can check the top proponent is the original. About 1.5
    minutes on a 2-core CPU (--quick: under one).
    """
    run_demo(out_dir, quick=quick, device=device, force=force, top_k=top_k, examples=examples,
             threads=threads or None, progress=not quiet)
