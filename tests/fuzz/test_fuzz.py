"""The fuzz targets (tests/fuzz/targets.py) with a small budget; scripts/fuzz.py runs
them longer."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz.targets import TARGETS


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target(name):
    strategy, check = TARGETS[name]
    run = settings(max_examples=100, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))(given(strategy)(check))
    run()
