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

import jax
from jax.sharding import Mesh, PartitionSpec

from . import _options
from ._cross_entropy import cross_entropy
from ._linear import linear_cross_entropy
from ._reduce import LossAux

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


def _check_mesh(mesh: Mesh, *names):
    for name in names:
        for n in (name,) if isinstance(name, str) else (name or ()):
            if n not in mesh.axis_names:
                raise ValueError(f"axis {n!r} is not an axis of the mesh {dict(mesh.shape)}.")


def _run(fn, mesh: Mesh, specs, out_specs, args, check_vma: bool):
    # Optional arguments left as None take no spec.
    in_specs = tuple(None if a is None else spec for a, spec in zip(args, specs))
    # Meshes with Explicit axes require inputs already laid out as in_specs;
    # Auto meshes let shard_map reshard inside jit.
    explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
    if explicit:
        reshard = getattr(jax.sharding, "reshard", None)
        if reshard is None:
            raise NotImplementedError(
                f"meshes with Explicit axes need jax >= 0.7, where explicit sharding is public (this is jax "
                f"{jax.__version__}); build the mesh with axis_types=(jax.sharding.AxisType.Auto, ...)."
            )
        args = tuple(
            a if s is None else reshard(a, jax.sharding.NamedSharding(mesh, s)) for a, s in zip(args, in_specs)
        )
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)(*args)


def _out_specs(reduction: str, return_aux: bool, batch_spec: PartitionSpec):
    loss = batch_spec if reduction == "none" else PartitionSpec()
    if not return_aux:
        return loss
    # LossAux as a pytree of specs, one per field.
    aux_specs = LossAux._make((batch_spec, batch_spec, PartitionSpec(), PartitionSpec()))
    return (loss, aux_specs)


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
    **options,
):
    """:func:`jaxsce.cross_entropy` over a mesh: classes split by ``vocab_axis``.

    ``logits [B, ..., C]`` have their class axis last; their leading axis is
    split over ``batch_axes`` and the class axis over ``vocab_axis`` (either
    may be None). ``labels`` (class ids ``[B, ...]`` or probabilities like
    ``logits``), ``where``, ``sample_weight`` and ``weight [C]`` are split to match. Results equal
    the unsharded call; ``"mean"`` counts examples over all batch shards.

    Example (a 2-D mesh, data x model)::

        mesh = jax.make_mesh((2, 4), ("data", "model"))
        loss = jax.jit(lambda z, y: jaxsce.sharded_cross_entropy(
            z, y, mesh=mesh, vocab_axis="model", batch_axes="data", label_smoothing=0.1))(z, y)

    ``check_vma`` is passed to ``jax.shard_map``; results and gradients are
    the same either way. Other keyword options are passed to
    :func:`jaxsce.cross_entropy` (not
    ``axis``: the class axis is last).
    """
    if "axis" in options or "axis_name" in options or "batch_axis_name" in options:
        raise ValueError("sharded_cross_entropy takes vocab_axis/batch_axes; the class axis is the last axis.")
    _options.check_keywords("sharded_cross_entropy", options, _FORWARDED_CE)
    vocab, batch = _axes(vocab_axis), _axes(batch_axes)
    _check_mesh(mesh, vocab, batch)
    rest = (None,) * (logits.ndim - 2)
    logit_spec = PartitionSpec(batch, *rest, vocab)
    soft = jax.numpy.issubdtype(jax.numpy.asarray(labels).dtype, jax.numpy.floating)
    batch_spec = PartitionSpec(batch, *rest)
    specs = (logit_spec, logit_spec if soft else batch_spec, batch_spec, PartitionSpec(vocab), batch_spec)

    def local(z, y, mask, w, sw):
        return cross_entropy(
            z,
            y,
            where=mask,
            weight=w,
            sample_weight=sw,
            reduction=reduction,
            return_aux=return_aux,
            axis_name=vocab,
            batch_axis_name=batch,
            **options,
        )

    args = (logits, labels, where, weight, sample_weight)
    return _run(local, mesh, specs, _out_specs(reduction, return_aux, batch_spec), args, check_vma)


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
    **options,
):
    """:func:`jaxsce.linear_cross_entropy` over a mesh.

    ``hidden [B, ..., d]`` is split over ``batch_axes`` on its leading axis;
    ``linear_weight`` (``[d, V]``, or ``[V, d]`` with ``weight_layout="vd"``),
    ``linear_bias`` and the class weights ``weight`` are split over ``vocab_axis`` on their
    vocabulary axis; ``labels``/``where``/``sample_weight`` follow ``hidden``. No logits, and no
    all-gather of the weight: each device streams over its own vocabulary
    shard, and the shards combine a few floats per token. ``check_vma`` is
    passed to ``jax.shard_map`` (results and gradients are the same either way).
    """
    _options.check_keywords("sharded_linear_cross_entropy", options, _FORWARDED_LINEAR)
    if "axis_name" in options or "batch_axis_name" in options:
        raise ValueError("sharded_linear_cross_entropy takes vocab_axis/batch_axes.")
    vocab, batch = _axes(vocab_axis), _axes(batch_axes)
    _check_mesh(mesh, vocab, batch)
    rest = (None,) * (hidden.ndim - 2)
    batch_spec = PartitionSpec(batch, *rest)
    w_spec = PartitionSpec(None, vocab) if weight_layout == "dv" else PartitionSpec(vocab, None)
    specs = (
        PartitionSpec(batch, *rest, None),
        w_spec,
        batch_spec,
        batch_spec,
        PartitionSpec(vocab),
        PartitionSpec(vocab),
        batch_spec,
    )
    args = (hidden, linear_weight, labels, where, linear_bias, weight, sample_weight)

    def local(h, w, y, mask, b, cw, sw):
        return linear_cross_entropy(
            h,
            w,
            y,
            linear_bias=b,
            weight=cw,
            sample_weight=sw,
            where=mask,
            weight_layout=weight_layout,
            reduction=reduction,
            return_aux=return_aux,
            axis_name=vocab,
            batch_axis_name=batch,
            **options,
        )

    return _run(local, mesh, specs, _out_specs(reduction, return_aux, batch_spec), args, check_vma)
