"""Scale-out with torchrun: sharded indexes built, appended, fitted and queried by 2 gloo ranks on the CPU.

The oracle is the single-process engine: a 2-rank build must store the same ids and (to fp32
round-off: moments and statistics are summed in another order) the same factors and curvature as
a single-process build of the same data, and a 2-rank query must return exactly what a single
process returns reading the same sharded index. Every torchrun launch has a timeout, so a hang
fails instead of blocking CI.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import lorif_stream as ls
from lorif_stream.build import SettingsMismatchError
from lorif_stream.store import IndexReader, WriteRefusedError
from lorif_stream.store.shards import open_index, read_manifest

ROOT = Path(__file__).parents[1]
TASKS = ROOT / "tests" / "tasks"
MLP = f"{TASKS / 'mlp_task.py'}"
sys.path.insert(0, str(TASKS))
sys.path.insert(0, str(ROOT / "tests"))
import mlp_task  # noqa: E402
from helpers_index import assert_same_factors_and_ids  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# fp32 storage: a factor computed from projections that differ in the last bits must not round to
# another bf16 value; EK-FAC: its statistic is a sum over rows, all-reduced across the ranks
BUILD = dict(f=1, rank=1, dtype="fp32", preconditioner="ekfac", device="cpu", batch_size=4, block_size=8)
BUILD_ARGS = ["--f", "1", "--rank", "1", "--dtype", "fp32", "--preconditioner", "ekfac", "--device", "cpu",
              "--batch-size", "4", "--block-size", "8", "--quiet"]
LOWRANK = dict(f=1, rank=1, dtype="fp32", projection_kind="random", preconditioner="lowrank", sketch_rank=4,
               device="cpu", batch_size=4, block_size=8)
LOWRANK_ARGS = ["--f", "1", "--rank", "1", "--dtype", "fp32", "--projection-kind", "random", "--preconditioner",
                "lowrank", "--sketch-rank", "4", "--device", "cpu", "--batch-size", "4", "--block-size", "8", "--quiet"]
QUERY_ARGS = ["--device", "cpu", "--top-k", "5", "--quiet"]
TIMEOUT = 180

# One torchrun job runs several commands (each torchrun start costs seconds on a small CPU box):
# the CLI's own entry, with the process group joined once.
JOB = textwrap.dedent("""
    import json, sys
    from lorif_stream import cli
    from lorif_stream.comm import init_from_env, shutdown
    init_from_env("cpu")
    try:
        for args in json.loads(sys.argv[1]):
            cli._run_cli(args)
    finally:
        shutdown()
""")


def torchrun_job(tmp: Path, commands: list[list[str]]) -> subprocess.CompletedProcess:
    script = tmp / "job.py"
    script.write_text(JOB)
    proc = subprocess.run([*TORCHRUN, str(script), json.dumps(commands)], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_index(sharded, single, rtol=1e-5, atol=1e-6):
    """Same ids and rows; factors and the EK-FAC curvature equal to fp32 round-off."""
    with open_index(sharded) as a, IndexReader(single) as b, a.snapshot() as sa, b.snapshot() as sb:
        assert sa.rows == sb.rows
        assert sa.ids(0, sa.rows) == sb.ids(0, sb.rows)
        for (ra, na, fa), (rb, nb, fb) in zip(_rows(sa), _rows(sb)):
            assert (ra, na) == (rb, nb)
            for (La, Ra), (Lb, Rb) in zip(fa, fb):
                np.testing.assert_allclose(La, Lb, rtol=rtol, atol=atol)
                np.testing.assert_allclose(Ra, Rb, rtol=rtol, atol=atol)
        ca, cb = sa.state_meta("curvature"), sb.state_meta("curvature")
        assert ca["rows"] == cb["rows"] == sa.rows
        for name in ca["layers"]:
            assert ca["layers"][name]["rows"] == cb["layers"][name]["rows"]
            np.testing.assert_allclose(ca["layers"][name]["damping"], cb["layers"][name]["damping"], rtol=1e-5)
            np.testing.assert_allclose(sa.array(f"curvature/{ca['generation']}/{name}/ekfac"),
                                       sb.array(f"curvature/{cb['generation']}/{name}/ekfac"), rtol=1e-4, atol=1e-7)


def _rows(snap):
    for first, n, factors in snap.blocks(0, snap.rows):
        for j in range(n):  # row by row: the two indexes cut their blocks at other rows
            yield first + j, 1, [(L[j].copy(), R[j].copy()) for L, R in factors]


def results_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One 2-rank job: a build of all examples and its query; a build of the first 30, a 2-rank
    append of the rest and a query of that; the single-process references beside them."""
    tmp = tmp_path_factory.mktemp("dist")
    full, grown = tmp / "full", tmp / "grown"
    commands = [
        ["build", "--task", f"{MLP}:full", "--index", str(full), *BUILD_ARGS],
        ["query", "--task", f"{MLP}:full", "--index", str(full), "--out", str(tmp / "full2.jsonl"),
         "--scores", str(tmp / "full2.npy"), *QUERY_ARGS],
        ["build", "--task", f"{MLP}:first", "--index", str(grown), *BUILD_ARGS],
        ["append", "--task", f"{MLP}:second", "--index", str(grown), "--device", "cpu", "--batch-size", "4", "--quiet"],
        ["query", "--task", f"{MLP}:full", "--index", str(grown), "--out", str(tmp / "grown2.jsonl"),
         "--scores", str(tmp / "grown2.npy"), *QUERY_ARGS],
        # the paper's mode: sketches Y = AΩ all-reduced, one Nyström on rank 0; then a refit across the ranks
        ["build", "--task", f"{MLP}:full", "--index", str(tmp / "lowrank"), *LOWRANK_ARGS],
        ["query", "--task", f"{MLP}:full", "--index", str(tmp / "lowrank"), "--out", str(tmp / "lowrank2.jsonl"),
         "--scores", str(tmp / "lowrank2.npy"), *QUERY_ARGS],
        ["fit", "--index", str(tmp / "lowrank"), "--preconditioner", "lowrank", "--sketch-rank", "2", "--damping", "0.5",
         "--device", "cpu", "--quiet"],
        ["query", "--task", f"{MLP}:full", "--index", str(tmp / "lowrank"), "--out", str(tmp / "refit2.jsonl"),
         "--scores", str(tmp / "refit2.npy"), *QUERY_ARGS],
    ]
    started = time.perf_counter()
    torchrun_job(tmp, commands)
    seconds = time.perf_counter() - started
    ls.build(mlp_task.full(), tmp / "full_ref", progress=False, **BUILD)
    ls.build(mlp_task.first(), tmp / "grown_ref", progress=False, **BUILD)
    ls.append(mlp_task.second(), tmp / "grown_ref", device="cpu", batch_size=4, progress=False)
    ls.build(mlp_task.full(), tmp / "lowrank_ref", progress=False, **LOWRANK)
    return {"tmp": tmp, "full": full, "grown": grown, "seconds": seconds}


def test_two_rank_build_equals_single_process_build(job):
    manifest = read_manifest(job["full"])
    assert [(s.start, s.count) for s in manifest.shards] == [(0, 24), (24, 24)]
    assert manifest.segments[-1]["finalized"]
    assert not (job["full"] / "data.mdb").exists()  # an older reader refuses it instead of reading one shard
    assert_same_index(job["full"], job["tmp"] / "full_ref")
    with open_index(job["full"]) as reader:
        assert reader.settings["curvature"]["preconditioner"] == "ekfac"
        assert reader.settings["segments"] == [{"kind": "build", "start": 0, "count": 48, "finalized": True}]


def test_two_rank_query_equals_one_process_query_of_the_same_index(job):
    tmp = job["tmp"]
    one = ls.query(mlp_task.full(), job["full"], out=tmp / "full1.jsonl", scores=tmp / "full1.npy", device="cpu",
                   top_k=5, progress=False)
    assert one.rows == 48
    assert results_of(tmp / "full2.jsonl") == results_of(tmp / "full1.jsonl")  # global rows, same ids and scores
    np.testing.assert_array_equal(np.load(tmp / "full2.npy"), np.load(tmp / "full1.npy"))
    # and both agree with the single-process build's own query to fp32 round-off
    ref = ls.query(mlp_task.full(), tmp / "full_ref", scores=tmp / "ref.npy", device="cpu", top_k=5, progress=False)
    np.testing.assert_allclose(np.load(tmp / "full1.npy"), np.load(tmp / "ref.npy"), rtol=1e-4, atol=1e-6)
    assert [[p["row"] for p in r["proponents"]] for r in one.results] == \
           [[p["row"] for p in r["proponents"]] for r in ref.results]


def test_append_to_a_sharded_index_adds_shards_and_equals_single_process(job):
    manifest = read_manifest(job["grown"])
    assert [(s.start, s.count) for s in manifest.shards] == [(0, 15), (15, 15), (30, 9), (39, 9)]
    assert [(s["kind"], s["shards"]) for s in manifest.segments] == [("build", [0, 2]), ("append", [2, 4])]
    assert_same_index(job["grown"], job["tmp"] / "grown_ref")
    ref = ls.query(mlp_task.full(), job["tmp"] / "grown_ref", scores=job["tmp"] / "gref.npy", device="cpu", top_k=5,
                   progress=False)
    np.testing.assert_allclose(np.load(job["tmp"] / "grown2.npy"), np.load(job["tmp"] / "gref.npy"), rtol=1e-4, atol=1e-6)
    assert [[p["id"] for p in r["proponents"]] for r in results_of(job["tmp"] / "grown2.jsonl")] == \
           [[p["id"] for p in r["proponents"]] for r in ref.results]


def test_lowrank_sketches_reduced_across_ranks_and_refit(job):
    """Nyström curvature from the all-reduced sketches (one layer Gaussian, k=16 < D=30; one dense,
    D=15), then `fit` under torchrun: the scores of a single-process build and fit of the same data."""
    tmp = job["tmp"]
    ref = ls.query(mlp_task.full(), tmp / "lowrank_ref", scores=tmp / "lr_ref.npy", device="cpu", top_k=5, progress=False)
    np.testing.assert_allclose(np.load(tmp / "lowrank2.npy"), np.load(tmp / "lr_ref.npy"), rtol=1e-3, atol=1e-5)
    assert [[p["row"] for p in r["proponents"]] for r in results_of(tmp / "lowrank2.jsonl")] == \
           [[p["row"] for p in r["proponents"]] for r in ref.results]
    summary = ls.fit(tmp / "lowrank_ref", preconditioner="lowrank", sketch_rank=2, damping=0.5, device="cpu",
                     progress=False)
    assert summary["rows"] == 48 and all(l["rank"] == 2 for l in summary["layers"].values())
    ls.query(mlp_task.full(), tmp / "lowrank_ref", scores=tmp / "refit_ref.npy", device="cpu", top_k=5, progress=False)
    assert not np.allclose(np.load(tmp / "refit_ref.npy"), np.load(tmp / "lr_ref.npy"))  # the refit changed them
    np.testing.assert_allclose(np.load(tmp / "refit2.npy"), np.load(tmp / "refit_ref.npy"), rtol=1e-3, atol=1e-5)
    # the refit's sketches (k = 8 now): each shard keeps its own, their sum is the single process's
    for name in ("0", "2"):
        with IndexReader(tmp / "lowrank_ref") as b, b.snapshot() as sb:
            single = sb.array(f"sketch/{name}/Y")
        np.testing.assert_allclose(_summed_sketch(tmp / "lowrank", name), single, rtol=1e-4, atol=1e-5)
    with open_index(tmp / "lowrank") as a, IndexReader(tmp / "lowrank_ref") as b, a.snapshot() as sa, b.snapshot() as sb:
        ca, cb = sa.state_meta("curvature"), sb.state_meta("curvature")
        for name in ("0", "2"):
            np.testing.assert_allclose(ca["layers"][name]["top_eigenvalues"], cb["layers"][name]["top_eigenvalues"],
                                       rtol=1e-4)


def _summed_sketch(index, layer):
    """Σ over shards of each shard's own sketch: the index's sketch Y = AΩ."""
    total = 0
    for entry in read_manifest(index).shards:
        with IndexReader(index / entry.name) as reader, reader.snapshot() as snap:
            total = total + snap.array(f"sketch/{layer}/Y")
    return total


def test_a_rank_reader_of_no_shard_reads_nothing(job):
    from lorif_stream.store import ShardedReader

    with ShardedReader(job["full"], shards=[]) as reader, reader.snapshot() as snap:
        assert snap.held_rows == 0 and list(snap.layer_values(0)) == []
    with ShardedReader(job["full"], shards=[1]) as reader, reader.snapshot() as snap:
        assert [start for _, start, _ in snap.ranges] == [24] and snap.id_of(30) == "ex30"
        with pytest.raises(ValueError, match="does not hold its head shard"):
            snap.state_meta("curvature")


def test_single_process_append_fit_info_on_a_sharded_index(job, tmp_path):
    index = tmp_path / "idx"
    shutil.copytree(job["grown"], index)
    extra = mlp_task.MLPTask(rows=(0, 6))  # the same examples under new ids
    extra.example_id = lambda example, i: f"extra{i}"
    result = ls.append(extra, index, device="cpu", progress=False)
    assert (result.new_rows, result.rows) == (6, 54)
    assert [(s.start, s.count) for s in read_manifest(index).shards][-1] == (48, 6)  # one new shard
    # a rerun of the same append is recognised, nothing is added twice
    assert ls.append(extra, index, device="cpu", progress=False).new_rows == 0
    summary = ls.fit(index, preconditioner="ekfac", damping=0.3, device="cpu", progress=False)
    assert summary["rows"] == 54 and all(l["damping"] == 0.3 for l in summary["layers"].values())
    info = ls.info(index)
    assert (info["rows"], info["shards"], len(info["segments"])) == (54, 5, 3)
    with open_index(index) as reader, reader.snapshot() as snap:
        assert snap.id_of(50) == "extra2" and snap.row_of("extra2") == 50 and snap.row_of("ex17") == 17


def test_append_of_an_existing_id_is_withdrawn(job, tmp_path):
    index = tmp_path / "idx"
    shutil.copytree(job["full"], index)
    with pytest.raises(WriteRefusedError, match=r"example id 'ex3' \(row 48\) is already in the index at row 3.*withdrawn"):
        ls.append(mlp_task.MLPTask(rows=(3, 5)), index, device="cpu", progress=False)
    assert len(read_manifest(index).shards) == 2 and not (index / "shard-00002").exists()
    assert ls.verify(index, progress=False).ok


def test_a_manifest_of_an_unknown_version_or_damaged_is_refused(job, tmp_path):
    from lorif_stream.store import CorruptBlockError, UnsupportedVersionError

    index = tmp_path / "idx"
    shutil.copytree(job["full"], index)
    body = json.loads((index / "shards.json").read_text())
    (index / "shards.json").write_text(json.dumps(dict(body, version=2)))
    with pytest.raises(UnsupportedVersionError, match="has shard manifest version 2; this lorif-stream reads versions \\[1\\]"):
        ls.info(index)
    (index / "shards.json").write_text(json.dumps(dict(body, segments=[dict(body["segments"][0], count=47)])))
    with pytest.raises(CorruptBlockError, match="shards.json checksum mismatch"):
        ls.query(mlp_task.full(), index, device="cpu", progress=False)


def test_verify_names_a_corrupted_shard_and_a_missing_one(job, tmp_path):
    index = tmp_path / "idx"
    shutil.copytree(job["full"], index)
    _damage_row(index / "shard-00001", 8)
    report = ls.verify(index, progress=False)
    assert not report.ok
    assert any(e.startswith("shard shard-00001: ") and "row 8" in e for e in report.errors), report.errors
    assert not any("shard-00000" in e for e in report.errors)
    shutil.rmtree(index / "shard-00001")
    report = ls.verify(index, progress=False)
    assert any("shard shard-00001 (rows 24..47) is missing" in e for e in report.errors), report.errors
    with pytest.raises(Exception, match="shard shard-00001 is missing"):
        ls.query(mlp_task.full(), index, device="cpu", progress=False)


def test_ranks_holding_other_numbers_of_shards_refit_in_the_same_passes(job, tmp_path):
    """3 shards on 2 ranks: rank 0 sums two shards' sketches (half the room per layer), rank 1 one.
    Both must cut the layers into the same groups (8000 bytes: one 1920-byte and one 960-byte sketch
    per group for rank 0's share, both in one for rank 1's), or their per-group exchanges mismatch."""
    index, ref = tmp_path / "idx", tmp_path / "ref"
    shutil.copytree(job["tmp"] / "lowrank", index)
    extra = mlp_task.MLPTask(rows=(0, 6))
    extra.example_id = lambda example, i: f"extra{i}"
    ls.append(extra, index, device="cpu", progress=False)
    shutil.copytree(index, ref)
    torchrun_job(tmp_path, [["fit", "--index", str(index), "--preconditioner", "lowrank", "--sketch-rank", "2",
                             "--memory-budget", "8000", "--device", "cpu", "--quiet"]])
    one = ls.fit(ref, preconditioner="lowrank", sketch_rank=2, memory_budget=8000, device="cpu", progress=False)
    with open_index(index) as reader, reader.snapshot() as snap:
        two = snap.state_meta("curvature")
    assert two["rows"] == one["rows"] == 54
    for name in ("0", "2"):
        np.testing.assert_allclose(two["layers"][name]["top_eigenvalues"], one["layers"][name]["top_eigenvalues"],
                                   rtol=1e-4)


def _damage_row(shard: Path, row: int) -> None:
    """Flip a byte inside the stored block of layer 0 that holds `row` of `shard`."""
    with IndexReader(shard) as reader, reader.snapshot() as snap:
        value = bytes(snap.value_at(0, row))
    data = bytearray((shard / "data.mdb").read_bytes())
    at = data.find(value)
    assert at > 0
    data[at + len(value) // 2] ^= 0xFF
    (shard / "data.mdb").write_bytes(bytes(data))


def test_killed_rank_resumes_to_the_same_index(tmp_path):
    """SIGKILL one rank mid-build: torchrun stops the job; the same command, rerun, finishes every shard
    at its first missing row; another world size is refused in one line."""
    index = tmp_path / "idx"
    cmd = [*TORCHRUN, "-m", "lorif_stream", "build", "--task", f"{MLP}:slow", "--index", str(index), *BUILD_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLP_TASK_DELAY": "0.25"}  # 0.25 s a batch of 4
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = _wait_for_rows(index / "shard-00001", 8, proc)
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    with IndexReader(index / "shard-00001") as reader:
        assert 8 <= reader.rows < 24
    with pytest.raises(SettingsMismatchError, match="resume it with 2 ranks, not 1"):
        ls.build(mlp_task.full(), index, progress=False, **BUILD)
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "indexed" in rerun.stdout
    ls.build(mlp_task.full(), tmp_path / "ref", progress=False, **BUILD)
    assert_same_index(index, tmp_path / "ref")
    assert ls.verify(index, progress=False).ok
    # a rerun of the finished build: nothing to do with the same data, refused with other data
    assert ls.build(mlp_task.full(), index, progress=False, **BUILD).new_rows == 0
    with pytest.raises(SettingsMismatchError, match="holds a complete build of other examples"):
        ls.build(_renamed(), index, progress=False, **BUILD)


def failing_job(args: list[str]) -> list[str]:
    """The error lines of a 2-rank CLI command that must fail; a hang (a rank left waiting in a
    collective) fails the test at the timeout instead."""
    proc = subprocess.run([*TORCHRUN, "-m", "lorif_stream", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    return [l for l in proc.stderr.splitlines() if l.startswith("lorif-stream: error:")]


def test_a_failing_rank_stops_the_job_in_one_line_each(tmp_path):
    """A non-finite example in rank 1's rows: rank 1 names it by its global row, rank 0 says rank 1
    failed, both exit (no rank is left waiting in a collective)."""
    (tmp_path / "nan_task.py").write_text(f"import sys\nsys.path.insert(0, {str(TASKS)!r})\n"
                                          f"from mlp_task import MLPTask\n\ndef nan30():\n    return MLPTask(nan_row=30)\n")
    errors = failing_job(["build", "--task", f"{tmp_path / 'nan_task.py'}:nan30", "--index", str(tmp_path / "idx"),
                          *BUILD_ARGS])
    assert any("non-finite loss or gradient for example 'ex30' (row 30); rows 24..29 are committed" in l
               for l in errors), errors
    assert any("rank 1 failed: NonFiniteGradientError" in l for l in errors), errors


UNREADABLE_TASK = """
import sys
sys.path.insert(0, {tasks!r})
from mlp_task import MLPTask


class Unreadable(MLPTask):
    def train_examples(self):
        rows = list(super().train_examples())
        rows[31] = (None, rows[31][1])
        return rows

    def collate(self, examples):
        if any(x is None for x, _ in examples):
            raise RuntimeError("cannot read example 31")
        return super().collate(examples)


def unreadable31():
    return Unreadable()
"""


def test_a_rank_failing_in_the_whitening_pre_pass_is_named_by_the_other(tmp_path):
    """Example 31 is in rank 1's share of the whitening sample: rank 0, done with its share, must
    hear that rank 1 failed (it used to meet a closed connection in the next all-reduce)."""
    (tmp_path / "bad_task.py").write_text(UNREADABLE_TASK.format(tasks=str(TASKS)))
    errors = failing_job(["build", "--task", f"{tmp_path / 'bad_task.py'}:unreadable31", "--index",
                          str(tmp_path / "idx"), *BUILD_ARGS])
    assert sorted(errors) == ["lorif-stream: error: cannot read example 31  (LORIF_DEBUG=1 shows the traceback)",
                              "lorif-stream: error: rank 1 failed: RuntimeError: cannot read example 31  "
                              "(LORIF_DEBUG=1 shows the traceback)"], errors


def test_a_rank_failing_in_the_curvature_step_does_not_hang_the_job(job, tmp_path):
    """A damaged block in rank 1's shard fails its EK-FAC sums inside `fit`: rank 0 was left in the
    all-reduce of the sums while rank 1 waited to say it failed (a hang until the timeout)."""
    index = tmp_path / "idx"
    shutil.copytree(job["full"], index)
    _damage_row(index / "shard-00001", 8)
    errors = failing_job(["fit", "--index", str(index), "--preconditioner", "ekfac", "--device", "cpu", "--quiet"])
    assert any("rank 1 failed: CorruptBlockError: layer '0' block at row 8" in l for l in errors), errors
    assert any(l.startswith("lorif-stream: error: layer '0' block at row 8") for l in errors), errors


BUDGET_JOB = """
import sys
sys.path.insert(0, {tasks!r})
import mlp_task
import lorif_stream as ls
from lorif_stream.comm import init_from_env, shutdown

comm = init_from_env("cpu")
try:
    ls.build(mlp_task.full(), sys.argv[1], memory_budget=[2000, 1200][comm.rank], progress=False, **{build!r})
finally:
    shutdown()
"""


def test_ranks_with_other_memory_budgets_run_the_same_whitening_passes(tmp_path):
    """Each rank's default budget is its own share of its node's free RAM, so ranks may differ: with
    2000 bytes rank 0 fits both layers' moments (760 bytes) in one pass, with 1200 rank 1 needs two.
    Every rank must run the same passes (the smallest budget's), or their all-reduces mismatch (a hang)."""
    (tmp_path / "job.py").write_text(BUDGET_JOB.format(tasks=str(TASKS), build=BUILD))
    proc = subprocess.run([*TORCHRUN, str(tmp_path / "job.py"), str(tmp_path / "idx")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ls.build(mlp_task.full(), tmp_path / "ref", memory_budget=1200, progress=False, **BUILD)
    assert_same_index(tmp_path / "idx", tmp_path / "ref")


def _renamed():
    task = mlp_task.full()
    task.example_id = lambda example, i: f"other{i}"
    return task


def _wait_for_rows(shard: Path, rows: int, proc) -> int:
    """The pid of the process writing `shard` (from its writer.lock) once it has committed `rows` rows."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            pid = (shard / "writer.lock").read_text().strip()
            with IndexReader(shard) as reader:
                if pid and reader.rows >= rows:
                    return int(pid)
        except Exception:  # not created yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"{shard} never reached {rows} rows")


def test_modules_option_tracks_exactly_the_matching_layers(tmp_path):
    from lorif_stream.cli import main

    main(["build", "--task", f"{MLP}:full", "--index", str(tmp_path / "cli"), "--modules", "^2$", *BUILD_ARGS])
    task = mlp_task.full()
    task.tracked_modules = "^2$"
    ls.build(task, tmp_path / "api", progress=False, **BUILD)
    with IndexReader(tmp_path / "cli") as a, IndexReader(tmp_path / "api") as b:
        assert [l.name for l in a.layout.layers] == ["2"]
        assert a.settings["tracked_modules"] == "^2$"
        assert a.layout == b.layout and a.settings["layers"] == b.settings["layers"]
    assert_same_factors_and_ids(tmp_path / "cli", tmp_path / "api")
    with pytest.raises(SystemExit) as e:
        main(["build", "--task", f"{MLP}:full", "--index", str(tmp_path / "bad"), "--modules", "(", *BUILD_ARGS])
    assert e.value.code != 0


def test_append_to_a_sharded_index_checks_the_recorded_encoding(job, tmp_path):
    """A task whose encoding_settings() differ from the build's record is refused by the sharded
    append as by one process's, naming what differs, before any shard is added."""
    from lorif_stream.store import IndexWriter
    from lorif_stream.task_check import TaskMismatchError

    index = tmp_path / "idx"
    shutil.copytree(job["grown"], index)
    head = index / read_manifest(index).shards[0].name
    with IndexWriter.open(head) as writer:
        writer.update_settings(dict(writer.settings, task_encoding={"kind": "mlp", "scale": 1}))
    extra = mlp_task.MLPTask(rows=(0, 6))
    extra.example_id = lambda example, i: f"extra{i}"
    extra.encoding_settings = lambda: {"kind": "mlp", "scale": 2}
    shards_before = len(read_manifest(index).shards)
    with pytest.raises(TaskMismatchError, match=r"scale: 2 here, 1 at build"):
        ls.append(extra, index, device="cpu", progress=False)
    assert len(read_manifest(index).shards) == shards_before


DOUBLED_TASK = """
import sys
sys.path.insert(0, {tasks!r})
from mlp_task import MLPTask


class Doubled(MLPTask):
    def loss(self, model, batch):
        return 2 * super().loss(model, batch)


def doubled():
    return Doubled()
"""


def test_a_resumed_sharded_build_recomputes_its_rows_with_the_task(job, tmp_path):
    """A 2-rank build stopped before its curvature step, resumed by a task whose loss changed (same
    model, ids and examples): each rank recomputes rows of its shard and refuses, naming the shard
    and the index's row, as one process's resume does (the shards used to take it)."""
    from lorif_stream.store.shards import write_manifest

    index = tmp_path / "idx"
    shutil.copytree(job["full"], index)
    write_manifest(index, read_manifest(index).with_last_segment(finalized=False))
    (tmp_path / "doubled.py").write_text(DOUBLED_TASK.format(tasks=str(TASKS)))
    errors = failing_job(["build", "--task", f"{tmp_path / 'doubled.py'}:doubled", "--index", str(index),
                          *BUILD_ARGS])
    assert any("shard shard-00001 (rows 24..47): the build's task does not reproduce" in l
               and "row 24 (id 'ex24')" in l for l in errors), errors


LEFT_OPEN_JOB = """
import json, sys
sys.path.insert(0, {tasks!r})
import mlp_task
import lorif_stream as ls
from lorif_stream.comm import init_from_env, shutdown


class RenamedSecondHalf(mlp_task.MLPTask):
    def example_id(self, example, index):  # rank 1's shard (rows 24..47) under other ids
        return f"ex{{index}}" if index < 24 else f"other{{index}}"


comm = init_from_env("cpu")
index = sys.argv[1]
try:
    try:
        ls.build(mlp_task.MLPTask(nan_row=30), index, progress=False, **{build!r})  # rank 1 stops at row 30
    except Exception:
        pass
    try:
        ls.build(RenamedSecondHalf(), index, progress=False, **{build!r})
        refused = None
    except Exception as e:
        refused = str(e)
    ls.build(mlp_task.full(), index, progress=False, **{build!r})
    with open(f"{{index}}-rank{{comm.rank}}.json", "w") as out:  # the ranks' stdout interleave
        json.dump({{"rank": comm.rank, "refused": refused}}, out)
finally:
    shutdown()
"""


def test_a_resume_refused_by_one_rank_leaves_no_rank_holding_its_shard(tmp_path):
    """A resumed 2-rank build whose examples differ only in rank 1's shard is refused by rank 1 as it
    reopens its shard; rank 0, whose shard opened, must close it: the same process's next command (the
    right task) resumes instead of finding shard-00000 already open."""
    (tmp_path / "job.py").write_text(LEFT_OPEN_JOB.format(tasks=str(TASKS), build=BUILD))
    proc = subprocess.run([*TORCHRUN, str(tmp_path / "job.py"), str(tmp_path / "idx")], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [json.loads((tmp_path / f"idx-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all("row 24: the index has id 'ex24' but the task gives 'other24'" in d["refused"] for d in said), said  # the index's row
    with open_index(tmp_path / "idx") as reader, reader.snapshot() as snap:  # resumed to its end
        assert snap.ids(0, snap.rows) == [f"ex{i}" for i in range(mlp_task.N_TRAIN)]
        assert snap.state_meta("curvature")["rows"] == mlp_task.N_TRAIN
    assert read_manifest(tmp_path / "idx").segments[-1]["finalized"]


# ------------------------------------------------------------------------------------ one opening for both layouts
# A sharded index is opened by the function that opens one environment (build._open_for_write): the
# four ways they used to differ are pinned here for shards (and, where one environment had no test,
# for it too).


def test_a_rerun_on_a_sharded_index_with_rows_keeps_its_curvature_and_says_so(job, tmp_path, capsys):
    """As one environment: the index's curvature options stay (a sharded rerun used to take the
    command's), the command's that differ are named, with `fit` as the way to change them."""
    index = tmp_path / "idx"
    shutil.copytree(job["full"], index)
    assert ls.build(mlp_task.full(), index, progress=False, **dict(BUILD, preconditioner="none")).new_rows == 0
    err = capsys.readouterr().err
    assert "curvature options differ" in err and "preconditioner: index 'ekfac' vs 'none'" in err, err
    assert "the index keeps its own" in err and f"lorif-stream fit --index {index}" in err
    assert ls.info(index)["curvature"]["config"]["preconditioner"] == "ekfac"


def test_a_sharded_append_adopts_the_index_factor_settings_and_refuses_a_given_other(job, tmp_path):
    index = tmp_path / "idx"
    shutil.copytree(job["grown"], index)
    extra = mlp_task.MLPTask(rows=(0, 6))
    extra.example_id = lambda example, i: f"extra{i}"
    shards = len(read_manifest(index).shards)
    with pytest.raises(SettingsMismatchError, match=r"factor settings differ from the index's \(f: index 1 vs 2\)"):
        ls.append(extra, index, f=2, device="cpu", progress=False)
    assert len(read_manifest(index).shards) == shards
    # options not given are the index's (f=1, fp32), whatever today's defaults
    assert ls.append(extra, index, device="cpu", batch_size=4, progress=False).new_rows == 6
    assert read_manifest(index).segments[-1]["count"] == 6


@pytest.mark.parametrize("sharded", [True, False])
def test_a_model_tracking_other_layers_is_refused_naming_them(job, tmp_path, sharded):
    """Both layouts check the tracked layers, then the fingerprint: a rerun tracking other layers is
    refused naming them (one environment used to resume with the index's layers instead)."""
    index = tmp_path / "idx"
    if sharded:
        shutil.copytree(job["full"], index)
    else:
        ls.build(mlp_task.full(), index, progress=False, **BUILD)
    task = mlp_task.full()
    task.tracked_modules = "^2$"
    with pytest.raises(SettingsMismatchError, match=r"tracks other layers than index .*\('0' only in the index\)"):
        ls.build(task, index, progress=False, **BUILD)


def test_a_sharded_build_stopped_before_its_first_row_takes_a_rerun_with_new_settings(tmp_path):
    """Two 2-rank `whiten`s leave sharded indexes with no row. A 2-rank build with the same factor
    settings continues the first, with its own curvature options (the index has none fitted); one with
    other settings re-creates the second with a notice, as one environment does. A plain process cannot
    see whether another job's shards hold rows: it is refused, naming the directory to remove."""
    same, other, elsewhere = tmp_path / "same", tmp_path / "other", tmp_path / "elsewhere"
    whiten = [a if a != "ekfac" else "none" for a in BUILD_ARGS]
    proc = torchrun_job(tmp_path, [
        ["whiten", "--task", f"{MLP}:full", "--index", str(same), *whiten],
        ["build", "--task", f"{MLP}:full", "--index", str(same), *BUILD_ARGS],
        ["whiten", "--task", f"{MLP}:full", "--index", str(other), *whiten],
        ["build", "--task", f"{MLP}:full", "--index", str(other), *BUILD_ARGS, "--min-side", "2"],
        ["whiten", "--task", f"{MLP}:full", "--index", str(elsewhere), *whiten],
    ])
    assert proc.stderr.count("re-creating it with this command's settings") == 1, proc.stderr[-3000:]
    assert f"index {other} has no rows yet" in proc.stderr and "min_side: index 32 vs 2" in proc.stderr
    ls.build(mlp_task.full(), tmp_path / "ref", progress=False, **BUILD)
    assert_same_index(same, tmp_path / "ref")
    ls.build(mlp_task.full(), tmp_path / "ref2", progress=False, **dict(BUILD, min_side=2))
    assert_same_index(other, tmp_path / "ref2")
    with pytest.raises(SettingsMismatchError, match=r"has no rows yet and its settings differ .*but 2 ranks started "
                                                    r"it, not 1: remove " + re.escape(str(elsewhere)) + " to build"):
        ls.build(mlp_task.full(), elsewhere, progress=False, **dict(BUILD, rank=2))
    assert read_manifest(elsewhere).segments[0]["count"] == 48  # left as it was


PREPASS_JOB = """
import json, sys
sys.path.insert(0, {tasks!r})
import mlp_task
import lorif_stream as ls
from lorif_stream import whitening
from lorif_stream.comm import init_from_env, shutdown
from lorif_stream.store import IndexReader

whitening._CHECKPOINT_SECONDS = 0.0  # each rank checkpoints its moments after every batch


class Crashing(mlp_task.MLPTask):
    def __init__(self, crash_after=None):
        super().__init__()
        self.crash_after, self.batches = crash_after, 0

    def loss(self, model, batch):  # only the pre-pass runs the model in a `whiten`
        self.batches += 1
        if self.crash_after is not None and self.batches > self.crash_after:
            raise RuntimeError("simulated crash")
        return super().loss(model, batch)


comm = init_from_env("cpu")
index = sys.argv[1]
try:
    try:
        ls.whiten(Crashing(crash_after=3), index, progress=False, **{build!r})
        crashed = None
    except Exception as e:
        crashed = str(e)
    with IndexReader(f"{{index}}/shard-0000{{comm.rank}}") as reader, reader.snapshot() as snap:
        checkpointed = snap.state_meta(whitening.WHITENING_META)["partial"]["examples_done"]
    task = Crashing()
    ls.whiten(task, index, progress=False, **{build!r})
    with open(f"{{index}}-rank{{comm.rank}}.json", "w") as out:  # the ranks' stdout interleave
        json.dump({{"rank": comm.rank, "crashed": crashed, "checkpointed": checkpointed, "batches": task.batches}}, out)
finally:
    shutdown()
"""


def test_a_sharded_whitening_pre_pass_resumes_from_each_rank_checkpoint(tmp_path):
    """Both ranks stop in the pre-pass after 3 of the 6 batches of their share (24 of the 48 sample
    examples, 4 a batch), each having checkpointed its partial moments into its own shard; the rerun
    runs only the 3 batches left on each rank, and whitens as one process does."""
    from lorif_stream import whitening

    (tmp_path / "job.py").write_text(PREPASS_JOB.format(tasks=str(TASKS), build=BUILD))
    proc = subprocess.run([*TORCHRUN, str(tmp_path / "job.py"), str(tmp_path / "idx")], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [json.loads((tmp_path / f"idx-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(d["rank"], d["checkpointed"], d["batches"]) for d in said] == [(0, 12, 3), (1, 12, 3)], said
    assert all("simulated crash" in d["crashed"] for d in said), said
    ls.whiten(mlp_task.full(), tmp_path / "ref", progress=False, **BUILD)
    with IndexReader(tmp_path / "idx" / "shard-00000") as a, IndexReader(tmp_path / "ref") as b, \
            a.snapshot() as sa, b.snapshot() as sb:
        assert sa.state_meta(whitening.WHITENING_META).get("partial") is None
        for name in ("0", "2"):
            for field in ("P_in", "P_out", "q_in", "q_out"):
                np.testing.assert_allclose(sa.array(whitening.array_name(name, field)),
                                           sb.array(whitening.array_name(name, field)), rtol=1e-5, atol=1e-6)
