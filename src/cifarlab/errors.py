"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class CifarlabError(Exception):
    """Base class: the message says which file or value, what was expected, and what to do."""


class DataError(CifarlabError):
    """The dataset is missing, damaged or not CIFAR-10."""


class DeclarationError(CifarlabError):
    """An architecture declaration that cannot be built."""


class CheckpointError(CifarlabError):
    """A checkpoint that is missing, damaged, unsafe or does not match what was asked."""


class ImageError(CifarlabError):
    """An image file that cannot be used for prediction or visualization."""


class TrainingError(CifarlabError):
    """Training cannot go on (e.g. the loss became NaN)."""
