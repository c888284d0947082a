"""Checks of the inputs the losses share: a linear head, and class ids at the hidden and the logit level.

Each check names the argument it refuses (with its shape or dtype), so that
every loss's errors read alike.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from .._base import _validate
from .._engine._stream import Head


def check_head(hidden, weight, bias, layout: str, prefix: str = "", linear: str = "linear_") -> tuple[Head, int]:
    """Checks one linear head; returns it with the tokens flattened, and its (local) vocabulary size.

    ``prefix`` and ``linear`` build the argument names in messages:
    ``hidden``/``linear_weight``/``linear_bias``, or ``student_hidden``/...
    """
    names = (f"{prefix}hidden", f"{prefix}{linear}weight", f"{prefix}{linear}bias")
    hidden = _validate.check_floating(hidden, names[0])
    weight = _validate.check_floating(weight, names[1])
    if hidden.ndim < 1:
        raise ValueError(f"{names[0]} must have shape [..., d], got shape {hidden.shape}.")
    if weight.ndim != 2:
        raise ValueError(f"{names[1]} must be 2-D ([d, V] or [V, d]), got shape {weight.shape}.")
    d = hidden.shape[-1]
    wd, v_local = (weight.shape[0], weight.shape[1]) if layout == "dv" else (weight.shape[1], weight.shape[0])
    if wd != d:
        other = "vd" if layout == "dv" else "dv"
        other_d = weight.shape[1] if layout == "dv" else weight.shape[0]
        looks = "a [V, d] table (an embedding's layout)" if other == "vd" else "a [d, V] matrix"
        hint = f" It looks like {looks}: pass weight_layout={other!r}." if other_d == d else ""
        raise ValueError(
            f"{names[0]} has feature size {d} (shape {hidden.shape}) but {names[1]} of shape "
            f"{weight.shape} with weight_layout={layout!r} has input size {wd}.{hint}"
        )
    if v_local == 0:
        raise ValueError(f"{names[1]} of shape {weight.shape} (weight_layout={layout!r}) has no classes.")
    if bias is not None:
        bias = _validate.check_floating(bias, names[2])
        if bias.shape != (v_local,):
            raise ValueError(f"{names[2]} has shape {bias.shape} but must have shape ({v_local},).")
    return Head(hidden.reshape(math.prod(hidden.shape[:-1]), d), weight, bias), v_local


def check_class_ids(labels, batch_shape, hidden_shape):
    """Integer class ids of the tokens' shape."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype} with shape {labels.shape}.")
    if labels.shape != batch_shape:
        raise ValueError(f"labels have shape {labels.shape} but hidden of shape {hidden_shape} needs {batch_shape}.")
    return labels


def check_logit_labels(labels, logits, axis, batch_shape):
    """Integer class ids of the logits' batch shape (``logits.shape`` without the class axis)."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype} with shape {labels.shape}.")
    if labels.shape != batch_shape:
        raise ValueError(
            f"labels have shape {labels.shape}, but logits of shape {logits.shape} with class axis "
            f"{axis} need shape {batch_shape}."
        )
    return labels
