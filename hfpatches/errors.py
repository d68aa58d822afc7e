"""Errors a user can act on. Each names the file, the key, what was expected and found, and the fix."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded faithfully (wrong architecture, missing or misshaped weights,
    a truncated or unsafe file). hfpatches raises it instead of returning random weights."""


class LoadError(CheckpointError):
    """A load that would leave backbone weights missing or misshaped; ``.report`` holds the
    :class:`hfpatches.loading.LoadReport` that explains every key."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
