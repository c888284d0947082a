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
