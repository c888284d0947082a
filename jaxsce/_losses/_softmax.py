"""Numerically stable softmax, log-softmax and logsumexp with masks.

All three subtract the (masked) maximum before exponentiating, as in the
tutorial's ``stable_softmax``: ``exp(x - max(x)) / sum(exp(x - max(x)))`` equals
``softmax(x)`` exactly in real arithmetic and never overflows. The maximum is
held constant for differentiation (the result does not depend on it) and
replaced by 0 when it is not finite, so that a row that is entirely ``-inf`` or
entirely masked gives a finite result instead of ``-inf - (-inf) = NaN``.

Derivatives are attached with ``jax.custom_jvp`` rules that read only the
output (softmax, log-softmax) or the input and output (logsumexp), so reverse
mode saves one array, and forward mode (``jax.jvp``, ``jax.hessian``) works.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .._api import _options
from .._base import _validate

Axis = int | tuple[int, ...] | None


def _prepare(x, axis: Axis, where, name: str):
    x = _validate.check_floating(x, name)
    axes = _validate.canonical_axes(axis, x.ndim)
    if any(x.shape[a] == 0 for a in axes):
        raise ValueError(f"{name} of shape {tuple(x.shape)} has no entries along axis={axis!r} (the class axis).")
    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
        try:
            target = jnp.broadcast_shapes(where.shape, x.shape)
        except ValueError:
            target = None
        if target != x.shape:
            raise ValueError(
                f"where has shape {tuple(where.shape)}, which does not broadcast to "
                f"the shape {tuple(x.shape)} of {name}."
            )
        where = jnp.broadcast_to(where, x.shape)
    return x, axes, where


def _shifted_exp(x, axes, where):
    """Returns ``(x - m, exp(x - m), sum)`` in the compute dtype, masked entries -inf/0."""
    xf = x.astype(_validate.compute_dtype(x.dtype))
    if where is not None:
        xf = jnp.where(where, xf, -jnp.inf)
    m = jnp.max(xf, axis=axes, keepdims=True)
    # A row that is all -inf (or fully masked) has max -inf; shifting by it
    # would give -inf - (-inf) = NaN. Any finite shift is exact, so use 0.
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0))
    shifted = xf - m
    e = jnp.exp(shifted)
    return m, shifted, e, jnp.sum(e, axis=axes, keepdims=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _softmax(x, axes, where):
    _, _, e, total = _shifted_exp(x, axes, where)
    # A fully masked / all -inf row has total 0: return zeros, not 0/0.
    return (e / jnp.where(total == 0, 1, total)).astype(x.dtype)


@_softmax.defjvp
def _softmax_jvp(axes, primals, tangents):
    x, where = primals
    dx, _ = tangents
    y = _softmax(x, axes, where)
    yf = y.astype(_validate.compute_dtype(y.dtype))
    dxf = dx.astype(yf.dtype)
    if where is not None:
        dxf = jnp.where(where, dxf, 0)
    dy = yf * (dxf - jnp.sum(yf * dxf, axis=axes, keepdims=True))
    return y, dy.astype(y.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _log_softmax(x, axes, where):
    _, shifted, _, total = _shifted_exp(x, axes, where)
    out = jnp.where(total == 0, -jnp.inf, shifted - jnp.log(total))
    if where is not None:
        out = jnp.where(where, out, -jnp.inf)
    return out.astype(x.dtype)


@_log_softmax.defjvp
def _log_softmax_jvp(axes, primals, tangents):
    x, where = primals
    dx, _ = tangents
    y = _log_softmax(x, axes, where)
    yf = y.astype(_validate.compute_dtype(y.dtype))
    finite = yf > -jnp.inf  # -inf entries (masked or -inf input) stay -inf.
    dxf = jnp.where(finite, dx.astype(yf.dtype), 0)
    dy = dxf - jnp.sum(jnp.exp(yf) * dxf, axis=axes, keepdims=True)
    return y, jnp.where(finite, dy, 0).astype(y.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _logsumexp(x, axes, where):
    m, _, _, total = _shifted_exp(x, axes, where)
    return (m + jnp.log(total)).astype(x.dtype)


@_logsumexp.defjvp
def _logsumexp_jvp(axes, primals, tangents):
    x, where = primals
    dx, _ = tangents
    out = _logsumexp(x, axes, where)
    p = _softmax(x, axes, where).astype(_validate.compute_dtype(x.dtype))
    dxf = dx.astype(p.dtype)
    if where is not None:
        dxf = jnp.where(where, dxf, 0)
    dout = jnp.sum(jnp.where(p > 0, p * dxf, 0), axis=axes, keepdims=True)
    return out, dout.astype(out.dtype)


@functools.partial(jax.jit, static_argnames=("axis",))
@_options.keyword_checked
def softmax(x: jax.Array, axis: Axis = -1, where: jax.Array | None = None) -> jax.Array:
    r"""Numerically stable softmax.

    .. math::
        \mathrm{softmax}(x)_i = \frac{e^{x_i - m}}{\sum_j e^{x_j - m}},
        \qquad m = \max_j x_j

    Args:
      x: floating array of any shape.
      axis: axis or tuple of axes that hold the classes (None: all axes).
      where: optional boolean mask broadcastable to ``x.shape``; masked entries
        take no part and get probability 0.

    Returns:
      An array of ``x.shape`` and ``x.dtype``. float16/bfloat16 inputs are
      computed in float32 and rounded once at the end.

    Raises:
      TypeError: if ``x`` is not floating or ``where`` is not boolean.
      ValueError: if ``axis`` is out of range or has no entries, or ``where``
        does not broadcast.

    Note:
      A row that is entirely ``-inf`` or entirely masked gives zeros, with zero
      gradient. A ``+inf`` entry is NaN in the output (``inf - inf``) and the
      row's finite entries are 0; a NaN entry makes the whole row NaN.

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> jaxsce.softmax(jnp.array([1000.0, 1000.0, -jnp.inf], jnp.float32))
      Array([0.5, 0.5, 0. ], dtype=float32)
    """
    x, axes, where = _prepare(x, axis, where, "x")
    return _softmax(x, axes, where)


@functools.partial(jax.jit, static_argnames=("axis",))
@_options.keyword_checked
def log_softmax(x: jax.Array, axis: Axis = -1, where: jax.Array | None = None) -> jax.Array:
    r"""Numerically stable log-softmax.

    .. math::
        \mathrm{log\_softmax}(x)_i = (x_i - m) - \log \sum_j e^{x_j - m}

    Args:
      x: floating array of any shape.
      axis: axis or tuple of axes that hold the classes (None: all axes).
      where: optional boolean mask broadcastable to ``x.shape``; masked entries
        are ``-inf``.

    Returns:
      An array of ``x.shape`` and ``x.dtype`` (16-bit inputs computed in float32).

    Raises:
      TypeError: if ``x`` is not floating or ``where`` is not boolean.
      ValueError: if ``axis`` is out of range or has no entries, or ``where``
        does not broadcast.

    Note:
      ``-inf`` entries (and whole rows that are ``-inf`` or masked) give
      ``-inf`` with zero gradient, never NaN. A ``+inf`` entry is NaN in the
      output and the row's finite entries are ``-inf``; a NaN entry makes the
      whole row NaN.

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> jaxsce.log_softmax(jnp.array([0.0, 0.0], jnp.float32))
      Array([-0.6931472, -0.6931472], dtype=float32)
    """
    x, axes, where = _prepare(x, axis, where, "x")
    return _log_softmax(x, axes, where)


@functools.partial(jax.jit, static_argnames=("axis", "keepdims"))
@_options.keyword_checked
def logsumexp(
    x: jax.Array,
    axis: Axis = -1,
    where: jax.Array | None = None,
    keepdims: bool = False,
) -> jax.Array:
    r"""Numerically stable :math:`\log \sum_i e^{x_i}`.

    .. math::
        \mathrm{logsumexp}(x) = m + \log \sum_i e^{x_i - m},
        \qquad m = \max_i x_i

    Args:
      x: floating array of any shape.
      axis: axis or tuple of axes to reduce (None: all axes).
      where: optional boolean mask broadcastable to ``x.shape``.
      keepdims: keep the reduced axes with size 1.

    Returns:
      ``x.shape`` without ``axis`` (or with size-1 axes if ``keepdims``), in
      ``x.dtype`` (16-bit inputs computed in float32). Its gradient is
      ``softmax(x)``.

    Raises:
      TypeError: if ``x`` is not floating or ``where`` is not boolean.
      ValueError: if ``axis`` is out of range or has no entries, or ``where``
        does not broadcast.

    Note:
      An all ``-inf`` or fully masked row gives ``-inf`` with zero gradient. A
      ``+inf`` entry gives ``+inf`` with a NaN gradient; NaN propagates.

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> jaxsce.logsumexp(jnp.array([1e4, 1e4], jnp.float32))
      Array(10000.693, dtype=float32)
    """
    x, axes, where = _prepare(x, axis, where, "x")
    out = _logsumexp(x, axes, where)
    if not keepdims:
        out = jnp.squeeze(out, axis=axes)
    return out
