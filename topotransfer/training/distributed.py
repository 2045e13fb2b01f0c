"""accelerate helpers for the recipes: build a synchronised Accelerator, shard lists of batches, sum
scalars over processes, and prove that every rank holds the same parameters.

Every decision of a growth run (plateau, site, eps, stop) is taken from numbers that are *summed over
processes* before use, so all ranks take it identically without a broadcast; the parameter digest
checks that claim after every growth event (DDP would otherwise hide a divergence: it broadcasts
rank 0's weights when it wraps the model again).

FSDP2 (``accelerate launch --use_fsdp --fsdp_version 2`` or ``configs/accelerate/fsdp.yaml``) shards every
parameter as a DTensor. An architecture change, a checkpoint or a "best model" copy needs the full weights:
:func:`plain_model` gathers them into an ordinary module (and the optimizer state into an ordinary
optimizer, keyed by parameter name) on every rank, and :func:`prepare_again` shards the changed module
again, carrying the optimizer state of the surviving parameters over by name. On a host without CUDA
accelerate ignores its FSDP plugin (it runs plain DDP under the MULTI_CPU type); :func:`build_accelerator`
switches the state to FSDP so the same code path shards on CPU / gloo too (docs/distributed.md).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "all_equal",
    "all_equal_digest",
    "build_accelerator",
    "fsdp_requested",
    "is_fsdp",
    "is_multi_process",
    "is_sharded",
    "param_digest",
    "plain_model",
    "prepare_again",
    "raw_optimizer",
    "reduce_sums",
    "shard",
    "value_digest",
]


def is_multi_process(accelerator: Any | None) -> bool:
    """True when ``accelerator`` spans more than one process."""
    return accelerator is not None and getattr(accelerator, "num_processes", 1) > 1


def _launched_world_size() -> int:
    """The process count the launcher asked for (``WORLD_SIZE`` set by accelerate launch / torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (``accelerate launch --use_fsdp`` / ``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")


def is_fsdp(accelerator: Any | None) -> bool:
    """True when ``accelerator`` shards models with FSDP."""
    from accelerate.utils import DistributedType

    return accelerator is not None and getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` is (or contains) an FSDP2-sharded module: its forward is then a collective.

    (Not read from the parameters: after a forward without backward FSDP2 may leave the unsharded ones
    registered until the next ``reshard()``.)
    """
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _reshard(model: nn.Module) -> None:
    """Register the sharded (DTensor) parameters again on every FSDP unit (frees gathered ones; local)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _fsdp_on_cpu(accelerator: Any, mixed_precision: str) -> None:
    """Make a CPU (MULTI_CPU, gloo) Accelerator shard with FSDP2 as it does on GPUs.

    accelerate only honours its FSDP plugin for GPU-like distributed types: on a CPU-only host the
    launched processes run DDP with no warning (measured with accelerate 1.15: ``--use_fsdp`` and an
    explicit ``FullyShardedDataParallelPlugin`` both give ``DistributedType.MULTI_CPU``). torch's
    ``fully_shard`` itself works on CPU with gloo, so the distributed type is switched to FSDP in both of
    accelerate's shared states (``AcceleratorState()`` re-reads ``PartialState``'s on every construction).
    :func:`prepare_again` then checks that the parameters really are sharded.
    """
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* environment
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def build_accelerator(device: str = "auto", mixed_precision: str = "no"):
    """An ``accelerate.Accelerator`` for a run, CPU-safe.

    On a host without CUDA (or ``device="cpu"``) the Accelerator is built with ``cpu=True``: a plain
    ``Accelerator()`` under ``accelerate launch --multi_gpu`` would otherwise run unsynchronised
    world-size-1 copies. A launch of N > 1 processes that still yields a 1-process
    Accelerator is refused instead of silently training N independent models.

    Under an FSDP launch (``--use_fsdp``, ``configs/accelerate/fsdp.yaml``) the Accelerator shards with
    FSDP2 on GPUs and on CPU alike (:func:`_fsdp_on_cpu`); only ``fsdp_version: 2`` is supported.

    Args:
        device: "auto", "cpu" or "cuda" (``RunConfig.device``).
        mixed_precision: "no" or "bf16" (accelerate autocast; FSDP's mixed-precision policy under FSDP).

    Raises:
        RuntimeError: the launcher started several processes but they are not synchronised, or asked
            for FSDP version 1.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but CUDA is not available on this host")
    shared = AcceleratorState._shared_state
    if (
        shared.get("_mixed_precision") not in (None, mixed_precision)
        and _launched_world_size() == 1
        and not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ):
        # An earlier run in this single process fixed another precision; accelerate's state is a
        # process-wide singleton that refuses changes, so start it afresh (nothing is distributed).
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    world = _launched_world_size()
    if world > 1 and accelerator.num_processes != world:
        raise RuntimeError(
            f"The launcher started {world} processes but the Accelerator sees {accelerator.num_processes}: "
            "the processes are not synchronised. On a CPU-only host launch with "
            "`accelerate launch --multi_gpu --num_processes N ...` (not `--cpu`), see docs/distributed.md"
        )
    if fsdp_requested() and accelerator.num_processes > 1:
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise RuntimeError(
                f"FSDP version {version} was requested; topotransfer supports FSDP2 only: launch with "
                "`--use_fsdp --fsdp_version 2` or configs/accelerate/fsdp.yaml (fsdp_version: 2)"
            )
        if not is_fsdp(accelerator):
            _fsdp_on_cpu(accelerator, mixed_precision)
    return accelerator


def shard(items: Sequence, accelerator: Any | None) -> list:
    """This process's share of a list (items ``rank, rank + world, ...``); all of it for one process.

    Sums over the shards equal the sum over the list, whatever the split: the statistics, losses and
    counts that are sharded this way are all sums.
    """
    if not is_multi_process(accelerator):
        return list(items)
    return list(items)[accelerator.process_index :: accelerator.num_processes]


def reduce_sums(values: Sequence[float], accelerator: Any | None, device: torch.device | str = "cpu") -> list[float]:
    """Sum a few scalars over processes (float64); returns them unchanged for one process."""
    if not is_multi_process(accelerator):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=accelerator.device)
    return [float(v) for v in accelerator.reduce(t, reduction="sum").cpu()]


def param_digest(model: nn.Module) -> str:
    """SHA-256 (first 15 hex digits) of every state-dict tensor's bytes, in key order: equal iff bit-equal."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:15]  # 60 bits: fits an int64 for the all-gather


def value_digest(value: Any) -> str:
    """SHA-256 (first 15 hex digits) of a JSON-able value (floats by their exact ``repr``): equal iff equal."""
    text = json.dumps(value, sort_keys=True, default=float)
    return hashlib.sha256(text.encode()).hexdigest()[:15]


def all_equal(digest: str, accelerator: Any | None, what: str = "values") -> list[str]:
    """Gather a 15-hex-digit digest (:func:`param_digest`, :func:`value_digest`) from every rank.

    Returns:
        The digests in rank order (one entry for a single process).

    Raises:
        RuntimeError: the ranks' digests differ.
    """
    if not is_multi_process(accelerator):
        return [digest]
    t = torch.tensor([int(digest, 16)], dtype=torch.int64, device=accelerator.device)
    digests = [f"{int(v):015x}" for v in accelerator.gather(t).cpu()]
    if len(set(digests)) != 1:
        raise RuntimeError(f"The ranks' {what} differ after an architecture change (digests by rank: {digests})")
    return digests


def all_equal_digest(model: nn.Module, accelerator: Any | None, what: str = "parameters") -> list[str]:
    """Every rank's :func:`param_digest` (gathered); raises if they differ.

    Returns:
        The digests in rank order (one entry for a single process).

    Raises:
        RuntimeError: the ranks hold different parameters.
    """
    return all_equal(param_digest(model), accelerator, what)


def raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside an accelerate ``AcceleratedOptimizer`` (never wrap one twice)."""
    from accelerate.optimizer import AcceleratedOptimizer

    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


def prepare_again(accelerator: Any, net: nn.Module, optimizer: torch.optim.Optimizer):
    """``prepare`` a (changed) plain model and its optimizer: the first time, and after every change.

    Needed after every change of the architecture or of the trainable set (DDP registers the parameters
    that require grad when it wraps). Pass the plain model (:func:`plain_model`, or ``unwrap_model(...,
    keep_fp32_wrapper=False)``) and a raw optimizer (:func:`raw_optimizer`). On one process ``prepare``
    returns ``net`` itself and marks it prepared; a second ``prepare`` would then skip it, leaving the
    autocast wrapper that the unwrap removed un-restored (bf16 runs would silently continue in float32).
    The mark is dropped first so ``net`` is prepared afresh.

    Under FSDP, ``net`` is sharded in place (its parameters become DTensors) and the optimizer is
    rebuilt over the sharded parameters: its state (Adam moments, step) is carried over *by parameter
    name*, each rank keeping its shard of the full tensors. Every rank must pass identical ``net`` and
    state (each rank shards its own copy; nothing is broadcast): check with :func:`all_equal_digest`
    first. A weight-less (meta) copy of ``net`` is kept so :func:`plain_model` can rebuild it.

    Returns:
        ``(prepared model, prepared optimizer)``.

    Raises:
        RuntimeError: FSDP was requested but the prepared model is not sharded.
    """
    net.__dict__.pop("_is_accelerate_prepared", None)
    if not is_fsdp(accelerator):
        return accelerator.prepare(net, optimizer)
    state = {name: optimizer.state[p] for name, p in net.named_parameters() if p in optimizer.state}
    fresh = type(optimizer)(
        [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])} for g in optimizer.param_groups],
        **optimizer.defaults,
    )
    template = _meta_copy(net)
    model, prepared = accelerator.prepare(net, fresh)
    if not is_sharded(model):
        raise RuntimeError(
            f"FSDP was requested but accelerate returned an unsharded {type(model).__name__} "
            f"(distributed type {accelerator.distributed_type})"
        )
    raw = raw_optimizer(prepared)
    for name, p in model.named_parameters():
        if _canonical(name) in state:
            raw.state[p] = {k: _shard_like(v, p) for k, v in state[_canonical(name)].items()}
    _TEMPLATES[model] = template
    return model, prepared


# ------------------------------------------------------------------------------------- FSDP: gather / reshard

# prepared (sharded) model -> weight-less copy of the plain module it was made from
_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _canonical(name: str) -> str:
    """A parameter name without the wrappers accelerate may add (activation checkpointing, compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (a collective: every rank calls it in the same order); others as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(value: Any, param: torch.Tensor) -> Any:
    """This rank's shard of a full optimizer-state tensor shaped like ``param`` (scalars, e.g. Adam's step,
    are copied). Every rank holds the same full tensor, so each takes its chunk without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not torch.is_tensor(value):
        return value
    if isinstance(param, DTensor) and value.dim() > 0 and value.shape == param.shape:
        local = value.detach().to(param.to_local().device)
        return distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)
    return value.detach().clone()


def _meta_copy(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` whose parameters and buffers live on the meta device (no memory); tied
    parameters stay tied."""
    memo: dict[int, Any] = {}
    for p in net.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in net.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(net, memo)


def _materialize(template: nn.Module, tensors: dict[str, torch.Tensor], requires_grad: dict[str, bool]) -> nn.Module:
    """A deep copy of the meta ``template`` holding ``tensors`` (by parameter / buffer name)."""
    memo: dict[int, Any] = {}
    for name, p in template.named_parameters():
        memo[id(p)] = nn.Parameter(tensors[name].detach().clone(), requires_grad=requires_grad[name])
    for name, b in template.named_buffers():
        memo[id(b)] = tensors[name].detach().clone()
    return copy.deepcopy(template, memo)


def plain_model(accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """The plain module (and torch optimizer) behind a prepared model, with *full* weights on every rank.

    What a growth / insertion event, a checkpoint or a "best model" copy works on. Under DDP (or one
    process) this is the unwrapped module itself (also without the autocast wrapper) and the raw
    optimizer: changes to it are changes to the training model. Under FSDP it is a new, unsharded copy:
    the sharded parameters are all-gathered (every rank must call this at the same point), buffers are
    copied, and the optimizer state is gathered into a new optimizer of the same class and parameter
    groups over the copy's parameters. Train the copy further only after :func:`prepare_again`.

    Returns:
        ``(module, optimizer)`` (``optimizer`` is None when none was given).
    """
    if not is_fsdp(accelerator) or not is_sharded(model):
        net = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        return net, (None if optimizer is None else raw_optimizer(optimizer))
    template = _TEMPLATES.get(model)
    if template is None:
        raise RuntimeError("plain_model: this FSDP model was not prepared with prepare_again")
    _reshard(model)  # the parameters are then the sharded DTensors the optimizer holds
    tensors, requires_grad, names = {}, {}, {}
    for name, p in model.named_parameters():  # same order on every rank: the all-gathers pair up
        key = _canonical(name)
        tensors[key], requires_grad[key], names[id(p)] = _full(p.detach()), p.requires_grad, key
    for name, b in model.named_buffers():
        tensors[_canonical(name)] = _full(b.detach())
    net = _materialize(template, tensors, requires_grad)
    net.train(model.training)
    if optimizer is None:
        return net, None
    raw = raw_optimizer(optimizer)
    params = dict(net.named_parameters())
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [params[names[id(p)]] for p in g["params"]]}
        for g in raw.param_groups
    ]
    plain_opt = type(raw)(groups, **raw.defaults)
    for p in model.parameters():  # the same order as above: the all-gathers pair up across ranks
        if p in raw.state:
            plain_opt.state[params[names[id(p)]]] = {
                k: _full(v.detach()).clone() if torch.is_tensor(v) else v for k, v in raw.state[p].items()
            }
    return net, plain_opt
