"""Batched rank-c factorisation of projected gradients: ``G ≈ L R^T``.

LoRIF stores, per example and layer, ``L`` (d_out x c) and ``R`` (d_in x c) instead of the
``d_out x d_in`` projected gradient ``G``: ``c (d_in + d_out)`` numbers instead of ``d_in d_out``.
The best rank-c approximation (Eckart-Young) is the truncated SVD; two ways to get it:

* ``"svd"``: ``torch.linalg.svd`` of the whole batch, then truncate. Exact, but it computes all
  ``min(d_out, d_in)`` singular triplets to keep ``c``.
* ``"power"``: block power (subspace) iteration on the top-c right singular subspace, then a
  Rayleigh-Ritz step (a c-column SVD) -- only batched matmuls, QRs of tall thin blocks and a
  tiny SVD, so it is fast on CPU and GPU alike.

A gradient of a T-token example has rank <= T, and at c=1 LoRIF only needs the top pair, so
power iteration usually converges in very few steps; the iteration counts (8 for c=1, 16 for
c>1, as in the paper) leave margin for flat spectra.

Conventions (both methods): ``L`` absorbs the singular values and ``R`` has orthonormal
columns; components come in decreasing singular-value order; each component's sign is fixed
so that the largest-magnitude entry of its ``R`` column is positive; when
``min(d_out, d_in) <= c`` the result is exact (SVD, zero columns appended when ``c`` exceeds
the smaller dimension); a zero ``G`` gives zero ``L`` and finite ``R``. Each example is
factorised independently of its batch-mates (the power-iteration start is a fixed seeded
matrix, not drawn from the batch).

Timings (this repository's 2-core CPU, fp32, torch 2.13, median of runs; ms per batch):

__TIMINGS__
"""

from __future__ import annotations

import torch

__all__ = ["METHODS", "power_iterations", "factorize"]

METHODS = ("auto", "power", "svd")

# Start block of the power iteration: a fixed Gaussian (d_out, c) matrix, the same for every
# example, so a result never depends on the batch it was computed in.
_START_SEED = 0x10F1F
_start_cache: dict[tuple[int, int, str], torch.Tensor] = {}


def power_iterations(c: int) -> int:
    """Power-iteration steps used for rank ``c``: 8 for c=1, 16 for c>1."""
    return 8 if c == 1 else 16


def _start_block(d_out: int, c: int, device: torch.device) -> torch.Tensor:
    key = (d_out, c, str(device))
    block = _start_cache.get(key)
    if block is None:
        gen = torch.Generator(device="cpu").manual_seed(_START_SEED)
        block = torch.randn(d_out, c, generator=gen, dtype=torch.float32).to(device)
        _start_cache[key] = block
    return block


def _orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of each (d, k) block's columns (Householder QR: orthonormal even when
    a block is rank-deficient or zero)."""
    if Y.shape[-1] == 1:
        # QR of one column is a normalisation; the clamp keeps zero columns finite.
        return Y / torch.linalg.vector_norm(Y, dim=-2, keepdim=True).clamp_min(1e-30)
    return torch.linalg.qr(Y, mode="reduced").Q


def _svd_factors(G: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    k = min(c, S.shape[-1])
    return U[..., :k] * S[..., None, :k], Vh[..., :k, :].mT


def _power_factors(G: torch.Tensor, c: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, d_out, d_in = G.shape
    Gt = G.mT
    # Q spans the current estimate of the top-c right singular subspace.
    Q = _orthonormalize(Gt @ _start_block(d_out, c, G.device).expand(B, d_out, c))
    for _ in range(iters):
        Q = _orthonormalize(Gt @ (G @ Q))
    # Rayleigh-Ritz: G Q Q^T is the best approximation in span(Q); its SVD is c columns wide.
    U, S, Wh = torch.linalg.svd(G @ Q, full_matrices=False)
    return U * S[..., None, :], Q @ Wh.mT


def _choose_method(G: torch.Tensor, c: int) -> str:
    if G.device.type != "cpu":
        # Batched SVD of medium matrices is slow on GPUs (per-matrix solver calls); block power
        # iteration is a handful of batched GEMMs.
        return "power"
    # __AUTO_RULE__
    return "power"


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


@torch.no_grad()
def factorize(
    G: torch.Tensor, c: int, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``c`` factors of a batch of projected gradients: ``G ≈ L R^T``.

    Args:
        G: ``(B, d_out, d_in)`` projected gradients (any float dtype; computed in fp32 on G's
            device).
        c: rank to keep, ``>= 1``.
        method: ``"power"`` (block power iteration), ``"svd"`` (batched SVD) or ``"auto"``
            (the faster of the two at equal accuracy for this shape and device).

    Returns:
        ``L`` ``(B, d_out, c)`` fp32 holding the singular values and ``R`` ``(B, d_in, c)`` fp32
        with orthonormal columns (zero columns beyond ``min(d_out, d_in)``).
    """
    if not isinstance(G, torch.Tensor) or G.dim() != 3:
        shape = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
        raise ValueError(f"G must be a (B, d_out, d_in) tensor, got {shape}")
    if not G.is_floating_point():
        raise ValueError(f"G must be a floating-point tensor, got {G.dtype}")
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise ValueError(f"rank c must be a positive int, got {c!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    G = G.to(torch.float32)
    B, d_out, d_in = G.shape
    if B == 0 or d_out == 0 or d_in == 0:
        return G.new_zeros(B, d_out, c), G.new_zeros(B, d_in, c)
    if method == "auto":
        method = _choose_method(G, c)
    if min(d_out, d_in) <= c or method == "svd":
        # Small side <= c: the full SVD is already the exact answer.
        L, R = _svd_factors(G, c)
    else:
        L, R = _power_factors(G, c, power_iterations(c))
    L, R = _fix_signs(L, R)
    return _pad(L, c).contiguous(), _pad(R, c).contiguous()
