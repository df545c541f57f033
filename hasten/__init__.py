"""hasten: faster LLM generation on your own hardware, with every speedup measured against what you run today."""
from .engine import Engine, GenerationResult, load

__all__ = ["load", "Engine", "GenerationResult"]
__version__ = "0.1.0"
