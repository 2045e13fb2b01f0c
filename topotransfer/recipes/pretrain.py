"""Pretrain a small ViT from scratch and save it as a backbone for ``topotransfer adapt``.

    load the task (any image task: mnist, digits, hf:..., imagefolder:...)
    -> ViTConfig from model.{width, depth, num_heads, patch_size} and the images' size / channels
    -> train train.epochs epochs (AdamW, train.lr_schedule) on the training split, validate every epoch
       (the run skeleton: output_dir refused if it holds another run, resumable checkpoints in output_dir/last)
    -> test error -> output_dir/{config.yaml, results.json, history.json, last/, model/}

``output_dir/model`` is a ``save_pretrained`` directory (``config.json``, ``model.safetensors``, the
class names as ``id2label``) with its image processor (``preprocessor_config.json``: size, mean / std), so
``model.name_or_path=<output_dir>/model`` works for ``topotransfer adapt`` and ``from_pretrained``.
The images are normalised with mean = std = 0.5 per channel (the ``ViTImageProcessor`` defaults), and
adapt reads the same values back from the processor config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, RunConfig, to_dict
from ..data import load_task, source_options
from ..models.build import build_model
from ..models.hf import ImageNormalization
from ..preprocess import prepare_task
from ..requirements import check_requirements
from ..training.run import Run, RunState

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "PretrainState", "run_pretrain", "save_backbone"]

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


@dataclass
class PretrainState(RunState):
    """The run state of a pretrain run: the skeleton's (epoch, steps, history, timings) and nothing more."""


def run_pretrain(cfg: RunConfig, accelerator=None, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a ViT from scratch on ``cfg.data.name`` and save it to ``output_dir/model``.

    Runs on one process or under ``accelerate launch`` (DDP: each rank trains on every N-th batch of the
    epoch's shared shuffle; validation and test sums are reduced over the ranks; the main process writes).
    The run skeleton (:class:`~topotransfer.training.run.Run`) owns the output directory, the epochs, the
    resumable checkpoints (``output_dir/last``) and ``results.json``.

    Args:
        cfg: the run configuration (``task: pretrain``).
        accelerator: an ``accelerate.Accelerator`` to run under (default: one built from ``cfg``).
        resume: continue from ``output_dir/latest``.
        overwrite: replace the run that ``output_dir`` holds (otherwise it is refused).

    Returns:
        The results (also in ``output_dir/results.json``): test / validation error, parameters, epochs, the
        backbone directory, the wall time of each phase.

    Raises:
        ConfigError: not ``model.family=vit``, a width the heads do not divide, or a task without images.
        RunExistsError: ``output_dir`` holds another run and neither ``resume`` nor ``overwrite`` is set.
        NoCheckpointError: ``resume`` but ``output_dir`` holds no checkpoint.
        FloatingPointError: the training loss diverged.
    """
    check_requirements(cfg)
    run = Run(cfg, resume=resume, overwrite=overwrite, accelerator=accelerator)
    task, norm = _load_images(cfg)
    model = _build_vit(cfg, task).to(run.device)
    run.write_config()
    optimizer, state = _start_or_resume(run, model)
    t = cfg.train
    run.start(model, optimizer, {"format": 1, "recipe": "pretrain", "model": to_dict(cfg.model), "insertions": []},
              state, train_set=task.train, val_batches=run.batches(task.val, t.batch_size), epochs=t.epochs,
              kind="classification", loss=nn.CrossEntropyLoss(), desc="pretrain")
    while state.epoch < t.epochs:
        if run.train_epoch() is None:  # train.max_steps spent
            break
        if run.checkpoint_due():
            run.checkpoint()
    results = _results(run, task)
    run.finish(results, export=lambda out: save_backbone(run.net, norm, out / "model"))
    return results


def _start_or_resume(run: Run, model: nn.Module) -> tuple[torch.optim.Optimizer, PretrainState]:
    """AdamW over every parameter, and a fresh state, or both (with the weights) from ``output_dir/latest``."""
    t = run.cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    ckpt = run.checkpoint_to_resume()
    if ckpt is None:
        return optimizer, PretrainState()
    state = run.read_state(ckpt, PretrainState)
    run.load_weights(ckpt, model, optimizer)
    return optimizer, state


def _results(run: Run, task) -> dict:
    """Validation and test error of the trained backbone, with its size and the run's record."""
    model, state, bs = run.net.eval(), run.state, run.cfg.train.batch_size
    val = run.evaluate(model, run.val_batches)
    test = run.evaluate(model, run.batches(task.test, bs)) if len(task.test) else {"loss": None, "error": None}
    return {
        "recipe": "pretrain", "task": task.name, "seed": run.cfg.seed, "num_train": len(task.train),
        "num_labels": task.num_outputs, "image_size": task.input_shape[-1], "num_channels": task.input_shape[0],
        "val_error": val["error"], "val_loss": val["loss"], "test_error": test["error"], "test_loss": test["loss"],
        "params": sum(p.numel() for p in model.parameters()), "epochs": state.epoch, "steps": state.steps,
        "history": state.history, "backbone": str(run.out / "model"), "num_processes": run.acc.num_processes,
        "wall_time": run.elapsed(),
    }


