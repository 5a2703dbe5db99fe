"""A tiny retrainable multi-token task for the LDS tests (deterministic, no downloads, ~ms per retrain).

Each example is T = 5 token vectors (6-dim) and a class; the model applies one Linear to every
token, tanh, sums over tokens and classifies. The first layer's per-example gradient is a sum
of T outer products, so it has rank up to 5: rank-c factors with c < 5 are lossy, c >= 5 exact
(which a LoRIF == LoGRA test needs; a one-token task would be exact at c = 1 already).

    tests/tasks/seq_task.py:retrainable    the task, with retrain(subset_indices, seed)
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

N_TRAIN, N_QUERY, T, IN, HIDDEN, OUT = 40, 6, 5, 6, 8, 3
STEPS, LR = 30, 0.05


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = N_TRAIN + N_QUERY
    x = torch.randn(n, T, IN, generator=g)
    # a learnable rule (class of the summed first features) plus label noise
    y = (x[:, :, 0].sum(1) > 0).long() + (x[:, :, 1].sum(1) > 1).long()
    flip = torch.rand(n, generator=g) < 0.15
    y = torch.where(flip, torch.randint(0, OUT, (n,), generator=g), y)
    return [(x[i], y[i]) for i in range(n)]


class TokenSumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(IN, HIDDEN)
        self.head = nn.Linear(HIDDEN, OUT)

    def forward(self, x):  # x: (B, T, IN)
        return self.head(torch.tanh(self.enc(x)).sum(dim=1))


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TokenSumNet()


class SeqTask:
    tracked_modules = None
    retrain_key = f"seq-task/adam-{STEPS}-{LR}"

    def __init__(self):
        data = make_data()
        self.train = data[:N_TRAIN]
        self.queries = data[N_TRAIN:]
        self._model = self.retrain(np.arange(N_TRAIN), seed=0)

    def model(self):
        return copy.deepcopy(self._model)

    def train_examples(self):
        return self.train

    def query_examples(self):
        return self.queries

    def collate(self, examples):
        return torch.stack([e[0] for e in examples]), torch.stack([e[1] for e in examples])

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    def retrain(self, subset_indices, seed):
        """Full-batch Adam from the seed's init on the subset only (deterministic)."""
        threads = torch.get_num_threads()
        # one thread: ops this small gain nothing from more, and on a busy shared CPU the
        # spinning of idle OpenMP workers made each retrain ~40x slower
        torch.set_num_threads(1)
        try:
            model = make_model(seed)
            x, y = self.collate([self.train[int(i)] for i in subset_indices])
            opt = torch.optim.Adam(model.parameters(), lr=LR)
            for _ in range(STEPS):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            return model.eval()
        finally:
            torch.set_num_threads(threads)


def retrainable():
    return SeqTask()
