"""hf_unlearn: take training instances back out of a LoRA/PEFT fine-tune with influence functions."""

from .config import UnlearningArguments
from .curvature.kfac import KFACFactors
from .curvature.nystrom import NystromSketch
from .data import ExampleEncoder, TextEncoding, TrainingSet
from .eraser import UnlearningResult, prepare_curvature, sketch_curvature, unlearn
from .errors import (
    ConfigurationError,
    DataError,
    InvalidRequestError,
    NonPositiveCurvatureError,
    OutputExistsError,
    SolverError,
    UnlearningError,
)
from .objective import CausalLMTask, UnlearningTask
from .pipeline import UnlearnedAdapter, UnlearnPaths, unlearn_adapter_directory
from .request import UnlearningRequest
from .stats import UnlearningStats

__version__ = "0.1.0"

_TRAINER_NAMES = {
    "UnlearnTrainer": ".trainer",
    "UnlearningCallback": ".callback",
    "CurvatureCaptureCallback": ".capture",
    "L2RegularizationCallback": ".regularization",
}


def __getattr__(name):
    """`UnlearnTrainer` and the callbacks import `transformers.Trainer`; load them on first use."""
    if name in _TRAINER_NAMES:
        import importlib

        return getattr(importlib.import_module(_TRAINER_NAMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_TRAINER_NAMES])


__all__ = [
    "CausalLMTask",
    "ConfigurationError",
    "CurvatureCaptureCallback",
    "DataError",
    "ExampleEncoder",
    "InvalidRequestError",
    "KFACFactors",
    "NystromSketch",
    "L2RegularizationCallback",
    "NonPositiveCurvatureError",
    "OutputExistsError",
    "SolverError",
    "TextEncoding",
    "TrainingSet",
    "UnlearningArguments",
    "UnlearningCallback",
    "UnlearningError",
    "UnlearningRequest",
    "UnlearningResult",
    "UnlearningStats",
    "prepare_curvature",
    "UnlearningTask",
    "UnlearnTrainer",
    "UnlearnedAdapter",
    "UnlearnPaths",
    "sketch_curvature",
    "unlearn",
    "unlearn_adapter_directory",
]
