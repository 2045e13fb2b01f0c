"""Specific error classes, so callers can catch what they can fix."""

from __future__ import annotations

__all__ = ["NoSitesFoundError", "TopoTransferError", "UnknownSiteError", "UnsupportedModelError"]


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
