"""The library's own exception types: bad input fails early with one of these, never deep inside."""


class FotError(Exception):
    """Base class of every error fot raises on purpose."""


class InvalidRequestError(FotError, ValueError):
    """A request (prompt, sampling option, size) that cannot be served; raised before any work."""


class ContextOverflowError(InvalidRequestError):
    """A prompt and its max_tokens do not fit the model's context."""


class ModelError(FotError, ValueError):
    """A model name or folder that cannot be resolved, converted or loaded."""


class KernelBuildError(FotError, RuntimeError):
    """The CPU kernels could not be built: another build holds their lock past the timeout."""


class SearchError(FotError, RuntimeError):
    """A search whose backend requests failed (a server down, a request refused): it has no result. `solution`
    holds what the search reached without them, to look at, never to score. `retryable` is False when every failed
    request was refused by the backend itself (an upstream's 4xx), so the same search would fail again."""

    def __init__(self, message: str, solution=None, retryable: bool = True):
        super().__init__(message)
        self.solution, self.retryable = solution, retryable
