"""A layer's damped low-rank curvature and its Woodbury preconditioner.

``A ~ V diag(sigma2) V^T`` (top-r eigenpairs from the sketch, see ``sketch.py``: exact when the
sketch holds the dense Gram, i.e. was as wide as the layer) plus damping
``lam > 0``: ``(V S V^T + lam I)^-1 g = g/lam - V diag(sigma2 / (lam (lam + sigma2))) V^T g``,
which costs D*r per query and O(D*r) memory instead of a D x D inverse.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .sketch import Blocks, LayerSketch, dense_eig, nystrom_eig, refine

Tensor = torch.Tensor

# Used when a policy yields lam = 0 (a layer whose gradients are all zero): keeps the
# preconditioner finite; scores of such a layer are 0 anyway since its training gradients are 0.
DAMPING_FLOOR = 1e-12

POLICIES = ("eigen-mean", "trace", "explicit")

# Rows of V cast to fp64 at once by precondition (4096 x r x 8 bytes: 8 MiB at r = 256).
_V_CHUNK = 4096
# D * r above which Woodbury runs in fp32 (exactness matters, and is cheap, on small layers)
_FP64_MAX_ELEMS = 1 << 22


def clamp_rank(r: int, D: int, N: int) -> int:
    """Per-layer curvature rank min(r, D, N): A has rank <= min(D, N), more is wasted."""
    if isinstance(r, bool) or int(r) != r or r <= 0:
        raise ValueError(f"curvature rank r must be a positive integer, got r={r!r}")
    if D < 1:
        raise ValueError(f"layer dimension D must be >= 1, got D={D}")
    if N < 0:
        raise ValueError(f"row count N must be >= 0, got N={N}")
    return int(min(int(r), int(D), int(N)))


@dataclass(frozen=True)
class DampingPolicy:
    """How lam is chosen per layer.

    eigen-mean: lam = scale * mean(sigma2) over the sketched eigenvalues (the paper, scale 0.1);
    trace:      lam = scale * trace(A) / D;
    explicit:   lam = scale.
    """

    name: str = "eigen-mean"
    scale: float = 0.1

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"damping policy name must be one of {POLICIES}, got name={self.name!r}")
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s)) or float(s) <= 0:
            raise ValueError(f"damping scale must be a finite number > 0, got scale={s!r}")
        object.__setattr__(self, "scale", float(s))

    def value(self, sigma2, trace: float, D: int) -> float:
        """lam > 0 for a layer with sketched eigenvalues ``sigma2``, ``trace(A)`` and dimension D."""
        if D < 1:
            raise ValueError(f"layer dimension D must be >= 1, got D={D}")
        trace = float(trace)
        if not math.isfinite(trace) or trace < 0:
            raise ValueError(f"trace must be finite and >= 0, got trace={trace}")
        if self.name == "explicit":
            lam = self.scale
        elif self.name == "trace":
            lam = self.scale * trace / D
        else:
            s = torch.as_tensor(sigma2, dtype=torch.float64).reshape(-1)
            if s.numel() and not bool(torch.isfinite(s).all()):
                raise ValueError("sigma2 contains non-finite values")
            lam = self.scale * float(s.mean().item()) if s.numel() else 0.0
        if not lam > 0:
            warnings.warn(f"damping policy {self.name!r} gave lam = 0 (zero curvature); "
                          f"using the floor lam = {DAMPING_FLOOR:g}", RuntimeWarning, stacklevel=2)
            lam = DAMPING_FLOOR
        return float(lam)

    def to_dict(self) -> dict:
        return {"name": self.name, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict) -> "DampingPolicy":
        return cls(name=d["name"], scale=d["scale"])


@dataclass(frozen=True)
class LayerCurvature:
    """Damped rank-r curvature of one layer: A ~ V diag(sigma2) V^T, plus lam I."""

    sigma2: Tensor        # (r,) >= 0, descending
    V: Tensor             # (D, r) orthonormal columns
    damping: float        # lam > 0
    trace: float          # trace(A), exact (from the sketch)

    def __post_init__(self):
        s, V = self.sigma2, self.V
        if not isinstance(s, Tensor) or s.dim() != 1:
            raise ValueError(f"sigma2 must be a 1-D tensor, got {getattr(s, 'shape', type(s))}")
        if not isinstance(V, Tensor) or V.dim() != 2 or V.shape[1] != s.shape[0]:
            raise ValueError(f"V must be (D, r) with r = len(sigma2) = {s.shape[0]}, got {tuple(getattr(V, 'shape', ()))}")
        if V.shape[0] < 1:
            raise ValueError(f"V must have D >= 1 rows, got V{tuple(V.shape)}")
        if s.device != V.device:
            raise ValueError(f"sigma2 on {s.device} but V on {V.device}")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError("sigma2 must be finite and >= 0")
        if not bool(torch.isfinite(V).all()):
            raise ValueError("V contains non-finite values")
        lam = float(self.damping)
        if not math.isfinite(lam) or lam <= 0:
            raise ValueError(f"damping must be finite and > 0, got damping={self.damping!r}")
        tr = float(self.trace)
        if not math.isfinite(tr) or tr < 0:
            raise ValueError(f"trace must be finite and >= 0, got trace={self.trace!r}")
        object.__setattr__(self, "damping", lam)
        object.__setattr__(self, "trace", tr)

    @property
    def D(self) -> int:
        return int(self.V.shape[0])

    @property
    def rank(self) -> int:
        return int(self.V.shape[1])

    @property
    def captured_energy(self) -> float:
        """Fraction of trace(A) in the kept eigenvalues (0 for a zero layer)."""
        if self.trace == 0:
            return 0.0
        return float(self.sigma2.to(torch.float64).sum().item()) / self.trace

    def to(self, device) -> "LayerCurvature":
        return LayerCurvature(self.sigma2.to(device), self.V.to(device), self.damping, self.trace)

    def to_state(self) -> dict:
        """{'sigma2', 'V'} as numpy float32 plus JSON-able scalars."""
        return {"sigma2": self.sigma2.detach().cpu().to(torch.float32).numpy().copy(),
                "V": self.V.detach().cpu().to(torch.float32).numpy().copy(),
                "damping": self.damping, "trace": self.trace}

    @classmethod
    def from_state(cls, state: dict, device=None) -> "LayerCurvature":
        s = torch.from_numpy(np.ascontiguousarray(state["sigma2"], dtype=np.float32))
        V = torch.from_numpy(np.ascontiguousarray(state["V"], dtype=np.float32))
        if device is not None:
            s, V = s.to(device), V.to(device)
        return cls(s, V, float(state["damping"]), float(state["trace"]))


@torch.no_grad()
def precondition(g: Tensor, curv: LayerCurvature) -> Tensor:
    """h = (V diag(sigma2) V^T + lam I)^-1 g for each row of g (Q, D), by Woodbury.

    Returns fp32 (fp64 when g is fp64) on g's device, but the arithmetic is fp64 whatever g's
    dtype: along directions with sigma2 >> lam the V-term cancels almost all of g/lam, so fp32
    arithmetic loses ~eps32 * sigma2/lam of h (3e-5 of the scores of an f=1 digits MLP whose exact
    curvature has sigma2_1/lam ~ 4.5e3, 1e-6 in fp64). V is cast a chunk of rows at a time, so no
    D x r fp64 copy is resident; the fp64 work is Q*D*r per query batch, not per training row.
    Layers with D*r above _FP64_MAX_ELEMS stay in fp32: there fp64 made preconditioning 25x slower
    (GPT-2-small shapes, r = 2048: 7.7 s per block and query on one thread, benchmarks/bench_precondition.py).
    """
    if g.dim() != 2 or g.shape[1] != curv.D:
        raise ValueError(f"g must be (Q, D={curv.D}), got {tuple(g.shape)}")
    out_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    if g.dtype != torch.float64 and curv.D * curv.rank > _FP64_MAX_ELEMS:
        return _precondition_fp32(g.to(torch.float32), curv)
    g = g.to(torch.float64)
    lam = curv.damping
    D = curv.D
    s2 = curv.sigma2.to(device=g.device, dtype=torch.float64)

    def V_rows(start: int) -> Tensor:
        return curv.V[start:start + _V_CHUNK].to(device=g.device, dtype=torch.float64)

    a = torch.zeros(g.shape[0], curv.rank, dtype=torch.float64, device=g.device)
    for start in range(0, D, _V_CHUNK):
        a += g[:, start:start + _V_CHUNK] @ V_rows(start)
    # (1/lam) (g - V diag(s2/(lam+s2)) V^T g): the fraction is in [0, 1), so no large terms cancel
    # before the single division by lam.
    a *= s2 / (lam + s2)
    h = torch.empty(g.shape, dtype=out_dtype, device=g.device)
    for start in range(0, D, _V_CHUNK):
        stop = min(D, start + _V_CHUNK)
        h[:, start:stop] = (g[:, start:stop] - a @ V_rows(start).t()) / lam
    return h


def _precondition_fp32(g: Tensor, curv: LayerCurvature) -> Tensor:
    """The same Woodbury step in fp32, for layers where fp64 would cost more than the scoring itself."""
    lam = curv.damping
    V = curv.V.to(device=g.device, dtype=torch.float32)
    s2 = curv.sigma2.to(device=g.device, dtype=torch.float64)
    frac = (s2 / (lam + s2)).to(torch.float32)
    return (g - ((g @ V) * frac) @ V.t()) / lam


def fit_layer_curvature(sketch: LayerSketch, rank: int, policy: DampingPolicy | None = None,
                        refine_passes: int = 0,
                        block_source: Optional[Callable[[], Blocks]] = None,
                        finalize: str = "rr") -> LayerCurvature:
    """Curvature of one layer from its sketch; optional refinement passes over its blocks.

    The rank is clamped to min(rank, D, rows) and must not exceed the sketch width k. A dense
    sketch (``sketch.dense``: Y is A itself) is decomposed exactly by ``dense_eig``; refinement
    passes are skipped there, they could only reproduce it. Otherwise, with
    ``refine_passes = q >= 1`` all k Nystrom directions start q passes of subspace iteration +
    Rayleigh-Ritz over ``block_source()`` (a fresh iterable of (L, R) blocks per pass);
    ``finalize`` ("rr" | "nystrom") picks how the last pass is turned into eigenpairs (``refine``).
    """
    policy = DampingPolicy() if policy is None else policy
    if refine_passes < 0:
        raise ValueError(f"refine_passes must be >= 0, got refine_passes={refine_passes}")
    if refine_passes > 0 and block_source is None:
        raise ValueError(f"refine_passes={refine_passes} needs a block_source to stream the layer's blocks")
    r = clamp_rank(rank, sketch.D, sketch.rows)
    if r > sketch.k:
        raise ValueError(f"rank {r} exceeds the sketch width k={sketch.k}: rebuild the sketch with k >= rank + oversampling")
    dev = sketch.Y.device
    if r == 0:
        sigma2 = torch.zeros(0, dtype=torch.float32, device=dev)
        V = torch.zeros(sketch.D, 0, dtype=torch.float32, device=dev)
    elif sketch.dense:
        sigma2, V = dense_eig(sketch.Y, r)
    else:
        omega = sketch.omega()
        if refine_passes > 0:
            _, V0 = nystrom_eig(sketch.Y, omega, sketch.k)
            del omega
            sigma2, V = refine(V0, block_source, refine_passes, r, finalize=finalize)
        else:
            sigma2, V = nystrom_eig(sketch.Y, omega, r)
    lam = policy.value(sigma2, sketch.trace, sketch.D)
    return LayerCurvature(sigma2.contiguous(), V.contiguous(), lam, sketch.trace)
