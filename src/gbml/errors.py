"""Errors raised instead of returning a silently wrong answer."""


class DivergenceError(FloatingPointError):
    """A loss or meta-gradient became NaN or infinite during meta-training."""


class ConvergenceError(RuntimeError):
    """An iterative solve (iMAML's conjugate gradient) stopped short of its tolerance."""
