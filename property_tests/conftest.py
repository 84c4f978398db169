"""Hypothesis profiles: ``dev`` (default, quick) and ``ci`` (more examples).

Select with ``HYPOTHESIS_PROFILE=ci``; ``.ci/run`` does.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=8, **_common)
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
