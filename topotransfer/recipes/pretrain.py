"""Pretrain a small ViT from scratch and save it as a backbone for ``topotransfer adapt``.

    load the task (any image task: mnist, digits, hf:..., imagefolder:...)
    -> ViTConfig from model.{width, depth, num_heads, patch_size} and the images' size / channels
    -> train train.epochs epochs (AdamW, train.lr_schedule) on the training split, validate every epoch
    -> test error -> output_dir/{config.yaml, results.json, history.json, model/}

``output_dir/model`` is a ``save_pretrained`` directory (``config.json``, ``model.safetensors``, the
class names as ``id2label``) with its image processor (``preprocessor_config.json``: size, mean / std), so
``model.name_or_path=<output_dir>/model`` works for ``topotransfer adapt`` and ``from_pretrained``.
The images are normalised with mean = std = 0.5 per channel (the ``ViTImageProcessor`` defaults), and
adapt reads the same values back from the processor config.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from ..config import ConfigError, RunConfig, to_dict
from ..data import load_task, source_options
from ..models.build import build_model
from ..models.hf import ImageNormalization
from ..preprocess import prepare_task
from ..requirements import check_requirements
from ..training.checkpoint import write_json_atomic
from ..training.distributed import build_accelerator, shard
from ..training.loop import evaluate, make_loader, train_run_epoch
from ..training.run import RunState

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "run_pretrain", "save_backbone"]

IMAGE_MEAN, IMAGE_STD = 0.5, 0.5  # ViTImageProcessor's defaults: x in [0, 1] -> [-1, 1]


def _load_images(cfg: RunConfig):
    """The task's images at ``data.image_size`` (or their own size), normalised, training split augmented."""
    d = cfg.data
    user_data = d.name.strip().startswith(("hf:", "imagefolder:"))
    task = load_task(d.name, seed=cfg.seed, num_train=d.num_train, num_val=d.num_val, num_test=d.num_test,
                     image_size=d.image_size, **(source_options(d) if user_data else {}))
    if task.kind != "classification" or len(task.input_shape) != 3:
        raise ConfigError(f"pretrain needs an image classification task; {d.name!r} has inputs of shape "
                          f"{task.input_shape} ({task.modality})")
    channels, side = task.input_shape[0], task.input_shape[-1]
    norm = ImageNormalization((IMAGE_MEAN,) * channels, (IMAGE_STD,) * channels, "pretrain")
    return prepare_task(task, side, channels, norm, d.augment), norm


def _build_vit(cfg: RunConfig, task) -> nn.Module:
    """A ViTForImageClassification from a ViTConfig (:func:`~topotransfer.models.build.build_model`)."""
    if cfg.model.family != "vit":
        raise ConfigError(f"pretrain builds a ViT: set model.family=vit (got {cfg.model.family!r})")
    if cfg.model.width % cfg.model.num_heads:
        raise ConfigError(f"model.width={cfg.model.width} is not divisible by model.num_heads={cfg.model.num_heads}")
    model = build_model(cfg.model, task.input_shape, task.num_outputs)
    names = task.class_names or [str(i) for i in range(task.num_outputs)]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    return model


def save_backbone(model: nn.Module, norm: ImageNormalization, directory: str | Path) -> Path:
    """``save_pretrained`` of the model and of a ``ViTImageProcessor`` with its size and mean / std."""
    import transformers

    # transformers 5.x: ViTImageProcessor wants torchvision and falls back (with a warning) to the PIL one
    processor_cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    directory = Path(directory)
    side = int(model.config.image_size)
    model.save_pretrained(directory)
    processor = processor_cls(do_resize=True, size={"height": side, "width": side}, do_rescale=True,
                                  rescale_factor=1 / 255, do_normalize=True, image_mean=list(norm.mean),
                                  image_std=list(norm.std))
    processor.save_pretrained(directory)
    return directory


def run_pretrain(cfg: RunConfig, accelerator=None) -> dict:
    """Train a ViT from scratch on ``cfg.data.name`` and save it to ``output_dir/model``.

    Runs on one process or under ``accelerate launch`` (DDP: each rank trains on every N-th batch of the
    epoch's shared shuffle; validation and test sums are reduced over the ranks; the main process writes).

    Returns:
        The results (also in ``output_dir/results.json``): test / validation error, parameters, epochs, the
        backbone directory.

    Raises:
        ConfigError: not ``model.family=vit``, a width the heads do not divide, or a task without images.
        FloatingPointError: the training loss diverged.
    """
    from ..recipes.grow import check_output_dir

    check_requirements(cfg)
    out = check_output_dir(cfg.output_dir)
    acc = accelerator if accelerator is not None else build_accelerator(cfg.device, cfg.train.mixed_precision)
    torch.manual_seed(cfg.seed)
    task, norm = _load_images(cfg)
    model = _build_vit(cfg, task).to(acc.device)
    if acc.is_main_process:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    wrapped, optimizer = acc.prepare(model, optimizer)
    loss_fn = nn.CrossEntropyLoss()
    val_batches = shard(_batches(task.val, t.batch_size), acc)
    steps_per_epoch = math.ceil(math.ceil(len(task.train) / t.batch_size) / acc.num_processes)
    total_steps = t.epochs * steps_per_epoch if t.max_steps is None else min(t.epochs * steps_per_epoch, t.max_steps)
    state = RunState()
    started = time.perf_counter()
    for epoch in range(t.epochs):
        left = None if t.max_steps is None else t.max_steps - state.steps
        if left is not None and left <= 0:
            break
        loader = acc.prepare_data_loader(make_loader(task.train, t.batch_size, shuffle=True,
                                                     seed=cfg.seed * 100_003 + epoch))
        train_loss, _ = train_run_epoch(wrapped, loader, optimizer, loss_fn, acc.device, left, accelerator=acc,
                                        state=state, seed=cfg.seed, epoch=epoch, total_steps=total_steps,
                                        train_cfg=t, rng_states=None, checkpoint=lambda: None)
        val = evaluate(model, val_batches, "classification", acc.device, accelerator=acc)
        state.epoch = epoch + 1
        state.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
                                 "val_error": val["error"], "steps": state.steps,
                                 "time": time.perf_counter() - started})
    model = acc.unwrap_model(wrapped).eval()
    val = evaluate(model, val_batches, "classification", acc.device, accelerator=acc)
    test = {"loss": None, "error": None}
    if len(task.test):
        test = evaluate(model, shard(_batches(task.test, t.batch_size), acc), "classification", acc.device,
                        accelerator=acc)
    results = {
        "recipe": "pretrain", "task": task.name, "seed": cfg.seed, "num_train": len(task.train),
        "num_labels": task.num_outputs, "image_size": task.input_shape[-1], "num_channels": task.input_shape[0],
        "val_error": val["error"], "val_loss": val["loss"], "test_error": test["error"], "test_loss": test["loss"],
        "params": sum(p.numel() for p in model.parameters()), "epochs": state.epoch, "steps": state.steps,
        "history": state.history, "backbone": str(out / "model"), "num_processes": acc.num_processes,
        "wall_time": time.perf_counter() - started,
    }
    if acc.is_main_process:
        save_backbone(model, norm, out / "model")
        write_json_atomic(out / "history.json", {"epochs": state.history})
        write_json_atomic(out / "results.json", results)
    acc.wait_for_everyone()
    return results


def _batches(dataset, batch_size: int) -> list:
    """Every batch of ``dataset`` in order (validation / test)."""
    return [tuple(b) for b in make_loader(dataset, batch_size)] if len(dataset) else []
