"""The `lorif-stream` command line: build, append, fit, query, info, verify, demo.

Options of build/fit/query are generated from the config dataclasses (lorif_stream.config), so
the CLI and the Python API cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import typing

import click

from . import config as cfg

_TASK_HELP = "the task: path/to/file.py:NAME or package.module:NAME (a Task class, factory or instance)"


def _click_type(f: dataclasses.Field):
    choices = f.metadata.get("choices")
    if choices:
        return click.Choice(choices)
    if f.name == "memory_budget":
        return str
    hint = str(f.type)
    if "bool" in hint:
        return bool
    if "int" in hint:
        return int
    if "float" in hint:
        return float
    return str


def config_options(cls, exclude: tuple[str, ...] = ()):
    """click options for every field of a config dataclass: --field-name, default, help."""

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in exclude or not f.metadata.get("help") or dataclasses.is_dataclass(f.default_factory
                                                                                              if f.default_factory is not dataclasses.MISSING else None):
                continue
            name = "--" + f.name.replace("_", "-")
            default = None if f.default is dataclasses.MISSING else f.default
            typ = _click_type(f)
            if typ is bool:
                fn = click.option(name, is_flag=True, default=bool(default), help=f.metadata["help"])(fn)
            elif f.name == "layers":
                fn = click.option(name, multiple=True, help=f.metadata["help"])(fn)
            else:
                fn = click.option(name, type=typ, default=default, show_default=default is not None,
                                  help=f.metadata["help"])(fn)
        return fn

    return decorate


def _split(cls, kwargs: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def _budget(kwargs: dict) -> None:
    if kwargs.get("memory_budget") is not None:
        kwargs["memory_budget"] = cfg.parse_size(kwargs["memory_budget"])


def task_options(fn):
    fn = click.option("--hf-dtype", "model_dtype", type=click.Choice(cfg.HF_MODEL_DTYPES), default="fp32",
                      show_default=True,
                      help="HF task: dtype of the loaded weights (auto = the checkpoint's); bf16/fp16 halve the model's "
                           "memory, projections stay fp32; build and query must use the same")(fn)
    fn = click.option("--skip-empty", is_flag=True,
                      help="HF task, prompt/completion: skip (not refuse) examples with no completion token left "
                           "after truncation; the count and first ids go to stderr")(fn)
    fn = click.option("--chat-template", is_flag=True,
                      help="HF task, prompt/completion: wrap each example in the tokenizer's chat template "
                           "(user turn = prompt, assistant turn = completion); refused if the tokenizer has none")(fn)
    fn = click.option("--completion-field", default=None,
                      help="HF task: field holding the completion; with --prompt-field the loss is summed over "
                           "completion tokens only")(fn)
    fn = click.option("--prompt-field", default=None,
                      help="HF task: field holding the prompt (its tokens are not scored); needs --completion-field")(fn)
    fn = click.option("--max-length", type=int, default=512, show_default=True,
                      help="HF task: tokens per example (prompt/completion: the prompt keeps its end, the completion "
                           "its start, neither cut below half while it needs it)")(fn)
    fn = click.option("--id-field", default=None,
                      help="HF task: field holding the example id (default: jsonl line number, or parquet/datasets row index)")(fn)
    fn = click.option("--text-field", default="text", show_default=True, help="HF task: field holding the text")(fn)
    fn = click.option("--queries", "query_data", type=click.Path(), default=None,
                      help="HF task: query records: .jsonl, .jsonl.gz, .parquet or a datasets.save_to_disk folder")(fn)
    fn = click.option("--data", "train_data", type=click.Path(), default=None,
                      help="HF task: training records: .jsonl (read lazily by line), .jsonl.gz (read whole: gzip "
                           "cannot seek), .parquet (read lazily by row group) or a datasets.save_to_disk folder "
                           "(needs the data extra)")(fn)
    fn = click.option("--hf-model", type=click.Path(file_okay=False), default=None,
                      help="built-in HF causal-LM task: a save_pretrained folder (model + tokenizer), local only")(fn)
    fn = click.option("--task", "task_spec", default=None, help=_TASK_HELP)(fn)
    return fn


def _make_task(kwargs: dict):
    spec = kwargs.pop("task_spec")
    hf = {k: kwargs.pop(k) for k in ("hf_model", "train_data", "query_data", "text_field", "id_field", "max_length",
                                     "prompt_field", "completion_field", "chat_template", "skip_empty", "model_dtype")}
    if spec and hf["hf_model"]:
        raise click.UsageError("give either --task or --hf-model, not both")
    if spec:
        return spec
    if not hf["hf_model"]:
        raise click.UsageError("no task: give --task path/file.py:NAME, or --hf-model DIR with --data/--queries")
    if (hf["prompt_field"] is None) != (hf["completion_field"] is None):
        raise click.UsageError("give --prompt-field and --completion-field together")
    if (hf["chat_template"] or hf["skip_empty"]) and hf["prompt_field"] is None:
        raise click.UsageError("--chat-template and --skip-empty need --prompt-field and --completion-field")
    from .hf_task import HFCausalLMTask

    return HFCausalLMTask(hf.pop("hf_model"), **hf)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lorif-stream")
def cli():
    """lorif-stream: which training examples made the model produce this?

    LoRIF influence functions as an out-of-core engine: `build` stores every training example's
    projected gradient as compressed rank-c factors in an index on disk, `query` streams that
    index to score training examples for your queries, `append` adds examples later.
    Typical run:

      lorif-stream build --task my_task.py:Task --index runs/idx

      lorif-stream query --task my_task.py:Task --index runs/idx --top-k 10 --out results.jsonl
    """


def build_options(fn):
    """The options of `build` (and of `whiten`, which runs the start of the same build)."""
    fn = click.option("--quiet", is_flag=True, help="no progress bars")(fn)
    fn = click.option("--modules", default=None, metavar="REGEX",
                      help="track the layers whose qualified module name matches REGEX (re.search), instead of "
                           "the task's tracked_modules (default: every Linear / Conv1D, the LM head included: "
                           "measured +0.07 LDS on text for +23% bytes per example; its vocabulary side is "
                           "sketched past --max-dense-side. Blocks only on GPT-2: --modules '^transformer\\.h\\.')")(fn)
    fn = config_options(cfg.CurvatureConfig)(fn)
    fn = config_options(cfg.BuildConfig, exclude=("curvature",))(fn)
    fn = click.option("--index", required=True, type=click.Path(file_okay=False),
                      help="index directory (created, or resumed)")(fn)
    return task_options(fn)


def _with_modules(task, regex: str | None):
    """The task with its tracked layers chosen by --modules (same meaning as Task.tracked_modules)."""
    if regex is None:
        return task
    try:
        re.compile(regex)
    except re.error as e:
        raise click.BadParameter(f"{regex!r} is not a regular expression ({e})", param_hint="--modules") from None
    from .task import load_task, resolve_task

    task = resolve_task(load_task(task) if isinstance(task, str) else task)
    task.tracked_modules = regex
    return task


def _say(message: str) -> None:
    """The closing line of a command: once per job (rank 0 under torchrun)."""
    from .comm import current

    if current().root:
        click.echo(message)


def _build_config(kwargs: dict) -> cfg.BuildConfig:
    curvature = cfg.CurvatureConfig(**_split(cfg.CurvatureConfig, kwargs))
    _budget(kwargs)
    return cfg.BuildConfig(**kwargs, curvature=curvature)


@cli.command()
@build_options
def build(index, quiet, **kwargs):
    """Index every training example (resumes an interrupted build with the same settings; an index with rows
    keeps its curvature options: change them with `fit`)."""
    from .build import build as run

    task = _with_modules(_make_task(kwargs), kwargs.pop("modules"))
    result = run(task, index, _build_config(kwargs), progress=not quiet)
    _say(f"indexed {result.new_rows:,} new rows ({result.rows:,} in all) into {result.index} "
         f"in {result.seconds:.1f}s, {result.bytes_written / 1e6:.1f} MB written")


@cli.command()
@task_options
@click.option("--index", required=True, type=click.Path(file_okay=False), help="existing index directory")
@config_options(cfg.BuildConfig, exclude=("curvature", "block_size", "zstd_level") + cfg.FACTOR_FIELDS)
@click.option("--quiet", is_flag=True, help="no progress bars")
def append(index, quiet, **kwargs):
    """Add the task's training examples as new rows (the index's own projections and settings are used)."""
    from .build import append as run

    task = _make_task(kwargs)
    _budget(kwargs)
    result = run(task, index, progress=not quiet, **kwargs)
    _say(f"appended {result.new_rows:,} rows ({result.rows:,} in all) to {result.index} in {result.seconds:.1f}s")


@cli.command()
@build_options
def whiten(index, quiet, **kwargs):
    """Run only the whitening pre-pass of a build (K-FAC token moments -> whitened projections).

    `build` with the same options then continues from it; `build` alone runs it first anyway."""
    from .build import whiten as run

    task = _with_modules(_make_task(kwargs), kwargs.pop("modules"))
    result = run(task, index, _build_config(kwargs), progress=not quiet)
    _say(f"whitened the projections of {result.index} in {result.seconds:.1f}s: "
         f"run `lorif-stream build` with the same options to index the rows")


@cli.command()
@click.option("--index", required=True, type=click.Path(file_okay=False), help="index directory")
@config_options(cfg.CurvatureConfig)
@click.option("--device", default="auto", show_default=True, help="torch device")
@click.option("--memory-budget", default=None, help="RAM the passes may use, e.g. 8GB (default: half the available RAM)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def fit(index, device, memory_budget, quiet, **kwargs):
    """Recompute the curvature from the stored factors (factors are not touched)."""
    from .fit import fit as run

    summary = run(index, cfg.CurvatureConfig(**kwargs), device=device, memory_budget=memory_budget, progress=not quiet)
    for name, layer in summary["layers"].items():
        _say(f"{name}: rank {layer['rank']}, λ={layer['damping']:.3g}, captured energy {layer['captured_energy']:.3f}")


@cli.command()
@task_options
@click.option("--index", required=True, type=click.Path(file_okay=False), help="index directory")
@click.option("--out", type=click.Path(dir_okay=False), default="results.jsonl", show_default=True,
              help="results: one JSON line per query with its proponents and opponents")
@click.option("--scores", type=click.Path(dir_okay=False), default=None,
              help="also write the dense (queries x rows) float32 score matrix to this .npy (streamed)")
@config_options(cfg.QueryConfig)
@click.option("--quiet", is_flag=True, help="no progress bars")
def query(index, out, scores, quiet, **kwargs):
    """Score every indexed training example for each query example; keep the top-k both ways."""
    from .query import query as run
    from .task import load_task, print_top_proponents

    task = _make_task(kwargs)
    task = load_task(task) if isinstance(task, str) else task  # loaded once, here, to print its texts too
    _budget(kwargs)
    kwargs["layers"] = tuple(kwargs["layers"]) or None
    result = run(task, index, out, scores, cfg.QueryConfig(**kwargs), progress=not quiet)
    _say(f"scored {len(result.results)} queries against {result.rows:,} rows in {result.seconds:.1f}s -> {out}"
         + (f", {scores}" if scores else ""))
    from .comm import current

    if current().root:
        # On a terminal, the first answer right away: each query's top proponent (id, score, text).
        print_top_proponents(task, result.results)  # sys.stdout, printed only if a TTY


@cli.command()
@click.option("--index", required=True, type=click.Path(file_okay=False), help="index directory")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def info(index, as_json):
    """Settings, sizes, rows, layers and curvature summary of an index."""
    from .inspect_index import info as run

    report = run(index)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"index     {report['index']}")
    shards = f"shards {report['shards']}   " if report.get("shards") else ""
    click.echo(f"rows      {report['rows']:,}   segments {len(report['segments'] or [])}   {shards}"
               f"non-finite rows {report['nonfinite_rows']}")
    p = report["projection"]
    click.echo(f"format    version {report['format_version']}")
    click.echo(f"factors   f={p['f']} min-side={p['min_side']} c={report['c']} {report['dtype']} "
               f"block={report['block_size']} rows")
    if p["kind"] == "whitened":
        click.echo(f"projection whitened ({p['matrices']}): K-FAC moments of {p['whiten_examples']} examples, "
                   f"ρ={p['whiten_damping']}, {p['whitened_layers']}/{len(report['layers'])} layers done")
    else:
        click.echo(f"projection random ({p['matrices']}): unwhitened, the LoRIF paper's projections")
    bpe = report["bytes_per_example"]
    other = max(report["disk_bytes"] - report["factor_bytes"], 0)
    click.echo(f"size      {report['disk_bytes'] / 1e6:,.1f} MB on disk: factors {report['factor_bytes'] / 1e6:,.1f} MB"
               + (f" ({bpe:,.0f} B/example, {bpe / report['raw_bytes_per_example']:.2f}× raw {report['dtype']})" if bpe else "")
               + f", curvature state and free pages {other / 1e6:,.1f} MB")
    click.echo(f"preconditioner {report['preconditioner']}, covering {report['curvature'].get('rows')} rows")
    click.echo(f"{'layer':36s} {'d_out x d_in':>13s} {'r':>6s} {'λ':>9s} {'energy':>7s}  whitening spectrum "
               f"(in | out: eig max/mean, effective rank)")
    for l in report["layers"]:
        lam = f"{l['damping']:.3g}" if l["damping"] is not None else "-"
        en = f"{l['captured_energy']:.3f}" if l["captured_energy"] is not None else "-"
        w = l["whitening"]
        spectrum = " | ".join((f"{w[s]['eig_max']:.2g}/{w[s]['eig_mean']:.2g}, {w[s]['effective_rank']:.1f} of {w[s]['dim']}"
                               if w[s].get("whitened", True) else f"not whitened ({w[s]['dim']} wide)")
                              for s in ("in", "out")) if w else "-"
        click.echo(f"{l['name'][:36]:36s} {l['d_out']:>6,} x {l['d_in']:<6,} {str(l['rank'] or '-'):>6s} {lam:>9s} "
                   f"{en:>7s}  {spectrum}")


@cli.command()
@click.option("--index", required=True, type=click.Path(file_okay=False), help="index directory")
@click.option("--quiet", is_flag=True, help="no progress bar")
def verify(index, quiet):
    """Decode every block (checksums included); check rows are contiguous and ids consistent."""
    from .inspect_index import verify as run

    report = run(index, progress=not quiet)
    if report.ok:
        click.echo(f"ok: {report.rows:,} rows, {report.blocks:,} blocks verified")
        return
    for e in report.errors:
        click.echo(f"corrupt: {e}", err=True)
    raise SystemExit(1)


from .demo import demo_command  # noqa: E402  (light: imports torch/transformers only when it runs)

cli.add_command(demo_command)


def _index_argument(argv: typing.Sequence[str]) -> str:
    """The --index the command was given (to name it in an error line), or a placeholder."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--index" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--index="):
            return arg.split("=", 1)[1]
    return "INDEX"


def _lmdb_error_line(e: Exception, argv: typing.Sequence[str]) -> str | None:
    """One line for an LMDB error that got past the store's own wrapping (damaged pages)."""
    import lmdb

    if not isinstance(e, lmdb.Error):
        return None
    index = _index_argument(argv)
    what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"index {index} is corrupt: LMDB says {what}; run `lorif-stream verify --index {index}`"


# Commands that torchrun spreads over its ranks; the others (info, verify, ...) run on rank 0 alone.
DISTRIBUTED_COMMANDS = ("build", "whiten", "append", "fit", "query")


def _option_value(argv: typing.Sequence[str], name: str) -> str | None:
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main(argv: typing.Sequence[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 1 (LORIF_DEBUG=1 shows tracebacks).

    Under torchrun (its RANK / WORLD_SIZE / ... variables set) the distributed commands join the job's
    process group first; the other commands run on rank 0 and the other ranks exit at once."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if "RANK" not in os.environ:  # not a torchrun rank: skip comm.py, whose torch import `--help` need not pay
        _run_cli(args)
        return
    from .comm import init_from_env, launched_by_torchrun, shutdown

    command = next((a for a in args if not a.startswith("-")), None)
    if launched_by_torchrun():
        if command not in DISTRIBUTED_COMMANDS:
            if int(os.environ["RANK"]) != 0:
                return
        else:
            init_from_env(_option_value(args, "--device") or "auto")
    try:
        _run_cli(args)
    finally:
        shutdown()


def _run_cli(args: list[str]) -> None:
    try:
        cli.main(args=args, standalone_mode=False)
    except click.exceptions.Exit as e:
        raise SystemExit(e.exit_code)
    except click.ClickException as e:
        e.show()
        raise SystemExit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        raise SystemExit(130)
    except KeyboardInterrupt:
        click.echo("interrupted: committed rows are kept; rerun the same command to resume", err=True)
        raise SystemExit(130)
    except (ValueError, OSError, LookupError, MemoryError, TypeError, RuntimeError) as e:
        if os.environ.get("LORIF_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        click.echo(f"lorif-stream: error: {message}  (LORIF_DEBUG=1 shows the traceback)", err=True)
        raise SystemExit(1)
    except Exception as e:  # our own index errors (corrupt, version, not an index), LMDB's, anything else named
        from .store import IndexFormatError

        if os.environ.get("LORIF_DEBUG"):
            raise
        if isinstance(e, IndexFormatError):
            click.echo(f"lorif-stream: error: {e}", err=True)
            raise SystemExit(1)
        line = _lmdb_error_line(e, args)
        if line is not None:
            click.echo(f"lorif-stream: error: {line}", err=True)
            raise SystemExit(1)
        raise



# ------------------------------------------------------------------------------------ report
# (defined above the __main__ guard so that `python -m lorif_stream.cli report` has it too)


@cli.command()
@click.option("--results", required=True, type=click.Path(dir_okay=False),
              help="results.jsonl written by `lorif-stream query`")
@click.option("--index", required=True, type=click.Path(file_okay=False),
              help="the index the results were scored against (their rows and ids are checked against it)")
@click.option("--out", type=click.Path(dir_okay=False), default="report.html", show_default=True,
              help="the HTML page to write")
@click.option("--task", "task_spec", default=None,
              help="texts from a task: path/to/file.py:NAME (its example_text(example) if it has one, else the example)")
@click.option("--hf-model", type=click.Path(file_okay=False), default=None,
              help="accepted so that query's task options can be reused as they are; texts need no model")
@click.option("--data", "train_data", type=click.Path(), multiple=True,
              help="training records, to show the texts: the build's file, then each append's, in that order "
                   "(repeat --data); .jsonl (one newline scan, then only the wanted lines are parsed), .parquet "
                   "(only the row groups holding wanted rows), a datasets.save_to_disk folder, or .jsonl.gz "
                   "(decompressed whole: gzip cannot seek)")
@click.option("--queries", "query_data", type=click.Path(), default=None,
              help="query records, to show the queries' texts (the file given to query)")
@click.option("--text-field", default="text", show_default=True, help="field holding the text")
@click.option("--id-field", default=None,
              help="field holding the example id (default: jsonl line number, or parquet/datasets row index)")
@click.option("--prompt-field", default=None, help="prompt/completion data: field holding the prompt (shown grey)")
@click.option("--completion-field", default=None, help="prompt/completion data: field holding the completion (shown bold)")
@click.option("--max-length", type=int, default=None, help="accepted with query's task options; not needed for texts")
@click.option("--chat-template", is_flag=True, help="accepted with query's task options; texts are shown without it")
@click.option("--skip-empty", is_flag=True,
              help="accepted with query's task options; rows shifted by skipped examples are found by id")
@click.option("--hf-dtype", "model_dtype", default=None, help="accepted with query's task options; not needed for texts")
@click.option("--max-chars", type=click.IntRange(0), default=4000, show_default=True,
              help="clip each text on the page after this many characters (0 = never)")
@click.option("--title", default=None, help="page title (default: from the results file name)")
def report(results, index, out, task_spec, hf_model, train_data, query_data, text_field, id_field, prompt_field,
           completion_field, max_length, chat_template, skip_empty, model_dtype, max_chars, title):
    """Write one self-contained HTML page of the results: open it in any browser, offline.

    Per query: its text, its proponents and opponents with their texts and score bars, and a
    search box; then the index summary (`info`) and each layer's curvature and whitening spectrum
    as inline plots. Only the rows named in the results are read from --data. The page loads
    nothing (no network, no files) and shows every text escaped.

    \b
      lorif-stream report --results results.jsonl --index runs/idx \\
        --data train.jsonl --data appended.jsonl --queries q.jsonl --id-field id
    """
    from .report import make_report

    if task_spec and (train_data or query_data or hf_model):
        raise click.UsageError("give either --task or --hf-model/--data/--queries, not both")
    if (prompt_field is None) != (completion_field is None):
        raise click.UsageError("give --prompt-field and --completion-field together")
    path, made = make_report(results, index, out, data=train_data, queries=query_data, task=task_spec,
                             text_field=text_field, id_field=id_field, prompt_field=prompt_field,
                             completion_field=completion_field, title=title, max_chars=max_chars,
                             options=None if task_spec else {"max_length": max_length, "chat_template": chat_template,
                                                             "skip_empty": skip_empty})
    for note in made.notes:
        click.echo(f"note: {note}", err=True)
    size = path.stat().st_size
    click.echo(f"report of {len(made.results)} queries ({len(made.texts):,} training texts shown) -> {path} "
               f"({size / 1e3:,.0f} kB): open it in a browser")


if __name__ == "__main__":
    main()
