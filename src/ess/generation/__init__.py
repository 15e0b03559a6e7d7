"""Guarded generation: strategic attention and strategic decoding in one cached decode loop."""

from .generator import GenerationError, generate, load_model, next_token_logprobs
from .policy import PolicyError
from .types import Generation, Policy, Request, Sampling, TraceEntry

__all__ = [
    "Generation",
    "GenerationError",
    "Policy",
    "PolicyError",
    "Request",
    "Sampling",
    "TraceEntry",
    "generate",
    "load_model",
    "next_token_logprobs",
]
