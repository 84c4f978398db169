"""Drop-in for the context-manager distillation API: ``distill`` and a mutable ``Mapping``.

Training loops written against the context-manager API run unchanged after
switching the import::

    from funcdistill.compat import Mapping, distill

It is a thin stateful layer over the functional core: ``Mapping`` holds an
immutable :class:`funcdistill.Mapping` (``to_functional()`` /
``Mapping.from_functional()``), and ``distill`` runs
:func:`funcdistill.distill` on the models' own tensors. See
``docs/migration.md`` for the same loop in the functional style.

>>> from funcdistill.compat import Mapping, distill
>>> sorted(__all__)
['Mapping', 'distill']
"""

from funcdistill.compat._distill import distill
from funcdistill.compat._mapping import Mapping

__all__ = ["Mapping", "distill"]
