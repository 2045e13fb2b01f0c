"""Probes leave no trace: hooks removed (even on errors), mode / grads / requires_grad restored."""

import pytest
import torch
from torch import nn

from topotransfer import ResidualMLP, topological_derivative
from topotransfer.derivative.probes import capture_states
from topotransfer.surgery import get_family


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("training", [True, False])
def test_state_restored_after_derivative(training):
    torch.manual_seed(0)
    model = ResidualMLP(3, 4, 2, 2)
    model.train(training)
    model.layers[0].weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    topological_derivative(model, [(torch.randn(5, 3), torch.randn(5, 2))], nn.MSELoss(reduction="sum"))
    assert model.training is training
    assert _hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_hooks_removed_when_forward_raises():
    model = ResidualMLP(3, 4, 2, 2)

    def bad_forward(m, x):
        m(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        topological_derivative(model, [(torch.randn(5, 3), torch.randn(5, 2))], nn.MSELoss(reduction="sum"),
                               forward_fn=bad_forward)
    assert _hook_count(model) == 0 and model.training

    family = get_family(model)
    with pytest.raises(KeyError):
        with capture_states(model, family.sites(model), family):
            assert _hook_count(model) == 3
            raise KeyError("inside")
    assert _hook_count(model) == 0


def test_frozen_model_gives_same_scores(float64):
    torch.manual_seed(0)
    model = ResidualMLP(3, 4, 2, 2)
    data = [(torch.randn(9, 3), torch.randn(9, 2))]
    loss_fn = nn.MSELoss(reduction="sum")
    ref = [r.score for r in topological_derivative(model, data, loss_fn)]
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = [r.score for r in topological_derivative(model, data, loss_fn)]
    assert frozen == pytest.approx(ref, rel=1e-12)
    assert not any(p.requires_grad for p in model.parameters())


def test_nan_loss_is_reported():
    model = ResidualMLP(2, 3, 1, 1)
    x = torch.randn(4, 2)
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="Non-finite"):
        topological_derivative(model, [(x, torch.randn(4, 1))], nn.MSELoss(reduction="sum"))
