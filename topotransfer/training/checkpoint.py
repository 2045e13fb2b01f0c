"""Run checkpoints: weights (safetensors), optimizer state, and a manifest of the architecture.

The architecture changes during a run, so a checkpoint stores the *ordered insertions* (site name at
the time of insertion + layer config). A loader rebuilds the base model, replays the insertions, and
only then loads the weights with ``strict=True``. Writes are atomic: everything goes into a
temporary directory that is renamed into place, then the ``latest`` pointer is replaced, so an
interrupted save never becomes the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..layers import build_topo_layer
from ..surgery import get_family

__all__ = ["latest_checkpoint", "load_checkpoint", "replay_insertions", "save_checkpoint", "write_json_atomic"]

LATEST = "latest"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def replay_insertions(model: nn.Module, insertions: list[dict]) -> nn.Module:
    """Re-apply recorded insertions (zero layers) in order; weights come from the checkpoint after."""
    family = get_family(model)
    for ins in insertions:
        family.insert(model, ins["site"], build_topo_layer(ins["layer"]))
    return model


def save_checkpoint(
    output_dir: str | Path,
    name: str,
    model: nn.Module,
    manifest: dict,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict | None = None,
    update_latest: bool = True,
) -> Path:
    """Atomically write ``output_dir/name/{model.safetensors, optimizer.pt, manifest.json, state.json}``.

    Args:
        manifest: JSON-able architecture description, including ``"insertions"``.
        state: JSON-able training state (epoch, history, frozen parameters...).
        update_latest: point ``output_dir/latest`` at this checkpoint (False for side copies like "best").

    Returns:
        The checkpoint directory (also recorded in ``output_dir/latest``).
    """
    output_dir = Path(output_dir)
    final = output_dir / name
    tmp = output_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=float))
    (tmp / "state.json").write_text(json.dumps(state or {}, indent=2, default=float))
    if final.exists():  # replace an older checkpoint of the same name: move aside, then delete
        trash = output_dir / f".old-{name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    if not update_latest:
        return final
    pointer = output_dir / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(name)
    os.replace(pointer, output_dir / LATEST)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The directory named by ``output_dir/latest``, or ``None`` when there is no complete checkpoint."""
    pointer = Path(output_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    return path if (path / "model.safetensors").is_file() else None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights into ``model`` (already rebuilt with :func:`replay_insertions`) and optimizer state.

    Returns:
        ``{"manifest": ..., "state": ...}`` as saved.
    """
    path = Path(path)
    tensors = load_file(str(path / "model.safetensors"))
    ref = next(model.parameters())
    missing, unexpected = model.load_state_dict({k: v.to(ref.device) for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"Checkpoint {path} does not match the rebuilt model: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]} (was the architecture manifest replayed?)"
        )
    if optimizer is not None and (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location=ref.device))
    return {
        "manifest": json.loads((path / "manifest.json").read_text()),
        "state": json.loads((path / "state.json").read_text()),
    }
