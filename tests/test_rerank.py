"""The rerank (rerank.py) against independent oracles: explicit per-example weight gradients from
torch.func, token moments formed one example at a time, dense K-FAC / EK-FAC matrices solved
densely, and the f=1 exact whitened index scores."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from torch.func import functional_call, grad

import lorif_stream as ls
from lorif_stream import rerank
from lorif_stream.capture import LayerInfo
from lorif_stream.config import factor_key_of_index
from lorif_stream.gradients import GradientSource
from lorif_stream.projection import ProjectionSpec
from lorif_stream.store import IndexReader
from lorif_stream.task import resolve_task
from tasks.mlp_task import MLPTask
from test_whitening import PaddedLMTask, kfac_moments_oracle


@contextlib.contextmanager
def opened(task, index):
    """(source, snap, settings): the task's model on the index's layers, as a query opens it."""
    with IndexReader(index) as reader, reader.snapshot() as snap:
        settings = reader.settings
        spec = ProjectionSpec.from_factors(factor_key_of_index(settings["factors"]))
        layers = [LayerInfo.from_dict(d) for d in settings["layers"]]
        yield GradientSource.open(resolve_task(task), spec, torch.device("cpu"), layers=layers), snap, settings


def metrics_and_scores(task, index, candidates):
    with opened(task, index) as (source, snap, settings):
        metrics, name = rerank.index_metrics(source, snap, settings, source.task, 5, 1 << 30, snap.rows, False)
        scores = rerank.rerank_scores(source, metrics, task.query_examples(), candidates, 5)
    return metrics, name, scores.double()


def weight_grads(model, loss_of, examples, layers):
    """{layer: (N, O, I) fp64} per-example weight gradients by torch.func, one example at a time
    (no padding, no batch-mates); HF Conv1D's (I, O) weights transposed."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = {name: [] for name in layers}
    for ex in examples:
        g = grad(lambda p: loss_of(lambda *a, **k: functional_call(model, p, a, k), ex))(params)
        for name, kind in layers.items():
            w = g[f"{name}.weight"].double()
            out[name].append(w.T if kind == "conv1d" else w)
    return {name: torch.stack(v) for name, v in out.items()}


def kfac_inverses(model, layers, examples, loss_of, rho=0.1):
    """{layer: ((A_out+λ)⁻¹, (A_in+λ)⁻¹)} from the explicit token moments, λ = ρ·mean(eig)."""
    moments = kfac_moments_oracle(model, list(layers), examples, lambda m, ex: loss_of(m, ex))
    out = {}
    for name, (A_in, A_out, tokens) in moments.items():
        inv = []
        for A in (A_out / tokens, A_in / tokens):
            e = torch.linalg.eigvalsh(A).clamp_min(0)
            inv.append(torch.linalg.inv(A + rho * e.mean() * torch.eye(A.shape[0], dtype=A.dtype)))
        out[name] = tuple(inv)
    return out


def kfac_oracle(Gq, Gi, inverses):
    """Σ_layers tr(∇W_qᵀ (A_out+λ)⁻¹ ∇W_i (A_in+λ)⁻¹)."""
    return sum(torch.einsum("qoi,ok,nkj,ji->qn", Gq[n], inv_out, Gi[n], inv_in)
               for n, (inv_out, inv_in) in inverses.items())


def ekfac_oracle(Gq, Gi, Gs, inverses, rows, scale=0.1):
    """Dense EK-FAC in the whitened space: C = Qk diag(Λ) Qkᵀ + λI, Qk = U_out ⊗ U_in the eigenbases
    of the whitened moments, Λ = (rows/m) Σ_sample (Qkᵀ g̃)², λ = scale·mean(Λ); g̃_qᵀ C⁻¹ g̃_i."""
    total = 0
    for n, (inv_out, inv_in) in inverses.items():
        (e_out, U_out), (e_in, U_in) = torch.linalg.eigh(inv_out), torch.linalg.eigh(inv_in)
        # the symmetric square roots: the whitened moments then keep the moments' eigenbases U
        Ws = torch.kron((U_out * e_out.sqrt()) @ U_out.T, (U_in * e_in.sqrt()) @ U_in.T)
        Qk = torch.kron(U_out, U_in)  # vec(U_outᵀ G U_in) = Qkᵀ vec(G), row-major vec
        Lam = ((Gs[n].reshape(len(Gs[n]), -1) @ Ws @ Qk) ** 2).sum(0) * rows / len(Gs[n])
        C = Qk @ torch.diag(Lam) @ Qk.T + scale * Lam.mean() * torch.eye(Qk.shape[0], dtype=Qk.dtype)
        gq, gi = Gq[n].reshape(len(Gq[n]), -1) @ Ws, Gi[n].reshape(len(Gi[n]), -1) @ Ws
        total = total + gq @ torch.linalg.solve(C, gi.T)
    return total


def assert_scores(got, expected, rtol=1e-4):
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=rtol, atol=rtol * float(expected.abs().max()))


# ------------------------------------------------------------------------------------ the two forms


def test_token_form_equals_dense_gradients():
    g = torch.Generator().manual_seed(0)
    qx, qd = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 4, generator=g)
    cx, cd = torch.randn(6, 9, 7, generator=g), torch.randn(6, 9, 4, generator=g)
    cd[:, 7:] = 0  # padding: zero output gradients add nothing in either form
    dense = rerank.dense_scores(rerank.rotated_gradients(qx, qd), rerank.rotated_gradients(cx, cd))
    torch.testing.assert_close(rerank.token_scores(qx, qd, cx, cd), dense, rtol=1e-5, atol=1e-4)
    explicit = torch.einsum("qoi,boi->qb", torch.einsum("qto,qti->qoi", qd, qx), torch.einsum("bto,bti->boi", cd, cx))
    torch.testing.assert_close(dense, explicit, rtol=1e-5, atol=1e-4)


def test_plan_picks_the_token_form_only_where_cheaper_and_never_for_ekfac():
    wide = LayerInfo("w", "linear", 4096, 4096, 256, 256)
    small = LayerInfo("s", "linear", 64, 64, 32, 32)
    assert rerank.layer_plan(wide, 1, 20, 20, kronecker=True) == rerank.TOKENS
    assert rerank.layer_plan(wide, 1, 20, 20, kronecker=False) == rerank.DENSE
    assert rerank.layer_plan(small, 30, 64, 64, kronecker=True) == rerank.DENSE


# ------------------------------------------------------------------------------------ MLP


def mlp_loss(task):
    return lambda model, ex: task.loss(model, task.collate([ex])).sum()


def test_shrunk_sides_are_recovered_and_rerank_is_explicit_kfac_influence(tmp_path):
    task = MLPTask()
    # f=2, min_side=1: every side is shrunk, so the whitening is recomputed from the sample
    ls.build(task, tmp_path / "idx", f=2, min_side=1, rank=1, preconditioner="none", progress=False)
    cand = task.train_examples()[::3]
    metrics, name, scores = metrics_and_scores(task, tmp_path / "idx", cand)
    assert name == "K-FAC"
    assert all(m.inp.basis is not None and m.out.basis is not None for m in metrics.values())
    model = task.model().eval()
    layers = {"0": "linear", "2": "linear"}
    loss_of = mlp_loss(task)
    Gq = weight_grads(model, loss_of, task.query_examples(), layers)
    Gi = weight_grads(model, loss_of, cand, layers)
    assert_scores(scores, kfac_oracle(Gq, Gi, kfac_inverses(model, layers, task.train_examples(), loss_of)))


def test_ekfac_rerank_is_the_dense_eigenvalue_corrected_inverse(tmp_path):
    task = MLPTask()
    ls.build(task, tmp_path / "idx", f=2, min_side=1, rank=1, preconditioner="ekfac", progress=False)
    cand = task.train_examples()[1::4]
    metrics, name, scores = metrics_and_scores(task, tmp_path / "idx", cand)
    assert name == "EK-FAC" and all(m.inverse is not None for m in metrics.values())
    model = task.model().eval()
    layers = {"0": "linear", "2": "linear"}
    loss_of = mlp_loss(task)
    Gq, Gi = (weight_grads(model, loss_of, ex, layers) for ex in (task.query_examples(), cand))
    Gs = weight_grads(model, loss_of, task.train_examples(), layers)  # the whitening sample: all 48
    inverses = kfac_inverses(model, layers, task.train_examples(), loss_of)
    assert_scores(scores, ekfac_oracle(Gq, Gi, Gs, inverses, rows=48), rtol=2e-4)


def test_random_projection_index_reranks_by_the_plain_gradient_dot_product(tmp_path):
    task = MLPTask()
    ls.build(task, tmp_path / "idx", f=2, min_side=1, projection_kind="random", progress=False)
    cand = task.train_examples()[:10]
    _, name, scores = metrics_and_scores(task, tmp_path / "idx", cand)
    assert name == "gradient dot product"
    model = task.model().eval()
    layers = {"0": "linear", "2": "linear"}
    Gq, Gi = (weight_grads(model, mlp_loss(task), ex, layers) for ex in (task.query_examples(), cand))
    assert_scores(scores, sum(torch.einsum("qoi,noi->qn", Gq[n], Gi[n]) for n in layers))


def test_a_whitening_that_cannot_be_reproduced_is_refused(tmp_path):
    task = MLPTask()
    ls.build(task, tmp_path / "idx", f=2, min_side=1, progress=False)
    other = MLPTask()
    other.train = [(x * 1.5, y) for x, y in other.train]  # same ids and token counts, other moments
    with opened(other, tmp_path / "idx") as (source, snap, settings):
        with pytest.raises(ValueError, match="recomputed whitening of layer '0' .* differs from the index's"):
            rerank.whitening_metrics(source, snap, settings, source.task, 8, 1 << 30, False)


def test_rows_outside_the_tasks_examples_are_refused_by_name(tmp_path):
    ls.build(MLPTask(rows=(0, 30)), tmp_path / "idx", progress=False)
    ls.append(MLPTask(rows=(30, 48)), tmp_path / "idx", progress=False)
    task = resolve_task(MLPTask(rows=(0, 30)))
    with IndexReader(tmp_path / "idx") as reader, reader.snapshot() as snap:
        assert len(rerank.candidate_examples(task, reader.settings, [0, 29], ["ex0", "ex29"])) == 2
        with pytest.raises(ValueError, match=r"row 31 \(id 'ex31'\)"):
            rerank.candidate_examples(task, reader.settings, [3, 31], ["ex3", snap.id_of(31)])


# ------------------------------------------------------------------------------------ tiny GPT-2


def lm_loss(task):
    return lambda model, ex: task.loss(model, task.collate([ex])).sum()


@pytest.mark.parametrize("preconditioner", ["none", "ekfac"])
def test_gpt2_rerank_with_padding_matches_the_explicit_oracle(tmp_path, preconditioner):
    task = PaddedLMTask()
    # f=4: the 96- and 128-wide sides are shrunk to 32 (recomputed whitening); candidates in batches
    # of 5 unequal lengths: padding everywhere; K-FAC takes the token form on some layers here
    ls.build(task, tmp_path / "idx", f=4, rank=1, preconditioner=preconditioner, batch_size=4, progress=False)
    cand = task.train_examples()
    metrics, name, scores = metrics_and_scores(task, tmp_path / "idx", cand)
    model = task.model()
    layers = {n: "conv1d" for n, m in model.named_modules() if type(m).__name__ == "Conv1D" and n.startswith("transformer.h.")}
    loss_of = lm_loss(task)
    Gq, Gi = (weight_grads(model, loss_of, ex, layers) for ex in (task.query_examples(), cand))
    inverses = kfac_inverses(model, layers, task.train_examples(), loss_of)
    if preconditioner == "none":
        expected = kfac_oracle(Gq, Gi, inverses)
    else:
        expected = ekfac_oracle(Gq, Gi, Gi, inverses, rows=len(cand))
    assert_scores(scores, expected, rtol=5e-4)


# ------------------------------------------------------------------------------------ query --rerank


def test_query_rerank_at_f1_full_rank_keeps_the_exact_index_scores_and_order(tmp_path):
    task = MLPTask()
    # f=1, rank 5 >= every min(O, I), fp32, K-FAC: the index's scores are the exact full-dimension ones
    ls.build(task, tmp_path / "idx", f=1, rank=5, dtype="fp32", preconditioner="none", progress=False)
    plain = ls.query(task, tmp_path / "idx", None, top_k=3, progress=False)
    reranked = ls.query(task, tmp_path / "idx", tmp_path / "r.jsonl", top_k=3, rerank=48, progress=False)
    assert reranked.stats["rerank_candidates"] == 48 and reranked.stats["rerank_metric"] == "K-FAC"
    for p, r in zip(plain.results, reranked.results):
        for side in ("proponents", "opponents"):
            assert [e["row"] for e in r[side]] == [e["row"] for e in p[side]]
            for e in r[side]:
                assert e["score"] == pytest.approx(e["index_score"], rel=1e-4, abs=1e-6)
    assert [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()] == reranked.results


def test_cli_rerank_orders_by_the_full_dimension_score_among_the_candidates(tmp_path):
    from click.testing import CliRunner

    from lorif_stream.cli import cli

    tasks = Path(__file__).parent / "tasks" / "mlp_task.py"
    ls.build(MLPTask(), tmp_path / "idx", f=2, min_side=1, rank=1, progress=False)
    out = CliRunner().invoke(cli, ["query", "--task", f"{tasks}:full", "--index", str(tmp_path / "idx"), "--top-k", "3",
                                    "--rerank", "6", "--out", str(tmp_path / "r.jsonl"), "--quiet"])
    assert out.exit_code == 0, out.output
    plain = ls.query(MLPTask(), tmp_path / "idx", None, top_k=6, progress=False).results
    for line, p in zip((tmp_path / "r.jsonl").read_text().splitlines(), plain):
        r = json.loads(line)
        candidates = {e["row"]: e["score"] for e in p["proponents"] + p["opponents"]}
        pro, opp = r["proponents"], r["opponents"]
        assert len(pro) == len(opp) == 3
        assert [e["score"] for e in pro] == sorted((e["score"] for e in pro), reverse=True)
        assert [e["score"] for e in opp] == sorted(e["score"] for e in opp)
        for e in pro + opp:
            assert e["index_score"] == candidates[e["row"]]  # the streaming pass's score, kept
        assert pro[0]["score"] > opp[0]["score"]


def test_report_shows_the_index_score_beside_the_reranked_one():
    from lorif_stream import report

    entry = report._entry({"id": "a", "row": 2, "score": 1.25, "index_score": 0.75})
    assert entry.index_score == 0.75 and report._entry({"id": "a", "row": 2, "score": 1.0}).index_score is None
    html = report._entries_html("proponents", [entry], {}, 1.25, report._score_format([1.25]), 100, "missing")
    assert "+1.250" in html and "index +0.7500" in html
    assert "index" not in report._entries_html("proponents", [report._entry({"id": "a", "row": 2, "score": 1.25})], {},
                                               1.25, report._score_format([1.25]), 100, "missing").split("row 2")[0]
    with pytest.raises(ValueError, match="index_score must be a number"):
        report._entry({"id": "a", "row": 2, "score": 1.0, "index_score": "high"})


def test_two_rank_rerank_of_a_sharded_index_equals_one_process(tmp_path):
    """torchrun, 2 gloo ranks: rank 0 reranks with its own shards (the head's whitening and curvature,
    the results' ids); one process reading every shard gives the same results."""
    from test_distributed import MLP, torchrun_job

    index = tmp_path / "idx"
    args = ["--device", "cpu", "--batch-size", "4", "--quiet"]
    torchrun_job(tmp_path, [
        ["build", "--task", f"{MLP}:full", "--index", str(index), "--f", "2", "--min-side", "1", "--preconditioner",
         "ekfac", "--block-size", "8", *args],
        ["query", "--task", f"{MLP}:full", "--index", str(index), "--top-k", "3", "--rerank", "8",
         "--out", str(tmp_path / "r2.jsonl"), *args]])
    from lorif_stream.store.shards import is_sharded, read_manifest

    assert is_sharded(index) and len(read_manifest(index).shards) == 2
    two = [json.loads(line) for line in (tmp_path / "r2.jsonl").read_text().splitlines()]
    # candidates from both shards: rank 0 reranked rows it does not hold
    assert any(e["row"] >= read_manifest(index).shards[1].start for r in two for e in r["proponents"] + r["opponents"])
    one = ls.query(MLPTask(), index, None, top_k=3, rerank=8, batch_size=4, progress=False)
    assert one.stats["rerank_metric"] == "EK-FAC"
    assert [[e["row"] for e in r["proponents"] + r["opponents"]] for r in two] == \
        [[e["row"] for e in r["proponents"] + r["opponents"]] for r in one.results]
    for a, b in zip(two, one.results):
        for ea, eb in zip(a["proponents"] + a["opponents"], b["proponents"] + b["opponents"]):
            assert ea["score"] == pytest.approx(eb["score"], rel=1e-4, abs=1e-6)
            assert ea["index_score"] == pytest.approx(eb["index_score"], rel=1e-5, abs=1e-7)


def test_rerank_scores_the_layers_the_query_scored(tmp_path):
    task = MLPTask()
    ls.build(task, tmp_path / "idx", f=1, rank=5, dtype="fp32", preconditioner="none", progress=False)
    # --layers 2: the index scores and the rerank both sum over layer "2" only
    r = ls.query(task, tmp_path / "idx", None, top_k=3, rerank=48, layers=("^2$",), progress=False)
    for e in (e for q in r.results for e in q["proponents"] + q["opponents"]):
        assert e["score"] == pytest.approx(e["index_score"], rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------------ the metric's cache


def cached_query(task, index, **options):
    return ls.query(task, index, None, top_k=3, rerank=8, batch_size=4, progress=False, **options)


def test_a_cached_metric_gives_the_uncached_rerank_without_the_sample_passes(tmp_path, monkeypatch):
    task = MLPTask()
    ls.build(task, tmp_path / "idx", f=2, min_side=1, rank=1, preconditioner="ekfac", progress=False)
    first = cached_query(task, tmp_path / "idx")
    assert first.stats["rerank_metric"] == "EK-FAC" and (tmp_path / "idx" / rerank.CACHE_FILE).is_file()

    def no_pass(*args, **kwargs):
        raise AssertionError("the whitening sample was passed through the model again")

    monkeypatch.setattr(rerank, "recomputed_moments", no_pass)
    monkeypatch.setattr(rerank, "ekfac_metrics", no_pass)
    second = cached_query(task, tmp_path / "idx")
    assert second.results == first.results  # the cached fp32 metric is the computed one, bit for bit


def test_a_corrupt_cache_is_announced_and_recomputed(tmp_path, capsys):
    task = MLPTask()
    ls.build(task, tmp_path / "idx", f=2, min_side=1, rank=1, preconditioner="ekfac", progress=False)
    expected = cached_query(task, tmp_path / "idx").results
    file = tmp_path / "idx" / rerank.CACHE_FILE
    with opened(task, tmp_path / "idx") as (source, snap, settings):
        key = rerank.metric_cache_key(source, snap, settings, source.task, 4, snap.rows)
        metrics = rerank.load_cached_metrics(file, key, [l.name for l in source.layers])
    assert metrics is not None
    # the same key and header over other values: only the checksum can tell
    name, m = next(iter(metrics.items()))
    metrics[name] = rerank.LayerMetric(m.inp, m.out, m.inverse * 2)
    arrays, layers = rerank._metric_arrays(metrics)
    import numpy as np_

    with np_.load(file) as z:
        header = z[rerank._HEADER]
    with open(file, "wb") as fh:
        np_.savez(fh, **{rerank._HEADER: header}, **arrays)
    assert cached_query(task, tmp_path / "idx").results == expected
    assert "is unreadable (checksum mismatch): recomputing it" in capsys.readouterr().err
    file.write_bytes(file.read_bytes()[:100])  # truncated
    assert cached_query(task, tmp_path / "idx").results == expected
    assert "rerank-metric.npz is unreadable" in capsys.readouterr().err


def test_a_cache_of_another_sample_is_not_used(tmp_path):
    task = MLPTask()
    ls.build(task, tmp_path / "idx", f=2, min_side=1, progress=False)
    cached_query(task, tmp_path / "idx")
    other = MLPTask()
    other.train = [(x * 1.5, y) for x, y in other.train]  # same ids and token counts, other moments
    # the cached metric would rerank without complaint; recomputed, the whitening check refuses
    with pytest.raises(ValueError, match="recomputed whitening of layer '0' .* differs from the index's"):
        cached_query(other, tmp_path / "idx")


def test_a_cache_of_another_model_is_not_used(tmp_path):
    task = MLPTask()
    ls.build(task, tmp_path / "idx", f=2, min_side=1, rank=1, preconditioner="ekfac", progress=False)
    cached_query(task, tmp_path / "idx")
    with opened(task, tmp_path / "idx") as (source, snap, settings):
        key = rerank.metric_cache_key(source, snap, settings, source.task, 4, snap.rows)
        assert key == rerank.metric_cache_key(source, snap, settings, source.task, 4, snap.rows)
        assert key != rerank.metric_cache_key(source, snap, settings, source.task, 5, snap.rows)
        with torch.no_grad():
            next(source.model.parameters()).view(-1)[-1] += 1e-3  # one weight
        assert key != rerank.metric_cache_key(source, snap, settings, source.task, 4, snap.rows)
        assert rerank.load_cached_metrics(tmp_path / "idx" / rerank.CACHE_FILE,
                                          rerank.metric_cache_key(source, snap, settings, source.task, 4, snap.rows),
                                          [l.name for l in source.layers]) is None


def test_an_unwritable_cache_is_announced_once_and_the_rerank_goes_on(tmp_path, capsys):
    task = MLPTask()
    ls.build(task, tmp_path / "idx", f=2, min_side=1, rank=1, preconditioner="ekfac", progress=False)
    with opened(task, tmp_path / "idx") as (source, snap, settings):
        key = rerank.metric_cache_key(source, snap, settings, source.task, 4, snap.rows)
        metrics, _ = rerank.index_metrics(source, snap, settings, source.task, 4, 1 << 30, snap.rows, False)
    blocked = tmp_path / "a-file" / rerank.CACHE_FILE  # its directory is a file: no write can succeed
    blocked.parent.write_text("")
    assert not rerank.save_cached_metrics(blocked, key, metrics)
    assert not rerank.save_cached_metrics(blocked, key, metrics)
    assert capsys.readouterr().err.count("cannot cache the full-dimension metric") == 1
    assert not list(tmp_path.glob(".*.tmp"))
    good = tmp_path / rerank.CACHE_FILE
    assert rerank.save_cached_metrics(good, key, metrics)
    got = rerank.load_cached_metrics(good, key, list(metrics))
    for name, m in metrics.items():
        for a, b in ((m.inp.basis, got[name].inp.basis), (m.out.scale, got[name].out.scale), (m.inverse, got[name].inverse)):
            assert (a is None and b is None) or torch.equal(a, b)


def test_packed_batches_hold_at_most_a_batch_of_the_longest_and_cover_every_example():
    class Lengths:
        def collate(self, examples):
            T = max(len(e) for e in examples)
            return {"ids": torch.zeros(len(examples), T)}

    lengths = [5, 1, 9, 2, 9, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 7]
    examples = [list(range(n)) for n in lengths]
    batches = rerank.packed_batches(Lengths(), examples, 2)
    assert sorted(j for b in batches for j in b) == list(range(len(examples)))
    for b in batches:
        assert len(b) * max(lengths[j] for j in b) <= 2 * 9 and len(b) <= rerank._PACK_FACTOR * 2
    assert [lengths[j] for b in batches for j in b] == sorted(lengths)  # shortest first, stably
    assert len(batches[0]) == rerank._PACK_FACTOR * 2  # the short ones share larger batches
    same = rerank.packed_batches(Lengths(), [[0, 1]] * 5, 2)
    assert same == [[0, 1], [2, 3], [4]]  # one size: the order and batch size as given


def test_a_metric_over_the_cache_limit_is_not_written_and_says_so(tmp_path, capsys, monkeypatch):
    task = MLPTask()
    ls.build(task, tmp_path / "idx", f=2, min_side=1, rank=1, preconditioner="ekfac", progress=False)
    with opened(task, tmp_path / "idx") as (source, snap, settings):
        key = rerank.metric_cache_key(source, snap, settings, source.task, 4, snap.rows)
        metrics, _ = rerank.index_metrics(source, snap, settings, source.task, 4, 1 << 30, snap.rows, False)
    monkeypatch.setattr(rerank, "CACHE_MAX_BYTES", 64)
    assert not rerank.save_cached_metrics(tmp_path / rerank.CACHE_FILE, key, metrics)
    assert not (tmp_path / rerank.CACHE_FILE).exists()
    assert "not cached" in capsys.readouterr().err
