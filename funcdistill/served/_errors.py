"""The error a served teacher raises when its server answers wrongly: :class:`ServerError`."""

from __future__ import annotations

__all__ = ["ServerError"]


class ServerError(RuntimeError):
    """A served teacher's server refused a request, failed, or answered something that does not fit it.

    Raised for an HTTP error status (after the retries, for a 5xx), a model
    the server does not serve, a log-probability count above the server's
    ``--max-logprobs``, and an answer with another model name, another number
    of sequences or positions, or fewer than ``k`` log-probabilities at a
    position. The message names the URL, what was expected and what came, and
    the fix. A server that cannot be reached is a :class:`ConnectionError`,
    one that does not answer in time a :class:`TimeoutError`.
    """
