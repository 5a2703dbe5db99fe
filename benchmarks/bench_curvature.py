"""Curvature benchmark: accuracy, time and memory of the streaming sketch + refinement passes.

Synthetic rank-c factor blocks with a decaying (power-law, Kronecker-structured) spectrum,
streamed block by block, at D in {1e4, 3e4, 1e5}. For each D, side by side in one run:
  * ours: the single-pass Nystrom sketch fed during the build (1 pass), then q = 0..4 refinement
    passes finalized by Rayleigh-Ritz ("rr") or by Nystrom on the last pass ("nystrom");
  * the paper release's scheme: after the build, 5 passes over the data
    (Y = A Omega, 3 power iterations, 1 Rayleigh-Ritz pass).
Metrics vs the exact top-r eigenpairs of A: max / median relative eigenvalue error over the top r,
largest principal angle between the top-r subspaces, wall time, resident sketch memory
(D*k*4 bytes) and the peak RSS increase (psutil, sampled every 5 ms) while a method runs.

Exact reference without a D x D matrix: with N rows, A = G^T G shares its nonzero spectrum with
the N x N kernel K = G G^T, computed from the factors (K_ij = <L_i^T L_j, R_i^T R_j>); the top-r
eigenvectors are G^T U S^-1, one streamed pass. Needs N <= --exact-max-rows (eigh of K); above
that the reference is our own q = --ref-passes Nystrom-finalized run (reported as such).

    python benchmarks/bench_curvature.py            # D = 1e4, 3e4, 1e5 (~ a few minutes on 2 cores)
    python benchmarks/bench_curvature.py --quick    # D = 1e4, 3e4, smaller N and r (< 1 minute)
Writes benchmarks/results/curvature.json (--quick: curvature_quick.json, so it never clobbers a full run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

try:
    from lorif_stream.sketch import (LayerSketch, apply_curvature, gaussian_test_matrix, nystrom_eig,
                                     orthonormalize, rayleigh_ritz, refine)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lorif_stream.sketch import (LayerSketch, apply_curvature, gaussian_test_matrix, nystrom_eig,
                                     orthonormalize, rayleigh_ritz, refine)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import PeakRSS  # noqa: E402

# D -> (d_out, d_in)
SHAPES = {10_000: (100, 100), 30_000: (200, 150), 100_000: (400, 250)}


class SyntheticLayer:
    """N examples of one layer as factor blocks, regenerated deterministically on every pass.

    L_i = diag(a) Z_i, R_i = diag(b) W_i with Gaussian Z, W and power-law a_j = j^-alpha,
    b_j = j^-beta: E[g g^T] = diag(a^2) (x) diag(b^2) (summed over c), a decaying spectrum like
    K-FAC's; the finite sample of N rows makes A's spectrum a noisy version of it.
    """

    def __init__(self, d_out, d_in, rows, c, block, alpha, beta, seed, device):
        self.d_out, self.d_in, self.rows, self.c, self.block = d_out, d_in, rows, c, block
        self.a = torch.arange(1, d_out + 1, dtype=torch.float32) ** -alpha
        self.b = torch.arange(1, d_in + 1, dtype=torch.float32) ** -beta
        self.seed, self.device = seed, device

    @property
    def D(self):
        return self.d_out * self.d_in

    def blocks(self):
        for i, s in enumerate(range(0, self.rows, self.block)):
            n = min(self.block, self.rows - s)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            L = torch.randn(n, self.d_out, self.c, generator=g) * self.a[None, :, None]
            R = torch.randn(n, self.d_in, self.c, generator=g) * self.b[None, :, None]
            yield L.to(self.device), R.to(self.device)


@torch.no_grad()
def exact_top(layer: SyntheticLayer, r: int):
    """Top-r eigenpairs of A via the N x N kernel (fp64); never forms A or G."""
    Ls, Rs = zip(*[(L.double().cpu(), R.double().cpu()) for L, R in layer.blocks()])
    L = torch.cat(Ls).permute(0, 2, 1)        # (N, c, d_out)
    R = torch.cat(Rs).permute(0, 2, 1)
    N, c = L.shape[0], L.shape[1]
    K = torch.zeros(N, N, dtype=torch.float64)
    for a in range(c):
        for b in range(c):
            K += (L[:, a] @ L[:, b].t()) * (R[:, a] @ R[:, b].t())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # threaded LAPACK eigh collapses on a busy machine (seconds -> minutes)
    try:
        ev, U = torch.linalg.eigh(K)
    finally:
        torch.set_num_threads(threads)
    ev, U = ev.flip(0)[:r], U.flip(1)[:, :r]
    # v_j = G^T u_j / sqrt(ev_j), accumulated block by block.
    V = torch.zeros(layer.D, r, dtype=torch.float64)
    s = 0
    for Lb, Rb in layer.blocks():
        n = Lb.shape[0]
        G = torch.bmm(Lb.double().cpu(), Rb.double().cpu().transpose(1, 2)).reshape(n, -1)
        V += G.t() @ U[s:s + n]
        s += n
    V /= ev.sqrt()
    return ev, V


@torch.no_grad()
def paper_five_pass(layer: SyntheticLayer, k: int, r: int, seed: int):
    """The paper release's scheme, all passes after the build: A Omega, 3 power its, Rayleigh-Ritz."""
    Q = orthonormalize(apply_curvature(gaussian_test_matrix(layer.D, k, seed, layer.device), layer.blocks()))
    for _ in range(3):
        Q = orthonormalize(apply_curvature(Q, layer.blocks()))
    sigma2, V = rayleigh_ritz(Q, apply_curvature(Q, layer.blocks()))
    return sigma2[:r], V[:, :r]


def compare(sigma2, V, ev, EV):
    r = ev.shape[0]
    e = ((sigma2.double().cpu() - ev) / ev).abs()
    M = EV.t() @ V.double().cpu()
    angle = lambda m: math.degrees(math.acos(min(1.0, float(torch.linalg.svdvals(M[:m, :m]).min()))))
    return {"max_rel_err": float(e.max()), "median_rel_err": float(e.median()),
            "max_angle_deg": angle(r), "max_angle_half_deg": angle(max(1, r // 2))}


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with PeakRSS() as rss:
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
    return out, dt, rss.delta


@torch.no_grad()
def refine_all_q(V0, layer, max_q, r, measure):
    """Every q = 1..max_q of ``refine`` (both finalizations) from one run of max_q passes.

    refine(V0, q) is a prefix of refine(V0, max_q) (same Q sequence), so the estimate and time of
    each q are read off after its pass: time(q) = passes 1..q + that finalization. Checked
    against the public ``refine`` at the first D. ``measure(s2, V)`` turns an estimate into
    metrics right away, so no extra D x r arrays pile up in the RSS.
    """
    Q = orthonormalize(V0)
    out, t_passes = {}, 0.0
    for q in range(1, max_q + 1):
        t = time.perf_counter()
        Z = apply_curvature(Q, layer.blocks())
        t_passes += time.perf_counter() - t
        for fin in ("rr", "nystrom"):
            t = time.perf_counter()
            if fin == "rr":
                s2, V = rayleigh_ritz(Q, Z)
                s2, V = s2[:r], V[:, :r]
            else:
                s2, V = nystrom_eig(Z, Q, r)
            dt = time.perf_counter() - t
            out[(q, fin)] = (measure(s2, V), t_passes + dt, s2)
            del V
        if q < max_q:
            t = time.perf_counter()
            Q = orthonormalize(Z, fill_seed=q - 1)
            t_passes += time.perf_counter() - t
        del Z
    return out


def bench_dim(D, args, device, check_refine):
    d_out, d_in = SHAPES[D]
    layer = SyntheticLayer(d_out, d_in, args.rows, args.c, args.block, args.alpha, args.beta, seed=D, device=device)
    r, k = args.rank, args.rank + args.oversample
    print(f"\nD={D:,} ({d_out}x{d_in}), N={args.rows:,}, c={args.c}, r={r}, k={k}", flush=True)

    def build():
        s = LayerSketch(D=D, k=k, seed=1, device=device)
        for L, R in layer.blocks():
            s.update(L, R)
        return s

    sketch, t_build, rss_build = timed(build)
    omega = sketch.omega()
    sketch_mb = sketch.nbytes / 2**20
    (_, V0), t_v0, _ = timed(lambda: nystrom_eig(sketch.Y, omega, k))   # shared start of every q >= 1

    t = time.perf_counter()
    if args.rows <= args.exact_max_rows:
        ev, EV = exact_top(layer, r)
        reference = "exact (N x N kernel eigh, fp64)"
    else:
        ev, EV = refine(V0, layer.blocks, args.ref_passes, r, finalize="nystrom")
        ev, EV = ev.double().cpu(), EV.double().cpu()
        reference = f"ours, q={args.ref_passes} nystrom (not exact: N > --exact-max-rows)"
    print(f"  reference: {reference} ({time.perf_counter() - t:.1f}s); lambda_r/lambda_1 = {float(ev[-1] / ev[0]):.3g}",
          flush=True)
    measure = lambda s2, V: compare(s2, V, ev, EV)

    runs = []   # (who, name, passes after build, metrics, seconds after build, peak RSS delta)
    (s2, V), dt, rss = timed(lambda: nystrom_eig(sketch.Y, omega, r))
    runs.append(("ours", "q=0 (single pass)", 0, measure(s2, V), dt, rss))
    del s2, V
    all_q, _, rss = timed(lambda: refine_all_q(V0, layer, args.max_q, r, measure))
    for (q, fin), (m, dt, _) in all_q.items():
        runs.append(("ours", f"q={q} {fin}", q, m, dt + t_v0, rss))
    if check_refine:
        s2, _ = refine(V0, layer.blocks, args.max_q, r, finalize="nystrom")
        assert torch.allclose(s2, all_q[(args.max_q, "nystrom")][2], rtol=1e-4), \
            "refine() disagrees with the incremental measurement"
    del all_q, V0
    (s2, V), dt, rss = timed(lambda: paper_five_pass(layer, k, r, seed=1))
    runs.append(("paper", "5-pass (A.Omega + 3 power + RR)", 5, measure(s2, V), dt, rss))
    del s2, V

    rows = []
    for who, name, passes, m, dt, rss in runs:
        ours = who == "ours"
        rows.append({"D": D, "d_out": d_out, "d_in": d_in, "rows": args.rows, "c": args.c, "r": r, "k": k,
                     "method": f"{who} {name}", "passes_after_build": passes, "passes_total": passes + ours,
                     **m, "time_after_build_s": dt, "time_total_s": dt + (t_build if ours else 0.0),
                     "build_pass_s": t_build if ours else None, "sketch_mb": sketch_mb,
                     "peak_rss_delta_mb": max(rss, rss_build if ours else 0) / 2**20, "reference": reference})
        print(f"  {who + ' ' + name:38s} {passes}+{int(ours)} passes  max rel err {m['max_rel_err']:.2e}  "
              f"median {m['median_rel_err']:.2e}  angle r {m['max_angle_deg']:5.1f} r/2 {m['max_angle_half_deg']:5.1f} deg  "
              f"{dt:6.2f}s (+build {t_build if ours else 0:.2f}s)", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="D = 1e4, 3e4 with N = 1500, r = 64 (< 1 minute)")
    ap.add_argument("--dims", default=None, help="comma-separated D values from {10000, 30000, 100000}")
    ap.add_argument("--rows", type=int, default=None, help="N examples (default 4000; quick 1500)")
    ap.add_argument("--rank", type=int, default=None, help="r (default 128; quick 64)")
    ap.add_argument("--oversample", type=int, default=None, help="k = r + oversample (default 3r: the engine's default)")
    ap.add_argument("--c", type=int, default=1, help="rank of the stored factors")
    ap.add_argument("--block", type=int, default=256, help="rows per block")
    ap.add_argument("--alpha", type=float, default=0.6, help="power-law decay of the d_out side")
    ap.add_argument("--beta", type=float, default=0.5, help="power-law decay of the d_in side")
    ap.add_argument("--exact-max-rows", type=int, default=6000, help="largest N for the exact kernel reference")
    ap.add_argument("--ref-passes", type=int, default=8, help="q of the reference when N is too large for exact")
    ap.add_argument("--max-q", type=int, default=4,
                    help="largest q (4 = the paper's pass count: q=4 rr spans the same subspace as its 5-pass)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/curvature.json; --quick: curvature_quick.json)")
    args = ap.parse_args()
    if args.quick:
        dims = [10_000, 30_000]
        args.rows = args.rows or 1500
        args.rank = args.rank or 64
    else:
        dims = [10_000, 30_000, 100_000]
        args.rows = args.rows or 4000
        args.rank = args.rank or 128
    if args.oversample is None:
        args.oversample = 3 * args.rank
    if args.out is None:
        args.out = str(Path(__file__).parent / "results" / ("curvature_quick.json" if args.quick else "curvature.json"))
    if args.dims:
        dims = [int(float(x)) for x in args.dims.split(",")]
    bad = [d for d in dims if d not in SHAPES]
    if bad:
        ap.error(f"--dims {bad} not in {sorted(SHAPES)}")
    device = torch.device(args.device)

    t0 = time.perf_counter()
    results = []
    for i, D in enumerate(dims):
        results.extend(bench_dim(D, args, device, check_refine=(i == 0)))
    wall = time.perf_counter() - t0

    print(f"\n{'D':>7s} {'method':38s} {'passes':>6s} {'max rel err':>11s} {'median':>9s} {'angle r':>7s} "
          f"{'r/2':>5s} {'post-build s':>12s} {'total s':>8s} {'sketch MB':>9s} {'dRSS MB':>8s}")
    for row in results:
        print(f"{row['D']:>7,d} {row['method']:38s} {row['passes_total']:>6d} {row['max_rel_err']:>11.2e} "
              f"{row['median_rel_err']:>9.2e} {row['max_angle_deg']:>7.1f} {row['max_angle_half_deg']:>5.1f} "
              f"{row['time_after_build_s']:>12.2f} {row['time_total_s']:>8.2f} {row['sketch_mb']:>9.1f} "
              f"{row['peak_rss_delta_mb']:>8.0f}")
    print(f"wall {wall:.0f}s")

    out = {
        "command": "python benchmarks/bench_curvature.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"dims": dims},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "device": str(device)},
        "notes": ["q = 1..max_q are read off one run of max_q passes (refine(V0, q) is a prefix of "
                  "refine(V0, max_q)); checked against the public refine() at the first D",
                  "angles: largest principal angle between the estimated and reference top-r (and top-r/2) "
                  "eigenspaces; near-degenerate eigenvalues at the cut make the top-r angle pessimistic",
                  "passes_total counts our build-time sketch pass (it rides along the build's own pass over "
                  "the data); the paper scheme needs all 5 after the build",
                  "peak_rss_delta_mb: peak RSS increase while the method ran (allocator caching can hide reuse)",
                  "sketch_mb: resident Y = D*k*4 bytes; during the build a cached Omega doubles it"],
        "wall_s": wall,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
