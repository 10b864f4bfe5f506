"""Hypothesis profiles. CI (CI set, as .ci/run does) loads "ci": derandomized, no example database,
no deadline (torch's first call is slow). Locally "dev" runs fewer examples; HYPOTHESIS_PROFILE picks
any of them ("thorough" for a long local run)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=30, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
