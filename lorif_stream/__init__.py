"""lorif-stream: LoRIF training-data attribution as an out-of-core streaming engine.

    import lorif_stream as ls
    ls.build(task, "runs/idx", f=4, rank=1)          # whitening pre-pass, then index training examples
    ls.append(new_task, "runs/idx")                   # add more later
    res = ls.query(task, "runs/idx", out="results.jsonl", top_k=10)
    ls.fit("runs/idx", sketch_rank=512)               # refit the curvature only
    ls.info("runs/idx"); ls.verify("runs/idx")
    ls.make_report("results.jsonl", "runs/idx", "report.html", data=["train.jsonl"], queries="queries.jsonl")

The names below are imported on first use (PEP 562): `import lorif_stream` and `lorif-stream
--help` load no torch, which costs a second or more before anything is printed.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports each on first use
    from .build import BuildResult, append, build, whiten
    from .config import BuildConfig, CurvatureConfig, QueryConfig
    from .fit import fit
    from .hf_task import HFCausalLMTask
    from .inspect_index import info, verify
    from .query import QueryResult, query
    from .report import make_report
    from .task import Task, load_task

# public name -> the module defining it
_SOURCES = {
    "BuildResult": "build", "append": "build", "build": "build", "whiten": "build",
    "BuildConfig": "config", "CurvatureConfig": "config", "QueryConfig": "config",
    "fit": "fit",
    "HFCausalLMTask": "hf_task",
    "info": "inspect_index", "verify": "inspect_index",
    "QueryResult": "query", "query": "query",
    "make_report": "report",
    "Task": "task", "load_task": "task",
}

# the functions shadow their modules' names on purpose: `lorif_stream.query(...)` is the API
__all__ = [
    "BuildConfig", "BuildResult", "CurvatureConfig", "HFCausalLMTask", "QueryConfig", "QueryResult", "Task",
    "append", "build", "fit", "info", "load_task", "make_report", "query", "verify", "whiten",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package (`lorif_stream.query = <module>`), which would
    hide the function of the same name from then on; the function is kept in its place instead.
    (Eager imports got this by binding the functions after their modules.)"""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _SOURCES.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
