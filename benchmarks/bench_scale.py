"""Scale benchmark: millions of rows through the real store, then the real query stream over all of them.

GPT-2-small shapes at f=4, c=1, bf16: the 48 Conv1D layers of its 12 blocks (attn.c_attn 768->2304,
attn.c_proj 768->768, mlp.c_fc 768->3072, mlp.c_proj 3072->768), each side d = dim // 4, so
36,864 factor values per row (73,728 B raw bf16). `--layers K` keeps the first K of those layers
(block h.0 first: K = 4 is one block, 3,072 values per row); `--layers all` keeps all 48.

For each index it measures, each phase in a fresh process (so that the peak RSS of a phase is its own):
  write    IndexWriter.create + BlockSink (the build's pipelined writer): rows/s, MB/s, the rate per
           tenth of the rows (a rate that falls with N would show there), the closing fsync
  reopen   IndexReader + a strict snapshot (the checks every query runs on open)
  verify   lorif_stream.verify (the walk of every record, in its child process)
  stream   the query's BlockLoader alone: read + decode of every block, nothing scored
  q1, q64  the query's scoring stream (query._stream_scores: loader thread, scorer, exact top-10)
           with 1 and 64 random preconditioned query vectors H, in the query batches `query` would use
Each read phase starts with the index's pages dropped from the page cache (posix_fadvise DONTNEED on
data.mdb, this file only): the numbers are cold reads from disk. Peak RSS is the kernel's high-water
mark (VmHWM), reset at the start of each phase. Disk per row is data.mdb's allocated bytes / rows.

The factors are synthetic (no model): per layer L = s_i * g / sqrt(d_out), R = unit-norm Gaussian,
g Gaussian, with a per-row scale s_i log-normal (sigma 1.5) times a decay from 1 to 1/5 across a pool
of 8 distinct blocks that is reused in turn (every block is compressed on its own, so reuse does not
help zstd; the timed loop is the write path alone). They are rounded to bf16 by the writer.

Q = 64 on GPT-2-small shapes costs 64 * D multiply-adds per row (D = 5.3M for all 48 layers): on a
2-core CPU that is ~100 rows/s, so by default q64 streams only a prefix of the index (about a
minute of scoring, a whole number of blocks; `--q64-rows` sets it, 0 = all rows) through the same
loader and scorer, and the report gives the rows/s and the time a full pass would take.

    python benchmarks/bench_scale.py                      # 5M rows x first 4 layers, 500k x 4, 500k x all 48
    python benchmarks/bench_scale.py --quick              # tiny, < 30 s
    python benchmarks/bench_scale.py --rows 5000000 --layers all   # refuses unless the disk holds ~370 GB
Refuses to start (one line, exit 2) when the disk under --dir cannot hold the largest index.
Every index is deleted after its phases, also on Ctrl-C, SIGTERM or an error (the results of the
phases finished by then stay in <dir>/bench_scale_phases.jsonl, removed after a complete run).
Writes benchmarks/results/scale.json (scale_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
Q_ROWS_TARGET_MACS = 2.0e12  # default q64 prefix: about a minute of scoring on this 2-core CPU

# (name, d_out, d_in) of GPT-2 small's Conv1D layers at f=4, in model order
GPT2_SMALL_F4 = [(f"h.{b}.{name}", d_out, d_in) for b in range(12)
                 for name, d_out, d_in in (("attn.c_attn", 576, 192), ("attn.c_proj", 192, 192),
                                           ("mlp.c_fc", 768, 192), ("mlp.c_proj", 192, 768))]


def pick_layers(spec: str) -> list[tuple[str, int, int]]:
    if spec == "all":
        return list(GPT2_SMALL_F4)
    k = int(spec)
    if not 1 <= k <= len(GPT2_SMALL_F4):
        raise SystemExit(f"--layers {spec}: give 'all' or a count of first layers in 1..{len(GPT2_SMALL_F4)}")
    return GPT2_SMALL_F4[:k]


def values_per_row(layers) -> int:
    return sum(o + i for _, o, i in layers)


def block_rows(layers) -> int:
    """The block size a build picks for these layers (build._default_block_size, c = 1)."""
    from types import SimpleNamespace

    from lorif_stream.build import _default_block_size
    from lorif_stream.config import BuildConfig

    return _default_block_size(SimpleNamespace(layers=[SimpleNamespace(d_out=o, d_in=i) for _, o, i in layers]),
                               BuildConfig(rank=1))


def disk_needed(rows: int, layers, block: int) -> int:
    """An upper bound for the index on disk: raw bf16 factors (no credit for compression), each block
    value rounded up to whole 4 KiB overflow pages, ids both ways, LMDB branch pages, + 5% + 256 MiB."""
    blocks = math.ceil(rows / block)
    factors = rows * values_per_row(layers) * 2 + blocks * len(layers) * (4096 + 32)
    ids = rows * 2 * 48  # row -> id and id -> row records with their checksums and LMDB node headers
    return int((factors + ids) * 1.05) + (256 << 20)


# ------------------------------------------------------------------------------------ child side


def _hwm_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Phase:
    """Wall time, base RSS and peak RSS (VmHWM since the start of the phase) of one phase."""

    def __init__(self, out: dict, name: str):
        self.out, self.name = out, name

    def __enter__(self):
        _hwm_reset()
        self.base = _status_kb("VmRSS") * 1024
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.out[self.name] = {"seconds": time.perf_counter() - self.t, "rss_base_MB": self.base / 1e6,
                                   "rss_peak_MB": _status_kb("VmHWM") * 1024 / 1e6, **self.out.get(self.name, {})}


def drop_cache(path: Path) -> None:
    """Drop data.mdb's clean pages from the page cache (this file only): the next read comes from disk."""
    fd = os.open(path / "data.mdb", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_pool(layers, block: int, pool: int = 8, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    decay = 1.0 / (1.0 + 4.0 * torch.arange(pool * block, dtype=torch.float32) / (pool * block))
    out = []
    for j in range(pool):
        d = decay[j * block:(j + 1) * block].view(-1, 1, 1)
        blk = []
        for _, d_out, d_in in layers:
            s = torch.exp(torch.randn(block, 1, 1, generator=g) * 1.5 - 6) * d
            L = (torch.randn(block, d_out, 1, generator=g) / d_out ** 0.5 * s).numpy()
            R = torch.randn(block, d_in, 1, generator=g)
            R = (R / R.norm(dim=1, keepdim=True)).numpy()
            blk.append((L, R))
        out.append(blk)
    return out


def stream_all(snap, layer_ids, dev, BlockLoader) -> dict:
    """The query's loader alone (its decode thread and buffer ring), nothing scored."""
    loader = BlockLoader(snap, layer_ids, dev, threads=1)
    n = 0
    for _, k, _ in loader:
        n += k
    return {"rows": n, "bytes_read": loader.bytes_read, "read_seconds": loader.read_seconds}


class ChildPeakRSS:
    """Peak RSS of this process's child processes (verify's walk), sampled every 20 ms with psutil
    (ru_maxrss of a child counts the parent's pages at fork time, so it is not used)."""

    def __enter__(self):
        import threading

        import psutil

        self.peak, self._stop, me = 0, threading.Event(), psutil.Process()

        def run():
            while not self._stop.wait(0.02):
                for c in me.children(recursive=True):
                    try:
                        self.peak = max(self.peak, c.memory_info().rss)
                    except psutil.Error:
                        pass

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def child_write(path: Path, rows: int, layers, block: int) -> dict:
    from lorif_stream.store import IndexLayout, IndexWriter, LayerShape
    from lorif_stream.store.sink import BlockSink

    layout = IndexLayout(tuple(LayerShape(n, o, i) for n, o, i in layers), c=1, dtype="bf16", block_size=block)
    pool = make_pool(layers, block)
    res: dict = {"block_rows": block, "pool_blocks": len(pool)}
    marks = [rows * (k + 1) // 10 for k in range(10)]
    trace: list[tuple[int, float]] = []
    done = [0]

    def on_commit(blk):
        done[0] += blk.rows
        while len(trace) < len(marks) and done[0] >= marks[len(trace)]:
            trace.append((done[0], time.perf_counter()))

    with Phase(res, "write"):
        t0 = time.perf_counter()
        w = IndexWriter.create(path, layout, {"benchmark": "bench_scale", "synthetic": True}, durability="nosync")
        try:
            sink = BlockSink(w, on_commit=on_commit)
            try:
                for j, first in enumerate(range(0, rows, block)):
                    n = min(block, rows - first)
                    sink.put(first, [(L[:n], R[:n]) for L, R in pool[j % len(pool)]],
                             [str(first + i) for i in range(n)])
                sink.drain()
            finally:
                sink.close()
            res["write"] = {"seconds_before_close": time.perf_counter() - t0, "bytes_committed": sink.bytes_written}
        finally:
            t1 = time.perf_counter()
            w.close()  # durability nosync: one fsync of the whole file here
        res["write"]["close_fsync_seconds"] = time.perf_counter() - t1
    prev_rows, prev_t, deciles = 0, t0, []
    for r, t in trace:
        deciles.append((r - prev_rows) / max(t - prev_t, 1e-9))
        prev_rows, prev_t = r, t
    res["write"]["rows_per_s_by_tenth"] = deciles
    return res


def child_read(path: Path, layers, phases: list[str], q64_rows: int, q_batch_budget: int | None) -> dict:
    import torch

    import lorif_stream
    from lorif_stream.config import QueryConfig
    from lorif_stream.query import BlockLoader, _stream_scores
    from lorif_stream.store import IndexReader

    torch.manual_seed(1)
    dev = torch.device("cpu")
    res: dict = {}
    values = values_per_row(layers)

    drop_cache(path)
    with Phase(res, "reopen"):
        reader = IndexReader(path)
        with reader.snapshot() as snap:
            rows = snap.rows
    st = (path / "data.mdb").stat()
    res["disk"] = {"rows": rows, "data_mdb_bytes": st.st_size, "allocated_bytes": st.st_blocks * 512,
                   "factor_bytes": reader.factor_bytes(),
                   "index_dir_bytes": sum(p.stat().st_blocks * 512 for p in path.iterdir())}
    try:
        if "verify" in phases:
            drop_cache(path)
            with Phase(res, "verify"), ChildPeakRSS() as child:
                report = lorif_stream.verify(path, progress=False)
            res["verify"].update(ok=report.ok, blocks=report.blocks, errors=report.errors[:5],
                                 child_rss_peak_MB=child.peak / 1e6)
        layer_ids = list(range(len(layers)))
        if "stream" in phases:
            drop_cache(path)
            with reader.snapshot() as snap, Phase(res, "stream"):
                res["stream"] = stream_all(snap, layer_ids, dev, BlockLoader)
        for name, Q, cap in (("q1", 1, 0), ("q64", 64, q64_rows)):
            if name not in phases:
                continue
            g = torch.Generator().manual_seed(Q)
            H = [torch.randn(Q, o, i, generator=g) for _, o, i in layers]
            config = QueryConfig(top_k=10, device="cpu", memory_budget=q_batch_budget)
            # query(): queries go in batches that fit the memory budget, one index pass per batch
            per_query = sum(o * i for _, o, i in layers) * 4 * 3
            q_batch = int(max(1, min(Q, config.budget() // 4 // max(per_query, 1))))
            drop_cache(path)
            with reader.snapshot() as snap, Phase(res, name):
                scored = snap.rows
                if cap and cap < snap.rows:
                    # stream only the blocks that hold the first `cap` rows: the loader reads blocks
                    # up to snap.rows, and scores each whole
                    scored = min(snap.rows, math.ceil(cap / snap.layout.block_size) * snap.layout.block_size)
                    snap.rows = cap
                stats = {"read_seconds": 0.0, "score_seconds": 0.0, "bytes_read": 0}
                tops = []
                for q0 in range(0, Q, q_batch):
                    q1 = min(Q, q0 + q_batch)
                    tops.append(_stream_scores(snap, [h[q0:q1] for h in H], layer_ids, dev, config, None, q0, stats,
                                               progress=False))
                res[name] = {"rows": scored, "queries": Q, "query_batch": q_batch,
                             "passes": math.ceil(Q / q_batch), **stats,
                             "best_score": float(max(t.top[:, 0].max() for t in tops))}
            del H
    finally:
        reader.close()
    if "stream_readahead" in phases:
        # Diagnostic, not the product: the same loader over an environment opened with LMDB's
        # readahead on (the store opens it with readahead=False, i.e. MADV_RANDOM on the map); after the
        # reader above is closed: LMDB allows one environment per file per process.
        import lmdb

        opened = lmdb.open

        def with_readahead(*a, **k):
            k["readahead"] = True
            return opened(*a, **k)

        drop_cache(path)
        lmdb.open = with_readahead
        try:
            with IndexReader(path) as ra_reader, ra_reader.snapshot() as snap, Phase(res, "stream_readahead"):
                res["stream_readahead"] = stream_all(snap, layer_ids, dev, BlockLoader)
        finally:
            lmdb.open = opened
    for name in ("stream", "stream_readahead", "q1", "q64"):
        if name in res:
            r = res[name]
            passes = r.get("passes", 1)
            r["rows_per_s"] = r["rows"] / r["seconds"]
            r["stored_GBps"] = r["bytes_read"] / r["seconds"] / 1e9
            r["decoded_fp32_GBps"] = r["rows"] * passes * values * 4 / r["seconds"] / 1e9
            r["loader_thread_decoded_fp32_GBps"] = r["rows"] * passes * values * 4 / max(r["read_seconds"], 1e-9) / 1e9
    return res


def child_main(args) -> None:
    layers = pick_layers(args.layers)
    path = Path(args.path)
    if args.child == "write":
        out = child_write(path, args.rows, layers, args.block)
    else:
        out = child_read(path, layers, args.phases.split(","), args.q64_rows, args.memory_budget)
    print("RESULT " + json.dumps(out), flush=True)
    # also kept beside the indexes, so that an interrupted long run keeps its finished phases
    with open(path.parent.parent / "bench_scale_phases.jsonl", "a") as fh:
        fh.write(json.dumps({"path": str(path), "child": args.child, **out}) + "\n")


# ------------------------------------------------------------------------------------ parent side


class Interrupted(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


def run_child(argv: list[str], nice: int, inprocess: bool = False) -> dict:
    if inprocess:  # --quick: one process, phases one after the other (RSS figures then mean little)
        ap = argparse.ArgumentParser()
        for flag in ("--child", "--path", "--layers", "--phases", "--rows", "--block", "--q64-rows", "--memory-budget"):
            ap.add_argument(flag, type=int if flag in ("--rows", "--block", "--q64-rows", "--memory-budget") else str)
        a = ap.parse_args(argv)
        layers = pick_layers(a.layers)
        if a.child == "write":
            return child_write(Path(a.path), a.rows, layers, a.block)
        return child_read(Path(a.path), layers, a.phases.split(","), a.q64_rows, a.memory_budget)
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=(lambda: os.nice(nice)) if nice else None)
    try:
        out, _ = proc.communicate()
    except BaseException:
        # our own child and its children (verify's walk) by pid, so that nothing keeps the deleted index open
        import psutil

        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            family = []
        proc.kill()
        for c in family:
            try:
                c.kill()
            except psutil.Error:
                pass
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"phase {argv[1]} failed (exit {proc.returncode})")
    line = next(l for l in reversed(out.splitlines()) if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def default_q64_rows(layers, block: int, rows: int) -> int:
    D = sum(o * i for _, o, i in layers)
    cap = max(block, int(Q_ROWS_TARGET_MACS / (64 * D)) // block * block)
    return 0 if cap >= rows else cap


def bench_one(root: Path, label: str, rows: int, layer_spec: str, phases: list[str], q64_rows: int | None,
              memory_budget: int | None, nice: int, inprocess: bool = False) -> dict:
    layers = pick_layers(layer_spec)
    block = block_rows(layers)
    if inprocess:
        block = max(16, block // 8)  # --quick: smaller blocks, so that q64 over one block stays short
    need = disk_needed(rows, layers, block)
    free = shutil.disk_usage(root).free
    if need > free:
        raise SystemExit(f"bench_scale: {label} ({rows:,} rows x {len(layers)} layers) needs ~{need / 1e9:.1f} GB "
                         f"but {root} has {free / 1e9:.1f} GB free now; stopping")
    q64 = default_q64_rows(layers, block, rows) if q64_rows is None else q64_rows
    path = Path(tempfile.mkdtemp(prefix=f"scale-{label}-", dir=root)) / "index"
    res = {"label": label, "rows": rows, "layers": len(layers), "layer_names": [n for n, _, _ in layers],
           "values_per_row": values_per_row(layers), "raw_bf16_bytes_per_row": values_per_row(layers) * 2,
           "D_per_row": sum(o * i for _, o, i in layers), "disk_needed_estimate_bytes": need}
    print(f"[bench_scale] {label}: {rows:,} rows x {len(layers)} layers ({values_per_row(layers):,} values/row, "
          f"blocks of {block:,} rows) in {path}", file=sys.stderr, flush=True)
    try:
        common = ["--path", str(path), "--layers", layer_spec]
        t = time.perf_counter()
        res.update(run_child(["--child", "write", *common, "--rows", str(rows), "--block", str(block)], nice, inprocess))
        w = res["write"]
        print(f"[bench_scale] {label}: written in {w['seconds']:.0f} s ({rows / w['seconds']:,.0f} rows/s)",
              file=sys.stderr, flush=True)
        argv = ["--child", "read", *common, "--phases", ",".join(phases), "--q64-rows", str(q64)]
        if memory_budget:
            argv += ["--memory-budget", str(memory_budget)]
        res.update(run_child(argv, nice, inprocess))
        res["wall_seconds"] = time.perf_counter() - t
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    w = res["write"]
    raw = rows * res["raw_bf16_bytes_per_row"]
    w["rows_per_s"] = rows / w["seconds"]
    w["raw_bf16_MBps"] = raw / w["seconds"] / 1e6
    w["raw_bf16_MBps_before_close"] = raw / w["seconds_before_close"] / 1e6
    w["stored_MBps"] = res["disk"]["allocated_bytes"] / w["seconds"] / 1e6
    d = res["disk"]
    d["bytes_per_row"] = d["allocated_bytes"] / rows
    d["factor_bytes_per_row"] = d["factor_bytes"] / rows
    d["ratio_to_raw_bf16"] = d["factor_bytes"] / raw
    d["index_over_ram"] = d["allocated_bytes"] / _ram()
    return res


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def summary_rows(results: list[dict]) -> list[str]:
    nan = float("nan")

    def get(r, phase, key):
        return r[phase][key] if phase in r else nan

    lines = [f"{'index':>8s} {'rows':>10s} {'lay':>3s} {'B/row':>7s} {'write r/s':>9s} {'MB/s':>5s} {'reopen s':>8s} "
             f"{'verify s':>8s} {'q1 r/s':>8s} {'q1 GB/s':>7s} {'q64 r/s':>7s} {'stream GB/s':>11s} {'+readahead':>10s} "
             f"{'peak RSS MB w/v/q1/q64':>22s}"]
    for r in results:
        rss = "/".join(f"{r[p]['rss_peak_MB']:.0f}" if p in r else "-" for p in ("write", "verify", "q1", "q64"))
        lines.append(
            f"{r['label']:>8s} {r['rows']:>10,} {r['layers']:>3d} {r['disk']['bytes_per_row']:>7,.0f} "
            f"{r['write']['rows_per_s']:>9,.0f} {r['write']['raw_bf16_MBps']:>5,.0f} {r['reopen']['seconds']:>8.2f} "
            f"{get(r, 'verify', 'seconds'):>8.1f} {get(r, 'q1', 'rows_per_s'):>8,.0f} {get(r, 'q1', 'stored_GBps'):>7.3f} "
            f"{get(r, 'q64', 'rows_per_s'):>7,.0f} {get(r, 'stream', 'stored_GBps'):>11.3f} "
            f"{get(r, 'stream_readahead', 'stored_GBps'):>10.3f} {rss:>22s}")
    lines.append("(GB/s: stored bytes read per second of the phase, cold page cache; write MB/s: raw bf16)")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--layers", default="4", help="'all' (48 layers) or K: the first K layers (4 = block h.0)")
    ap.add_argument("--compare-rows", type=int, default=None,
                    help="a second index, same layers, for the RSS comparison (default rows // 10; 0 = none)")
    ap.add_argument("--full-rows", type=int, default=500_000,
                    help="an index of all 48 layers with this many rows (0 = none; skipped when --layers all)")
    ap.add_argument("--q64-rows", type=int, default=None,
                    help="rows the Q=64 query streams (default: about a minute of scoring; 0 = all)")
    ap.add_argument("--memory-budget", type=int, default=None, help="query memory budget in bytes (default: query's)")
    ap.add_argument("--dir", default="/tmp", help="where the indexes are written (and deleted)")
    ap.add_argument("--nice", type=int, default=0, help="niceness of the measuring processes")
    ap.add_argument("--quick", action="store_true", help="tiny, in one process, blocks 8x smaller: 4k x 4 layers, 2k x 4, 120 x 48; q64 over one block (< 30 s)")
    ap.add_argument("--out", default=None)
    # child processes
    ap.add_argument("--child", choices=("write", "read"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--block", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--phases", default="verify,stream,q1,q64", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)
    if args.quick:
        args.rows, args.full_rows = 4_000, 120
        args.q64_rows = 1 if args.q64_rows is None else args.q64_rows  # one block
        args.compare_rows = 2_000 if args.compare_rows is None else args.compare_rows
    if args.compare_rows is None:
        args.compare_rows = args.rows // 10
    out = Path(args.out or HERE / "results" / ("scale_quick.json" if args.quick else "scale.json"))
    root = Path(args.dir)
    # cold passes are slow (see the README): `stream` (the loader alone) is measured on the compare
    # index, q1 measures read + decode + scoring on all of them
    plan = [("main", args.rows, args.layers, ["verify", "q1", "q64", "stream_readahead"], args.q64_rows)]
    if args.compare_rows:
        plan.append(("compare", args.compare_rows, args.layers, ["verify", "q1", "stream", "stream_readahead"], None))
    if args.full_rows and args.layers != "all":
        plan.append(("full", args.full_rows, "all", ["verify", "q1", "q64"], args.q64_rows))
    # refuse before writing anything when the largest index cannot fit (each is deleted before the next)
    needs = [(label, rows, spec, disk_needed(rows, pick_layers(spec), block_rows(pick_layers(spec))))
             for label, rows, spec, _, _ in plan]
    label, rows, spec, need = max(needs, key=lambda x: x[3])
    free = shutil.disk_usage(root).free
    if need > free:
        print(f"bench_scale: refusing to start: the {label} index ({rows:,} rows x {len(pick_layers(spec))} layers, "
              f"{values_per_row(pick_layers(spec)) * 2:,} B/row raw bf16) needs ~{need / 1e9:.1f} GB and {root} has "
              f"{free / 1e9:.1f} GB free (use --dir, fewer --rows, or fewer --layers)", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, _on_sigterm)
    phases_log = root / "bench_scale_phases.jsonl"  # each finished child's results, kept if the run is cut short
    phases_log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    env = {"cpus": os.cpu_count(), "ram_bytes": _ram(), "load_avg_start": os.getloadavg(),
           "disk_free_start_bytes": free, "dir": str(root), "nice": args.nice,
           "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results = []
    try:
        for label, rows, spec, phases, q64 in plan:
            results.append(bench_one(root, label, rows, spec, phases, q64, args.memory_budget, args.nice, args.quick))
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"bench_scale: interrupted ({e or 'Ctrl-C'}); indexes removed; finished phases are in {phases_log}",
              file=sys.stderr)
        sys.exit(130)
    env["load_avg_end"] = os.getloadavg()
    env["total_seconds"] = time.perf_counter() - t0
    report = {"environment": env, "indexes": results}
    by = {r["label"]: r for r in results}
    if "main" in by and "compare" in by:
        report["rss_flatness"] = {
            p: {"small_rows": by["compare"]["rows"], "large_rows": by["main"]["rows"],
                "small_MB": by["compare"][p]["rss_peak_MB"], "large_MB": by["main"][p]["rss_peak_MB"],
                "ratio": by["main"][p]["rss_peak_MB"] / by["compare"][p]["rss_peak_MB"]}
            for p in ("write", "verify", "stream", "q1") if p in by["main"] and p in by["compare"]}
        report["rss_flatness"]["verify_child"] = {
            "small_MB": by["compare"]["verify"]["child_rss_peak_MB"], "large_MB": by["main"]["verify"]["child_rss_peak_MB"],
            "ratio": by["main"]["verify"]["child_rss_peak_MB"] / by["compare"]["verify"]["child_rss_peak_MB"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    phases_log.unlink(missing_ok=True)
    print("\n".join(summary_rows(results)))
    for r in results:
        if "q64" in r:
            q = r["q64"]
            print(f"{r['label']}: q64 streamed {q['rows']:,} of {r['rows']:,} rows in {q['passes']} pass(es): a full "
                  f"pass would take ~{r['rows'] / q['rows_per_s'] / 60:.1f} min")
    for p, f in report.get("rss_flatness", {}).items():
        print(f"RSS {p}: {f['small_MB']:.0f} MB -> {f['large_MB']:.0f} MB ({f['ratio']:.3f}x)")
    print(f"total {env['total_seconds']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
