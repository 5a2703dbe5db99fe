"""append: crash-resume, and queries that run while an append commits."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import lorif_stream as ls
from lorif_stream.store import IndexReader

ROOT = Path(__file__).parents[1]
TASKS = ROOT / "tests" / "tasks" / "mlp_task.py"
sys.path.insert(0, str(TASKS.parent))
import mlp_task  # noqa: E402
sys.path.insert(0, str(ROOT / "tests"))
from helpers_index import assert_same_factors_and_ids  # noqa: E402

# EK-FAC: the one preconditioner whose statistic (Λ) is additive over rows like the factors
OPTS = dict(f=1, rank=1, dtype="bf16", preconditioner="ekfac", damping=0.5, device="cpu", block_size=4, batch_size=2,
            progress=False)
APPEND = dict(f=1, rank=1, dtype="bf16", device="cpu", batch_size=2, progress=False)


def start_append(index, task_name, delay):
    return subprocess.Popen(
        [sys.executable, "-m", "lorif_stream.cli", "append", "--task", f"{TASKS}:{task_name}", "--index", str(index),
         "--device", "cpu", "--batch-size", "2", "--quiet"],
        cwd=ROOT, env={**os.environ, "MLP_TASK_DELAY": str(delay)}, stderr=subprocess.PIPE, text=True)


def wait_rows(index, at_least, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with IndexReader(index) as r:
            if r.rows >= at_least:
                return r.rows
        time.sleep(0.02)
    raise AssertionError(f"index never reached {at_least} rows")


def test_sigkill_during_append_then_resume_equals_uninterrupted(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for path in (killed, clean):
        ls.build(mlp_task.first(), path, **OPTS)
    proc = start_append(killed, "second_slow", delay=0.1)
    wait_rows(killed, 34)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with IndexReader(killed) as r:
        assert 34 <= r.rows < mlp_task.N_TRAIN and r.settings["segments"][-1] == {"kind": "append", "start": 30, "count": 18}
    ls.append(mlp_task.second(), killed, **APPEND)
    ls.append(mlp_task.second(), clean, **APPEND)
    assert_same_factors_and_ids(killed, clean, sketch_layers=("0", "2"))
    a = ls.query(mlp_task.full(), killed, None, tmp_path / "a.npy", top_k=3, device="cpu", progress=False)
    b = ls.query(mlp_task.full(), clean, None, tmp_path / "b.npy", top_k=3, device="cpu", progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), rtol=1e-5, atol=1e-7)
    assert a.results == b.results


def test_query_during_append_sees_one_consistent_snapshot(tmp_path):
    index = tmp_path / "idx"
    ls.build(mlp_task.first(), index, **OPTS)
    before = ls.query(mlp_task.full(), index, None, tmp_path / "before.npy", top_k=3, device="cpu", progress=False)
    base = np.load(tmp_path / "before.npy")
    proc = start_append(index, "second_slow", delay=0.4)
    seen = []
    try:
        while proc.poll() is None:
            path = tmp_path / f"during{len(seen)}.npy"
            res = ls.query(mlp_task.full(), index, None, path, top_k=3, device="cpu", progress=False)
            seen.append((res.rows, res.stats["curvature_rows"], np.load(path)))
    finally:
        proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    ls.query(mlp_task.full(), index, None, tmp_path / "after.npy", top_k=3, device="cpu", progress=False)
    after = np.load(tmp_path / "after.npy")
    mid_append = [s for s in seen if 30 < s[0] < 48]
    assert len(mid_append) >= 2, f"only {len(seen)} queries ran during the append"
    for rows, covered, scores in seen:
        assert scores.shape == (mlp_task.N_QUERY, rows)
        if covered == 30:  # old curvature: the old rows score exactly as before the append
            np.testing.assert_allclose(scores[:, :30], base, rtol=1e-5, atol=1e-7)
        else:  # new curvature only ever appears together with every appended row
            assert covered == rows == 48
            np.testing.assert_allclose(scores, after, rtol=1e-5, atol=1e-7)
    assert before.rows == 30
