"""A shard's view of a task: a contiguous run of its training examples, as a task of its own.

Inside a shard rows count from 0, so the view renumbers positions; the ids stay the full task's
(`example_id` sees the global position), so a shard stores exactly the ids a single-process build
would, and its segment checks (segments.py) digest the same examples.
"""
from __future__ import annotations

from collections.abc import Sequence


class _Rows(Sequence):
    def __init__(self, examples, first: int, count: int):
        if first < 0 or count < 0 or first + count > len(examples):
            raise ValueError(f"rows {first}..{first + count - 1} are outside the task's {len(examples):,} examples")
        self.examples, self.first, self.count = examples, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if not -self.count <= i < self.count:
            raise IndexError(f"example {i} is outside this shard's {self.count} examples")
        return self.examples[self.first + (i % self.count)]


class ShardTask:
    """Examples [first, first + count) of `task` (a resolved Task); everything else is the task's."""

    def __init__(self, task, first: int, count: int):
        self.task, self.first, self.count = task, first, count
        self.tracked_modules = getattr(task, "tracked_modules", None)

    def model(self):
        return self.task.model()

    def train_examples(self):
        return _Rows(self.task.train_examples(), self.first, self.count)

    def query_examples(self):
        return self.task.query_examples()

    def collate(self, examples):
        return self.task.collate(examples)

    def loss(self, model, batch):
        return self.task.loss(model, batch)

    def measurement(self, model, batch):
        return self.task.measurement(model, batch)

    def example_id(self, example, index):
        return self.task.example_id(example, self.first + index)
