"""Run checkpoints: weights (safetensors), optimizer state, and a manifest of the architecture.

The architecture changes during a run, so a checkpoint stores the *ordered insertions* (site name at
the time of insertion + layer config). A loader rebuilds the base model, replays the insertions, and
only then loads the weights with ``strict=True``. Writes are atomic: everything goes into a
temporary directory that is renamed into place, then the ``latest`` pointer is replaced, so an
interrupted save never becomes the latest checkpoint.

``manifest.json`` also holds the SHA-256 of every other file of the checkpoint (``"checksums"``): a
truncated or corrupted file is found before anything is loaded and named in a
:class:`~topotransfer.errors.CorruptCheckpointError`. A checkpoint that replaces ``last`` moves the one
it replaces to ``last.previous`` (one generation), so a corrupt ``last`` still leaves a checkpoint to
resume from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointMismatchError, CorruptCheckpointError
from ..surgery import build_inserted, get_family

__all__ = [
    "check_finite",
    "check_free_space",
    "divergence_error",
    "gather_rng_states",
    "latest_checkpoint",
    "load_checkpoint",
    "load_rng_states",
    "read_manifest",
    "replay_insertions",
    "restore_rng_state",
    "resume_rng_states",
    "save_checkpoint",
    "verify_checkpoint",
    "write_json_atomic",
]

LATEST = "latest"
PREVIOUS = ".previous"  # suffix of the checkpoint a new one of the same name replaced
MANIFEST = "manifest.json"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def check_free_space(output_dir: str | Path, need_bytes: int) -> None:
    """Raise ``OSError`` before training when ``output_dir``'s file system has less than ``need_bytes`` free.

    Called with an estimate of what the run's checkpoints will take, so a nearly full disk fails at
    once instead of at the first checkpoint, hours in.
    """
    free = shutil.disk_usage(output_dir).free
    if free < need_bytes:
        raise OSError(
            f"Output directory {str(output_dir)!r} has {free / 1e6:.1f} MB free; this run's checkpoints need "
            f"about {need_bytes / 1e6:.1f} MB. Free some space or choose another output_dir"
        )


def gather_rng_states(accelerator: Any | None = None) -> list[dict[str, torch.Tensor]]:
    """Every process's RNG states (CPU, and CUDA when present), in rank order; a collective on several
    processes (every rank calls it at the same point)."""
    own = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        own["cuda"] = torch.cuda.get_rng_state()
    if accelerator is None or accelerator.num_processes == 1:
        return [own]
    from accelerate.utils import gather_object

    return gather_object([own])


def load_rng_states(path: str | Path) -> list[dict[str, torch.Tensor]] | None:
    """The per-rank RNG states of a checkpoint (``None`` when it holds none).

    Raises:
        CorruptCheckpointError: ``rng.pt`` differs from its checksum or cannot be read.
    """
    f = Path(path) / "rng.pt"
    if not f.is_file():
        return None
    verify_checkpoint(path, files=("rng.pt",))
    try:
        return torch.load(f, weights_only=True)
    except Exception as e:  # pickle / zip errors of a file written before checksums existed
        raise _corrupt(Path(path), "rng.pt", f"cannot be read ({type(e).__name__}: {e})") from e


def resume_rng_states(path: str | Path, state: dict, num_processes: int) -> list[dict[str, torch.Tensor]] | None:
    """The RNG states a resumed run needs: every rank's, when ``state`` is a mid-epoch checkpoint's, else ``None``.

    Raises:
        CheckpointMismatchError: a mid-epoch checkpoint written by another number of processes (its ranks'
            shards of the epoch and RNG streams cannot be continued by this run's ranks).
    """
    if state.get("epoch_progress") is None:
        return None
    rng_states = load_rng_states(path)
    if rng_states is None or len(rng_states) != num_processes:
        raise CheckpointMismatchError(
            f"{path} was written mid-epoch by {0 if rng_states is None else len(rng_states)} processes; "
            f"resume it with the same number of processes (this run has {num_processes})"
        )
    return rng_states


def restore_rng_state(states: dict[str, torch.Tensor]) -> None:
    """Set this process's RNG states from one entry of :func:`gather_rng_states`."""
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def check_finite(model: nn.Module) -> None:
    """Raise ``FloatingPointError`` if a parameter holds NaN / inf (never checkpoint such weights)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"Non-finite parameters {bad[:5]}; refusing to checkpoint them")


def divergence_error(error: Exception, output_dir: str | Path, epoch: int) -> FloatingPointError:
    """The error a diverged run raises: the cause, the epoch, and the checkpoint that stays ``latest``."""
    last = latest_checkpoint(output_dir)
    where = (
        f"{last} stays the latest checkpoint (continue from it with --resume)"
        if last is not None
        else "no checkpoint was written yet"
    )
    return FloatingPointError(f"{error} (epoch {epoch}). The run diverged; {where}")


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors; ones sharing storage (tied weights) are cloned apart for safetensors."""
    out, seen = {}, set()
    for key, value in tensors.items():
        t = value.detach().contiguous().cpu()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def replay_insertions(model: nn.Module, insertions: list[dict]) -> nn.Module:
    """Re-apply recorded insertions (zero layers) in order; weights come from the checkpoint after."""
    family = get_family(model)
    for ins in insertions:
        family.insert(model, ins["site"], build_inserted(model, ins["site"], ins["layer"]))
    return model


def save_checkpoint(
    output_dir: str | Path,
    name: str,
    model: nn.Module,
    manifest: dict,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict | None = None,
    update_latest: bool = True,
    tensors: dict[str, torch.Tensor] | None = None,
    rng_states: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Atomically write ``output_dir/name/{model.safetensors, optimizer.pt, manifest.json, state.json}``.

    Args:
        manifest: JSON-able architecture description, including ``"insertions"``.
        state: JSON-able training state (epoch, history, frozen parameters...).
        update_latest: point ``output_dir/latest`` at this checkpoint (False for side copies like "best").
        tensors: the weights to save (default: all of ``model.state_dict()``). A recipe that never
            changes part of the model (a frozen pretrained backbone) saves only the rest and loads it
            back with ``load_checkpoint(..., keys=...)`` into a model rebuilt from the same base.
        rng_states: every rank's RNG states (:func:`gather_rng_states`), for a mid-epoch checkpoint.

    Returns:
        The checkpoint directory (also recorded in ``output_dir/latest``). ``manifest.json`` is written
        with a ``"checksums"`` entry (file name -> SHA-256) added to ``manifest``.
    """
    output_dir = Path(output_dir)
    final = output_dir / name
    tmp = output_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_cpu_tensors(model.state_dict() if tensors is None else tensors), str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if rng_states is not None:
        torch.save(rng_states, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state or {}, indent=2, default=float))
    checksums = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({**manifest, "checksums": checksums}, indent=2, default=float))
    if final.exists() and update_latest:  # the replaced checkpoint stays as `<name>.previous` (one generation)
        previous = output_dir / f"{name}{PREVIOUS}"
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(final, previous)
        os.replace(tmp, final)
    elif final.exists():  # a side copy keeps its previous generation too: a run killed after writing the
        # new copy but before the `last` that records its epoch resumes with the copy `last` knows (side_copy)
        previous = output_dir / f"{name}{PREVIOUS}"
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(final, previous)
        os.replace(tmp, final)
    else:
        os.replace(tmp, final)
    if not update_latest:
        return final
    pointer = output_dir / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(name)
    os.replace(pointer, output_dir / LATEST)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The directory named by ``output_dir/latest``, or ``None`` when there is no complete checkpoint.

    A run killed inside :func:`save_checkpoint`, between moving ``last`` to ``last.previous`` and moving the
    new checkpoint into ``last``, leaves ``latest`` naming a directory that is not there; the checkpoint it
    named before that save is then ``<name>.previous``, which is returned instead.
    """
    pointer = Path(output_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    if (path / "model.safetensors").is_file():
        return path
    previous = path.with_name(path.name + PREVIOUS)
    return previous if not path.exists() and (previous / "model.safetensors").is_file() else None


def side_copy(output_dir: str | Path, name: str, epoch: int | None) -> Path | None:
    """The side copy ``output_dir/name`` (e.g. ``best``) written at ``epoch``, or the generation it replaced
    (``<name>.previous``) when that one is; ``None`` when neither is.

    A side copy is written just before ``last``: a run stopped between the two resumes from a ``last`` whose
    state names the epoch of the copy before (``<name>.previous``), not of the newest one.
    """
    if epoch is None:
        return None
    for path in (Path(output_dir) / name, Path(output_dir) / f"{name}{PREVIOUS}"):
        state = path / "state.json"
        if (path / "model.safetensors").is_file() and state.is_file() and json.loads(state.read_text()).get("epoch") == epoch:
            return path
    return None


def checkpoint_disk_bytes(trained_bytes: int) -> int:
    """Disk a run's checkpoints may take, from the bytes of its trained weights: ``last``, ``last.previous`` and
    the one being written (weights + two Adam moments each: 9x) and the side copy ``best``, ``best.previous`` and
    the one being written (weights: 3x)."""
    return 12 * trained_bytes


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    keys: set[str] | None = None,
) -> dict:
    """Load weights into ``model`` (already rebuilt with :func:`replay_insertions`) and optimizer state.

    Args:
        keys: the checkpoint holds exactly these keys of ``model.state_dict()`` (saved with
            ``save_checkpoint(..., tensors=...)``); the other weights must already be in place. Default:
            it holds all of them (strict).

    Returns:
        ``{"manifest": ..., "state": ...}`` as saved (``manifest`` with its ``"checksums"``).

    Raises:
        CorruptCheckpointError: a file of the checkpoint is missing, differs from its checksum or cannot be read.
        CheckpointMismatchError: the weights do not fit ``model`` (missing / unexpected keys, other shapes).
    """
    path = Path(path)
    files = ["model.safetensors", "state.json"] + (["optimizer.pt"] if optimizer is not None else [])
    manifest = verify_checkpoint(path, files=files)
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors' own error type, or OSError: a checkpoint written before checksums
        raise _corrupt(path, "model.safetensors", f"cannot be read ({e})") from e
    ref = next(model.parameters())
    try:
        missing, unexpected = model.load_state_dict({k: v.to(ref.device) for k, v in tensors.items()}, strict=False)
    except RuntimeError as e:  # shapes differ: torch lists every "size mismatch for ..." on its own line
        sizes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise CheckpointMismatchError(
            f"Checkpoint {path} was written for another architecture: {'; '.join(sizes[:3]) or e}. Resume with the "
            "config that wrote it (its config.yaml), or start a new run in another output_dir"
        ) from e
    if keys is not None:
        missing = sorted(set(keys) - set(tensors))
        unexpected = sorted(set(unexpected) | (set(tensors) - set(keys)))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"Checkpoint {path} does not match the rebuilt model: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}. Resume with the config that wrote it (its config.yaml), or start "
            "a new run in another output_dir"
        )
    if optimizer is not None and (path / "optimizer.pt").is_file():
        try:
            saved = torch.load(path / "optimizer.pt", weights_only=True, map_location=ref.device)
        except Exception as e:  # zip / pickle errors of a file written before checksums
            raise _corrupt(path, "optimizer.pt", f"cannot be read ({type(e).__name__}: {e})") from e
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as e:
            raise CheckpointMismatchError(
                f"Checkpoint {path}: its optimizer state does not fit this run's optimizer ({e}); resume with the "
                "config that wrote it (its config.yaml)"
            ) from e
    return {"manifest": manifest, "state": _read_json(path, "state.json")}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _corrupt(path: Path, file: str, what: str) -> CorruptCheckpointError:
    """The error naming the bad file, its checkpoint, and what is left to continue from."""
    out, name = path.parent, path.name
    hints = []
    previous = out / f"{name}{PREVIOUS}"
    if not name.endswith(PREVIOUS) and (previous / MANIFEST).is_file():
        hints.append(f"resume from the previous checkpoint with --resume-from {previous.name}")
    if name != "best" and (out / "best" / "model.safetensors").is_file():
        hints.append(f"the best model so far is in {out / 'best'}")
    if not hints:
        hints.append("no other checkpoint is left: start the run again with --overwrite")
    return CorruptCheckpointError(f"Checkpoint {path} is corrupt: {file} {what}; {'; '.join(hints)}")


def _read_json(path: Path, file: str) -> dict:
    try:
        value = json.loads((path / file).read_text())
    except FileNotFoundError as e:
        raise _corrupt(path, file, "is missing") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, file, f"is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise _corrupt(path, file, "does not hold a JSON object")
    return value


def read_manifest(path: str | Path) -> dict:
    """The manifest of checkpoint ``path`` (architecture, insertions, ``"checksums"``).

    Raises:
        CorruptCheckpointError: ``manifest.json`` is missing or not valid JSON.
    """
    return _read_json(Path(path), MANIFEST)


def verify_checkpoint(path: str | Path, files: Sequence[str] | None = None) -> dict:
    """Check the files of checkpoint ``path`` against the SHA-256 sums in its manifest; returns the manifest.

    Args:
        files: the files to check (default: every file the manifest lists). A file the manifest does not list
            (a checkpoint written before checksums) is not checked here; reading it then finds the damage.

    Raises:
        CorruptCheckpointError: the manifest is unreadable, or a listed file is missing or differs from its sum.
    """
    path = Path(path)
    manifest = read_manifest(path)
    sums = manifest.get("checksums") or {}
    for file in sums if files is None else files:
        if file not in sums:
            continue
        f = path / file
        if not f.is_file():
            raise _corrupt(path, file, "is missing")
        if _sha256(f) != sums[file]:
            raise _corrupt(path, file, f"does not match its checksum in {MANIFEST} (truncated or overwritten?)")
    return manifest
