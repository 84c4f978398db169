"""The digits distillation demo behind ``python -m funcdistill demo`` (private).

- :mod:`funcdistill._demo.config`: :class:`DemoConfig`, the settings, their
  defaults and their checks (standard library only, for ``--help``).
- :mod:`funcdistill._demo.run`: :func:`run_demo`, which prints the table and
  draws the plot (standard library only until it runs).
- :mod:`funcdistill._demo.train`: the functional training itself (data,
  MLPs, Adam on dicts, the vmapped sweep step); imported only when the demo
  runs, and with it scikit-learn, matplotlib and tqdm.
"""

from funcdistill._demo.config import DemoConfig
from funcdistill._demo.run import DemoResult, Row, run_demo

__all__ = ["DemoConfig", "DemoResult", "Row", "run_demo"]
