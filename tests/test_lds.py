"""tools/lds.py (the LDS metric and its resumable utility cache) and the LoGRA-dense baseline of
benchmarks/bench_quality.py against LoRIF at full factor rank."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lorif_stream as ls

ROOT = Path(__file__).parents[1]
for sub in ("tools", "benchmarks", "tests/tasks"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))
import lds  # noqa: E402
import seq_task  # noqa: E402


# ------------------------------------------------------------------------------------ Spearman


def test_rankdata_averages_ties():
    np.testing.assert_array_equal(lds.rankdata([10, 20, 20, 5, 20]), [2, 4, 4, 1, 4])
    np.testing.assert_array_equal(lds.rankdata([3.0, 3.0]), [1.5, 1.5])
    with pytest.raises(ValueError, match="NaN"):
        lds.rankdata([1.0, np.nan])


def test_spearman_hand_computed_with_ties():
    # a = [1, 2, 2, 3] -> ranks [1, 2.5, 2.5, 4]; b = [1, 3, 2, 2] -> ranks [1, 4, 2.5, 2.5]
    # centred: a' = [-1.5, 0, 0, 1.5], b' = [-1.5, 1.5, 0, 0] -> rho = 2.25 / sqrt(4.5 * 4.5) = 0.5
    assert lds.spearman([1, 2, 2, 3], [1, 3, 2, 2]) == pytest.approx(0.5)
    assert lds.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert lds.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(lds.spearman([1, 1, 1], [1, 2, 3]))  # a constant side has no rank order


def test_spearman_matches_pearson_of_ranks_on_random_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40), rng.integers(0, 5, 40)
    want = np.corrcoef(lds.rankdata(a), lds.rankdata(b))[0, 1]
    assert lds.spearman(a, b) == pytest.approx(want)


# ------------------------------------------------------------------------------------ subsets


def test_subsets_deterministic_and_sized():
    a = lds.draw_subsets(101, 7, alpha=0.5, seed=3)
    b = lds.draw_subsets(101, 7, alpha=0.5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (7, 50) and a.dtype == np.int64  # round(0.5 * 101) = 50
    for row in a:
        assert len(set(row.tolist())) == 50 and np.all(np.diff(row) > 0) and row.min() >= 0 and row.max() < 101
    assert not np.array_equal(a, lds.draw_subsets(101, 7, alpha=0.5, seed=4))
    # subset m does not depend on how many subsets are drawn (a cache can be extended)
    np.testing.assert_array_equal(lds.draw_subsets(101, 3, seed=3), a[:3])
    assert lds.draw_subsets(10, 2, alpha=0.3).shape == (2, 3)
    with pytest.raises(ValueError, match="alpha"):
        lds.draw_subsets(10, 2, alpha=1.0)


# ------------------------------------------------------------------------------------ LDS


def _linear_world(Q=30, N=60, M=40, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(Q, N))
    subsets = lds.draw_subsets(N, M, seed=seed)
    u = lds.predictions(w, subsets)  # utilities that ARE a linear datamodel of the subsets
    return w, subsets, u


def test_exact_linear_model_gives_lds_one():
    w, subsets, u = _linear_world()
    res = lds.lds(w, subsets, u)
    assert res.mean == pytest.approx(1.0)
    assert res.ci_low == pytest.approx(1.0) and res.ci_high == pytest.approx(1.0)
    # any positive scale and any per-query shift (constant over a fixed-size subset) keep the ranks
    shifted = 3.0 * w + np.random.default_rng(1).normal(size=(w.shape[0], 1))
    assert lds.lds(shifted, subsets, u).mean == pytest.approx(1.0)
    assert lds.lds(-w, subsets, u).mean == pytest.approx(-1.0)


def test_shuffled_scores_give_lds_near_zero():
    w, subsets, u = _linear_world(Q=300, N=80, M=50, seed=2)
    rng = np.random.default_rng(5)
    shuffled = np.stack([rng.permutation(row) for row in w])  # break the query-row correspondence
    res = lds.lds(shuffled, subsets, u)
    assert abs(res.mean) < 0.05
    assert res.ci_low < 0 < res.ci_high or abs(res.mean) < 0.03


def test_constant_utilities_are_excluded_not_nan():
    w, subsets, u = _linear_world(Q=5)
    u[:, 2] = 1.0
    res = lds.lds(w, subsets, u)
    assert np.isnan(res.per_query[2]) and res.n_valid == 4 and res.mean == pytest.approx(1.0)


def test_lds_rejects_mismatched_shapes():
    w, subsets, u = _linear_world()
    with pytest.raises(ValueError, match="utilities"):
        lds.lds(w, subsets, u[:, :-1])


# ------------------------------------------------------------------------------------ utilities cache


class _Killed(BaseException):
    """Stands in for a SIGKILL: not an Exception, so nothing on the way catches it."""


class _DyingTask(seq_task.SeqTask):
    def __init__(self, die_at_call: int):
        self.calls, self.die_at_call = 0, 10 ** 9
        super().__init__()  # trains the attributed model with retrain: not counted
        self.calls, self.die_at_call = 0, die_at_call

    def retrain(self, subset_indices, seed):
        self.calls += 1
        if self.calls == self.die_at_call:
            raise _Killed()
        return super().retrain(subset_indices, seed)


CONFIG = lds.LDSConfig(n_subsets=5, n_seeds=2, seed=1)


def test_resumed_utilities_equal_uninterrupted(tmp_path):
    whole = lds.compute_utilities(seq_task.SeqTask(), tmp_path / "whole", CONFIG, progress=False)
    assert whole.complete and whole.measurement.shape == (5, 2, seq_task.N_QUERY)

    # killed inside subset 2's second seed: subsets 0, 1 were written, subset 2 must be redone
    dying = _DyingTask(die_at_call=2 * 2 + 2)
    with pytest.raises(_Killed):
        lds.compute_utilities(dying, tmp_path / "resumed", CONFIG, progress=False)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("subset_*.npz")) == \
        [f"subset_{m:05d}.npz" for m in range(2)]
    assert not list((tmp_path / "resumed").glob("*.tmp*"))

    # a time-boxed call adds one subset; the next finishes the rest
    part = lds.compute_utilities(seq_task.SeqTask(), tmp_path / "resumed", CONFIG, max_new=1, progress=False)
    assert not part.complete and list(part.subset_ids) == [0, 1, 2]
    again = _DyingTask(die_at_call=10 ** 9)
    resumed = lds.compute_utilities(again, tmp_path / "resumed", CONFIG, progress=False)
    assert again.calls == 2 * 2  # only subsets 3 and 4 were retrained
    assert resumed.complete
    np.testing.assert_array_equal(resumed.subsets, whole.subsets)
    np.testing.assert_array_equal(resumed.measurement, whole.measurement)
    np.testing.assert_array_equal(lds.load_utilities(tmp_path / "resumed").u, whole.u)
    # utilities are -measurement averaged over the seeds
    np.testing.assert_allclose(whole.u, -whole.measurement.mean(axis=1))


def test_cache_refuses_other_settings(tmp_path):
    lds.compute_utilities(seq_task.SeqTask(), tmp_path / "c", lds.LDSConfig(n_subsets=1, n_seeds=1), progress=False)
    with pytest.raises(lds.CacheMismatchError, match="seeds"):
        lds.compute_utilities(seq_task.SeqTask(), tmp_path / "c", lds.LDSConfig(n_subsets=1, n_seeds=2), progress=False)


def test_cli_scores_a_matrix_against_a_cache(tmp_path, capsys):
    util = lds.compute_utilities(seq_task.SeqTask(), tmp_path / "c", lds.LDSConfig(n_subsets=5, n_seeds=1),
                                 progress=False)
    scores = np.random.default_rng(0).normal(size=(seq_task.N_QUERY, seq_task.N_TRAIN)).astype(np.float32)
    np.save(tmp_path / "s.npy", scores)
    assert lds.main(["score", "--cache", str(tmp_path / "c"), "--scores", str(tmp_path / "s.npy"),
                     "--json", str(tmp_path / "r.json")]) == 0
    assert "LDS" in capsys.readouterr().out
    import json

    got = json.loads((tmp_path / "r.json").read_text())[str(tmp_path / "s.npy")]["lds"]
    assert got == pytest.approx(util.score(scores).mean)


# ------------------------------------------------------------------------------------ LoRIF == LoGRA


def test_lorif_at_full_rank_equals_logra_dense(tmp_path):
    import bench_quality as bq

    task = seq_task.SeqTask()
    damping = 0.05
    # c = max over layers of min(d_out, d_in) (enc: min(8, 6) = 6; head: min(3, 8) = 3; zero columns
    # pad the smaller layer); r >= rank(A) = min(D, N): the curvature is exact too.
    f, c = 1, 6
    # the paper's mode (random projections + low-rank curvature) at full rank is LoGRA exactly
    ls.build(task, tmp_path / "idx", f=f, rank=c, sketch_rank=64, dtype="fp32", damping=damping, device="cpu",
             projection_kind="random", progress=False)
    ls.query(task, tmp_path / "idx", None, tmp_path / "s.npy", top_k=3, device="cpu", progress=False)
    lorif = np.load(tmp_path / "s.npy")

    train = bq.projected_gradients(task, task.train_examples(), f, "loss")
    queries = bq.projected_gradients(task, task.query_examples(), f, "measurement")
    logra, lams = bq.dense_scores(train, queries, damping=damping, storage=None)
    assert lams == [damping, damping]
    np.testing.assert_allclose(lorif, logra, rtol=1e-3, atol=1e-3 * np.abs(logra).max())

    # and the factor rank matters on this task: c = 1 is visibly not the same
    ls.build(task, tmp_path / "c1", f=f, rank=1, sketch_rank=64, dtype="fp32", damping=damping, device="cpu",
             projection_kind="random", progress=False)
    ls.query(task, tmp_path / "c1", None, tmp_path / "c1.npy", top_k=3, device="cpu", progress=False)
    assert np.abs(np.load(tmp_path / "c1.npy") - logra).max() > 1e-2 * np.abs(logra).max()


def test_dense_scores_match_a_direct_inverse():
    import bench_quality as bq

    rng = np.random.default_rng(0)
    # one layer with D < N (direct solve) and one with D > N (kernel form)
    train = [torch.tensor(rng.normal(size=(12, 5)), dtype=torch.float32),
             torch.tensor(rng.normal(size=(12, 30)), dtype=torch.float32)]
    queries = [torch.tensor(rng.normal(size=(3, 5)), dtype=torch.float32),
               torch.tensor(rng.normal(size=(3, 30)), dtype=torch.float32)]
    got, lams = bq.dense_scores(train, queries, damping_scale=0.1, storage=None)
    want = 0
    for G, Gq, lam in zip(train, queries, lams):
        G, Gq = G.double(), Gq.double()
        assert lam == pytest.approx(0.1 * float((G * G).sum()) / G.shape[1])
        want = want + Gq @ torch.linalg.inv(G.T @ G + lam * torch.eye(G.shape[1], dtype=G.dtype)) @ G.T
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    dot, _ = bq.dense_scores(train, queries, damping_scale=None, storage=None)
    np.testing.assert_allclose(dot, sum((q.double() @ g.double().T) for g, q in zip(train, queries)).numpy(),
                               rtol=1e-5)
