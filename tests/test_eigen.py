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
