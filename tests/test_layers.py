import torch
import torch.nn.functional as F

from topotransfer import TopoConv2d, TopoLayer, topo_activation


def test_activation_taylor_coefficients(float64):
    x = torch.tensor([0.0], requires_grad=True)
    y = topo_activation(x)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert y.item() == 0.0 and g.item() == 0.0
    assert abs(h.item() - 1.0) < 1e-12  # sigma''(0) = 1
    t = torch.tensor([1e-3])  # sigma(t) = t^2/2 + t^3/3 - t^4/24 + O(t^5)
    assert abs(topo_activation(t).item() - (t**2 / 2 + t**3 / 3 - t**4 / 24).item()) < 1e-15  # next term -2t^5/15 ~ 1.3e-16


def test_zero_layer_is_exact_identity():
    torch.manual_seed(0)
    for norm in (None, "layernorm"):
        layer = TopoLayer(7, norm=norm)
        u = torch.randn(3, 5, 7)
        assert torch.equal(layer(u), u)
    conv = TopoConv2d(4, 3)
    u = torch.randn(2, 4, 6, 5)
    assert torch.equal(conv(u), u)


def test_samples_reproduce_the_layer_preactivation(float64):
    torch.manual_seed(0)
    layer = TopoLayer(6, norm="layernorm")
    layer.set_direction(torch.randn(6, 6), torch.randn(6))
    u = torch.randn(2, 3, 6)
    z, p = layer.samples(u, torch.randn_like(u))
    assert z.shape == (6, 6) and p.shape == (6, 6)
    pre = z @ layer.weight.T + layer.bias
    assert torch.allclose(u.reshape(-1, 6) + topo_activation(pre), layer(u).reshape(-1, 6))

    conv = TopoConv2d(3, 3)
    conv.set_direction(torch.randn(3, 27), torch.randn(3))
    u = torch.randn(2, 3, 5, 4)
    z, p = conv.samples(u, torch.randn_like(u))
    assert z.shape == (40, 27) and p.shape == (40, 3)
    pre = z @ conv.weight.reshape(3, -1).T + conv.bias  # im2col ordering matches the kernel layout
    ref = F.conv2d(u, conv.weight, conv.bias, padding=1).permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(pre, ref)


def test_bad_arguments():
    import pytest

    with pytest.raises(ValueError, match="norm"):
        TopoLayer(4, norm="batchnorm")
    with pytest.raises(ValueError, match="odd"):
        TopoConv2d(4, 2)
