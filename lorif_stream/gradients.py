"""The producer's first stage: a task's examples -> per-example projected gradients per layer.

Shared by build/append (objective = the training loss) and query (objective = the measurement),
so a query gradient is projected exactly like the stored ones.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .capture import GradientCapture, LayerInfo, model_fingerprint, tracked_layers
from .device import notice, to_device
from .projection import LayerProjection, ProjectionSpec, make_projections
from .store import LayerShape


class NonFiniteGradientError(ValueError):
    """An example's loss or gradient is NaN/inf (names the example)."""


@dataclass
class GradientSource:
    """A task's model on a device with its tracked layers, projections and capture hooks."""

    task: object
    model: torch.nn.Module
    layers: list[LayerInfo]
    spec: ProjectionSpec
    device: torch.device
    fingerprint: str
    # the index's whitened projections; None = the seeded random ones of `spec`
    projections: dict[str, LayerProjection] | None = None
    # host seconds in the task's forward + backward (hooks excluded), and when the first step began:
    # wall time since then over model time is what the engine costs on top of the model (CPU; on
    # CUDA only kernel launches would be timed, so it is not reported there)
    model_seconds: float = 0.0
    first_step_at: float | None = None

    @classmethod
    def open(cls, task, spec: ProjectionSpec, device: torch.device, layers: Sequence[LayerInfo] | None = None):
        """Load the task's model onto `device` (eval mode) and prepare its tracked layers.

        `layers` (from an existing index) pins the tracked set; otherwise the task's
        `tracked_modules` regex chooses (None = every Linear / Conv1D).
        """
        model = task.model()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"task.model() must return a torch.nn.Module, got {type(model).__name__}")
        model = model.to(device).eval()
        found = tracked_layers(model, getattr(task, "tracked_modules", None), spec.f, spec.min_side, spec.max_side)
        if layers is not None:
            by_name = {l.name: l for l in found}
            for want in layers:
                have = by_name.get(want.name)
                if have != want:
                    raise ValueError(
                        f"the task's model does not match the index: layer {want.name!r} is "
                        f"{'missing' if have is None else f'{have.in_features}->{have.out_features}'} "
                        f"(the index has {want.in_features}->{want.out_features})"
                    )
            found = list(layers)
        return cls(task, model, found, spec, device, model_fingerprint(model, found))

    def layout_layers(self) -> tuple[LayerShape, ...]:
        return tuple(LayerShape(l.name, l.d_out, l.d_in) for l in self.layers)

    def select(self, patterns: Sequence[str] | None) -> list[int]:
        """Indices of the layers matching any regex in `patterns` (None = all)."""
        if not patterns:
            return list(range(len(self.layers)))
        chosen = [i for i, l in enumerate(self.layers) if any(re.search(p, l.name) for p in patterns)]
        if not chosen:
            raise ValueError(f"no tracked layer matches --layers {list(patterns)} (layers: {[l.name for l in self.layers]})")
        return chosen

    def capture(self) -> GradientCapture:
        projections = self.projections or make_projections(self.layers, self.spec, self.device)
        return GradientCapture(self.model, self.layers, projections)

    def projected_gradients(self, capture: GradientCapture, examples: list, ids: Sequence[str],
                            objective: str = "loss") -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per layer (B, d_out, d_in) fp32 projected gradients of `objective` for `examples`,
        and a (B,) bool mask of the examples whose objective and gradients are all finite."""
        start, hooks_before = time.perf_counter(), capture.hook_seconds
        if self.first_step_at is None:
            self.first_step_at = start
        batch = to_device(self.task.collate(examples), self.device)
        with torch.enable_grad():
            fn = self.task.loss if objective == "loss" else self.task.measurement
            values = fn(self.model, batch)
            if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.shape[0] != len(examples):
                shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
                raise ValueError(f"task.{objective}() must return a ({len(examples)},) tensor of per-example values, got {shape}")
            finite = torch.isfinite(values.detach())
            grads = capture.projected_gradients(values)
        self.model_seconds += time.perf_counter() - start - (capture.hook_seconds - hooks_before)
        if capture.unused_layers:
            notice(f"{len(capture.unused_layers)} tracked layer(s) never reached the {objective} "
                   f"({', '.join(capture.unused_layers[:3])}{'...' if len(capture.unused_layers) > 3 else ''}): "
                   f"their gradients are zero; exclude them with tracked_modules")
        out = [grads[l.name] for l in self.layers]
        for G in out:
            finite &= finite_rows(G)
        return out, finite


    def overhead_text(self) -> str:
        """E.g. ``"1.31x fwd+bwd"``: wall time since the first step over the time the task's own
        forward+backward took, for a progress bar (empty before a step, and on CUDA)."""
        if self.first_step_at is None or self.model_seconds <= 0 or self.device.type != "cpu":
            return ""
        return f"{(time.perf_counter() - self.first_step_at) / self.model_seconds:.2f}x fwd+bwd"


def finite_rows(G: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: whether every entry of ``G[b]`` is finite. ``0·x`` is 0 for a finite ``x``
    and NaN for inf or NaN, so the row sums say it exactly, in a third of isfinite().all()'s time."""
    return G.flatten(1).mul(0).sum(1) == 0


def describe_nonfinite(ids: Sequence[str], rows: Sequence[int], finite: torch.Tensor) -> str:
    bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
    shown = ", ".join(f"{ids[i]!r} (row {rows[i]})" for i in bad[:5])
    return f"non-finite loss or gradient for example {shown}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
