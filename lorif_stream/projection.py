"""Seeded random projections that shrink each layer's gradient before it is ever formed.

A tracked layer with weight ``W`` (out ``O`` x in ``I``) has a full gradient ``∇W = Δ^T X`` of
``O·I`` numbers. LoRIF (like LoGRA) never forms it: it projects the layer's inputs with
``P_in`` (I x d_in) and its output gradients with ``P_out`` (O x d_out), and keeps

    G = (Δ P_out)^T (X P_in) = P_out^T ∇W P_in          (d_out x d_in)

with ``d = min(dim, max(min(dim // f, max_side), min_side))`` (:func:`reduced_dim`). A side that
is not shrunk (``f = 1``, or a side of at most ``min_side`` dimensions) uses the identity: ``f = 1``
gives the exact weight gradient (the correctness tests rely on it). Whitened projections
(``whitening.py``) multiply these matrices by the layer's K-FAC whitening on each side.

Each side is one of two kinds (:class:`SideProjection`):

* :class:`DenseSide`, a ``(dim, d)`` matrix with ``±1/sqrt(d)`` (Rademacher) or ``N(0, 1/d)``
  (Gaussian) entries, so ``E[P P^T] = I``: for sides up to ``max_dense_side`` wide;
* :class:`SketchSide`, a CountSketch for wider sides (an LM head's vocabulary, a wide MLP): every
  coordinate goes to one of ``d`` buckets (a seeded balanced assignment) with a seeded sign and an
  optional per-coordinate weight (the diagonal whitening of such a side). It is stored as two
  ``dim``-long vectors instead of ``dim x d`` numbers, applied in O(dim) per token instead of a
  ``dim x d`` GEMM, and its projected inner products are unbiased like the dense ones'.

Every machine and device must use bit-identical projections, or an index built on one machine
could not be queried on another. So they are

* generated on the CPU (a CUDA generator draws different numbers for the same seed), with
* a ``torch.Generator`` seeded by :func:`layer_seed`, a SHA-256 of (spec seed, layer name,
  side) -- never Python's ``hash()``, which is salted per process,

and only then moved to the compute device.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only; projection must not import capture
    from lorif_stream.capture import LayerInfo

__all__ = [
    "KINDS",
    "SIDES",
    "reduced_dim",
    "ProjectionSpec",
    "layer_seed",
    "projection_matrix",
    "count_sketch",
    "SideProjection",
    "DenseSide",
    "SketchSide",
    "LayerProjection",
    "make_projections",
]

KINDS = ("rademacher", "gaussian")
SIDES = ("in", "out")

# Bumping this string changes every projection ever generated: only do it together with the
# index format version, because old indexes could no longer be queried.
_SEED_DOMAIN = "lorif-stream/projection/v1"
_SKETCH_DOMAIN = "lorif-stream/count-sketch/v1"


def _is_int(value) -> bool:
    # bool is an int subclass; `f=True` is a bug, not a projection factor.
    return isinstance(value, int) and not isinstance(value, bool)


def reduced_dim(dim: int, f: int, min_side: int = 1, max_side: int | None = None) -> int:
    """Projected size of a ``dim``-wide side: ``dim`` for ``f = 1``, else
    ``min(dim, max(min(dim // f, max_side), min_side, 1))``.

    ``min_side`` is the small-layer rule: projection exists to bound big layers, and shrinking a
    side that is already small wrecks attribution (a 30-32-2 MLP at f=4 kept 7- and 1-wide sides:
    LDS 0.06 against 0.42 unprojected). A side is never cut below ``min_side`` dimensions, and a
    side of at most ``min_side`` dimensions is not projected at all.

    ``max_side`` is the wide-layer rule: a per-example gradient costs ``d_out + d_in`` numbers per
    rank per layer, so ``dim // f`` alone lets a 152k vocabulary store 38k numbers per example for
    its LM head. ``f = 1`` asks for exact gradients and is never capped.
    """
    if not _is_int(dim) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not _is_int(f) or f < 1:
        raise ValueError(f"projection factor f must be a positive int, got {f!r}")
    if not _is_int(min_side) or min_side < 1:
        raise ValueError(f"min_side must be a positive int, got {min_side!r}")
    if max_side is not None and (not _is_int(max_side) or max_side < min_side):
        raise ValueError(f"max_side must be None or an int >= min_side={min_side}, got {max_side!r}")
    if f == 1:
        return dim
    shrunk = dim // f if max_side is None else min(dim // f, max_side)
    return min(dim, max(shrunk, min_side, 1))


@dataclass(frozen=True)
class ProjectionSpec:
    """How every layer's projections are drawn; stored in the index metadata.

    Attributes:
        f: projection factor; each side shrinks from ``dim`` to about ``dim // f``.
           ``1`` disables projection (identity matrices, exact gradients).
        kind: ``"rademacher"`` (±1/sqrt(d), the default) or ``"gaussian"`` (N(0, 1/d)) entries of
           the dense sides.
        seed: base seed; per-layer seeds are derived from it with :func:`layer_seed`.
        min_side: no side is projected below this many dimensions (see :func:`reduced_dim`);
           1 reproduces the paper's ``max(1, dim // f)`` (and indexes of format version 1).
        max_side: no side is projected above this many dimensions (None: no cap, as in indexes of
           format versions 1 and 2).
        max_dense_side: projected sides wider than this are CountSketches (:class:`SketchSide`);
           None: every side is dense (indexes of format versions 1 and 2).
    """

    f: int = 4
    kind: str = "rademacher"
    seed: int = 0
    min_side: int = 1
    max_side: int | None = None
    max_dense_side: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.f) or self.f < 1:
            raise ValueError(f"ProjectionSpec.f must be a positive int, got {self.f!r}")
        if self.kind not in KINDS:
            raise ValueError(f"ProjectionSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"ProjectionSpec.seed must be a non-negative int, got {self.seed!r}")
        if not _is_int(self.min_side) or self.min_side < 1:
            raise ValueError(f"ProjectionSpec.min_side must be a positive int, got {self.min_side!r}")
        if self.max_side is not None and (not _is_int(self.max_side) or self.max_side < self.min_side):
            raise ValueError(f"ProjectionSpec.max_side must be None or an int >= min_side={self.min_side}, "
                             f"got {self.max_side!r}")
        if self.max_dense_side is not None and (not _is_int(self.max_dense_side) or self.max_dense_side < 1):
            raise ValueError(f"ProjectionSpec.max_dense_side must be None or a positive int, got {self.max_dense_side!r}")

    @property
    def identity(self) -> bool:
        """True when ``f == 1``: no projection at all."""
        return self.f == 1

    def side_dim(self, dim: int) -> int:
        """The projected size of a ``dim``-wide side."""
        return reduced_dim(dim, self.f, self.min_side, self.max_side)

    def sketched(self, dim: int) -> bool:
        """Whether a ``dim``-wide side is a CountSketch (or, unshrunk, a diagonal) rather than dense."""
        return self.max_dense_side is not None and dim > self.max_dense_side

    def to_dict(self) -> dict:
        """JSON-able form, for the index metadata."""
        return {"f": self.f, "kind": self.kind, "seed": self.seed, "min_side": self.min_side,
                "max_side": self.max_side, "max_dense_side": self.max_dense_side}

    @classmethod
    def from_dict(cls, data: dict) -> "ProjectionSpec":
        """Inverse of :meth:`to_dict`; unknown keys are an error (they signal a newer format)."""
        if not isinstance(data, dict):
            raise ValueError(f"ProjectionSpec.from_dict expects a dict, got {type(data).__name__}")
        unknown = set(data) - {"f", "kind", "seed", "min_side", "max_side", "max_dense_side"}
        if unknown:
            raise ValueError(f"ProjectionSpec.from_dict: unknown keys {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_factors(cls, factors: dict) -> "ProjectionSpec":
        """The spec of an index's stored factor settings (``factor_key_of_index`` form)."""
        return cls(f=factors["f"], kind=factors["projection"], seed=factors["seed"], min_side=factors["min_side"],
                   max_side=factors.get("max_side"), max_dense_side=factors.get("max_dense_side"))


def layer_seed(seed: int, layer_name: str, side: str, domain: str = _SEED_DOMAIN) -> int:
    """A 63-bit generator seed for one side of one layer, identical on every machine.

    Derived with SHA-256 so it depends only on its arguments: not on the process (Python's
    ``hash()`` is salted), the platform or the order layers are visited in.
    """
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(layer_name, str):
        raise ValueError(f"layer_name must be a str, got {layer_name!r}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    message = f"{domain}\0{seed}\0{layer_name}\0{side}".encode("utf-8")
    digest = hashlib.sha256(message).digest()
    # 63 bits: fits every API that takes a signed 64-bit seed.
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def projection_matrix(dim: int, spec: ProjectionSpec, layer_name: str, side: str) -> torch.Tensor:
    """The ``(dim, spec.side_dim(dim))`` fp32 CPU dense projection for one side.

    A side that is not shrunk gets the identity: a square random matrix would only distort the
    metric (it is not orthogonal). Otherwise the entries are drawn on the CPU from a generator
    seeded by :func:`layer_seed`, so the same arguments give the same matrix everywhere; move it
    to the compute device afterwards.
    """
    if not isinstance(spec, ProjectionSpec):
        raise ValueError(f"spec must be a ProjectionSpec, got {type(spec).__name__}")
    d = spec.side_dim(dim)
    seed = layer_seed(spec.seed, layer_name, side)  # validates name and side even for f == 1
    if d == dim:
        return torch.eye(dim, dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    scale = 1.0 / math.sqrt(d)
    if spec.kind == "rademacher":
        signs = torch.randint(0, 2, (dim, d), generator=gen, dtype=torch.int8)
        return (signs.to(torch.float32) * 2.0 - 1.0) * scale
    return torch.randn(dim, d, generator=gen, dtype=torch.float32) * scale


def count_sketch(dim: int, d: int, seed: int, layer_name: str, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bucket, sign)``: the seeded CountSketch of one side, ``dim`` int64 buckets in ``[0, d)``
    and ``dim`` fp32 signs ±1, generated on the CPU.

    The buckets are balanced (a seeded permutation dealt round-robin): every bucket holds
    ``dim // d`` or ``dim // d + 1`` coordinates, so no bucket sums many more coordinates than
    another. The permutation is an argsort of seeded random 62-bit keys (torch's ``randint``
    stream, like the dense matrices), not ``randperm``, whose algorithm torch has changed.
    """
    if not (_is_int(d) and 1 <= d <= dim):
        raise ValueError(f"a CountSketch of a {dim}-wide side needs 1 <= d <= {dim}, got {d!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(layer_seed(seed, layer_name, side, _SKETCH_DOMAIN))
    keys = torch.randint(0, 1 << 62, (dim,), generator=gen, dtype=torch.int64)
    order = torch.argsort(keys, stable=True)
    bucket = torch.empty(dim, dtype=torch.int64)
    bucket[order] = torch.arange(dim, dtype=torch.int64) % d
    sign = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int8).to(torch.float32) * 2.0 - 1.0
    return bucket, sign


class SideProjection(ABC):
    """One side of a layer's projection: ``(..., dim) -> (..., d)`` in fp32."""

    dim: int
    d: int

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., dim) -> (..., d)`` fp32."""

    @abstractmethod
    def to(self, device: torch.device | str) -> "SideProjection":
        """The same side on ``device`` (``self`` when it is already there)."""

    @abstractmethod
    def matrix(self) -> torch.Tensor:
        """The ``(dim, d)`` fp32 matrix this side applies (oracles, and whitening of dense sides)."""

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def identity(self) -> bool:
        """True when this side leaves its input as it is."""


@dataclass(frozen=True)
class DenseSide(SideProjection):
    """A ``(dim, d)`` fp32 matrix; ``is_identity`` skips the matmul of an unshrunk random side."""

    P: torch.Tensor
    is_identity: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.P, torch.Tensor) or self.P.dim() != 2:
            shape = tuple(self.P.shape) if isinstance(self.P, torch.Tensor) else type(self.P).__name__
            raise ValueError(f"a dense projection must be a 2-D tensor, got {shape}")
        if self.P.dtype != torch.float32:
            raise ValueError(f"a dense projection must be float32, got {self.P.dtype}")
        if self.is_identity and self.P.shape[0] != self.P.shape[1]:
            raise ValueError(f"an identity projection must be square, got {tuple(self.P.shape)}")

    @property
    def dim(self) -> int:
        return self.P.shape[0]

    @property
    def d(self) -> int:
        return self.P.shape[1]

    @property
    def device(self) -> torch.device:
        return self.P.device

    @property
    def identity(self) -> bool:
        return self.is_identity

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        return x if self.is_identity else x @ self.P

    def to(self, device) -> "DenseSide":
        device = torch.device(device)
        return self if self.P.device == device else DenseSide(self.P.to(device), self.is_identity)

    def matrix(self) -> torch.Tensor:
        return self.P


@dataclass(frozen=True)
class SketchSide(SideProjection):
    """A weighted CountSketch: ``y[..., bucket[i]] += weight[i] · x[..., i]``.

    ``weight`` is the sign times the side's diagonal whitening (1 for a random projection).
    ``bucket`` None: no sketch, ``d = dim`` and ``y = weight · x`` (an unshrunk wide side).
    """

    weight: torch.Tensor  # (dim,) fp32
    bucket: torch.Tensor | None  # (dim,) int64 in [0, d), or None
    d: int

    def __post_init__(self) -> None:
        if not isinstance(self.weight, torch.Tensor) or self.weight.dim() != 1 or self.weight.dtype != torch.float32:
            raise ValueError("a sketch's weight must be a 1-D float32 tensor")
        dim = self.weight.shape[0]
        if self.bucket is None:
            if self.d != dim:
                raise ValueError(f"a sketch without buckets keeps its {dim} dimensions, got d={self.d}")
        elif self.bucket.shape != (dim,) or self.bucket.dtype != torch.int64 or self.bucket.device != self.weight.device:
            raise ValueError(f"a sketch's bucket must be a ({dim},) int64 tensor on {self.weight.device}")
        if not _is_int(self.d) or not 1 <= self.d <= dim:
            raise ValueError(f"a sketch of a {dim}-wide side needs 1 <= d <= {dim}, got {self.d!r}")

    @property
    def dim(self) -> int:
        return self.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def identity(self) -> bool:
        return False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xw = x.reshape(-1, self.dim).to(torch.float32) * self.weight
        if self.bucket is None:
            return xw.reshape(*lead, self.d)
        # one pass over x, like reading it: measured as fast as a dense d=256 GEMM on the CPU at a
        # 152k vocabulary, without its 155 MB matrix
        y = torch.zeros(xw.shape[0], self.d, dtype=torch.float32, device=x.device)
        return y.index_add_(1, self.bucket, xw).reshape(*lead, self.d)

    def to(self, device) -> "SketchSide":
        device = torch.device(device)
        if self.weight.device == device:
            return self
        bucket = None if self.bucket is None else self.bucket.to(device)
        return SketchSide(self.weight.to(device), bucket, self.d)

    def matrix(self) -> torch.Tensor:
        M = torch.zeros(self.dim, self.d, dtype=torch.float32, device=self.device)
        rows = torch.arange(self.dim, device=self.device)
        cols = rows if self.bucket is None else self.bucket
        M[rows, cols] = self.weight
        return M


def side_projection(dim: int, spec: ProjectionSpec, layer_name: str, side: str) -> SideProjection:
    """The seeded random projection of one side (on the CPU): dense, identity or CountSketch."""
    d = spec.side_dim(dim)
    if spec.sketched(dim):
        if d == dim:
            return SketchSide(torch.ones(dim), None, dim)
        bucket, sign = count_sketch(dim, d, spec.seed, layer_name, side)
        return SketchSide(sign, bucket, d)
    return DenseSide(projection_matrix(dim, spec, layer_name, side), is_identity=d == dim)


@dataclass(frozen=True)
class LayerProjection:
    """The pair of projections of one layer, on one device.

    Attributes:
        inp: applied to the layer inputs ``X`` (..., I) -> (..., d_in).
        out: applied to the output gradients ``Δ`` (..., O) -> (..., d_out).
    """

    inp: SideProjection
    out: SideProjection

    def __post_init__(self) -> None:
        for label, side in (("input", self.inp), ("output", self.out)):
            if not isinstance(side, SideProjection):
                raise ValueError(f"LayerProjection's {label} side must be a SideProjection, got {type(side).__name__}")
        if self.inp.device != self.out.device:
            raise ValueError(f"LayerProjection input side on {self.inp.device} but output side on {self.out.device}")

    @classmethod
    def dense(cls, P_in: torch.Tensor, P_out: torch.Tensor) -> "LayerProjection":
        """Two dense matrices ``(I, d_in)``, ``(O, d_out)``."""
        return cls(DenseSide(P_in), DenseSide(P_out))

    @property
    def identity(self) -> bool:
        """Both sides are identities: the captured gradient is the exact weight gradient."""
        return self.inp.identity and self.out.identity

    @property
    def in_features(self) -> int:
        return self.inp.dim

    @property
    def out_features(self) -> int:
        return self.out.dim

    @property
    def d_in(self) -> int:
        return self.inp.d

    @property
    def d_out(self) -> int:
        return self.out.d

    @property
    def device(self) -> torch.device:
        return self.inp.device

    def to(self, device: torch.device | str) -> "LayerProjection":
        """The same projection on ``device`` (``self`` when it is already there)."""
        device = torch.device(device)
        if self.inp.device == device:
            return self
        return LayerProjection(self.inp.to(device), self.out.to(device))

    @torch.no_grad()
    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., I) -> (..., d_in)`` in fp32."""
        return self.inp.apply(x)

    @torch.no_grad()
    def project_out(self, delta: torch.Tensor) -> torch.Tensor:
        """``Δ (..., O) -> (..., d_out)`` in fp32."""
        return self.out.apply(delta)

    @torch.no_grad()
    def projected_outer(self, xp: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``Σ_t (Δ_t P_out)ᵀ (X_t P_in)`` per example: ``xp (B, T, d_in)``, ``delta (B, T, O)`` ->
        ``(B, d_out, d_in)`` fp32.

        Two orders give the same sum: ``(Δ P_out)ᵀ XP`` costs ``T·O·d_out + T·d_out·d_in``
        multiplies, ``P_outᵀ (Δᵀ XP)`` costs ``T·O·d_in + O·d_out·d_in``. The second is the cheaper
        one for a wide dense output side over a narrow input side and short sequences (an LM head
        over a small model: 1.6x fewer), where projecting Δ costs more than the layer itself.
        """
        B, T, O = delta.shape
        d_out, d_in = self.d_out, xp.shape[2]
        dense_out = isinstance(self.out, DenseSide) and not self.out.is_identity
        if dense_out and T * O * d_in + O * d_out * d_in < T * O * d_out + T * d_out * d_in:
            # (XPᵀ Δ) P_out as one (B·d_in, O) x (O, d_out) product: P_outᵀ @ (B, O, d_in) would
            # be a batched product over B copies of P_out (1.4x slower for a 1024-wide LM head)
            unprojected = xp.mT @ delta.to(torch.float32)  # (B, d_in, O)
            return (unprojected.reshape(B * d_in, O) @ self.out.P).view(B, d_in, d_out).mT.contiguous()
        return self.project_out(delta).mT @ xp


def make_projections(
    layers: Iterable["LayerInfo"], spec: ProjectionSpec, device: torch.device | str = "cpu"
) -> dict[str, LayerProjection]:
    """One :class:`LayerProjection` per tracked layer, keyed by layer name, on ``device``.

    ``layers`` are :class:`lorif_stream.capture.LayerInfo` (anything with ``name``,
    ``in_features``, ``out_features``, ``d_in``, ``d_out``); their ``d_in``/``d_out`` must agree
    with ``spec``, which catches layers listed with one factor and projected with another.
    """
    projections: dict[str, LayerProjection] = {}
    for layer in layers:
        for side, dim, d in (
            ("in", layer.in_features, layer.d_in),
            ("out", layer.out_features, layer.d_out),
        ):
            if spec.side_dim(dim) != d:
                raise ValueError(
                    f"layer {layer.name!r}: d_{side}={d} does not match f={spec.f}, min_side={spec.min_side}, "
                    f"max_side={spec.max_side} (expected {spec.side_dim(dim)} for {dim} features)"
                )
        if layer.name in projections:
            raise ValueError(f"duplicate layer name {layer.name!r}")
        projections[layer.name] = LayerProjection(
            side_projection(layer.in_features, spec, layer.name, "in"),
            side_projection(layer.out_features, spec, layer.name, "out"),
        ).to(device)
    return projections
