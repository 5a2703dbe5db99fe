"""Per-example projected gradients of Linear / HF Conv1D layers, captured with hooks.

For a tracked layer ``y = x W^T (+ b)`` (``nn.Linear``; HF ``Conv1D`` computes ``y = x W + b``
with ``W`` stored as (I, O)) one example's weight gradient is ``∇W = Δ^T X``, with ``X`` (T x I)
the layer's inputs at the example's T positions and ``Δ = ∂loss/∂Y`` (T x O). It is never
formed. Instead, per example,

    G = (Δ P_out)^T (X P_in)         (d_out x d_in)  =  P_out^T ∇W P_in

How the pieces are collected:

* a forward hook keeps ``X P_in`` (projected at once, under no_grad, from the detached input:
  memory scales with ``d_in``, not ``I``) and a reference to the module's output tensor;
* :meth:`GradientCapture.projected_gradients` takes the per-example losses ``(B,)`` and gets
  every ``Δ`` in one ``torch.autograd.grad(losses.sum(), outputs)`` call. Differentiating the
  *sum* makes row b of each ``Δ`` depend on example b only (as long as no example's loss reads
  another's: eval mode, no batch norm in train mode), and ``autograd.grad`` never touches any
  parameter's ``.grad``;
* the projected outer products are summed over every position ``(B, ..., I)`` and over every
  call of the module in the forward pass (a module applied twice has ``∇W`` = sum of both).

Padding needs no special care: a padded position's loss is masked, so its ``Δ`` row is zero and
it adds nothing to ``G`` whatever its input.

Not supported: activation (gradient) checkpointing, which re-runs forwards inside backward;
models whose batch is not dimension 0; modules whose forward is bypassed (e.g. the ``out_proj``
of ``nn.MultiheadAttention``, whose weight is used functionally: it contributes zeros).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from lorif_stream.projection import LayerProjection, reduced_dim

__all__ = [
    "LAYER_KINDS",
    "LayerInfo",
    "tracked_layers",
    "model_fingerprint",
    "LayerHooks",
    "GradientCapture",
]

LAYER_KINDS = ("linear", "conv1d")

# Weight values sampled per tracked layer by model_fingerprint: enough to tell fine-tuned or
# re-initialised weights apart, cheap enough for a 70B model (a gather of a few hundred values).
_FINGERPRINT_SAMPLES = 256


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LayerInfo:
    """A tracked layer: its qualified name, kind and full / projected sizes.

    ``in_features``/``out_features`` are ``I``/``O`` of ``y = x W^T`` whatever the storage
    layout (HF Conv1D stores ``W`` as (I, O)); ``d_in``/``d_out`` are the projected sizes.
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    d_in: int
    d_out: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ValueError(f"LayerInfo.name must be a str, got {self.name!r}")
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"LayerInfo.kind must be one of {LAYER_KINDS}, got {self.kind!r}")
        for field in ("in_features", "out_features", "d_in", "d_out"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ValueError(
                    f"LayerInfo {self.name!r}: {field} must be a positive int, got {value!r}"
                )
        if self.d_in > self.in_features or self.d_out > self.out_features:
            raise ValueError(
                f"LayerInfo {self.name!r}: projected sizes (d_in={self.d_in}, d_out={self.d_out}) "
                f"exceed the layer's ({self.in_features}, {self.out_features})"
            )

    @property
    def D(self) -> int:
        """Size of the projected gradient, ``d_in * d_out``."""
        return self.d_in * self.d_out

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "d_in": self.d_in,
            "d_out": self.d_out,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LayerInfo":
        if not isinstance(data, dict):
            raise ValueError(f"LayerInfo.from_dict expects a dict, got {type(data).__name__}")
        return cls(**data)


def _layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` or None for modules that are not tracked."""
    if isinstance(module, nn.Linear):
        return "linear"
    # HF Conv1D detected by name so that transformers stays an optional dependency.
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return "conv1d"
    return None


def _features(module: nn.Module, kind: str) -> tuple[int, int]:
    """``(I, O)`` of a tracked module."""
    rows, cols = module.weight.shape
    # Linear stores (O, I); HF Conv1D stores (I, O).
    return (cols, rows) if kind == "linear" else (rows, cols)


def tracked_layers(model: nn.Module, pattern: str | None, f: int, min_side: int = 1) -> list[LayerInfo]:
    """Every ``nn.Linear`` / HF ``Conv1D`` whose qualified name matches ``re.search(pattern)``.

    Layers come in ``model.named_modules()`` order (a module registered under two names is
    listed once, under its first name). ``pattern=None`` tracks them all. ``f`` and ``min_side``
    set ``d_in``/``d_out`` (:func:`lorif_stream.projection.reduced_dim`).
    """
    try:
        regex = re.compile(pattern) if pattern is not None else None
    except (re.error, TypeError) as exc:
        raise ValueError(f"invalid tracked-modules pattern {pattern!r}: {exc}") from None
    reduced_dim(1, f, min_side)  # validates f and min_side with a clear message
    layers: list[LayerInfo] = []
    for name, module in model.named_modules():
        kind = _layer_kind(module)
        if kind is None or (regex is not None and regex.search(name) is None):
            continue
        I, O = _features(module, kind)
        layers.append(LayerInfo(name, kind, I, O, reduced_dim(I, f, min_side), reduced_dim(O, f, min_side)))
    if not layers:
        what = "any" if pattern is None else f"pattern {pattern!r}"
        raise ValueError(f"no nn.Linear / Conv1D module of {type(model).__name__} matches {what}")
    return layers


@torch.no_grad()
def model_fingerprint(model: nn.Module, layers: Iterable[LayerInfo]) -> str:
    """A hex digest identifying the tracked layers *and* their current weights.

    Hashes each tracked layer's name, kind and shape plus a deterministic strided sample of
    its weight (and bias) values -- not the whole model, so it stays fast on a 70B model. A
    different architecture, different tracked layers or different (e.g. fine-tuned) weights give
    a different fingerprint; so does a different weight dtype, which changes the gradients too.
    """
    modules = dict(model.named_modules())
    digest = hashlib.sha256(b"lorif-stream/fingerprint/v1")
    for layer in layers:
        module = modules.get(layer.name)
        if module is None:
            raise ValueError(f"tracked layer {layer.name!r} is not a module of the model")
        header = f"\0{layer.name}\0{layer.kind}\0{layer.in_features}\0{layer.out_features}"
        digest.update(header.encode("utf-8"))
        for label in ("weight", "bias"):
            param = getattr(module, label, None)
            if not isinstance(param, torch.Tensor):
                digest.update(f"\0no-{label}".encode())
                continue
            digest.update(f"\0{label}\0{tuple(param.shape)}\0{param.dtype}".encode())
            flat = param.detach().reshape(-1)
            n = flat.numel()
            if n == 0:
                continue
            idx = torch.linspace(0, n - 1, min(n, _FINGERPRINT_SAMPLES), dtype=torch.float64)
            idx = idx.round().to(torch.long).to(flat.device)
            # fp64 holds every fp32/bf16/fp16 value exactly, so the bytes are dtype-stable.
            digest.update(flat[idx].to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()


class LayerHooks:
    """Forward hooks on the tracked layers plus one backward for their output gradients.

    Subclasses decide what to keep of each call's input (:meth:`_keep_input`, e.g. its
    projection) and what to make of the (kept input, output gradient) pairs. The gradient is of
    ``losses.sum()``: row b of each ``Δ`` then depends on example b only, and no parameter's
    ``.grad`` is touched.
    """

    def __init__(self, model: nn.Module, layers: Iterable[LayerInfo]) -> None:
        self.model = model
        self.layers = list(layers)
        if not self.layers:
            raise ValueError(f"{type(self).__name__} needs at least one tracked layer")
        modules = dict(model.named_modules())
        self._modules: dict[str, nn.Module] = {}
        for layer in self.layers:
            if layer.name in self._modules:
                raise ValueError(f"layer {layer.name!r} is listed twice")
            module = modules.get(layer.name)
            if module is None:
                raise ValueError(f"tracked layer {layer.name!r} is not a module of the model")
            kind = _layer_kind(module)
            if kind != layer.kind or _features(module, kind) != (layer.in_features, layer.out_features):
                raise ValueError(
                    f"tracked layer {layer.name!r} is described as {layer.kind} "
                    f"{layer.in_features}->{layer.out_features} but the model has "
                    f"{type(module).__name__} {_features(module, kind) if kind else ''}"
                )
            self._modules[layer.name] = module
        # Per layer, one (kept input, output, output._version) triple per call of the module.
        self._calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self._handles: list = []
        # layers whose forward never ran or whose output did not reach the loss in the last
        # batch (e.g. nn.MultiheadAttention.out_proj, used functionally): their gradients are 0
        self.unused_layers: list[str] = []

    def _keep_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- context manager ------------------------------------------------------------------
    def __enter__(self):
        if self._handles:
            raise RuntimeError(f"{type(self).__name__} is already active (not re-entrant)")
        self.reset()
        for name, module in self._modules.items():
            handle = module.register_forward_hook(self._make_hook(name), with_kwargs=True)
            self._handles.append(handle)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    def reset(self) -> None:
        """Forget everything captured since the last backward."""
        self._calls = {name: [] for name in self._modules}

    # -- hooks ----------------------------------------------------------------------------
    def _make_hook(self, name: str):
        def hook(module, args, kwargs, output):
            if args:
                x = args[0]
            else:  # called as module(input=x) / module(x=x)
                x = kwargs.get("input", kwargs.get("x"))
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                raise RuntimeError(f"{type(self).__name__}: layer {name!r} was called without a tensor input")
            if x.dim() < 2:
                raise RuntimeError(
                    f"{type(self).__name__}: layer {name!r} got an input of shape {tuple(x.shape)}; "
                    "inputs must be batched as (B, ..., I)"
                )
            with torch.no_grad():
                kept = self._keep_input(name, x.detach())
            # The version counter lets the backward refuse outputs modified in place, whose
            # gradient would no longer be the gradient of this layer's output.
            self._calls[name].append((kept, output, output._version))

        return hook

    # -- backward -------------------------------------------------------------------------
    def _output_gradients(self, losses: torch.Tensor, retain_graph: bool) -> dict[str, list[tuple]]:
        """Per layer, one ``(kept input, Δ or None)`` pair per call (None: did not reach the loss)."""
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"losses must be a (B,) tensor of per-example losses, got {shape}")
        if not losses.requires_grad:
            raise ValueError(
                "losses do not require grad: run the forward pass with grad enabled and "
                "parameters that require grad"
            )
        B = losses.shape[0]
        flat: list[torch.Tensor] = []
        for name, calls in self._calls.items():
            for _kept, output, version in calls:
                if output.shape[0] != B:
                    raise ValueError(
                        f"layer {name!r} saw a batch of {output.shape[0]} but losses has {B} rows "
                        "(did an earlier forward pass go without a backward/reset?)"
                    )
                if output._version != version:
                    raise RuntimeError(
                        f"the output of layer {name!r} was modified in place after the layer ran; "
                        "its gradient cannot be captured"
                    )
                if not output.requires_grad:
                    raise ValueError(
                        f"the output of layer {name!r} does not require grad: make its parameters "
                        "require grad and do not run the forward pass under torch.no_grad()"
                    )
                flat.append(output)
        deltas = iter(
            torch.autograd.grad(losses.sum(), flat, allow_unused=True, retain_graph=retain_graph)
            if flat
            else ()
        )
        pairs = {layer.name: [(kept, next(deltas)) for kept, _o, _v in self._calls[layer.name]]
                 for layer in self.layers}
        self.unused_layers = [name for name, calls in pairs.items() if all(d is None for _k, d in calls)]
        return pairs


class GradientCapture(LayerHooks):
    """Context manager that hooks tracked layers and returns per-example projected gradients.

    Usage::

        layers = tracked_layers(model, task.tracked_modules, f=4)
        projections = make_projections(layers, ProjectionSpec(f=4), device)
        with GradientCapture(model, layers, projections) as cap:
            for batch in batches:
                losses = task.loss(model, batch)          # (B,), per-example sums
                G = cap.projected_gradients(losses)       # {name: (B, d_out, d_in) fp32}

    Parameters must require grad (or the layer inputs must), and the forward pass must run with
    grad enabled: the hooks need the outputs to be part of the autograd graph. Captured state is
    cleared after every :meth:`projected_gradients` call; call :meth:`reset` to drop a forward
    pass whose gradients you do not want.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[LayerInfo],
        projections: Mapping[str, LayerProjection],
    ) -> None:
        super().__init__(model, layers)
        self._projections: dict[str, LayerProjection] = {}
        for layer in self.layers:
            proj = projections.get(layer.name)
            if proj is None:
                raise ValueError(f"no projection given for tracked layer {layer.name!r}")
            if (proj.in_features, proj.out_features, proj.d_in, proj.d_out) != (
                layer.in_features, layer.out_features, layer.d_in, layer.d_out
            ):
                raise ValueError(
                    f"projection for {layer.name!r} is ({proj.in_features}x{proj.d_in}, "
                    f"{proj.out_features}x{proj.d_out}) but the layer needs "
                    f"({layer.in_features}x{layer.d_in}, {layer.out_features}x{layer.d_out})"
                )
            self._projections[layer.name] = proj

    def _keep_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        proj = self._projections[name]
        if proj.device != x.device:
            # Models sharded over devices: keep each layer's projection where its input is.
            proj = self._projections[name] = proj.to(x.device)
        # X P_in, not X: memory scales with d_in instead of I
        return proj.project_in(x)

    def projected_gradients(
        self, losses: torch.Tensor, retain_graph: bool = False
    ) -> dict[str, torch.Tensor]:
        """Per-example projected gradients ``{name: (B, d_out, d_in)}`` (fp32) of ``losses``.

        ``losses`` is the ``(B,)`` vector of per-example losses of the forward pass(es) run
        since the last call. The gradient is of ``losses.sum()``; parameter ``.grad`` fields
        are left untouched. A tracked module whose output does not reach the loss (or that
        was not called) gets zeros. Captured state is cleared afterwards.
        """
        try:
            pairs = self._output_gradients(losses, retain_graph)
            return self._project(pairs, losses.shape[0])
        finally:
            self.reset()

    @torch.no_grad()
    def _project(self, pairs: dict[str, list[tuple]], B: int) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            proj = self._projections[layer.name]
            G = torch.zeros(B, layer.d_out, layer.d_in, dtype=torch.float32, device=proj.device)
            for xp, delta in pairs[layer.name]:
                if delta is None:
                    continue
                dp = proj.project_out(delta).reshape(B, -1, layer.d_out)
                # Σ_t outer(Δ_t P_out, X_t P_in) over every position of the example.
                G.baddbmm_(dp.transpose(1, 2), xp.reshape(B, -1, layer.d_in))
            result[layer.name] = G
        return result
