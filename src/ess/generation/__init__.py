"""Guarded generation: strategic attention and strategic decoding in one cached decode loop."""

from .generator import GenerationError, generate, load_model, next_token_logprobs
from .policy import PolicyError
from .stream import generate_stream
from .types import Generation, Policy, Request, Sampling, StreamEvent, TraceEntry

__all__ = [
    "Generation",
    "GenerationError",
    "Policy",
    "PolicyError",
    "Request",
    "Sampling",
    "StreamEvent",
    "TraceEntry",
    "generate",
    "generate_stream",
    "load_model",
    "next_token_logprobs",
]
