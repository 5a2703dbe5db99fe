"""Build benchmark: engine overhead over a bare capture loop, examples/s, RSS as N grows,
the share of the fused single-pass sketch, q=0 vs q=3 score agreement, and append cost.

Model: a random tiny GPT-2 (2 layers, width 128, vocab 512, eager attention) on random token
sequences of 64 tokens, f=4, c=1, bf16, on the CPU (or --device cuda).

    python benchmarks/bench_build.py            # N = 10k and 100k
    python benchmarks/bench_build.py --quick    # N = 2k and 10k
Writes benchmarks/results/build.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _memory import PeakRSS  # noqa: E402

import lorif_stream as ls  # noqa: E402
from lorif_stream.factorize import factorize  # noqa: E402
from lorif_stream.gradients import GradientSource  # noqa: E402
from lorif_stream.projection import ProjectionSpec  # noqa: E402

SEQ, VOCAB = 64, 512


class TokensTask:
    """Random token sequences through a random tiny GPT-2 (rows [start, start + n))."""

    tracked_modules = None

    def __init__(self, n: int, start: int = 0, n_queries: int = 16):
        self.n, self.start, self.n_queries = n, start, n_queries

    def model(self):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                         attn_implementation="eager")
        return GPT2LMHeadModel(cfg)

    def _tokens(self, i: int):
        return torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(1000003 * i + 7))

    def train_examples(self):
        return _Lazy(self.n, lambda j: self._tokens(self.start + j))

    def query_examples(self):
        return _Lazy(self.n_queries, lambda j: self._tokens(-1 - j))

    def collate(self, examples):
        return torch.stack(examples)

    def loss(self, model, batch):
        logits = model(input_ids=batch).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1), reduction="none")
        return ce.view(batch.shape[0], -1).sum(1)

    def example_id(self, example, index):
        return str(self.start + index)


class _Lazy:
    def __init__(self, n, fn):
        self.n, self.fn = n, fn

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.fn(i)


def bare_loop(task: TokensTask, n: int, batch_size: int, device) -> float:
    """The same forward/backward + capture + factorization, nothing stored: the floor for build."""
    source = GradientSource.open(task, ProjectionSpec(f=4), device)
    examples = task.train_examples()
    t = time.perf_counter()
    with source.capture() as cap:
        for s in range(0, n, batch_size):
            batch = [examples[i] for i in range(s, min(n, s + batch_size))]
            grads, _ = source.projected_gradients(cap, batch, [str(i) for i in range(len(batch))])
            for G in grads:
                L, R = factorize(G, 1)
                L.to(torch.bfloat16), R.to(torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sketch-rank", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "build.json"))
    args = ap.parse_args()
    small, large = (2_000, 10_000) if args.quick else (10_000, 100_000)
    device = torch.device(args.device)
    opts = dict(f=4, rank=1, dtype="bf16", batch_size=args.batch_size, device=args.device,
                sketch_rank=args.sketch_rank, progress=False)
    root = Path(tempfile.mkdtemp(prefix="lorif-bb-"))
    res: dict = {"device": args.device, "N": [small, large]}
    try:
        # warm-up (numba, model init), then overhead at N = small, measured side by side
        ls.build(TokensTask(256), root / "warm", **opts)
        t_bare = bare_loop(TokensTask(small), small, args.batch_size, device)
        with PeakRSS() as rss_small:
            r_small = ls.build(TokensTask(small), root / "small", **opts)
        res["overhead"] = {"bare_loop_s": t_bare, "build_s": r_small.seconds, "ratio": r_small.seconds / t_bare,
                           "sketch_s": r_small.sketch_seconds, "sketch_share": r_small.sketch_seconds / r_small.seconds,
                           "examples_per_s": small / r_small.seconds}
        with PeakRSS() as rss_large:
            r_large = ls.build(TokensTask(large), root / "large", **opts)
        res["rss"] = {"N_small": small, "peak_MB_small": rss_small.peak / 1e6, "growth_MB_small": (rss_small.peak - rss_small.base) / 1e6,
                      "N_large": large, "peak_MB_large": rss_large.peak / 1e6, "growth_MB_large": (rss_large.peak - rss_large.base) / 1e6}
        res["large"] = {"build_s": r_large.seconds, "examples_per_s": large / r_large.seconds,
                        "bytes_per_example": ls.info(root / "large")["bytes_per_example"]}
        # q = 0 (fused into the build) vs q = 3 refinement: do the scores agree?
        q = TokensTask(small)
        ls.query(q, root / "small", None, root / "q0.npy", top_k=10, device=args.device, progress=False)
        t = time.perf_counter()
        ls.fit(root / "small", sketch_rank=args.sketch_rank, refine=3, device=args.device, progress=False)
        refine_s = time.perf_counter() - t
        ls.query(q, root / "small", None, root / "q3.npy", top_k=10, device=args.device, progress=False)
        s0, s3 = np.load(root / "q0.npy"), np.load(root / "q3.npy")
        rhos = [spearman(s0[i], s3[i]) for i in range(s0.shape[0])]
        res["q0_vs_q3"] = {"spearman_mean": float(np.mean(rhos)), "spearman_min": float(np.min(rhos)),
                           "refine3_s": refine_s}
        # append 1% to the large index vs its full build
        t = time.perf_counter()
        ls.append(TokensTask(large // 100, start=large), root / "large", f=4, rank=1, dtype="bf16",
                  batch_size=args.batch_size, device=args.device, progress=False)
        append_s = time.perf_counter() - t
        res["append_1pct"] = {"append_s": append_s, "build_s": r_large.seconds, "ratio": append_s / r_large.seconds}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    o, r = res["overhead"], res["rss"]
    print(f"overhead: build {o['build_s']:.1f}s / bare loop {o['bare_loop_s']:.1f}s = {o['ratio']:.3f} "
          f"({o['examples_per_s']:.0f} ex/s at N={small:,}); fused sketch {o['sketch_share'] * 100:.1f}% of build")
    print(f"N={large:,}: {res['large']['examples_per_s']:.0f} ex/s, {res['large']['bytes_per_example']:.0f} B/example")
    print(f"peak RSS: {r['peak_MB_small']:.0f} MB at N={small:,}, {r['peak_MB_large']:.0f} MB at N={large:,} "
          f"(growth {r['growth_MB_small']:.0f} / {r['growth_MB_large']:.0f} MB)")
    print(f"q=0 vs q=3 scores: Spearman mean {res['q0_vs_q3']['spearman_mean']:.4f}, min {res['q0_vs_q3']['spearman_min']:.4f}")
    print(f"append 1%: {res['append_1pct']['append_s']:.1f}s = {res['append_1pct']['ratio'] * 100:.1f}% of the full build")


if __name__ == "__main__":
    main()
