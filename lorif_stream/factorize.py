"""Batched rank-c factorisation of projected gradients: ``G ≈ L R^T``.

LoRIF stores, per example and layer, ``L`` (d_out x c) and ``R`` (d_in x c) instead of the
``d_out x d_in`` projected gradient ``G``: ``c (d_in + d_out)`` numbers instead of ``d_in d_out``.
The best rank-c approximation (Eckart-Young) is the truncated SVD; two ways to get it:

* ``"svd"``: ``torch.linalg.svd`` of the whole batch, then truncate. Exact, but it computes all
  ``min(d_out, d_in)`` singular triplets to keep ``c``.
* ``"power"``: block power (subspace) iteration on the top right singular subspace, carrying
  ``OVERSAMPLE`` extra columns, then a Rayleigh-Ritz step (a ``c + OVERSAMPLE`` square
  eigenproblem) -- batched matmuls, orthonormalisations of tall thin blocks, tiny eigh. Where
  the smaller side ``m`` is narrow (:func:`_gram_is_cheaper`), each step multiplies by the
  ``m x m`` Gram ``GᵀG`` (or ``GGᵀ``) formed once, and :func:`factorize_layers` runs every layer
  with that ``m`` through the same calls: a build over a small model factorizes its 9 layers in
  0.76 instead of 2.7 ms per batch of 8 (2 x 64 GPT-2, one thread).

A gradient of a T-token example has rank <= T and its spectrum decays fast, so few iterations
with oversampling reach the optimum: 4 for c=1 and 16 for c>1 (the paper used 8 and 16). Measured
as the worst per-example excess Frobenius error over the SVD optimum, relative to ``|G|``, on the
trained demo GPT-2 (fortunes, 256 examples, 9 layers, f=4) and a random GPT-2-small shape (256
tokens, 16 of its 48 layers): c=1 at 4 iterations 6.8e-6 / 8.1e-8 (at 3: 1.2e-4 / 1.2e-7); c=4
at 8 iterations 1.3e-7 / 1.2e-4, at 16 7.7e-8 / 3.7e-6. bf16 storage then rounds every value by
up to 4e-3, so c=1 stops at 4, which makes the default build's factorisation ~40% cheaper.

Conventions (both methods): ``L`` absorbs the singular values; ``R``'s columns are orthonormal
(for components with a non-zero singular value; the others are arbitrary and carry ``L = 0``);
components come in decreasing singular-value order; each component's sign is fixed so that the
largest-magnitude entry of its ``R`` column is positive; when ``min(d_out, d_in) <= c`` the
result is exact (SVD, zero columns appended when ``c`` exceeds the smaller dimension); a zero
``G`` gives zero ``L`` and a finite ``R``. Each example is factorised independently of its
batch-mates (the power-iteration start is a fixed seeded matrix, not drawn from the batch).

Timings (this repository's shared 2-core CPU, torch 2.13, fp32, ONE thread to dampen the noise
of other jobs, best of 3-7 runs; ms per batch, "svd / power" with power at 8 iterations for c=1, so c=1
now costs about 60% of its column; gradient-like G = sum of 64 token
outer products with a 100x decaying scale):

    d_out x d_in    B    c=1            c=8            c=16           c=32
      48 x 48      64    11.8 / 4.1     11.9 / 8.9     12.0 / 15.5    12.3 / 41.1
      96 x 96      64    33.7 / 12.4    35.3 / 21.5    34.7 / 31.2    34.7 / 67.4
     192 x 192      8    17.5 / 5.4     17.6 / 9.2     17.6 / 11.2    17.7 / 19.6
     192 x 768      8    68.8 / 20.7    69.0 / 33.6    74.4 / 42.0    69.6 / 75.0
     768 x 192      8    40.1 / 20.3    40.0 / 31.3    39.7 / 34.6    40.2 / 54.0
     384 x 384      8    96.7 / 19.6   101.0 / 38.2   106.0 / 39.7    97.2 / 59.5
     384 x 384     64   831.0 / 168.8 1277.1 / 513.5 1209.5 / 687.6  846.7 / 721.9
     768 x 768     16  2289.2 / 215.4 2608.4 / 620.6 2197.6 / 495.4 2253.8 / 1198.1

Accuracy: in every cell the worst per-example Frobenius error of "power" was within 0.001% of
the SVD optimum (without oversampling it was up to 2.7% worse). SVD costs ~d_out d_in min(d)
whatever c; power iteration ~iters d_out d_in (c + OVERSAMPLE) plus an orthonormalisation per
step, so power wins (2-10x at c=1) until c + OVERSAMPLE nears min(d)/4-min(d)/5, where the two
are within ~30% of each other and SVD then takes over. "auto" on CPU therefore picks "power"
when ``4 (c + OVERSAMPLE) <= min(d_out, d_in)``, else "svd". On CUDA it always picks "power"
(not measured here: batched GPU SVD of matrices this size loops over the batch, and the GPU
power path uses only batched GEMM / Cholesky / triangular-solve / small-eigh kernels).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .gpu import exact

__all__ = ["METHODS", "OVERSAMPLE", "power_iterations", "factorize", "factorize_layers"]

METHODS = ("auto", "power", "svd")

# Start block of the power iteration: a fixed Gaussian (d_out, k) matrix, the same for every
# example, so a result never depends on the batch it was computed in.
_START_SEED = 0x10F1F
_start_cache: dict[tuple[int, int, str], torch.Tensor] = {}

# Extra columns carried through the power iteration and dropped at the end (as in randomized
# SVD): convergence then depends on the gap sigma_c / sigma_{c+p+1}, not sigma_c / sigma_{c+1},
# which is what makes decaying gradient spectra converge. Measured on gradient-like matrices
# (64-token outer-product sums, 96..768 wide): the worst per-example excess error over the optimum
# fell from 2.7% (p=0) to <0.1% (p=4) at about the same cost.
OVERSAMPLE = 4


def power_iterations(c: int) -> int:
    """Power-iteration steps used for rank ``c``: 4 for c=1, 16 for c>1 (measured: module docstring)."""
    return 4 if c == 1 else 16


def _start_block(d_out: int, k: int, device: torch.device) -> torch.Tensor:
    key = (d_out, k, str(device))
    block = _start_cache.get(key)
    if block is None:
        gen = torch.Generator(device="cpu").manual_seed(_START_SEED)
        block = torch.randn(d_out, k, generator=gen, dtype=torch.float32).to(device)
        _start_cache[key] = block
    return block


def _householder_orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of each (d, k) block's columns; orthonormal even for rank-deficient or
    zero blocks. On CPU a LAPACK call per matrix is cheap."""
    return torch.linalg.qr(Y, mode="reduced").Q


def _cholesky_orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    """Shifted Cholesky-QR with an fp64 Gram matrix: batched GEMM + batched k x k Cholesky +
    triangular solve, so no per-matrix solver loop (what batched QR does on GPUs).

    fp64 keeps orthogonality for condition numbers up to ~1e6 (the error grows as cond^2 eps);
    the shift (1e-12 of the trace) caps the condition number there, and makes zero or
    rank-deficient blocks factorisable: their null directions come out as near-zero columns,
    which carry near-zero singular values in the final Rayleigh-Ritz step.
    """
    Y64 = Y.to(torch.float64)
    gram = Y64.mT @ Y64
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    shift = torch.where(trace > 0, trace * 1e-12, torch.ones_like(trace))
    gram.diagonal(dim1=-2, dim2=-1).add_(shift[..., None])
    # cholesky_ex: no error check, so no host sync per power step on a GPU (cholesky reads its
    # info back every call). The shift makes the Gram positive definite unless its entries are
    # not finite, and a non-finite G is refused (or zeroed) before it is factorized.
    upper = torch.linalg.cholesky_ex(gram, upper=True).L
    return torch.linalg.solve_triangular(upper, Y64, upper=True, left=False).to(Y.dtype)


def _orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    if Y.device.type == "cpu":
        return _householder_orthonormalize(Y)
    return _cholesky_orthonormalize(Y)


def _svd_factors(G: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    k = min(c, S.shape[-1])
    return U[..., :k] * S[..., None, :k], Vh[..., :k, :].mT


def _power_factors(
    G: torch.Tensor, c: int, iters: int, orthonormalize=_orthonormalize
) -> tuple[torch.Tensor, torch.Tensor]:
    B, d_out, d_in = G.shape
    k = min(c + OVERSAMPLE, d_out, d_in)
    Gt = G.mT
    # Q spans the current estimate of the top-k right singular subspace.
    Q = orthonormalize(Gt @ _start_block(d_out, k, G.device).expand(B, d_out, k))
    for _ in range(iters):
        Q = orthonormalize(Gt @ (G @ Q))
    # Rayleigh-Ritz: G Q Q^T is the best approximation within span(Q). With M = G Q and
    # M^T M = W S^2 W^T (a k x k eigenproblem, fp64 so squaring loses nothing that matters),
    # G Q Q^T = (M W)(Q W)^T with M W = U S: L = M W, R = Q W. An eigh of k x k matrices is a
    # batched kernel on GPUs, where an SVD of tall (d_out, k) blocks loops over the batch.
    M = (G @ Q).to(torch.float64)
    _, W = torch.linalg.eigh(M.mT @ M)
    W = W.flip(-1)[..., :c]  # eigh sorts ascending
    return (M @ W).to(G.dtype), (Q.to(torch.float64) @ W).to(G.dtype)


def _gram_is_cheaper(d_out: int, d_in: int, c: int) -> bool:
    """Whether iterating on the ``m x m`` Gram of the smaller side beats iterating on ``G``.

    Forming the Gram costs ``big·m²`` multiplies once; each step then costs ``m²·k`` instead of
    ``2·big·m·k``. The steps on ``G`` are thin products that stream all of ``G`` for k columns
    (memory-bound), the Gram one dense product, so the Gram form wins up to about twice the
    width that counting multiplies gives, ``m ≈ 4 k steps`` (c=1: ~100, square c=4: ~400). Measured,
    ms per batch, one thread, on G / on the Gram: c=1 (8, 64, 64) 0.40 / 0.24, (8, 256, 64)
    1.08 / 0.41, (8, 384, 384) 7.7 / 12.2; c=4 (8, 256, 256) 12.2 / 6.7, (4, 512, 512) 29.7 /
    18.1, (4, 800, 800) 52.8 / 59.5.
    """
    m, big = min(d_out, d_in), max(d_out, d_in)
    k = c + OVERSAMPLE
    steps = power_iterations(c) + 1
    return big * m * m + steps * m * m * k <= 2 * (2 * steps * big * m * k)


def _gram_power_factors(Gs: Sequence[torch.Tensor], c: int, iters: int,
                        orthonormalize=_orthonormalize) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The power iteration of :func:`_power_factors` run on ``H = AᵀA``, ``A`` the matrix with the
    smaller side last, for several layers whose smaller side is equally wide at once; the factors
    come with their signs fixed (:func:`_fix_signs`).

    ``H Q`` is ``Gᵀ G Q`` (or ``G Gᵀ Q``) in one product of an ``m x m`` matrix: one batched call
    per step for every layer together, instead of two calls per layer over the whole ``G``; on
    a small model those calls, not the multiplies, are the cost. For the same reason layers whose
    ``A`` has the same shape and orientation (a transformer's blocks) are one batch throughout. The
    start block ``H S`` is a full step, so ``iters + 1`` steps are taken, half a step more than on
    ``G``; for c=1 with one orthonormalization, at the end. The Rayleigh-Ritz step works on
    ``Qᵀ H Q`` for the whole batch at once; only ``L = A R`` is formed per stack, from ``A``
    itself, so the singular values it holds are not squared. On the 9 layers of a 2 x 64 GPT-2
    (batch 8, one thread) these took the factorisation from 1.20 to 0.76 ms per batch, at the
    same worst error over the optimum (1.1e-3 of |G| on 80 batches of hard synthetic gradients).
    """
    stacks: dict[tuple[int, bool], list[int]] = {}  # (big, transposed) -> layers, in order
    for j, G in enumerate(Gs):
        transposed = G.shape[-2] < G.shape[-1]
        stacks.setdefault((max(G.shape[-2:]), transposed), []).append(j)
    # stacked as they are and transposed as a view (not copied transposed): each matrix goes through
    # the products in the memory order it would alone, so stacking changes no bit of its result
    tall = []
    for (_, transposed), js in stacks.items():
        stacked = torch.cat([Gs[j] for j in js]) if len(js) > 1 else Gs[js[0]]
        tall.append(stacked.mT if transposed else stacked)
    H = torch.cat([A.mT @ A for A in tall])  # (n, m, m)
    n, m, _ = H.shape
    k = min(c + OVERSAMPLE, m)
    # over its trace, H has eigenvalues in [0, 1], the top one at least 1/m: no power of it
    # overflows, and the top direction's m^-steps stays within fp32's range
    trace = H.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    H = H / torch.where(trace > 0, trace, torch.ones_like(trace))
    # blocks go through the products as rows, (n, k, m): Xᵀ H is one fast batched product where
    # H X, with its k-wide right operand, took 4x as long on the CPU (17 vs 71 µs for 72 Grams of
    # 32 at k=5); H is symmetric, so Xᵀ H = (H X)ᵀ
    rows = _start_block(m, k, H.device).mT.expand(n, k, m)
    for step in range(iters + 1):
        rows = rows @ H
        # For c=1, once, at the end: without the orthonormalizations between steps the block's
        # columns all lean towards the top eigenvector, so the directions past the first lose
        # precision; fine for a rank-1 factor, whose direction is the one that stays exact. On
        # small Grams the orthonormalizations, not the products, are the cost.
        if c > 1 or step == iters:
            rows = orthonormalize(rows.mT).mT
    Q = rows.mT
    # Rayleigh-Ritz on QᵀHQ = (AQ)ᵀ(AQ), a k x k eigenproblem for the whole batch at once (fp64):
    # the best approximation of A within span(Q) is (A Q W)(Q W)ᵀ
    _, W = torch.linalg.eigh((Q.mT @ H).to(torch.float64) @ Q.to(torch.float64))
    right_rows = W.flip(-1)[..., :c].mT.to(H.dtype) @ Q.mT  # (n, c, m); eigh sorts ascending
    factors: list = [None] * len(Gs)
    for ((_, transposed), js), A, Rt in zip(stacks.items(), tall, right_rows.split([A.shape[0] for A in tall])):
        # A ≈ (A R) Rᵀ: the right factor of A is orthonormal, its left one holds the values
        left, right = (Rt @ A.mT).mT, Rt.mT
        if transposed:
            # G = Aᵀ ≈ R (A R)ᵀ: move the singular values (A R's column norms) to L
            values = left.norm(dim=-2, keepdim=True)
            left, right = right * values, left / torch.where(values > 0, values, torch.ones_like(values))
        L, R = _fix_signs(left, right)
        sizes = [Gs[j].shape[0] for j in js]
        for j, Lj, Rj in zip(js, L.split(sizes), R.split(sizes)):
            factors[j] = (Lj, Rj)
    return factors


def _choose_method(G: torch.Tensor, c: int) -> str:
    if G.device.type != "cpu":
        # Batched SVD of medium matrices is slow on GPUs (per-matrix solver calls); block power
        # iteration is a handful of batched GEMMs.
        return "power"
    # Measured crossover (module docstring): SVD wins once the iterated block is a quarter of
    # the smaller side.
    return "power" if 4 * (c + OVERSAMPLE) <= min(G.shape[-2:]) else "svd"


def _fix_signs(L: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = R.abs().argmax(dim=-2, keepdim=True)
    sign = torch.gather(R, -2, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return L * sign, R * sign


def _pad(M: torch.Tensor, c: int) -> torch.Tensor:
    missing = c - M.shape[-1]
    if missing <= 0:
        return M
    return torch.cat([M, M.new_zeros(*M.shape[:-1], missing)], dim=-1)


def _check_input(G, c: int, method: str) -> None:
    if not isinstance(G, torch.Tensor) or G.dim() != 3:
        shape = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
        raise ValueError(f"G must be a (B, d_out, d_in) tensor, got {shape}")
    if not G.is_floating_point():
        raise ValueError(f"G must be a floating-point tensor, got {G.dtype}")
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise ValueError(f"rank c must be a positive int, got {c!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@torch.no_grad()
@exact
def factorize_layers(
    Gs: Sequence[torch.Tensor], c: int, method: str = "auto"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`factorize` of each of several layers' batches, ``[(L, R), ...]`` in their order.

    What is computed for a layer does not depend on the others: layers that take the Gram form
    of the power iteration (:func:`_gram_is_cheaper`) with equally wide smaller sides share its
    batched calls, which is what makes a build over many small layers cheaper than one
    :func:`factorize` per layer.
    """
    for G in Gs:
        _check_input(G, c, method)
    Gs = [G.to(torch.float32) for G in Gs]
    factors: list = [None] * len(Gs)
    gram_groups: dict[tuple[int, torch.device], list[int]] = {}
    for j, G in enumerate(Gs):
        B, d_out, d_in = G.shape
        if B == 0 or d_out == 0 or d_in == 0:
            factors[j] = (G.new_zeros(B, d_out, c), G.new_zeros(B, d_in, c))
            continue
        chosen = _choose_method(G, c) if method == "auto" else method
        if min(d_out, d_in) <= c or chosen == "svd":
            # Small side <= c: the full SVD is already the exact answer.
            factors[j] = _fix_signs(*_svd_factors(G, c))
        elif _gram_is_cheaper(d_out, d_in, c):
            gram_groups.setdefault((min(d_out, d_in), G.device), []).append(j)
        else:
            factors[j] = _fix_signs(*_power_factors(G, c, power_iterations(c)))
    for group in gram_groups.values():
        for j, LR in zip(group, _gram_power_factors([Gs[j] for j in group], c, power_iterations(c))):
            factors[j] = LR
    return [(_pad(L, c).contiguous(), _pad(R, c).contiguous()) for L, R in factors]


def factorize(
    G: torch.Tensor, c: int, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``c`` factors of a batch of projected gradients: ``G ≈ L R^T``.

    Args:
        G: ``(B, d_out, d_in)`` projected gradients (any float dtype; computed in fp32 on G's
            device).
        c: rank to keep, ``>= 1``.
        method: ``"power"`` (block power iteration, on ``G`` or on the Gram of its smaller side,
            whichever is cheaper), ``"svd"`` (batched SVD) or ``"auto"`` (the faster of the two
            at equal accuracy for this shape and device).

    Returns:
        ``L`` ``(B, d_out, c)`` fp32 holding the singular values and ``R`` ``(B, d_in, c)`` fp32
        with orthonormal columns (zero columns beyond ``min(d_out, d_in)``).
    """
    return factorize_layers([G], c, method)[0]
