"""Streaming sketches of a layer's curvature and its eigendecomposition.

A layer's curvature is ``A = sum_i g_i g_i^T`` over training examples, where each
``g_i = vec(L_i R_i^T)`` arrives as rank-c factors. The build keeps the single-pass sketch
``Y = A @ Omega`` plus ``trace(A)``; both are sums over examples, so blocks, shards and appends
simply add. Omega is one of two test matrices, chosen per sketch when it is created and recorded
in its state:

* Gaussian (k < D): D x k, regenerated from a seed and never stored. ``nystrom_eig`` turns the
  sketch into top-r eigenpairs (Tropp, Yurtsever, Udell, Cevher 2017, "Fixed-rank approximation
  of a positive-semidefinite matrix from streaming data"); ``refine`` improves them with passes of
  subspace iteration + Rayleigh-Ritz over the stored blocks.
* identity (k >= D, D <= DENSE_MAX_D): a sketch as wide as the layer costs as much as A itself, so
  Y is the dense Gram A, accumulated in fp64, and ``dense_eig`` takes its exact eigendecomposition.

Precision: the Gaussian D x k arrays are fp32 (memory); every k x k matrix, every trace and every
Gram product is formed in fp64, chunked over rows so no D x k fp64 copy is ever resident. The
dense Gram is fp64 throughout (it takes the memory of a fp32 Y plus its cached Omega at k = D).
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Tuple

import numpy as np
import torch

from .gpu import exact

Tensor = torch.Tensor
Blocks = Iterable[Tuple[Tensor, Tensor]]

# Part of the definition of Omega: changing a generator changes every stored sketch, so the state
# records the tag of the one it was made with and refuses to load a sketch made with an unknown one.
GAUSSIAN_GENERATOR = "box-muller-fp64-mt19937-v1"
IDENTITY_GENERATOR = "identity-v1"
GENERATORS = (GAUSSIAN_GENERATOR, IDENTITY_GENERATOR)
# The dense path is exact but its eigh is O(D³) in fp64: 35 s at D = 4096 on a 2-core CPU against
# ~1 s at 2048 (a D-wide Gaussian sketch of a wider layer is finalized in fp32, ~8x faster). Wider
# layers keep the Gaussian sketch even at k >= D.
DENSE_MAX_D = 2048
STATE_VERSION = 1

# Rows per chunk when generating Omega or reducing D x k arrays to k x k fp64 products.
_ROW_CHUNK = 4096
# Scratch budget (elements) for one sketch_update chunk: 16M floats = 64 MiB.
_SCRATCH_ELEMS = 1 << 24
# Largest dense Gram whose eigh runs on one CPU thread (see _serial_lapack); above it the O(D^3)
# work is large enough for threads to pay off even on a busy machine.
_SERIAL_EIGH_MAX = 512


# --------------------------------------------------------------------------------------------
# Test matrix
# --------------------------------------------------------------------------------------------

def gaussian_test_matrix(D: int, k: int, seed: int, device=None) -> Tensor:
    """The D x k standard-Gaussian test matrix Omega for ``seed``, fp32, on ``device``.

    Generated on the CPU from uniform fp64 draws (serial mt19937, one draw per element, so the
    stream does not depend on CPU vector extensions) through Box-Muller in fp64 and rounded to
    fp32: every device gets the same bits, and machines whose fp64 log/cos differ in the last
    bit can at worst flip the last fp32 bit of a rare entry (harmless: Nystrom's shift is far
    larger). Never torch.randn: its fp32 path differs between CPU kernels. Row i depends only on (seed, k, i), so
    Omega(D1) is a prefix of Omega(D2) for D1 < D2. CPU scratch is one row chunk; the result is
    written chunk by chunk straight into device memory.
    """
    if D < 1 or k < 1:
        raise ValueError(f"gaussian_test_matrix needs D >= 1 and k >= 1, got D={D}, k={k}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got seed={seed}")
    device = torch.device("cpu") if device is None else torch.device(device)
    out = torch.empty(D, k, dtype=torch.float32, device=device)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for start in range(0, D, _ROW_CHUNK):
        rows = min(_ROW_CHUNK, D - start)
        n = rows * k
        pairs = (n + 1) // 2
        u = torch.rand(pairs, 2, dtype=torch.float64, generator=gen)
        # 1 - u lies in (0, 1], so the log is finite.
        radius = torch.sqrt(-2.0 * torch.log1p(-u[:, 0]))
        angle = (2.0 * math.pi) * u[:, 1]
        z = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1).reshape(-1)
        out[start:start + rows].copy_(z[:n].view(rows, k).to(torch.float32))
    return out


# --------------------------------------------------------------------------------------------
# Block updates
# --------------------------------------------------------------------------------------------

def _check_block(Y: Tensor, L: Tensor, R: Tensor, omega: Tensor) -> Tuple[int, int, int, int, int]:
    if L.dim() != 3 or R.dim() != 3:
        raise ValueError(f"factor blocks must be (n, d_out, c) and (n, d_in, c), got L{tuple(L.shape)}, R{tuple(R.shape)}")
    n, d_out, c = L.shape
    n_r, d_in, c_r = R.shape
    if n_r != n or c_r != c:
        raise ValueError(f"L{tuple(L.shape)} and R{tuple(R.shape)} disagree on rows or rank c")
    if Y.dim() != 2 or omega.shape != Y.shape:
        raise ValueError(f"Y{tuple(Y.shape)} and omega{tuple(omega.shape)} must both be (D, k)")
    D, k = Y.shape
    if d_out * d_in != D:
        raise ValueError(f"factor shapes give D = d_out*d_in = {d_out}*{d_in} = {d_out * d_in}, but Y has D={D}")
    if Y.dtype != torch.float32 or omega.dtype != torch.float32:
        raise ValueError(f"Y and omega must be fp32 (accumulate above storage precision), got {Y.dtype}, {omega.dtype}")
    if not Y.is_contiguous() or not omega.is_contiguous():
        raise ValueError("Y and omega must be contiguous (they are viewed as (d_out, d_in*k))")
    return n, d_out, d_in, c, k


def update_flops(d_out: int, d_in: int, c: int, k: int) -> dict:
    """Multiply-add counts per example of the two ways to add g (g^T Omega) into Y."""
    D = d_out * d_in
    return {
        # G = L R^T, then G @ Omega and G^T @ W.
        "dense": 2 * D * c + 4 * D * k,
        # (L^T Omega_mat) contracted with R, then Y_mat += L (R (x) w): no dense g is formed.
        "factored": 4 * c * D * k + 3 * c * d_in * k,
    }


def _choose_path(d_out: int, d_in: int, c: int, k: int) -> str:
    f = update_flops(d_out, d_in, c, k)
    # With a dense Gaussian Omega the two are within ~1/(2k) of each other for c = 1 and the
    # dense path wins clearly for c > 1; prefer dense on ties (one large GEMM pair).
    return "factored" if f["factored"] < f["dense"] else "dense"


def _block_trace(L: Tensor, R: Tensor) -> Tensor:
    # ||L R^T||_F^2 = <L^T L, R^T R>: c^2 (d_out + d_in) per example instead of D, in fp64
    # because the trace is a sum of N positive terms (bf16/fp32 would lose the small ones).
    # A 0-dim tensor on the factors' device: the caller reads it once per update, not per chunk
    # (each read is a host sync on a GPU).
    L64 = L.to(torch.float64)
    R64 = R.to(torch.float64)
    gl = torch.bmm(L64.transpose(1, 2), L64)
    gr = torch.bmm(R64.transpose(1, 2), R64)
    return (gl * gr).sum()


@torch.no_grad()
@exact
def sketch_update(Y: Tensor, L: Tensor, R: Tensor, omega: Tensor, chunk_rows: int | None = None,
                  path: str = "auto") -> float:
    """Add ``sum_i g_i (g_i^T omega)`` into ``Y`` in place; return ``sum_i ||g_i||^2`` (fp64).

    Y, omega: (D, k) fp32 on one device; L (n, d_out, c), R (n, d_in, c) in any float dtype
    (moved/cast to Y's device and fp32). At most ``chunk_rows`` examples are expanded at once
    (default: as many as fit a 64 MiB scratch). ``path`` is "dense" | "factored" | "auto"
    (fewest flops, see ``update_flops``).
    """
    n, d_out, d_in, c, k = _check_block(Y, L, R, omega)
    if path == "auto":
        path = _choose_path(d_out, d_in, c, k)
    if path not in ("dense", "factored"):
        raise ValueError(f"path must be 'auto', 'dense' or 'factored', got {path!r}")
    if n == 0:
        return 0.0
    L = L.to(device=Y.device, dtype=torch.float32)
    R = R.to(device=Y.device, dtype=torch.float32)
    D = Y.shape[0]
    per_row = D if path == "dense" else c * d_in * k
    if chunk_rows is None:
        chunk_rows = max(1, _SCRATCH_ELEMS // max(1, per_row))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got chunk_rows={chunk_rows}")

    trace = torch.zeros((), dtype=torch.float64, device=Y.device)
    Y_mat = Y.view(d_out, d_in * k)
    om_mat = omega.view(d_out, d_in * k)
    for s in range(0, n, chunk_rows):
        Lc = L[s:s + chunk_rows]
        Rc = R[s:s + chunk_rows]
        m = Lc.shape[0]
        trace += _block_trace(Lc, Rc)
        if path == "dense":
            G = torch.bmm(Lc, Rc.transpose(1, 2)).view(m, D)
            W = G @ omega
            Y.addmm_(G.t(), W)
        else:
            Lp = Lc.permute(0, 2, 1).reshape(m * c, d_out)
            Rp = Rc.permute(0, 2, 1).reshape(m, c * d_in)
            U = (Lp @ om_mat).view(m, c * d_in, k)          # U[n, (c,p), j] = (L_c^T Omega_mat)[p, j]
            W = torch.bmm(Rp.unsqueeze(1), U).squeeze(1)      # W[n] = g_n^T Omega
            # Reuse U's memory for M[n, c, p, j] = R[n, p, c] * W[n, j].
            M = torch.mul(Rp.unsqueeze(2), W.unsqueeze(1), out=U).view(m * c, d_in * k)
            Y_mat.addmm_(Lp.t(), M)
    return float(trace)


@torch.no_grad()
@exact
def gram_update(A: Tensor, L: Tensor, R: Tensor, chunk_rows: int | None = None) -> float:
    """Add ``sum_i g_i g_i^T`` into the dense fp64 Gram ``A`` (D, D) in place; return ``sum_i ||g_i||^2``.

    L (n, d_out, c), R (n, d_in, c) in any float dtype (moved to A's device). Each chunk of at most
    ``chunk_rows`` examples (default: a 64 MiB fp64 scratch) is expanded once into G (m, D) and
    added as G^T G. fp64 GEMMs because A is summed over every row of the corpus and its eigh is
    meant to be exact: fp32 rounding of the running sum would reach the preconditioned scores
    amplified by the condition number of A + lam I.
    """
    if L.dim() != 3 or R.dim() != 3:
        raise ValueError(f"factor blocks must be (n, d_out, c) and (n, d_in, c), got L{tuple(L.shape)}, R{tuple(R.shape)}")
    n, d_out, c = L.shape
    if R.shape[0] != n or R.shape[2] != c:
        raise ValueError(f"L{tuple(L.shape)} and R{tuple(R.shape)} disagree on rows or rank c")
    D = d_out * R.shape[1]
    if A.dim() != 2 or tuple(A.shape) != (D, D):
        raise ValueError(f"factor shapes give D = d_out*d_in = {d_out}*{R.shape[1]} = {D}, but A has shape {tuple(A.shape)}")
    if A.dtype != torch.float64:
        raise ValueError(f"the dense Gram must be fp64, got {A.dtype}")
    if chunk_rows is None:
        chunk_rows = max(1, (_SCRATCH_ELEMS // 2) // D)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got chunk_rows={chunk_rows}")
    L = L.to(device=A.device, dtype=torch.float64)
    R = R.to(device=A.device, dtype=torch.float64)
    trace = torch.zeros((), dtype=torch.float64, device=A.device)
    for s in range(0, n, chunk_rows):
        Lc, Rc = L[s:s + chunk_rows], R[s:s + chunk_rows]
        trace += _block_trace(Lc, Rc)
        G = torch.bmm(Lc, Rc.transpose(1, 2)).view(Lc.shape[0], D)
        A.addmm_(G.t(), G)
    return float(trace)


@torch.no_grad()
@exact
def apply_curvature(Q: Tensor, blocks: Blocks) -> Tensor:
    """Z = A Q for A = sum over the streamed (L, R) blocks of g g^T; never forms A or a N x D array."""
    Q = Q.to(torch.float32).contiguous()
    Z = torch.zeros_like(Q)
    for L, R in blocks:
        sketch_update(Z, L, R, Q)
    return Z


# --------------------------------------------------------------------------------------------
# Accumulator
# --------------------------------------------------------------------------------------------

@dataclass(eq=False)
class LayerSketch:
    """Additive single-pass sketch of one layer: Y = A Omega, trace(A) and the rows it covers.

    Omega is determined by (generator, D, k, seed) and never persisted. ``generator`` is chosen
    at creation unless given: the identity when k >= D and D <= DENSE_MAX_D (Y is then the dense fp64 Gram A itself,
    D x D, exact and cheaper to update than a D-wide Gaussian sketch), else the seeded Gaussian
    (Y fp32, D x k). ``k`` is clamped to D. A Gaussian Omega is cached on Y's device while updating
    (resident memory 2*D*k*4 bytes) unless ``cache_omega=False`` (D*k*4 bytes, but Omega is
    regenerated on the CPU for every update - slow on GPU); the identity is never materialized
    for updates (resident memory D*D*8 bytes).
    """

    D: int
    k: int
    seed: int
    Y: Tensor | None = None
    trace: float = 0.0
    rows: int = 0
    device: str | torch.device | None = None
    cache_omega: bool = True
    generator: str | None = None
    _omega: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if int(self.D) < 1:
            raise ValueError(f"LayerSketch needs D >= 1, got D={self.D}")
        if int(self.k) < 1:
            raise ValueError(f"LayerSketch needs k >= 1, got k={self.k}")
        if int(self.seed) < 0:
            raise ValueError(f"LayerSketch seed must be >= 0, got seed={self.seed}")
        if int(self.rows) < 0:
            raise ValueError(f"LayerSketch rows must be >= 0, got rows={self.rows}")
        self.D, self.seed, self.rows = int(self.D), int(self.seed), int(self.rows)
        if self.generator is None:
            dense = int(self.k) >= self.D and self.D <= DENSE_MAX_D
            self.generator = IDENTITY_GENERATOR if dense else GAUSSIAN_GENERATOR
        if self.generator not in GENERATORS:
            raise ValueError(f"unknown test-matrix generator={self.generator!r}, expected one of {GENERATORS}")
        if self.generator == IDENTITY_GENERATOR and int(self.k) < self.D:
            raise ValueError(f"the identity test matrix needs k >= D, got k={self.k}, D={self.D}")
        self.k = min(int(self.k), self.D)
        self.trace = float(self.trace)
        if not math.isfinite(self.trace) or self.trace < 0:
            raise ValueError(f"LayerSketch trace must be finite and >= 0, got trace={self.trace}")
        dtype = torch.float64 if self.dense else torch.float32
        if self.Y is None:
            dev = torch.device("cpu") if self.device is None else torch.device(self.device)
            self.Y = torch.zeros(self.D, self.k, dtype=dtype, device=dev)
        else:
            if tuple(self.Y.shape) != (self.D, self.k):
                raise ValueError(f"LayerSketch Y has shape {tuple(self.Y.shape)}, expected (D, k) = ({self.D}, {self.k})")
            dev = self.Y.device if self.device is None else torch.device(self.device)
            self.Y = self.Y.to(device=dev, dtype=dtype).contiguous()
        self.device = self.Y.device

    @property
    def dense(self) -> bool:
        """True when Omega is the identity, so Y is the Gram A itself."""
        return self.generator == IDENTITY_GENERATOR

    # Omega ------------------------------------------------------------------------------------
    def omega(self) -> Tensor:
        """The test matrix, (D, k) in Y's dtype and device (the identity is made afresh, never cached)."""
        if self.dense:
            return torch.eye(self.D, dtype=self.Y.dtype, device=self.Y.device)
        if self._omega is not None and self._omega.device == self.Y.device:
            return self._omega
        om = gaussian_test_matrix(self.D, self.k, self.seed, self.Y.device)
        if self.cache_omega:
            self._omega = om
        return om

    def drop_omega(self) -> None:
        """Free the cached Omega (e.g. once the build is over)."""
        self._omega = None

    @property
    def nbytes(self) -> int:
        """Resident bytes of the sketch itself (Y), not counting a cached Omega."""
        return self.Y.numel() * self.Y.element_size()

    # Accumulation -----------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, L: Tensor, R: Tensor, chunk_rows: int | None = None) -> "LayerSketch":
        if self.dense:
            self.trace += gram_update(self.Y, L, R, chunk_rows=chunk_rows)
        else:
            self.trace += sketch_update(self.Y, L, R, self.omega(), chunk_rows=chunk_rows)
        self.rows += int(L.shape[0])
        return self

    def _test_matrix(self) -> tuple:
        # What Omega depends on: the identity ignores the seed (and k = D).
        if self.dense:
            return (self.generator, self.D)
        return (self.generator, self.D, self.k, self.seed)

    def _check_compatible(self, other: "LayerSketch") -> None:
        if not isinstance(other, LayerSketch):
            raise TypeError(f"can only merge a LayerSketch, got {type(other).__name__}")
        if self.generator != other.generator:
            raise ValueError("cannot merge sketches with different test matrices: "
                             f"generator={self.generator!r} vs {other.generator!r}")
        if self._test_matrix() != other._test_matrix():
            raise ValueError("cannot merge sketches with different test matrices: "
                             f"(D, k, seed) = {(self.D, self.k, self.seed)} vs {(other.D, other.k, other.seed)}")

    @torch.no_grad()
    def merge(self, other: "LayerSketch") -> "LayerSketch":
        """Add ``other`` (a sketch of a disjoint set of rows, same Omega) into self."""
        self._check_compatible(other)
        self.Y.add_(other.Y.to(self.Y.device))
        self.trace += other.trace
        self.rows += other.rows
        return self

    # Persistence ------------------------------------------------------------------------------
    def to_state(self) -> dict:
        """{'Y': np.ndarray (D, k), float32 or float64 for the dense Gram} plus JSON-able scalars;
        Omega is not included."""
        return {
            "version": STATE_VERSION,
            "omega_generator": self.generator,
            "D": self.D, "k": self.k, "seed": self.seed,
            "trace": float(self.trace), "rows": int(self.rows),
            "Y": self.Y.detach().to("cpu").numpy().copy(),
        }

    @classmethod
    def from_state(cls, state: dict, device=None) -> "LayerSketch":
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported LayerSketch state version={state.get('version')!r}, expected {STATE_VERSION}")
        generator = state.get("omega_generator")
        if generator not in GENERATORS:
            raise ValueError(f"sketch was made with omega_generator={generator!r}, "
                             f"this build knows {GENERATORS}: refit from the stored factors")
        # No cast here: the constructor picks the generator's dtype, and a fp64 Gram read through
        # fp32 would lose what its fp64 accumulation bought.
        Y = torch.from_numpy(np.ascontiguousarray(state["Y"]))
        if not Y.is_floating_point():
            raise ValueError(f"sketch Y must be a float array, got {Y.dtype}")
        return cls(D=int(state["D"]), k=int(state["k"]), seed=int(state["seed"]), Y=Y,
                   trace=float(state["trace"]), rows=int(state["rows"]), device=device, generator=generator)


# --------------------------------------------------------------------------------------------
# Small fp64 helpers
# --------------------------------------------------------------------------------------------

def _gram64(A: Tensor, B: Tensor) -> Tensor:
    """A^T B in fp64, chunked over rows so no (D, k) fp64 copy exists."""
    out = torch.zeros(A.shape[1], B.shape[1], dtype=torch.float64, device=A.device)
    for s in range(0, A.shape[0], _ROW_CHUNK):
        out += A[s:s + _ROW_CHUNK].to(torch.float64).t() @ B[s:s + _ROW_CHUNK].to(torch.float64)
    return out


def _sketch_grams(Y: Tensor, omega: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Omega^T Y, Y^T Y, Omega^T Omega in fp64 from one chunked sweep (each chunk cast once)."""
    k = Y.shape[1]
    OtY, YtY, OtO = (torch.zeros(k, k, dtype=torch.float64, device=Y.device) for _ in range(3))
    for s in range(0, Y.shape[0], _ROW_CHUNK):
        y = Y[s:s + _ROW_CHUNK].to(torch.float64)
        o = omega[s:s + _ROW_CHUNK].to(torch.float64)
        OtY += o.t() @ y
        YtY += y.t() @ y
        OtO += o.t() @ o
    return OtY, YtY, OtO


def _sym(M: Tensor) -> Tensor:
    return 0.5 * (M + M.t())


_serial_lock = threading.Lock()
_serial_depth = 0
_serial_saved = 1


@contextmanager
def _serial_lapack(device: torch.device):
    """Run the k x k LAPACK calls (eigh, Cholesky) on one CPU thread.

    They gain nothing from threads at these sizes, but a threaded LAPACK on a busy machine loses
    badly: a 144 x 144 eigh took 1.2 s with 2 OpenMP threads on a loaded 2-core box vs 2 ms on
    one. The thread count is process-wide, so nested/concurrent users share one save/restore.
    """
    global _serial_depth, _serial_saved
    if device.type != "cpu":
        yield
        return
    with _serial_lock:
        if _serial_depth == 0:
            _serial_saved = torch.get_num_threads()
            if _serial_saved != 1:
                torch.set_num_threads(1)
        _serial_depth += 1
    try:
        yield
    finally:
        with _serial_lock:
            _serial_depth -= 1
            if _serial_depth == 0 and _serial_saved != 1:
                torch.set_num_threads(_serial_saved)


def orthonormalize(X: Tensor, fill_seed: int = 0) -> Tensor:
    """Orthonormal basis (fp32, same shape) of X's columns, with signs kept close to X.

    Householder QR yields orthonormal columns even for rank-deficient X; columns that X does not
    span (zero / dependent) come out as arbitrary orthonormal completions, which is what the
    callers want (directions with zero curvature).
    """
    D, m = X.shape
    if m == 0:
        return X.to(torch.float32)
    X = X.to(torch.float32)
    norms = X.norm(dim=0)
    bad = ~(norms > 0) | ~torch.isfinite(norms)
    if bool(bad.any()):
        # Replace empty columns with seeded random ones so the completion is deterministic.
        X = X.clone()
        filler = gaussian_test_matrix(D, m, fill_seed + 1_000_003, X.device)
        X[:, bad] = filler[:, bad]
        X[~torch.isfinite(X)] = 0.0
    Qm, Rm = torch.linalg.qr(X, mode="reduced")
    signs = torch.sign(torch.diagonal(Rm))
    signs[signs == 0] = 1.0
    return Qm * signs


# --------------------------------------------------------------------------------------------
# Dense eigendecomposition
# --------------------------------------------------------------------------------------------

@torch.no_grad()
@exact
def dense_eig(A: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
    """Top-``rank`` eigenpairs of the dense Gram ``A`` (D, D) by fp64 ``eigh``.

    Returns sigma2 (rank,) fp32 descending, >= 0, and V (D, rank) fp32 with orthonormal columns.
    A is symmetrized first (the GEMMs that summed it need not round both triangles alike) and
    its rounding-level negative eigenvalues are clamped to 0. Directions outside range(A)
    (rank-deficient or all-zero A) get sigma2 at rounding level (~1e-16 sigma2_1, harmless to
    Woodbury) and eigh's orthonormal completion: never a NaN.
    """
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"dense_eig needs a square (D, D) matrix, got {tuple(A.shape)}")
    D = A.shape[0]
    rank = int(rank)
    if rank < 1 or rank > D:
        raise ValueError(f"rank must be in [1, D={D}], got rank={rank}")
    S = A.to(torch.float64)
    S = S + S.t()
    S.mul_(0.5)
    if not bool(torch.isfinite(S).all()):
        raise ValueError("dense Gram A contains non-finite values")
    with _serial_lapack(S.device) if D <= _SERIAL_EIGH_MAX else nullcontext():
        ev, U = torch.linalg.eigh(S)
    del S
    sigma2 = ev[-rank:].flip(0).clamp_min(0).to(torch.float32)
    V = U[:, -rank:].flip(1).to(torch.float32).contiguous()
    return sigma2, V


# --------------------------------------------------------------------------------------------
# Nystrom
# --------------------------------------------------------------------------------------------

@torch.no_grad()
@exact
def nystrom_eig(Y: Tensor, omega: Tensor, rank: int, shift_eps: float | None = None) -> Tuple[Tensor, Tensor]:
    """Top-``rank`` eigenpairs of A from Y = A omega by the shifted-Cholesky Nystrom method.

    Returns sigma2 (rank,) fp32 descending, >= 0, and V (D, rank) fp32 with orthonormal columns.
    nu = eps * sqrt(k) * ||Y||_2 / D (relative to Y, see below; for an orthonormal Omega the
    D becomes 1); Y_nu = Y + nu Omega;
    C = chol(Omega^T Y_nu); B = Y_nu C^-T; sigma2 = max(svd(B)^2 - nu, 0). The SVD of B is taken
    through the k x k fp64 Gram B^T B = C^-1 (Y_nu^T Y_nu) C^-T, and V = Y_nu C^-T W S^-1 is
    formed chunkwise in fp64, so nothing D x k in fp64 is resident. If Cholesky fails (rounding
    in a rank-deficient sketch) the shift grows tenfold, then falls back to an eigh-based
    pseudo-inverse. Directions the sketch does not see get sigma2 = 0 and an orthonormal completion.
    """
    if Y.shape != omega.shape or Y.dim() != 2:
        raise ValueError(f"Y{tuple(Y.shape)} and omega{tuple(omega.shape)} must both be (D, k)")
    D, k = Y.shape
    rank = int(rank)
    if rank < 1 or rank > k:
        raise ValueError(f"rank must be in [1, k={k}], got rank={rank}")
    Y = Y.to(torch.float32)
    omega = omega.to(device=Y.device, dtype=torch.float32)
    dev = Y.device
    if shift_eps is None:
        shift_eps = float(torch.finfo(torch.float32).eps)

    OtY, YtY, OtO = _sketch_grams(Y, omega)
    with _serial_lapack(dev):
        small = _nystrom_core(OtY, YtY, OtO, rank, shift_eps)
    if small is None:
        # A = 0 on everything the sketch sees: zero spectrum, any orthonormal basis.
        return (torch.zeros(rank, dtype=torch.float32, device=dev),
                orthonormalize(omega[:, :rank]))
    nu, T, sigma2 = small
    m = T.shape[1]
    V = torch.zeros(D, rank, dtype=torch.float32, device=dev)
    for s in range(0, D, _ROW_CHUNK):
        Yc = Y[s:s + _ROW_CHUNK].to(torch.float64) + nu * omega[s:s + _ROW_CHUNK].to(torch.float64)
        V[s:s + _ROW_CHUNK, :m] = (Yc @ T).to(torch.float32)
    return sigma2.to(torch.float32), orthonormalize(V)


def _nystrom_core(OtY: Tensor, YtY: Tensor, OtO: Tensor, rank: int, shift_eps: float):
    """The k x k part of nystrom_eig: (nu, T (k, m), sigma2 (rank,)) with V = Y_nu T, or None if Y = 0."""
    k = OtY.shape[0]
    dev = OtY.device
    ynorm2 = float(torch.linalg.eigvalsh(_sym(YtY))[-1].clamp_min(0).item())
    if not math.isfinite(ynorm2):
        raise ValueError("sketch Y contains non-finite values")
    if ynorm2 == 0.0:
        return None
    # The shift must dominate the fp32 rounding of Y as seen through Omega^T (about
    # eps * sqrt(k) * ||Y||), and Omega^T Omega ~ (||Omega||_F^2 / k) I (D I for a Gaussian Omega,
    # I for an orthonormal one) multiplies it. Anything larger only costs accuracy: the shift's
    # tail nu * D leaks into the top eigenvalues (Tropp et al.'s sqrt(D) * eps(||Y||) assumes
    # fp64 Y and would bias them by ~eps32 * D^1.5 here).
    nu = shift_eps * math.sqrt(k) * math.sqrt(ynorm2) * k / float(torch.trace(OtO).item())
    T0 = None
    for _ in range(8):
        C, info = torch.linalg.cholesky_ex(_sym(OtY + nu * OtO))
        if int(info.item()) == 0 and bool(torch.isfinite(C).all()):
            eye = torch.eye(k, dtype=torch.float64, device=dev)
            T0 = torch.linalg.solve_triangular(C.t(), eye, upper=True)       # B = Y_nu C^-T
            break
        nu *= 10.0
    if T0 is None:
        # Pseudo-inverse square root of M: keeps only its well-determined eigen-directions.
        lam, U = torch.linalg.eigh(_sym(OtY + nu * OtO))
        keep = lam > lam[-1].clamp_min(0) * (k * torch.finfo(torch.float64).eps) * 1e3
        if not bool(keep.any()):
            return None
        T0 = U[:, keep] / torch.sqrt(lam[keep])
    GYnu = _sym(YtY + nu * (OtY + OtY.t()) + (nu * nu) * OtO)
    s2, W = torch.linalg.eigh(_sym(T0.t() @ GYnu @ T0))                       # svd(B) via B^T B
    s2, W = s2.flip(0), W.flip(1)
    s2 = s2.clamp_min(0)
    m = min(rank, s2.shape[0])
    s2r = s2[:m]
    # Directions whose singular value is lost in rounding carry no curvature: leave them to the
    # orthonormal completion rather than amplifying noise by 1/s.
    tiny = s2r <= s2[0] * (torch.finfo(torch.float64).eps * 1e2)
    inv_s = torch.where(tiny, torch.zeros_like(s2r), torch.rsqrt(torch.where(tiny, torch.ones_like(s2r), s2r)))
    T = (T0 @ W[:, :m]) * inv_s                                                 # (k, m) fp64
    sigma2 = torch.zeros(rank, dtype=torch.float64, device=dev)
    sigma2[:m] = torch.where(tiny, torch.zeros_like(s2r), (s2r - nu).clamp_min(0))
    return nu, T, sigma2


# --------------------------------------------------------------------------------------------
# Refinement
# --------------------------------------------------------------------------------------------

@torch.no_grad()
@exact
def rayleigh_ritz(Q: Tensor, Z: Tensor) -> Tuple[Tensor, Tensor]:
    """Ritz pairs of A on span(Q) from Z = A Q (Q orthonormal): all m, descending, sigma2 >= 0."""
    if Q.shape != Z.shape or Q.dim() != 2:
        raise ValueError(f"Q{tuple(Q.shape)} and Z{tuple(Z.shape)} must both be (D, m)")
    H = _sym(_gram64(Q, Z))
    with _serial_lapack(H.device):
        theta, W = torch.linalg.eigh(H)
    theta, W = theta.flip(0), W.flip(1)
    V = Q.to(torch.float32) @ W.to(torch.float32)
    return theta.clamp_min(0).to(torch.float32), V


@torch.no_grad()
@exact
def refine(V0: Tensor, block_source: Callable[[], Blocks], passes: int, rank: int,
           finalize: str = "rr") -> Tuple[Tensor, Tensor]:
    """``passes`` passes of subspace iteration started from span(V0); top-``rank`` (sigma2, V).

    Each pass streams the blocks once: Z = A Q, then Q <- orth(Z) for the next pass. The last
    pass turns (Q, Z) into the estimate: ``finalize="rr"`` is Rayleigh-Ritz on span(Q);
    ``finalize="nystrom"`` is the Nystrom approximation with test matrix Q, i.e. A restricted to
    span(A^1/2 Q): half a power step more from the same pass (its estimates were 2-4x closer on
    GPT-2 gradients, see the benchmark), at the same D*m^2 cost. Use V0 with more columns than
    ``rank`` (e.g. all k Nystrom directions): the extra columns speed convergence.
    """
    passes = int(passes)
    if passes < 1:
        raise ValueError(f"refine needs passes >= 1 (passes=0 means: keep the Nystrom result), got passes={passes}")
    if finalize not in ("rr", "nystrom"):
        raise ValueError(f"finalize must be 'rr' or 'nystrom', got finalize={finalize!r}")
    m = V0.shape[1]
    if not 1 <= int(rank) <= m:
        raise ValueError(f"rank must be in [1, V0 columns={m}], got rank={rank}")
    Q = orthonormalize(V0)
    for p in range(passes):
        Z = apply_curvature(Q, block_source())
        if p + 1 < passes:
            Q = orthonormalize(Z, fill_seed=p)
            del Z
    if finalize == "rr":
        sigma2, V = rayleigh_ritz(Q, Z)
        return sigma2[:rank].contiguous(), V[:, :rank].contiguous()
    return nystrom_eig(Z, Q, int(rank))
