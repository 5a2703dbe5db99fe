"""torch.distributed, as launched by torchrun: the process group, the few collectives the engine
uses, and one progress bar for all ranks.

There is no cluster layer here: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT, `init_process_group` reads them (NCCL on GPUs, gloo on CPUs), and everything the ranks
exchange goes through torch.distributed collectives, so a rank only ever opens its own shards.
A plain process is `LOCAL` (rank 0 of 1): every collective is the identity there.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
from dataclasses import dataclass

import torch

from .progress import Progress

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# how long a collective may wait for the other ranks (a dead rank is noticed by torchrun sooner)
TIMEOUT_ENV = "LORIF_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = 1800


# What this process spent in all-reduces (moments, sketches, sums; waiting for the slowest rank
# included): benchmarks/bench_distributed.py reports it as a share of the build.
REDUCE_STATS = {"seconds": 0.0, "bytes": 0, "calls": 0}


class RankFailedError(RuntimeError):
    """Another rank failed; its message is repeated on every rank, so that all stop together."""


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARIABLES)


@dataclass(frozen=True)
class Comm:
    """This process's place in the job: rank `rank` of `world`; `device` carries the collectives'
    tensors (the rank's GPU under NCCL, the CPU under gloo)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    active: bool = False  # torch.distributed is initialized (even with one rank: the index is sharded)

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world}")
        if not 0 <= self.local_rank < max(self.local_world, 1):
            raise ValueError(f"local rank {self.local_rank} is outside {self.local_world} local ranks")

    @property
    def root(self) -> bool:
        return self.rank == 0

    def owns(self, shard: int) -> bool:
        """Shard positions are dealt round-robin: a job of the world size that wrote them reads
        each shard on the rank (and so the node) that wrote it."""
        return shard % self.world == self.rank

    def device_for(self, device: torch.device) -> torch.device:
        """The rank's own GPU for a bare 'cuda' (every rank would otherwise pick GPU 0)."""
        if device.type == "cuda" and device.index is None and self.active:
            return torch.device("cuda", local_gpu(self.local_rank))
        return device

    # -- collectives
    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) `t` in place; returns it."""
        if not self.active or self.world == 1:
            return t
        import torch.distributed as dist

        started = time.perf_counter()
        if t.device == self.device:
            dist.all_reduce(t)
        else:
            moved = t.to(self.device)
            dist.all_reduce(moved)
            t.copy_(moved)
        if self.device.type == "cuda":
            # NCCL returns once the reduction is queued: the seconds are its completion's, and the
            # next reduction's timing would otherwise include this one's
            torch.cuda.synchronize(self.device)
        REDUCE_STATS["seconds"] += time.perf_counter() - started
        REDUCE_STATS["bytes"] += t.numel() * t.element_size()
        REDUCE_STATS["calls"] += 1
        return t

    def sum_int(self, n: int) -> int:
        return int(self.sum_(torch.tensor([int(n)], dtype=torch.int64)).item())

    def sum_float(self, x: float) -> float:
        return float(self.sum_(torch.tensor([float(x)], dtype=torch.float64)).item())

    def broadcast(self, obj, src: int = 0):
        if not self.active or self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]

    def broadcast_tensors(self, tensors: list[torch.Tensor] | None, specs: list[tuple]) -> list[torch.Tensor]:
        """Rank 0's `tensors` on every rank (on `self.device`), sent as tensors, not pickled;
        `specs` = [(shape, dtype name)] of each, known to every rank."""
        if not self.active or self.world == 1:
            return list(tensors)
        import torch.distributed as dist

        out = []
        for i, (shape, dtype) in enumerate(specs):
            if self.root:
                t = tensors[i].to(self.device).contiguous()
            else:
                t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            dist.broadcast(t, src=0)
            out.append(t)
        return out

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active or self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        # all_gather_object stages its bytes on torch.cuda.current_device() under NCCL: a caller
        # that initialised the group without set_device would have every rank on GPU 0
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active and self.world > 1:
            self.gather(None)  # an object gather: works the same under gloo and NCCL

    def agree(self, error: BaseException | None) -> None:
        """Every rank says whether its part failed; if one did, all raise (the rank's own error
        where it has one), so that no rank waits forever in the next collective."""
        said = self.gather(None if error is None else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        if error is not None:
            raise error
        for rank, message in enumerate(said):
            if message is not None:
                raise RankFailedError(f"rank {rank} failed: {message}")

    def together(self, fn):
        """fn() on every rank; if it fails on any, it fails on all (no rank is left in a collective).
        fn itself must use no collective: a rank failing before one would leave the others in it."""
        result, error = None, None
        try:
            result = fn()
        except Exception as e:
            error = e
        self.agree(error)
        return result

    def on_root(self, fn):
        """fn() on rank 0, its result broadcast to every rank; an error there is raised on all ranks.
        fn uses no collective (the other ranks are already waiting for its result)."""
        result, error = None, None
        if self.root:
            try:
                result = fn()
            except Exception as e:
                error = e
        failed = self.broadcast(None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        if failed is not None:
            raise RankFailedError(f"rank 0 failed: {failed[0]}: {failed[1].splitlines()[0] if failed[1] else ''}")
        return self.broadcast(result)

    def counter(self, name: str) -> "SharedCounter | None":
        return SharedCounter.open(self, name) if self.active and self.world > 1 else None


LOCAL = Comm()


def local_gpu(local_rank: int) -> int:
    """The GPU of a local rank: ranks beyond the node's GPUs share them round-robin (more ranks
    per node than GPUs, or a node whose CUDA_VISIBLE_DEVICES shows each rank fewer GPUs)."""
    count = torch.cuda.device_count()
    return local_rank % count if count else local_rank


def current() -> Comm:
    """The job this process is part of: torch.distributed's group if initialized, else LOCAL."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return LOCAL
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(local_world, 1)))
    device = torch.device("cuda", local_gpu(local_rank)) if dist.get_backend() == "nccl" else torch.device("cpu")
    return Comm(dist.get_rank(), dist.get_world_size(), local_rank, local_world, device, active=True)


def init_from_env(device: str | None = "auto") -> Comm:
    """Join the job torchrun started (idempotent): NCCL when this rank will compute on a GPU, else gloo."""
    import torch.distributed as dist

    if dist.is_initialized():
        return current()
    local_rank = int(os.environ["LOCAL_RANK"])
    wants_cuda = torch.cuda.is_available() and (device is None or str(device) in ("auto", "cuda")
                                                or str(device).startswith("cuda"))
    if wants_cuda:
        torch.cuda.set_device(local_gpu(local_rank))
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or _DEFAULT_TIMEOUT_S))
    dist.init_process_group("nccl" if wants_cuda else "gloo", timeout=timeout)
    return current()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ progress


class SharedCounter:
    """A job-wide row count kept in torch.distributed's own key-value store (the rendezvous store):
    ranks add to it as they commit, rank 0's bar reads it. No collective: ranks never wait on it."""

    _made: dict[str, int] = {}

    def __init__(self, store, key: str):
        self.store, self.key = store, key

    @classmethod
    def open(cls, comm: Comm, name: str) -> "SharedCounter | None":
        from torch.distributed import distributed_c10d

        try:
            store = distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):
            from .device import notice

            notice("torch.distributed exposes no key-value store here: the progress bar counts rank 0's rows only")
            return None
        # every rank opens its bars in the same order, so the n-th bar of a name has one key job-wide
        seq = cls._made.get(name, 0)
        cls._made[name] = seq + 1
        return cls(store, f"lorif-progress/{name}/{seq}")

    def add(self, n: int) -> int:
        return int(self.store.add(self.key, int(n)))


class GlobalProgress:
    """One bar for the job: drawn by rank 0 with every rank's rows (so its rate is the global
    rate); the other ranks only count. Without a shared store, rank 0's own rows."""

    def __init__(self, comm: Comm, desc: str, total: int, unit: str, enabled: bool = True, detail=None):
        self.comm = comm
        self.counter = comm.counter(desc)
        self.bar = Progress(desc, total=total, unit=unit, enabled=enabled and comm.root, detail=detail)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._poller = None
        if comm.root and self.counter is not None and self.bar.enabled:
            self._poller = threading.Thread(target=self._poll, name="lorif-progress", daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self._show(self.counter.add(0), 0)

    def _show(self, total: int, nbytes: int) -> None:
        with self._lock:
            self.bar.update(max(total - self.bar.count, 0), nbytes=nbytes)

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        if self.counter is None:
            self.bar.update(n, nbytes=nbytes)
            return
        total = self.counter.add(n)
        if self.comm.root:
            self._show(total, nbytes)

    def close(self, synced: bool = False) -> None:
        """`synced`: every rank closes here after its last update (the job is in step), so wait for all
        of them and draw the final count; never on an error path, where a rank may not come."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
        if synced and self.counter is not None:
            self.comm.barrier()
            if self.comm.root:
                self._show(self.counter.add(0), 0)
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(synced=exc_type is None)

