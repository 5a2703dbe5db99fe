"""Projections and hook-based per-example projected gradients, against independent oracles.

The oracle for every gradient is ``torch.func``: ``vmap(grad(per-example loss))`` over
``functional_call``, which never goes near the hooks, followed by ``P_out^T ∇W P_in``.
"""

from __future__ import annotations

import json
import weakref
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from helpers_models import tiny_gpt2, tiny_mlp
from lorif_stream.capture import GradientCapture, LayerInfo, model_fingerprint, tracked_layers
from lorif_stream.factorize import factorize
from lorif_stream.projection import (
    LayerProjection,
    ProjectionSpec,
    layer_seed,
    make_projections,
    projection_matrix,
    reduced_dim,
)


# --------------------------------------------------------------------------------------------
# helpers


def expected_projected(grad_w: torch.Tensor, layer: LayerInfo, proj: LayerProjection) -> torch.Tensor:
    """``P_out^T ∇W P_in`` per example from per-example parameter gradients (B, *weight shape)."""
    # HF Conv1D stores W as (I, O): its gradient must be transposed to the (O, I) convention.
    grad_oi = grad_w if layer.kind == "linear" else grad_w.transpose(1, 2)
    return proj.out.matrix().T @ grad_oi @ proj.inp.matrix()


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    assert scale > 0, "oracle is identically zero: the test would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def mlp_oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example weight gradients of a sum-over-positions CE loss, via torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        logits = functional_call(model, p, (xi[None],))[0]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yi.reshape(-1), reduction="sum")

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def mlp_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    per_pos = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
    )
    return per_pos.view(x.shape[0], -1).sum(dim=1)


def capture(model, layers, spec, fn):
    projections = make_projections(layers, spec, "cpu")
    with GradientCapture(model, layers, projections) as cap:
        grads = cap.projected_gradients(fn())
    return grads, projections


# --------------------------------------------------------------------------------------------
# projection.py


def test_reduced_dim_and_validation():
    assert reduced_dim(768, 4) == 192
    assert reduced_dim(3, 4) == 1  # never zero
    assert reduced_dim(10, 1) == 10
    for args, named in [((0, 4), "got 0"), ((8, 0), "got 0"), ((8, True), "got True"), ((8.0, 2), "got 8.0")]:
        with pytest.raises(ValueError, match=named):
            reduced_dim(*args)


def test_projection_spec_validates_and_roundtrips():
    spec = ProjectionSpec(f=8, kind="gaussian", seed=3)
    assert ProjectionSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="0"):
        ProjectionSpec(f=0)
    with pytest.raises(ValueError, match="'sparse'"):
        ProjectionSpec(kind="sparse")
    with pytest.raises(ValueError, match="-1"):
        ProjectionSpec(seed=-1)
    with pytest.raises(ValueError, match="extra"):
        ProjectionSpec.from_dict({"f": 2, "extra": 1})


def test_layer_seed_is_a_fixed_function_of_its_arguments():
    # Golden values: a change here silently invalidates every existing index.
    assert layer_seed(0, "transformer.h.0.mlp.c_fc", "in") == 2528822078229298472
    assert layer_seed(0, "transformer.h.0.mlp.c_fc", "out") == 2094566859786045203
    assert layer_seed(7, "fc", "in") == 2544143480158587710
    with pytest.raises(ValueError, match="'up'"):
        layer_seed(0, "fc", "up")


def test_projection_matrix_golden_and_deterministic():
    P = projection_matrix(8, ProjectionSpec(f=4), "fc", "in")
    assert P.shape == (8, 2) and P.dtype == torch.float32 and P.device.type == "cpu"
    golden_signs = [[1, -1], [-1, -1], [1, -1], [1, 1], [1, -1], [-1, -1], [1, 1], [-1, 1]]
    torch.testing.assert_close(P, torch.tensor(golden_signs, dtype=torch.float32) / math.sqrt(2))
    assert torch.equal(P, projection_matrix(8, ProjectionSpec(f=4), "fc", "in"))


def test_projections_differ_across_layers_sides_seeds_and_kinds():
    spec = ProjectionSpec(f=4)
    base = projection_matrix(64, spec, "a", "in")
    assert not torch.equal(base, projection_matrix(64, spec, "b", "in"))
    assert not torch.equal(base, projection_matrix(64, spec, "a", "out"))
    assert not torch.equal(base, projection_matrix(64, ProjectionSpec(f=4, seed=1), "a", "in"))
    assert not torch.equal(base, projection_matrix(64, ProjectionSpec(f=4, kind="gaussian"), "a", "in"))


def test_identity_for_f1():
    P = projection_matrix(5, ProjectionSpec(f=1), "x", "in")
    assert torch.equal(P, torch.eye(5))
    lp = make_projections([LayerInfo("x", "linear", 5, 3, 5, 3)], ProjectionSpec(f=1))["x"]
    assert lp.identity
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.equal(lp.project_in(x), x.float())


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_scale_preserves_norms(kind):
    dim, f = 512, 4
    P = projection_matrix(dim, ProjectionSpec(f=f, kind=kind, seed=5), "layer", "in")
    d = dim // f
    if kind == "rademacher":
        assert torch.allclose(P.abs(), torch.full_like(P, 1 / math.sqrt(d)))
    else:
        assert abs(P.pow(2).mean().item() * d - 1) < 0.02  # variance 1/d
    # E[P P^T] = I: squared norms are preserved on average.
    x = torch.randn(2000, dim, generator=torch.Generator().manual_seed(0))
    ratio = (x @ P).pow(2).sum(1).mean() / x.pow(2).sum(1).mean()
    assert abs(ratio.item() - 1) < 0.03


def test_layer_projection_validation_and_to():
    with pytest.raises(ValueError, match="2-D"):
        LayerProjection.dense(torch.zeros(3), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="float32"):
        LayerProjection.dense(torch.zeros(3, 1, dtype=torch.float64), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="SideProjection"):
        LayerProjection(torch.zeros(3, 1), torch.zeros(2, 1))
    lp = LayerProjection.dense(torch.zeros(3, 1), torch.zeros(2, 1))
    assert lp.to("cpu") is lp
    with pytest.raises(ValueError, match="d_in=2"):
        make_projections([LayerInfo("x", "linear", 8, 8, 2, 2)], ProjectionSpec(f=2))


# --------------------------------------------------------------------------------------------
# LayerInfo / tracked_layers / model_fingerprint


def test_layer_info_validates_and_roundtrips():
    info = LayerInfo("h.0.mlp.c_fc", "conv1d", 32, 128, 8, 32)
    assert info.D == 256
    assert LayerInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    with pytest.raises(ValueError, match="'conv2d'"):
        LayerInfo("a", "conv2d", 4, 4, 1, 1)
    with pytest.raises(ValueError, match="d_in"):
        LayerInfo("a", "linear", 4, 4, 0, 1)
    with pytest.raises(ValueError, match="exceed"):
        LayerInfo("a", "linear", 4, 4, 5, 1)


def test_tracked_layers_gpt2_order_kinds_and_conv1d_transpose():
    model = tiny_gpt2()
    layers = tracked_layers(model, None, 4)
    names = [l.name for l in layers]
    assert names == [
        f"transformer.h.{i}.{m}" for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ] + ["lm_head"]
    by_name = {l.name: l for l in layers}
    fc = by_name["transformer.h.0.mlp.c_fc"]  # Conv1D weight (32, 128): 32 in, 128 out
    assert (fc.kind, fc.in_features, fc.out_features, fc.d_in, fc.d_out) == ("conv1d", 32, 128, 8, 32)
    head = by_name["lm_head"]  # Linear weight (97, 32): 32 in, 97 out
    assert (head.kind, head.in_features, head.out_features, head.d_out) == ("linear", 32, 97, 24)

    assert [l.name for l in tracked_layers(model, r"mlp\.c_fc", 4)] == [
        "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"
    ]
    with pytest.raises(ValueError, match="nothing_here"):
        tracked_layers(model, "nothing_here", 4)
    with pytest.raises(ValueError, match=r"invalid.*'\(unclosed'"):
        tracked_layers(model, "(unclosed", 4)


def test_model_fingerprint_tracks_weights_and_layers():
    model = tiny_gpt2(seed=0)
    layers = tracked_layers(model, None, 4)
    fp = model_fingerprint(model, layers)
    assert fp == model_fingerprint(tiny_gpt2(seed=0), layers)  # deterministic
    assert fp != model_fingerprint(tiny_gpt2(seed=1), layers)  # other weights
    assert fp != model_fingerprint(model, layers[:-1])  # other tracked set
    with torch.no_grad():  # a "fine-tune": every weight moves a little
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    assert fp != model_fingerprint(model, layers)


# --------------------------------------------------------------------------------------------
# GradientCapture on an MLP


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])  # (B, I), (B, T, I), (B, T1, T2, I)
def test_mlp_projected_gradients_match_torch_func(batch_size, shape):
    torch.manual_seed(1)
    model = tiny_mlp()
    x = torch.randn(batch_size, *shape, 7)
    y = torch.randint(0, 3, (batch_size, *shape))
    layers = tracked_layers(model, None, 2)
    grads, projections = capture(model, layers, ProjectionSpec(f=2, seed=4), lambda: mlp_losses(model, x, y))
    oracle = mlp_oracle(model, x, y)
    for layer in layers:
        G = grads[layer.name]
        assert G.shape == (batch_size, layer.d_out, layer.d_in) and G.dtype == torch.float32
        expected = expected_projected(oracle[f"{layer.name}.weight"], layer, projections[layer.name])
        assert_close_rel(G, expected)


def test_f1_one_token_is_exact_and_rank1_factorisation_is_lossless():
    model = tiny_mlp(seed=2)
    x = torch.randn(8, 7)
    y = torch.randint(0, 3, (8,))
    layers = tracked_layers(model, None, 1)
    grads, _ = capture(model, layers, ProjectionSpec(f=1), lambda: mlp_losses(model, x, y))
    oracle = mlp_oracle(model, x, y)
    for layer in layers:
        G = grads[layer.name]
        assert_close_rel(G, oracle[f"{layer.name}.weight"], rel=1e-5)  # the exact gradient
        L, R = factorize(G, 1)
        assert_close_rel(L @ R.mT, G, rel=1e-5)  # one token: rank 1, nothing lost


def test_rows_do_not_depend_on_batch_mates():
    model = tiny_mlp(seed=3)
    x = torch.randn(8, 4, 7)
    y = torch.randint(0, 3, (8, 4))
    layers = tracked_layers(model, None, 2)
    spec = ProjectionSpec(f=2)
    full, _ = capture(model, layers, spec, lambda: mlp_losses(model, x, y))
    other_x = torch.cat([x[:1], 5 * torch.randn(3, 4, 7)])
    other_y = torch.cat([y[:1], torch.randint(0, 3, (3, 4))])
    alone, _ = capture(model, layers, spec, lambda: mlp_losses(model, x[:1], y[:1]))
    mixed, _ = capture(model, layers, spec, lambda: mlp_losses(model, other_x, other_y))
    for layer in layers:
        assert_close_rel(alone[layer.name][0], full[layer.name][0])
        assert_close_rel(mixed[layer.name][0], full[layer.name][0])


class TwiceNet(nn.Module):
    """One Linear applied twice (weights shared across calls), one Linear left unused."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.unused = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        self.unused(h)  # computed, never reaches the loss
        return self.out(h)


def test_module_called_twice_sums_and_unused_module_is_zero():
    torch.manual_seed(5)
    model = TwiceNet().eval()
    x = torch.randn(4, 3, 5)
    y = torch.randint(0, 3, (4, 3))
    layers = tracked_layers(model, None, 2)
    grads, projections = capture(model, layers, ProjectionSpec(f=2), lambda: mlp_losses(model, x, y))
    oracle = mlp_oracle(model, x, y)
    for layer in layers:
        if layer.name == "unused":
            assert torch.equal(grads["unused"], torch.zeros(4, layer.d_out, layer.d_in))
            continue
        expected = expected_projected(oracle[f"{layer.name}.weight"], layer, projections[layer.name])
        assert_close_rel(grads[layer.name], expected)
    # the shared layer really is the sum of two calls, not one of them
    assert grads["shared"].abs().max() > 0


def test_param_grad_untouched_hooks_removed_and_state_reset():
    model = tiny_mlp(seed=6)
    layers = tracked_layers(model, None, 2)
    projections = make_projections(layers, ProjectionSpec(f=2), "cpu")
    x1, y1 = torch.randn(3, 7), torch.randint(0, 3, (3,))
    x2, y2 = torch.randn(3, 7), torch.randint(0, 3, (3,))
    with GradientCapture(model, layers, projections) as cap:
        first = cap.projected_gradients(mlp_losses(model, x1, y1))
        second = cap.projected_gradients(mlp_losses(model, x2, y2))
        assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    with GradientCapture(model, layers, projections) as cap:
        again = cap.projected_gradients(mlp_losses(model, x2, y2))
    for name in first:
        torch.testing.assert_close(second[name], again[name])  # nothing leaked from batch 1
        assert not torch.allclose(first[name], second[name])


def test_capture_errors_are_clear():
    model = tiny_mlp(seed=7)
    layers = tracked_layers(model, None, 2)
    projections = make_projections(layers, ProjectionSpec(f=2), "cpu")
    x, y = torch.randn(3, 7), torch.randint(0, 3, (3,))
    with GradientCapture(model, layers, projections) as cap:
        with pytest.raises(ValueError, match=r"\(B,\)"):
            cap.projected_gradients(mlp_losses(model, x, y).view(3, 1))
        with pytest.raises(ValueError, match="batch of 3 but losses has 2"):
            cap.projected_gradients(mlp_losses(model, x, y)[:2])
        with torch.no_grad(), pytest.raises(ValueError, match="layer '0' does not require grad"):
            mlp_losses(model, x, y)  # refused at the forward, before any backward
        # after the errors the capture is clean and usable again
        assert cap.projected_gradients(mlp_losses(model, x, y))["0"].shape == (3, 6, 3)
    with pytest.raises(ValueError, match="no projection"):
        GradientCapture(model, layers, {})
    with pytest.raises(ValueError, match="'missing'"):
        GradientCapture(model, [LayerInfo("missing", "linear", 7, 12, 3, 6)], projections)


# --------------------------------------------------------------------------------------------
# GradientCapture on a tiny GPT-2 (HF Conv1D + tied Linear head), with padding


def gpt2_losses(model, input_ids, attention_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    ce = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return ce.sum(dim=1)


def gpt2_oracle(model, input_ids, attention_mask):
    # tie_weights=False + an explicit lm_head.weight: the head's own gradient, not the sum with
    # the (tied) embedding's, because tracking is per module.
    params = {k: v.detach() for k, v in model.named_parameters()}
    params["lm_head.weight"] = model.lm_head.weight.detach().clone()

    def loss_one(p, ids, mask):
        out = functional_call(model, p, (), {"input_ids": ids[None], "attention_mask": mask[None]}, tie_weights=False)
        labels = ids[1:].masked_fill(mask[1:] == 0, -100)
        return nn.functional.cross_entropy(out.logits[0, :-1], labels, ignore_index=-100, reduction="sum")

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, input_ids, attention_mask)


@pytest.fixture(scope="module")
def gpt2_batch():
    gen = torch.Generator().manual_seed(11)
    lengths = [12, 3, 9, 12, 1, 7, 10, 5]  # a 1-token example has no target: zero gradient
    input_ids = torch.randint(3, 97, (8, 12), generator=gen)
    attention_mask = torch.zeros(8, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        attention_mask[i, :n] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 1)  # pad id
    return input_ids, attention_mask, lengths


@pytest.mark.parametrize("rows", [[2], list(range(8))])  # B=1 (9 tokens + 3 pads) and B=8
def test_gpt2_padded_batch_matches_torch_func(gpt2_batch, rows):
    input_ids, attention_mask, lengths = gpt2_batch
    input_ids, attention_mask = input_ids[rows], attention_mask[rows]
    model = tiny_gpt2()
    layers = tracked_layers(model, None, 2)
    grads, projections = capture(
        model, layers, ProjectionSpec(f=2, seed=9), lambda: gpt2_losses(model, input_ids, attention_mask)
    )
    oracle = gpt2_oracle(model, input_ids, attention_mask)
    for layer in layers:
        expected = expected_projected(oracle[f"{layer.name}.weight"], layer, projections[layer.name])
        assert_close_rel(grads[layer.name], expected)
        if len(rows) > 4:  # example 4 has one token, hence no target and a zero gradient
            assert torch.equal(grads[layer.name][4], torch.zeros(layer.d_out, layer.d_in))
    assert all(p.grad is None for p in model.parameters())


def test_gpt2_example_alone_unpadded_equals_its_padded_row(gpt2_batch):
    input_ids, attention_mask, lengths = gpt2_batch
    model = tiny_gpt2()
    layers = tracked_layers(model, r"c_fc|lm_head", 2)
    spec = ProjectionSpec(f=2, seed=9)
    batched, _ = capture(model, layers, spec, lambda: gpt2_losses(model, input_ids, attention_mask))
    for i in (1, 2):  # short examples padded to 12 in the batch
        n = lengths[i]
        ids, mask = input_ids[i:i + 1, :n], attention_mask[i:i + 1, :n]
        alone, _ = capture(model, layers, spec, lambda: gpt2_losses(model, ids, mask))
        for layer in layers:
            assert_close_rel(alone[layer.name][0], batched[layer.name][i])


# --------------------------------------------------------------------------------------------
# capture inside the backward: memory, precision, checkpointing, in-place outputs


class DeepNet(nn.Module):
    """Six Linear layers, the third widening 8 -> 16 (the capture anchors it at its input);
    `checkpoint` wraps the third and fourth in activation checkpointing, and `in_place` scales the
    outputs of the widening layer and of the last one in place after the layers ran."""

    def __init__(self, checkpoint: str | None = None, in_place: bool = False):
        super().__init__()
        widths = [5, 8, 8, 16, 8, 8, 3]
        self.blocks = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.checkpoint = checkpoint
        self.in_place = in_place

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        def run(t, block):
            out = block(t)
            if self.in_place and block.out_features > block.in_features:
                out.mul_(1.5)
            return torch.tanh(out)

        h = self.blocks[0](x)
        for i, block in enumerate(self.blocks[1:-1]):
            if self.checkpoint is not None and i in (1, 2):
                h = checkpoint(run, h, block, use_reentrant=self.checkpoint == "reentrant")
            else:
                h = run(h, block)
        out = self.blocks[-1](h)
        if self.in_place:
            out.mul_(2.0)  # the layer's output, modified after its hook ran
        return out


def deep_net(**kw) -> DeepNet:
    torch.manual_seed(21)
    return DeepNet(**kw).eval()


@pytest.mark.parametrize("variant", [{"checkpoint": "non-reentrant"}, {"in_place": True}, {"frozen": True}])
def test_checkpointed_in_place_and_frozen_models_match_torch_func(variant):
    frozen = variant.pop("frozen", False)
    model = deep_net(**variant)
    x, y = torch.randn(4, 3, 5), torch.randint(0, 3, (4, 3))
    if frozen:  # autograd keeps no input for a weight gradient: the capture projects in the forward
        model.requires_grad_(False)
        x.requires_grad_(True)
    layers = tracked_layers(model, None, 2)
    grads, projections = capture(model, layers, ProjectionSpec(f=2, seed=3), lambda: mlp_losses(model, x, y))
    # torch.func cannot differentiate through checkpointing: the same weights, checkpoints off
    oracle = mlp_oracle(deep_net(in_place=model.in_place), x, y)
    for layer in layers:
        expected = expected_projected(oracle[f"{layer.name}.weight"], layer, projections[layer.name])
        assert_close_rel(grads[layer.name], expected)


@pytest.mark.parametrize("mode", ["trainable", "frozen", "autocast"])
def test_the_forward_keeps_an_alias_where_autograd_keeps_the_input(mode):
    """A trainable weight makes autograd save the layer's input anyway: the forward keeps that very
    tensor (no copy, no work) and projects it when Δ arrives. A frozen one does not: the forward
    keeps the projection instead, so memory scales with d_in; so does autocast, whose layers save a
    bf16 copy, not the fp32 input. (A no_grad around the forward hook once made the first branch
    unreachable: every input was projected in the forward.)"""
    kept_kinds: list[str] = []

    class Watching(GradientCapture):
        def _consume(self, name, kept, delta):
            kept_kinds.append("alias" if hasattr(kept, "x") else "projection")
            super()._consume(name, kept, delta)

    model = deep_net()
    x, y = torch.randn(4, 3, 5), torch.randint(0, 3, (4, 3))
    if mode == "frozen":
        model.requires_grad_(False)
        x.requires_grad_(True)
    layers = tracked_layers(model, None, 2)
    with Watching(model, layers, make_projections(layers, ProjectionSpec(f=2), "cpu")) as cap:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            losses = mlp_losses(model, x, y)
        cap.projected_gradients(losses)
    assert kept_kinds == ["alias" if mode == "trainable" else "projection"] * len(layers)


def test_an_input_changed_in_place_after_its_layer_used_it_is_refused_not_projected():
    """The kept alias would hold the changed values; training would fail on the saved tensor, but a
    backward that forms no weight gradient never unpacks the first layer's, so the capture checks."""

    class ChangesItsInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(5, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = x * 1.0
            out = self.second(torch.tanh(self.first(h)))
            h.mul_(2)  # after `first` used it
            return out

    torch.manual_seed(0)
    model = ChangesItsInput().eval()
    layers = tracked_layers(model, None, 1)
    x, y = torch.randn(4, 3, 5), torch.randint(0, 3, (4, 3))
    with GradientCapture(model, layers, make_projections(layers, ProjectionSpec(f=1), "cpu")) as cap:
        with pytest.raises(RuntimeError, match=r"the input of layer 'first' was modified in place after the layer used it"):
            cap.projected_gradients(mlp_losses(model, x, y))


def test_a_widening_layer_is_anchored_at_its_input_and_returns_its_output_untouched():
    """Adding the anchor to an output 16x the input (an LM head's logits) and summing its gradient
    back cost more than the head's projection: a widening layer that is not the forward's first
    tracked call gets the anchor on its input, and its output goes on as the layer made it."""
    made: dict[str, str] = {}
    model = deep_net()
    layers = tracked_layers(model, None, 2)
    x, y = torch.randn(4, 3, 5), torch.randint(0, 3, (4, 3))
    with GradientCapture(model, layers, make_projections(layers, ProjectionSpec(f=2), "cpu")) as cap:
        # registered after the capture's hooks: sees what they hand on
        watch = [model.blocks[i].register_forward_hook(lambda m, a, o, i=i: made.__setitem__(i, o.grad_fn.name()))
                 for i in (0, 2)]
        grads = cap.projected_gradients(mlp_losses(model, x, y))
    for handle in watch:
        handle.remove()
    assert made[0] == "AddBackward0"  # the first call (5 -> 8 widens too) has no earlier anchor to rely on
    assert made[2] == "ViewBackward0", made  # F.linear's own output over (B, T, I)
    oracle = mlp_oracle(deep_net(), x, y)
    layer = layers[2]
    assert layer.name == "blocks.2" and layer.out_features > layer.in_features
    expected = expected_projected(oracle["blocks.2.weight"], layer, make_projections(layers, ProjectionSpec(f=2), "cpu")["blocks.2"])
    assert_close_rel(grads["blocks.2"], expected)


class KeywordNet(nn.Module):
    """A widening layer called with its input as a keyword, after another tracked layer, on 2-D
    inputs (its output is no view) and followed by an in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.first, self.wide, self.out = nn.Linear(5, 4), nn.Linear(4, 9), nn.Linear(9, 3)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.out(nn.functional.relu(self.wide(input=h), inplace=True))


def test_an_input_anchor_reaches_keyword_inputs_and_outputs_changed_in_place():
    torch.manual_seed(4)
    model = KeywordNet().eval()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    layers = tracked_layers(model, None, 1)
    grads, _ = capture(model, layers, ProjectionSpec(f=1), lambda: mlp_losses(model, x, y))
    oracle = mlp_oracle(model, x, y)
    for layer in layers:
        assert_close_rel(grads[layer.name], oracle[f"{layer.name}.weight"])


def test_reentrant_checkpointing_is_refused_naming_the_layer():
    model = deep_net(checkpoint="reentrant")
    layers = tracked_layers(model, None, 2)
    projections = make_projections(layers, ProjectionSpec(f=2), "cpu")
    x, y = torch.randn(4, 3, 5), torch.randint(0, 3, (4, 3))
    with GradientCapture(model, layers, projections) as cap:
        with pytest.raises(ValueError, match=r"layer 'blocks.2' does not require grad.*use_reentrant=False"):
            mlp_losses(model, x, y)
        assert cap._calls == []  # the aborted forward left nothing behind


def test_output_gradients_are_consumed_one_layer_at_a_time():
    """When a layer's Δ reaches the hook, the Δ of every layer after it has been freed: the
    capture's extra memory is one layer's Δ, not all of them."""
    alive: list[int] = []

    class Watching(GradientCapture):
        def _consume(self, name, kept, delta):
            alive.append(sum(ref() is not None for ref in seen))
            seen.append(weakref.ref(delta))
            super()._consume(name, kept, delta)

    seen: list = []
    model = deep_net()
    layers = tracked_layers(model, None, 2)
    x, y = torch.randn(4, 3, 5), torch.randint(0, 3, (4, 3))
    with Watching(model, layers, make_projections(layers, ProjectionSpec(f=2), "cpu")) as cap:
        cap.projected_gradients(mlp_losses(model, x, y))
    assert len(alive) == len(layers) == 6
    assert alive == [0] * 6, f"earlier output gradients still alive when the next layer ran: {alive}"


@pytest.mark.parametrize("mode", ["bf16-weights", "autocast"])
def test_low_precision_models_accumulate_in_fp32_and_match_torch_func(mode):
    model = deep_net()
    x, y = torch.randn(6, 4, 5), torch.randint(0, 3, (6, 4))
    oracle = mlp_oracle(model, x, y)  # fp32 weights, fp32 math
    layers = tracked_layers(model, None, 2)
    spec = ProjectionSpec(f=2, seed=5)
    if mode == "bf16-weights":
        model = model.to(torch.bfloat16)
        run = lambda: mlp_losses(model, x.to(torch.bfloat16), y)  # noqa: E731
    else:
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return mlp_losses(model, x, y)
    grads, projections = capture(model, layers, spec, run)
    for layer in layers:
        expected = expected_projected(oracle[f"{layer.name}.weight"], layer, projections[layer.name])
        assert grads[layer.name].dtype == torch.float32
        # bf16 keeps 8 bits of mantissa: forward/backward rounding bounds the agreement, not our sums
        err = (grads[layer.name] - expected).norm() / expected.norm()
        assert err < 0.05, f"{mode} {layer.name}: relative error {err:.3g}"


def test_the_engine_cost_over_the_model_is_timed_for_the_progress_bar():
    import io
    import re as _re
    import sys as _sys
    from pathlib import Path as _Path

    from lorif_stream.gradients import GradientSource
    from lorif_stream.progress import Progress

    _sys.path.insert(0, str(_Path(__file__).parent / "tasks"))
    import mlp_task

    task = mlp_task.full()
    source = GradientSource.open(task, ProjectionSpec(f=2), torch.device("cpu"))
    assert source.overhead_text() == ""  # nothing timed yet
    examples = task.train_examples()
    with source.capture() as cap:
        for b in range(0, 24, 8):
            source.projected_gradients(cap, [examples[i] for i in range(b, b + 8)], [str(i) for i in range(8)])
        assert cap.hook_seconds > 0
    assert 0 < source.model_seconds
    text = source.overhead_text()
    assert _re.fullmatch(r"\d+\.\d\dx fwd\+bwd", text) and float(text.split("x")[0]) >= 1.0
    stream = io.StringIO()
    bar = Progress("build", total=24, unit="ex", stream=stream, detail=source.overhead_text)
    bar.update(24)
    bar.close()
    assert "x fwd+bwd" in stream.getvalue()


def test_hooks_compute_at_ieee_fp32_whatever_the_task_sets(monkeypatch):
    """A task's set_float32_matmul_precision("high") (TF32 on CUDA) must not reach the engine's
    projections and sums, and must be the task's again once each hook returns."""
    import lorif_stream.capture as capture_module

    seen = []
    consume = GradientCapture._consume

    def spy(self, name, kept, delta):
        seen.append(torch.get_float32_matmul_precision())
        return consume(self, name, kept, delta)

    monkeypatch.setattr(capture_module.GradientCapture, "_consume", spy)
    torch.manual_seed(1)
    model = tiny_mlp()
    x, y = torch.randn(3, 7), torch.randint(0, 3, (3,))
    layers = tracked_layers(model, None, 2)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        grads, projections = capture(model, layers, ProjectionSpec(f=2, seed=4), lambda: mlp_losses(model, x, y))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen and set(seen) == {"highest"}
    oracle = mlp_oracle(model, x, y)
    for layer in layers:
        assert_close_rel(grads[layer.name], expected_projected(oracle[f"{layer.name}.weight"], layer, projections[layer.name]))
