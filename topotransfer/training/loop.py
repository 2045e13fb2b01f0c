"""Plain train / evaluate loops (no framework): a growth event stays visible code in the recipe."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..derivative.probes import default_forward
from .checkpoint import restore_rng_state
from .distributed import is_multi_process, is_sharded, reduce_sums
from .optim import lr_factor, scale_lr

__all__ = ["EvalResult", "epoch_seed", "evaluate", "make_loader", "train_epoch", "train_run_epoch"]


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader whose shuffling depends only on ``seed`` (resume-safe: seed = f(run seed, epoch)).

    A dataset with ``for_loader`` (lazy ``hf:`` splits, augmented images) is seen through it: a shuffled
    (training) loader's augmentation is seeded by ``seed``, an unshuffled one has none; its
    ``num_workers`` decode the batches.
    """
    if len(dataset) == 0:
        raise ValueError("Cannot build a data loader on an empty dataset")
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    workers = 0
    if hasattr(dataset, "for_loader"):
        dataset, workers = dataset.for_loader(seed if shuffle else None), dataset.num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=workers)


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str = "cpu",
    max_steps: int | None = None,
    forward_fn: Callable = default_forward,
    accelerator: Any | None = None,
    lr_factor_fn: Callable[[int], float] | None = None,
    on_step: Callable[[int, float, int], None] | None = None,
    initial: tuple[float, int] = (0.0, 0),
) -> tuple[float, int]:
    """One pass of mini-batch training with a mean-reduced ``loss_fn``.

    Args:
        accelerator: when it spans several processes, ``model``/``optimizer``/``loader`` are prepared
            by it; every step's loss is summed over the processes before the update, so a NaN on any
            rank stops *every* rank at the same step (a lone rank raising would leave the others
            blocked in the gradient all-reduce), and the returned loss is over all ranks' examples.
        lr_factor_fn: learning-rate multiplier of the i-th step of this call (i = 0, 1, ...), applied to
            every group's base rate before the update (the recipe maps i to the run's global step:
            :func:`~topotransfer.training.optim.lr_factor`).
        on_step: called after every update with (steps of this call, summed loss, examples) so far, e.g.
            to write a mid-epoch checkpoint (every rank calls it at the same step).
        initial: (summed loss, examples) already seen in this epoch before a mid-epoch resume.

    Returns:
        (mean training loss over the examples seen, optimizer steps taken by this call).

    Raises:
        FloatingPointError: the loss became NaN / inf (the step is not applied).
    """
    model.train()
    multi = is_multi_process(accelerator)
    (total, count), steps = initial, 0
    for x, y in loader:
        if max_steps is not None and steps >= max_steps:
            break
        x, y = x.to(device), y.to(device)
        loss = loss_fn(forward_fn(model, x), y)
        if multi:
            batch_sum, batch_n = reduce_sums([float(loss.detach()) * len(y), len(y)], accelerator)
            if not math.isfinite(batch_sum):
                raise FloatingPointError(
                    f"Training loss is {batch_sum} (summed over {accelerator.num_processes} processes) at step "
                    f"{steps}; stopping before the update"
                )
        elif not torch.isfinite(loss):
            raise FloatingPointError(f"Training loss is {loss.item()} at step {steps}; stopping before the update")
        optimizer.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        if lr_factor_fn is not None:
            scale_lr(optimizer, lr_factor_fn(steps))
        optimizer.step()
        if multi:
            total += batch_sum
            count += int(batch_n)
        else:
            total += float(loss.detach()) * len(y)
            count += len(y)
        steps += 1
        if on_step is not None:
            on_step(steps, total, count)
    return total / max(count, 1), steps


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The global RNG seed of (run seed, epoch, rank): a run resumed at an epoch boundary draws what the
    uninterrupted one did (dropout), and ranks draw differently."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def train_run_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str,
    max_steps: int | None,
    *,
    accelerator: Any,
    state: Any,
    seed: int,
    epoch: int,
    total_steps: int,
    train_cfg: Any,
    rng_states: list[dict] | None,
    checkpoint: Callable[[], None],
) -> tuple[float, int]:
    """:func:`train_epoch` with a recipe's run bookkeeping (grow and adapt share it).

    - Start: seed the global RNG by :func:`epoch_seed`; or, when ``state.epoch_progress`` says a
      mid-epoch checkpoint of this epoch is being resumed, skip the batches of the epoch's (seeded)
      shuffle already trained on and restore this rank's RNG state from ``rng_states``.
    - Every step: the learning rate is ``lr_factor(global step)`` times each group's base rate.
    - Every ``train_cfg.checkpoint_every_steps`` global steps: record the progress in ``state`` and call
      ``checkpoint()`` (on every rank: it may gather).
    - End: ``state.steps`` holds the global step count, ``state.epoch_progress`` is cleared.

    Args:
        loader: this epoch's (prepared) training loader, from its first batch.
        state: the run state (:class:`~topotransfer.training.run.RunState`: ``steps``, ``epoch_progress``).
        rng_states: every rank's RNG states of the checkpoint being resumed (needed with a progress).

    Returns:
        (mean training loss over the epoch's examples, resumed part included; steps taken by this call).
    """
    progress = state.epoch_progress
    rank = 0 if accelerator is None else accelerator.process_index
    if progress is None:
        torch.manual_seed(epoch_seed(seed, epoch, rank))
        initial, done_before = (0.0, 0), 0
    else:
        from accelerate import skip_first_batches

        loader = skip_first_batches(loader, progress["batches"])
        restore_rng_state(rng_states[rank])
        initial, done_before = (progress["loss_sum"], progress["count"]), progress["batches"]
    first_step, every = state.steps, train_cfg.checkpoint_every_steps

    def lr(i: int) -> float:
        return lr_factor(first_step + i, total_steps, train_cfg)

    def on_step(k: int, loss_sum: float, count: int) -> None:
        if every is not None and (first_step + k) % every == 0:
            state.steps = first_step + k
            state.epoch_progress = {"batches": done_before + k, "loss_sum": loss_sum, "count": count}
            checkpoint()

    loss, steps = train_epoch(model, loader, optimizer, loss_fn, device, max_steps, accelerator=accelerator,
                              lr_factor_fn=lr, on_step=on_step, initial=initial)
    state.steps = first_step + steps
    state.epoch_progress = None
    return loss, steps


class EvalResult(dict):
    """``{"loss": mean loss, "metric": accuracy or MSE, "error": 1 - accuracy or MSE}``."""


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    kind: str,
    device: torch.device | str = "cpu",
    forward_fn: Callable = default_forward,
    accelerator: Any | None = None,
) -> EvalResult:
    """Mean loss and metric on ``loader``; classification uses cross-entropy + accuracy, regression MSE,
    causal_lm the next-token cross-entropy per predicted token and the perplexity.

    Args:
        accelerator: when it spans several processes, ``loader`` is this process's shard and the sums
            (loss, correct, count) are added over processes: every rank returns the same result. Pass
            an *unwrapped* model (a DDP forward is a collective; shards may differ in length). An
            FSDP-sharded model cannot be unwrapped (its forward all-gathers the parameters): the ranks
            then run the same number of forwards, a rank with fewer batches repeating its last one
            without counting it.

    Raises:
        ValueError: an empty dataset, or (FSDP) a rank without any batch while others have some.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    extra = 0
    if is_multi_process(accelerator) and is_sharded(model):
        loader = list(loader)
        counts = accelerator.gather(torch.tensor([len(loader)], device=accelerator.device)).tolist()
        if min(counts) == 0 < max(counts):  # every rank sees the counts, so all raise together
            raise ValueError(f"FSDP evaluation needs a batch on every process (batches per process: {counts})")
        extra = max(counts) - len(loader)
    try:
        for _ in range(extra):  # lockstep forwards (their all-gathers pair with the other ranks')
            forward_fn(model, loader[-1][0].to(device))
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = forward_fn(model, x)
            if kind == "causal_lm":  # per predicted token: position l predicts token l + 1 (labels -100: none)
                target = y[:, 1:]
                loss_sum += float(nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), target.reshape(-1),
                                                              ignore_index=-100, reduction="sum"))
                n += int((target != -100).sum())
                continue
            if kind == "classification":
                loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
                correct += int((out.argmax(-1) == y).sum())
            else:
                loss_sum += float(nn.functional.mse_loss(out, y, reduction="sum")) / out.shape[-1]
            n += len(y)
    finally:
        model.train(was_training)
    if is_multi_process(accelerator):
        loss_sum, correct, n = reduce_sums([loss_sum, correct, n], accelerator)
        correct, n = int(correct), int(n)
    if n == 0:
        raise ValueError("Cannot evaluate on an empty dataset")
    loss = loss_sum / n
    if kind == "classification":
        acc = correct / n
        return EvalResult(loss=loss, metric=acc, error=1.0 - acc)
    if kind == "causal_lm":  # metric and error: the perplexity exp(mean token loss)
        return EvalResult(loss=loss, metric=math.exp(loss), error=math.exp(loss))
    return EvalResult(loss=loss, metric=loss, error=loss)
