"""Hypothesis profiles and global RNG seeds for every test.

Profiles. Under CI (the CI variable set, as .ci/run does, or any CI that hypothesis itself detects, e.g.
GITHUB_ACTIONS) "ci" is loaded: derandomized, no example database, no deadline (torch's first call is
slow), 30 examples. Hypothesis auto-loads a built-in profile also named "ci" when it detects CI; ours
replaces it (register_profile under the same name, loaded here, after hypothesis's own start-up). Every
profile derives from hypothesis's pristine "default" profile, not from whatever was loaded before, so
"dev" (the local default: random exploration, 20 examples) stays randomized even on a machine whose
environment looks like CI. HYPOTHESIS_PROFILE picks any of them ("thorough" for a long local run);
tests/test_smoke.py checks which profile is in effect.

Global RNGs. Each test starts from the same seeds of random, numpy's legacy np.random and torch's global
generator, so a draw that a test did not seed itself still repeats run after run. Tests seed their own
draws explicitly (a torch.Generator, torch.manual_seed, np.random.default_rng(seed)); this is the net
under that rule, not a replacement for it. Hypothesis re-seeds these generators per example itself.
"""

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

IN_CI = "CI" in os.environ or settings.get_current_profile_name() == "ci"  # the latter: hypothesis detected a CI
_DEFAULT = settings.get_profile("default")

settings.register_profile(
    "ci", _DEFAULT, derandomize=True, database=None, deadline=None, max_examples=30, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", _DEFAULT, deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", _DEFAULT, deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci" if IN_CI else "dev")
settings.load_profile(PROFILE)

GLOBAL_SEED = 0


@pytest.fixture(autouse=True)
def _seed_global_rngs():
    random.seed(GLOBAL_SEED)
    np.random.seed(GLOBAL_SEED)  # noqa: NPY002 — the legacy global state, in case anything draws from it
    torch.manual_seed(GLOBAL_SEED)
    yield
