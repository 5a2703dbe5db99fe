"""A tiny MLP classification task for pipeline tests (deterministic, no downloads).

Several variants are exposed as zero-argument factories so the CLI can load them by name:
    tests/tasks/mlp_task.py:full   all 48 training examples
    tests/tasks/mlp_task.py:first  rows 0..29        tests/tasks/mlp_task.py:second  rows 30..47
"""
from __future__ import annotations

import os
import time

import torch
from torch import nn

N_TRAIN, N_QUERY, IN, HIDDEN, OUT = 48, 5, 6, 5, 3


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_QUERY, IN, generator=g)
    y = torch.randint(0, OUT, (N_TRAIN + N_QUERY,), generator=g)
    return [(x[i], y[i]) for i in range(N_TRAIN + N_QUERY)]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


class MLPTask:
    tracked_modules = None

    def __init__(self, rows=(0, N_TRAIN), model_seed: int = 0, nan_row: int | None = None, delay: float = 0.0):
        data = make_data()
        self.train = data[rows[0]:rows[1]]
        self.queries = data[N_TRAIN:]
        self.first = rows[0]
        self.model_seed = model_seed
        self.nan_row = nan_row
        self.delay = delay

    def model(self):
        return make_model(self.model_seed)

    def train_examples(self):
        if self.nan_row is None:
            return self.train
        x, y = self.train[self.nan_row]
        return self.train[: self.nan_row] + [(x * float("nan"), y)] + self.train[self.nan_row + 1:]

    def query_examples(self):
        return self.queries

    def collate(self, examples):
        if self.delay:
            time.sleep(self.delay)
        return torch.stack([e[0] for e in examples]), torch.stack([e[1] for e in examples])

    def loss(self, model, batch):
        gate = os.environ.get("MLP_TASK_GATE")
        if gate:
            _wait_at(gate)
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    def example_id(self, example, index):
        return f"ex{self.first + index}"


def full():
    return MLPTask()


def first():
    return MLPTask(rows=(0, 30))


def second():
    return MLPTask(rows=(30, N_TRAIN))


def other_weights():
    return MLPTask(model_seed=1)


def with_nan():
    return MLPTask(nan_row=21)


def slow():
    """Slow enough (sleep per batch) for a test to SIGKILL it mid-build."""
    return MLPTask(delay=float(os.environ.get("MLP_TASK_DELAY", "0.05")))


def no_queries():
    t = MLPTask()
    t.queries = []
    return t


def _wait_at(gate: str, limit: float = 120.0) -> None:
    """Hold a batch until the file `gate` exists, saying first (`gate`.waiting) that one is held:
    a test can then act while this process is certainly mid-write."""
    open(gate + ".waiting", "a").close()
    deadline = time.monotonic() + limit
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)


def second_slow():
    t = second()
    t.delay = float(os.environ.get("MLP_TASK_DELAY", "0.05"))
    return t
