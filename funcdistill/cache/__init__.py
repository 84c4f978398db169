"""Offline distillation: a teacher cache that stands in for the teacher.

- :class:`TeacherCache` (also ``funcdistill.TeacherCache``): ``build`` runs the
  teacher of a distill function once over a dataset and stores its mapped
  outputs in safetensors shards; ``cache[indices]`` gives them back.
- :class:`TeacherOutputs`: what ``cache[indices]`` returns; a distill function
  takes it in place of the teacher state and does not run the teacher.
- :class:`TopK`: the teacher output of a pair stored as top-k log-probabilities.
- :func:`pad_tokens`: token samples of any lengths padded into one batch, as a
  cache built from them pads its batches (collate the student's batch with it).

See the "Offline distillation" page of the documentation.
"""

from funcdistill._outputs import BuiltFor, TeacherOutputs, TopK  # the core's values, shown here
from funcdistill.cache._cache import TeacherCache
from funcdistill.cache._tokens import pad_tokens

__all__ = ["BuiltFor", "TeacherCache", "TeacherOutputs", "TopK", "pad_tokens"]
