"""Scale-out benchmark: build and query with torchrun on 1 and 2 CPU ranks (gloo).

For each world size it launches `torchrun --standalone --nproc_per_node W` on this script, which
then (on every rank) builds a sharded index of random token sequences through a tiny random GPT-2
(2 layers x 128, vocab 512, 64 tokens; every Linear / Conv1D tracked), queries it, and reports per
rank: rows/s, peak RSS, and the seconds spent in all-reduces (whitening moments, curvature
statistics, row counts; waiting for the slower rank included) as a share of the build.

Modes: the engine's default (whitened projections, EK-FAC, f=4, c=1, bf16) and the paper's
(random projections, lowrank curvature r=64: D x k sketches all-reduced).

    python benchmarks/bench_distributed.py --quick    # N = 1024
    python benchmarks/bench_distributed.py            # N = 4096
Writes benchmarks/results/distributed[_quick].json. Each rank runs one OpenMP thread (torchrun's
default), so 1 rank uses one core and 2 ranks two: the comparison is per core, on one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _memory import PeakRSS  # noqa: E402
from bench_build import MODELS, PAPER, TokensTask  # noqa: E402

MODES = {"default": dict(), "paper": PAPER}
SHAPE = "tiny"  # bench_build's tiny GPT-2; its own batch size is not this benchmark's


def worker(n: int, out: Path, workdir: Path) -> None:
    """One rank of the job: build and query every mode, then rank 0 writes what every rank measured."""
    import lorif_stream as ls
    from lorif_stream.comm import REDUCE_STATS, init_from_env, shutdown

    comm = init_from_env("cpu")
    task = TokensTask(SHAPE, n)
    report = {}
    try:
        for mode, options in MODES.items():
            index = workdir / f"{mode}-{comm.world}"
            before = dict(REDUCE_STATS)
            with PeakRSS() as rss:
                built = ls.build(task, index, device="cpu", batch_size=16, progress=False, **options)
            reduce_s = REDUCE_STATS["seconds"] - before["seconds"]
            reduce_bytes = REDUCE_STATS["bytes"] - before["bytes"]
            with PeakRSS() as qrss:
                t = time.perf_counter()
                ls.query(task, index, device="cpu", top_k=10, progress=False)
                query_s = time.perf_counter() - t
            mine = {"build_seconds": built.seconds, "whiten_seconds": built.whiten_seconds,
                    "finalize_seconds": built.finalize_seconds, "allreduce_seconds": reduce_s,
                    "allreduce_bytes": reduce_bytes, "peak_rss_mb": rss.peak / 1e6, "query_seconds": query_s,
                    "query_peak_rss_mb": qrss.peak / 1e6}
            ranks = comm.gather(mine)
            report[mode] = {"rows": built.rows, "ranks": ranks,
                            "build_rows_per_s": built.rows / max(r["build_seconds"] for r in ranks),
                            "query_rows_per_s": built.rows / max(r["query_seconds"] for r in ranks),
                            "allreduce_share_of_build": max(r["allreduce_seconds"] / r["build_seconds"] for r in ranks)}
        if comm.root:
            out.write_text(json.dumps(report))
    finally:
        shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--worker", nargs=3, metavar=("N", "OUT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(int(args.worker[0]), Path(args.worker[1]), Path(args.worker[2]))
        return
    n = 1024 if args.quick else 4096
    model = {k: MODELS[SHAPE][k] for k in ("n_layer", "n_embd", "n_head", "vocab", "seq")}
    results = {"n": n, "model": model, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                   "torch": torch.__version__}, "worlds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for world in [int(w) for w in args.worlds.split(",")]:
            out = Path(tmp) / f"world{world}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                   __file__, "--worker", str(n), str(out), str(Path(tmp) / f"w{world}")]
            t = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            results["worlds"][str(world)] = dict(json.loads(out.read_text()), job_seconds=time.perf_counter() - t)
            for mode, r in results["worlds"][str(world)].items():
                if mode == "job_seconds":
                    continue
                rss = ", ".join(f"{x['peak_rss_mb']:.0f}" for x in r["ranks"])
                print(f"world {world} {mode:8s}: build {r['build_rows_per_s']:7.1f} rows/s, query "
                      f"{r['query_rows_per_s']:9.1f} rows/s, peak RSS per rank {rss} MB, all-reduce "
                      f"{100 * r['allreduce_share_of_build']:.2f}% of the build", flush=True)
    path = Path(__file__).parent / "results" / f"distributed{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
