"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""
import reprlib


def short_repr(value, limit: int = 80) -> str:
    """repr() for error messages, bounded: hostile values (huge, deeply nested) never blow up a message."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlevel = 3
    return r.repr(value)[:limit]


class CifarlabError(Exception):
    """Base class: the message says which file or value, what was expected, and what to do."""


class DataError(CifarlabError):
    """The dataset is missing, damaged or not what it claims to be."""


class DeclarationError(CifarlabError):
    """An architecture declaration that cannot be built."""


class CheckpointError(CifarlabError):
    """A checkpoint that is missing, damaged, unsafe or does not match what was asked."""


class ImageError(CifarlabError):
    """An image file that cannot be used for prediction or visualization."""


class TrainingError(CifarlabError):
    """Training cannot go on (e.g. the loss became NaN)."""


class ReportError(CifarlabError):
    """The report cannot be built (no run folder, no checkpoint, unreadable results)."""


class VisualizationError(CifarlabError):
    """A visualization that cannot be made (bad image index, unknown method, unusable output folder)."""

