"""Offline distillation: a teacher cache that stands in for the teacher.

- :class:`TeacherCache` (also ``funcdistill.TeacherCache``): ``build`` runs the
  teacher of a distill function once over a dataset and stores its mapped
  outputs in safetensors shards; ``cache[indices]`` gives them back.
- :class:`TeacherOutputs`: what ``cache[indices]`` returns; a distill function
  takes it in place of the teacher state and does not run the teacher.
- :class:`TopK`: the teacher output of a pair stored as top-k log-probabilities.

See the "Offline distillation" page of the documentation.
"""

from funcdistill._outputs import BuiltFor, TeacherOutputs, TopK  # the core's values, shown here
from funcdistill.cache._cache import TeacherCache

__all__ = ["BuiltFor", "TeacherCache", "TeacherOutputs", "TopK"]
