"""Scale-out with torchrun: a sharded index built, appended, fitted and queried by the ranks of a job.

Each rank writes its own LMDB shard of a contiguous run of rows (the shard manifest and the
reader that speaks global rows are storage: store/shards.py); what the ranks share moves through
torch.distributed collectives and every eigendecomposition runs once, on rank 0. In pipeline order:

    comm.py        the process group from torchrun's variables, the collectives, one progress bar
    task_view.py   a shard's rows of a task, with the full task's ids
    build.py       build / append / fit of a sharded index: plans, shards, resume
    whitening.py   whitening moments all-reduced, whitened once
    ids.py         ids unique across shards
    curvature.py   statistics summed over shards and ranks, curvature finalized once
    query.py       query across ranks: broadcast H, stream own shards, merge top-k, score columns

docs/DISTRIBUTED.md describes the design. The single-process modules call in here only when
torch.distributed is initialized or the index is sharded.
"""
