"""Kronecker-whitened projections and the EK-FAC preconditioner against independent oracles.

Oracles: token moments formed explicitly one unpadded example at a time, `eigh` of them, per-example
weight gradients from torch.func, explicit K-FAC influence, dense SVD and dense matrix inverses.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import lorif_stream as ls
from lorif_stream import whitening
from lorif_stream.capture import tracked_layers
from lorif_stream.ekfac import EkfacPreconditioner, rotated_squares
from lorif_stream.projection import ProjectionSpec, reduced_dim
from lorif_stream.store import IndexReader
from tasks.mlp_task import MLPTask
from tasks.seq_task import SeqTask

DATA = Path(__file__).parent / "data"


def stored_array(index, name):
    with IndexReader(index) as reader, reader.snapshot() as snap:
        return np.array(snap.array(name))


def rows_of(index, layer: int):
    with IndexReader(index) as reader, reader.snapshot() as snap:
        Ls, Rs = zip(*[(L.copy(), R.copy()) for _, _, factors in snap.blocks() for L, R in [factors[layer]]])
    return np.concatenate(Ls), np.concatenate(Rs)


def kfac_moments_oracle(model, layer_names, examples, loss_fn):
    """Σ_t x xᵀ, Σ_t δ δᵀ and the token count per layer, one example at a time (no padding exists),
    over the positions that carry gradient (δ ≠ 0)."""
    modules = dict(model.named_modules())
    sums = {n: [0.0, 0.0, 0] for n in layer_names}
    for ex in examples:
        seen = {}
        hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
                 for n in layer_names]
        loss = loss_fn(model, ex)
        for h in hooks:
            h.remove()
        outs = [seen[n][1] for n in layer_names]
        deltas = torch.autograd.grad(loss, outs)
        for n, d in zip(layer_names, deltas):
            x = seen[n][0].detach().reshape(-1, seen[n][0].shape[-1]).double()
            d = d.reshape(-1, d.shape[-1]).double()
            keep = d.abs().amax(1) > 0
            sums[n][0] = sums[n][0] + x[keep].T @ x[keep]
            sums[n][1] = sums[n][1] + d[keep].T @ d[keep]
            sums[n][2] += int(keep.sum())
    return sums


def inverse_sqrt(A, rho):
    e, Q = torch.linalg.eigh(A)
    e = e.clamp_min(0)
    return (Q * (e + rho * e.mean()).rsqrt()) @ Q.T


# ------------------------------------------------------------------------------------ moments


class PaddedLMTask:
    """Variable-length token sequences through the tiny GPT-2, padded per batch, summed CE."""

    tracked_modules = r"^transformer\.h\."

    def __init__(self, n=12):
        from helpers_models import PAD_ID, tiny_gpt2

        self.pad = PAD_ID
        self._model = tiny_gpt2(0)
        g = torch.Generator().manual_seed(3)
        self.train = [torch.randint(3, 97, (int(torch.randint(4, 14, (1,), generator=g)),), generator=g)
                      for _ in range(n)]
        self.queries = self.train[:2]

    def model(self):
        return self._model

    def train_examples(self):
        return self.train

    def query_examples(self):
        return self.queries

    def collate(self, examples):
        T = max(len(e) for e in examples)
        ids = torch.full((len(examples), T), self.pad)
        mask = torch.zeros(len(examples), T, dtype=torch.long)
        for b, e in enumerate(examples):
            ids[b, :len(e)], mask[b, :len(e)] = e, 1
        return ids, mask

    def loss(self, model, batch):
        ids, mask = batch
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         ignore_index=-100, reduction="none")
        return ce.view(targets.shape).sum(1)


def test_token_moments_exclude_padding_and_match_the_explicit_oracle():
    task = PaddedLMTask()
    model = task.model()
    layers = tracked_layers(model, task.tracked_modules, 1)
    capture = whitening.MomentCapture(model, layers, ProjectionSpec(f=1), torch.device("cpu"))
    with capture:
        for b in range(0, len(task.train), 5):  # batches of 5 unequal lengths: padding everywhere
            with torch.enable_grad():
                capture.accumulate(task.loss(model, task.collate(task.train[b:b + 5])))
    oracle = kfac_moments_oracle(model, [l.name for l in layers], task.train,
                                 lambda m, ex: task.loss(m, task.collate([ex])).sum())
    for l in layers:
        A_in, A_out, tokens = oracle[l.name]
        assert capture.tokens[l.name] == tokens and tokens > 0
        # fp32 GEMMs per batch against an fp64 oracle
        torch.testing.assert_close(capture.A_in[l.name], A_in, rtol=1e-5, atol=1e-5 * float(A_in.abs().max()))
        torch.testing.assert_close(capture.A_out[l.name], A_out, rtol=1e-5, atol=1e-5 * float(A_out.abs().max()))


def test_stored_f1_whitening_is_the_inverse_square_root_of_the_moments(tmp_path):
    task = PaddedLMTask()
    ls.whiten(task, tmp_path / "idx", f=1, whiten_examples=1000, whiten_damping=0.1, batch_size=4, progress=False)
    model = task.model()
    names = [l.name for l in tracked_layers(model, task.tracked_modules, 1)]
    oracle = kfac_moments_oracle(model, names, task.train, lambda m, ex: task.loss(m, task.collate([ex])).sum())
    for name in names:
        A_in, A_out, tokens = oracle[name]
        for side, A in (("in", A_in), ("out", A_out)):
            W = inverse_sqrt(A / tokens, 0.1)
            P = torch.from_numpy(stored_array(tmp_path / "idx", whitening.array_name(name, f"P_{side}"))).double()
            assert P.shape == W.shape
            assert torch.allclose(P, W, rtol=1e-4, atol=1e-5 * W.abs().max()), (name, side)
    assert ls.info(tmp_path / "idx")["rows"] == 0  # whiten alone writes no rows; build continues


# ------------------------------------------------------------------------------------ K-FAC influence


def per_example_weight_grads(model, task, examples):
    """{layer name: (N, O, I)} per-example gradients of the per-example loss, by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = task.collate(examples)

    def loss_one(p, xi, yi):
        return task.loss(lambda inp: functional_call(model, p, (inp,)), (xi[None], yi[None]))[0]

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return {name[:-len(".weight")]: t for name, t in g.items() if name.endswith(".weight")}


def test_f1_whitened_dot_product_is_explicit_kfac_influence(tmp_path):
    task = MLPTask()
    ls.build(task, tmp_path / "idx", f=1, rank=1, dtype="fp32", preconditioner="none", whiten_damping=0.1,
             batch_size=7, progress=False)
    ls.query(task, tmp_path / "idx", None, tmp_path / "s.npy", top_k=3, progress=False)
    scores = np.load(tmp_path / "s.npy").astype(np.float64)

    model = task.model().eval()
    train = per_example_weight_grads(model, task, task.train_examples())
    query = per_example_weight_grads(model, task, task.query_examples())
    moments = kfac_moments_oracle(model, list(train), task.train_examples(),
                                  lambda m, ex: task.loss(m, task.collate([ex])).sum())
    expected = 0
    for name, G in train.items():
        A_in, A_out, tokens = moments[name]
        inv = {}
        for side, A in (("in", A_in / tokens), ("out", A_out / tokens)):
            e = torch.linalg.eigvalsh(A).clamp_min(0)
            inv[side] = torch.linalg.inv(A + 0.1 * e.mean() * torch.eye(A.shape[0], dtype=A.dtype))
        # g_qᵀ (A_out+λI)⁻¹ ⊗ (A_in+λI)⁻¹ g_i = tr(∇W_qᵀ (A_out+λ)⁻¹ ∇W_i (A_in+λ)⁻¹)
        Gq, Gi = query[name].double(), G.double()
        expected = expected + torch.einsum("qoi,ok,nkj,ji->qn", Gq, inv["out"], Gi, inv["in"])
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-5 * np.abs(expected.numpy()).max())


# ------------------------------------------------------------------------------------ factors


def test_rank_c_factors_of_whitened_gradients_are_the_svd_truncation(tmp_path):
    task = SeqTask()  # 5 tokens per example: rank-2 factors are lossy, so truncation is tested
    ls.build(task, tmp_path / "idx", f=1, rank=2, dtype="fp32", progress=False)
    model = task.model().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = task.collate(task.train_examples())

    def loss_one(p, xi, yi):
        return task.loss(lambda inp: functional_call(model, p, (inp,)), (xi[None], yi[None]))[0]

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    for layer, name in enumerate(("enc", "head")):
        P_in = torch.from_numpy(stored_array(tmp_path / "idx", whitening.array_name(name, "P_in")))
        P_out = torch.from_numpy(stored_array(tmp_path / "idx", whitening.array_name(name, "P_out")))
        G = P_out.T @ grads[f"{name}.weight"] @ P_in  # (N, d_out, d_in) whitened gradients
        U, S, Vh = torch.linalg.svd(G.double())
        best = (U[:, :, :2] * S[:, None, :2]) @ Vh[:, :2]
        L, R = rows_of(tmp_path / "idx", layer)
        stored = torch.from_numpy(L).double() @ torch.from_numpy(R).double().transpose(1, 2)
        assert torch.allclose(stored, best, rtol=1e-4, atol=1e-5 * best.abs().max()), name


def test_small_sides_are_not_shrunk():
    assert reduced_dim(2, 4, 32) == 2 and reduced_dim(30, 4, 32) == 30 and reduced_dim(32, 4, 32) == 32
    assert reduced_dim(64, 4, 32) == 32 and reduced_dim(768, 4, 32) == 192 and reduced_dim(3072, 8, 32) == 384
    assert reduced_dim(30, 4, 1) == 7  # the paper's rule, kept for format-1 indexes
    model = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))
    dims = [(l.d_in, l.d_out) for l in tracked_layers(model, None, 4, 32)]
    assert dims == [(30, 32), (32, 2)]


# ------------------------------------------------------------------------------------ EK-FAC


def test_auto_preconditioner_is_ekfac_on_sequences_and_the_dot_product_on_one_token_data(tmp_path):
    ls.build(MLPTask(), tmp_path / "one", f=1, progress=False)
    ls.build(SeqTask(), tmp_path / "seq", f=1, progress=False)  # 5 tokens per example
    assert ls.info(tmp_path / "one")["preconditioner"] == "none"
    assert ls.info(tmp_path / "seq")["preconditioner"] == "ekfac"
    assert IndexReader(tmp_path / "seq").settings["curvature"]["preconditioner"] == "ekfac"  # stored, not re-decided
    # an explicit choice is kept
    ls.build(SeqTask(), tmp_path / "dot", f=1, preconditioner="none", progress=False)
    assert ls.info(tmp_path / "dot")["preconditioner"] == "none"



@pytest.mark.parametrize("c", [1, 3])
def test_ekfac_preconditioner_equals_the_dense_eigenvalue_corrected_inverse(c):
    g = torch.Generator().manual_seed(0)
    d_out, d_in, n = 4, 5, 30
    q_out = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))[0]
    q_in = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    L, R = torch.randn(n, d_out, c, generator=g, dtype=torch.float64), torch.randn(n, d_in, c, generator=g, dtype=torch.float64)
    G = L @ R.transpose(1, 2)
    Lam = ((q_out.T @ G @ q_in) ** 2).sum(0)
    torch.testing.assert_close(rotated_squares(L, R, q_out, q_in), Lam)
    lam = 0.1 * float(Lam.mean())
    Q = torch.kron(q_out, q_in)  # vec(q_outᵀ G q_in) = (q_out ⊗ q_in)ᵀ vec(G), row-major vec
    C = Q @ torch.diag(Lam.flatten()) @ Q.T + lam * torch.eye(d_out * d_in, dtype=torch.float64)
    gq = torch.randn(3, d_out, d_in, generator=g, dtype=torch.float64)
    expected = torch.linalg.solve(C, gq.reshape(3, -1).T).T.reshape(3, d_out, d_in)
    got = EkfacPreconditioner(q_out.float(), q_in.float(), Lam.float(), lam).apply(gq.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_ekfac_statistics_after_append_equal_a_full_refit(tmp_path):
    first, second = MLPTask(rows=(0, 30)), MLPTask(rows=(30, 48))
    idx = tmp_path / "idx"
    ls.build(first, idx, f=1, rank=1, dtype="fp32", preconditioner="ekfac", progress=False)
    before = {name: stored_array(idx, whitening.array_name(name, "P_in")) for name in ("0", "2")}
    ls.append(second, idx, progress=False)
    for name, P in before.items():  # the append projects with the stored whitening, unchanged
        assert np.array_equal(P, stored_array(idx, whitening.array_name(name, "P_in")))
    ls.query(first, idx, None, tmp_path / "a.npy", top_k=3, progress=False)
    ls.fit(idx, preconditioner="ekfac", progress=False)  # recomputes Λ from row 0 over all stored rows
    ls.query(first, idx, None, tmp_path / "b.npy", top_k=3, progress=False)
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (5, 48)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def test_appended_rows_are_projected_with_the_stored_whitening(tmp_path):
    first, second = MLPTask(rows=(0, 30)), MLPTask(rows=(30, 48))
    idx = tmp_path / "idx"
    ls.build(first, idx, f=2, min_side=2, rank=1, dtype="fp32", progress=False)
    ls.append(second, idx, progress=False)
    grads = per_example_weight_grads(second.model().eval(), second, second.train_examples())
    for layer, name in enumerate(("0", "2")):
        P_in = torch.from_numpy(stored_array(idx, whitening.array_name(name, "P_in")))
        P_out = torch.from_numpy(stored_array(idx, whitening.array_name(name, "P_out")))
        expected = P_out.T @ grads[name] @ P_in  # one token: rank 1 is exact
        L, R = rows_of(idx, layer)
        got = torch.from_numpy(L[30:]) @ torch.from_numpy(R[30:]).transpose(1, 2)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


# ------------------------------------------------------------------------------------ resume, old indexes


class FailingMLP(MLPTask):
    """Raises once the whitening pre-pass has seen `fail_after` batches (a crash mid pre-pass)."""

    def __init__(self, fail_after=None):
        super().__init__()
        self.fail_after, self.calls = fail_after, 0

    def loss(self, model, batch):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return super().loss(model, batch)


def test_an_interrupted_whitening_pre_pass_resumes_to_the_same_index(tmp_path, monkeypatch):
    monkeypatch.setattr(whitening, "_CHECKPOINT_SECONDS", 0.0)  # checkpoint after every batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        ls.build(FailingMLP(fail_after=3), tmp_path / "a", f=1, batch_size=5, progress=False)
    meta = IndexReader(tmp_path / "a").settings  # the index exists, with a checkpoint and no rows
    assert meta["factors"]["projection_kind"] == "whitened"
    ls.build(FailingMLP(), tmp_path / "a", f=1, batch_size=5, progress=False)
    ls.build(FailingMLP(), tmp_path / "b", f=1, batch_size=5, progress=False)
    for name in ("0", "2"):
        for field in ("P_in", "P_out", "q_in", "q_out"):
            np.testing.assert_allclose(stored_array(tmp_path / "a", whitening.array_name(name, field)),
                                       stored_array(tmp_path / "b", whitening.array_name(name, field)),
                                       rtol=1e-6, atol=1e-7)
    for layer in (0, 1):
        for x, y in zip(rows_of(tmp_path / "a", layer), rows_of(tmp_path / "b", layer)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_format_1_index_opens_and_queries_as_before(tmp_path):
    """tests/data/v1_index was written by lorif-stream at format version 1 (commit 9480078) from
    tests/tasks/mlp_task.py with f=2, rank 1, sketch-rank 8, bf16; v1_scores.npy is what that
    version's query returned. It must still open, say it is unwhitened, and score identically."""
    shutil.copytree(DATA / "v1_index", tmp_path / "v1")
    report = ls.info(tmp_path / "v1")
    assert report["format_version"] == 1 and report["projection"]["kind"] == "random"
    ls.query(MLPTask(), tmp_path / "v1", None, tmp_path / "s.npy", top_k=3, progress=False)
    old = np.load(DATA / "v1_scores.npy")
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), old, rtol=1e-4, atol=1e-5 * np.abs(old).max())


def test_format_2_index_opens_and_queries_as_before(tmp_path):
    """tests/data/v2_index was written by lorif-stream at format version 2 (commit 3e9f0b0) from
    tests/tasks/seq_task.py:retrainable with f=2, rank 2, bf16 and the defaults of then (whitened,
    EK-FAC, no max_side); v2_scores.npy is what that version's query returned and v2_model.pt the
    trained weights (retraining is not bit-identical across CPUs). Its sides are read as uncapped
    and dense, so it opens and scores identically."""
    from tasks.seq_task import retrainable

    shutil.copytree(DATA / "v2_index", tmp_path / "v2")
    report = ls.info(tmp_path / "v2")
    assert report["format_version"] == 2
    task = retrainable()
    task._model.load_state_dict(torch.load(DATA / "v2_model.pt"))
    ls.query(task, tmp_path / "v2", None, tmp_path / "s.npy", top_k=3, progress=False)
    old = np.load(DATA / "v2_scores.npy")
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), old, rtol=1e-4, atol=1e-5 * np.abs(old).max())


@pytest.mark.parametrize("field,preconditioner", [("P_in", "auto"), ("q_out", "ekfac")])  # q: read by EK-FAC
def test_a_damaged_whitening_array_is_named_by_verify_and_refused_by_query(tmp_path, field, preconditioner):
    from lorif_stream.store import CorruptBlockError
    from test_reliability import _chunk_key, flip_everywhere, stored_value

    idx = tmp_path / "idx"
    ls.build(MLPTask(), idx, f=1, rank=1, dtype="fp32", preconditioner=preconditioner, progress=False)
    name = whitening.array_name("0", field)
    value = stored_value(idx, b"sketch", _chunk_key(name, 0))
    flip_everywhere(idx, value, len(value) // 2)
    report = ls.verify(idx, progress=False)
    assert not report.ok and any(f"array '{name}' chunk 0: checksum mismatch" in e for e in report.errors)
    with pytest.raises(CorruptBlockError, match=f"array '{name}' chunk 0"):
        ls.query(MLPTask(), idx, None, tmp_path / "s.npy", top_k=3, progress=False)


def test_bad_whitening_options_are_refused_naming_the_value(tmp_path):
    for options, message in ((dict(projection_kind="pca"), "projection_kind='pca'"), (dict(min_side=0), "min_side=0"),
                             (dict(whiten_examples=0), "whiten_examples=0"), (dict(whiten_damping=0.0), "whiten_damping=0.0"),
                             (dict(projection_kind="random", preconditioner="ekfac"), "ekfac needs whitened projections")):
        with pytest.raises(ValueError, match=message):
            ls.build(MLPTask(), tmp_path / "idx", progress=False, **options)
    assert not (tmp_path / "idx").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="whiten needs projection_kind='whitened'"):
        ls.whiten(MLPTask(), tmp_path / "idx", projection_kind="random", progress=False)


class TwinInputMLP(MLPTask):
    """Two layers read the same input (as an attention block's q/k/v or an MLP's gate/up do)."""

    def model(self):
        torch.manual_seed(3)

        class Twin(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate, self.up, self.down = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 3)

            def forward(self, x):
                return self.down(torch.tanh(self.gate(x)) * self.up(x))

        return Twin()


def test_layers_reading_one_input_share_its_eigendecomposition_bit_for_bit(tmp_path, monkeypatch):
    calls = []
    side_whitening = whitening.side_whitening
    monkeypatch.setattr(whitening, "side_whitening",
                        lambda A, rho, scale: calls.append(A.shape) or side_whitening(A, rho, scale))
    ls.whiten(TwinInputMLP(), tmp_path / "shared", f=1, batch_size=8, progress=False)
    shared_calls = len(calls)
    # the same pre-pass with every side a class of its own: what the index held before the sharing
    monkeypatch.setattr(whitening, "same_moment_sides", lambda sides, moments, tokens: [[s] for s in sides])
    calls.clear()
    ls.whiten(TwinInputMLP(), tmp_path / "alone", f=1, batch_size=8, progress=False)
    assert (shared_calls, len(calls)) == (5, 6)  # gate/up's input moment is decomposed once
    for layer in ("gate", "up", "down"):
        for field in ("P_in", "P_out", "q_in", "q_out"):
            name = whitening.array_name(layer, field)
            assert np.array_equal(stored_array(tmp_path / "shared", name), stored_array(tmp_path / "alone", name)), name
    gate_in = stored_array(tmp_path / "shared", whitening.array_name("gate", "P_in"))
    assert np.array_equal(gate_in, stored_array(tmp_path / "shared", whitening.array_name("up", "P_in")))


def test_only_bitwise_equal_moments_over_equal_token_counts_share_a_class():
    A = torch.randn(4, 4, dtype=torch.float64)
    A = A @ A.T
    nudged = A.clone()
    nudged[1, 2] += 1e-12
    moments = {("a", "in"): A, ("b", "in"): A.clone(), ("c", "in"): nudged, ("d", "in"): A.clone(),
               ("a", "out"): None, ("b", "out"): torch.ones(4, dtype=torch.float64), ("c", "out"): torch.ones(4, dtype=torch.float64)}
    tokens = {"a": 10, "b": 10, "c": 10, "d": 11}
    classes = whitening.same_moment_sides(list(moments), moments, tokens)
    assert classes == [[("a", "in"), ("b", "in")], [("c", "in")], [("d", "in")], [("a", "out")], [("b", "out")],
                       [("c", "out")]]
