"""lorif-stream: LoRIF training-data attribution as an out-of-core streaming engine.

    import lorif_stream as ls
    ls.build(task, "runs/idx", f=4, rank=1)          # whitening pre-pass, then index training examples
    ls.append(new_task, "runs/idx")                   # add more later
    res = ls.query(task, "runs/idx", out="results.jsonl", top_k=10)
    ls.fit("runs/idx", sketch_rank=512)               # refit the curvature only
    ls.info("runs/idx"); ls.verify("runs/idx")
    ls.make_report("results.jsonl", "runs/idx", "report.html", data=["train.jsonl"], queries="queries.jsonl")
"""
from .build import BuildResult, append, build, whiten
from .config import BuildConfig, CurvatureConfig, QueryConfig
from .fit import fit
from .inspect_index import info, verify
from .query import QueryResult, query
from .report import make_report
from .task import HFCausalLMTask, Task, load_task

# the functions shadow their modules' names on purpose: `lorif_stream.query(...)` is the API
__all__ = [
    "BuildConfig", "BuildResult", "CurvatureConfig", "HFCausalLMTask", "QueryConfig", "QueryResult", "Task",
    "append", "build", "fit", "info", "load_task", "make_report", "query", "verify", "whiten",
]
__version__ = "0.1.0"
