"""Query benchmark: streaming scorer vs a LoGRA-style dense store and vs the paper release's
train-side projection, loader/scorer overlap, and RSS as N grows. One run, side by side.

GPT-2-small-like layer shapes (one transformer block's four Linear/Conv1D kinds), f=4, c=1, bf16.
Queries are random preconditioned gradients: this measures streaming + scoring, the part that
grows with N (query gradients and preconditioning cost the same for every method).

    python benchmarks/bench_query.py                  # N = 100k (LoRIF), dense compared at 10k rows
    python benchmarks/bench_query.py --quick
    python benchmarks/bench_query.py --gpu-quick      # --quick on CUDA, plus the scorer's GEMM efficiency
Writes benchmarks/results/query.json (query_gpu_quick.json for --gpu-quick).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sys
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import PeakRSS  # noqa: E402
from bench_store import GPT2_LAYERS, make_block  # noqa: E402
from lorif_stream.config import QueryConfig
from lorif_stream.query import BlockLoader, TopK, score_layer, _stream_scores
from lorif_stream.store import IndexLayout, IndexReader, IndexWriter, LayerShape

DEV = torch.device("cpu")


def write_index(path: Path, rows: int, block: int = 2048) -> None:
    layout = IndexLayout(tuple(LayerShape(n, o, i) for n, o, i in GPT2_LAYERS), c=1, dtype="bf16", block_size=block)
    rng = torch.Generator().manual_seed(0)
    with IndexWriter.create(path, layout, {}, durability="nosync") as w:
        for first in range(0, rows, block):
            n = min(block, rows - first)
            w.append(first, make_block(rng, n), [str(first + i) for i in range(n)])


def write_dense(path: Path, rows: int, block: int = 256) -> int:
    D = sum(o * i for _, o, i in GPT2_LAYERS)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(rows, D))
    rng = torch.Generator().manual_seed(0)
    for first in range(0, rows, block):
        n = min(block, rows - first)
        g = torch.cat([torch.bmm(torch.from_numpy(L), torch.from_numpy(R).transpose(1, 2)).reshape(n, -1)
                       for L, R in make_block(rng, n)], 1)
        mm[first:first + n] = g.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    mm.flush()
    return D


def queries(Q: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(Q, o, i, generator=g) for _, o, i in GPT2_LAYERS]


def warm(path: Path):
    for f in Path(path).glob("*") if Path(path).is_dir() else [Path(path)]:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def time_lorif(path: Path, H, k: int = 10, **opts) -> tuple[float, dict]:
    with IndexReader(path) as r, r.snapshot() as snap:
        stats = {"read_seconds": 0.0, "score_seconds": 0.0, "bytes_read": 0}
        cfg = QueryConfig(top_k=k, device=DEV.type, **opts)
        H = [h.to(DEV) for h in H]
        _sync()
        t = time.perf_counter()
        _stream_scores(snap, H, list(range(len(GPT2_LAYERS))), DEV, cfg, None, 0, stats, progress=False)
        _sync()
        return time.perf_counter() - t, stats


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize(DEV)


def peak_matmul_flops(n: int = 8192) -> float:
    """Achieved fp32 FLOP/s of one large square matmul on DEV: the device's practical peak."""
    a = torch.randn(n, n, device=DEV)
    for _ in range(2):
        a @ a
    _sync()
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    _sync()
    return 5 * 2 * n ** 3 / (time.perf_counter() - t)


def time_loader_only(path: Path) -> float:
    with IndexReader(path) as r, r.snapshot() as snap:
        _sync()
        t = time.perf_counter()
        for _ in BlockLoader(snap, list(range(len(GPT2_LAYERS))), DEV, threads=0):
            pass
        _sync()  # the last block's host->device copy is part of loading it
        return time.perf_counter() - t


def time_score_only(path: Path, H) -> float:
    """Scoring alone: the same blocks, decoded beforehand (as many as fit comfortably, scaled)."""
    with IndexReader(path) as r, r.snapshot() as snap:
        blocks = []
        for first, n, factors in BlockLoader(snap, list(range(len(GPT2_LAYERS))), DEV, threads=0):
            blocks.append((first, n, [(L.clone(), R.clone()) for L, R in factors]))
            if len(blocks) >= 8:
                break
        rows_seen = sum(b[1] for b in blocks)
        H = [h.to(DEV) for h in H]
        top = TopK(H[0].shape[0], 10, DEV)
        _sync()
        t = time.perf_counter()
        for first, n, factors in blocks:
            top.update(sum(score_layer(h, L, R) for h, (L, R) in zip(H, factors)), first)
        _sync()
        return (time.perf_counter() - t) * snap.rows / rows_seen


def time_dense(path: Path, H, rows: int, block: int = 512) -> float:
    """LoGRA-style: read the dense D-dim projected gradients (bf16), widen, one GEMM per block."""
    Hd = torch.cat([h.reshape(h.shape[0], -1) for h in H], 1).to(DEV)
    mm = np.load(path, mmap_mode="r")
    top = TopK(Hd.shape[0], 10, DEV)
    _sync()
    t = time.perf_counter()
    for first in range(0, rows, block):
        n = min(block, rows - first)
        G = torch.from_numpy(np.array(mm[first:first + n]).view(np.int16)).view(torch.bfloat16).to(DEV).float()
        top.update(Hd @ G.T, first)
    _sync()
    return time.perf_counter() - t


def time_train_side(path: Path, V, Q: int) -> float:
    """The paper release: project every training example's factors on the top-r eigenvectors
    (c·D·r per example), then score in the r-dim space."""
    V = [v.to(DEV) for v in V]
    aq = [torch.randn(Q, v.shape[0]).to(DEV) for v in V]
    with IndexReader(path) as r, r.snapshot() as snap:
        top = TopK(Q, 10, DEV)
        _sync()
        t = time.perf_counter()
        for first, n, factors in BlockLoader(snap, list(range(len(GPT2_LAYERS))), DEV, threads=1):
            s = 0
            for a, v, (L, R) in zip(aq, V, factors):
                # v: (r, d_out, d_in); a_i = Σ_c L_c^T v R_c
                T = torch.einsum("nac,rab->ncrb", L, v)
                ai = torch.einsum("ncrb,nbc->nr", T, R)
                s = s + a @ ai.T
            top.update(s, first)
        _sync()
        return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dense-rows", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="20k rows, dense 2k, fewer configurations")
    ap.add_argument("--gpu-quick", action="store_true", help="--quick on CUDA, plus GEMM efficiency of the scorer")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (LoRIF and both baselines, so that each "
                    "comparison is on one device)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    global DEV
    if args.gpu_quick:
        args.quick, args.device = True, "cuda"
    DEV = torch.device(args.device)
    args.out = args.out or str(Path(__file__).parent / "results" / ("query_gpu_quick.json" if args.gpu_quick else "query.json"))
    if args.quick:
        args.rows, args.dense_rows = 20_000, 2_000
    root = Path(tempfile.mkdtemp(prefix="lorif-bq-", dir=args.dir))
    res: dict = {"rows": args.rows, "dense_rows": args.dense_rows, "device": str(DEV),
                 "gpu": torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else None}
    try:
        small, big = root / "small", root / "big"
        write_index(small, args.dense_rows)
        write_index(big, args.rows)
        write_dense(root / "dense.npy", args.dense_rows)
        res["disk_bytes_per_example"] = {
            "lorif": IndexReader(small).factor_bytes() / args.dense_rows,
            "dense": os.path.getsize(root / "dense.npy") / args.dense_rows,
        }
        # (a) vs dense, equal N, warm page cache for both
        warm(small), warm(root / "dense.npy")
        res["vs_dense"] = {}
        for Q in (1, 64):
            H = queries(Q)
            t_l, _ = time_lorif(small, H)
            t_d = time_dense(root / "dense.npy", H, args.dense_rows)
            res["vs_dense"][Q] = {"lorif_s": t_l, "dense_s": t_d, "speedup": t_d / t_l}
        # (b) vs train-side projection at r in {512, 2048}
        warm(big)
        res["vs_train_side"] = {}
        for r in ((512,) if args.quick else (512, 2048)):
            g = torch.Generator().manual_seed(2)
            V = [torch.randn(r, o, i, generator=g) / (o * i) ** 0.5 for _, o, i in GPT2_LAYERS]
            for Q in (1, 64):
                H = queries(Q)
                t_l, _ = time_lorif(big, H)
                t_t = time_train_side(big, V, Q)
                res["vs_train_side"][f"r={r},Q={Q}"] = {"lorif_s": t_l, "train_side_s": t_t, "speedup": t_t / t_l}
        # (c) overlap of decoding and scoring (Q = 64: both sides take time)
        H = queries(64)
        t_load = time_loader_only(big)
        t_score = time_score_only(big, H)
        t_wall, stats = time_lorif(big, H)
        res["overlap"] = {"load_decode_s": t_load, "score_s": t_score, "wall_s": t_wall,
                          "wall_over_max": t_wall / max(t_load, t_score),
                          "read_GBps_compressed": stats["bytes_read"] / t_load / 1e9 if stats.get("bytes_read") else None}
        if args.gpu_quick:
            # factored scoring does 2·Q·c·(d_out·d_in) flops per row and layer (H R, then with L)
            flops = 2 * 64 * 1 * sum(o * i for _, o, i in GPT2_LAYERS) * args.rows
            peak = peak_matmul_flops()
            res["gemm"] = {"score_TFLOPs": flops / t_score / 1e12, "peak_matmul_TFLOPs": peak / 1e12,
                           "efficiency": flops / t_score / peak}
        # (d) RSS as N grows 10x
        res["rss"] = {}
        for name, path, n in (("N", small, args.dense_rows), ("10N", big, args.rows)):
            with PeakRSS() as rss:
                time_lorif(path, queries(1))
            res["rss"][name] = {"rows": n, "peak_MB": rss.peak / 1e6, "growth_MB": (rss.peak - rss.base) / 1e6}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"disk bytes/example: LoRIF {res['disk_bytes_per_example']['lorif']:,.0f}, dense {res['disk_bytes_per_example']['dense']:,.0f} "
          f"({res['disk_bytes_per_example']['dense'] / res['disk_bytes_per_example']['lorif']:.0f}x)")
    for Q, r in res["vs_dense"].items():
        print(f"(a) Q={Q:>3}: LoRIF {r['lorif_s']:.2f}s  dense {r['dense_s']:.2f}s  -> {r['speedup']:.1f}x faster ({args.dense_rows:,} rows)")
    for key, r in res["vs_train_side"].items():
        print(f"(b) {key}: LoRIF {r['lorif_s']:.2f}s  train-side {r['train_side_s']:.2f}s  -> {r['speedup']:.1f}x faster ({args.rows:,} rows)")
    o = res["overlap"]
    print(f"(c) load+decode {o['load_decode_s']:.2f}s, score {o['score_s']:.2f}s, together {o['wall_s']:.2f}s "
          f"= {o['wall_over_max']:.2f} x max")
    if "gemm" in res:
        g = res["gemm"]
        print(f"(e) scoring {g['score_TFLOPs']:.2f} TFLOP/s = {g['efficiency']:.1%} of a large fp32 matmul's "
              f"{g['peak_matmul_TFLOPs']:.1f} TFLOP/s on {res['gpu']}")
    print(f"(d) RSS peak {res['rss']['N']['peak_MB']:.0f} MB at {res['rss']['N']['rows']:,} rows, "
          f"{res['rss']['10N']['peak_MB']:.0f} MB at {res['rss']['10N']['rows']:,} rows")


if __name__ == "__main__":
    main()
