"""Wide layers: capped sides (max_side), CountSketch projections with diagonal whitening for sides
wider than max_dense_side, and the build's estimates and refusals.

Oracles: per-example weight gradients by ``torch.func``, the diagonal token moments summed
explicitly, and the sketch written out as a dense matrix from its (bucket, sign) pairs.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import lorif_stream as ls
from lorif_stream import whitening
from lorif_stream.capture import LayerInfo, tracked_layers
from lorif_stream.estimate import InsufficientMemoryError
from lorif_stream.projection import (
    DenseSide, LayerProjection, ProjectionSpec, SketchSide, count_sketch, make_projections, reduced_dim,
    side_projection,
)
from lorif_stream.store import IndexReader

IN, HIDDEN, OUT, N = 40, 48, 12, 24


class WideMLPTask:
    """One-token classification through a 40-48-12 MLP: rank-1 factors are exact, so stored rows
    can be compared with the oracle's projected gradients directly."""

    tracked_modules = None

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N + 4, IN, generator=g)
        self.y = torch.randint(0, OUT, (N + 4,), generator=g)
        torch.manual_seed(0)
        self._model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).eval()

    def model(self):
        return self._model

    def train_examples(self):
        return list(range(N))

    def query_examples(self):
        return list(range(N, N + 4))

    def collate(self, rows):
        rows = torch.tensor(rows)
        return self.x[rows], self.y[rows]

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="none")


def weight_grads(task):
    model = task.model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = task.collate(task.train_examples())

    def loss_one(p, xi, yi):
        return task.loss(lambda inp: functional_call(model, p, (inp,)), (xi[None], yi[None]))[0]

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return {name[:-len(".weight")]: t for name, t in g.items() if name.endswith(".weight")}


def diagonal_moments(task):
    """{layer: (Σ x², Σ δ², tokens)} over the training set, one example at a time."""
    model = task.model()
    modules = dict(model.named_modules())
    sums = {}
    for row in task.train_examples():
        seen = {}
        hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o))) for n in ("0", "2")]
        loss = task.loss(model, task.collate([row])).sum()
        for h in hooks:
            h.remove()
        deltas = torch.autograd.grad(loss, [seen[n][1] for n in ("0", "2")])
        for n, d in zip(("0", "2"), deltas):
            x = seen[n][0].detach().double()
            a_in, a_out, t = sums.get(n, (0.0, 0.0, 0))
            sums[n] = (a_in + (x * x).sum(0), a_out + (d.double() ** 2).sum(0), t + 1)
    return sums


def sketch_matrix(dim, d, seed, layer, side, weight=None):
    """The CountSketch as a dense (dim, d) matrix, written out from its (bucket, sign) pairs."""
    bucket, sign = count_sketch(dim, d, seed, layer, side)
    M = torch.zeros(dim, d, dtype=torch.float64)
    w = sign.double() if weight is None else sign.double() * weight
    M[torch.arange(dim), bucket] = w
    return M


def stored(index, name):
    with IndexReader(index) as reader, reader.snapshot() as snap:
        a = snap.array(name)
        return None if a is None else np.array(a)


def rows_of(index, layer):
    with IndexReader(index) as reader, reader.snapshot() as snap:
        Ls, Rs = zip(*[(L.astype(np.float64), R.astype(np.float64)) for _, _, factors in snap.blocks()
                       for L, R in [factors[layer]]])
    return np.concatenate(Ls), np.concatenate(Rs)


# ------------------------------------------------------------------------------------ the rules


def test_max_side_caps_projected_sides_but_never_f1():
    assert reduced_dim(151_936, 4, 32, 256) == 256 and reduced_dim(151_936, 4, 32) == 37_984
    assert reduced_dim(768, 4, 32, 256) == 192 and reduced_dim(3072, 4, 32, 256) == 256
    assert reduced_dim(3072, 1, 32, 256) == 3072  # f = 1 asks for exact gradients
    assert reduced_dim(20, 4, 32, 256) == 20  # small sides stay whole
    with pytest.raises(ValueError, match="max_side"):
        reduced_dim(100, 4, 32, 16)
    with pytest.raises(ValueError, match="max_side=8 must be >= min_side=32"):
        ls.BuildConfig(max_side=8)
    model = nn.Sequential(nn.Linear(64, 3000), nn.Linear(3000, 10))
    assert [(l.d_in, l.d_out) for l in tracked_layers(model, None, 4, 32, 256)] == [(32, 256), (256, 10)]


def test_count_sketch_is_seeded_balanced_and_pinned():
    bucket, sign = count_sketch(10, 3, 0, "fc", "out")
    # golden values: a change of generator or algorithm would silently unmatch every index built
    assert bucket.tolist() == [0, 1, 0, 2, 0, 2, 1, 2, 0, 1]
    assert sign.tolist() == [1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]
    b2, s2 = count_sketch(10, 3, 0, "fc", "out")
    assert torch.equal(bucket, b2) and torch.equal(sign, s2)
    assert not torch.equal(count_sketch(1000, 7, 0, "fc", "out")[0], count_sketch(1000, 7, 0, "fc", "in")[0])
    assert not torch.equal(count_sketch(1000, 7, 0, "fc", "out")[0], count_sketch(1000, 7, 1, "fc", "out")[0])
    counts = torch.bincount(count_sketch(151_936, 256, 0, "lm_head", "out")[0], minlength=256)
    assert int(counts.max() - counts.min()) <= 1  # balanced: 593 or 594 coordinates per bucket
    with pytest.raises(ValueError, match="1 <= d <= 10"):
        count_sketch(10, 11, 0, "fc", "out")


def test_sketch_side_applies_its_matrix_and_preserves_inner_products_on_average():
    dim, d = 500, 40
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 7, dim, generator=g), torch.randn(dim, generator=g)
    weight = torch.rand(dim, generator=g) + 0.5
    side = SketchSide(count_sketch(dim, d, 0, "a", "in")[1] * weight, count_sketch(dim, d, 0, "a", "in")[0], d)
    expected = x.double() @ sketch_matrix(dim, d, 0, "a", "in", weight.double())
    torch.testing.assert_close(side.apply(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(side.matrix().double(), sketch_matrix(dim, d, 0, "a", "in", weight.double()))
    unsketched = SketchSide(weight, None, dim)
    torch.testing.assert_close(unsketched.apply(x), x * weight)
    # unbiased: the mean over seeds of <S x, S y> is <x, y> (here within 4 standard errors)
    u = x[0, 0]
    estimates = torch.stack([(u @ sketch_matrix(dim, d, s, "a", "in").float()) @ (y @ sketch_matrix(dim, d, s, "a", "in").float())
                             for s in range(200)])
    assert abs(float(estimates.mean() - u @ y)) < 4 * float(estimates.std()) / 200 ** 0.5
    # the estimate's count of a side's state is what the side holds
    from lorif_stream.estimate import side_state_bytes

    spec = ProjectionSpec(f=4, max_dense_side=256)
    sketched, dense = side_projection(dim, spec, "a", "in"), side_projection(200, spec, "a", "in")
    assert side_state_bytes(dim, sketched.d, spec) == sketched.weight.nbytes + sketched.bucket.nbytes == 12 * dim
    assert side_state_bytes(200, dense.d, spec) == dense.P.nbytes
    with pytest.raises(ValueError, match="d=3"):
        SketchSide(weight, None, 3)


def test_sides_wider_than_max_dense_side_are_sketched_and_format_2_sides_stay_dense():
    layer = tracked_layers(nn.Sequential(nn.Linear(40, 48)), None, 2, 4, 16)[0]
    new = make_projections([layer], ProjectionSpec(f=2, min_side=4, max_side=16, max_dense_side=44))["0"]
    assert isinstance(new.inp, DenseSide) and isinstance(new.out, SketchSide) and (new.d_in, new.d_out) == (16, 16)
    legacy = make_projections([layer], ProjectionSpec(f=2, min_side=4, max_side=16))["0"]
    assert isinstance(legacy.out, DenseSide)


# ------------------------------------------------------------------------------------ builds


@pytest.mark.parametrize("kind", ["whitened", "random"])
def test_sketched_rows_equal_the_explicit_oracle(tmp_path, kind):
    """Every side wider than max_dense_side=44 (the 48-wide ones) is a CountSketch; whitened, its
    weights are the sign times (diag A + ρ·mean diag A)^-1/2 of the token moments' diagonal."""
    task, idx, rho = WideMLPTask(), tmp_path / "idx", 0.1
    ls.build(task, idx, f=2, min_side=4, max_side=16, max_dense_side=44, rank=1, dtype="fp32",
             projection_kind=kind, whiten_damping=rho, whiten_examples=1000, preconditioner="none", progress=False)
    grads, moments = weight_grads(task), diagonal_moments(task)
    layers = {l["name"]: l for l in IndexReader(idx).settings["layers"]}
    for position, (name, sketched) in enumerate((("0", "out"), ("2", "in"))):
        sides = {}
        for side, dim in (("in", layers[name]["in_features"]), ("out", layers[name]["out_features"])):
            d = layers[name][f"d_{side}"]
            if side != sketched:
                P = stored(idx, whitening.array_name(name, f"P_{side}")) if kind == "whitened" else None
                sides[side] = torch.from_numpy(P).double() if P is not None else torch.eye(dim, dtype=torch.float64) \
                    if d == dim else None
                continue
            weight = None
            if kind == "whitened":
                a_in, a_out, tokens = moments[name]
                a = (a_in if side == "in" else a_out) / tokens
                weight = (a + rho * a.mean()).rsqrt()
                np.testing.assert_allclose(stored(idx, whitening.array_name(name, f"w_{side}")), weight.numpy(), rtol=1e-5)
                assert stored(idx, whitening.array_name(name, f"P_{side}")) is None  # no dense matrix stored
            sides[side] = sketch_matrix(dim, d, 0, name, side, weight)
        if sides["in"] is None:  # a random kind's dense side: the seeded matrix itself
            sides["in"] = make_projections([LayerInfo.from_dict(layers[name])],
                                           ProjectionSpec(f=2, min_side=4, max_side=16, max_dense_side=44))[name].inp.matrix().double()
        if sides["out"] is None:
            sides["out"] = make_projections([LayerInfo.from_dict(layers[name])],
                                            ProjectionSpec(f=2, min_side=4, max_side=16, max_dense_side=44))[name].out.matrix().double()
        expected = sides["out"].T @ grads[name].double() @ sides["in"]  # one token: rank 1 is exact
        L, R = rows_of(idx, position)
        got = torch.from_numpy(L) @ torch.from_numpy(R).transpose(1, 2)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_append_and_query_use_the_stored_sketches(tmp_path):
    task, idx = WideMLPTask(), tmp_path / "idx"
    ls.build(task, idx, f=2, min_side=4, max_side=16, max_dense_side=44, rank=1, dtype="fp32", progress=False)
    ls.append(task, idx, allow_duplicate_ids=True, progress=False)  # the same rows again, projected alike
    for layer in (0, 1):
        L, R = rows_of(idx, layer)
        G = L @ R.transpose(0, 2, 1)
        np.testing.assert_allclose(G[N:], G[:N], rtol=1e-5, atol=1e-6 * np.abs(G).max())
    ls.query(task, idx, tmp_path / "r.jsonl", top_k=2, progress=False)
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 4


class WideVocabTask:
    """A 1-block, 32-wide GPT-2 with a 50,257-token vocabulary and random weights; every Linear
    tracked, the LM head included; queries are training examples."""

    tracked_modules = None

    def __init__(self, n=12, T=16, vocab=50_257):
        from transformers import GPT2Config, GPT2LMHeadModel

        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, T), generator=g)
        torch.manual_seed(0)
        config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=vocab, n_positions=T,
                            attn_implementation="eager")
        self._model = GPT2LMHeadModel(config).eval()

    def model(self):
        return self._model

    def train_examples(self):
        return list(range(len(self.ids)))

    def query_examples(self):
        return list(range(4))

    def collate(self, rows):
        return self.ids[torch.tensor(rows)]

    def loss(self, model, batch):
        logits = model(batch).logits[:, :-1]
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        return ce.view(batch.shape[0], -1).sum(1)


def test_a_wide_vocabulary_builds_small_with_defaults_and_attributes_each_example_to_itself(tmp_path, capsys):
    task, idx = WideVocabTask(), tmp_path / "idx"
    ls.build(task, idx, device="cpu")
    announced = capsys.readouterr().err
    head = next(l for l in IndexReader(idx).settings["layers"] if l["name"] == "lm_head")
    assert (head["d_in"], head["d_out"]) == (32, 256)  # 50,257 / 4 capped at max_side
    assert stored(idx, whitening.array_name("lm_head", "w_out")).shape == (50_257,)
    assert stored(idx, whitening.array_name("lm_head", "P_out")) is None
    info = ls.info(idx)
    assert info["disk_bytes"] < 20e6, info["disk_bytes"]
    estimated_mb = float(announced.split("index ~")[1].split(" MB")[0].replace(",", ""))
    assert estimated_mb < 40 and "engine RAM ~" in announced
    ls.query(task, idx, tmp_path / "r.jsonl", top_k=3, progress=False)
    for line in (tmp_path / "r.jsonl").read_text().splitlines():
        result = json.loads(line)
        assert result["proponents"][0]["id"] == result["id"], result


def test_a_build_that_does_not_fit_in_ram_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from lorif_stream import estimate

    ls.build(WideVocabTask(n=4), tmp_path / "small-budget", memory_budget=2_000_000, device="cpu", progress=False)
    assert "more than the memory budget of 2 MB" in capsys.readouterr().err  # said once, not silent
    real = estimate.psutil.virtual_memory()
    monkeypatch.setattr(estimate.psutil, "virtual_memory", lambda: real._replace(available=3_000_000))
    with pytest.raises(InsufficientMemoryError, match=r"engine RAM beside the model but 0\.00 GB are available .*--max-side"):
        ls.build(WideVocabTask(), tmp_path / "idx", device="cpu", progress=False)
    assert not (tmp_path / "idx" / "data.mdb").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sketches_are_bit_identical_on_cuda_and_project_alike():
    layer = tracked_layers(nn.Sequential(nn.Linear(40, 3000)), None, 4, 32, 256)[0]
    spec = ProjectionSpec(f=4, min_side=32, max_side=256, max_dense_side=1024)
    cpu, gpu = make_projections([layer], spec, "cpu")["0"], make_projections([layer], spec, "cuda")["0"]
    assert torch.equal(cpu.out.bucket, gpu.out.bucket.cpu()) and torch.equal(cpu.out.weight, gpu.out.weight.cpu())
    delta = torch.randn(16, 3000)
    torch.testing.assert_close(gpu.project_out(delta.cuda()).cpu(), cpu.project_out(delta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,O,d_out,I,d_in,reversed_", [(16, 96, 48, 16, 4, True),  # d_in < T, d_out: P_outᵀ (Δᵀ XP)
                                                        (4, 24, 8, 16, 8, False)])   # (Δ P_out)ᵀ XP
def test_projected_outer_takes_either_order_to_the_same_sum(T, O, d_out, I, d_in, reversed_):
    g = torch.Generator().manual_seed(3)
    proj = LayerProjection.dense(torch.randn(I, d_in, generator=g), torch.randn(O, d_out, generator=g))
    x, delta = torch.randn(3, T, I, generator=g), torch.randn(3, T, O, generator=g)
    xp = proj.project_in(x)
    want = torch.einsum("bto,oe,bti,if->bef", delta.double(), proj.out.P.double(), x.double(), proj.inp.P.double())
    got = proj.projected_outer(xp, delta)
    assert got.shape == (3, d_out, d_in)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    cheaper_reversed = T * O * d_in + O * d_out * d_in < T * O * d_out + T * d_out * d_in
    assert cheaper_reversed == reversed_  # each case exercises its own order


def test_a_build_that_does_not_fit_the_gpu_is_refused_naming_the_device(tmp_path, monkeypatch):
    """The GPU check runs on the CPU too: the device is only asked for its free memory."""
    from lorif_stream.estimate import BuildEstimate, check_fits

    estimate = BuildEstimate(rows=10, disk=1, disk_peak=1, ram=1 << 20, device=3 << 30, disk_parts={"factors": 0, "state": 0},
                             ram_parts={"batch": 1 << 20})
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (2 << 30, 80 << 30))
    with pytest.raises(InsufficientMemoryError, match=r"needs ~3\.22 GB on cuda:0 beside the model but it has 2\.15 GB free"):
        check_fits(estimate, tmp_path / "idx", ls.BuildConfig(), torch.device("cuda:0"))
    assert asked == [torch.device("cuda:0")]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 << 30, 80 << 30))
    check_fits(estimate, tmp_path / "idx", ls.BuildConfig(), torch.device("cuda:0"))  # fits: no error
