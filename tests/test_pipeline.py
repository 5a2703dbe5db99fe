"""build -> fit -> query end to end, against exact influence computed independently."""
from __future__ import annotations

import json
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
from lorif_stream.fit import SKETCH_META
from lorif_stream.store import IndexReader
from lorif_stream.store.verify import verify_snapshot

ROOT = Path(__file__).parents[1]
TASKS = ROOT / "tests" / "tasks" / "mlp_task.py"
sys.path.insert(0, str(TASKS.parent))
import mlp_task  # noqa: E402
sys.path.insert(0, str(ROOT / "tests"))
from helpers_index import assert_same_factors_and_ids  # noqa: E402
from helpers_oracle import exact_influence, per_example_grads  # noqa: E402

# the LoRIF paper's mode (random projections, low-rank curvature), whose f=1 limit is exact
# influence with the empirical Fisher; whitened projections have their own oracles (test_whitening)
PAPER = dict(projection_kind="random")
EXACT = dict(f=1, rank=1, dtype="fp32", sketch_rank=64, damping=0.5, device="cpu", **PAPER)


def read_results(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def exact_index(tmp_path_factory):
    path = tmp_path_factory.mktemp("exact") / "idx"
    ls.build(mlp_task.full(), path, block_size=7, batch_size=5, progress=False, **EXACT)
    return path


def test_scores_equal_exact_influence(exact_index, tmp_path):
    res = ls.query(mlp_task.full(), exact_index, tmp_path / "r.jsonl", tmp_path / "s.npy", top_k=5, device="cpu",
                   progress=False)
    scores = np.load(tmp_path / "s.npy")
    oracle = exact_influence(mlp_task.full(), lambda A: EXACT["damping"])
    assert scores.shape == oracle.shape == (mlp_task.N_QUERY, mlp_task.N_TRAIN)
    np.testing.assert_allclose(scores, oracle, rtol=2e-3, atol=2e-3 * np.abs(oracle).max())
    for q, r in enumerate(read_results(tmp_path / "r.jsonl")):
        want = np.argsort(-oracle[q])[:5].tolist()
        assert [p["row"] for p in r["proponents"]] == want
        assert [p["row"] for p in r["opponents"]] == np.argsort(oracle[q])[:5].tolist()
        assert [p["id"] for p in r["proponents"]] == [f"ex{i}" for i in want]
        assert r["id"] == f"ex{q}"  # the task's example_id, applied to the query set
    assert res.rows == mlp_task.N_TRAIN


@pytest.mark.parametrize("opts", [dict(buffers=1, loader_threads=0), dict(buffers=4, loader_threads=1),
                                  dict(buffers=2, loader_threads=2, batch_size=2), dict(scorer="dense"),
                                  dict(scorer="factored", memory_budget=30_000)])
def test_loader_and_batching_do_not_change_results(exact_index, tmp_path, opts):
    ref = ls.query(mlp_task.full(), exact_index, None, tmp_path / "ref.npy", top_k=4, device="cpu", progress=False)
    got = ls.query(mlp_task.full(), exact_index, None, tmp_path / "got.npy", top_k=4, device="cpu", progress=False,
                   **opts)
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), np.load(tmp_path / "ref.npy"), rtol=1e-5, atol=1e-6)
    assert [[p["row"] for p in r["proponents"]] for r in got.results] == \
           [[p["row"] for p in r["proponents"]] for r in ref.results]


def test_block_size_does_not_change_scores(exact_index, tmp_path):
    other = tmp_path / "idx"
    ls.build(mlp_task.full(), other, block_size=48, batch_size=16, progress=False, **EXACT)
    ls.query(mlp_task.full(), exact_index, None, tmp_path / "a.npy", top_k=3, device="cpu", progress=False)
    ls.query(mlp_task.full(), other, None, tmp_path / "b.npy", top_k=3, device="cpu", progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), rtol=1e-4, atol=1e-6)


def test_build_then_append_equals_one_build(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    opts = dict(f=1, rank=1, dtype="bf16", sketch_rank=16, damping=0.5, device="cpu", block_size=8, progress=False,
                **PAPER)
    ls.build(mlp_task.full(), whole, **opts)
    ls.build(mlp_task.first(), parts, **opts)
    ls.append(mlp_task.second(), parts, f=1, rank=1, dtype="bf16", device="cpu", block_size=8, progress=False)
    assert ls.info(whole)["rows"] == mlp_task.N_TRAIN
    assert_same_factors_and_ids(whole, parts, sketch_layers=("0", "2"))
    ra = ls.query(mlp_task.full(), whole, None, tmp_path / "a.npy", top_k=5, device="cpu", progress=False)
    rb = ls.query(mlp_task.full(), parts, None, tmp_path / "b.npy", top_k=5, device="cpu", progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), rtol=1e-3, atol=1e-5)
    assert [[p["id"] for p in r["proponents"]] for r in ra.results] == [[p["id"] for p in r["proponents"]] for r in rb.results]


def test_append_refuses_mismatches_and_leaves_index_untouched(tmp_path):
    path = tmp_path / "idx"
    ls.build(mlp_task.first(), path, f=1, rank=1, device="cpu", sketch_rank=8, progress=False)
    with IndexReader(path) as r:
        settings_before = r.settings
    with pytest.raises(ValueError, match="model differs"):
        ls.append(mlp_task.other_weights(), path, f=1, rank=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"f: index 1 vs 2"):
        ls.append(mlp_task.second(), path, f=2, rank=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="already in the index"):
        ls.append(mlp_task.first(), path, f=1, rank=1, device="cpu", progress=False)
    with IndexReader(path) as r, r.snapshot() as s:
        assert s.rows == 30 and verify_snapshot(s).ok
        assert r.settings == settings_before  # no half-started append segment left behind
    ls.append(mlp_task.second(), path, f=1, rank=1, device="cpu", progress=False)
    assert ls.info(path)["rows"] == mlp_task.N_TRAIN


def test_nonfinite_gradient_names_the_example_and_keeps_committed_rows(tmp_path):
    path = tmp_path / "idx"
    with pytest.raises(ValueError, match=r"'ex21' \(row 21\)"):
        ls.build(mlp_task.with_nan(), path, f=1, rank=1, device="cpu", batch_size=4, block_size=8, sketch_rank=8,
                 progress=False)
    with IndexReader(path) as r, r.snapshot() as s:
        assert s.rows == 21 and verify_snapshot(s).ok
    skipped = tmp_path / "skip"
    ls.build(mlp_task.with_nan(), skipped, f=1, rank=1, device="cpu", sketch_rank=8, skip_nonfinite=True, progress=False)
    with IndexReader(skipped) as r, r.snapshot() as s:
        assert s.rows == mlp_task.N_TRAIN and r.settings["nonfinite_rows"] == [21]
        assert all(not L.any() for L, _ in s.row(21))


def test_query_errors(exact_index, tmp_path):
    with pytest.raises(ValueError, match="model differs"):
        ls.query(mlp_task.other_weights(), exact_index, None, top_k=3, device="cpu", progress=False)
    with pytest.raises(ValueError, match="larger than the index's 48 rows"):
        ls.query(mlp_task.full(), exact_index, None, top_k=49, device="cpu", progress=False)
    with pytest.raises(ValueError, match="no query examples"):
        ls.query(mlp_task.no_queries(), exact_index, None, top_k=3, device="cpu", progress=False)
    with pytest.raises(Exception, match="does not exist"):
        ls.query(mlp_task.full(), tmp_path / "nope", None, top_k=3, device="cpu", progress=False)


def cli(*args, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", "lorif_stream.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_end_to_end(tmp_path):
    idx = tmp_path / "idx"
    task = f"{TASKS}:full"
    cli("build", "--task", task, "--index", idx, "--f", 1, "--sketch-rank", 16, "--device", "cpu", "--quiet")
    info = json.loads(cli("info", "--index", idx, "--json").stdout)
    assert info["rows"] == mlp_task.N_TRAIN and [l["name"] for l in info["layers"]] == ["0", "2"]
    text = cli("info", "--index", idx).stdout
    other = (info["disk_bytes"] - info["factor_bytes"]) / 1e6
    assert (f"{info['disk_bytes'] / 1e6:,.1f} MB on disk: factors {info['factor_bytes'] / 1e6:,.1f} MB" in text
            and f"curvature state and free pages {other:,.1f} MB" in text)
    assert "ok: 48 rows" in cli("verify", "--index", idx, "--quiet").stdout
    out = tmp_path / "results.jsonl"
    cli("query", "--task", task, "--index", idx, "--top-k", 3, "--out", out, "--device", "cpu", "--quiet")
    results = read_results(out)
    assert len(results) == mlp_task.N_QUERY
    assert all(len(r["proponents"]) == 3 and len(r["opponents"]) == 3 for r in results)
    assert all(r["proponents"][0]["score"] >= r["proponents"][-1]["score"] for r in results)
    bad = cli("query", "--task", "tests/tasks/missing.py:full", "--index", idx, check=False)
    assert bad.returncode != 0 and "missing.py" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("info", "--index", tmp_path / "nowhere", check=False)
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


_FILE_SIZE_LIMITED_BUILD = """
import resource, signal, sys
from lorif_stream.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
main(sys.argv[2:])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE stands in for a full disk on Linux")
def test_a_full_disk_stops_the_build_with_one_line_and_loses_nothing(tmp_path):
    full, clean = tmp_path / "full", tmp_path / "clean"
    args = ["build", "--task", f"{TASKS}:full", "--f", 1, "--sketch-rank", 4, "--device", "cpu", "--block-size", 4,
            "--quiet"]
    cli(*args, "--index", clean)
    cli("whiten", *args[1:], "--index", tmp_path / "whitened")
    # a file-size cap between the whitened-only index and the finished one: the row writes fail
    # part-way, as on a full disk
    start, end = ((p / "data.mdb").stat().st_size for p in (tmp_path / "whitened", clean))
    assert end > start
    limit = (start + end) // 2
    proc = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMITED_BUILD, str(limit), *map(str, args), "--index",
                           str(full)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and f"writing to index {full} failed" in proc.stderr
    assert "rerun the same command to resume" in proc.stderr
    with IndexReader(full) as r, r.snapshot() as s:
        assert 0 < r.rows < mlp_task.N_TRAIN and verify_snapshot(s).ok
    cli(*args, "--index", full)
    assert_same_factors_and_ids(full, clean)


def test_sigkill_during_build_then_resume_equals_uninterrupted(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    # EK-FAC: its Λ statistic is fed during the build and must resume exactly too
    args = ["--f", 1, "--preconditioner", "ekfac", "--device", "cpu", "--block-size", 4, "--batch-size", 2, "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "lorif_stream.cli", "build", "--task", f"{TASKS}:slow",
                             "--index", killed, *map(str, args)], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if (killed / "data.mdb").exists():
            try:
                with IndexReader(killed) as r:
                    if r.rows >= 12:
                        break
            except Exception:
                pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with IndexReader(killed) as r:
        assert 12 <= r.rows < mlp_task.N_TRAIN
    cli("build", "--task", f"{TASKS}:full", "--index", killed, *args)
    cli("build", "--task", f"{TASKS}:full", "--index", clean, *args)
    assert ls.info(killed)["rows"] == mlp_task.N_TRAIN
    assert_same_factors_and_ids(killed, clean)
    with IndexReader(killed) as a, IndexReader(clean) as b, a.snapshot() as sa, b.snapshot() as sb:
        for name in ("0", "2"):
            ga, gb = sa.state_meta("curvature")["generation"], sb.state_meta("curvature")["generation"]
            np.testing.assert_allclose(sa.array(f"curvature/{ga}/{name}/ekfac"),
                                       sb.array(f"curvature/{gb}/{name}/ekfac"), rtol=1e-4)
    # different settings on an existing index are refused, naming them
    bad = cli("build", "--task", f"{TASKS}:full", "--index", killed, "--f", 2, "--device", "cpu", check=False)
    assert bad.returncode == 1 and "f: index 1 vs 2" in bad.stderr


def test_fit_recomputes_curvature_without_touching_factors(exact_index, tmp_path):
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(exact_index, idx)
    with IndexReader(idx) as r, r.snapshot() as s:
        blocks_before = [bytes(v) for _, v in s.layer_values(0)]
    proc = cli("fit", "--index", idx, "--sketch-rank", 4, "--damping-policy", "trace", "--damping-scale", 0.01,
               "--refine", 2, "--device", "cpu", "--quiet")
    assert "rank 4" in proc.stdout
    info = ls.info(idx)
    assert [l["rank"] for l in info["layers"]] == [4, 4]
    assert info["curvature"]["config"]["damping_policy"] == "trace"
    with IndexReader(idx) as r, r.snapshot() as s:
        assert [bytes(v) for _, v in s.layer_values(0)] == blocks_before
        meta = s.state_meta("curvature")
        for name, layer in meta["layers"].items():
            D = next(l.D for l in r.layout.layers if l.name == name)
            assert layer["damping"] == pytest.approx(0.01 * layer["trace"] / D, rel=1e-6)


def test_default_sketch_width_is_stored_as_a_number(tmp_path):
    # k = 4r by default, written into the index as a number: a later default never reinterprets it
    path = tmp_path / "idx"
    ls.build(mlp_task.first(), path, f=1, rank=1, device="cpu", sketch_rank=6, progress=False, **PAPER)
    with IndexReader(path) as r:
        assert r.settings["curvature"]["oversample"] == 18
        with r.snapshot() as s:
            widths = {name: layer["k"] for name, layer in s.state_meta(SKETCH_META)["layers"].items()}
            assert widths == {l.name: min(24, l.D) for l in r.layout.layers}  # clamped to D
    # an index built with another width keeps it when appended to
    old = tmp_path / "old"
    ls.build(mlp_task.first(), old, f=1, rank=1, device="cpu", sketch_rank=6, oversample=2, progress=False, **PAPER)
    ls.append(mlp_task.second(), old, f=1, rank=1, device="cpu", progress=False)
    with IndexReader(old) as r, r.snapshot() as s:
        assert r.settings["curvature"]["oversample"] == 2
        widths = {name: layer["k"] for name, layer in s.state_meta(SKETCH_META)["layers"].items()}
        assert widths == {l.name: min(8, l.D) for l in r.layout.layers}


def test_a_disk_too_small_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import shutil as _shutil

    from lorif_stream.capture import LayerInfo
    from lorif_stream.config import BuildConfig, CurvatureConfig
    from lorif_stream.store import IndexLayout, LayerShape

    from lorif_stream import estimate as estimate_module
    from lorif_stream.projection import ProjectionSpec

    real_usage = _shutil.disk_usage
    monkeypatch.setattr(estimate_module.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1 << 20))
    with pytest.raises(OSError, match=r"the index needs about 0\.0\d GB for 48 examples but .* has 0\.00 GB free"):
        ls.build(mlp_task.full(), tmp_path / "idx", f=1, sketch_rank=16, device="cpu", progress=False)
    assert not (tmp_path / "idx" / "data.mdb").exists()
    # the estimate counts the stored sketches (D x k) and eigenvectors (D x r), twice for copy-on-write
    layout = IndexLayout((LayerShape("a", 64, 32), LayerShape("b", 8, 4)), c=1, dtype="bf16", block_size=16)
    layers = [LayerInfo("a", "linear", 128, 256, 32, 64), LayerInfo("b", "linear", 4, 8, 4, 8)]

    def estimate(**options):
        config = BuildConfig(**options)
        spec = ProjectionSpec.from_factors(config.factor_key())
        return estimate_module.estimate_build(layers, spec, config, layout, 1000).disk_peak

    small, wide = CurvatureConfig(sketch_rank=4, oversample=0), CurvatureConfig(sketch_rank=16)
    grow = estimate(projection_kind="random", curvature=wide) - estimate(projection_kind="random", curvature=small)
    # layer b (D = 32) is narrower than the wide sketch (k = 64): that one is the exact fp64 Gram
    assert grow == 2 * 4 * 2048 * (64 + 16 - 4 - 4) + 2 * (8 * 32 * 32 + 4 * 32 * 16 - 4 * 32 * (4 + 4))
    # whitened, dot product: projections, eigenbases and the moment checkpoint; no sketch
    dot = CurvatureConfig(preconditioner="none")
    whitened = estimate(curvature=dot) - estimate(projection_kind="random", curvature=dot)
    per_layer = [4 * (128 * 32 + 256 * 64 + 32 ** 2 + 64 ** 2) + 8 * (128 ** 2 + 256 ** 2),
                 4 * (4 * 4 + 8 * 8 + 4 ** 2 + 8 ** 2) + 8 * (4 ** 2 + 8 ** 2)]
    assert whitened == 2 * sum(per_layer)
    # EK-FAC adds its D-sized sums (fp64) and one fp32 generation per layer; `auto` is counted as
    # EK-FAC until the pre-pass decides
    assert estimate(curvature=CurvatureConfig(preconditioner="ekfac")) - estimate(curvature=dot) == 2 * 12 * (2048 + 32)
    assert estimate() == estimate(curvature=CurvatureConfig(preconditioner="ekfac"))


def test_bad_curvature_settings_and_tiny_budget_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sketch_rank=0"):
        ls.build(mlp_task.full(), tmp_path / "a", sketch_rank=0, device="cpu", progress=False)
    with pytest.raises(ValueError, match="damping=-1"):
        ls.build(mlp_task.full(), tmp_path / "b", damping=-1.0, device="cpu", progress=False)
    with pytest.raises(MemoryError, match=r"too small to whiten layer '0'"):
        ls.build(mlp_task.full(), tmp_path / "w", f=1, memory_budget=800, device="cpu", progress=False)
    with pytest.raises(MemoryError, match=r"too small for even one layer: layer '0'"):
        ls.build(mlp_task.full(), tmp_path / "c", f=1, sketch_rank=16, memory_budget=1000, device="cpu",
                 progress=False, **PAPER)
    # refused before the first row: nothing is written, and the same build with a real budget just runs
    assert not (tmp_path / "c" / "data.mdb").exists()
    ls.build(mlp_task.full(), tmp_path / "c", f=1, sketch_rank=16, device="cpu", progress=False, **PAPER)
    assert ls.query(mlp_task.full(), tmp_path / "c", None, top_k=2, device="cpu", progress=False).rows == 48


def test_a_tracked_layer_that_never_runs_is_reported(tmp_path, capsys):
    class WithIdleLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp_task.make_model()
            self.idle = torch.nn.Linear(3, 3)  # weight used nowhere: its gradient is always zero

        def forward(self, x):
            return self.net(x)

    task = mlp_task.full()
    task.model = WithIdleLayer
    ls.build(task, tmp_path / "idx", f=1, sketch_rank=4, device="cpu", progress=False)
    assert "never reached the loss (idle)" in capsys.readouterr().err


def test_layers_option_scores_only_the_chosen_layers(exact_index, tmp_path):
    ls.query(mlp_task.full(), exact_index, None, tmp_path / "l0.npy", top_k=3, device="cpu", progress=False,
             layers=("^0$",))
    model = mlp_task.full().model().eval()
    gtr = per_example_grads(model, mlp_task.full().train_examples())["0"]
    gq = per_example_grads(model, mlp_task.full().query_examples())["0"]
    A = gtr.T @ gtr
    oracle = (torch.linalg.solve(A + EXACT["damping"] * torch.eye(A.shape[0], dtype=A.dtype), gq.T).T @ gtr.T).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "l0.npy"), oracle, rtol=2e-3, atol=2e-3 * np.abs(oracle).max())
    with pytest.raises(ValueError, match="no tracked layer matches"):
        ls.query(mlp_task.full(), exact_index, None, top_k=3, device="cpu", progress=False, layers=("nope",))


def test_memory_budget_sizes_parse_and_bad_ones_are_named():
    from lorif_stream.config import parse_size

    assert parse_size("8GB") == 8_000_000_000
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5g") == 1_500_000_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="'lots'"):
        parse_size("lots")
    bad = cli("build", "--task", f"{TASKS}:full", "--index", "/tmp/never-created-idx", "--memory-budget", "lots",
              check=False)
    assert bad.returncode == 1 and "'lots'" in bad.stderr and "Traceback" not in bad.stderr
