"""Performance features: row subsampling, downstream-only line search, block pruning, convergence warnings.

- subsampling picks the same rows on every call (a function of seed and batch index only) and scales the
  kept adjoints by N / n, so Q_hat is exactly (N / n) * the sum over the kept rows;
- the line search evaluated on the blocks downstream of the site (cached h_t) gives the same losses as
  full forward passes with the layer inserted (float64, every family, every site);
- the pruned matrix-free solve agrees with dense ``eigh``; a solve that misses its tolerance warns and
  names the site.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from topotransfer import (
    ConvergenceWarning,
    ResidualCNN,
    ResidualMLP,
    compute_site_statistics,
    dense_top_eigenpairs,
    get_family,
    lanczos_top_eigenpairs,
    line_search_epsilon,
    topological_derivative,
)
from topotransfer.derivative.statistics import MatrixFreeStatistic
from topotransfer.derivative.topological import subsample_rows
from topotransfer.insertion import DEFAULT_EPSILONS

transformers = pytest.importorskip("transformers")

CE = nn.CrossEntropyLoss(reduction="sum")


def _mlp_data(seed=0, n=24, d=5, batch=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


# -- subsampling -----------------------------------------------------------------------------------------
def test_subsample_rows_is_deterministic_and_independent_of_global_rng():
    torch.manual_seed(1)
    a = subsample_rows(100, 3, fraction=0.25, seed=7)
    torch.manual_seed(2)
    torch.rand(10)
    b = subsample_rows(100, 3, fraction=0.25, seed=7)
    assert torch.equal(a, b) and a.numel() == 25 and torch.equal(a, a.sort().values) and a.unique().numel() == 25
    assert not torch.equal(a, subsample_rows(100, 4, fraction=0.25, seed=7))  # another batch, other rows
    assert not torch.equal(a, subsample_rows(100, 3, fraction=0.25, seed=8))
    assert subsample_rows(100, 0, max_rows=10, seed=7).numel() == 10
    assert subsample_rows(100, 0, fraction=0.5, max_rows=10).numel() == 10
    assert subsample_rows(10, 0, fraction=1.0) is None and subsample_rows(10, 0, max_rows=10) is None
    with pytest.raises(ValueError, match="sample_fraction"):
        subsample_rows(10, 0, fraction=0.0)
    with pytest.raises(ValueError, match="max_samples_per_batch"):
        subsample_rows(10, 0, max_rows=0)


def test_subsampled_statistic_is_the_scaled_sum_over_the_kept_rows(float64):
    torch.manual_seed(0)
    model = ResidualCNN(2, 3, 1, 3)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 2, 5, 5, generator=g), torch.randint(0, 3, (2,), generator=g)) for _ in range(2)]
    kw = dict(solver="matrix_free", cache_dtype=torch.float64)
    sites, full, layers, _ = compute_site_statistics(model, data, CE, **kw)
    _, sub, _, _ = compute_site_statistics(model, data, CE, sample_fraction=0.3, sample_seed=5, **kw)
    _, sub2, _, _ = compute_site_statistics(model, data, CE, sample_fraction=0.3, sample_seed=5, **kw)
    for s in sites:
        st, ref = sub[s.name], full[s.name]
        N = 2 * 5 * 5  # pixels per batch
        n = subsample_rows(N, 0, fraction=0.3).numel()
        assert st.count == ref.count == 2 * N and st.num_rows == 2 * n  # count = samples represented
        assert torch.equal(st.dense(), sub2[s.name].dense())  # rerun: same rows, bit-identical
        # Q_hat = sum over batches of (N / n) * sum over the kept rows, recomputed by hand
        expect = torch.zeros_like(ref.dense())
        zf, pf = ref._rows()
        for b in range(2):
            rows = subsample_rows(N, b, fraction=0.3, seed=5) + b * N
            zh, p = zf[rows], pf[rows] * (N / n)
            expect += torch.einsum("nr,ni,nj->rij", p, zh, zh)
        assert torch.allclose(st.dense(), expect, rtol=1e-12, atol=1e-12), s.name
    # another seed picks other rows
    _, other, _, _ = compute_site_statistics(model, data, CE, sample_fraction=0.3, sample_seed=6, **kw)
    assert not torch.equal(other[sites[0].name].dense(), sub[sites[0].name].dense())


def test_full_fraction_and_max_samples(float64):
    torch.manual_seed(0)
    model = ResidualMLP(5, 4, 2, 3)
    data = _mlp_data()
    ref = topological_derivative(model, data, CE, rule="top1")
    same = topological_derivative(model, data, CE, rule="top1", sample_fraction=1.0)
    assert [r.score for r in same] == [r.score for r in ref]
    # max_samples = 12 of 3 batches of 8: the first batch and half of the second
    cut = topological_derivative(model, data, CE, rule="top1", max_samples=12)
    x = torch.cat([b[0] for b in data])[:12]
    y = torch.cat([b[1] for b in data])[:12]
    manual = topological_derivative(model, [(x, y)], CE, rule="top1")
    assert [r.num_samples for r in cut] == [12] * len(cut)
    assert [r.score for r in cut] == pytest.approx([r.score for r in manual], rel=1e-12)


def test_bf16_cache_accumulates_in_float32():
    g = torch.Generator().manual_seed(3)
    z, p = torch.randn(300, 6, generator=g), torch.randn(300, 5, generator=g)
    ref = MatrixFreeStatistic(5, 6, True, cache_dtype=torch.float64)
    ref.update(z.double(), p.double())
    bf = MatrixFreeStatistic(5, 6, True, cache_dtype=torch.bfloat16)
    bf.convert_rows = 64  # several conversion slices
    bf.update(z, p)
    zq, pq = z.bfloat16().double(), p.bfloat16().double()
    zh = torch.cat([zq, torch.ones(300, 1, dtype=torch.float64)], 1)
    exact_of_rounded = torch.einsum("nr,ni,nj->rij", pq, zh, zh)
    assert torch.allclose(bf.dense(), exact_of_rounded, rtol=1e-5, atol=1e-4)  # float32 accumulation
    assert bf.nbytes() == (300 * 7 + 300 * 5) * 2  # half of float32


# -- downstream line search -------------------------------------------------------------------------------
def _vit_cfg(**kw):
    base = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8,
                patch_size=4, num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                num_labels=3, initializer_range=0.2, attn_implementation="sdpa")
    base.update(kw)
    return base


def _models():
    from transformers import DeiTConfig, ViTConfig, ViTForImageClassification, ViTModel
    from transformers.models import deit

    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    labels = [torch.randint(0, 3, (3,), generator=g) for _ in range(2)]
    torch.manual_seed(0)
    out = {
        "mlp": (ResidualMLP(5, 4, 2, 3).double(), _mlp_data(n=12, batch=6)),
        "cnn": (ResidualCNN(3, 3, 2, 3).double(), list(zip(images, labels))),
        "vit_cls": (ViTForImageClassification(ViTConfig(**_vit_cfg())).double(), list(zip(images, labels))),
        "deit_cls": (deit.DeiTForImageClassification(DeiTConfig(**_vit_cfg())).double(), list(zip(images, labels))),
        "deit_teacher": (
            deit.DeiTForImageClassificationWithTeacher(DeiTConfig(**_vit_cfg())).double(), list(zip(images, labels))
        ),
    }
    vm = ViTModel(ViTConfig(**_vit_cfg()), add_pooling_layer=False).double()
    targets = [torch.randn(3, 5, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    out["vit_model"] = (vm, list(zip(images, targets)))
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn", "vit_cls", "deit_cls", "deit_teacher", "vit_model"])
def test_downstream_line_search_equals_full_forward(name, float64):
    model, data = _models()[name]
    loss_fn = nn.MSELoss(reduction="sum") if name == "vit_model" else CE
    family = get_family(model)
    before = copy.deepcopy(model.state_dict())
    eps = DEFAULT_EPSILONS[::3]
    g = torch.Generator().manual_seed(4)
    for site in family.sites(model):
        layer = family.new_layer(model, site)
        w = torch.randn(layer.out_features, layer.in_features, generator=g, dtype=torch.float64)
        b = torch.randn(layer.out_features, generator=g, dtype=torch.float64)
        fast = line_search_epsilon(model, site.name, data, loss_fn, w, b, epsilons=eps)
        slow = line_search_epsilon(model, site.name, data, loss_fn, w, b, epsilons=eps, downstream=False)
        assert fast.downstream and not slow.downstream
        assert [e for e, _ in fast.tried] == [e for e, _ in slow.tried]
        for (_, lf), (_, ls) in zip(fast.tried, slow.tried):
            assert lf == pytest.approx(ls, rel=1e-12, abs=1e-12), (site.name, fast.tried, slow.tried)
        assert (fast.epsilon, fast.loss) == (slow.epsilon, pytest.approx(slow.loss, rel=1e-12))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and set(before) == set(after)


def test_unknown_heads_fall_back_to_full_forward(float64):
    from transformers import BertConfig, BertForSequenceClassification

    class Doubled(ResidualMLP):  # a subclass with its own forward: its head is not known
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = Doubled(5, 4, 1, 3).double()
    data = _mlp_data(n=8, batch=8)
    w, b = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    res = line_search_epsilon(model, "layers.0", data, CE, w, b)
    ref = line_search_epsilon(model, "layers.0", data, CE, w, b, downstream=False)
    assert not res.downstream and res.tried == ref.tried
    # a custom forward_fn also uses full passes
    plain = ResidualMLP(5, 4, 1, 3).double()
    assert not line_search_epsilon(plain, "layers.0", data, CE, w, b, forward_fn=lambda m, x: m(x)).downstream
    # BERT needs the attention mask in its blocks: full forward passes
    bert = BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=16,
                                                    attn_implementation="sdpa", num_labels=3)).double()
    batch = {"input_ids": torch.randint(0, 20, (2, 4)), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "labels": torch.tensor([0, 2])}
    site = get_family(bert).sites(bert)[1]
    wb, bb = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    assert not line_search_epsilon(bert, site.name, [batch], CE, wb, bb, epsilons=[0.1]).downstream


def test_a_head_that_disagrees_with_the_model_is_caught(float64):
    torch.manual_seed(0)
    model = ResidualMLP(5, 4, 1, 3).double()
    family = get_family(model)
    original = type(family).head
    try:  # simulate a family whose head does not match the model's forward
        type(family).head = lambda self, m, inputs=None: (lambda h: 3 * m.output_layer(h))
        with pytest.warns(RuntimeWarning, match="full forward"):
            res = line_search_epsilon(model, "layers.0", _mlp_data(n=8, batch=8), CE, torch.ones(4, 4), None)
    finally:
        type(family).head = original
    assert not res.downstream


# -- eigen-solver ---------------------------------------------------------------------------------------------
def test_pruned_lanczos_matches_dense_on_a_site_statistic(float64):
    # Many blocks, few wanted pairs: most blocks are pruned; the top pairs must equal dense eigh.
    g = torch.Generator().manual_seed(5)
    N, d, R = 400, 30, 30
    z = torch.randn(N, d, generator=g)
    p = torch.randn(N, R, generator=g) * torch.linspace(0.1, 2.0, R)  # blocks of different scales
    st = MatrixFreeStatistic(R, d, True, cache_dtype=torch.float64)
    st.update(z, p)
    dense = dense_top_eigenpairs(st.dense(), 8)
    calls = []

    def matvec(v, rows=None):
        calls.append(v.shape[0])
        return st.matvec(v, rows=rows)

    mf = lanczos_top_eigenpairs(matvec, R, d + 1, num=8, tol=1e-8)
    assert mf.converged and min(calls) < R and mf.work < mf.iterations  # blocks were pruned
    assert torch.allclose(mf.values, dense.values, rtol=1e-9)
    assert torch.equal(mf.rows, dense.rows)
    full = lanczos_top_eigenpairs(st.matvec, R, d + 1, num=8, tol=1e-8, prune=False)
    assert full.work == full.iterations and torch.allclose(full.values, dense.values, rtol=1e-9)


def test_non_convergence_warns_and_names_the_site(float64):
    torch.manual_seed(0)
    model = ResidualMLP(5, 6, 2, 3)
    with pytest.warns(ConvergenceWarning, match=r"site 'layers\.0'.*relative residual"):
        res = topological_derivative(model, _mlp_data(d=5), CE, sites=["layers.0"], solver="matrix_free",
                                     lanczos_steps=2, max_restarts=0, tol=1e-12)
    assert not res[0].converged


def test_downstream_line_search_under_peft(float64):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    from topotransfer.recipes.adapt import lora_target_modules

    torch.manual_seed(0)
    base = ViTForImageClassification(ViTConfig(**_vit_cfg())).double()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=lora_target_modules(base, None),
                                            modules_to_save=["classifier"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero LoRA, so the adapted blocks matter downstream
            p.data.normal_()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2]))]
    for site in get_family(model).sites(model):
        w, b = torch.randn(16, 16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
        fast = line_search_epsilon(model, site.name, data, CE, w, b, epsilons=[0.01, 0.1, 1.0])
        slow = line_search_epsilon(model, site.name, data, CE, w, b, epsilons=[0.01, 0.1, 1.0], downstream=False)
        assert fast.downstream and [e for e, _ in fast.tried] == [e for e, _ in slow.tried]
        assert [v for _, v in fast.tried] == pytest.approx([v for _, v in slow.tried], rel=1e-12)
