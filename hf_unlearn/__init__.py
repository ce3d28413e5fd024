"""hf_unlearn: take training instances back out of a LoRA/PEFT fine-tune with influence functions."""

from .config import UnlearningArguments
from .data import ExampleEncoder, TextEncoding, TrainingSet
from .eraser import UnlearningResult, unlearn
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
from .request import UnlearningRequest

__version__ = "0.1.0"

__all__ = [
    "CausalLMTask",
    "ConfigurationError",
    "DataError",
    "ExampleEncoder",
    "InvalidRequestError",
    "NonPositiveCurvatureError",
    "OutputExistsError",
    "SolverError",
    "TextEncoding",
    "TrainingSet",
    "UnlearningArguments",
    "UnlearningError",
    "UnlearningRequest",
    "UnlearningResult",
    "UnlearningTask",
    "unlearn",
]
