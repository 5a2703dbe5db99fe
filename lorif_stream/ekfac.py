"""EK-FAC in the projected space: a diagonal curvature in the Kronecker eigenbasis of each layer.

After the whitened projection (``whitening.py``) a layer's stored gradients ``G_i`` (d_out x d_in)
are rotated into the eigenbases ``q_out``, ``q_in`` of the projected token moments. There the
eigenvalue-corrected K-FAC curvature is diagonal, with the eigenvalues measured on the gradients
themselves rather than implied by the Kronecker product:

    Λ = Σ_i (q_outᵀ G_i q_in)²            (elementwise; one d_out x d_in array per layer)

``Λ`` is a sum over rows, so it is fed block by block during the build, caught up from the stored
factors after a resume, extended on append, and needs no model (only the factors). A query
gradient is preconditioned once, ``H = q_out [(q_outᵀ G_q q_in) / (Λ + λ)] q_inᵀ``, and every
training row then costs one dot product ``<H, L Rᵀ>``, exactly like the plain whitened score.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor


# Rows expanded to dense rotated gradients at once when c > 1 (bounds the n x d_out x d_in scratch).
_SCRATCH_ELEMS = 1 << 24


@torch.no_grad()
def rotated_squares(L: Tensor, R: Tensor, q_out: Tensor, q_in: Tensor) -> Tensor:
    """``Σ_i (q_outᵀ L_i R_iᵀ q_in)²`` (elementwise) of one block, in fp64.

    With ``a = q_outᵀ L_i`` and ``b = q_inᵀ R_i``: for c = 1 the sum is one GEMM ``(a²)ᵀ (b²)`` and
    no G_i is formed; for c > 1 the rotated G_i = a bᵀ are formed in chunks (c·D per row, cheaper
    than the c² GEMMs of the expanded square).
    """
    a = torch.einsum("ji,njc->nic", q_out, L.to(q_out.dtype))
    b = torch.einsum("ji,njc->nic", q_in, R.to(q_in.dtype))
    n, d_out, c = a.shape
    d_in = b.shape[1]
    if c == 1:
        return ((a[:, :, 0] ** 2).T @ (b[:, :, 0] ** 2)).to(torch.float64)
    out = torch.zeros(d_out, d_in, dtype=torch.float64, device=a.device)
    step = max(1, _SCRATCH_ELEMS // (d_out * d_in))
    for s in range(0, n, step):
        G = torch.bmm(a[s:s + step], b[s:s + step].transpose(1, 2))
        out += (G * G).sum(0).to(torch.float64)
    return out


@dataclass(eq=False)
class LayerEigenStats:
    """The additive EK-FAC statistic of one layer: Λ (fp64) over the rows it covers."""

    q_out: Tensor
    q_in: Tensor
    sums: Tensor
    rows: int = 0

    def __post_init__(self):
        want = (self.q_out.shape[0], self.q_in.shape[0])
        if tuple(self.sums.shape) != want:
            raise ValueError(f"EK-FAC sums have shape {tuple(self.sums.shape)}, the eigenbases need {want}")
        if self.rows < 0:
            raise ValueError(f"EK-FAC rows must be >= 0, got {self.rows}")

    @classmethod
    def empty(cls, q_out: Tensor, q_in: Tensor) -> "LayerEigenStats":
        return cls(q_out, q_in, torch.zeros(q_out.shape[0], q_in.shape[0], dtype=torch.float64, device=q_out.device))

    def update(self, L: Tensor, R: Tensor) -> None:
        self.sums += rotated_squares(L.to(self.q_out.device), R.to(self.q_out.device), self.q_out, self.q_in)
        self.rows += int(L.shape[0])

    def to_numpy(self) -> np.ndarray:
        return self.sums.cpu().numpy()


@dataclass(frozen=True)
class EkfacPreconditioner:
    """``G -> q_out [(q_outᵀ G q_in) / (Λ + λ)] q_inᵀ`` for a batch of query gradients (Q, d_out, d_in)."""

    q_out: Tensor
    q_in: Tensor
    eigenvalues: Tensor  # Λ, (d_out, d_in)
    damping: float

    def __post_init__(self):
        if not self.damping > 0:
            raise ValueError(f"EK-FAC damping must be > 0, got {self.damping}")
        if tuple(self.eigenvalues.shape) != (self.q_out.shape[0], self.q_in.shape[0]):
            raise ValueError(f"EK-FAC eigenvalues {tuple(self.eigenvalues.shape)} do not match the eigenbases "
                             f"({self.q_out.shape[0]}, {self.q_in.shape[0]})")

    @torch.no_grad()
    def apply(self, G: Tensor) -> Tensor:
        # fp32 is enough: the rotations are orthogonal and the division does not cancel; fp64 made
        # a GPT-2-small block 4x slower for 64 queries (benchmarks/bench_precondition.py)
        q_out, q_in = self.q_out.to(torch.float32), self.q_in.to(torch.float32)
        inverse = (1.0 / (self.eigenvalues.to(torch.float64) + self.damping)).to(torch.float32)
        rotated = q_out.T @ G.to(torch.float32) @ q_in
        return q_out @ (rotated * inverse) @ q_in.T
