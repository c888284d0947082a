"""Trace-time argument checks shared by every public function.

Every check raises ``TypeError`` (wrong dtype or kind) or ``ValueError`` (wrong
shape or value) naming the argument and the offending shape, dtype or value.
None of them looks at array *values*: they run once, while JAX traces.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer


def is_tracer(x: Any) -> bool:
    """True for a value being traced (by ``jit``, ``grad``, ``shard_map``, ...)."""
    return isinstance(x, Tracer)


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype arithmetic is done in: float32 for 16-bit floats, else ``dtype``.

    Low-precision logits are accumulated in float32 (as equinox and flax do);
    float64 stays float64 when x64 is enabled.
    """
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


def promote(*dtypes) -> np.dtype:
    """JAX's standard promotion of floating dtypes, also under ``jax_numpy_dtype_promotion="strict"``.

    Mixed inputs (bf16 hidden states with a float32 weight) are a supported
    use: the library chooses its compute dtype itself rather than fail under
    a caller's strict promotion setting.
    """
    with jax.numpy_dtype_promotion("standard"):
        out = dtypes[0]
        for d in dtypes[1:]:
            out = jnp.promote_types(out, d)
    return np.dtype(out)


def check_floating(x: Any, name: str) -> jax.Array:
    """Returns ``x`` as an array, or raises ``TypeError`` if it is not floating."""
    if not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or "
            f"float64), got dtype {x.dtype} with shape {tuple(x.shape)}."
        )
    return jnp.asarray(x)


def check_mask(where: Any, shape: tuple[int, ...], name: str, what: str) -> jax.Array:
    """Checks a boolean mask of exactly ``shape``."""
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean mask, got dtype {where.dtype}.")
    if tuple(where.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(where.shape)} but must have shape {tuple(shape)} ({what}).")
    return where


def canonical_axes(axis: int | Sequence[int] | None, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Normalizes ``axis`` (an int, a tuple of ints, or None for all) to non-negative ints.

    The order is kept: for a tuple of class axes, a class id is the row-major
    flat index over the class axes in the order given.
    """
    if axis is None:
        axis = tuple(range(ndim))
    axes = (axis,) if not isinstance(axis, (tuple, list)) else tuple(axis)
    if not axes:
        raise ValueError(f"{name} must name at least one axis, got {axis!r}.")
    out = []
    a: Any
    for a in axes:
        try:
            a = operator.index(a)
        except TypeError:
            raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}.") from None
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}={axis!r} is out of range for an array with {ndim} dimensions.")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} repeats an axis.")
    return tuple(out)


def check_class_weight(class_weight: Any, num_classes: int, name: str = "weight") -> jax.Array:
    """Per-class weights: a floating vector with one entry per class."""
    class_weight = check_floating(class_weight, name)
    if class_weight.shape != (num_classes,):
        raise ValueError(
            f"{name} has shape {tuple(class_weight.shape)} but must have shape ({num_classes},): one weight per class."
        )
    return class_weight


def check_sample_weight(sample_weight: Any, shape: tuple[int, ...], what: str) -> jax.Array:
    """Per-example weights: floating, of exactly the batch ``shape``."""
    sample_weight = check_floating(sample_weight, "sample_weight")
    if tuple(sample_weight.shape) != tuple(shape):
        raise ValueError(
            f"sample_weight has shape {tuple(sample_weight.shape)} but must have shape {tuple(shape)} ({what})."
        )
    return sample_weight


def class_rows(x: jax.Array, axis, name: str):
    """The class axis (or axes) of ``x`` as rows: ``(rows, batch_shape, flatten)``.

    ``flatten(y)`` moves ``axis`` of an array shaped like ``x`` to the end and
    makes it ``[prod(batch_shape), classes]``; ``rows = flatten(x)``. No
    classes is a ``ValueError`` naming the argument and the axis.
    """
    axes = canonical_axes(axis, x.ndim)
    batch_shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    classes = math.prod(x.shape[a] for a in axes)
    if classes == 0:
        raise ValueError(f"{name} of shape {x.shape} have no classes along axis={axis!r} (the class axis).")
    perm = [i for i in range(x.ndim) if i not in axes] + list(axes)
    n = math.prod(batch_shape)

    def flatten(y):
        return jnp.transpose(y, perm).reshape(n, classes)

    return flatten(x), batch_shape, flatten


def check_two_axes(batch_shape, name: str, full_shape, what: str):
    """A batch of sequences: ``batch_shape`` (``full_shape`` without its class or feature axis) is 2-D, as
    ``what`` says (``"[B, L] (B completions of length L)"``)."""
    if len(batch_shape) != 2:
        raise ValueError(
            f"{name} of shape {full_shape} must have the batch shape {what} besides its class/feature axis, "
            f"got {batch_shape}."
        )
