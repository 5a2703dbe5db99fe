"""Independent oracles shared by the tests: explicit per-example gradients from torch.func and the
exact influence computed from them with dense fp64 solves."""
from __future__ import annotations

import numpy as np
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


def exact_influence(task, damping) -> np.ndarray:
    """(Q, N) Σ_layers g_qᵀ (A + λI)⁻¹ g_i, A = Σ_i g_i g_iᵀ per layer; `damping(A)` gives λ."""
    model = task.model().eval()
    train = per_example_grads(model, task.train_examples())
    queries = per_example_grads(model, task.query_examples())
    total = 0
    for name, G in train.items():
        A = G.T @ G
        lam = damping(A)
        H = torch.linalg.solve(A + lam * torch.eye(A.shape[0], dtype=A.dtype), queries[name].T).T
        total = total + H @ G.T
    return total.numpy()
