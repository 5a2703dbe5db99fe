"""Streaming sketch, Nystrom and refinement against dense oracles on small problems."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lorif_stream.sketch import (
    GAUSSIAN_GENERATOR,
    IDENTITY_GENERATOR,
    LayerSketch,
    apply_curvature,
    dense_eig,
    gaussian_test_matrix,
    gram_update,
    nystrom_eig,
    rayleigh_ritz,
    refine,
    sketch_update,
    update_flops,
)

# the CUDA cases are collected everywhere and marked, so that `pytest -m cuda` (gpu_check.sh) runs them
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs a CUDA device")])]


pytestmark = pytest.mark.usefixtures("one_thread")


eigh = torch.linalg.eigh
eigvalsh = torch.linalg.eigvalsh


def random_factors(n, d_out, d_in, c, seed=0, decay=0.0):
    """Factor blocks L (n, d_out, c), R (n, d_in, c); optional power-law decay per coordinate."""
    g = torch.Generator().manual_seed(seed)
    a = torch.arange(1, d_out + 1, dtype=torch.float64) ** -decay
    b = torch.arange(1, d_in + 1, dtype=torch.float64) ** -decay
    L = (torch.randn(n, d_out, c, generator=g, dtype=torch.float64) * a[None, :, None]).float()
    R = (torch.randn(n, d_in, c, generator=g, dtype=torch.float64) * b[None, :, None]).float()
    return L, R


def dense_grads(L, R):
    """(n, D) fp64 flattened gradients g = vec(L R^T), row-major d_out x d_in."""
    return torch.bmm(L.double(), R.double().transpose(1, 2)).reshape(L.shape[0], -1)


def blocks_of(L, R, size):
    return [(L[s:s + size], R[s:s + size]) for s in range(0, L.shape[0], size)]


def rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


# ---------------------------------------------------------------------------- test matrix


def test_gaussian_test_matrix_is_seeded_standard_and_prefix_stable():
    a = gaussian_test_matrix(5000, 3, seed=7)          # spans two generation chunks
    b = gaussian_test_matrix(5000, 3, seed=7)
    assert a.dtype == torch.float32 and a.shape == (5000, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, gaussian_test_matrix(5000, 3, seed=8))
    # Row i depends only on (seed, k, i): a smaller layer gets a prefix.
    assert torch.equal(gaussian_test_matrix(123, 3, seed=7), a[:123])
    assert abs(a.mean().item()) < 0.03 and abs(a.std().item() - 1) < 0.03


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_test_matrix_identical_on_every_device(device):
    om = gaussian_test_matrix(700, 5, seed=3, device=device)
    assert om.device.type == device
    assert torch.equal(om.cpu(), gaussian_test_matrix(700, 5, seed=3))


def test_gaussian_test_matrix_rejects_bad_sizes():
    with pytest.raises(ValueError, match="k=0"):
        gaussian_test_matrix(10, 0, seed=1)
    with pytest.raises(ValueError, match="seed=-1"):
        gaussian_test_matrix(10, 2, seed=-1)


# ---------------------------------------------------------------------------- block update


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["dense", "factored", "auto"])
@pytest.mark.parametrize("c,chunk_rows", [(1, None), (3, 4), (2, 1)])
def test_sketch_update_matches_dense_oracle(device, path, c, chunk_rows):
    L, R = random_factors(23, 6, 9, c, seed=c)
    G = dense_grads(L, R)
    om = gaussian_test_matrix(54, 7, seed=1, device=device)
    Y = torch.zeros(54, 7, device=device)
    tr = sketch_update(Y, L.to(device), R.to(device), om, chunk_rows=chunk_rows, path=path)
    assert isinstance(tr, float)
    assert rel(Y, G.t() @ (G @ om.double().cpu())) < 1e-5
    assert tr == pytest.approx(float((G ** 2).sum()), rel=1e-12)


def test_sketch_update_picks_the_cheaper_path_by_flops():
    f = update_flops(d_out=600, d_in=50, c=1, k=40)
    assert f["factored"] < f["dense"]
    f = update_flops(d_out=100, d_in=100, c=4, k=40)
    assert f["dense"] < f["factored"]


def test_sketch_update_rejects_inconsistent_shapes():
    L, R = random_factors(4, 3, 5, 1)
    om = gaussian_test_matrix(16, 2, 0)
    with pytest.raises(ValueError, match="D=16"):
        sketch_update(torch.zeros(16, 2), L, R, om)
    with pytest.raises(ValueError, match="chunk_rows=0"):
        sketch_update(torch.zeros(15, 2), L, R, gaussian_test_matrix(15, 2, 0), chunk_rows=0)
    with pytest.raises(ValueError, match="path"):
        sketch_update(torch.zeros(15, 2), L, R, gaussian_test_matrix(15, 2, 0), path="magic")


# ---------------------------------------------------------------------------- accumulator


def test_layer_sketch_is_additive_over_disjoint_rows_and_round_trips():
    L, R = random_factors(40, 8, 5, 2, seed=3)
    one_shot = LayerSketch(D=40, k=6, seed=11).update(L, R)
    part_a = LayerSketch(D=40, k=6, seed=11).update(L[:13], R[:13])
    part_b = LayerSketch(D=40, k=6, seed=11)
    for Lb, Rb in blocks_of(L[13:], R[13:], 5):
        part_b.update(Lb, Rb)
    merged = part_a.merge(part_b)
    assert merged.rows == one_shot.rows == 40
    assert merged.trace == pytest.approx(one_shot.trace, rel=1e-12)
    assert torch.allclose(merged.Y, one_shot.Y, rtol=1e-5, atol=1e-5 * one_shot.Y.abs().max().item())
    G = dense_grads(L, R)
    assert rel(one_shot.Y, G.t() @ (G @ one_shot.omega().double())) < 1e-5

    state = one_shot.to_state()
    assert isinstance(state["Y"], np.ndarray) and state["Y"].dtype == np.float32
    scalars = {k: v for k, v in state.items() if k != "Y"}
    back = LayerSketch.from_state(json.loads(json.dumps(scalars)) | {"Y": state["Y"]})
    assert (back.D, back.k, back.seed, back.rows) == (40, 6, 11, 40)
    assert back.trace == one_shot.trace and torch.equal(back.Y, one_shot.Y)
    assert torch.equal(back.omega(), one_shot.omega())


def test_layer_sketch_refuses_to_merge_different_test_matrices():
    a, b = LayerSketch(D=12, k=3, seed=1), LayerSketch(D=12, k=3, seed=2)
    with pytest.raises(ValueError, match="seed"):
        a.merge(b)
    state = a.to_state()
    state["omega_generator"] = "something-else"
    with pytest.raises(ValueError, match="something-else"):
        LayerSketch.from_state(state)


def test_layer_sketch_validates_and_clamps_k_to_D():
    assert LayerSketch(D=5, k=40, seed=0).k == 5
    assert LayerSketch(D=5, k=40, seed=0, generator=GAUSSIAN_GENERATOR).k == 5
    with pytest.raises(ValueError, match="D=0"):
        LayerSketch(D=0, k=4, seed=0)
    with pytest.raises(ValueError, match="k=0"):
        LayerSketch(D=10, k=0, seed=0)
    with pytest.raises(ValueError, match=r"\(7, 2\)"):
        LayerSketch(D=10, k=2, seed=0, Y=torch.zeros(7, 2))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 30), cut=st.integers(0, 30), c=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_sketch_of_a_union_is_the_sum_of_sketches(n, cut, c, seed):
    cut = min(cut, n)
    L, R = random_factors(n, 4, 3, c, seed=seed % 1000)
    whole = LayerSketch(D=12, k=5, seed=seed).update(L, R)
    parts = LayerSketch(D=12, k=5, seed=seed).update(L[:cut], R[:cut]).merge(
        LayerSketch(D=12, k=5, seed=seed).update(L[cut:], R[cut:]))
    scale = max(1.0, whole.Y.abs().max().item())
    assert torch.allclose(parts.Y, whole.Y, atol=1e-5 * scale)
    assert parts.trace == pytest.approx(whole.trace, rel=1e-12, abs=1e-300)


# ---------------------------------------------------------------------------- dense (identity test matrix)


def explicit_gram(L, R):
    G = dense_grads(L, R)
    return G.t() @ G


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c,block,chunk_rows", [(1, 64, None), (3, 5, 2), (2, 7, 1)])
def test_dense_sketch_is_the_explicit_gram(device, c, block, chunk_rows):
    L, R = random_factors(37, 6, 9, c, seed=10 + c, decay=0.5)
    s = LayerSketch(D=54, k=54, seed=3, device=device)
    assert s.dense and s.generator == IDENTITY_GENERATOR
    for Lb, Rb in blocks_of(L, R, block):
        s.update(Lb.to(device), Rb.to(device), chunk_rows=chunk_rows)
    A = explicit_gram(L, R)
    assert s.Y.dtype == torch.float64 and s.Y.shape == (54, 54) and s.Y.device.type == device
    # fp64 accumulation: equal to the fp64 oracle to rounding, not to fp32's ~1e-7.
    assert rel(s.Y, A) < 1e-13
    assert s.trace == pytest.approx(float(torch.trace(A)), rel=1e-12)
    assert s.rows == 37
    # No test matrix is generated for the update, and Y is all the sketch holds.
    assert s._omega is None
    assert s.nbytes == 54 * 54 * 8
    assert torch.equal(s.omega().cpu(), torch.eye(54, dtype=torch.float64))


def test_a_sketch_narrower_than_the_layer_stays_gaussian():
    s = LayerSketch(D=54, k=53, seed=3)
    assert not s.dense and s.generator == GAUSSIAN_GENERATOR
    assert s.Y.dtype == torch.float32 and s.nbytes == 54 * 53 * 4


def test_gram_update_rejects_inconsistent_inputs():
    L, R = random_factors(4, 3, 5, 1)
    with pytest.raises(ValueError, match="D = d_out\\*d_in = 3\\*5 = 15"):
        gram_update(torch.zeros(16, 16, dtype=torch.float64), L, R)
    with pytest.raises(ValueError, match="fp64"):
        gram_update(torch.zeros(15, 15), L, R)
    with pytest.raises(ValueError, match="chunk_rows=0"):
        gram_update(torch.zeros(15, 15, dtype=torch.float64), L, R, chunk_rows=0)
    with pytest.raises(ValueError, match="disagree"):
        gram_update(torch.zeros(15, 15, dtype=torch.float64), L, R[:3])


@pytest.mark.parametrize("device", DEVICES)
def test_dense_eig_equals_eigh_of_the_explicit_matrix(device):
    L, R = random_factors(80, 8, 6, 2, seed=6, decay=1.0)    # D = 48 < N: full rank, decaying spectrum
    s = _sketch(L, R, 48, device=device)
    A = explicit_gram(L, R)
    ev, U = eigh(A)
    ev, U = ev.flip(0), U.flip(1)
    for r in (1, 10, 48):
        sigma2, V = dense_eig(s.Y, r)
        assert sigma2.shape == (r,) and V.shape == (48, r) and sigma2.dtype == V.dtype == torch.float32
        assert sigma2.device.type == device
        assert float(((sigma2.double().cpu() - ev[:r]) / ev[:r]).abs().max()) < 1e-6
        assert torch.allclose(V.t() @ V, torch.eye(r, device=device), atol=1e-6)
        # Same eigenvectors up to sign: gaps >= 1e-5 * ev[0] on this seed (checked below) bound
        # fp64 eigh's vector error near 1e-11, so what is left is V's fp32 rounding.
        signs = torch.sign((V.double().cpu() * U[:, :r]).sum(0))
        assert float((V.double().cpu() * signs - U[:, :r]).abs().max()) < 1e-6
    assert float((ev[:-1] - ev[1:]).min() / ev[0]) > 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_dense_eig_of_a_rank_deficient_or_zero_gram_is_finite(device):
    L, R = random_factors(3, 6, 5, 1, seed=2)                 # N = 3 < D = 30
    s = _sketch(L, R, 30, device=device)
    sigma2, V = dense_eig(s.Y, 30)
    ev = eigvalsh(dense_grads(L, R) @ dense_grads(L, R).t()).flip(0)
    assert torch.isfinite(sigma2).all() and torch.isfinite(V).all() and bool((sigma2 >= 0).all())
    assert torch.allclose(sigma2[:3].double().cpu(), ev, rtol=1e-6)
    assert float(sigma2[3:].max()) <= 1e-12 * float(ev[0])
    assert torch.allclose(V.t() @ V, torch.eye(30, device=device), atol=1e-6)
    zero = LayerSketch(D=30, k=30, seed=0, device=device).update(torch.zeros(4, 6, 1), torch.zeros(4, 5, 1))
    sigma2, V = dense_eig(zero.Y, 8)
    assert torch.all(sigma2 == 0) and torch.isfinite(V).all()
    assert torch.allclose(V.t() @ V, torch.eye(8, device=device), atol=1e-6)


def test_dense_eig_rejects_bad_input():
    with pytest.raises(ValueError, match="rank=31"):
        dense_eig(torch.zeros(30, 30, dtype=torch.float64), 31)
    with pytest.raises(ValueError, match=r"\(30, 4\)"):
        dense_eig(torch.zeros(30, 4), 2)
    bad = torch.zeros(5, 5, dtype=torch.float64)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        dense_eig(bad, 2)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 30), cut=st.integers(0, 30), c=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_dense_sketch_of_a_union_is_the_sum_of_sketches(n, cut, c, seed):
    cut = min(cut, n)
    L, R = random_factors(n, 4, 3, c, seed=seed % 1000)
    whole = LayerSketch(D=12, k=12, seed=seed).update(L, R)
    # The identity does not depend on the seed, so sketches with other seeds still merge.
    parts = LayerSketch(D=12, k=40, seed=1).update(L[:cut], R[:cut]).merge(
        LayerSketch(D=12, k=12, seed=2).update(L[cut:], R[cut:]))
    assert parts.dense and parts.rows == whole.rows == n
    assert rel(parts.Y, whole.Y) < 1e-14
    assert rel(whole.Y, explicit_gram(L, R)) < 1e-13
    assert parts.trace == pytest.approx(whole.trace, rel=1e-12, abs=1e-300)


def test_sketches_with_different_test_matrices_refuse_to_merge():
    dense, gauss = LayerSketch(D=12, k=12, seed=1), LayerSketch(D=12, k=12, seed=1, generator=GAUSSIAN_GENERATOR)
    assert dense.dense and not gauss.dense
    with pytest.raises(ValueError, match="generator='identity-v1' vs 'box-muller"):
        dense.merge(gauss)
    with pytest.raises(ValueError, match="generator='box-muller-fp64-mt19937-v1' vs 'identity-v1'"):
        gauss.merge(dense)
    with pytest.raises(ValueError, match=r"\(D, k, seed\) = \(12, 12, 1\) vs \(13, 13, 1\)"):
        dense.merge(LayerSketch(D=13, k=13, seed=1))
    with pytest.raises(ValueError, match="k=5, D=12"):
        LayerSketch(D=12, k=5, seed=0, generator=IDENTITY_GENERATOR)
    with pytest.raises(ValueError, match="generator='magic'"):
        LayerSketch(D=12, k=12, seed=0, generator="magic")


def test_dense_sketch_state_round_trips_in_fp64():
    L, R = random_factors(25, 4, 5, 2, seed=8)
    s = LayerSketch(D=20, k=80, seed=9).update(L, R)
    state = s.to_state()
    assert state["omega_generator"] == IDENTITY_GENERATOR and (state["D"], state["k"]) == (20, 20)
    assert isinstance(state["Y"], np.ndarray) and state["Y"].dtype == np.float64 and state["Y"].shape == (20, 20)
    scalars = json.loads(json.dumps({k: v for k, v in state.items() if k != "Y"}))
    back = LayerSketch.from_state(scalars | {"Y": state["Y"]})
    assert back.dense and back.Y.dtype == torch.float64
    assert torch.equal(back.Y, s.Y) and (back.trace, back.rows, back.seed) == (s.trace, 25, 9)
    # Further rows keep accumulating exactly.
    L2, R2 = random_factors(7, 4, 5, 2, seed=80)
    back.update(L2, R2)
    assert rel(back.Y, explicit_gram(torch.cat([L, L2]), torch.cat([R, R2]))) < 1e-13


def test_an_old_gaussian_state_as_wide_as_the_layer_still_loads_and_updates():
    # What an index written before the identity test matrix holds for a layer with k >= D:
    # a fp32 Y = A Omega with the D x D Gaussian Omega, tagged with the Gaussian generator.
    L, R = random_factors(30, 5, 4, 1, seed=12)
    A = explicit_gram(L[:20], R[:20])
    om = gaussian_test_matrix(20, 20, seed=4)
    state = {"version": 1, "omega_generator": "box-muller-fp64-mt19937-v1", "D": 20, "k": 20, "seed": 4,
             "trace": float(torch.trace(A)), "rows": 20, "Y": (A @ om.double()).float().numpy()}
    s = LayerSketch.from_state(state)
    assert not s.dense and s.generator == GAUSSIAN_GENERATOR and s.Y.dtype == torch.float32
    s.update(L[20:], R[20:])
    assert rel(s.Y, explicit_gram(L, R) @ om.double()) < 1e-5
    assert s.to_state()["omega_generator"] == GAUSSIAN_GENERATOR


# ---------------------------------------------------------------------------- Nystrom


def _sketch(L, R, k, seed=5, device="cpu", generator=None):
    s = LayerSketch(D=L.shape[1] * R.shape[1], k=k, seed=seed, device=device, generator=generator)
    return s.update(L.to(device), R.to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_nystrom_is_exact_when_rank_is_below_k(device):
    L, R = random_factors(6, 12, 10, 1, seed=2)           # rank(A) = 6 < k = 16 < D = 120
    G = dense_grads(L, R)
    ev, U = eigh(G.t() @ G)
    ev, U = ev.flip(0), U.flip(1)
    s = _sketch(L, R, 16, device=device)
    sigma2, V = nystrom_eig(s.Y, s.omega(), 10)
    assert sigma2.shape == (10,) and V.shape == (120, 10)
    assert torch.all(sigma2[:-1] >= sigma2[1:])
    assert torch.allclose(sigma2[:6].double().cpu(), ev[:6], rtol=1e-4)
    assert float(sigma2[6:].max()) <= 1e-4 * float(ev[0])
    assert torch.allclose(V.t() @ V, torch.eye(10, device=device), atol=1e-5)
    # Same invariant subspace: projector distance.
    P = V[:, :6].double().cpu() @ V[:, :6].double().cpu().t()
    assert float((P - U[:, :6] @ U[:, :6].t()).norm()) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_nystrom_on_a_zero_layer_is_finite(device):
    s = LayerSketch(D=30, k=8, seed=1, device=device).update(torch.zeros(5, 5, 1), torch.zeros(5, 6, 1))
    sigma2, V = nystrom_eig(s.Y, s.omega(), 8)
    assert torch.all(sigma2 == 0) and torch.isfinite(V).all()
    assert torch.allclose(V.t() @ V, torch.eye(8, device=device), atol=1e-5)
    assert s.trace == 0.0


def test_nystrom_rank_deficient_sketch_n_below_d_and_k():
    L, R = random_factors(2, 20, 20, 1, seed=9)           # N = 2 << k = 30 << D = 400
    s = _sketch(L, R, 30)
    sigma2, V = nystrom_eig(s.Y, s.omega(), 30)
    G = dense_grads(L, R)
    ev = eigvalsh(G @ G.t()).flip(0)
    assert torch.isfinite(sigma2).all() and torch.isfinite(V).all()
    assert torch.allclose(sigma2[:2].double(), ev, rtol=1e-4)
    assert float(sigma2[2:].max()) <= 1e-4 * float(ev[0])
    assert torch.allclose(V.t() @ V, torch.eye(30), atol=1e-5)


def test_nystrom_with_a_square_test_matrix_is_exact():
    # A D-wide Gaussian sketch, as indexes made before the identity test matrix still hold.
    L, R = random_factors(40, 5, 4, 2, seed=4, decay=1.0)  # D = 20, k clamped to 20: full rank
    s = _sketch(L, R, 64, generator=GAUSSIAN_GENERATOR)
    assert s.k == 20 and not s.dense
    sigma2, _ = nystrom_eig(s.Y, s.omega(), 20)
    G = dense_grads(L, R)
    ev = eigvalsh(G.t() @ G).flip(0)
    assert torch.allclose(sigma2.double(), ev, rtol=1e-3, atol=1e-5 * float(ev[0]))


def test_nystrom_rejects_rank_above_k():
    s = LayerSketch(D=20, k=4, seed=0)
    with pytest.raises(ValueError, match="rank=5"):
        nystrom_eig(s.Y, s.omega(), 5)


# ---------------------------------------------------------------------------- refinement


def test_apply_curvature_and_rayleigh_ritz_match_dense():
    L, R = random_factors(30, 7, 6, 2, seed=1)
    G = dense_grads(L, R)
    A = G.t() @ G
    Q = torch.linalg.qr(torch.randn(42, 9, generator=torch.Generator().manual_seed(0)))[0]
    Z = apply_curvature(Q, iter(blocks_of(L, R, 7)))
    assert rel(Z, A @ Q.double()) < 1e-5
    # On an exact invariant subspace, Rayleigh-Ritz returns the exact eigenpairs.
    ev, U = eigh(A)
    U5 = U[:, -5:].float().contiguous()
    sigma2, V = rayleigh_ritz(U5, apply_curvature(U5, blocks_of(L, R, 30)))
    assert torch.allclose(sigma2.double(), ev[-5:].flip(0), rtol=1e-4)
    assert torch.allclose(V.t() @ V, torch.eye(5), atol=1e-5)


def test_refine_needs_at_least_one_pass():
    with pytest.raises(ValueError, match="passes=0"):
        refine(torch.eye(6, 3), lambda: [], 0, 2)
    with pytest.raises(ValueError, match="finalize"):
        refine(torch.eye(6, 3), lambda: [], 1, 2, finalize="magic")


# ---------------------------------------------------------------------------- realistic spectrum


@pytest.fixture(scope="module")
def gpt2_factors():
    """Per-example gradients of one layer of a tiny GPT-2, factorized to rank 2 by SVD.

    Layer h.0.attn.c_proj (HF Conv1D, weight stored (in, out)): D = 32 * 32 = 1024, so the
    dense A and its eigh stay cheap. 512 random token sequences of 16 tokens.
    """
    transformers = pytest.importorskip("transformers")
    from torch.func import functional_call, grad, vmap

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32,
                                  attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    name = "transformer.h.0.attn.c_proj.weight"
    params = {k: v.detach() for k, v in model.named_parameters()}
    tokens = torch.randint(0, 97, (512, 16), generator=torch.Generator().manual_seed(1))

    def loss(w, x):
        p = dict(params)
        p[name] = w
        return functional_call(model, p, (x[None],), kwargs={"labels": x[None]}).loss

    per_example = vmap(grad(loss), in_dims=(None, 0))
    W = torch.cat([per_example(params[name], tokens[s:s + 128]) for s in range(0, 512, 128)])
    G = W.transpose(1, 2)                                 # Conv1D (in, out) -> (d_out, d_in)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    c = 2
    L = (U[:, :, :c] * S[:, None, :c]).contiguous()
    R = Vh[:, :c, :].transpose(1, 2).contiguous()
    Gf = dense_grads(L, R)
    A = Gf.t() @ Gf
    ev, EV = eigh(A)
    return L, R, ev.flip(0), EV.flip(1)


def _max_angle_deg(V, U):
    s = torch.linalg.svdvals(U.t() @ V.double())
    return math.degrees(math.acos(min(1.0, float(s.min()))))


def test_realistic_spectrum_sketch_plus_refinement_within_one_percent(gpt2_factors):
    L, R, ev, EV = gpt2_factors
    r, k = 16, 64
    sketch = LayerSketch(D=1024, k=k, seed=3)
    for Lb, Rb in blocks_of(L, R, 100):
        sketch.update(Lb, Rb)
    source = lambda: blocks_of(L, R, 100)

    def err(sigma2):
        return float(((sigma2[:r].double() - ev[:r]) / ev[:r]).abs().max())

    sigma2_0, V0 = nystrom_eig(sketch.Y, sketch.omega(), k)
    results = {"q=0 (single pass)": (err(sigma2_0), _max_angle_deg(V0[:, :r], EV[:, :r]))}
    for q in (1, 2, 3):
        for fin in ("rr", "nystrom"):
            s2, V = refine(V0, source, q, r, finalize=fin)
            results[f"q={q} {fin}"] = (err(s2), _max_angle_deg(V, EV[:, :r]))
    print(f"\ntiny GPT-2 h.0.attn.c_proj, D=1024, N=512, c=2, r={r}, k={k}; "
          f"lambda_r/lambda_1={float(ev[r - 1] / ev[0]):.3f}, lambda_k/lambda_1={float(ev[k - 1] / ev[0]):.3f}")
    for key, (e, a) in results.items():
        print(f"  {key:20s} max rel eigenvalue error {e:.2e}   largest principal angle {a:6.2f} deg")
    # The single pass is far off on this flat spectrum: bound it loosely so a regression shows.
    assert results["q=0 (single pass)"][0] < 0.6
    assert results["q=3 rr"][0] < 0.01 and results["q=3 nystrom"][0] < 0.01
    assert results["q=2 nystrom"][0] < 0.02 and results["q=2 rr"][0] < 0.05
    assert results["q=3 rr"][0] < results["q=1 rr"][0] < results["q=0 (single pass)"][0]


def test_nystrom_falls_back_when_cholesky_fails():
    # No shift on a rank-3 sketch: Omega^T A Omega is singular, Cholesky fails at every retry
    # and the eigh pseudo-inverse takes over.
    L, R = random_factors(3, 20, 20, 1, seed=9)
    s = _sketch(L, R, 30)
    sigma2, V = nystrom_eig(s.Y, s.omega(), 30, shift_eps=0.0)
    ev = eigvalsh(dense_grads(L, R) @ dense_grads(L, R).t()).flip(0)
    assert torch.isfinite(sigma2).all() and torch.isfinite(V).all()
    assert torch.allclose(sigma2[:3].double(), ev, rtol=1e-4)
    assert float(sigma2[3:].max()) <= 1e-5 * float(ev[0])
    assert torch.allclose(V.t() @ V, torch.eye(30), atol=1e-5)


def test_small_lapack_runs_serially_and_restores_the_thread_count():
    L, R = random_factors(20, 6, 5, 1)
    s = _sketch(L, R, 8)
    torch.set_num_threads(2)
    try:
        nystrom_eig(s.Y, s.omega(), 4)
        rayleigh_ritz(s.omega(), s.Y)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_layers_wider_than_the_dense_limit_keep_a_gaussian_sketch_at_full_width():
    from lorif_stream.sketch import DENSE_MAX_D, GAUSSIAN_GENERATOR

    assert LayerSketch(D=DENSE_MAX_D, k=DENSE_MAX_D, seed=0).dense
    wide = LayerSketch(D=DENSE_MAX_D + 1, k=4 * DENSE_MAX_D, seed=0)
    assert not wide.dense and wide.generator == GAUSSIAN_GENERATOR and wide.k == DENSE_MAX_D + 1
