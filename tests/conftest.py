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
# `marks.fast_cases` for crossed parameters, read here.


import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        fast = getattr(getattr(item, "function", None), "fast_cases", None)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if fast is not None and params and not fast(params):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=["cpu", "accelerator"])
def residual_branch(request, monkeypatch):
    """Runs a test under each branch of ``cross_entropy``'s platform-dependent
    residuals: ``"cpu"`` keeps ``exp(s - m)``, ``"accelerator"`` (the GPU/TPU
    branch, forced on CPU through the same switch) keeps the logits."""
    from jaxsce import _logit_ce

    monkeypatch.setattr(_logit_ce, "CPU_KEEPS_EXP", request.param == "cpu")
    jax.clear_caches()  # the switch is read when tracing
    yield request.param
    jax.clear_caches()
