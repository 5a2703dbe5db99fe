"""Rank-c factorisation against the Eckart-Young optimum computed by torch.linalg.svd."""

from __future__ import annotations

import pytest
import torch

from lorif_stream import factorize as fz
from lorif_stream.factorize import factorize

METHODS = ["power", "svd", "auto"]


def optimal_error(G: torch.Tensor, c: int) -> torch.Tensor:
    """Per-example Frobenius error of the best rank-c approximation (fp64 SVD)."""
    S = torch.linalg.svdvals(G.double())
    return S[:, c:].pow(2).sum(-1).sqrt()


def achieved_error(G, L, R) -> torch.Tensor:
    return torch.linalg.matrix_norm(G.double() - L.double() @ R.double().mT)


def random_matrices(B, d_out, d_in, seed):
    return torch.randn(B, d_out, d_in, generator=torch.Generator().manual_seed(seed))


def low_rank_plus_noise(B, d_out, d_in, rank, seed, noise=1e-2):
    gen = torch.Generator().manual_seed(seed)
    # decaying signal strengths: the hard case for power iteration is a small spectral gap
    scales = torch.logspace(0, -1, rank)
    signal = (torch.randn(B, d_out, rank, generator=gen) * scales) @ torch.randn(B, rank, d_in, generator=gen)
    return signal + noise * torch.randn(B, d_out, d_in, generator=gen)


def gradient_like(B, d_out, d_in, tokens, seed):
    """Sum over tokens of outer products with a 100x decaying scale, like Δ^T X."""
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(B, tokens, d_out, generator=gen) * torch.logspace(0, -2, tokens)[:, None]
    return delta.mT @ torch.randn(B, tokens, d_in, generator=gen)


CASES = {
    "random": lambda: random_matrices(6, 48, 40, seed=1),
    "random_wide": lambda: random_matrices(4, 24, 96, seed=2),
    "lowrank_noise": lambda: low_rank_plus_noise(6, 64, 48, rank=12, seed=3),
    "gradient_like": lambda: gradient_like(6, 96, 64, tokens=40, seed=4),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("c", [1, 4, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_error_within_one_percent_of_optimal(case, c, method):
    G = CASES[case]()
    L, R = factorize(G, c, method)
    B, d_out, d_in = G.shape
    assert L.shape == (B, d_out, c) and R.shape == (B, d_in, c)
    assert L.dtype == R.dtype == torch.float32
    opt = optimal_error(G, c)
    assert (achieved_error(G, L, R) <= 1.01 * opt + 1e-5 * G.norm()).all()


@pytest.mark.parametrize("method", METHODS)
def test_conventions_orthonormal_r_sorted_values_and_signs(method):
    G = low_rank_plus_noise(5, 40, 30, rank=6, seed=5)
    L, R = factorize(G, 4, method)
    torch.testing.assert_close(R.mT @ R, torch.eye(4).expand(5, 4, 4), atol=1e-5, rtol=0)
    sigma = L.norm(dim=1)  # L = U S: its column norms are the singular values
    torch.testing.assert_close(sigma, torch.linalg.svdvals(G)[:, :4], rtol=1e-4, atol=1e-5)
    assert (sigma[:, :-1] >= sigma[:, 1:] - 1e-5).all()
    # sign convention: each R column's largest-magnitude entry is positive
    idx = R.abs().argmax(dim=1, keepdim=True)
    assert (torch.gather(R, 1, idx) > 0).all()
    # hence deterministic and the same whichever method computed it
    L2, R2 = factorize(G, 4, "svd")
    torch.testing.assert_close(L, L2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(R, R2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,c", [((3, 1, 7), 1), ((3, 9, 2), 2), ((3, 4, 6), 4), ((3, 3, 5), 8)])
def test_exact_when_min_dim_at_most_c(shape, c, method):
    G = random_matrices(*shape, seed=6)
    L, R = factorize(G, c, method)
    assert L.shape == (shape[0], shape[1], c) and R.shape == (shape[0], shape[2], c)
    torch.testing.assert_close(L @ R.mT, G, atol=1e-5, rtol=1e-5)
    k = min(shape[1:])
    if c > k:  # padded with zero columns
        assert torch.equal(L[..., k:], torch.zeros_like(L[..., k:]))
        assert torch.equal(R[..., k:], torch.zeros_like(R[..., k:]))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("c", [1, 3])
def test_exact_for_rank_deficient_gradients(method, c):
    # an example with T <= c tokens has a rank-T gradient: rank-c factors lose nothing
    G = gradient_like(4, 30, 20, tokens=c, seed=7)
    L, R = factorize(G, c, method)
    torch.testing.assert_close(L @ R.mT, G, atol=1e-5 * G.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("c", [1, 4])
def test_zero_matrix_gives_finite_zeros(method, c):
    G = torch.zeros(3, 20, 16)
    G[1] = random_matrices(1, 20, 16, seed=8)[0]  # a zero example next to a normal one
    L, R = factorize(G, c, method)
    assert torch.isfinite(L).all() and torch.isfinite(R).all()
    assert torch.equal(L[0], torch.zeros_like(L[0])) and torch.equal(L[2], torch.zeros_like(L[2]))
    assert L[1].abs().max() > 0


def test_cholesky_orthonormalizer_used_on_gpus_is_accurate_too():
    # _cholesky_orthonormalize is what "power" uses on CUDA; check it here on CPU.
    for G in (gradient_like(6, 96, 64, tokens=40, seed=9), torch.zeros(2, 30, 20),
              gradient_like(3, 30, 20, tokens=2, seed=10)):
        for c in (1, 4):
            L, R = fz._power_factors(G, c, fz.power_iterations(c), fz._cholesky_orthonormalize)
            assert torch.isfinite(L).all() and torch.isfinite(R).all()
            assert (achieved_error(G, L, R) <= 1.01 * optimal_error(G, c) + 1e-5 * G.norm() + 1e-12).all()


def test_both_power_forms_reach_the_optimum():
    # the iteration on G (wide smaller sides) and on the Gram of the smaller side (narrow ones),
    # each forced on the same matrices, tall and wide, with both orthonormalizers (CPU and GPU)
    for G in (gradient_like(5, 96, 40, tokens=30, seed=14), gradient_like(5, 40, 96, tokens=30, seed=15),
              low_rank_plus_noise(4, 48, 72, rank=10, seed=16), torch.zeros(2, 30, 20)):
        for c in (1, 3):
            for orth in (fz._householder_orthonormalize, fz._cholesky_orthonormalize):
                on_g = fz._fix_signs(*fz._power_factors(G, c, fz.power_iterations(c), orth))
                [on_gram] = fz._gram_power_factors([G], c, fz.power_iterations(c), orth)
                for L, R in (on_g, on_gram):
                    assert torch.isfinite(L).all() and torch.isfinite(R).all()
                    assert (achieved_error(G, L, R) <= 1.01 * optimal_error(G, c) + 1e-5 * G.norm() + 1e-12).all()


def test_which_power_form_is_taken():
    # narrow smaller sides iterate on their Gram; wide ones on G itself (the Gram would cost big·m²)
    assert fz._gram_is_cheaper(1024, 32, 1) and fz._gram_is_cheaper(48, 32, 1)
    assert fz._gram_is_cheaper(64, 64, 1) and fz._gram_is_cheaper(256, 256, 4)
    assert not fz._gram_is_cheaper(768, 192, 1) and not fz._gram_is_cheaper(800, 800, 4)
    assert not fz._gram_is_cheaper(14336, 4096, 1)


def test_layers_factorized_together_equal_each_alone():
    # layers sharing the Gram iteration's calls (same smaller side, tall and wide; equal shapes
    # stacked into one batch, in both orientations and with other batch sizes), one on G, one by
    # SVD, one empty: each result is the one factorize gives for that layer alone
    Gs = [gradient_like(4, 64, 32, tokens=20, seed=17), gradient_like(4, 32, 48, tokens=20, seed=18),
          gradient_like(4, 256, 32, tokens=20, seed=19), gradient_like(2, 900, 600, tokens=8, seed=20),
          gradient_like(4, 5, 2, tokens=3, seed=21), torch.zeros(0, 8, 8),
          gradient_like(3, 64, 32, tokens=20, seed=22), gradient_like(4, 32, 64, tokens=20, seed=23),
          gradient_like(5, 32, 64, tokens=20, seed=24), gradient_like(4, 32, 48, tokens=20, seed=25)]
    assert fz._gram_is_cheaper(64, 32, 2) and not fz._gram_is_cheaper(900, 600, 2)
    for c in (1, 2):  # c=1 powers the Gram by squaring, c=2 orthonormalizes every step
        together = fz.factorize_layers(Gs, c)
        for G, (L, R) in zip(Gs, together):
            L1, R1 = factorize(G, c)
            assert L.shape == L1.shape and R.shape == R1.shape
            # bit for bit: stacking changes neither the products nor the memory order they read
            assert torch.equal(L, L1) and torch.equal(R, R1)


@pytest.mark.parametrize("method", METHODS)
def test_each_example_independent_of_its_batch(method):
    G = gradient_like(8, 64, 48, tokens=20, seed=11)
    L, R = factorize(G, 2, method)
    other = torch.cat([G[3:4], 100 * random_matrices(5, 64, 48, seed=12)])
    L1, R1 = factorize(G[3:4], 2, method)
    L2, R2 = factorize(other, 2, method)
    for La, Ra in ((L1[0], R1[0]), (L2[0], R2[0])):
        torch.testing.assert_close(La, L[3], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(Ra, R[3], atol=1e-5, rtol=1e-4)


def test_auto_rule_and_input_handling():
    assert fz._choose_method(torch.zeros(1, 768, 768), 1) == "power"
    assert fz._choose_method(torch.zeros(1, 48, 48), 32) == "svd"
    G16 = random_matrices(2, 6, 3, seed=13).to(torch.bfloat16)  # min dim 3 <= c: exact
    L, R = factorize(G16, 3)
    assert L.dtype == torch.float32
    torch.testing.assert_close(L @ R.mT, G16.float(), atol=1e-4, rtol=1e-4)
    L, R = factorize(torch.zeros(0, 5, 4), 2)
    assert L.shape == (0, 5, 2) and R.shape == (0, 4, 2)
    with pytest.raises(ValueError, match="got 0"):
        factorize(G16, 0)
    with pytest.raises(ValueError, match="'qr'"):
        factorize(G16, 1, "qr")
    with pytest.raises(ValueError, match=r"\(5, 4\)"):
        factorize(torch.zeros(5, 4), 1)
    with pytest.raises(ValueError, match="int64"):
        factorize(torch.zeros(1, 5, 4, dtype=torch.long), 1)
