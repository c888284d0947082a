"""What the tests need from JAX across the supported releases (jax >= 0.6)."""

import jax
from jax import (
    experimental,
    export,  # noqa: F401  (jax < 0.7 does not import jax.export by itself)
    sharding,
)

from jaxsce._base._spmd import jax_version

JAX = jax_version()

# jax.enable_x64 (jax >= 0.7) was jax.experimental.enable_x64 before. (A
# config state: test for it with hasattr, its truth value is an error.)
enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else experimental.enable_x64  # type: ignore[attr-defined]

# jax.set_mesh (jax >= 0.7) was jax.sharding.use_mesh before.
set_mesh = jax.set_mesh if hasattr(jax, "set_mesh") else sharding.use_mesh  # type: ignore[attr-defined]

# Reverse mode through linear_cross_entropy(derivative="jvp") needs jax >= 0.10.
reverse_through_jvp = JAX >= (0, 10)

# Explicit sharding (types that carry the mesh axes, jax.sharding.reshard) is public from jax 0.7.
HAS_EXPLICIT = hasattr(sharding, "reshard")
