"""A small HTTP peer in the test process that answers as vLLM's completions API does, or with a scripted fault.

:class:`Peer` is a real server (``http.server`` on a free port of 127.0.0.1, in
a thread): the served teacher's client talks to it over a real socket. Each
request is answered by the next behaviour of its script (the last one
repeats): a function of the request body returning ``(status, body)``,
``RESET`` (close the connection without answering) or ``("sleep", seconds,
behaviour)``. :func:`vllm_answer` builds the answer a vLLM server gives for a
teacher computed here in torch, in vLLM's format (``prompt_logprobs`` with
``null`` first and the actual token added when outside the top k, with its
rank; the generated token's ``top_logprobs`` keyed ``token_id:N``), so the
parsing, the shift and the padding are checked without vLLM; the tests marked
``vllm`` check the same against the real server.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from tests.conftest import free_port

RESET = "reset"
MODEL = "tiny-teacher"


class Peer:
    """A scripted HTTP server; ``bodies`` holds the JSON bodies it received, in order."""

    def __init__(self, *script: Any):
        self.script = list(script)
        self.bodies: list[Any] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL}, {"id": "other-model"}]})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                peer.bodies.append(body)
                behaviour = peer.script[min(len(peer.bodies), len(peer.script)) - 1]
                if isinstance(behaviour, tuple) and behaviour[0] == "sleep":
                    time.sleep(behaviour[1])
                    behaviour = behaviour[2]
                if behaviour == RESET:
                    self.close_connection = True
                    self.connection.close()
                    return
                status, answer = behaviour(body)
                self._send(status, answer)

            def _send(self, status: int, answer: Any) -> None:
                data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> Peer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def vllm_answer(logits_of: Callable[[list[int]], torch.Tensor], *, model: str = MODEL):
    """A behaviour answering as vLLM does, from ``logits_of(ids) -> (T, V)`` logits of one prompt."""

    def answer(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        k = body["prompt_logprobs"]
        choices = []
        for i, ids in enumerate(body["prompt"]):
            logprobs = torch.log_softmax(logits_of(ids).double(), dim=-1)
            prompt: list[Any] = [None]
            for t in range(1, len(ids)):
                prompt.append(_entries(logprobs[t - 1], k, actual=ids[t]))
            top = logprobs[-1].topk(body["logprobs"])
            last = {f"token_id:{int(j)}": float(v) for v, j in zip(top.values, top.indices)}
            choices.append({"index": i, "text": "x", "logprobs": {"top_logprobs": [last]}, "prompt_logprobs": prompt})
        return 200, {"id": "cmpl-1", "object": "text_completion", "model": model, "choices": choices[::-1]}

    return answer


def _entries(logprobs: torch.Tensor, k: int, *, actual: int) -> dict[str, Any]:
    top = logprobs.topk(k)
    entries = {
        str(int(j)): {"logprob": float(v), "rank": r + 1} for r, (v, j) in enumerate(zip(top.values, top.indices))
    }
    if str(actual) not in entries:  # vLLM adds the actual token, with its rank, after the top k
        rank = int((logprobs > logprobs[actual]).sum()) + 1
        entries = {str(actual): {"logprob": float(logprobs[actual]), "rank": rank}, **entries}
    return entries


def status(code: int, message: str, param: str | None = None):
    """A behaviour answering an OpenAI-style error."""
    return lambda body: (code, {"error": {"message": message, "type": "Error", "param": param, "code": code}})


def edited(behaviour, edit: Callable[[dict[str, Any]], None]):
    """``behaviour``'s answer, changed in place by ``edit`` (a fault)."""

    def answer(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        code, out = behaviour(body)
        edit(out)
        return code, out

    return answer
