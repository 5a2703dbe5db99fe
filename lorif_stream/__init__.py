"""lorif-stream: LoRIF training-data attribution as an out-of-core streaming engine.

    import lorif_stream as ls
    ls.build(task, "runs/idx", f=4, rank=1)          # index training examples
    ls.append(new_task, "runs/idx")                   # add more later
    res = ls.query(task, "runs/idx", out="results.jsonl", top_k=10)
    ls.fit("runs/idx", sketch_rank=512)               # refit the curvature only
    ls.info("runs/idx"); ls.verify("runs/idx")
"""
from importlib import import_module

__version__ = "0.1.0"

# name -> module; imported on first use so `lorif_stream.store` and the CLI's --help stay light
_API = {
    "build": "build", "append": "build", "BuildResult": "build",
    "fit": "fit",
    "query": "query", "QueryResult": "query",
    "info": "inspect_index", "verify": "inspect_index",
    "BuildConfig": "config", "CurvatureConfig": "config", "QueryConfig": "config",
    "Task": "task", "HFCausalLMTask": "task", "load_task": "task",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'lorif_stream' has no attribute {name!r}")
