"""Rerunning a build or append: the same data is resumed or recognised as done, other data is refused.

Real processes are SIGKILLed mid-append and between the last committed row and the curvature
switch (LORIF_TEST_PAUSE_BEFORE_FINALIZE holds a process in that window); the reruns must end
identical to an uninterrupted run. Plus the up-front refusals of build (budget, directory,
all-NaN data) and the notices that say when an option is not used as given.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lorif_stream as ls
from lorif_stream.build import SettingsMismatchError
from lorif_stream.store import IndexReader, IndexWriter, WriterBusyError

ROOT = Path(__file__).parents[1]
TASKS = ROOT / "tests" / "tasks" / "mlp_task.py"
sys.path.insert(0, str(TASKS.parent))
import mlp_task  # noqa: E402
sys.path.insert(0, str(ROOT / "tests"))
from helpers_index import assert_same_factors_and_ids  # noqa: E402

# EK-FAC: its statistic is additive over rows like the factors, so a resume must reproduce it exactly
OPTS = dict(f=1, rank=1, dtype="bf16", preconditioner="ekfac", damping=0.5, device="cpu", block_size=4, batch_size=2,
            progress=False)
APPEND = dict(device="cpu", batch_size=2, progress=False)
N_FIRST, N_SECOND = 30, mlp_task.N_TRAIN - 30


class RenamedSecond(mlp_task.MLPTask):
    """Rows 30..47 under other ids: a different task of the same size."""

    def __init__(self):
        super().__init__(rows=(30, mlp_task.N_TRAIN))

    def example_id(self, example, index):
        return f"b{self.first + index}"


def edited_second():
    """Rows 30..47 with their ids but other inputs (an edited data file whose ids are line numbers)."""
    task = mlp_task.second()
    task.train = mlp_task.make_data(seed=1)[30:mlp_task.N_TRAIN]
    return task


class AllNan(mlp_task.MLPTask):
    def train_examples(self):
        return [(x * float("nan"), y) for x, y in self.train]


class LeadingNan(mlp_task.MLPTask):
    def train_examples(self):
        return [(x * float("nan"), y) if i < 6 else (x, y) for i, (x, y) in enumerate(self.train)]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lorif_stream.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def start_append(index, task_name, env, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "lorif_stream.cli", "append", "--task", f"{TASKS}:{task_name}", "--index", str(index),
         "--device", "cpu", "--batch-size", "2", "--quiet", *extra],
        cwd=ROOT, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)


def wait_rows(index, at_least, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with IndexReader(index) as r:
                if r.rows >= at_least:
                    return r.rows
        except Exception:  # the index is still being created
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise AssertionError(f"index never reached {at_least} rows")


def curvature_rows(index):
    with IndexReader(index) as r, r.snapshot() as s:
        return s.state_meta("curvature")["rows"]


def scores(index, path):
    ls.query(mlp_task.full(), index, None, path, top_k=3, device="cpu", progress=False)
    return np.load(path)


@pytest.fixture
def clean(tmp_path):
    """build(first) + append(second), uninterrupted: what every rerun must end up equal to."""
    path = tmp_path / "clean"
    ls.build(mlp_task.first(), path, **OPTS)
    ls.append(mlp_task.second(), path, **APPEND)
    return path


# ------------------------------------------------------------------------------ resume checks the data


def test_an_append_resumed_with_other_data_is_refused_naming_the_row(tmp_path, clean):
    killed = tmp_path / "killed"
    ls.build(mlp_task.first(), killed, **OPTS)
    proc = start_append(killed, "second_slow", {"MLP_TASK_DELAY": "0.1"})
    wait_rows(killed, 34, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with IndexReader(killed) as r:
        committed = r.rows
        assert 34 <= committed < mlp_task.N_TRAIN
    # other ids at the same positions: the first committed row of the append is named
    with pytest.raises(ValueError, match=r"^row 30: the index has id 'ex30' but the task gives 'b30'[^\n]*$"):
        ls.append(RenamedSecond(), killed, **APPEND)
    # the same ids over other inputs (an edited file whose ids are line numbers)
    with pytest.raises(ValueError, match=r"^row 30 \(id 'ex30'\): the task's example differs from the one"):
        ls.append(edited_second(), killed, **APPEND)
    # on the command line: one line, exit 1
    proc = cli("append", "--task", f"{TASKS}:full", "--index", killed, "--device", "cpu", "--quiet")
    assert proc.returncode == 1 and "unfinished append of 18 examples" in proc.stderr
    with IndexReader(killed) as r:
        assert r.rows == committed  # nothing was written by the refused reruns
    ls.append(mlp_task.second(), killed, **APPEND)
    assert_same_factors_and_ids(killed, clean, sketch_layers=("0", "2"))
    np.testing.assert_allclose(scores(killed, tmp_path / "a.npy"), scores(clean, tmp_path / "b.npy"), rtol=1e-5,
                               atol=1e-7)


def test_an_unfinished_build_resumed_with_other_ids_is_refused(tmp_path):
    path = tmp_path / "idx"
    with pytest.raises(ValueError, match=r"'ex21' \(row 21\)"):
        ls.build(mlp_task.with_nan(), path, **OPTS)
    renamed = mlp_task.full()
    renamed.example_id = lambda example, index: f"b{index}"
    with pytest.raises(ValueError, match=r"^row 0: the index has id 'ex0' but the task gives 'b0'"):
        ls.build(renamed, path, **OPTS)
    # fixing the culprit (a row not committed yet) and resuming is fine
    ls.build(mlp_task.full(), path, **OPTS)
    assert ls.info(path)["rows"] == mlp_task.N_TRAIN


# ------------------------------------------------------------------------------ killed while finalizing


@pytest.mark.parametrize("duplicates", [False, True], ids=["unique-ids", "allow-duplicate-ids"])
def test_a_sigkill_between_the_last_row_and_the_curvature_is_finished_by_rerunning(tmp_path, clean, duplicates):
    killed = tmp_path / "killed"
    ls.build(mlp_task.first(), killed, **OPTS)
    extra = ["--allow-duplicate-ids"] if duplicates else []
    proc = start_append(killed, "second", {"LORIF_TEST_PAUSE_BEFORE_FINALIZE": "120"}, *extra)
    wait_rows(killed, mlp_task.N_TRAIN, proc)
    time.sleep(0.2)
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert curvature_rows(killed) == N_FIRST  # every row committed, the curvature still the build's
    ls.append(mlp_task.second(), killed, allow_duplicate_ids=duplicates, **APPEND)
    with IndexReader(killed) as r:
        assert r.rows == mlp_task.N_TRAIN  # not added twice
        assert [s["count"] for s in r.settings["segments"]] == [N_FIRST, N_SECOND]
        assert r.settings["segments"][-1]["finalized"] is True
    assert curvature_rows(killed) == mlp_task.N_TRAIN
    assert_same_factors_and_ids(killed, clean, sketch_layers=("0", "2"))
    np.testing.assert_allclose(scores(killed, tmp_path / "a.npy"), scores(clean, tmp_path / "b.npy"), rtol=1e-5,
                               atol=1e-7)


def test_a_build_killed_before_its_curvature_is_finished_by_rerunning(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    ls.build(mlp_task.full(), whole, **OPTS)
    args = ["build", "--task", f"{TASKS}:full", "--index", killed, "--f", 1, "--preconditioner", "ekfac", "--damping",
            0.5, "--device", "cpu", "--block-size", 4, "--batch-size", 2, "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "lorif_stream.cli", *map(str, args)], cwd=ROOT,
                            env={**os.environ, "LORIF_TEST_PAUSE_BEFORE_FINALIZE": "120"}, stderr=subprocess.PIPE,
                            text=True)
    wait_rows(killed, mlp_task.N_TRAIN, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with IndexReader(killed) as r, r.snapshot() as s:
        assert s.state_meta("curvature") is None
    done = cli(*args)
    assert done.returncode == 0 and "curvature was not finalized" in done.stderr, done.stderr
    assert curvature_rows(killed) == mlp_task.N_TRAIN
    assert_same_factors_and_ids(killed, whole, sketch_layers=("0", "2"))
    np.testing.assert_allclose(scores(killed, tmp_path / "a.npy"), scores(whole, tmp_path / "b.npy"), rtol=1e-5,
                               atol=1e-7)


# ------------------------------------------------------------------------------ rerunning a finished run


def test_rerunning_a_finished_append_or_build_says_it_is_complete(tmp_path, clean):
    with IndexReader(clean) as r:
        settings = r.settings
    proc = cli("append", "--task", f"{TASKS}:second", "--index", clean, "--device", "cpu", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "append of 18 rows is already complete" in proc.stderr
    with IndexReader(clean) as r:
        assert r.rows == mlp_task.N_TRAIN and r.settings == settings
    # killed after the curvature switch but before the segment was marked: the curvature says it is done
    with IndexWriter.open(clean) as w:
        s = dict(w.settings)
        s["segments"] = [{k: v for k, v in seg.items() if k != "finalized"} for seg in s["segments"]]
        w.update_settings(s)
    res = ls.append(mlp_task.second(), clean, allow_duplicate_ids=True, **APPEND)
    assert res.new_rows == 0 and res.rows == mlp_task.N_TRAIN
    # a different task of the same size is a new append, not a rerun
    res = ls.append(RenamedSecond(), clean, **APPEND)
    assert res.new_rows == N_SECOND and res.rows == mlp_task.N_TRAIN + N_SECOND
    # a finished build
    whole = tmp_path / "whole"
    ls.build(mlp_task.full(), whole, **OPTS)
    proc = cli("build", "--task", f"{TASKS}:full", "--index", whole, "--f", 1, "--preconditioner", "ekfac",
               "--damping", 0.5, "--device", "cpu", "--quiet")
    assert proc.returncode == 0 and "build of 48 rows is already complete" in proc.stderr, proc.stderr
    renamed = mlp_task.full()
    renamed.example_id = lambda example, index: f"b{index}"
    with pytest.raises(ValueError, match=r"^row 0: the index has id 'ex0' but the task gives 'b0'.*complete build"):
        ls.build(renamed, whole, **OPTS)


def test_changed_curvature_options_on_a_complete_index_point_to_fit(tmp_path, capsys):
    path = tmp_path / "idx"
    ls.build(mlp_task.full(), path, **OPTS)
    capsys.readouterr()
    ls.build(mlp_task.full(), path, **dict(OPTS, damping=0.1))
    err = capsys.readouterr().err
    assert "damping: index 0.5 vs 0.1" in err and "lorif-stream fit" in err
    assert ls.info(path)["curvature"]["config"]["damping"] == 0.5


# ------------------------------------------------------------------------------ up-front refusals


def test_a_budget_too_small_for_the_curvature_is_refused_before_the_first_row(tmp_path):
    path = tmp_path / "c"
    with pytest.raises(MemoryError, match=r"too small for even one layer: layer '0'"):
        ls.build(mlp_task.full(), path, f=1, sketch_rank=16, memory_budget=1000, device="cpu", progress=False,
                 projection_kind="random")
    assert not (path / "data.mdb").exists()
    with pytest.raises(MemoryError, match=r"too small to whiten layer '0'"):
        ls.build(mlp_task.full(), path, f=1, memory_budget=800, device="cpu", progress=False)
    assert not (path / "data.mdb").exists()
    # an append into an index is checked before its first row as well
    ls.build(mlp_task.first(), path, f=1, sketch_rank=16, device="cpu", progress=False, projection_kind="random")
    with IndexReader(path) as r:
        before = r.settings
    with pytest.raises(MemoryError, match=r"too small for even one layer"):
        ls.append(mlp_task.second(), path, memory_budget=1000, device="cpu", progress=False)
    with IndexReader(path) as r:
        assert r.rows == N_FIRST and r.settings == before


def test_a_build_that_stopped_before_its_first_row_reruns_with_new_settings(tmp_path, capsys, monkeypatch):
    path = tmp_path / "idx"
    first_nan = mlp_task.MLPTask(nan_row=0)
    with pytest.raises(ValueError, match=r"'ex0' \(row 0\); no rows are committed yet") as e:
        ls.build(first_nan, path, **OPTS)
    assert "0..-1" not in str(e.value)
    with IndexReader(path) as r:
        assert r.rows == 0
    ls.build(mlp_task.full(), path, **dict(OPTS, rank=2))
    assert "re-creating it" in capsys.readouterr().err
    with IndexReader(path) as r:
        assert r.rows == mlp_task.N_TRAIN and r.layout.c == 2
    # a finished whitening pre-pass with the same settings is resumed, not redone
    import lorif_stream.whitening as whitening

    ls.whiten(mlp_task.full(), tmp_path / "w", **OPTS)
    monkeypatch.setattr(whitening, "_whiten_group", lambda *a, **k: pytest.fail("the pre-pass ran again"))
    ls.build(mlp_task.full(), tmp_path / "w", **OPTS)
    assert "re-creating" not in capsys.readouterr().err
    assert ls.info(tmp_path / "w")["rows"] == mlp_task.N_TRAIN
    monkeypatch.undo()
    ls.whiten(mlp_task.full(), tmp_path / "w2", **OPTS)
    ls.build(mlp_task.full(), tmp_path / "w2", **dict(OPTS, f=2))
    assert "re-creating it with this command's settings" in capsys.readouterr().err
    assert ls.info(tmp_path / "w2")["projection"]["f"] == 2


@contextlib.contextmanager
def writer_in_another_process(path):
    """Another process holding the index's writer (a build still running), until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lorif_stream.store import IndexWriter; "
                               "w = IndexWriter.open(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_build_with_no_rows_that_another_process_writes_is_not_re_created_under_it(tmp_path, capsys):
    """A build in its whitening pre-pass holds no row yet but is running: a rerun with other examples
    must be refused as the writer's, not delete the environment the running build writes into."""
    path = tmp_path / "idx"
    ls.whiten(mlp_task.full(), path, **OPTS)
    with writer_in_another_process(path) as holder:
        with pytest.raises(WriterBusyError, match=f"index {path} is being written by process {holder.pid}"):
            ls.build(mlp_task.first(), path, **OPTS)
        assert "re-creating" not in capsys.readouterr().err
        with IndexReader(path) as r:  # the running build's environment is intact
            assert r.rows == 0 and r.settings["segments"][0]["count"] == mlp_task.N_TRAIN
    ls.build(mlp_task.first(), path, **OPTS)  # once it is gone, the rerun re-creates it
    assert "re-creating it" in capsys.readouterr().err and ls.info(path)["rows"] == N_FIRST


def test_an_append_while_the_build_is_being_written_is_told_it_is_busy(tmp_path):
    """Not judged on the half-written index ("an unfinished build: run `build`"): the writer is named."""
    path = tmp_path / "idx"
    ls.whiten(mlp_task.first(), path, **OPTS)
    with writer_in_another_process(path) as holder:
        with pytest.raises(WriterBusyError, match=f"index {path} is being written by process {holder.pid}"):
            ls.append(mlp_task.second(), path, **APPEND)
    with pytest.raises(SettingsMismatchError, match="unfinished build"):  # once it is gone: judged as stored
        ls.append(mlp_task.second(), path, **APPEND)


def test_a_rank_above_every_layer_is_clamped_with_a_notice(tmp_path, capsys):
    path = tmp_path / "idx"
    ls.build(mlp_task.first(), path, **dict(OPTS, rank=1000))
    # layer 0 is 5x6, layer 2 is 3x5 (f = 1): no factor can use more than 5 columns
    assert "rank 1000" in capsys.readouterr().err
    with IndexReader(path) as r:
        assert r.layout.c == 5 and r.settings["factors"]["rank"] == 5
    ls.append(mlp_task.second(), path, rank=1000, **APPEND)  # the same option again is accepted
    assert ls.info(path)["rows"] == mlp_task.N_TRAIN


def test_build_refuses_a_non_empty_directory_that_is_not_an_index(tmp_path):
    path = tmp_path / "results"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    proc = cli("build", "--task", f"{TASKS}:full", "--index", path, "--f", 1, "--device", "cpu", "--quiet")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{path} is not empty and holds no lorif-stream index (notes.txt)" in proc.stderr
    assert sorted(p.name for p in path.iterdir()) == ["notes.txt"]


def test_skip_nonfinite_refuses_data_that_is_all_non_finite(tmp_path):
    path = tmp_path / "idx"
    with pytest.raises(ValueError, match=r"every one of the 48 examples of this build .*non-finite"):
        ls.build(AllNan(), path, skip_nonfinite=True, **OPTS)
    with IndexReader(path) as r:
        assert r.rows == 0 and r.settings["nonfinite_rows"] == []
    ls.build(mlp_task.first(), tmp_path / "a", **OPTS)
    with IndexReader(tmp_path / "a") as r:
        before = r.settings
    with pytest.raises(ValueError, match=r"every one of the 18 examples of this append"):
        ls.append(AllNan(rows=(30, 48)), tmp_path / "a", skip_nonfinite=True, **APPEND)
    with IndexReader(tmp_path / "a") as r:
        assert r.rows == N_FIRST and r.settings == before


def test_leading_non_finite_rows_are_still_stored_as_zeros(tmp_path):
    random = dict(OPTS, projection_kind="random", preconditioner="lowrank", sketch_rank=8)
    ls.build(LeadingNan(), tmp_path / "nan", skip_nonfinite=True, **random)
    ls.build(mlp_task.full(), tmp_path / "ok", **random)
    with IndexReader(tmp_path / "nan") as a, IndexReader(tmp_path / "ok") as b, a.snapshot() as sa, \
            b.snapshot() as sb:
        assert sa.rows == mlp_task.N_TRAIN and a.settings["nonfinite_rows"] == list(range(6))
        assert sa.ids(0, sa.rows) == sb.ids(0, sb.rows)
        for row in range(sa.rows):
            for (La, Ra), (Lb, Rb) in zip(sa.row(row), sb.row(row)):
                if row < 6:  # a zero gradient: L = 0 (R is whatever the factorization leaves)
                    assert not La.any()
                else:
                    np.testing.assert_array_equal(La, Lb)
                    np.testing.assert_array_equal(Ra, Rb)
        assert torch.isfinite(torch.from_numpy(np.array(sa.array("sketch/0/Y")))).all()


def test_an_edited_jsonl_with_line_number_ids_is_not_taken_for_the_indexed_one(tmp_path):
    from helpers_models import CORPUS, save_tiny_hf_model
    from lorif_stream.hf_task import HFCausalLMTask

    model = save_tiny_hf_model(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    lines = [f'{{"text": "{text}"}}' for text in CORPUS]
    data.write_text("\n".join(lines) + "\n")
    opts = dict(f=2, rank=1, device="cpu", progress=False)
    ls.build(HFCausalLMTask(model, data, max_length=16), tmp_path / "idx", **opts)
    lines[2] = '{"text": "an edited line, the same line number"}'
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"^row 2 \(id '3'\): the task's example differs .*complete build of other"):
        ls.build(HFCausalLMTask(model, data, max_length=16), tmp_path / "idx", **opts)
