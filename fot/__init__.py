"""fot: Forest-of-Thought test-time search, served by batched speculative decoding."""

from fot.models import configure_caches

configure_caches()

from fot.config import SamplingParams, SpeculativeConfig  # noqa: E402
from fot.errors import FotError, InvalidRequestError, ModelError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["FotError", "InvalidRequestError", "ModelError", "SamplingParams", "SpeculativeConfig"]
