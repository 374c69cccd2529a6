"""fot: Forest-of-Thought test-time search, served by batched speculative decoding."""

from fot.config import SamplingParams, SpeculativeConfig
from fot.errors import FotError, InvalidRequestError, ModelError

__version__ = "0.1.0"
__all__ = [
    "FotError",
    "ForestConfig",
    "InvalidRequestError",
    "ModelError",
    "SamplingParams",
    "Solution",
    "SpeculativeConfig",
    "asolve",
    "asolve_many",
    "solve",
    "solve_many",
]
_FOREST = {"ForestConfig", "Solution", "asolve", "asolve_many", "solve", "solve_many"}


def __getattr__(name: str):
    """`fot.solve` and friends load the search (and its task packages) on first use, keeping `import fot` light."""
    if name in _FOREST:
        from fot import forest

        return getattr(forest, name)
    raise AttributeError(f"module 'fot' has no attribute {name!r}")
