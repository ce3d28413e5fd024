"""hf_unlearn: take training instances back out of a LoRA/PEFT fine-tune with influence functions."""

from .callback import UnlearningCallback
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
from .trainer import UnlearnTrainer

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
    "UnlearningCallback",
    "UnlearningError",
    "UnlearningRequest",
    "UnlearningResult",
    "UnlearningTask",
    "UnlearnTrainer",
    "unlearn",
]
