"""Hostile-user fault check: damage a small index on purpose and count how lorif-stream reacts.

    .venv/bin/python tools/fault_check.py [--seed 0] [--flips 120] [--truncations 24] [--writers 3]

Builds one small index (tests/tasks/mlp_task.py, CPU, a few seconds), records the pristine
`query` output (results and the dense score matrix), then, everything through the CLI:

  * concurrent writers: two `append`s started together, and two `build`s into one new directory;
    exactly one of each pair may write, the other must be refused, and the index must verify;
  * byte flips: one byte XOR a random non-zero mask at a random offset of data.mdb, each on a
    fresh copy, followed by `verify` and `query`;
  * structure flips: the same, at a random offset among the first 96 bytes of a random page
    (page header, node offsets, first node headers: LMDB's own structures, where damage used to
    end in SIGBUS or an mdb.c abort);
  * truncations of data.mdb to a random length (and to page boundaries), then `verify` and `query`.

Each damaged copy gets one outcome, first match wins:
  signal          a command died of a signal (SIGBUS, SIGSEGV, SIGABRT)
  traceback       a command printed a Python traceback
  silent wrong    query exit 0 with output differing from the pristine one, and verify ok
  detected        verify exits 1 and names the damage ("corrupt: ..." or one error line)
  clean error     verify ok, but query refuses in one line (damage verify cannot see)
  no effect       verify ok and query output identical (the flip hit free or unused bytes)
Also counted: detected copies whose query still exited 0 with a different output (a reader
that did not check what verify checks). Same seed, same offsets, same table.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TASKS = "tests/tasks/mlp_task.py"
CLI = [str(ROOT / ".venv" / "bin" / "lorif-stream")] if (ROOT / ".venv" / "bin" / "lorif-stream").exists() else \
    [sys.executable, "-m", "lorif_stream.cli"]
OUTCOMES = ["signal", "traceback", "silent wrong", "detected", "clean error", "no effect"]


def cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def build_index(path: Path, task: str = "full") -> None:
    sys.path.insert(0, str(ROOT / "tests" / "tasks"))
    import mlp_task

    import lorif_stream

    lorif_stream.build(getattr(mlp_task, task)(), path, f=1, rank=1, sketch_rank=4, device="cpu", progress=False)


def index_rows(index: Path) -> int:
    from lorif_stream.store import IndexReader

    with IndexReader(index) as reader:
        return reader.rows


def query_output(index: Path, work: Path) -> tuple[subprocess.CompletedProcess, bytes | None]:
    out, scores = work / "results.jsonl", work / "scores.npy"
    for p in (out, scores):
        p.unlink(missing_ok=True)
    proc = cli("query", "--task", f"{TASKS}:full", "--index", index, "--top-k", 3, "--out", out, "--scores", scores,
               "--device", "cpu", "--quiet")
    if proc.returncode != 0 or not out.exists():
        return proc, None
    return proc, out.read_bytes() + (scores.read_bytes() if scores.exists() else b"")


def crashed(proc: subprocess.CompletedProcess) -> str | None:
    if proc.returncode < 0:
        return "signal"
    if "Traceback (most recent call last)" in proc.stderr:
        return "traceback"
    return None


def classify(index: Path, work: Path, pristine: bytes) -> tuple[str, bool, str]:
    verify = cli("verify", "--index", index, "--quiet")
    query, output = query_output(index, work)
    for proc in (verify, query):
        bad = crashed(proc)
        if bad:
            return bad, False, (proc.stderr.strip().splitlines() or ["?"])[-1]
    verify_ok = verify.returncode == 0
    differs = query.returncode == 0 and output != pristine
    note = (verify.stderr.strip().splitlines() or [""])[0] if not verify_ok else (query.stderr.strip().splitlines() or [""])[-1]
    if differs and verify_ok:
        return "silent wrong", False, "query output differs, verify ok"
    if not verify_ok:
        return "detected", differs, note
    if query.returncode != 0:
        return "clean error", False, note
    return "no effect", False, ""


def damage_trials(pristine_index: Path, pristine: bytes, kind: str, params: list[int], workers: int, seed_rng,
                  scratch: Path) -> tuple[collections.Counter, int, list[str]]:
    data = (pristine_index / "data.mdb").read_bytes()
    counts: collections.Counter = collections.Counter()
    wrong_but_detected = 0
    examples: list[str] = []
    masks = seed_rng.integers(1, 256, len(params)).tolist()

    def trial(i: int):
        work = scratch / f"{kind}-{i}"
        index = work / "idx"
        shutil.copytree(pristine_index, index)
        (index / "writer.lock").unlink(missing_ok=True)
        if kind in ("flip", "structure"):
            damaged = bytearray(data)
            damaged[params[i]] ^= masks[i]
            (index / "data.mdb").write_bytes(bytes(damaged))
        else:
            (index / "data.mdb").write_bytes(data[: params[i]])
        try:
            return i, classify(index, work, pristine)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    with ThreadPoolExecutor(workers) as pool:
        for i, (outcome, differs, note) in pool.map(trial, range(len(params))):
            counts[outcome] += 1
            wrong_but_detected += differs
            if outcome in ("signal", "traceback", "silent wrong") or (outcome != "no effect" and len(examples) < 6):
                examples.append(f"{kind} @ {params[i]} ({outcome}): {note[:160]}")
    return counts, wrong_but_detected, examples


def writer_trials(scratch: Path, n: int) -> collections.Counter:
    """Two appends at once into one index; two builds at once into one new directory."""
    counts: collections.Counter = collections.Counter()
    base = scratch / "first"
    build_index(base, "first")
    # small batches, each slowed: the two writers' write phases overlap (seconds), whatever the start-up jitter
    slow = {"MLP_TASK_DELAY": "0.3"}
    for t in range(n):
        for kind in ("append", "build"):
            index = scratch / f"writers-{kind}-{t}"
            if kind == "append":
                shutil.copytree(base, index)
                args = ["append", "--task", f"{TASKS}:second_slow", "--index", index, "--device", "cpu", "--batch-size", 2,
                        "--quiet"]
            else:
                args = ["build", "--task", f"{TASKS}:slow", "--index", index, "--f", 1, "--rank", 1, "--sketch-rank", 4,
                        "--device", "cpu", "--batch-size", 4, "--quiet"]
            procs = [subprocess.Popen([*CLI, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env={**os.environ, **slow}) for _ in range(2)]
            results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
            ok = sum(rc == 0 for rc, _ in results)
            refused = sum(rc == 1 and "being written by process" in err for rc, err in results)
            verify = cli("verify", "--index", index, "--quiet")
            rows = index_rows(index) if verify.returncode == 0 else None
            if ok == 1 and refused == 1 and verify.returncode == 0 and rows == 48:
                counts[f"{kind}: one wrote, one refused, index verifies"] += 1
            else:
                counts[f"{kind}: {ok} exit 0, {refused} refused, verify rc {verify.returncode}, rows {rows}"] += 1
            shutil.rmtree(index, ignore_errors=True)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flips", type=int, default=120)
    ap.add_argument("--structure-flips", type=int, default=40)
    ap.add_argument("--truncations", type=int, default=24)
    ap.add_argument("--writers", type=int, default=3, help="rounds of concurrent appends and builds")
    ap.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorif-fault-") as tmp:
        scratch = Path(tmp)
        pristine_index = scratch / "pristine"
        build_index(pristine_index)
        verify = cli("verify", "--index", pristine_index, "--quiet")
        assert verify.returncode == 0, verify.stderr
        query, pristine = query_output(pristine_index, scratch)
        assert pristine is not None, query.stderr
        size = (pristine_index / "data.mdb").stat().st_size
        psize = 4096
        flips = sorted(rng.integers(0, size, args.flips).tolist())
        cuts = sorted({*rng.integers(0, size, max(0, args.truncations - 4)).tolist(),
                       *(min(size - psize, k * psize) for k in (1, 2, size // psize // 2, size // psize - 1))})
        structure = sorted((rng.integers(0, size // psize, args.structure_flips) * psize
                            + rng.integers(0, 96, args.structure_flips)).tolist())
        print(f"index: {size:,} bytes ({size // psize} pages), seed {args.seed}, {args.workers} workers", flush=True)
        writers = writer_trials(scratch, args.writers) if args.writers else collections.Counter()
        flip_counts, flip_wrong, flip_examples = damage_trials(pristine_index, pristine, "flip", flips, args.workers, rng,
                                                               scratch)
        st_counts, st_wrong, st_examples = damage_trials(pristine_index, pristine, "structure", structure, args.workers,
                                                         rng, scratch)
        cut_counts, cut_wrong, cut_examples = damage_trials(pristine_index, pristine, "truncate", cuts, args.workers,
                                                            rng, scratch)
    print()
    print(f"| outcome | byte flips ({len(flips)}) | structure flips ({len(structure)}) | truncations ({len(cuts)}) |")
    print("|---|---:|---:|---:|")
    for outcome in OUTCOMES:
        print(f"| {outcome} | {flip_counts[outcome]} | {st_counts[outcome]} | {cut_counts[outcome]} |")
    print(f"| (detected, but query exit 0 with a different output) | {flip_wrong} | {st_wrong} | {cut_wrong} |")
    if writers:
        print()
        print(f"| concurrent writers ({args.writers} rounds) | count |")
        print("|---|---:|")
        for outcome, n in sorted(writers.items()):
            print(f"| {outcome} | {n} |")
    print()
    for line in flip_examples + st_examples + cut_examples:
        print(" ", line)
    print(f"\n{time.perf_counter() - t0:.0f}s")
    bad = sum(flip_counts[o] + st_counts[o] + cut_counts[o] for o in ("signal", "traceback", "silent wrong"))
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
