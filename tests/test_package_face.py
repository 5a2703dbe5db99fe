"""The package face is lazy: `import lorif_stream` and `lorif-stream --help` import no torch, yet
every public name resolves and `lorif_stream.query` stays the function, not its module."""
import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "numba", "lmdb", "zstandard", "transformers")


def _imported(args: list[str]) -> set[str]:
    """Top-level packages a fresh interpreter imports running `python -X importtime ARGS`."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("import time:") and "|" in l]
    assert lines, proc.stderr[-2000:]  # -X importtime did report
    return {l.rsplit("|", 1)[1].strip().split(".")[0] for l in lines}


def test_import_loads_no_torch():
    imported = _imported(["-c", "import lorif_stream"])
    assert "lorif_stream" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.parametrize("command", [[], ["build"], ["query"], ["append"], ["whiten"], ["fit"], ["info"],
                                     ["verify"], ["report"], ["demo"]])
def test_help_loads_no_torch(command):
    imported = _imported(["-m", "lorif_stream", *command, "--help"])
    assert "click" in imported
    assert not imported & set(HEAVY), (command, sorted(imported & set(HEAVY)))


def test_public_names_resolve_to_their_definitions():
    code = """
import importlib, inspect, sys
import lorif_stream as ls
assert "torch" not in sys.modules
assert set(ls.__all__) <= set(dir(ls)), set(ls.__all__) - set(dir(ls))
import lorif_stream.query, lorif_stream.build, lorif_stream.fit   # binds the submodules on the package
for name in ls.__all__:
    value = getattr(ls, name)
    assert not inspect.ismodule(value), name
    assert getattr(importlib.import_module(value.__module__), name) is value, name
from lorif_stream import query
assert query is ls.query and callable(query)
try:
    ls.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("no AttributeError")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
