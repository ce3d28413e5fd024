"""Domain exceptions. Every message says what went wrong and what to do about it."""


class UnlearningError(Exception):
    """Base class of every error hf_unlearn raises on purpose."""

    exit_code = 1


class InvalidRequestError(UnlearningError, ValueError):
    """The unlearning request is malformed or does not match the training data."""

    exit_code = 2


class DataError(UnlearningError, ValueError):
    """A data file or a training row cannot be used."""

    exit_code = 3


class ConfigurationError(UnlearningError, ValueError):
    """An argument, model or adapter cannot be used as given."""

    exit_code = 4


class SolverError(UnlearningError, RuntimeError):
    """The linear solve failed (non-positive curvature, no convergence, non-finite values)."""

    exit_code = 5


class NonPositiveCurvatureError(SolverError):
    """`C + λI` is not positive definite along some direction: raise the damping."""

    def __init__(self, message: str, suggested_damping: float):
        super().__init__(message)
        self.suggested_damping = suggested_damping


class OutputExistsError(UnlearningError, FileExistsError):
    """The output directory exists and is not empty."""

    exit_code = 6
