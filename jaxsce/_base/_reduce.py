"""Reductions of per-example losses, and the auxiliary outputs.

Shared by ``cross_entropy`` and ``linear_cross_entropy`` so that ``"mean"``,
data-parallel normalization and the accuracy are defined once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import _spmd


class LossAux(NamedTuple):
    """Auxiliary outputs of a loss, computed in the same pass as the loss.

    Attributes:
      lse: per-example log-sum-exp of the transformed logits (``softcap(z) / T``), batch shape,
        float32 (float64 under x64); 0 for examples that are not counted.
      z_loss: per-example z-loss term ``z_loss * lse**2`` (0 where not counted).
      accuracy: scalar top-1 accuracy over the counted examples (0 if none).
        An example is a hit when its label is the row's argmax, ties going
        to the first (lowest) class index as in ``jnp.argmax``: with two
        equal maxima only the first counts. For probability targets: the
        argmax class carries the target's largest probability.
      count: scalar number of counted examples (after ``where`` and
        ``ignore_index``), summed over ``batch_axis_name`` when given.
      predictions: per-example argmax class id (int32, batch shape): the
        first maximum, as ``accuracy`` breaks ties; -1 for examples that are
        not counted.
    """

    lse: jax.Array
    z_loss: jax.Array
    accuracy: jax.Array
    count: jax.Array
    predictions: jax.Array


def _psum(x, axes):
    return x if axes is None else lax.psum(x, axes)


def reduce_loss(per_example: jax.Array, normalizer: jax.Array, reduction: str, batch_axes, counted: jax.Array):
    """``"none"``: as is; ``"sum"``: total; ``"mean"``: total / sum(normalizer).

    ``normalizer`` holds each example's share of the mean's denominator: 1 per
    counted example, or its target's class weight (PyTorch), times its sample
    weight; ``counted`` is the number of counted examples (any shape, summed).
    When nothing is counted the mean is 0 with zero gradient instead of
    PyTorch's NaN, which would poison parameters in a jitted loop. When
    examples are counted but their weights sum to 0 (all-zero weights, or
    signed weights that cancel), the division is made as PyTorch makes it:
    ``+-inf`` or NaN, never a plausible 0.
    """
    if reduction == "none":
        return per_example
    total = jnp.sum(per_example)
    if reduction == "sum":
        # A shard's own sum is a correct share of the global one (the shard_map idiom
        # psum(loss(..., reduction="sum"), "data")), so an unnamed batch axis is no error here.
        return _psum(total, batch_axes)
    _spmd.check_batch_named(total, batch_axes)
    denom = jnp.sum(normalizer.astype(total.dtype))
    count = jnp.sum(counted.astype(total.dtype))
    if batch_axes is not None:
        total, denom, count = lax.psum(jnp.stack([total, denom, count]), batch_axes)
    empty = count == 0
    return jnp.where(empty, 0, total / jnp.where(empty, 1, denom))


def make_aux(lse, z_term, correct, valid, batch_axes, predictions) -> LossAux:
    hits = jnp.sum(correct.astype(jnp.float32))
    count = jnp.sum(valid.astype(jnp.float32))
    if batch_axes is not None:
        hits, count = lax.psum(jnp.stack([hits, count]), batch_axes)
    accuracy = hits / jnp.maximum(count, 1)
    return LossAux(lse=lse, z_loss=z_term, accuracy=accuracy, count=count, predictions=predictions)


def finish_cross_entropy(
    outputs, valid, z_loss, reduction: str, *, sample_weight=None, return_aux: bool, batch_axis_name, batch_shape
):
    """Adds the z-loss to a kernel's per-example outputs, weights, reduces, builds the aux.

    ``outputs`` are the kernels' ``(ce, lse, correct, w_y, pred)`` over the
    flattened examples; ``z_loss`` is None (off) or a 0-d array;
    ``sample_weight`` None or per-example weights ``s`` (constants): the
    loss is ``s * (ce + z-loss)`` and its share of the mean's denominator
    ``s * w_y``. An example that is not counted contributes exactly 0 whatever
    its sample weight (NaN included). The aux outputs are not weighted.
    """
    ce, lse, correct, w_y, pred = outputs
    z_term = jnp.zeros_like(lse) if z_loss is None else z_loss * jnp.square(lse)
    per_example = ce if z_loss is None else ce + z_term
    if sample_weight is not None:
        sample_weight = jnp.where(valid, sample_weight, 0)
        per_example, w_y = per_example * sample_weight, w_y * sample_weight
    loss = reduce_loss(per_example, w_y, reduction, batch_axis_name, valid)
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    if not return_aux:
        return loss
    predictions = jnp.where(valid, pred, -1).astype(jnp.int32).reshape(batch_shape)
    aux = make_aux(lse.reshape(batch_shape), z_term.reshape(batch_shape), correct, valid, batch_axis_name, predictions)
    return loss, aux


def _register_for_export() -> None:
    """Lets ``jax.export`` serialize functions that return a ``LossAux``."""
    try:
        from jax import export  # a submodule that jax < 0.7 does not import by itself
    except ImportError:  # pragma: no cover
        return
    register = getattr(export, "register_namedtuple_serialization", None)
    if register is not None:
        register(LossAux, serialized_name="jaxsce.LossAux")


_register_for_export()
