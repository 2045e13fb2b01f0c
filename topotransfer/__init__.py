"""topotransfer: where a network needs more depth, and how to initialise the new layer.

The topological derivative of the loss with respect to inserting a residual layer at every site of a
network (Krishnanunni, Bui-Thanh, Dawson, 2025), its eigenvector initialisation, and the surgery that
inserts the layer into MLPs, CNNs and Hugging Face transformers.

Names are imported lazily so that ``import topotransfer`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterMismatchError": "errors",
    "BertFamily": "surgery",
    "CheckpointMismatchError": "errors",
    "ConvergenceWarning": "errors",
    "EmptyDatasetError": "errors",
    "ImageSizeError": "errors",
    "LabelCountMismatchError": "errors",
    "ModalityMismatchError": "errors",
    "TopoAdapter": "adapter",
    "ViTFamily": "surgery",
    "load_adapter": "adapter",
    "load_backbone": "models.hf",
    "load_tokenizer": "models.hf",
    "packaged_model_dir": "models.hf",
    "load_merged": "adapter",
    "merge_and_save": "adapter",
    "save_adapter": "adapter",
    "DEFAULT_EPSILONS": "insertion",
    "EigenResult": "eigen",
    "FAMILIES": "surgery",
    "LineSearchResult": "insertion",
    "NoSitesFoundError": "errors",
    "ResidualCNN": "models",
    "ResidualMLP": "models",
    "Site": "surgery.base",
    "SiteResult": "derivative.topological",
    "TopoBlock": "surgery.hf",
    "TopoConv2d": "layers",
    "TopoLayer": "layers",
    "TopoTransferError": "errors",
    "UnknownSiteError": "errors",
    "UnsupportedModelError": "errors",
    "compute_site_statistics": "derivative.topological",
    "dense_top_eigenpairs": "eigen",
    "evaluate_loss": "insertion",
    "get_family": "surgery",
    "insert_layer": "insertion",
    "fill_inactive_rows": "insertion",
    "lanczos_top_eigenpairs": "eigen",
    "line_search_epsilon": "insertion",
    "select_direction": "eigen",
    "topo_activation": "layers",
    "topological_derivative": "derivative.topological",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'topotransfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover
    from .adapter import TopoAdapter, load_adapter, load_merged, merge_and_save, save_adapter
    from .derivative.topological import SiteResult, compute_site_statistics, topological_derivative
    from .eigen import EigenResult, dense_top_eigenpairs, lanczos_top_eigenpairs, select_direction
    from .errors import (
        AdapterMismatchError,
        CheckpointMismatchError,
        ConvergenceWarning,
        EmptyDatasetError,
        ImageSizeError,
        LabelCountMismatchError,
        ModalityMismatchError,
        NoSitesFoundError,
        TopoTransferError,
        UnknownSiteError,
        UnsupportedModelError,
    )
    from .insertion import (
        DEFAULT_EPSILONS,
        LineSearchResult,
        evaluate_loss,
        fill_inactive_rows,
        insert_layer,
        line_search_epsilon,
    )
    from .layers import TopoConv2d, TopoLayer, topo_activation
    from .models import ResidualCNN, ResidualMLP
    from .models.hf import load_backbone, load_tokenizer, packaged_model_dir
    from .surgery import FAMILIES, BertFamily, ViTFamily, get_family
    from .surgery.base import Site
    from .surgery.hf import TopoBlock
