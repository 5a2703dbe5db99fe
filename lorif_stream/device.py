"""Device choice and moving task batches onto it."""
from __future__ import annotations

import sys
from collections.abc import Mapping

import torch

_NOTICES: set[str] = set()


def notice(message: str) -> None:
    """Say a fallback once per job (never degrade silently, never nag): once per process, and
    under torch.distributed by rank 0 only, which speaks for the job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(f"[lorif-stream] {message}", file=sys.stderr, flush=True)


def resolve_device(name: str | torch.device | None) -> torch.device:
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        notice("no CUDA device found: running on the CPU")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} was asked for but torch sees no CUDA device (use --device cpu)")
    return device


def to_device(batch, device: torch.device):
    """Move every tensor inside a batch (tensor, mapping, list/tuple, dataclass-free) to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()}) if type(batch) is dict else \
            {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    if hasattr(batch, "to") and callable(batch.to):
        try:
            return batch.to(device)  # e.g. transformers.BatchEncoding
        except TypeError:
            return batch
    return batch
