"""What the distillation losses share: the divergences' names and traced options, the ``0 log 0 = 0``
terms, JSD's mixture gaps, and the reduction of per-token values.

Both the full-vocabulary losses (``_distill``) and the top-k ones
(``_topk_distill``) stand on this module; neither imports the other.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._api import _options
from .._base import _reduce, _validate
from .._base._transform import Transform

DIVERGENCES = ("kl", "reverse_kl", "jsd")


class DistillConsts(NamedTuple):
    transform: Transform = Transform()  # the temperature (no soft cap)
    beta: jax.Array | None = None
    soft_weight: jax.Array | None = None  # None: 1
    hard_weight: jax.Array | None = None  # the cross-entropy's weight (with labels)


def xlogy_terms(weight, diff):
    """``weight * diff`` with ``0 * anything = 0`` (``0 log 0 = 0``).

    Only an exact 0 weight drops its term: a NaN weight (a NaN or +inf
    logit) keeps it, so the row is NaN, as the NaN policy says.
    """
    return jnp.where(weight == 0, 0, weight * diff)


def mixture_gaps(log_ps, log_pt, beta):
    """``(log P_s - log M, log P_t - log M)`` for ``M = beta P_t + (1 - beta) P_s``.

    Formed from ``delta = log P_t - log P_s`` and ``log1p``/``expm1`` of the
    smaller side, so both are exactly 0 where the two distributions agree
    (JSD of identical inputs is exactly 0, with a zero gradient), and
    neither overflows where one side is 0.
    """
    delta = log_pt - log_ps
    below = delta <= 0
    # delta <= 0: log M - log P_s = log1p(beta expm1(delta)), in [log(1 - beta), 0].
    # delta > 0: log M - log P_t = log1p((1 - beta) expm1(-delta)), in [log beta, 0].
    u = jnp.log1p(jnp.where(below, beta, 1 - beta) * jnp.expm1(jnp.where(below, delta, -delta)))
    gap_s = jnp.where(below, -u, -delta - u)
    gap_t = jnp.where(below, delta - u, -u)
    return gap_s, gap_t


def options_of(divergence, beta, temperature):
    divergence = _options.choice(divergence, "divergence", DIVERGENCES)
    beta_v = None
    if divergence == "jsd":  # the KLs do not use beta: it is not checked
        beta_v = _options.float_option(beta, "beta", off_when_zero=False)
        if beta_v is None:
            raise TypeError("beta must be a real number in (0, 1), got None.")
        if not _validate.is_tracer(beta) and float(beta) == 1.0:
            raise ValueError("beta must be < 1, got 1.0.")
    return divergence, DistillConsts(_options.transform(None, temperature), beta=beta_v)


def reduced(outputs, valid, reduction, batch_axis_name, batch_shape):
    (loss,) = outputs
    if reduction == "none":
        return loss.reshape(batch_shape)
    return _reduce.reduce_loss(loss, valid.astype(loss.dtype), reduction, batch_axis_name, valid)


def consts_in(consts: DistillConsts, ct, divergence: str) -> DistillConsts:
    """The traced options in the compute dtype; NaN where out of range (``0 < beta < 1`` for JSD)."""
    transform = _options.in_dtype(consts.transform, ct)
    beta = consts.beta
    if beta is not None:
        beta = lax.stop_gradient(jnp.asarray(beta).astype(ct))
        beta = jnp.where((beta > 0) & (beta < 1), beta, jnp.nan)
    weights = (
        None if x is None else _options.traced_in_dtype(x, ct, (0.0, None, False))
        for x in (consts.soft_weight, consts.hard_weight)
    )
    return DistillConsts(transform, beta, *weights)
