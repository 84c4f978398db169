"""funcdistill: knowledge distillation for PyTorch as pure functions.

>>> import funcdistill
>>> sorted(funcdistill.__all__)[:3]
['Buffers', 'BoundPayload', 'DistillFn']
"""

from funcdistill import _pytree as _pytree  # registers Mapping as a pytree
from funcdistill._distill import BoundPayload, Buffers, DistillFn, distill
from funcdistill._mapping import Mapping, Pair
from funcdistill._state import state

__all__ = ["BoundPayload", "Buffers", "DistillFn", "Mapping", "Pair", "distill", "state"]

__version__ = "0.1.0"
