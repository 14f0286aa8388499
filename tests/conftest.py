"""Session-wide test setup. Without a GPU the Triton kernels run under Triton's interpreter; the
flag must be set before the first `triton.jit` is applied (at import of the kernel modules).

Hypothesis profiles: `ci` (the default) is derandomized, so every run checks the same examples in
bounded time; `MCSERVE_HYPOTHESIS_PROFILE=long` runs many more, randomly, on demand."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=50, derandomize=True, database=None, deadline=None,
                          print_blob=True, suppress_health_check=_SLOW_OK)
settings.register_profile("long", max_examples=400, deadline=None, print_blob=True, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("MCSERVE_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def one_thread():
    """For tests of many tiny ops: torch's default pool of every core collapses under CPU contention
    (issue 17), which made the cache property test 30x slower on the shared CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
