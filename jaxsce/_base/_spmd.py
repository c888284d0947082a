"""Helpers for running the kernels inside ``jax.shard_map``.

Inside ``shard_map`` every value has a set of mesh axes it *varies* over
(``check_vma=True``, the default), and reverse mode follows those types: the
cotangent of a ``psum`` result is the same on every device, and a value that
is replicated over an axis but used with varying data gets the ``psum`` of its
cotangent. With ``check_vma=False`` (formerly ``check_rep=False``) JAX tracks
no types and uses another convention: every value counts as varying, the
cotangent of a replicated output is divided by the number of devices, the
transpose of a ``psum`` is a ``psum``, and inputs get their cotangents summed
over the axes their ``in_specs`` do not mention.

The custom derivative rules contain ``psum`` s that JAX does not see, so they
have to follow whichever convention is in force (``vocab_unchecked``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

AxisName = str | tuple[str, ...] | None


def jax_version() -> tuple[int, ...]:
    """The installed JAX release as a tuple of ints, for feature fallbacks."""
    return tuple(int(part) for part in jax.__version__.split(".")[:3] if part.isdigit())


def axis_names(axis_name: AxisName) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def axis_size(axis_name: AxisName) -> int:
    """Static size of a (tuple of) mesh axis inside ``shard_map``."""
    if axis_name is None:
        return 1
    try:
        return int(lax.axis_size(axis_name))
    except (NameError, ValueError) as e:
        raise ValueError(
            f"axis_name={axis_name!r} is not a mesh axis bound here: call the "
            f"loss inside jax.shard_map over a mesh with that axis ({e})."
        ) from None


def varying_axes(x) -> frozenset:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (empty outside,
    and for every value under ``check_vma=False``).

    jax 0.10 exposes them as ``typeof(x).manual_axis_type.varying``, earlier
    releases as ``typeof(x).vma``; without either, nothing is tracked.
    """
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def unchecked(axis_name: AxisName) -> bool:
    """True inside ``shard_map(..., check_vma=False)`` over ``axis_name``.

    ``axis_index`` varies over its axis whenever JAX tracks varying axes, so
    its type tells the two conventions apart.
    """
    names = axis_names(axis_name)
    if not names:
        return False
    return not set(names) <= varying_axes(lax.axis_index(names))


def vary_like(tree, *like):
    """Give loop-carry initial values the sharding type of the inputs.

    Inside ``jax.shard_map`` a carry computed from sharded inputs "varies"
    over the mesh axes those inputs vary over, and ``fori_loop`` / ``cond``
    require matching types. Outside shard_map this is the identity.
    """
    axes = frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(like)))
    if not axes:
        return tree
    pcast, pvary = getattr(lax, "pcast", None), getattr(lax, "pvary", None)  # jax >= 0.7 / 0.6

    def vary(x):
        missing = tuple(sorted(axes - varying_axes(x)))
        if not missing:
            return x
        if pcast is not None:
            return pcast(x, missing, to="varying")
        assert pvary is not None, "jax >= 0.6 has lax.pvary or lax.pcast"
        return pvary(x, missing)

    return jax.tree.map(vary, tree)


def sum_to_type(cotangent, primal):
    """Sum a cotangent over the mesh axes it varies over but its primal does not.

    A weight replicated over a data-parallel axis receives one partial
    gradient per data shard; their sum is its gradient (the all-reduce every
    data-parallel step does). Identity outside shard_map and under
    ``check_vma=False``, where JAX sums input cotangents itself.
    """
    if cotangent is None:
        return cotangent
    extra = tuple(sorted(varying_axes(cotangent) - varying_axes(primal)))
    return lax.psum(cotangent, extra) if extra else cotangent


def shard_col0(width: int, axis_name: AxisName):
    """Global class index of this shard's first column of ``width`` (0 when unsharded)."""
    return 0 if axis_name is None else lax.axis_index(axis_name) * width


def psum_rows(*rows: jax.Array, axis_name: AxisName):
    """Sums per-row partials over the vocabulary shards in one collective."""
    if len(rows) == 1:
        return rows[0] if axis_name is None else lax.psum(rows[0], axis_name)
    if axis_name is None:
        return rows
    if len({(x.shape, x.dtype) for x in rows}) > 1:  # e.g. a sampler's [rows, k] candidates
        return tuple(lax.psum(tuple(rows), axis_name))
    return tuple(lax.psum(jnp.stack(rows), axis_name))


def row_cotangents(*cts, axis_name: AxisName, is_unchecked: bool):
    """Cotangents of the per-row outputs, as the backward rule must read them.

    The rows were combined with a ``psum`` over the vocabulary axis inside
    the rule. Under ``check_vma=True`` their cotangent is already the whole
    one on every device (the transpose of a ``psum`` to an invariant value is
    a cast); under ``check_vma=False`` each device holds a share that sums to
    it (the transpose is a ``psum``).
    """
    if not is_unchecked:
        return cts
    return psum_tuple(*cts, axis_name=axis_name)


def psum_tuple(*rows: jax.Array, axis_name: AxisName) -> tuple:
    """As :func:`psum_rows`, always returning a tuple (also of one array)."""
    out = psum_rows(*rows, axis_name=axis_name)
    return (out,) if len(rows) == 1 else tuple(out)


def check_split_axes(name: str, x, reference, reference_name: str, axis_name: AxisName, batch_axis_name: AxisName):
    """Catch a class axis split over the mesh without ``axis_name``.

    ``x`` (logits or the projection) varies over every mesh axis that splits
    its classes; the labels (``reference``) have no class axis, so any axis
    over which ``x`` varies but they do not must be splitting the classes.
    Only visible under ``check_vma=True``.
    """
    extra = varying_axes(x) - varying_axes(reference) - set(axis_names(axis_name)) - set(axis_names(batch_axis_name))
    if extra:
        raise ValueError(
            f"{name} varies over the mesh axes {sorted(extra)} but {reference_name} do not: the class axis "
            f"appears to be split over them inside shard_map. Pass axis_name={sorted(extra)[0]!r} "
            f"(the mesh axis that splits the classes)."
        )


def check_named_axes(name: str, x, axis_name: AxisName, batch_axis_name: AxisName):
    """Inside ``shard_map``: every mesh axis ``x`` varies over must be named.

    For inputs that carry no array without a class axis to compare with
    (the logits of a divergence), a varying axis may split the classes or
    the examples, and only the caller knows which: ``axis_name`` or
    ``batch_axis_name`` must say. Only visible under ``check_vma=True``.
    """
    extra = varying_axes(x) - set(axis_names(axis_name)) - set(axis_names(batch_axis_name))
    if extra:
        axis = sorted(extra)[0]
        raise ValueError(
            f"{name} varies over the mesh axes {sorted(extra)} inside shard_map, which neither axis_name nor "
            f"batch_axis_name names: pass axis_name={axis!r} if that axis splits the classes, or "
            f"batch_axis_name={axis!r} if it splits the examples."
        )


def check_batch_named(total, batch_axis_name: AxisName):
    """Inside ``shard_map``: a reduced loss that still varies over a mesh axis splits the examples over it
    without ``batch_axis_name``, and would be each device's own mean. Only visible under ``check_vma=True``."""
    extra = varying_axes(total) - set(axis_names(batch_axis_name))
    if extra:
        axis = sorted(extra)[0]
        raise ValueError(
            f"the examples vary over the mesh axes {sorted(extra)} inside shard_map, which batch_axis_name does "
            f"not name: pass batch_axis_name={axis!r} (the axis that splits the examples) for the loss over the "
            f"whole batch, or reduction='none' for per-example losses."
        )
