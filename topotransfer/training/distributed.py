"""accelerate helpers for the recipes: build a synchronised Accelerator, shard lists of batches, sum
scalars over processes, and prove that every rank holds the same parameters.

Every decision of a growth run (plateau, site, eps, stop) is taken from numbers that are *summed over
processes* before use, so all ranks take it identically without a broadcast; the parameter digest
checks that claim after every growth event (DDP would otherwise hide a divergence: it broadcasts
rank 0's weights when it wraps the model again).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "all_equal",
    "all_equal_digest",
    "build_accelerator",
    "is_multi_process",
    "param_digest",
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


def build_accelerator(device: str = "auto", mixed_precision: str = "no"):
    """An ``accelerate.Accelerator`` for a run, CPU-safe.

    On a host without CUDA (or ``device="cpu"``) the Accelerator is built with ``cpu=True``: a plain
    ``Accelerator()`` under ``accelerate launch --multi_gpu`` would otherwise run unsynchronised
    world-size-1 copies (STACK.md). A launch of N > 1 processes that still yields a 1-process
    Accelerator is refused instead of silently training N independent models.

    Args:
        device: "auto", "cpu" or "cuda" (``RunConfig.device``).
        mixed_precision: "no" or "bf16" (accelerate autocast).

    Raises:
        RuntimeError: the launcher started several processes but they are not synchronised.
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
    """Re-``prepare`` a changed model and its new optimizer (new DDP wrapper, autocast wrapper again).

    Needed after every change of the architecture or of the trainable set (DDP registers the parameters
    that require grad when it wraps). Pass the *unwrapped* model (``unwrap_model(...,
    keep_fp32_wrapper=False)``) and a raw optimizer (:func:`raw_optimizer`). On one process ``prepare``
    returns ``net`` itself and marks it prepared; a second ``prepare`` would then skip it, leaving the
    autocast wrapper that the unwrap removed un-restored (bf16 runs would silently continue in float32).
    The mark is dropped first so ``net`` is prepared afresh.

    Returns:
        ``(prepared model, prepared optimizer)``.
    """
    net.__dict__.pop("_is_accelerate_prepared", None)
    return accelerator.prepare(net, optimizer)
