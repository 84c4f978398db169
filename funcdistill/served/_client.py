"""The HTTP client of a served teacher: JSON over keep-alive connections, timeouts, retries with backoff.

It uses ``requests`` (the ``served`` extra): a :class:`requests.Session` keeps
one connection open across batches, and urllib3's :class:`~urllib3.util.Retry`
retries what may pass (a refused or reset connection, a timeout, HTTP 500, 502,
503, 504) with exponential backoff, honouring a ``Retry-After`` header. Scoring
prompts changes nothing on the server, so a ``POST`` is safe to repeat. What
is still failing after the retries becomes one error naming the URL and the
fix: :class:`ConnectionError` (nothing listens), :class:`TimeoutError`, or
:class:`~funcdistill.served.ServerError` for an HTTP error status.
"""

from __future__ import annotations

import difflib
from typing import Any

from funcdistill.served._errors import ServerError

__all__: list[str] = []

RETRIED_STATUSES = (500, 502, 503, 504)
START = "python -m vllm.entrypoints.openai.api_server --model MODEL --max-logprobs K"


class Client:
    """POSTs JSON to one server (``base``: ``http://host:port``) and returns the decoded answer, or raises."""

    def __init__(self, base: str, *, timeout: float, retries: int, backoff: float):
        try:
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util import Retry
        except ImportError as error:  # pragma: no cover - the extra is installed with the test extra
            raise ImportError(
                "a served teacher needs the 'requests' package: pip install 'funcdistill[served]'."
            ) from error
        self.base, self.timeout, self.retries = base, timeout, retries
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            other=0,
            backoff_factor=backoff,
            status_forcelist=RETRIED_STATUSES,
            allowed_methods=None,  # POST too: scoring prompts has no side effect
            raise_on_status=False,  # the last failed answer comes back, to be reported with its message
        )
        self._requests = requests
        self._session = requests.Session()
        self._session.mount("http://", HTTPAdapter(max_retries=retry))
        self._session.mount("https://", HTTPAdapter(max_retries=retry))

    def post(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The JSON answer of ``POST base + route``; raises for a transport fault or an HTTP error status."""
        response = self._send("post", route, json=payload)
        if response.status_code != 200:
            raise ServerError(self._status_message(response, payload))
        return self._json(response)

    def served_models(self) -> list[str]:
        """The model names the server lists (``GET /v1/models``), or ``[]`` if it does not say."""
        try:
            answer = self._json(self._send("get", "/v1/models"))
            return [str(m["id"]) for m in answer.get("data", [])]
        except (ServerError, OSError, KeyError, TypeError):
            return []

    def _send(self, method: str, route: str, **kwargs: Any) -> Any:
        url, exceptions = self.base + route, self._requests.exceptions
        attempts = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
        try:
            return self._session.request(method, url, timeout=self.timeout, **kwargs)
        except (exceptions.Timeout, exceptions.ConnectionError) as error:
            if _timed_out(error):
                raise TimeoutError(
                    f"the served teacher at {url} did not answer within timeout={self.timeout} s ({attempts}). "
                    "Check that the server is not overloaded, send smaller batches, or pass a larger timeout=."
                ) from error
            raise ConnectionError(
                f"cannot reach the served teacher at {url} ({attempts}): {_reason(error)}. Is the server "
                f"running at {self.base}? Start it with `{START}` (funcdistill.served.VLLMServer starts one "
                "from Python), or pass the URL it listens on."
            ) from error
        except exceptions.RetryError as error:  # a retried status that never passed (raise_on_status=False)
            raise ServerError(f"the served teacher at {url} kept failing ({attempts}): {_reason(error)}.") from error

    def _json(self, response: Any) -> dict[str, Any]:
        try:
            answer = response.json()
        except ValueError as error:
            raise ServerError(
                f"the served teacher at {response.url} answered HTTP {response.status_code} with something that "
                f"is not JSON ({response.text[:200]!r}); is it an OpenAI-compatible server (vLLM)?"
            ) from error
        if not isinstance(answer, dict):
            raise ServerError(
                f"the served teacher at {response.url} answered a JSON {type(answer).__name__}, not an object."
            )
        return answer

    def _status_message(self, response: Any, payload: dict[str, Any]) -> str:
        url, status = response.url, response.status_code
        message = _error_message(response)
        said = f"HTTP {status}: {message}"
        if status in RETRIED_STATUSES:
            return f"the served teacher at {url} failed ({said}) in each of {self.retries + 1} attempts."
        if status == 404 and "model" in message.lower():
            model = payload.get("model")
            served = self.served_models()
            close = difflib.get_close_matches(str(model), served, n=1, cutoff=0)
            hint = f" It serves {served}: pass model={close[0]!r}." if close else ""
            return f"the served teacher at {self.base} does not serve model {model!r} ({said}).{hint}"
        if status == 404:
            return (
                f"the served teacher at {url} has no such route ({said}); the URL must be an OpenAI-compatible "
                "server's base, such as http://127.0.0.1:8000 (vLLM)."
            )
        if status == 400 and "logprobs" in message and "max" in message:
            k = max(int(payload.get("prompt_logprobs") or 0), int(payload.get("logprobs") or 0))
            return (
                f"the served teacher at {url} refuses top-{k} log-probabilities ({said}). Start the server with "
                f"--max-logprobs {k} (or more), or ask for fewer (topk=)."
            )
        return f"the served teacher at {url} refused the request ({said})."


def _error_message(response: Any) -> str:
    """The server's own error message (OpenAI style ``{"error": {"message": ...}}``), else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason or "no message"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return str(body)[:300]


def _timed_out(error: BaseException) -> bool:
    """Whether a requests error (possibly after urllib3's retries) was a timeout, not a refused connection."""
    from urllib3.exceptions import NewConnectionError
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    for seen in _chain(error):
        if isinstance(seen, NewConnectionError):  # urllib3 derives it from its timeout error
            return False
        if isinstance(seen, (Urllib3Timeout, TimeoutError)):
            return True
    return False


def _chain(error: BaseException) -> list[BaseException]:
    """A requests / urllib3 error and its causes, outermost first (urllib3 keeps them in ``reason`` or ``args[0]``)."""
    chain = [error]
    while len(chain) < 10:
        seen = chain[-1]
        reason = getattr(seen, "reason", None)
        nested = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        inner = reason if isinstance(reason, BaseException) else nested
        if inner is None or inner in chain:
            break
        chain.append(inner)
    return chain


def _reason(error: BaseException) -> str:
    """The innermost cause of a requests / urllib3 error, shortly."""
    text = str(_chain(error)[-1])
    return text.split("): ", 1)[-1] if text.startswith("HTTPConnection(") else text
