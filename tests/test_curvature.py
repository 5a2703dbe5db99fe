"""Damping policies, the Woodbury preconditioner and per-layer curvature fitting."""
import json

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import lorif_stream.curvature as curvature_module
from lorif_stream.curvature import (
    DAMPING_FLOOR,
    DampingPolicy,
    LayerCurvature,
    clamp_rank,
    fit_layer_curvature,
    precondition,
)
from lorif_stream.sketch import GAUSSIAN_GENERATOR, LayerSketch, gaussian_test_matrix

# the CUDA cases are collected everywhere and marked, so that `pytest -m cuda` (gpu_check.sh) runs them
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs a CUDA device")])]


pytestmark = pytest.mark.usefixtures("one_thread")


eigh = torch.linalg.eigh
eigvalsh = torch.linalg.eigvalsh


def random_factors(n, d_out, d_in, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_out, c, generator=g), torch.randn(n, d_in, c, generator=g)


def dense_grads(L, R):
    return torch.bmm(L.double(), R.double().transpose(1, 2)).reshape(L.shape[0], -1)


def blocks_of(L, R, size):
    return [(L[s:s + size], R[s:s + size]) for s in range(0, L.shape[0], size)]


def oracle(A, lam, g):
    """(A + lam I)^-1 g^T in fp64, as rows."""
    D = A.shape[0]
    return torch.linalg.solve(A + lam * torch.eye(D, dtype=torch.float64), g.double().t()).t()


def rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


# ---------------------------------------------------------------------------- rank


def test_clamp_rank():
    assert clamp_rank(256, D=100, N=10_000) == 100
    assert clamp_rank(256, D=10_000, N=40) == 40
    assert clamp_rank(16, D=10_000, N=10_000) == 16
    assert clamp_rank(16, D=10, N=0) == 0
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"r={bad}"):
            clamp_rank(bad, D=10, N=10)
    with pytest.raises(ValueError, match="r=2.5"):
        clamp_rank(2.5, D=10, N=10)


# ---------------------------------------------------------------------------- damping


def test_damping_policy_values():
    s2 = torch.tensor([4.0, 2.0, 0.0])
    assert DampingPolicy().to_dict() == {"name": "eigen-mean", "scale": 0.1}
    assert DampingPolicy().value(s2, trace=50.0, D=10) == pytest.approx(0.2)
    assert DampingPolicy("eigen-mean", 0.5).value(s2, 50.0, 10) == pytest.approx(1.0)
    assert DampingPolicy("trace", 0.1).value(s2, 50.0, 10) == pytest.approx(0.5)
    assert DampingPolicy("explicit", 3.0).value(s2, 50.0, 10) == 3.0
    p = DampingPolicy("trace", 2)
    assert DampingPolicy.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize("scale", [-0.5, 0.0, float("nan"), float("inf")])
def test_damping_policy_rejects_bad_scale_naming_it(scale):
    with pytest.raises(ValueError, match=f"scale={scale}"):
        DampingPolicy("eigen-mean", scale)


def test_damping_policy_rejects_unknown_name():
    with pytest.raises(ValueError, match="'mean'"):
        DampingPolicy("mean", 0.1)


@pytest.mark.parametrize("name", ["eigen-mean", "trace"])
def test_damping_policy_floors_zero_curvature_with_a_warning(name):
    with pytest.warns(RuntimeWarning, match="floor"):
        lam = DampingPolicy(name, 0.1).value(torch.zeros(4), trace=0.0, D=10)
    assert lam == DAMPING_FLOOR > 0
    with pytest.warns(RuntimeWarning, match="floor"):
        assert DampingPolicy(name).value(torch.zeros(0), trace=0.0, D=10) == DAMPING_FLOOR


# ---------------------------------------------------------------------------- LayerCurvature


def test_layer_curvature_validates_itself():
    V = torch.linalg.qr(torch.randn(10, 3))[0]
    s2 = torch.tensor([3.0, 2.0, 1.0])
    c = LayerCurvature(s2, V, 0.5, 12.0)
    assert (c.D, c.rank) == (10, 3)
    assert c.captured_energy == pytest.approx(0.5)
    assert LayerCurvature(torch.zeros(3), V, 1.0, 0.0).captured_energy == 0.0
    with pytest.raises(ValueError, match="damping=0"):
        LayerCurvature(s2, V, 0.0, 12.0)
    with pytest.raises(ValueError, match="damping=-1"):
        LayerCurvature(s2, V, -1.0, 12.0)
    with pytest.raises(ValueError, match="r = len"):
        LayerCurvature(s2[:2], V, 0.5, 12.0)
    with pytest.raises(ValueError, match="non-finite"):
        LayerCurvature(s2, V * float("nan"), 0.5, 12.0)
    with pytest.raises(ValueError, match="sigma2"):
        LayerCurvature(-s2, V, 0.5, 12.0)
    with pytest.raises(ValueError, match="trace=nan"):
        LayerCurvature(s2, V, 0.5, float("nan"))
    state = c.to_state()
    back = LayerCurvature.from_state(state)
    assert torch.equal(back.V, c.V) and back.damping == c.damping and back.trace == c.trace


@pytest.mark.parametrize("device", DEVICES)
def test_layer_curvature_moves_between_devices(device):
    c = LayerCurvature(torch.ones(2), torch.eye(4, 2), 0.1, 2.0).to(device)
    assert c.V.device.type == device and c.sigma2.device.type == device


# ---------------------------------------------------------------------------- Woodbury


def _low_rank_problem(n=6, d_out=8, d_in=6, c=1, seed=0):
    """A = sum of n outer products g g^T: rank(A) = n < D = 48 (whatever c), and its eigenpairs."""
    L, R = random_factors(n, d_out, d_in, c, seed)
    G = dense_grads(L, R)
    A = G.t() @ G
    ev, U = eigh(A)
    rank = n
    return L, R, A, ev.flip(0)[:rank], U.flip(1)[:, :rank]


@pytest.mark.parametrize("device", DEVICES)
def test_woodbury_equals_dense_solve_at_full_rank(device):
    L, R, A, ev, U = _low_rank_problem()
    lam = DampingPolicy().value(ev, float(A.trace()), A.shape[0])
    curv = LayerCurvature(ev.float(), U.float(), lam, float(A.trace())).to(device)
    g = torch.randn(5, 48, generator=torch.Generator().manual_seed(1))
    h = precondition(g.to(device), curv)
    assert h.dtype == torch.float32 and h.shape == (5, 48) and h.device.type == device
    assert rel(h, oracle(A, lam, g)) < 1e-5
    # Queries inside range(A) stress the V-term (they nearly cancel the g/lam term).
    g_in = dense_grads(*random_factors(3, 8, 6, 1, seed=7)) @ (U @ U.t())
    assert rel(precondition(g_in.float().to(device), curv), oracle(A, lam, g_in)) < 1e-5


@pytest.mark.parametrize("policy", [DampingPolicy(), DampingPolicy("trace", 0.01), DampingPolicy("explicit", 0.5)])
def test_woodbury_from_the_sketch_equals_dense_solve_when_rank_is_rank_A(policy):
    L, R, A, ev, U = _low_rank_problem(n=10, c=2, seed=3)     # rank(A) = 10 < D = 48
    sketch = LayerSketch(D=48, k=18, seed=2)
    for Lb, Rb in blocks_of(L, R, 2):
        sketch.update(Lb, Rb)
    curv = fit_layer_curvature(sketch, rank=10, policy=policy)
    assert curv.rank == 10
    assert curv.captured_energy == pytest.approx(1.0, rel=1e-5)
    g = torch.randn(4, 48, generator=torch.Generator().manual_seed(5))
    assert rel(precondition(g, curv), oracle(A, curv.damping, g)) < 1e-5


@settings(max_examples=20, deadline=None)
@example(D=2, r=2, lam=0.001, spread=3.0, seed=0).via("fp32 rounding at cond 2e5")
@example(D=2, r=1, lam=0.001, spread=5.0, seed=2).via("fp64 rounding at cond 3e6")
@given(D=st.integers(2, 40), r=st.integers(1, 8), lam=st.floats(1e-3, 1e3), spread=st.floats(0, 6),
       seed=st.integers(0, 10_000))
def test_woodbury_property(D, r, lam, spread, seed):
    r = min(r, D)
    gen = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(D, r, generator=gen, dtype=torch.float64))[0]
    s2 = (10.0 ** (spread * torch.rand(r, generator=gen, dtype=torch.float64))).sort(descending=True).values
    A = V @ torch.diag(s2) @ V.t()
    curv = LayerCurvature(s2.float(), V.float(), lam, float(s2.sum()))
    g = torch.randn(3, D, generator=gen)
    h = precondition(g, curv)
    # Rounding of V (eps ~1e-7 in fp32, ~1e-16 in fp64) leaks g's span-of-V part into the
    # complement, which is scaled by 1/lam instead of 1/(sigma2 + lam): the error grows linearly in
    # the condition number sigma2/lam (a D = r = 2 case at lam = 1e-3 measured 5.6e-3 in fp32).
    cond = max(1.0, float(s2[0]) / lam)
    assert rel(h, oracle(A, lam, g)) < max(1e-6 * cond, 1e-5)
    # fp64 inputs are preconditioned in fp64.
    curv64 = LayerCurvature(s2, V, lam, float(s2.sum()))
    assert rel(precondition(g.double(), curv64), oracle(A, lam, g)) < max(1e-15 * cond, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_precondition_stays_accurate_when_sigma2_dwarfs_lam(device, monkeypatch):
    # Queries inside the top directions, sigma2 / lam up to 1e6: h = g/lam minus a V-term that
    # cancels all but 1e-6 of it, so fp32 arithmetic (sigma2 / (lam + sigma2) alone rounds by
    # 6e-8) would be ~6e-2 off. V (scaled Hadamard columns) and g are exact in fp32 and V is
    # exactly orthonormal, so only the arithmetic is tested. Chunks of 7 rows exercise V's casts.
    monkeypatch.setattr(curvature_module, "_V_CHUNK", 7)
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < 16:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)])
    V = H[:, :6] / 4
    s2 = torch.tensor([1e3, 3e2, 1e2, 1.0, 1e-2, 0.0], dtype=torch.float64)
    lam = 1e-3
    A = V @ torch.diag(s2) @ V.t()
    coef = torch.tensor([[1.0, 2.0, -3.0], [5.0, 0.0, 1.0], [-2.0, 7.0, 4.0], [0.0, 0.0, 9.0]], dtype=torch.float64)
    g = (coef @ V[:, :3].t()).float()
    curv = LayerCurvature(s2.float(), V.float(), lam, float(s2.sum())).to(device)
    h = precondition(g.to(device), curv)
    assert h.dtype == torch.float32 and h.device.type == device
    assert rel(h, oracle(A, lam, g)) < 1e-6


def test_precondition_checks_the_query_width():
    curv = LayerCurvature(torch.ones(2), torch.eye(4, 2), 0.1, 2.0)
    with pytest.raises(ValueError, match="D=4"):
        precondition(torch.zeros(3, 5), curv)


# ---------------------------------------------------------------------------- fitting


def test_fit_clamps_rank_to_rows_and_stays_finite_when_n_below_d():
    L, R = random_factors(3, 10, 10, 1, seed=1)               # N = 3 < D = 100
    sketch = LayerSketch(D=100, k=24, seed=0).update(L, R)
    curv = fit_layer_curvature(sketch, rank=16)
    assert curv.rank == 3
    G = dense_grads(L, R)
    A = G.t() @ G
    assert torch.allclose(curv.sigma2.double(), eigvalsh(G @ G.t()).flip(0), rtol=1e-4)
    g = torch.randn(2, 100)
    h = precondition(g, curv)
    assert torch.isfinite(h).all()
    assert rel(h, oracle(A, curv.damping, g)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("refine_passes", [0, 2])
def test_fit_on_an_all_zero_layer_is_finite(device, refine_passes):
    L, R = torch.zeros(6, 5, 1), torch.zeros(6, 4, 1)
    sketch = LayerSketch(D=20, k=8, seed=0, device=device).update(L.to(device), R.to(device))
    with pytest.warns(RuntimeWarning, match="floor"):
        curv = fit_layer_curvature(sketch, rank=4, refine_passes=refine_passes,
                                   block_source=lambda: [(L.to(device), R.to(device))])
    assert curv.rank == 4 and torch.all(curv.sigma2 == 0) and torch.isfinite(curv.V).all()
    assert curv.damping == DAMPING_FLOOR and curv.captured_energy == 0.0
    h = precondition(torch.randn(2, 20, device=device), curv)
    assert torch.isfinite(h).all()


def test_fit_with_no_rows_gives_rank_zero():
    sketch = LayerSketch(D=12, k=4, seed=0)
    with pytest.warns(RuntimeWarning):
        curv = fit_layer_curvature(sketch, rank=4, policy=DampingPolicy("trace"))
    assert curv.rank == 0 and curv.V.shape == (12, 0)
    g = torch.randn(3, 12)
    assert torch.allclose(precondition(g, curv), g / curv.damping)
    assert fit_layer_curvature(sketch, 4, DampingPolicy("explicit", 2.0)).damping == 2.0


def test_fit_rejects_bad_settings():
    L, R = random_factors(20, 5, 5, 1)
    sketch = LayerSketch(D=25, k=6, seed=0).update(L, R)
    with pytest.raises(ValueError, match="r=0"):
        fit_layer_curvature(sketch, rank=0)
    with pytest.raises(ValueError, match="r=-2"):
        fit_layer_curvature(sketch, rank=-2)
    with pytest.raises(ValueError, match="k=6"):
        fit_layer_curvature(sketch, rank=8)
    with pytest.raises(ValueError, match="block_source"):
        fit_layer_curvature(sketch, rank=4, refine_passes=1)
    with pytest.raises(ValueError, match="refine_passes=-1"):
        fit_layer_curvature(sketch, rank=4, refine_passes=-1)


# ---------------------------------------------------------------------------- dense sketches (k >= D)


def _raise_if_streamed():
    raise AssertionError("a dense sketch is exact: refinement must not stream the blocks")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", [DampingPolicy(), DampingPolicy("trace", 0.01), DampingPolicy("explicit", 1.0)])
def test_fit_on_a_dense_sketch_is_the_exact_damped_inverse(device, policy):
    L, R = random_factors(90, 6, 7, 2, seed=11)               # N = 90 > D = 42: A full rank
    sketch = LayerSketch(D=42, k=4 * 64, seed=0, device=device)
    for Lb, Rb in blocks_of(L, R, 16):
        sketch.update(Lb.to(device), Rb.to(device))
    assert sketch.dense
    G = dense_grads(L, R)
    A = G.t() @ G
    curv = fit_layer_curvature(sketch, rank=64, policy=policy)
    assert curv.rank == 42 and curv.V.device.type == device
    assert torch.allclose(curv.sigma2.double().cpu(), eigvalsh(A).flip(0), rtol=1e-6)
    assert curv.captured_energy == pytest.approx(1.0, rel=1e-6)
    g = torch.randn(5, 42, generator=torch.Generator().manual_seed(2))
    # What is left is the fp32 rounding of the stored V, which the damped inverse amplifies by
    # up to sigma2_1 / lam along the top directions (measured: ~0.07 eps32 sigma2_1 / lam here).
    tol = max(1e-6, 0.5 * torch.finfo(torch.float32).eps * float(curv.sigma2[0]) / curv.damping)
    assert rel(precondition(g.to(device), curv), oracle(A, curv.damping, g)) < tol
    # Refinement passes would only reproduce the exact decomposition: they are skipped.
    refined = fit_layer_curvature(sketch, rank=64, policy=policy, refine_passes=3, block_source=_raise_if_streamed,
                                  finalize="nystrom")
    assert torch.equal(refined.V, curv.V) and torch.equal(refined.sigma2, curv.sigma2)


def test_fit_on_a_rank_deficient_dense_sketch_is_finite_and_exact():
    L, R = random_factors(5, 8, 6, 1, seed=3)                 # N = 5 < D = 48
    sketch = LayerSketch(D=48, k=48, seed=0).update(L, R)
    curv = fit_layer_curvature(sketch, rank=64, policy=DampingPolicy("trace", 0.1))
    assert curv.rank == 5                                     # clamped to N
    G = dense_grads(L, R)
    assert torch.allclose(curv.sigma2.double(), eigvalsh(G @ G.t()).flip(0), rtol=1e-6)
    g = torch.randn(3, 48, generator=torch.Generator().manual_seed(1))
    h = precondition(g, curv)
    assert torch.isfinite(h).all()
    assert rel(h, oracle(G.t() @ G, curv.damping, g)) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_fit_on_an_all_zero_dense_sketch_is_finite(device):
    sketch = LayerSketch(D=20, k=20, seed=0, device=device).update(torch.zeros(6, 5, 1, device=device),
                                                                    torch.zeros(6, 4, 1, device=device))
    with pytest.warns(RuntimeWarning, match="floor"):
        curv = fit_layer_curvature(sketch, rank=4)
    assert curv.rank == 4 and torch.all(curv.sigma2 == 0) and torch.isfinite(curv.V).all()
    assert torch.isfinite(precondition(torch.randn(2, 20, device=device), curv)).all()


def test_an_old_gaussian_sketch_as_wide_as_the_layer_finalizes_through_nystrom():
    # The state an index written before the identity test matrix holds for a layer with k >= D.
    L, R = random_factors(40, 5, 4, 2, seed=4)
    G = dense_grads(L, R)
    A = G.t() @ G
    om = gaussian_test_matrix(20, 20, seed=6)
    state = {"version": 1, "omega_generator": GAUSSIAN_GENERATOR, "D": 20, "k": 20, "seed": 6,
             "trace": float(torch.trace(A)), "rows": 40, "Y": (A @ om.double()).float().numpy()}
    sketch = LayerSketch.from_state(json.loads(json.dumps({k: v for k, v in state.items() if k != "Y"})) | {"Y": state["Y"]})
    assert not sketch.dense
    curv = fit_layer_curvature(sketch, rank=20, policy=DampingPolicy("trace", 0.1))
    # Nystrom's accuracy (fp32 Y and shift), not the dense path's 1e-6.
    assert torch.allclose(curv.sigma2.double(), eigvalsh(A).flip(0), rtol=1e-3, atol=1e-5 * float(eigvalsh(A)[-1]))
    g = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    assert rel(precondition(g, curv), oracle(A, curv.damping, g)) < 1e-3


@pytest.mark.parametrize("finalize", ["rr", "nystrom"])
def test_fit_with_refinement_recovers_the_top_eigenvalues(finalize):
    # A decaying spectrum the single pass gets only roughly; a few passes nail it.
    gen = torch.Generator().manual_seed(0)
    a = torch.arange(1, 21, dtype=torch.float32) ** -0.7
    L = torch.randn(300, 20, 1, generator=gen) * a[None, :, None]
    R = torch.randn(300, 15, 1, generator=gen) * a[None, :15, None]
    sketch = LayerSketch(D=300, k=24, seed=1)
    for Lb, Rb in blocks_of(L, R, 64):
        sketch.update(Lb, Rb)
    G = dense_grads(L, R)
    ev = eigvalsh(G.t() @ G).flip(0)[:8]
    err = lambda c: float(((c.sigma2.double() - ev) / ev).abs().max())
    single = fit_layer_curvature(sketch, rank=8)
    refined = fit_layer_curvature(sketch, rank=8, refine_passes=4, block_source=lambda: blocks_of(L, R, 64),
                                  finalize=finalize)
    print(f"\nD=300 r=8 k=24: single pass {err(single):.2e}, 4 passes ({finalize}) {err(refined):.2e}")
    assert err(refined) < 1e-3 and err(refined) < err(single)
    assert torch.allclose(refined.V.t() @ refined.V, torch.eye(8), atol=1e-5)
