"""A served teacher: teacher outputs from an inference server (vLLM's OpenAI-compatible API).

- :class:`ServedTeacher`: for a distill function whose mapping reads the
  teacher's logits, each call sends a batch of token sequences to the server
  and returns :class:`~funcdistill.cache.TeacherOutputs` holding their top-k
  log-probabilities, which the distill function and the top-k losses take as
  they take a teacher cache's read.
- :class:`ServerError`: a server that refused, failed, or answered something
  that does not fit the request.
- :class:`VLLMServer`: starts and stops a local vLLM server (tests, examples).

It needs the ``served`` extra (``requests``). See the LLM page of the documentation.
"""

from funcdistill.served._errors import ServerError
from funcdistill.served._launch import VLLMServer
from funcdistill.served._teacher import ServedTeacher

__all__ = ["ServedTeacher", "ServerError", "VLLMServer"]
