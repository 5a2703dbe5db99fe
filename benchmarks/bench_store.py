"""Store benchmark: bytes on disk, write and read+decode throughput, reading RSS.

GPT-2-small-like layer shapes (the four Linear/Conv1D kinds of one transformer block) at f=4,
c=1, bf16, side by side in one run with
  * a plain .npy memmap of the same bf16 factors (no compression, no container), and
  * a dense LoGRA-style store of the D-dimensional projected gradients (bf16 memmap),
    measured on fewer rows (it is ~150x larger) and reported per example.

    python benchmarks/bench_store.py                 # N = 200,000 rows
    python benchmarks/bench_store.py --rows 20000    # quicker
Writes benchmarks/results/store.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import PeakRSS  # noqa: E402
from lorif_stream.store import BlockBuffers, BlockDecoder, IndexLayout, IndexReader, IndexWriter, LayerShape
from lorif_stream.store.sink import BlockSink

# (name, d_out, d_in) of GPT-2 small's c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj at f = 4
GPT2_LAYERS = [("attn.c_attn", 576, 192), ("attn.c_proj", 192, 192), ("mlp.c_fc", 768, 192), ("mlp.c_proj", 192, 768)]


def make_block(rng: torch.Generator, n: int, c: int = 1):
    out = []
    for _, d_out, d_in in GPT2_LAYERS:
        # L carries the singular values (log-normal spread), R is unit-norm
        s = torch.exp(torch.randn(n, 1, c, generator=rng) * 1.5 - 6)
        L = (torch.randn(n, d_out, c, generator=rng) / d_out ** 0.5 * s).numpy()
        R = torch.randn(n, d_in, c, generator=rng)
        R = (R / R.norm(dim=1, keepdim=True)).numpy()
        out.append((L, R))
    return out


def drop_nothing_warm_read(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(64 << 20):
            pass


def bench_index(root: Path, rows: int, block: int, threads: int) -> dict:
    layout = IndexLayout(tuple(LayerShape(n, o, i) for n, o, i in GPT2_LAYERS), c=1, dtype="bf16", block_size=block)
    raw_per_example = layout.values_per_example() * 2
    path = root / "index"
    rng = torch.Generator().manual_seed(0)
    # a pool of distinct blocks reused in turn: the timed loop is the write path alone
    pool = [make_block(rng, block) for _ in range(8)]
    with IndexWriter.create(path, layout, {}, durability="nosync") as w:
        sink = BlockSink(w)
        t = time.perf_counter()
        for j, first in enumerate(range(0, rows, block)):
            n = min(block, rows - first)
            sink.put(first, [(L[:n], R[:n]) for L, R in pool[j % len(pool)]], [str(first + i) for i in range(n)])
        sink.drain()
        sink.close()
        write_s = time.perf_counter() - t
        t = time.perf_counter()
    fsync_s = time.perf_counter() - t  # closing fsyncs the whole file once (durability "nosync")
    drop_nothing_warm_read(path / "data.mdb")
    reader = IndexReader(path)
    factor_bytes = reader.factor_bytes()

    def read_all(n_threads: int) -> float:
        with reader.snapshot() as snap:
            if n_threads <= 1:
                bufs, dec = BlockBuffers(layout), BlockDecoder()
                t = time.perf_counter()
                for _ in snap.blocks(buffers=bufs, decoder=dec):
                    pass
                return time.perf_counter() - t
            # layers decoded in parallel threads (zstd and numba release the GIL)
            work = [(li, fr, v) for li in range(len(GPT2_LAYERS)) for fr, v in snap.layer_values(li)]
            chunks = [work[i::n_threads] for i in range(n_threads)]

            def run(items):
                bufs, dec = BlockBuffers(layout), BlockDecoder()
                for li, fr, v in items:
                    snap.decode(li, fr, v, bufs, dec)

            ts = [threading.Thread(target=run, args=(c,)) for c in chunks]
            t = time.perf_counter()
            [x.start() for x in ts]
            [x.join() for x in ts]
            return time.perf_counter() - t

    read_all(1)  # warm numba and the page cache
    with PeakRSS() as rss:
        read1 = read_all(1)
    readN = read_all(threads)
    reader.close()
    decoded_bytes = rows * layout.values_per_example() * 4
    return {
        "rows": rows,
        "bytes_per_example": factor_bytes / rows,
        "bytes_per_example_layer": factor_bytes / rows / len(GPT2_LAYERS),
        "raw_bf16_bytes_per_example": raw_per_example,
        "ratio_to_raw_bf16": factor_bytes / rows / raw_per_example,
        "write_MBps_raw_bf16": rows * raw_per_example / write_s / 1e6,
        "write_MBps_raw_bf16_incl_final_fsync": rows * raw_per_example / (write_s + fsync_s) / 1e6,
        "read_decode_GBps_fp32_1thread": decoded_bytes / read1 / 1e9,
        f"read_decode_GBps_fp32_{threads}threads": decoded_bytes / readN / 1e9,
        "read_rss_peak_MB": rss.peak / 1e6,
        "read_rss_growth_MB": (rss.peak - rss.base) / 1e6,
    }


def bench_npy(root: Path, rows: int, block: int) -> dict:
    per_ex = sum(o + i for _, o, i in GPT2_LAYERS)
    path = root / "factors.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(rows, per_ex))
    rng = torch.Generator().manual_seed(0)
    write_s = 0.0
    for first in range(0, rows, block):
        n = min(block, rows - first)
        flat = np.concatenate([np.concatenate([L.reshape(n, -1), R.reshape(n, -1)], 1) for L, R in make_block(rng, n)], 1)
        t = time.perf_counter()
        mm[first:first + n] = torch.from_numpy(flat).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        write_s += time.perf_counter() - t
    mm.flush()  # msync of the dirty pages, like the index's final fsync: not counted on either side
    del mm
    drop_nothing_warm_read(path)
    mm = np.load(path, mmap_mode="r")
    out = np.empty((block, per_ex), np.float32)
    with PeakRSS() as rss:
        t = time.perf_counter()
        for first in range(0, rows, block):
            n = min(block, rows - first)
            out[:n] = torch.from_numpy(np.asarray(mm[first:first + n]).view(np.int16)).view(torch.bfloat16).float().numpy()
        read_s = time.perf_counter() - t
    return {
        "rows": rows,
        "bytes_per_example": os.path.getsize(path) / rows,
        "write_MBps_raw_bf16": rows * per_ex * 2 / write_s / 1e6,
        "read_decode_GBps_fp32_1thread": rows * per_ex * 4 / read_s / 1e9,
        "read_rss_peak_MB": rss.peak / 1e6,
        "read_rss_growth_MB": (rss.peak - rss.base) / 1e6,
    }


def bench_dense(root: Path, rows: int, block: int) -> dict:
    D = sum(o * i for _, o, i in GPT2_LAYERS)
    path = root / "dense.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(rows, D))
    rng = torch.Generator().manual_seed(0)
    write_s = 0.0
    for first in range(0, rows, block):
        n = min(block, rows - first)
        g = torch.cat([torch.bmm(torch.from_numpy(L), torch.from_numpy(R).transpose(1, 2)).reshape(n, -1)
                       for L, R in make_block(rng, n)], 1)
        t = time.perf_counter()
        mm[first:first + n] = g.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        write_s += time.perf_counter() - t
    t = time.perf_counter()
    mm.flush()
    del mm
    write_s += time.perf_counter() - t
    drop_nothing_warm_read(path)
    mm = np.load(path, mmap_mode="r")
    with PeakRSS() as rss:
        t = time.perf_counter()
        for first in range(0, rows, block):
            n = min(block, rows - first)
            torch.from_numpy(np.asarray(mm[first:first + n]).view(np.int16)).view(torch.bfloat16).float()
        read_s = time.perf_counter() - t
    return {
        "rows": rows,
        "bytes_per_example": os.path.getsize(path) / rows,
        "write_MBps_raw_bf16": rows * D * 2 / write_s / 1e6,
        "read_decode_GBps_fp32_1thread": rows * D * 4 / read_s / 1e9,
        "read_rss_peak_MB": rss.peak / 1e6,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dense-rows", type=int, default=2_000)
    ap.add_argument("--block", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "store.json"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lorif-bench-", dir=args.dir))
    try:
        res = {
            "lorif_index": bench_index(root, args.rows, args.block, args.threads),
            "npy_memmap_factors": bench_npy(root, args.rows, args.block),
            "dense_logra_memmap": bench_dense(root, args.dense_rows, 256),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"{'store':22s} {'rows':>8s} {'B/example':>10s} {'write MB/s':>11s} {'read GB/s':>10s} {'read RSS MB':>12s}")
    for name, r in res.items():
        print(f"{name:22s} {r['rows']:>8,} {r['bytes_per_example']:>10,.0f} {r['write_MBps_raw_bf16']:>11,.0f} "
              f"{r['read_decode_GBps_fp32_1thread']:>10.2f} {r['read_rss_peak_MB']:>12,.0f}")
    li = res["lorif_index"]
    print(f"index: {li['ratio_to_raw_bf16']:.3f}x raw bf16, {li['bytes_per_example_layer']:.0f} B per example-layer, "
          f"read+decode {li[f'read_decode_GBps_fp32_{args.threads}threads']:.2f} GB/s with {args.threads} threads; "
          f"dense store is {res['dense_logra_memmap']['bytes_per_example'] / li['bytes_per_example']:.0f}x larger per example")


if __name__ == "__main__":
    main()
