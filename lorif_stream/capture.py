"""Per-example projected gradients of Linear / HF Conv1D layers, captured with hooks.

For a tracked layer ``y = x W^T (+ b)`` (``nn.Linear``; HF ``Conv1D`` computes ``y = x W + b``
with ``W`` stored as (I, O)) one example's weight gradient is ``∇W = Δ^T X``, with ``X`` (T x I)
the layer's inputs at the example's T positions and ``Δ = ∂loss/∂Y`` (T x O). It is never
formed. Instead, per example,

    G = (Δ P_out)^T (X P_in)         (d_out x d_in)  =  P_out^T ∇W P_in

How the pieces are collected (:class:`LayerHooks` has the details):

* a forward hook keeps the layer's input: an alias of the tensor autograd saves anyway to form
  the weight gradient (no extra memory), or, where autograd does not keep it (a frozen weight,
  autocast, activation checkpointing), its projection ``X P_in`` in fp32 (memory scales with ``d_in``);
* :meth:`GradientCapture.projected_gradients` takes the per-example losses ``(B,)`` and runs one
  backward of their *sum*, which makes row b of each ``Δ`` depend on example b only (as long as
  no example's loss reads another's: eval mode, no batch norm in train mode). A tensor hook on
  each tracked output projects its ``Δ`` and adds the per-example products to ``G`` as soon as
  the backward reaches that layer, so the extra memory is about one layer's ``Δ`` at a time plus
  the projected tensors; no parameter's ``.grad`` is computed or touched;
* the projected outer products are summed over every position ``(B, ..., I)`` and over every
  call of the module in the forward pass (a module applied twice has ``∇W`` = sum of both).

Padding needs no special care: a padded position's loss is masked, so its ``Δ`` row is zero and
it adds nothing to ``G`` whatever its input.

Precision: bf16/fp16 models and ``torch.autocast`` work; projections and sums are fp32 (autocast
is switched off inside the hooks). Activation checkpointing works when non-reentrant
(``use_reentrant=False``, the PyTorch default since 2.4); reentrant checkpointing is refused.
Not supported: models whose batch is not dimension 0; modules whose forward is bypassed (e.g.
the ``out_proj`` of ``nn.MultiheadAttention``, whose weight is used functionally: it
contributes zeros).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from lorif_stream.gpu import exact_fp32
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


def tracked_layers(model: nn.Module, pattern: str | None, f: int, min_side: int = 1,
                   max_side: int | None = None) -> list[LayerInfo]:
    """Every ``nn.Linear`` / HF ``Conv1D`` whose qualified name matches ``re.search(pattern)``.

    Layers come in ``model.named_modules()`` order (a module registered under two names is
    listed once, under its first name). ``pattern=None`` tracks them all. ``f``, ``min_side`` and
    ``max_side`` set ``d_in``/``d_out`` (:func:`lorif_stream.projection.reduced_dim`).
    """
    try:
        regex = re.compile(pattern) if pattern is not None else None
    except (re.error, TypeError) as exc:
        raise ValueError(f"invalid tracked-modules pattern {pattern!r}: {exc}") from None
    reduced_dim(max(1, min_side), f, min_side, max_side)  # validates the options with a clear message
    layers: list[LayerInfo] = []
    for name, module in model.named_modules():
        kind = _layer_kind(module)
        if kind is None or (regex is not None and regex.search(name) is None):
            continue
        I, O = _features(module, kind)
        layers.append(LayerInfo(name, kind, I, O, reduced_dim(I, f, min_side, max_side),
                                reduced_dim(O, f, min_side, max_side)))
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


def _full_precision(device: torch.device):
    """IEEE fp32 for our own matmuls whatever the task set: autocast off (projections and sums
    stay fp32 under a task's ``torch.autocast``) and TF32 off (a task's
    ``set_float32_matmul_precision("high")`` stays with its model, so a CUDA index agrees with the
    CPU's).

    A context that switches nothing when nothing is on: the hooks enter it twice per layer per
    batch, and entering both switches costs ~7 µs, a tenth of a small layer's hook."""
    autocast = _autocast_on(device)
    if not autocast and torch.get_float32_matmul_precision() == "highest":
        return contextlib.nullcontext()
    return _switched_to_full_precision(device, autocast)


def _autocast_on(device: torch.device) -> bool:
    """Whether a task's torch.autocast is on for `device` (devices autocast does not know: never)."""
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


@contextlib.contextmanager
def _switched_to_full_precision(device: torch.device, autocast: bool):
    with exact_fp32(), (torch.autocast(device.type, enabled=False) if autocast else contextlib.nullcontext()):
        yield


def _autograd_keeps_input(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether autograd saves this call's input ``x`` itself (to form the weight gradient), so that
    keeping an alias of it costs no memory.

    Not when the weight is frozen; not under autocast, where the layer saves a cast copy and ``x``
    (fp32, wider) would be held beside it; nor under saved-tensor hooks (activation checkpointing,
    offloading), which exist to *not* keep it. Those hooks are only visible through a private
    torch function; where it is missing the answer is "no", which costs memory, never results.
    """
    if not (torch.is_grad_enabled() and module.weight.requires_grad):
        return False
    if _autocast_on(x.device):
        return False
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    except (AttributeError, TypeError, RuntimeError):
        return False


def _layer_input(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs.get("input", kwargs.get("x"))  # module(input=x) / (x=x)
    if not isinstance(x, torch.Tensor):
        raise RuntimeError(f"layer {name!r} was called without a tensor input")
    if x.dim() < 2:
        raise RuntimeError(f"layer {name!r} got an input of shape {tuple(x.shape)}; inputs must be batched as (B, ..., I)")
    return x


def _hookable(output: torch.Tensor) -> torch.Tensor | None:
    """The tensor whose gradient is the layer output's Δ, unchanged by what the model does to the
    output afterwards, or None where there is none (the output is then anchored itself).

    A hook on a tensor receives the gradient of its value when hooked, even if the model later
    changes it in place (``nn.ReLU(inplace=True)``), except on a view: a Linear's output over
    (B, T, I) is a view of its (B·T, O) product, and an in-place change of a view rewrites its
    history so the hook never fires. Its base, in the same element order, takes the hook instead."""
    base = output._base
    if base is None:
        return output
    if (base.numel() == output.numel() and base.is_contiguous() and output.is_contiguous()
            and base.storage_offset() == output.storage_offset() and base.shape[-1] == output.shape[-1]):
        return base
    return None


class LayerHooks:
    """Hooks that hand each tracked layer's (kept input, output gradient) to a subclass, one layer
    at a time, inside one backward pass.

    The forward hook keeps what the subclass wants of the input (:meth:`_keep_input`, e.g. its
    projection), and returns ``output + anchor`` -- ``anchor`` a 0-dim zero leaf that requires
    grad -- with a tensor hook on that sum. A layer whose output is wider than its input and that
    is not the forward's first tracked call (an LM head) gets its anchor added to its input
    instead, by a pre-hook, and its output hooked as it is (:func:`_hookable`): no copy of the
    logits. :meth:`_backward` then asks autograd for the gradient of ``losses.sum()`` with respect
    to the anchors only. So that backward

    * passes every tracked output: each one's hook receives its ``Δ = ∂loss/∂output`` as the
      backward reaches it and hands it to :meth:`_consume`; ``Δ`` is then freed by autograd as
      usual, so at most about one layer's ``Δ`` is alive at a time (asking autograd for the
      outputs themselves would keep every layer's ``Δ`` until the end);
    * computes no parameter gradient and touches no ``.grad``;
    * gives row b of each ``Δ`` from example b only (the gradient is of a *sum* of per-example
      losses, as long as no example's loss reads another's).

    Adding a zero leaves the output's values (and dtype: a 0-dim tensor does not promote) as
    they were. A hook registered before an in-place change of the output still receives the
    gradient of the value the layer produced, so models that modify it in place are fine.
    Non-reentrant activation checkpointing re-runs forwards inside the backward: those calls
    are recognised (they happen while :meth:`_backward` runs) and ignored, since the original
    forward already kept the inputs. Reentrant checkpointing runs the first forward without
    grad and is refused, naming the layer.
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
        self._widens = {layer.name: layer.out_features > layer.in_features for layer in self.layers}
        self._handles: list = []
        self._in_backward = False
        # layers whose forward never ran or whose output did not reach the loss in the last
        # batch (e.g. nn.MultiheadAttention.out_proj, used functionally): their gradients are 0
        self.unused_layers: list[str] = []
        # host seconds spent inside the hooks since creation (kernel launches only on CUDA)
        self.hook_seconds = 0.0
        self.reset()

    def _keep_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What to keep of one call's (detached) input until its ``Δ`` arrives. Called in the
        forward, with the task's grad mode and precision settings: an implementation that computes
        enters ``torch.no_grad()`` and :func:`_full_precision` itself (keeping an alias needs neither)."""
        raise NotImplementedError

    def _consume(self, name: str, kept: torch.Tensor, delta: torch.Tensor) -> None:
        """Use one call's kept input and its output gradient ``Δ`` (called inside the backward)."""
        raise NotImplementedError

    # -- context manager ------------------------------------------------------------------
    def __enter__(self):
        if self._handles:
            raise RuntimeError(f"{type(self).__name__} is already active (not re-entrant)")
        self.reset()
        for name, module in self._modules.items():
            if self._widens[name]:
                self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._make_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    def reset(self) -> None:
        """Forget every forward call captured since the last backward."""
        self._calls: list[_Call] = []
        self._input_anchors: dict[str, torch.Tensor] = {}  # name -> anchor added to its running call's input

    # -- hooks ----------------------------------------------------------------------------
    def _make_pre_hook(self, name: str):
        def pre_hook(module, args, kwargs):
            # A widening layer's anchor goes on its input: on an LM head's output it would copy the
            # logits (1.2 GB fp32 for 2,048 tokens of a 152k vocabulary) and sum its gradient back
            # over them. Not on the forward's first tracked call: a later layer's input gradient is
            # computed anyway for the anchors before it, the first one's would be extra work.
            if self._in_backward or not self._calls:
                return None
            x = _layer_input(name, args, kwargs)
            anchor = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
            self._input_anchors[name] = anchor
            if args:
                return (x + anchor, *args[1:]), kwargs
            key = "input" if "input" in kwargs else "x"
            return args, {**kwargs, key: x + anchor}

        return pre_hook

    def _make_hook(self, name: str):
        def hook(module, args, kwargs, output):
            if self._in_backward:
                return None  # a checkpointed forward re-run for its activations: already kept
            try:
                return anchor(args, kwargs, output)
            except Exception:
                self.reset()  # the forward is aborted: none of its calls may reach a later backward
                raise

        def anchor(args, kwargs, output):
            x = _layer_input(name, args, kwargs)
            if not isinstance(output, torch.Tensor):
                raise RuntimeError(f"{type(self).__name__}: layer {name!r} returned {type(output).__name__}, not a tensor")
            if not output.requires_grad:
                raise ValueError(
                    f"the output of layer {name!r} does not require grad: make its parameters "
                    "require grad, do not run the forward pass under torch.no_grad(), and use "
                    "non-reentrant activation checkpointing (use_reentrant=False) if any"
                )
            start = time.perf_counter()
            kept = self._keep_input(name, x.detach())
            self.hook_seconds += time.perf_counter() - start
            hooked = _hookable(output) if name in self._input_anchors else None
            if hooked is not None:
                anchor, returned = self._input_anchors.pop(name), None
            else:
                self._input_anchors.pop(name, None)  # not needed: this call's backward never asks for it
                anchor = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
                hooked = returned = output + anchor
            call = _Call(name, kept, output.shape, anchor)
            self._calls.append(call)
            hooked.register_hook(self._make_gradient_hook(call))
            return returned

        return hook

    def _make_gradient_hook(self, call: "_Call"):
        def on_gradient(delta: torch.Tensor) -> None:
            start = time.perf_counter()
            # the engine runs hooks with grad mode off already (no create_graph here)
            with _full_precision(delta.device):
                if delta.shape != call.shape:  # a hooked base: seen as the output
                    delta = delta.view(call.shape)
                self._consume(call.name, call.kept, delta)
            call.kept = None  # consumed: free it now, not at the end of the backward
            self.hook_seconds += time.perf_counter() - start

        return on_gradient

    # -- backward -------------------------------------------------------------------------
    def _backward(self, losses: torch.Tensor, retain_graph: bool = False) -> None:
        """Run the backward of ``losses.sum()``, feeding every tracked call to :meth:`_consume`."""
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"losses must be a (B,) tensor of per-example losses, got {shape}")
        if not losses.requires_grad:
            raise ValueError(
                "losses do not require grad: run the forward pass with grad enabled and "
                "parameters that require grad"
            )
        B = losses.shape[0]
        for call in self._calls:
            if call.batch != B:
                raise ValueError(
                    f"layer {call.name!r} saw a batch of {call.batch} but losses has {B} rows "
                    "(did an earlier forward pass go without a backward/reset?)"
                )
        reached: set[str] = set()
        if self._calls:
            self._in_backward = True
            try:
                anchor_grads = torch.autograd.grad(losses.sum(), [c.anchor for c in self._calls],
                                                   allow_unused=True, retain_graph=retain_graph)
            finally:
                self._in_backward = False
            reached = {c.name for c, g in zip(self._calls, anchor_grads) if g is not None}
        self.unused_layers = [l.name for l in self.layers if l.name not in reached]


@dataclass(frozen=True)
class _Unprojected:
    """A layer input kept as it is, to be projected when its output gradient arrives, and its
    version then: an in-place change after the layer used it would be projected silently (autograd
    checks only the saved tensors it unpacks, and a backward that forms no weight gradient may
    unpack none of this layer's)."""

    x: torch.Tensor
    version: int

    def values(self, name: str) -> torch.Tensor:
        if self.x._version != self.version:
            raise RuntimeError(
                f"the input of layer {name!r} was modified in place after the layer used it: its weight "
                "gradient would be wrong (training this model fails the same way); copy it before "
                "changing it (e.g. x = x.clone()) or do not change it in place"
            )
        return self.x


@dataclass
class _Call:
    """One forward call of a tracked layer, until the backward has consumed it."""

    name: str
    kept: torch.Tensor | None
    shape: torch.Size  # of the output
    anchor: torch.Tensor

    @property
    def batch(self) -> int:
        return self.shape[0]


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
        if _autograd_keeps_input(self._modules[name], x):
            return _Unprojected(x, x._version)  # an alias of what autograd saved anyway: projected in the backward
        # X P_in, not X: memory scales with d_in instead of I
        with torch.no_grad(), _full_precision(x.device):
            return proj.project_in(x)

    def reset(self) -> None:
        super().reset()
        self._sums: dict[str, torch.Tensor] = {}

    def _consume(self, name: str, kept: torch.Tensor, delta: torch.Tensor) -> None:
        proj = self._projections[name]
        B = delta.shape[0]
        xp = proj.project_in(kept.values(name)) if isinstance(kept, _Unprojected) else kept
        xp = xp.reshape(B, -1, proj.d_in)
        # Σ_t outer(Δ_t P_out, X_t P_in) over every position of the example (and every call).
        outer = proj.projected_outer(xp, delta.reshape(B, -1, delta.shape[-1]))
        G = self._sums.get(name)
        if G is None:
            self._sums[name] = outer
        else:
            G.add_(outer)

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
            self._backward(losses, retain_graph)
            B = losses.shape[0]
            result = {}
            for layer in self.layers:
                G = self._sums.get(layer.name)
                if G is None:
                    G = torch.zeros(B, layer.d_out, layer.d_in, dtype=torch.float32,
                                    device=self._projections[layer.name].device)
                result[layer.name] = G
            return result
        finally:
            self.reset()
