"""Exception types of GenRefocus.

Every error raised for bad user input is a :class:`GenRefocusInputError` (also a ``ValueError``),
so callers can catch one type; errors about missing or incompatible weights are
:class:`GenRefocusModelError` (also a ``RuntimeError``).
"""

from __future__ import annotations

__all__ = ["GenRefocusError", "GenRefocusInputError", "GenRefocusModelError"]


class GenRefocusError(Exception):
    """Base class of every GenRefocus error."""


class GenRefocusInputError(GenRefocusError, ValueError):
    """A parameter value, tensor shape or file content that the caller can fix."""


class GenRefocusModelError(GenRefocusError, RuntimeError):
    """Missing, corrupt or incompatible model weights."""
