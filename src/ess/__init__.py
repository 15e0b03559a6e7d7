"""ess: explicit safety signals for causal LMs (Li & Kim, ICML 2025).

from ess import ESSModel, generate, Request
model = ESSModel.from_pretrained("runs/ess/final")
answer = generate(model, [Request([{"role": "user", "content": "..."}])])[0]
"""

from .calibration import CalibrationConfig, calibrate_response_threshold
from .classify import Verdict, classify
from .config import ESSConfig, TrainConfig
from .data import DataError, Example, load_examples, load_prompts
from .generation import (
    Generation,
    Policy,
    Request,
    Sampling,
    StreamEvent,
    TraceEntry,
    generate,
    generate_stream,
    load_model,
)
from .hub import DEFAULT_MODEL
from .model import ESSModel
from .training import train

__version__ = "0.1.0"

__all__ = [
    "CalibrationConfig",
    "DEFAULT_MODEL",
    "DataError",
    "ESSConfig",
    "ESSModel",
    "Example",
    "Generation",
    "Policy",
    "Request",
    "Sampling",
    "StreamEvent",
    "TrainConfig",
    "TraceEntry",
    "Verdict",
    "calibrate_response_threshold",
    "classify",
    "generate",
    "generate_stream",
    "load_examples",
    "load_model",
    "load_prompts",
    "train",
]
