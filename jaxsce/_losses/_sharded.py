"""Sharded losses for users of ``jax.jit`` with ``NamedSharding`` arrays.

The losses themselves are SPMD-ready: inside ``jax.shard_map``,
``axis_name`` names the mesh axis that splits the classes (vocabulary
parallelism, as in Megatron-LM) and ``batch_axis_name`` the axes that split
the examples. These wrappers build that ``shard_map`` from a mesh and axis
names, so that a model sharded with ``NamedSharding`` needs no hand-written
``shard_map``.

Communication per device and step, for ``T`` local tokens (no tensor of the
logits' or the weight's size is ever communicated):

* ``cross_entropy``: forward one ``pmax`` of ``T`` floats and one ``psum`` of
  ``3T`` (``4T`` with class weights) floats over the vocabulary axis, plus
  2 scalars over the batch axes; the backward is local.
* ``linear_cross_entropy``: the same in the forward; the backward adds one
  ``psum`` of ``d_hidden`` (``T x d`` floats), which any tensor-parallel
  output projection needs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal, overload

import jax
from jax.sharding import Mesh

from .._api import _auto, _options
from .._base._reduce import LossAux
from ._cross_entropy import cross_entropy
from ._linear import linear_cross_entropy

# The options the wrappers pass on (a mistyped one is named up front, with the nearest valid names).
_FORWARDED_CE = tuple(inspect.signature(cross_entropy).parameters)
_FORWARDED_LINEAR = tuple(inspect.signature(linear_cross_entropy).parameters)

AxisNames = str | Sequence[str] | None


def _axes(names: AxisNames):
    if names is None:
        return None
    if isinstance(names, str):
        return names
    names = tuple(names)
    return names[0] if len(names) == 1 else names


@overload
def sharded_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, mesh: Mesh, return_aux: Literal[False] = False, **options: Any
) -> jax.Array: ...
@overload
def sharded_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, mesh: Mesh, return_aux: Literal[True], **options: Any
) -> tuple[jax.Array, LossAux]: ...
@overload
def sharded_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, mesh: Mesh, return_aux: bool, **options: Any
) -> jax.Array | tuple[jax.Array, LossAux]: ...
@_options.keyword_checked
def sharded_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mesh: Mesh,
    vocab_axis: AxisNames = None,
    batch_axes: AxisNames = None,
    where: jax.Array | None = None,
    weight: jax.Array | None = None,
    sample_weight: jax.Array | None = None,
    reduction: str = "mean",
    return_aux: bool = False,
    check_vma: bool = True,
    **options: Any,
) -> jax.Array | tuple[jax.Array, LossAux]:
    """:func:`jaxsce.cross_entropy` over a mesh: classes split by ``vocab_axis``.

    ``logits [B, ..., C]`` have their class axis last; their leading axis is
    split over ``batch_axes`` and the class axis over ``vocab_axis`` (either
    may be None). ``labels`` (class ids ``[B, ...]`` or probabilities like
    ``logits``), ``where``, ``sample_weight`` and ``weight [C]`` are split to match. Results equal
    the unsharded call; ``"mean"`` counts examples over all batch shards.

    A class count that ``vocab_axis`` does not divide is padded inside the
    call (the padding columns are left out of every sum, as ``num_classes``
    does). ``check_vma`` is passed to ``jax.shard_map``; results and gradients
    are the same either way. Other keyword options are passed to
    :func:`jaxsce.cross_entropy` (not ``axis``: the class axis is last).

    Args:
      logits: ``[B, ..., C]`` floating logits, class axis last.
      labels: class ids ``[B, ...]`` (integer) or probabilities ``[B, ..., C]``.
      mesh: the ``jax.sharding.Mesh`` to run on.
      vocab_axis: mesh axis name(s) that split the classes, or None.
      batch_axes: mesh axis name(s) that split the leading axis, or None.

    Returns:
      What :func:`jaxsce.cross_entropy` returns for the same arguments.

    Raises:
      ValueError: ``axis``, ``axis_name`` or ``batch_axis_name`` given (the
        wrapper sets them), a mesh axis that is not in ``mesh``, or what
        :func:`jaxsce.cross_entropy` raises, in the global shapes.
      TypeError: an unknown keyword option (the nearest valid names are
        suggested).

    Examples:
      A 2-D mesh on 8 devices is ``jax.make_mesh((2, 4), ("data", "model"))``;
      the same call runs on a 1 × 1 mesh:

      >>> import jax, jax.numpy as jnp, jaxsce
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> z = jnp.zeros((4, 1000), jnp.float32)
      >>> y = jnp.array([0, 1, 2, 3], jnp.int32)
      >>> jaxsce.sharded_cross_entropy(z, y, mesh=mesh, vocab_axis="model", batch_axes="data")
      Array(6.907755, dtype=float32)
    """
    if "axis" in options or "axis_name" in options or "batch_axis_name" in options:
        raise ValueError("sharded_cross_entropy takes vocab_axis/batch_axes; the class axis is the last axis.")
    _options.check_keywords("sharded_cross_entropy", options, _FORWARDED_CE)
    return _auto.call_over(
        cross_entropy,
        "sharded_cross_entropy",
        mesh,
        _axes(vocab_axis),
        _axes(batch_axes),
        check_vma,
        logits,
        labels,
        where=where,
        weight=weight,
        sample_weight=sample_weight,
        reduction=reduction,
        return_aux=return_aux,
        **options,
    )


@overload
def sharded_linear_cross_entropy(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    *,
    mesh: Mesh,
    return_aux: Literal[False] = False,
    **options: Any,
) -> jax.Array: ...
@overload
def sharded_linear_cross_entropy(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    *,
    mesh: Mesh,
    return_aux: Literal[True],
    **options: Any,
) -> tuple[jax.Array, LossAux]: ...
@overload
def sharded_linear_cross_entropy(
    hidden: jax.Array, linear_weight: jax.Array, labels: jax.Array, *, mesh: Mesh, return_aux: bool, **options: Any
) -> jax.Array | tuple[jax.Array, LossAux]: ...
@_options.keyword_checked
def sharded_linear_cross_entropy(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    *,
    mesh: Mesh,
    vocab_axis: AxisNames = None,
    batch_axes: AxisNames = None,
    linear_bias: jax.Array | None = None,
    weight: jax.Array | None = None,
    sample_weight: jax.Array | None = None,
    where: jax.Array | None = None,
    weight_layout: str = "dv",
    reduction: str = "mean",
    return_aux: bool = False,
    check_vma: bool = True,
    **options: Any,
) -> jax.Array | tuple[jax.Array, LossAux]:
    """:func:`jaxsce.linear_cross_entropy` over a mesh.

    ``hidden [B, ..., d]`` is split over ``batch_axes`` on its leading axis;
    ``linear_weight`` (``[d, V]``, or ``[V, d]`` with ``weight_layout="vd"``),
    ``linear_bias`` and the class weights ``weight`` are split over ``vocab_axis`` on their
    vocabulary axis; ``labels``/``where``/``sample_weight`` follow ``hidden``. No logits, and no
    all-gather of the weight: each device streams over its own vocabulary
    shard, and the shards combine a few floats per token. A vocabulary that
    ``vocab_axis`` does not divide is padded inside the call (the padding
    columns are left out of every sum). ``check_vma`` is passed to
    ``jax.shard_map`` (results and gradients are the same either way). Other
    keyword options are passed to :func:`jaxsce.linear_cross_entropy`.

    Args:
      hidden: ``[B, ..., d]`` floating hidden states.
      linear_weight: ``[d, V]`` (or ``[V, d]`` with ``weight_layout="vd"``).
      labels: ``[B, ...]`` integer class ids.
      mesh: the ``jax.sharding.Mesh`` to run on.
      vocab_axis: mesh axis name(s) that split the vocabulary, or None.
      batch_axes: mesh axis name(s) that split the leading axis, or None.

    Returns:
      What :func:`jaxsce.linear_cross_entropy` returns for the same arguments.

    Raises:
      ValueError: ``axis_name`` or ``batch_axis_name`` given (the wrapper sets
        them), or what :func:`jaxsce.linear_cross_entropy` raises, checked on
        the global shapes (``linear_weight of shape (1000, 32)``, with the
        ``weight_layout="vd"`` hint).
      TypeError: an unknown keyword option (the nearest valid names are
        suggested).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxsce
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> h = jnp.ones((4, 8), jnp.float32) / 8
      >>> w = jnp.zeros((8, 1000), jnp.float32)
      >>> y = jnp.array([0, 1, 2, 3], jnp.int32)
      >>> jaxsce.sharded_linear_cross_entropy(h, w, y, mesh=mesh, vocab_axis="model", batch_axes="data")
      Array(6.907755, dtype=float32)
    """
    _options.check_keywords("sharded_linear_cross_entropy", options, _FORWARDED_LINEAR)
    if "axis_name" in options or "batch_axis_name" in options:
        raise ValueError("sharded_linear_cross_entropy takes vocab_axis/batch_axes.")
    return _auto.call_over(
        linear_cross_entropy,
        "sharded_linear_cross_entropy",
        mesh,
        _axes(vocab_axis),
        _axes(batch_axes),
        check_vma,
        hidden,
        linear_weight,
        labels,
        linear_bias=linear_bias,
        weight=weight,
        sample_weight=sample_weight,
        where=where,
        weight_layout=weight_layout,
        reduction=reduction,
        return_aux=return_aux,
        **options,
    )
