"""Test-wide JAX settings, applied before any test module builds arrays.

* x64 is enabled so float64 oracles can be compared at 1e-12; float32 and
  16-bit tests build their arrays with explicit dtypes.
* Strict dtype promotion and rank promotion errors (as equinox's tests do)
  catch silent upcasts and broadcasting mistakes inside the library.
* 8 virtual CPU devices back the sharding tests.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


# --- the fast set ------------------------------------------------------------------
# `make test` runs the tests not marked slow. Tests mark their slow cases where
# they are defined: `pytest.mark.slow`, `pytest.param(..., marks=...)`, or
# `marks.fast_cases` / `marks.all_cases_fast`, read here; a parametrized test
# otherwise runs its first case in the fast set (see marks.py).


import collections  # noqa: E402

import pytest  # noqa: E402
from marks import FAST_CASES_PER_TEST  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    fast_so_far = collections.Counter()
    for item in items:
        function = getattr(item, "function", None)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if not params or item.get_closest_marker("slow"):
            continue
        predicate = getattr(function, "fast_cases", None)
        if predicate is not None and not predicate(params):
            item.add_marker(pytest.mark.slow)
            continue
        if getattr(function, "all_cases_fast", False):
            continue
        test = item.nodeid.split("[")[0]
        fast_so_far[test] += 1
        if FAST_CASES_PER_TEST is not None and fast_so_far[test] > FAST_CASES_PER_TEST:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=["cpu", "accelerator"])
def residual_branch(request, monkeypatch):
    """Runs a test under each branch of ``cross_entropy``'s platform-dependent
    residuals: ``"cpu"`` keeps ``exp(s - m)``, ``"accelerator"`` (the GPU/TPU
    branch, forced on CPU through the same switch) keeps the logits."""
    from jaxsce._engine import _logit_ce

    monkeypatch.setattr(_logit_ce, "CPU_KEEPS_EXP", request.param == "cpu")
    jax.clear_caches()  # the switch is read when tracing
    yield request.param
    jax.clear_caches()


@pytest.fixture(params=["cpu", "accelerator"])
def search_branch(request, monkeypatch):
    """Runs a test under each branch of the top-p search's sums: ``"cpu"`` bins and scatter-adds,
    ``"accelerator"`` (the GPU/TPU branch, forced on CPU through the same switch) reduces per threshold."""
    from jaxsce._engine import _sampler

    monkeypatch.setattr(_sampler, "CPU_SCATTERS", request.param == "cpu")
    jax.clear_caches()  # the switch is read when tracing
    yield request.param
    jax.clear_caches()
