"""funcdistill: knowledge distillation for PyTorch as pure functions.

- :class:`Mapping`: an immutable pytree of teacher/student point pairs, each
  with a payload (a loss, a weight, an adapter).
- :func:`distill`: builds a pure function
  ``fn(teacher_state, student_state, *inputs)`` that returns one
  :class:`Pair` ``(teacher_output, student_output, payload)`` per mapping pair.
- :class:`Point`: a point that reads one call of a module that runs several
  times, all its calls, or a module's input.
- :func:`state`: a model's parameters and buffers as a ``{name: tensor}`` dict.
- :class:`TeacherCache`: teacher outputs computed once and stored, which a
  distill function takes in place of the teacher state (offline distillation).
- :class:`BufferUpdateWarning`: a call that drops BatchNorm statistics warns
  with it (build the function with ``mutable=True`` or ``mutable=False``).

Losses are in :mod:`funcdistill.losses`; the drop-in for the context-manager
API is :mod:`funcdistill.compat`.

>>> import funcdistill
>>> sorted(funcdistill.__all__)
['BoundPayload', 'BufferUpdateWarning', 'Buffers', 'DistillFn', 'Mapping', 'Pair', 'Point', 'TeacherCache', 'distill', 'state']
"""

from funcdistill._distill import Buffers, BufferUpdateWarning, DistillFn, distill
from funcdistill._mapping import Mapping, Pair
from funcdistill._payloads import BoundPayload
from funcdistill._point import Point
from funcdistill._state import state
from funcdistill.cache import TeacherCache

__all__ = [
    "BoundPayload",
    "BufferUpdateWarning",
    "Buffers",
    "DistillFn",
    "Mapping",
    "Pair",
    "Point",
    "TeacherCache",
    "distill",
    "state",
]

__version__ = "0.1.0"
