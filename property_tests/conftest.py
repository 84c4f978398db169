"""Hypothesis profiles: ``dev`` (default, quick), ``ci`` (more examples, derandomized)
and ``stress`` (many examples, for hunting bugs before a release).

Select with ``HYPOTHESIS_PROFILE=ci``; ``.ci/run`` does.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=8, **_common)
settings.register_profile("ci", max_examples=60, derandomize=True, **_common)
settings.register_profile("stress", max_examples=150, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
