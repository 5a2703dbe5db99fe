"""Peak RSS of a build and of a query as N grows 10x: bounded memory means flat, not merely small.

The model is bench_build's "tiny" GPT-2 (2 layers x 128 wide, vocab 512, 64 tokens, batch 32, every
layer tracked) on random token sequences, at the default settings (whitened, EK-FAC, f=4, c=1, bf16).
Each phase runs in a fresh process, and its peak is the kernel's high-water mark (VmHWM: every
page that was ever resident, the mapped index pages included), so nothing of one phase counts
for another:

    build N          ls.build of N examples
    query N          ls.query of 16 queries against that index, top-10 JSON out (no --scores)

    python benchmarks/bench_rss.py                   # N = 20k and 200k
    python benchmarks/bench_rss.py --sizes 2000,20000
Writes benchmarks/results/rss.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(phase: str, n: int, index: Path) -> None:
    sys.path.insert(0, str(HERE))
    import lorif_stream as ls
    from bench_build import MODELS, TokensTask

    batch = MODELS["tiny"]["batch"]
    t = time.perf_counter()
    if phase == "build":
        ls.build(TokensTask("tiny", n), index, f=4, rank=1, dtype="bf16", batch_size=batch, progress=False)
    else:
        ls.query(TokensTask("tiny", n, n_queries=16), index, index.parent / f"q{n}.jsonl", None, top_k=10,
                 progress=False)
    print(json.dumps({"phase": phase, "N": n, "seconds": time.perf_counter() - t, "peak_rss": _vm_hwm_bytes(),
                      "index_bytes": (index / "data.mdb").stat().st_size}))


def run(phase: str, n: int, index: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", phase, str(n), str(index)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{phase} N={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,200000", help="comma-separated N values (default 20000,200000)")
    ap.add_argument("--child", nargs=3, metavar=("PHASE", "N", "INDEX"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "rss.json"))
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), Path(args.child[2]))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="lorif-rss-"))
    rows = []
    try:
        for n in sizes:
            for phase in ("build", "query"):
                r = run(phase, n, root / f"idx{n}")
                rows.append(r)
                print(f"{phase:5s} N={n:>9,}: peak RSS {r['peak_rss'] / 1e6:7.1f} MB, {r['seconds']:7.1f} s, "
                      f"index {r['index_bytes'] / 1e6:.0f} MB", flush=True)
            shutil.rmtree(root / f"idx{n}", ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    growth = {phase: max(r["peak_rss"] for r in rows if r["phase"] == phase)
              / min(r["peak_rss"] for r in rows if r["phase"] == phase) for phase in ("build", "query")}
    for phase, g in growth.items():
        print(f"{phase}: largest / smallest peak RSS over N = {sizes[0]:,}..{sizes[-1]:,}: {g:.3f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/bench_rss.py " + " ".join(sys.argv[1:]),
                                          "machine": platform.platform(), "rows": rows, "growth": growth}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
