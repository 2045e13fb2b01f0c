import numpy as np
import pytest
import torch

from topotransfer import dense_top_eigenpairs, lanczos_top_eigenpairs, select_direction
from topotransfer.derivative.statistics import MatrixFreeStatistic
from topotransfer.eigen import fix_signs


def _indefinite_blocks(R, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(R, D, D, generator=g, dtype=torch.float64)
    return A + A.transpose(1, 2)


def test_dense_matches_numpy_eigh():
    Q = _indefinite_blocks(5, 7)
    res = dense_top_eigenpairs(Q, num=10)
    ref = np.sort(np.concatenate([np.linalg.eigvalsh(q) for q in Q.numpy()]))[::-1][:10]
    np.testing.assert_allclose(res.values.numpy(), ref, rtol=1e-12)
    for lam, r, v in zip(res.values, res.rows, res.vectors):
        assert torch.allclose(Q[r] @ v, lam * v, atol=1e-10)
        assert abs(v.norm().item() - 1) < 1e-12


def test_block_solve_equals_full_matrix_solve():
    # Q is block-diagonal; solving blocks must equal solving the assembled (R*D x R*D) matrix.
    Q = _indefinite_blocks(4, 5, seed=1)
    full = torch.block_diag(*Q)
    ref = torch.linalg.eigvalsh(full).flip(0)[:6]
    assert torch.allclose(dense_top_eigenpairs(Q, 6).values, ref, atol=1e-10)


@pytest.mark.parametrize("R,D,steps", [(6, 9, 9), (8, 40, 30), (3, 120, 48)])
def test_lanczos_agrees_with_dense(R, D, steps):
    Q = _indefinite_blocks(R, D, seed=2)
    dense = dense_top_eigenpairs(Q, 5)
    mf = lanczos_top_eigenpairs(lambda v: torch.bmm(Q, v), R, D, num=5, steps=steps, tol=1e-10)
    assert mf.converged
    assert torch.allclose(mf.values, dense.values, rtol=1e-8)
    assert torch.equal(mf.rows, dense.rows)
    # same eigenvector up to the deterministic sign (non-degenerate spectrum here)
    assert torch.allclose(mf.vectors, dense.vectors, atol=1e-6)


def test_lanczos_on_low_rank_blocks_has_no_spurious_values():
    # Blocks of rank 2 (plus zero rows) force Lanczos breakdowns; eigenvalues must still be exact.
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(2, 12, generator=g, dtype=torch.float64)
    Q = torch.stack([-(Z.T @ Z), Z.T @ torch.diag(torch.tensor([1.0, -2.0], dtype=torch.float64)) @ Z])
    dense = dense_top_eigenpairs(Q, 4)
    mf = lanczos_top_eigenpairs(lambda v: torch.bmm(Q, v), 2, 12, num=4, steps=12, tol=1e-10)
    assert torch.allclose(mf.values, dense.values, atol=1e-9)


def test_matrix_free_statistic_matches_dense_blocks():
    g = torch.Generator().manual_seed(4)
    z, p = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(50, 6, generator=g, dtype=torch.float64)
    st = MatrixFreeStatistic(6, 6, bias=True, cache_dtype=torch.float64)
    st.update(z[:20], p[:20])
    st.update(z[20:], p[20:])
    zh = torch.cat([z, torch.ones(50, 1, dtype=torch.float64)], 1)
    ref = torch.einsum("nr,ni,nj->rij", p, zh, zh)
    assert torch.allclose(st.dense(), ref, atol=1e-10)


def test_signs_are_deterministic():
    v = torch.tensor([[0.1, -0.9, 0.3], [0.5, 0.5, -0.2]], dtype=torch.float64)
    out = fix_signs(v)
    assert torch.equal(out[0], -v[0]) and torch.equal(out[1], v[1])
    assert torch.equal(fix_signs(-v), out)


def test_direction_rules():
    Q = torch.zeros(3, 2, 2, dtype=torch.float64)
    Q[0] = torch.diag(torch.tensor([10.0, 6.0], dtype=torch.float64))
    Q[1] = torch.diag(torch.tensor([4.0, -1.0], dtype=torch.float64))
    Q[2] = torch.diag(torch.tensor([9.0, 1.0], dtype=torch.float64))
    res = dense_top_eigenpairs(Q, 6)
    theta, k, quad = select_direction(res, 3, "top1")
    assert k == 1 and quad == 10.0 and abs(theta.norm().item() - 1) < 1e-12
    theta, k, quad = select_direction(res, 3, "cluster", c=0.5)  # lambda >= 5: 10, 9, 6
    assert k == 3 and quad == 25.0
    assert torch.allclose(theta, torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    assert select_direction(res, 3, "topk", k=4)[1:] == (4, 29.0)
    with pytest.raises(ValueError, match="rule"):
        select_direction(res, 3, "best")
    with pytest.raises(ValueError, match="k >= 1"):
        select_direction(res, 3, "topk")
    # lambda_1 <= 0: no insertion lowers the loss; the rule falls back to the single top direction.
    neg = dense_top_eigenpairs(-Q.abs(), 6)
    assert select_direction(neg, 3, "cluster")[1] == 1


def _mixed_sign_statistic(N=300, d=12, R=20, seed=6, chunks=(100, 200)):
    """A statistic with adjoints of both signs and very different scales per block (float64)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, d, generator=g, dtype=torch.float64)
    p = (torch.randn(N, R, generator=g, dtype=torch.float64) + torch.linspace(-1.0, 0.5, R, dtype=torch.float64))
    p = p * torch.logspace(-2, 1, R, dtype=torch.float64)
    st = MatrixFreeStatistic(R, d, bias=True, cache_dtype=torch.float64)
    start = 0
    for stop in (*chunks, N):
        st.update(z[start:stop], p[start:stop])
        start = stop
    return st


def test_upper_bounds_bound_every_block_and_are_tight_for_rank_one():
    st = _mixed_sign_statistic()
    exact = np.array([np.linalg.eigvalsh(q)[-1] for q in st.dense().numpy()])  # numpy eigh, float64
    ub = st.upper_bounds()
    assert ub.shape == (st.R,) and ub.dtype == torch.float64
    assert np.all(ub.numpy() >= exact - 1e-10 * np.abs(exact).max())
    # the trace of the positive part, recomputed by hand, including the bias entry zh = [z, 1]
    zh, p = st._rows()
    assert torch.allclose(ub, (p.clamp_min(0) * (zh**2).sum(1, keepdim=True)).sum(0), rtol=1e-12)
    # a single sample with p > 0: Q_r = p zh zh^T is rank one and the bound is its eigenvalue, exactly
    one = MatrixFreeStatistic(3, 4, bias=False, cache_dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    one.update(torch.randn(1, 4, generator=g, dtype=torch.float64), torch.tensor([[2.0, 0.5, 3.0]], dtype=torch.float64))
    lam = np.array([np.linalg.eigvalsh(q)[-1] for q in one.dense().numpy()])
    np.testing.assert_allclose(one.upper_bounds().numpy(), lam, rtol=1e-12)
    # an all-negative block has bound 0 and lambda_max <= 0
    neg = MatrixFreeStatistic(2, 3, bias=True, cache_dtype=torch.float64)
    neg.update(torch.randn(6, 3, generator=g, dtype=torch.float64), -torch.rand(6, 2, generator=g, dtype=torch.float64))
    assert torch.equal(neg.upper_bounds(), torch.zeros(2, dtype=torch.float64))


def test_upper_bounds_do_not_depend_on_batch_split():
    a = _mixed_sign_statistic(chunks=(100, 200))
    b = _mixed_sign_statistic(chunks=(7, 150, 299))
    assert torch.allclose(a.upper_bounds(), b.upper_bounds(), rtol=1e-13)


@pytest.mark.parametrize("num", [1, 4, 12])
def test_bound_pruning_never_drops_a_top_block(num):
    # Blocks of very different scales: the proven bounds drop most of them at the first test. The result
    # must equal numpy eigh on every block (values and rows), and the blocks holding the top pairs survive.
    st = _mixed_sign_statistic(N=400, d=15, R=40, seed=8)
    Q = st.dense().numpy()
    ref = sorted(((lam, r) for r in range(st.R) for lam in np.linalg.eigvalsh(Q[r])), reverse=True)[:num]
    ub = st.upper_bounds()
    seen = []

    def matvec(v, rows=None):
        seen.append(st.R if rows is None else rows.numel())
        return st.matvec(v, rows=rows)

    # prune_after beyond every test: only the proven bounds prune.
    mf = lanczos_top_eigenpairs(matvec, st.R, st.D, num=num, tol=1e-9, upper_bounds=ub, prune_after=10**9)
    assert mf.converged
    np.testing.assert_allclose(mf.values.numpy(), [lam for lam, _ in ref], rtol=1e-9)
    assert mf.rows.tolist() == [r for _, r in ref]
    assert min(seen) < st.R  # the bounds did prune
    # a block is only ever dropped when its bound is below the num-th eigenvalue
    dropped_ok = ub.numpy() < ref[-1][0]
    assert int(dropped_ok.sum()) >= st.R - min(seen)


def test_invalid_bounds_are_refused():
    st = _mixed_sign_statistic()
    with pytest.raises(ValueError, match="upper_bounds"):
        lanczos_top_eigenpairs(st.matvec, st.R, st.D, num=2, upper_bounds=torch.ones(3))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_default_pruning_keeps_the_top_blocks_on_random_statistics(seed):
    # Heuristic (Zhou-Li + margin) and proven-bound pruning together, as solve_site runs them, vs numpy eigh.
    st = _mixed_sign_statistic(N=500, d=20, R=32, seed=10 + seed)
    Q = st.dense().numpy()
    ref = sorted(((lam, r) for r in range(st.R) for lam in np.linalg.eigvalsh(Q[r])), reverse=True)[:6]
    mf = lanczos_top_eigenpairs(st.matvec, st.R, st.D, num=6, tol=1e-9, upper_bounds=st.upper_bounds())
    assert mf.converged
    np.testing.assert_allclose(mf.values.numpy(), [lam for lam, _ in ref], rtol=1e-9)
    assert mf.rows.tolist() == [r for _, r in ref]
