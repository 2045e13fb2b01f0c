"""Specific error classes, so callers can catch what they can fix."""

from __future__ import annotations

__all__ = [
    "AdapterMismatchError",
    "BadExampleError",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "ConvergenceWarning",
    "DatasetColumnError",
    "EmptyDatasetError",
    "ImageSizeError",
    "LabelCountMismatchError",
    "ModalityMismatchError",
    "NoCheckpointError",
    "NoSitesFoundError",
    "RunExistsError",
    "TopoTransferError",
    "UnknownSiteError",
    "UnsupportedModelError",
]


class TopoTransferError(Exception):
    """Base class of topotransfer's errors."""


class UnsupportedModelError(TopoTransferError, TypeError):
    """The model belongs to no registered family (the message lists the supported ones)."""


class NoSitesFoundError(TopoTransferError, ValueError):
    """The model's family was found but it exposes no site where a layer can be inserted."""


class UnknownSiteError(TopoTransferError, KeyError):
    """A site name that the model does not have (the message lists the valid ones)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AdapterMismatchError(TopoTransferError, ValueError):
    """A saved adapter does not fit the base model it is applied to (model type, width or depth differ)."""


class LabelCountMismatchError(TopoTransferError, ValueError):
    """The number of classes of a model, a dataset and an adapter's head disagree."""


class CheckpointMismatchError(TopoTransferError, ValueError):
    """Saved weights do not match the rebuilt architecture (the message lists missing / unexpected keys)."""


class CorruptCheckpointError(TopoTransferError, ValueError):
    """A checkpoint file that cannot be read or whose checksum differs from its manifest (the message names it)."""


class NoCheckpointError(TopoTransferError, FileNotFoundError):
    """``--resume`` was asked for but the output directory holds no checkpoint to resume from."""


class RunExistsError(TopoTransferError, FileExistsError):
    """The output directory already holds another run's results or checkpoints (use ``--resume`` or ``--overwrite``)."""


class ImageSizeError(TopoTransferError, ValueError):
    """Images that cannot be brought to the backbone's input size or channel count."""


class ModalityMismatchError(TopoTransferError, ValueError):
    """A task whose inputs the backbone cannot take: text for an image model, images for a text model."""


class EmptyDatasetError(TopoTransferError, ValueError):
    """A dataset split that the run needs has no examples."""


class DatasetColumnError(TopoTransferError, ValueError):
    """A dataset whose input or label column cannot be found or is ambiguous (the message lists the columns)."""


class BadExampleError(TopoTransferError, ValueError):
    """An example that cannot be read (a corrupt image, a missing text): the message names its file or index."""


class ConvergenceWarning(UserWarning):
    """An iterative eigen-solve stopped before meeting its tolerance (the message names the site)."""
