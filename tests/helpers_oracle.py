"""Independent oracles shared by the tests: explicit per-example gradients from torch.func."""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap


def per_example_grads(model, examples):
    """{layer: (N, O*I) fp64} weight gradients of each (x, y) example's cross-entropy, by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.stack([e[0] for e in examples])
    y = torch.stack([e[1] for e in examples])

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {name[: -len(".weight")]: g[name].reshape(len(examples), -1).double()
            for name in params if name.endswith(".weight")}
