"""Seeded random projections that shrink each layer's gradient before it is ever formed.

A tracked layer with weight ``W`` (out ``O`` x in ``I``) has a full gradient ``∇W = Δ^T X`` of
``O·I`` numbers. LoRIF (like LoGRA) never forms it: it projects the layer's inputs with
``P_in`` (I x d_in) and its output gradients with ``P_out`` (O x d_out), and keeps

    G = (Δ P_out)^T (X P_in) = P_out^T ∇W P_in          (d_out x d_in)

with ``d = min(dim, max(dim // f, min_side))`` (:func:`reduced_dim`). A side that is not shrunk
(``f = 1``, or a side of at most ``min_side`` dimensions) uses the identity: ``f = 1`` gives the
exact weight gradient (the correctness tests rely on it). Whitened projections
(``whitening.py``) multiply these matrices by the layer's K-FAC whitening on each side.

Every machine and device must use bit-identical matrices, or an index built on one machine
could not be queried on another. So the matrices are

* generated on the CPU (a CUDA generator draws different numbers for the same seed), with
* a ``torch.Generator`` seeded by :func:`layer_seed`, a SHA-256 of (spec seed, layer name,
  side) -- never Python's ``hash()``, which is salted per process,

and only then moved to the compute device.

Scale: entries are ``±1/sqrt(d)`` (Rademacher) or ``N(0, 1/d)`` (Gaussian), so
``E[P P^T] = I`` and projected inner products are unbiased estimates of the true ones.
"""

from __future__ import annotations

import hashlib
import math
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
    "LayerProjection",
    "make_projections",
]

KINDS = ("rademacher", "gaussian")
SIDES = ("in", "out")

# Bumping this string changes every projection ever generated: only do it together with the
# index format version, because old indexes could no longer be queried.
_SEED_DOMAIN = "lorif-stream/projection/v1"


def _is_int(value) -> bool:
    # bool is an int subclass; `f=True` is a bug, not a projection factor.
    return isinstance(value, int) and not isinstance(value, bool)


def reduced_dim(dim: int, f: int, min_side: int = 1) -> int:
    """Projected size of a ``dim``-wide side: ``min(dim, max(dim // f, min_side, 1))``.

    ``min_side`` is the small-layer rule: projection exists to bound big layers, and shrinking a
    side that is already small wrecks attribution (a 30-32-2 MLP at f=4 kept 7- and 1-wide sides:
    LDS 0.06 against 0.42 unprojected). A side is never cut below ``min_side`` dimensions, and a
    side of at most ``min_side`` dimensions is not projected at all.
    """
    if not _is_int(dim) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not _is_int(f) or f < 1:
        raise ValueError(f"projection factor f must be a positive int, got {f!r}")
    if not _is_int(min_side) or min_side < 1:
        raise ValueError(f"min_side must be a positive int, got {min_side!r}")
    return min(dim, max(dim // f, min_side, 1))


@dataclass(frozen=True)
class ProjectionSpec:
    """How every layer's projections are drawn; stored in the index metadata.

    Attributes:
        f: projection factor; each side shrinks from ``dim`` to ``max(1, dim // f)``.
           ``1`` disables projection (identity matrices, exact gradients).
        kind: ``"rademacher"`` (±1/sqrt(d), the default) or ``"gaussian"`` (N(0, 1/d)).
        seed: base seed; per-layer seeds are derived from it with :func:`layer_seed`.
        min_side: no side is projected below this many dimensions (see :func:`reduced_dim`);
           1 reproduces the paper's ``max(1, dim // f)`` (and indexes of format version 1).
    """

    f: int = 4
    kind: str = "rademacher"
    seed: int = 0
    min_side: int = 1

    def __post_init__(self) -> None:
        if not _is_int(self.f) or self.f < 1:
            raise ValueError(f"ProjectionSpec.f must be a positive int, got {self.f!r}")
        if self.kind not in KINDS:
            raise ValueError(f"ProjectionSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"ProjectionSpec.seed must be a non-negative int, got {self.seed!r}")
        if not _is_int(self.min_side) or self.min_side < 1:
            raise ValueError(f"ProjectionSpec.min_side must be a positive int, got {self.min_side!r}")

    @property
    def identity(self) -> bool:
        """True when ``f == 1``: no projection at all."""
        return self.f == 1

    def to_dict(self) -> dict:
        """JSON-able form, for the index metadata."""
        return {"f": self.f, "kind": self.kind, "seed": self.seed, "min_side": self.min_side}

    @classmethod
    def from_dict(cls, data: dict) -> "ProjectionSpec":
        """Inverse of :meth:`to_dict`; unknown keys are an error (they signal a newer format)."""
        if not isinstance(data, dict):
            raise ValueError(f"ProjectionSpec.from_dict expects a dict, got {type(data).__name__}")
        unknown = set(data) - {"f", "kind", "seed", "min_side"}
        if unknown:
            raise ValueError(f"ProjectionSpec.from_dict: unknown keys {sorted(unknown)}")
        return cls(**data)


def layer_seed(seed: int, layer_name: str, side: str) -> int:
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
    message = f"{_SEED_DOMAIN}\0{seed}\0{layer_name}\0{side}".encode("utf-8")
    digest = hashlib.sha256(message).digest()
    # 63 bits: fits every API that takes a signed 64-bit seed.
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def projection_matrix(dim: int, spec: ProjectionSpec, layer_name: str, side: str) -> torch.Tensor:
    """The ``(dim, reduced_dim(dim, spec.f, spec.min_side))`` fp32 CPU projection for one side.

    A side that is not shrunk gets the identity: a square random matrix would only distort the
    metric (it is not orthogonal). Otherwise the entries are drawn on the CPU from a generator
    seeded by :func:`layer_seed`, so the same arguments give the same matrix everywhere; move it
    to the compute device afterwards.
    """
    if not isinstance(spec, ProjectionSpec):
        raise ValueError(f"spec must be a ProjectionSpec, got {type(spec).__name__}")
    d = reduced_dim(dim, spec.f, spec.min_side)
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


@dataclass(frozen=True)
class LayerProjection:
    """The pair of projections of one layer, on one device.

    Attributes:
        P_in: ``(I, d_in)`` fp32, applied to the layer inputs ``X`` (..., I).
        P_out: ``(O, d_out)`` fp32, applied to the output gradients ``Δ`` (..., O).
        in_identity, out_identity: that side's matrix is the identity (an unshrunk side of a
            random projection); :meth:`project_in` / :meth:`project_out` then skip the matmul.
    """

    P_in: torch.Tensor
    P_out: torch.Tensor
    in_identity: bool = False
    out_identity: bool = False

    def __post_init__(self) -> None:
        for label, P in (("P_in", self.P_in), ("P_out", self.P_out)):
            if not isinstance(P, torch.Tensor) or P.dim() != 2:
                shape = tuple(P.shape) if isinstance(P, torch.Tensor) else type(P).__name__
                raise ValueError(f"LayerProjection.{label} must be a 2-D tensor, got {shape}")
            if P.dtype != torch.float32:
                raise ValueError(f"LayerProjection.{label} must be float32, got {P.dtype}")
        for label, P, eye in (("P_in", self.P_in, self.in_identity), ("P_out", self.P_out, self.out_identity)):
            if eye and P.shape[0] != P.shape[1]:
                raise ValueError(f"LayerProjection.{label} must be square when it is the identity, got {tuple(P.shape)}")
        if self.P_in.device != self.P_out.device:
            raise ValueError(
                f"LayerProjection P_in on {self.P_in.device} but P_out on {self.P_out.device}"
            )

    @property
    def identity(self) -> bool:
        """Both sides are identities: the captured gradient is the exact weight gradient."""
        return self.in_identity and self.out_identity

    @property
    def in_features(self) -> int:
        return self.P_in.shape[0]

    @property
    def out_features(self) -> int:
        return self.P_out.shape[0]

    @property
    def d_in(self) -> int:
        return self.P_in.shape[1]

    @property
    def d_out(self) -> int:
        return self.P_out.shape[1]

    @property
    def device(self) -> torch.device:
        return self.P_in.device

    def to(self, device: torch.device | str) -> "LayerProjection":
        """The same projection on ``device`` (``self`` when it is already there)."""
        device = torch.device(device)
        if self.P_in.device == device:
            return self
        return LayerProjection(self.P_in.to(device), self.P_out.to(device), self.in_identity, self.out_identity)

    @torch.no_grad()
    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., I) -> x P_in (..., d_in)`` in fp32."""
        x = x.to(torch.float32)
        return x if self.in_identity else x @ self.P_in

    @torch.no_grad()
    def project_out(self, delta: torch.Tensor) -> torch.Tensor:
        """``Δ (..., O) -> Δ P_out (..., d_out)`` in fp32."""
        delta = delta.to(torch.float32)
        return delta if self.out_identity else delta @ self.P_out


def make_projections(
    layers: Iterable["LayerInfo"], spec: ProjectionSpec, device: torch.device | str = "cpu"
) -> dict[str, LayerProjection]:
    """One :class:`LayerProjection` per tracked layer, keyed by layer name, on ``device``.

    ``layers`` are :class:`lorif_stream.capture.LayerInfo` (anything with ``name``,
    ``in_features``, ``out_features``, ``d_in``, ``d_out``); their ``d_in``/``d_out`` must agree
    with ``spec.f``, which catches layers listed with one factor and projected with another.
    """
    projections: dict[str, LayerProjection] = {}
    for layer in layers:
        for side, dim, d in (
            ("in", layer.in_features, layer.d_in),
            ("out", layer.out_features, layer.d_out),
        ):
            if reduced_dim(dim, spec.f, spec.min_side) != d:
                raise ValueError(
                    f"layer {layer.name!r}: d_{side}={d} does not match f={spec.f}, min_side={spec.min_side} "
                    f"(expected {reduced_dim(dim, spec.f, spec.min_side)} for {dim} features)"
                )
        if layer.name in projections:
            raise ValueError(f"duplicate layer name {layer.name!r}")
        P_in = projection_matrix(layer.in_features, spec, layer.name, "in")
        P_out = projection_matrix(layer.out_features, spec, layer.name, "out")
        projections[layer.name] = LayerProjection(P_in, P_out, layer.d_in == layer.in_features,
                                                  layer.d_out == layer.out_features).to(device)
    return projections
