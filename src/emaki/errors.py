"""User-facing errors.

Every problem a user can cause (a bad file, an unknown sampler, a size that is not a multiple of 8)
is raised as an :class:`EmakiError` subclass whose message is one line naming the problem and, where
it helps, what is accepted. The CLI prints that line and exits with status 2, never a traceback.
"""

from __future__ import annotations


class EmakiError(Exception):
    """Base class of errors whose message is meant for the user."""


class ModelLoadError(EmakiError):
    """A model file or folder could not be loaded (missing, corrupt, wrong family, bad keys)."""


class PickleRefusedError(ModelLoadError):
    """A pickled checkpoint was given without the explicit opt-in."""


class InvalidRequestError(EmakiError):
    """A generation request has a parameter outside what is accepted."""


class InfotextError(EmakiError):
    """Generation parameters could not be read from an image or text."""


class InterruptedError_(EmakiError):
    """Generation was interrupted by the caller (raised from a progress callback)."""


class ModelSaveError(EmakiError):
    """A model could not be written (destination exists, folder missing, unsupported dtype)."""
