"""Block expansion: insert copies of a model's own blocks (LLaMA-Pro style), placed by the derivative.

A **copied block** inserted at site t is a deep copy of the nearest original block before the site (the
first block at the stem site) whose *output projections* -- the attention output projection and the MLP
down projection (``o_proj`` / ``down_proj`` for the Llama layout, ``attn.c_proj`` / ``mlp.c_proj`` for
GPT-2) -- start from ``eps * Theta``. With eps = 0 both residual branches of the copy add exactly 0, so the
network is unchanged (bit for bit) at insertion.

The derivative of a copied block
--------------------------------
Write the copy as a function of the state h = h_t at the site (per token n; ``a`` and ``m`` are the inputs
of the two output projections, computed by the copy's own attention and MLP on its normalised input)::

    g(h) = h + W_o a(h) + W_d m(h + W_o a(h)),      (W_o, W_d) = eps * (Theta_o, Theta_d)

Downstream of g the expanded network is the original network downstream of h_t, so with the adjoint
p_n = -dJ/dh_{t,n} of the *original* model::

    J(eps) = J(0) - eps * sum_n p_n . (Theta_o a_n + Theta_d m_n) + O(eps^2)
           = J(0) - eps * <D_t, Theta> + O(eps^2),
    D_t    = (sum_n p_n a_n^T,  sum_n p_n m_n^T)          (one matrix per output projection; + sum_n p_n per bias)

(the MLP's input is h + W_o a = h + O(eps), which only enters at second order). So **the first-order term
does not vanish** for a copied block, unlike for the TopoLayer, whose activation has sigma'(0) = 0 and whose
loss change is second order (J(eps) = J(0) - eps^2/2 theta^T Q_t theta, see docs/method.md). A copied
block is *linear* in its output projections: at Theta = 0 the loss is stationary in every *other*
parameter of the copy (they all feed through a zero matrix, so their gradient is exactly zero), but not in
the output projections, whose gradient is -D_t. D_t is exactly the gradient a LLaMA-Pro zero-initialised
copy receives at its first training step.

The first-order topological derivative of a copy at site t, over unit-norm directions, is therefore::

    TD1_t = max_{||Theta||_F = 1} -dJ/deps = ||D_t||_F,    attained at Theta*_t = D_t / ||D_t||_F

-- the analogue of the TopoLayer's eigen direction is the normalised gradient direction, and initialising
the output projections at eps * Theta*_t is one normalised gradient step from the LLaMA-Pro init. Ranking
sites by ||D_t||_F ranks them by the loss decrease of that first step (for plain SGD with rate lr the first
step lowers J by lr ||D_t||^2 + O(lr^2), so the order is the same for every lr). Because the copy differs
from site to site (it duplicates a different block, so a and m differ), the score is a property of the
(site, copy) pair, not of the site alone.

Cost: one forward + backward pass of the probe batch (states and adjoints at every site, as for the
TopoLayer) plus, per site, one forward pass of one block on the captured state (the source block itself,
its output projections' outputs replaced by zeros: no copy is made).

Positions: :func:`copy_site_scores` gives TD1_t at every site; :func:`choose_sites` keeps the best B, or
:func:`realized_copy_sites` keeps the B whose line search over eps (held-out data) lowers the loss most. The
baselines are :func:`uniform_interleave_sites` (LLaMA-Pro: one copy after every T/B blocks) and
:func:`on_top_sites` (B copies stacked after the last block). :func:`expand` inserts copies at a list of
sites, :func:`freeze_all_but_copies` makes only the new blocks trainable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .derivative.probes import capture_states, probe_batch
from .derivative.topological import LossFn, _to_device, check_loss_fn, sample_mask, split_batch
from .insertion import DEFAULT_EPSILONS, evaluate_loss
from .surgery import get_family
from .surgery.base import Site
from .surgery.decoder import CopiedBlock, DecoderFamily

__all__ = [
    "CopyLineSearch",
    "CopySiteScore",
    "choose_sites",
    "copies_parameter_count",
    "copy_site_scores",
    "expand",
    "freeze_all_but_copies",
    "insert_copied_block",
    "line_search_copy",
    "lora_rank_matching",
    "on_top_sites",
    "realized_copy_sites",
    "uniform_interleave_sites",
]


@dataclass
class CopySiteScore:
    """The first-order derivative of inserting a copied block at one site.

    Attributes:
        site: site name.
        index: depth order t of the site.
        source: position of the block the copy duplicates.
        score: TD1_t = ||D_t||_F (a sum over the probe tokens: it doubles with the data).
        direction: ``{parameter name in the copied block: tensor}``, D_t / ||D_t||_F in each output
            projection's own parameter shape (weights and biases), float64.
        num_samples: tokens behind the statistic (padding excluded).
    """

    site: str
    index: int
    source: int
    score: float
    direction: dict[str, torch.Tensor] = field(default_factory=dict)
    num_samples: int = 0


def _decoder_family(model: nn.Module) -> DecoderFamily:
    family = get_family(model)
    if not isinstance(family, DecoderFamily):
        raise TypeError(f"Block expansion needs a decoder-LM family (GPT-2, Llama layout); got {family.name!r}")
    return family


def _no_cache_forward(model: nn.Module, inputs: object) -> torch.Tensor:
    """Logits without building a KV cache (the probe pass captures the block arguments; a cache in them
    would be written to when the copies run)."""
    out = model(**inputs, use_cache=False) if isinstance(inputs, dict) else model(inputs, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def _descent(proj: nn.Module, x: torch.Tensor, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_n p_n x_n^T in the projection's own weight layout, and sum_n p_n for its bias.

    Args: x (N, d_in) inputs of the projection, p (N, d_out) adjoints of its output, both float64.
    """
    if type(proj).__name__ == "Conv1D":  # GPT-2 stores W as (d_in, d_out): y = x W + b
        out = {"weight": x.T @ p}
    else:  # nn.Linear: y = x W^T + b
        out = {"weight": p.T @ x}
    if getattr(proj, "bias", None) is not None:
        out["bias"] = p.sum(0)
    return out


class _ArgsHook:
    """Forward pre-hook storing the first call's (args, kwargs) of a block."""

    def __init__(self) -> None:
        self.call: tuple[tuple, dict] | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.call is None:
            self.call = (args, dict(kwargs))


class _ZeroOutputHook:
    """Forward hook storing a module's input and replacing its output by zeros: the source block then computes
    exactly what its copy with zero output projections computes (both residual branches add 0), and the
    stored inputs are the copy's a_n and m_n -- without copying the block."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        self.x = args[0]
        return torch.zeros_like(output)


def copy_site_scores(
    model: nn.Module,
    data: Iterable,
    loss_fn: LossFn,
    sites: Sequence[str | Site] | None = None,
    max_batches: int | None = None,
    forward_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
) -> list[CopySiteScore]:
    """TD1_t = ||D_t||_F and the direction D_t / ||D_t|| of a copied block at every site (module docstring).

    Args:
        model: a decoder LM of a registered family (not changed; ``model.training`` restored).
        data: batches (dicts with ``input_ids``, ``attention_mask``, ``labels``; or ``(inputs, targets)``).
        loss_fn: the loss summed over the batch (e.g. :class:`~topotransfer.losses.CausalLMLoss`).
        sites: site names (default: every site).
        max_batches: use at most this many batches.
        forward_fn: ``forward_fn(model, inputs) -> logits``; default: the model without a KV cache.

    Returns:
        One :class:`CopySiteScore` per site, in depth order.
    """
    check_loss_fn(loss_fn)
    family = _decoder_family(model)
    all_sites = family.sites(model)
    site_list = all_sites if sites is None else sorted((family.site(model, s) for s in sites), key=lambda s: s.index)
    container = model.get_submodule(site_list[0].container)
    sources = {s.name: family.source_position(model, s) for s in site_list}
    # The source block itself, with its output projections' outputs zeroed by hooks, computes the copy's a and m;
    # a source holding a layer inside it differs from its copy (copy_block strips the layer): copy those only.
    runners = {
        s.name: (family.copy_block(model, s).block if hasattr(type(container[sources[s.name]]), "_topo_base")
                 else container[sources[s.name]])
        for s in site_list
    }
    sums: dict[str, dict[str, torch.Tensor]] = {s.name: {} for s in site_list}
    counts = dict.fromkeys(sums, 0)
    forward_fn = forward_fn or _no_cache_forward
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    arg_hooks = {pos: _ArgsHook() for pos in set(sources.values())}
    handles = [container[pos].register_forward_pre_hook(h, with_kwargs=True) for pos, h in arg_hooks.items()]
    try:
        with capture_states(model, site_list, family) as store:
            for b, batch in enumerate(data):
                if max_batches is not None and b >= max_batches:
                    break
                inputs, targets = split_batch(batch)
                inputs, targets = _to_device(inputs, device), _to_device(targets, device)
                for hook in arg_hooks.values():
                    hook.call = None
                _, captured = probe_batch(model, site_list, family, store, inputs, targets, loss_fn, forward_fn)
                for s in site_list:
                    h, p = captured.pop(s.name)
                    keep = sample_mask(inputs, h)
                    args, kwargs = arg_hooks[sources[s.name]].call
                    runner = runners[s.name]
                    in_hooks = {name: _ZeroOutputHook() for name in family.output_projections}
                    hs = [runner.get_submodule(n).register_forward_hook(in_hooks[n]) for n in in_hooks]
                    try:
                        with torch.no_grad():
                            runner(h, *args[1:], **kwargs)
                    finally:
                        for handle in hs:
                            handle.remove()
                        store.clear()  # the source block is a site module: its probe hook just fired again
                    pr = p.reshape(-1, p.shape[-1]).to(torch.float64)
                    if keep is not None:  # padding tokens are not samples (their adjoint is 0 anyway)
                        pr = pr * keep[:, None]
                    counts[s.name] += int(pr.shape[0] if keep is None else keep.sum())
                    for name, hook in in_hooks.items():
                        x = hook.x.reshape(-1, hook.x.shape[-1]).to(torch.float64)
                        proj = runner.get_submodule(name)
                        for pname, d in _descent(proj, x, pr).items():
                            key = f"{name}.{pname}"
                            sums[s.name][key] = sums[s.name].get(key, 0) + d
                    del h, p
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    results = []
    for s in site_list:
        d = sums[s.name]
        norm = torch.sqrt(sum((t * t).sum() for t in d.values()))
        direction = {k: (t / norm if norm > 0 else torch.zeros_like(t)) for k, t in d.items()}
        results.append(CopySiteScore(s.name, s.index, sources[s.name], float(norm), direction, counts[s.name]))
    return results


def insert_copied_block(
    model: nn.Module,
    site: str | Site | CopySiteScore,
    direction: dict[str, torch.Tensor] | None = None,
    epsilon: float = 0.0,
) -> CopiedBlock:
    """Insert a copy of the block before ``site`` with output projections ``epsilon * direction`` (in place).

    Args:
        site: a site name, :class:`Site`, or a :class:`CopySiteScore` (whose direction is used when
            ``direction`` is not given).
        direction: ``{parameter name in the copied block: tensor}`` (e.g. ``"self_attn.o_proj.weight"``);
            ``None`` (or ``epsilon = 0``) leaves every output projection at zero -- an exact identity.
        epsilon: the scale.

    Returns:
        The inserted :class:`CopiedBlock`.
    """
    if isinstance(site, CopySiteScore):
        direction = site.direction if direction is None else direction
        site = site.site
    family = _decoder_family(model)
    resolved = family.site(model, site)
    block = family.copy_block(model, resolved)
    if direction is not None and epsilon != 0.0:
        params = dict(block.block.named_parameters())
        allowed = {f"{n}.{p}" for n in family.output_projections for p, _ in block.block.get_submodule(n).named_parameters()}
        unknown = sorted(set(direction) - allowed)
        if unknown:
            raise ValueError(f"direction names {unknown} are not output projections of the copy ({sorted(allowed)})")
        with torch.no_grad():
            for name, value in direction.items():
                params[name].copy_((epsilon * value.to(torch.float64)).to(params[name]))
    family.insert(model, resolved, block)
    return block


def expand(
    model: nn.Module,
    sites: Sequence[str | Site | CopySiteScore],
    epsilon: float | Sequence[float] = 0.0,
) -> list[int]:
    """Insert one copied block at each of ``sites`` (names refer to the model *before* expansion).

    Copies go in from the deepest site up, so every name still means the same place when its copy goes
    in; a site listed k times receives k copies, stacked. Output projections start at ``epsilon`` (one
    value, or one per site) times the score's direction for :class:`CopySiteScore` entries, else at zero.

    Returns:
        The block positions of the new copies in the expanded model, ascending.
    """
    family = _decoder_family(model)
    resolved = [(family.site(model, s.site if isinstance(s, CopySiteScore) else s), s) for s in sites]
    eps = [float(epsilon)] * len(resolved) if isinstance(epsilon, (int, float)) else [float(e) for e in epsilon]
    if len(eps) != len(resolved):
        raise ValueError(f"{len(eps)} epsilons for {len(resolved)} sites")
    order = sorted(range(len(resolved)), key=lambda i: resolved[i][0].index, reverse=True)
    for i in order:
        site, entry = resolved[i]
        if isinstance(entry, CopySiteScore):
            insert_copied_block(model, site, entry.direction, eps[i])
        else:
            insert_copied_block(model, site)
    _, container = family.chain(model)
    return [i for i, b in enumerate(model.get_submodule(container)) if isinstance(b, CopiedBlock)]


def choose_sites(scores: Sequence[CopySiteScore], budget: int) -> list[CopySiteScore]:
    """The ``budget`` sites with the largest TD1 (distinct sites), in depth order.

    Raises:
        ValueError: ``budget`` is not in 1 .. number of sites.
    """
    if not 1 <= budget <= len(scores):
        raise ValueError(f"budget must be between 1 and the number of sites ({len(scores)}), got {budget}")
    best = sorted(scores, key=lambda s: (-s.score, s.index))[:budget]
    return sorted(best, key=lambda s: s.index)


@dataclass
class CopyLineSearch:
    """The realized loss of a copy inserted along a direction, over a grid of eps.

    Attributes:
        site: site name.
        epsilon: the eps of the lowest loss (0.0 when no eps lowers it: the zero-initialised copy).
        loss: the loss at ``epsilon``.
        baseline: the loss without the copy (= with eps = 0).
        tried: ``(eps, loss)`` pairs, eps = 0 first.
    """

    site: str
    epsilon: float
    loss: float
    baseline: float
    tried: list[tuple[float, float]] = field(default_factory=list)

    @property
    def decrease(self) -> float:
        """baseline - loss (>= 0)."""
        return self.baseline - self.loss


@torch.no_grad()
def line_search_copy(
    model: nn.Module,
    score: CopySiteScore,
    data: Iterable,
    loss_fn: LossFn,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    max_batches: int | None = None,
) -> CopyLineSearch:
    """Evaluate J on ``data`` (held out from the probe data) with a copy at ``score.site`` whose output
    projections are eps * ``score.direction``, for every eps of the grid; the model is left unchanged.

    Never accepts an eps that raises the loss: eps = 0 (the zero-initialised copy, J unchanged) is admissible.
    """
    check_loss_fn(loss_fn)
    family = _decoder_family(model)
    site = family.site(model, score.site)
    baseline = evaluate_loss(model, data, loss_fn, _no_cache_forward, max_batches)
    block = insert_copied_block(model, site)
    tried = [(0.0, baseline)]
    try:
        params = dict(block.block.named_parameters())
        for eps in epsilons:
            for name, value in score.direction.items():
                params[name].copy_((float(eps) * value.to(torch.float64)).to(params[name]))
            tried.append((float(eps), evaluate_loss(model, data, loss_fn, _no_cache_forward, max_batches)))
    finally:
        family.remove(model, site)
    best_eps, best_loss = min(tried, key=lambda t: (t[1], t[0]))
    if not best_loss < baseline:
        best_eps, best_loss = 0.0, baseline
    return CopyLineSearch(site.name, best_eps, best_loss, baseline, tried)


def realized_copy_sites(
    model: nn.Module,
    scores: Sequence[CopySiteScore],
    data: Iterable,
    loss_fn: LossFn,
    budget: int,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    max_batches: int | None = None,
) -> list[tuple[CopySiteScore, CopyLineSearch]]:
    """The ``budget`` sites whose line search (:func:`line_search_copy`) lowers the held-out loss most, in
    depth order, each with its search (pass ``[s.epsilon for _, s in chosen]`` to :func:`expand`).

    Each site is searched with the others absent, so the decreases of several copies need not add up.
    """
    if not 1 <= budget <= len(scores):
        raise ValueError(f"budget must be between 1 and the number of sites ({len(scores)}), got {budget}")
    searched = [(s, line_search_copy(model, s, data, loss_fn, epsilons, max_batches)) for s in scores]
    best = sorted(searched, key=lambda t: (-t[1].decrease, t[0].index))[:budget]
    return sorted(best, key=lambda t: t[0].index)


def _original_block_sites(model: nn.Module) -> list[str]:
    family = _decoder_family(model)
    return [s.name for s in family.sites(model)[1:]]


def uniform_interleave_sites(model: nn.Module, budget: int) -> list[str]:
    """LLaMA-Pro's placement: the T blocks split into ``budget`` equal groups, one copy after each group.

    Copy k (k = 1 .. B) follows block ceil(k T / B) - 1 (0-based), so with T divisible by B the copies follow
    blocks T/B - 1, 2T/B - 1, ..., T - 1, as in LLaMA-Pro.

    Raises:
        ValueError: ``budget`` is not in 1 .. T.
    """
    blocks = _original_block_sites(model)
    T = len(blocks)
    if not 1 <= budget <= T:
        raise ValueError(f"budget must be between 1 and the number of blocks ({T}), got {budget}")
    return [blocks[-(-k * T // budget) - 1] for k in range(1, budget + 1)]


def on_top_sites(model: nn.Module, budget: int) -> list[str]:
    """``budget`` copies stacked after the last block (each a copy of the last original block)."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    return [_original_block_sites(model)[-1]] * budget


def freeze_all_but_copies(model: nn.Module) -> list[nn.Parameter]:
    """Set ``requires_grad`` to False on every parameter outside the inserted copies; return the copies'.

    Tied parameters (a copy never shares storage with the base) are not an issue: copies are deep copies.
    """
    family = _decoder_family(model)
    _, container = family.chain(model)
    trainable = [p for b in model.get_submodule(container) if isinstance(b, CopiedBlock) for p in b.parameters()]
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return trainable


def copies_parameter_count(model: nn.Module, sites: Sequence[str | Site | CopySiteScore]) -> int:
    """Trainable parameters of the copies :func:`expand` would insert at ``sites`` (without inserting them)."""
    family = _decoder_family(model)
    container = model.get_submodule(family.chain(model)[1])
    total = 0
    for s in sites:
        source = container[family.source_position(model, s.site if isinstance(s, CopySiteScore) else s)]
        total += sum(p.numel() for n, p in source.named_parameters() if not n.startswith("topo_mid."))
    return total


def lora_rank_matching(model: nn.Module, num_params: int, target_modules: Sequence[str]) -> int:
    """The largest LoRA rank r whose adapters on the modules named ``target_modules`` (suffixes of module
    names, as peft matches them) have at most ``num_params`` parameters: sum over modules of r (in + out).

    The LoRA baseline at the trainable-parameter budget of B copied blocks:
    ``lora_rank_matching(model, copies_parameter_count(model, sites), ["q_proj", "v_proj"])``.

    Raises:
        ValueError: no module matches, or even rank 1 exceeds ``num_params``.
    """
    per_rank = 0
    for name, module in model.named_modules():
        if not any(name == t or name.endswith(f".{t}") for t in target_modules):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        per_rank += int(weight.shape[0] + weight.shape[1])  # Linear (out, in) or Conv1D (in, out): in + out
    if per_rank == 0:
        raise ValueError(f"no 2-D weight module of {type(model).__name__} matches {list(target_modules)}")
    if num_params < per_rank:
        raise ValueError(f"{num_params} parameters are fewer than one LoRA rank on {list(target_modules)} ({per_rank})")
    return num_params // per_rank
