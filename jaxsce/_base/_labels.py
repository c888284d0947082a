"""Class-id labels: which examples count, which labels are valid, and checks.

Labels may have any integer dtype, signed or unsigned, 8 to 64 bits. Every
comparison is made between values, never in the labels' own dtype (where
``C = 300`` or ``ignore_index = -100`` would wrap around for ``uint8``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Text every label-check error starts with (also how the eager path finds it).
BAD_LABEL = "jaxsce: labels must lie in"


def _range_mask(labels: jax.Array, low: int, high: int) -> jax.Array:
    """``low <= labels < high`` without converting the bounds to ``labels.dtype``."""
    info = jnp.iinfo(labels.dtype)
    ok = jnp.ones(labels.shape, bool)
    if low > info.min:
        ok = ok & (labels >= jnp.asarray(low, labels.dtype)) if low <= info.max else jnp.zeros(labels.shape, bool)
    if high <= info.max:
        ok = ok & (labels < jnp.asarray(high, labels.dtype)) if high > info.min else jnp.zeros(labels.shape, bool)
    return ok


def _equals(labels: jax.Array, value: int) -> jax.Array:
    """``labels == value``; False everywhere when the dtype cannot hold ``value``."""
    info = jnp.iinfo(labels.dtype)
    if not info.min <= value <= info.max:
        return jnp.zeros(labels.shape, bool)
    return labels == jnp.asarray(value, labels.dtype)


def index_dtype(num_classes: int):
    """int32, or int64 for more than 2**31 - 1 classes (needs x64)."""
    return jnp.int64 if num_classes > np.iinfo(np.int32).max else jnp.int32


#: The default ``ignore_index`` of every function taking class ids: PyTorch's, TRL's, Liger-Kernel's and
#: what Hugging Face's data collators put at prompt and padding positions.
DEFAULT_IGNORE_INDEX = -100


def label_validity(labels: jax.Array, num_classes: int, valid: jax.Array, ignore_index, check_labels: bool):
    """Applies ``ignore_index``; returns ``(labels as int32/int64, valid)``.

    A counted label outside ``[0, C)`` is mapped to -1, which the kernels turn
    into a NaN loss; with ``check_labels`` a run-time error names the first
    offending flat index and value instead.
    """
    if ignore_index is not None:
        valid = valid & ~_equals(labels, ignore_index)
    in_range = _range_mask(labels, 0, num_classes)
    if check_labels:
        _check_at_run_time(labels, valid & ~in_range, num_classes, ignore_index)
    zero = jnp.zeros((), labels.dtype)
    wide = jnp.where(in_range, labels, zero).astype(index_dtype(num_classes))
    return jnp.where(in_range, wide, -1), valid


def _check_at_run_time(labels, bad, num_classes: int, ignore_index):
    """Raise (from a host callback) when any counted label is out of range.

    A callback works eagerly, under the caller's ``jit`` and under
    ``checkify`` alike; under ``jit`` the error arrives as a
    ``JaxRuntimeError`` that carries this message.
    """
    flat = bad.reshape(-1)
    first = jnp.argmax(flat)
    value = labels.reshape(-1)[first] if labels.size else jnp.zeros((), labels.dtype)

    def raise_if_bad(any_bad, index, value):
        if bool(any_bad):
            raise ValueError(
                f"{BAD_LABEL} [0, {num_classes}) or equal ignore_index={ignore_index}; "
                f"found {int(value)} at flat index {int(index)}."
            )

    jax.debug.callback(raise_if_bad, jnp.any(flat), first, value)


def check_host_labels(labels: Any, name: str = "labels") -> None:
    """Labels given as host data whose values JAX would change when converting them.

    With x64 disabled JAX converts int64 / uint64 arrays to 32 bits at the
    ``jit`` boundary, wrapping values of 2**31 and more to other (possibly
    valid) classes. Only host data (NumPy arrays, lists) can be seen here;
    arrays already on a device have their final dtype.
    """
    if isinstance(labels, jax.Array) or not isinstance(labels, (np.ndarray, list, tuple, np.integer, int)):
        return
    arr = np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        return
    target = jax.dtypes.canonicalize_dtype(arr.dtype)
    if target == arr.dtype or arr.size == 0:
        return
    info = np.iinfo(target)
    out = (arr < info.min) | (arr > info.max)
    if out.any():
        i = int(np.argmax(out.reshape(-1)))
        raise ValueError(
            f"{name} of dtype {arr.dtype} hold {arr.reshape(-1)[i]} at flat index {i}, which JAX would wrap "
            f"to {target} (x64 is disabled): the example would be scored against the wrong class. "
            f"Enable jax_enable_x64 or pass labels that fit {target}."
        )
