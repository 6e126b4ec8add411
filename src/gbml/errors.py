"""Errors raised instead of returning a silently wrong answer."""


class DivergenceError(FloatingPointError):
    """A loss or meta-gradient became NaN or infinite during meta-training."""


class ConvergenceError(RuntimeError):
    """An iterative solve (iMAML's conjugate gradient) stopped short of its tolerance."""


class MissingDataError(FileNotFoundError):
    """A data set's files are neither on disk nor downloadable; the message says how to get them."""


class CorruptDataError(ValueError):
    """A data set's files are present but their content is not what it should be."""
