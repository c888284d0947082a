r"""The logit transform every loss shares: ``s = softcap(z) / T``, and its chain rule.

.. math::
    s = \frac{\mathrm{cap}\,\tanh(z / \mathrm{cap})}{T}, \qquad
    \frac{\partial s}{\partial z} = \frac{1 - \tanh^2(z / \mathrm{cap})}{T}
      = \frac{1 - (s T / \mathrm{cap})^2}{T},

the soft cap of Gemma 2 and the temperature of sampling (and of Liger-Kernel's
scaled cross-entropy). The chain rule is written in terms of ``s``, so the
backward passes need no second ``tanh``. Either part may be off (None), which
removes its code from the program.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Transform(NamedTuple):
    """The traced transform parameters (0-d arrays in the compute dtype), None where off."""

    logit_softcap: jax.Array | None = None
    temperature: jax.Array | None = None


def apply(z, t: Transform):
    """``s = softcap(z) / T``."""
    if t.logit_softcap is not None:
        z = t.logit_softcap * jnp.tanh(z / t.logit_softcap)
    return z if t.temperature is None else z / t.temperature


def chain(s, ds, t: Transform):
    """``ds * (ds/dz)`` elementwise, written with ``s``: ``ds (1 - (s T / cap)^2) / T``."""
    if t.temperature is not None:
        ds = ds / t.temperature
    if t.logit_softcap is not None:
        capped = s if t.temperature is None else s * t.temperature
        ds = ds * (1 - jnp.square(capped / t.logit_softcap))
    return ds


def is_identity(t: Transform) -> bool:
    """Static: neither part is on."""
    return t.logit_softcap is None and t.temperature is None
