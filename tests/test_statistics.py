"""Statistics are sums: other batch splits give the same Q; duplicated data gives twice Q."""

import pytest
import torch
from torch import nn

from topotransfer import ResidualCNN, ResidualMLP, compute_site_statistics, topological_derivative


def _batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


@pytest.mark.parametrize("solver", ["dense", "matrix_free"])
@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_invariant_to_batch_split_and_doubled_by_duplication(float64, solver, family):
    torch.manual_seed(0)
    if family == "mlp":
        model, x = ResidualMLP(3, 5, 2, 3), torch.randn(24, 3)
    else:
        model, x = ResidualCNN(1, 2, 1, 3), torch.randn(24, 1, 4, 4)
    y = torch.randint(0, 3, (24,))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    def blocks(data):
        _, stats, _, J = compute_site_statistics(model, data, loss_fn, solver=solver)
        dense = {k: (st.Q if solver == "dense" else st.dense()) for k, st in stats.items()}
        return dense, {k: st.count for k, st in stats.items()}, J

    ref, count, J = blocks(_batches(x, y, 24))
    for size in (1, 5, 7):
        other, other_count, other_J = blocks(_batches(x, y, size))
        assert other_count == count and other_J == pytest.approx(J, rel=1e-12)
        for k in ref:
            assert torch.allclose(other[k], ref[k], rtol=1e-10, atol=1e-12)
    dup, dup_count, dup_J = blocks(_batches(torch.cat([x, x]), torch.cat([y, y]), 10))
    for k in ref:
        assert dup_count[k] == 2 * count[k]
        assert torch.allclose(dup[k], 2 * ref[k], rtol=1e-10, atol=1e-12)
    assert dup_J == pytest.approx(2 * J, rel=1e-12)


def test_scores_double_with_duplicated_data(float64):
    torch.manual_seed(1)
    model, x, y = ResidualMLP(2, 4, 1, 1), torch.randn(16, 2), torch.randn(16, 1)
    loss_fn = nn.MSELoss(reduction="sum")
    a = topological_derivative(model, [(x, y)], loss_fn)
    b = topological_derivative(model, [(x, y), (x, y)], loss_fn)
    for ra, rb in zip(a, b):
        assert rb.score == pytest.approx(2 * ra.score, rel=1e-10)
        assert torch.allclose(ra.weight, rb.weight, atol=1e-8)  # the direction does not change


def test_mean_reduced_loss_is_refused():
    model = ResidualMLP(2, 4, 1, 1)
    with pytest.raises(ValueError, match="reduction='sum'"):
        topological_derivative(model, [(torch.randn(4, 2), torch.randn(4, 1))], nn.MSELoss())


def test_empty_data_is_refused():
    with pytest.raises(ValueError, match="empty"):
        topological_derivative(ResidualMLP(2, 4, 1, 1), [], nn.MSELoss(reduction="sum"))


@pytest.mark.parametrize("solver", ["dense", "matrix_free"])
def test_second_moment_equals_a_forward_pass_bit_for_bit(solver):
    """The whitened rule takes M = mean zh zh^T from the statistic instead of one more forward pass: the same
    bits (same rows, same per-batch sums); ``None`` when rows were subsampled (the pass is then needed)."""
    from topotransfer.init_rules import input_second_moments

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    for model, x in ((ResidualMLP(5, 16, 2, 3), torch.randn(64, 5, generator=g)),
                     (ResidualCNN(2, 4, 2, 3), torch.randn(16, 2, 6, 6, generator=g))):
        y = torch.randint(0, 3, (x.shape[0],), generator=g)
        half = x.shape[0] // 2
        data = [(x[:half], y[:half]), (x[half:], y[half:])]
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        sites, stats, layers, _ = compute_site_statistics(model, data, loss_fn, solver=solver)
        ref = input_second_moments(model, data, sites, layers)
        for s in sites:
            assert torch.equal(stats[s.name].second_moment(), ref[s.name])
        _, sub, _, _ = compute_site_statistics(model, data, loss_fn, solver=solver, sample_fraction=0.5)
        assert all(st.second_moment() is None for st in sub.values())


@pytest.mark.parametrize("d_in, bias", [(6, True), (256, True), (5, False)])
def test_dense_blocks_equal_the_float64_sum_and_are_exactly_symmetric(d_in, bias):
    """DenseStatistic accumulates only each block's upper triangle (packed, in chunks of rows: one chunk at
    d_in = 6, chunks of 128 rows at d_in = 256) and mirrors it: Q_r = sum_n p_nr zh_n zh_n^T to float64
    rounding, symmetric bit for bit."""
    from topotransfer.derivative.statistics import DenseStatistic, append_bias

    g = torch.Generator().manual_seed(3)
    z, p = torch.randn(1200, d_in, generator=g), torch.randn(1200, 3, generator=g)
    st = DenseStatistic(3, d_in, bias)
    st.update(z[:700], p[:700])
    st.update(z[700:], p[700:])
    zh = append_bias(z.double(), bias)
    ref = torch.einsum("nr,ni,nj->rij", p.double(), zh, zh)
    assert torch.equal(st.Q, st.Q.transpose(1, 2))
    assert (st.Q - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert torch.equal(st.M, zh[:700].T @ zh[:700] + zh[700:].T @ zh[700:]) and st.count == 1200
