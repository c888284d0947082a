"""Losses that read the sharding of their inputs: the ``shard_map`` every loss can run in, built for the user.

Inside ``jax.shard_map`` every loss is SPMD-ready: ``axis_name`` names the
mesh axes that split the classes, ``batch_axis_name`` those that split the
examples. This module builds that ``shard_map`` in two cases:

* **automatically** (:func:`spmd`, applied to every public loss): where the
  sharding of the inputs is visible -- ``Explicit`` mesh axes in their types
  under ``jit``, or concrete arrays with a ``NamedSharding`` outside it --
  a loss called without ``axis_name``/``batch_axis_name`` takes the mesh
  axes that split its class axis (the logits', or a weight's vocabulary
  axis) as the vocabulary axes and those that split its rows as the batch
  axes;
* **from given axes** (:func:`run`, the ``sharded_*`` wrappers).

Each argument of a loss has a role (:class:`Role`) that says which of its
dimensions are rows, classes or features, so one plan covers every loss.
Small inputs laid out otherwise (labels, masks, biases, class weights,
hidden states) are resharded to the plan; weights and logits split over
other axes than the vocabulary's are an error rather than a silent gather.
Vocabularies that do not divide the vocabulary axes are padded, with
``num_classes`` telling the loss which columns are real. The outputs' specs
and any shape error come from tracing the unsharded loss on the global
shapes (``jax.eval_shape``), so messages name the shapes the user passed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple, ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .._base import _validate

_P = ParamSpec("_P")
_R = TypeVar("_R")

Axes = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Role:
    """What an argument's dimensions are.

    ``kind``: ``"classes"`` (rows and one class axis, the loss's ``axis``
    option), ``"labels"`` (class ids of the rows, or probabilities shaped
    like the logits when floating), ``"rows"`` (per-row data: a prefix of
    the row dimensions), ``"hidden"`` (rows and a feature axis),
    ``"weight"`` (a ``[d, V]`` or ``[V, d]`` head: ``layout`` names the
    options giving its layout, the first one set wins) or ``"vocab"``
    (``[V]``: a bias, class weights).
    """

    kind: str
    layout: tuple[str, ...] = ()


CLASSES, LABELS, ROWS, HIDDEN, VOCAB = (Role(k) for k in ("classes", "labels", "rows", "hidden", "vocab"))


def weight(*layout_options: str) -> Role:
    return Role("weight", layout_options)


class Plan(NamedTuple):
    """A mesh, the vocabulary axes, and the batch axes of each row dimension."""

    mesh: Any
    vocab: Axes
    rows: tuple[Axes, ...]

    @property
    def batch(self) -> Axes:
        return tuple(a for dim in self.rows for a in dim)


def _name(axes: Axes):
    """Mesh axes as a loss's ``axis_name`` takes them: None, one name, or a tuple."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def _entry(axes: Axes):
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def _as_axes(entry) -> Axes:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _traced(x) -> bool:
    return _validate.is_tracer(x)


# --- what is visible ------------------------------------------------------------------


def _visible(x):
    """``(mesh, per-dimension axes)`` of the sharding ``x`` shows, or None.

    A traced value shows the ``Explicit`` axes of its type; a concrete array
    its ``NamedSharding``. Inside ``shard_map`` (manual axes) nothing is
    read: the caller names the axes there.
    """
    axis_type = getattr(jax.sharding, "AxisType", None)
    explicit, manual = getattr(axis_type, "Explicit", None), getattr(axis_type, "Manual", None)
    if _traced(x):
        if explicit is None:
            return None
        try:
            sharding = jax.typeof(x).sharding
            mesh, spec = sharding.mesh, sharding.spec
        except AttributeError:  # releases without sharding in types
            return None
        types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ())))
        if manual is not None and manual in types.values():
            return None
        keep = {n for n, t in types.items() if t == explicit}
    elif isinstance(x, jax.Array) and isinstance(sharding := getattr(x, "sharding", None), NamedSharding):
        mesh, spec = sharding.mesh, sharding.spec
        keep = set(mesh.axis_names)
    else:
        return None
    dims = tuple(tuple(a for a in _as_axes(e) if a in keep and mesh.shape[a] > 1) for e in spec)
    dims = dims + ((),) * (np.ndim(x) - len(dims))
    return (mesh, dims) if any(dims) else None


# --- the plan -------------------------------------------------------------------------


def _class_axis(options: dict, x) -> int | None:
    axis = options.get("axis", -1)
    if not isinstance(axis, int):
        return None
    return axis % x.ndim


def _layout(role: Role, options: dict) -> str:
    for name in role.layout:
        if options.get(name) is not None:
            return options[name]
    return "dv"


def _dims(role: Role, x, options: dict, logits_ndim: int | None):
    """``(row dimensions, class dimension or None, feature dimension or None)`` of ``x`` in its role."""
    nd = np.ndim(x)
    kind = role.kind
    if kind == "labels":
        floating = jnp.issubdtype(getattr(x, "dtype", None) or np.asarray(x).dtype, jnp.floating)
        kind = "classes" if floating and nd == logits_ndim else "rows"
    if kind == "classes":
        c = _class_axis(options, x)
        return tuple(i for i in range(nd) if i != c), c, None
    if kind == "rows":
        return tuple(range(nd)), None, None
    if kind == "hidden":
        return tuple(range(nd - 1)), None, nd - 1
    if kind == "weight":
        return (), (1 if _layout(role, options) == "dv" else 0), (0 if _layout(role, options) == "dv" else 1)
    return (), 0, None  # vocab


def _logits_ndim(args: dict, roles: dict) -> int | None:
    for name, role in roles.items():
        if role.kind == "classes" and args.get(name) is not None:
            return np.ndim(args[name])
    return None


def _row_count(args: dict, roles: dict, options: dict, logits_ndim) -> int:
    """How many row dimensions the loss has: those of its logits or hidden states (else of any input)."""
    given = [(role, args[n]) for n, role in roles.items() if args.get(n) is not None]
    primary = [len(_dims(r, x, options, logits_ndim)[0]) for r, x in given if r.kind in ("classes", "hidden")]
    return max(primary or [len(_dims(r, x, options, logits_ndim)[0]) for r, x in given] or [0])


def _find_plan(fn_name: str, args: dict, roles: dict, options: dict, leading: bool) -> Plan | None:
    """The plan the inputs' visible shardings give (None when nothing is visibly sharded)."""
    seen = {name: _visible(args[name]) for name in roles if args.get(name) is not None}
    seen = {k: v for k, v in seen.items() if v is not None}
    if not seen:
        return None
    meshes = {name: mesh for name, (mesh, _) in seen.items()}
    first = next(iter(meshes))
    mesh = meshes[first]
    for name, other in meshes.items():
        if dict(other.shape) != dict(mesh.shape):
            raise ValueError(
                f"{fn_name}: {name} is sharded over the mesh {dict(other.shape)} but {first} over "
                f"{dict(mesh.shape)}: put every input on one mesh."
            )
    # Under jit, the abstract mesh of a traced input (concrete constants may carry a concrete one).
    traced = next((n for n in seen if _traced(args[n])), None)
    if traced is not None:
        mesh = meshes[traced]
    logits_ndim = _logits_ndim(args, roles)
    vocab: Axes | None = None
    vocab_from = ""
    n_rows = _row_count(args, roles, options, logits_ndim)
    rows: list[Axes] = [() for _ in range(n_rows)]
    order = sorted(roles, key=lambda n: roles[n].kind not in ("classes", "hidden"))
    for name in order:
        if name not in seen:
            continue
        role, dims = roles[name], seen[name][1]
        r, c, _ = _dims(role, args[name], options, logits_ndim)
        if c is not None and role.kind != "vocab" and role.kind != "rows":
            if _class_axis(options, args[name]) is None and role.kind == "classes":
                raise ValueError(f"{fn_name}: a sharded {name} needs a single class axis (axis={options.get('axis')}).")
            if dims[c]:
                if vocab is None:
                    vocab, vocab_from = dims[c], name
                elif dims[c] != vocab:
                    raise ValueError(
                        f"{fn_name}: {name} has its classes split over {list(dims[c])} but {vocab_from} over "
                        f"{list(vocab)}: split both over the same mesh axes."
                    )
        for i, d in enumerate(r):
            if i < n_rows and dims[d] and not rows[i]:
                rows[i] = dims[d]
    if vocab is None:
        # Only per-class vectors (a bias, class weights) may show it.
        for name, role in roles.items():
            if role.kind == "vocab" and name in seen and seen[name][1][0]:
                vocab = seen[name][1][0]
                break
    vocab = vocab or ()
    if leading:
        rows = rows[:1] + [() for _ in rows[1:]]
    used = [a for dim in rows for a in dim]
    clash = sorted(set(vocab) & set(used))
    if clash or len(set(used)) != len(used):
        raise ValueError(
            f"{fn_name}: the mesh axes {clash or used} split both the classes and the rows (or two row "
            "dimensions): give each mesh axis one role."
        )
    if not vocab and not used:
        return None
    return Plan(mesh, tuple(vocab), tuple(rows))


# --- running a plan -------------------------------------------------------------------


def _spec(role: Role, x, plan: Plan, options: dict, logits_ndim) -> PartitionSpec:
    r, c, _ = _dims(role, x, options, logits_ndim)
    entries: list = [None] * np.ndim(x)
    for i, d in enumerate(r):
        if i < len(plan.rows):
            entries[d] = _entry(plan.rows[i])
    if c is not None:
        entries[c] = _entry(plan.vocab)
    return PartitionSpec(*entries)


def _vocab_size(args: dict, roles: dict, options: dict, logits_ndim) -> int | None:
    for name, role in roles.items():
        x = args.get(name)
        if x is None or role.kind not in ("classes", "weight"):
            continue
        c = _dims(role, x, options, logits_ndim)[1]
        assert c is not None  # classes and weights have a class axis
        return np.shape(x)[c]
    return None


def _pad_classes(args: dict, roles: dict, options: dict, logits_ndim, plan: Plan):
    """Pads every class axis to a multiple of the vocabulary shards; returns the args and ``num_classes``."""
    shards = math.prod(plan.mesh.shape[a] for a in plan.vocab)
    v = _vocab_size(args, roles, options, logits_ndim)
    if v is None or shards == 1 or v % shards == 0:
        return args, options.get("num_classes")
    pad = -v % shards
    out = dict(args)
    for name, role in roles.items():
        x = args.get(name)
        if x is None:
            continue
        _, c, _ = _dims(role, x, options, logits_ndim)
        if c is None or role.kind == "rows":
            continue
        widths = [(0, 0)] * np.ndim(x)
        widths[c] = (0, pad)
        out[name] = jnp.pad(x, widths)
    given = options.get("num_classes")
    return out, v if given is None else min(given, v)


def _place(x, sharding: NamedSharding):
    """``x`` laid out as ``sharding`` (Explicit meshes need it before ``shard_map``)."""
    reshard = getattr(jax.sharding, "reshard", None)
    if reshard is None:
        raise NotImplementedError(
            f"meshes with Explicit axes need jax >= 0.7, where explicit sharding is public (this is jax "
            f"{jax.__version__}); build the mesh with axis_types=(jax.sharding.AxisType.Auto, ...)."
        )
    if _traced(x):
        return reshard(x, sharding)
    return jax.device_put(x, sharding)


def run(fn: Callable, fn_name: str, bound: dict, roles: dict, plan: Plan, *, check_vma: bool = True):
    """``fn(**bound)`` inside a ``shard_map`` over ``plan``, with ``axis_name``/``batch_axis_name`` set.

    ``bound`` holds every parameter by name. Arrays in the roles get their
    role's spec; other array leaves (traced float options) are replicated.
    """
    options = {k: v for k, v in bound.items() if k not in roles}
    logits_ndim = _logits_ndim(bound, roles)
    args = {k: v if v is None or _is_array(v) or _traced(v) else jnp.asarray(v) for k, v in bound.items() if k in roles}
    args, num_classes = _pad_classes(args, roles, options, logits_ndim, plan)
    static = dict(options)
    if "num_classes" in bound:
        static["num_classes"] = num_classes
    # Global shapes first: errors name what the user passed, and the outputs' ranks give their specs.
    everything = {**bound, **args, **static}
    flat, structure = jax.tree.flatten(everything, is_leaf=lambda a: a is None)
    where = [i for i, a in enumerate(flat) if _is_array(a) or _traced(a)]

    def whole(*xs):
        values = list(flat)
        for i, x in zip(where, xs):
            values[i] = x
        return fn(**jax.tree.unflatten(structure, values))

    out_shapes = jax.eval_shape(whole, *(jax.ShapeDtypeStruct(np.shape(flat[i]), flat[i].dtype) for i in where))

    names = list(roles)
    arrays = [args[n] for n in names]
    specs = [None if a is None else _spec(roles[n], a, plan, options, logits_ndim) for n, a in zip(names, arrays)]
    leaves, tree = jax.tree.flatten(static, is_leaf=lambda a: a is None)
    traced = [i for i, a in enumerate(leaves) if _is_array(a) or _traced(a)]
    extra = [leaves[i] for i in traced]

    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    if explicit is not None and any(t == explicit for t in getattr(plan.mesh, "axis_types", ())):
        arrays = [a if s is None else _place(a, NamedSharding(plan.mesh, s)) for a, s in zip(arrays, specs)]
        extra = [_place(jnp.asarray(a), NamedSharding(plan.mesh, PartitionSpec())) for a in extra]

    rows_spec = tuple(_entry(d) for d in plan.rows)

    def out_spec(s):
        return PartitionSpec(*rows_spec[: len(s.shape)])

    out_specs = jax.tree.map(out_spec, out_shapes)

    def local(arrays, extra):
        values = list(leaves)
        for i, a in zip(traced, extra):
            values[i] = a
        kw = jax.tree.unflatten(tree, values)
        kw.update(zip(names, arrays))
        kw["axis_name"] = _name(plan.vocab)
        if "batch_axis_name" in kw:  # log-probs are per row: no batch reduction to name
            kw["batch_axis_name"] = _name(plan.batch)
        return fn(**kw)

    in_specs = (specs, [PartitionSpec()] * len(extra))
    mapped = jax.shard_map(local, mesh=plan.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
    return mapped(arrays, extra)


def spmd(*, leading: bool = False, **roles: Role) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorator: the loss takes the vocabulary- and data-parallel path by itself where its inputs'
    sharding is visible and neither ``axis_name`` nor ``batch_axis_name`` was given.

    ``roles`` maps argument names to :class:`Role` s; ``leading``: only the
    leading row dimension may be split (a loss that combines a sequence's
    tokens).
    """

    def wrap(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def loss(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            if kwargs.get("axis_name") is not None or kwargs.get("batch_axis_name") is not None:
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            given = dict(bound.arguments)
            plan = _find_plan(fn.__name__, given, roles, given, leading)
            if plan is None:
                return fn(*args, **kwargs)
            return run(fn, fn.__name__, given, roles, plan)

        loss.roles = roles  # type: ignore[attr-defined]  # for :func:`call_over`
        return loss

    return wrap


def call_over(loss: Callable, name: str, mesh, vocab_axis, batch_axes, check_vma: bool, *args, **kwargs):
    """``loss(*args, **kwargs)`` over ``mesh``: its classes split over ``vocab_axis`` and its leading row
    dimension over ``batch_axes`` (the ``sharded_*`` wrappers), whatever the inputs' own layout."""
    for n in _as_axes(vocab_axis) + _as_axes(batch_axes):
        if n not in mesh.axis_names:
            raise ValueError(f"{name}: axis {n!r} is not an axis of the mesh {dict(mesh.shape)}.")
    roles = loss.roles  # type: ignore[attr-defined]
    bound = inspect.signature(loss).bind(*args, **kwargs)
    bound.apply_defaults()
    given = dict(bound.arguments)
    n_rows = max(_row_count(given, roles, given, _logits_ndim(given, roles)), 1)
    rows = (_as_axes(batch_axes),) + ((),) * (n_rows - 1)
    return run(loss, name, given, roles, Plan(mesh, _as_axes(vocab_axis), rows), check_vma=check_vma)


__all__ = ["CLASSES", "HIDDEN", "LABELS", "ROWS", "VOCAB", "Plan", "Role", "call_over", "run", "spmd", "weight"]
