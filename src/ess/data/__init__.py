"""Example schema and dataset loaders."""

from .loaders import load_examples, load_prompts, seed_names
from .schema import DataError, Example

__all__ = ["DataError", "Example", "load_examples", "load_prompts", "seed_names"]
