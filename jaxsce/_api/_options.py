"""The public functions' options: checked once, split into static and traced.

Every public loss is a thin Python function that checks its options here and
then calls a jitted implementation:

* options that select the program (``axis``, ``reduction``, ``ignore_index``,
  block sizes, mesh axes, flags) are *static*: they must be hashable Python
  values, and a traced or unhashable one is an error that names the option;
* float options (``label_smoothing``, ``z_loss``, ``logit_softcap``) are
  *traced*: a concrete value is range-checked here and passed to the program
  as an array, so a schedule of values compiles once; a traced value that is
  out of range makes the loss NaN (it cannot raise inside ``jit``). A
  concrete 0 (or None for the cap) switches the option off, which removes
  its code from the program.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any, NamedTuple, ParamSpec, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np

from .._base import _labels, _spmd, _validate
from .._base._transform import Transform
from .._engine._targets import Options

REDUCTIONS = ("mean", "sum", "none")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def keyword_checked(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` with its options checked at the door: an unknown keyword gets the nearest valid names, an
    argument that is a framework's parameter object is named, and each static option of :data:`STATIC`
    that ``fn`` takes is checked by its one declared rule (``fn`` receives the checked value; the
    defaults in its signature are valid by construction).

    Python's own error (``got an unexpected keyword argument``) does not say
    what was meant; with thirty options a typo such as ``label_smothing``
    deserves the answer.
    """
    signature = inspect.signature(fn)
    params = tuple(signature.parameters)
    table = {name: STATIC[name] for name in params if name in STATIC}
    # A wrapper that forwards ``**options`` leaves the unknown ones to the function it calls.
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())

    @functools.wraps(fn)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not forwards:
            check_keywords(fn.__name__, kwargs, params)
        for name, value in (*zip(params, args), *kwargs.items()):
            check_not_wrapped(value, name, fn.__name__)
        given = [name for name in kwargs if name in table]
        if given:
            kwargs = cast(Any, {**kwargs, **{name: table[name](kwargs[name]) for name in given}})
        return fn(*args, **kwargs)

    return checked


def check_not_wrapped(value: Any, name: str, fn_name: str) -> None:
    """A ``TypeError`` naming ``name`` when ``value`` is a framework's parameter object (flax's
    ``nnx.Param`` and other ``nnx.Variable`` objects, anything that is not an array but converts to one
    through ``__jax_array__`` or holds one in ``.value``) rather than the array itself."""
    if value is None or isinstance(value, (jax.Array, np.ndarray, np.generic, int, float, complex, str)):
        return
    wrapped = hasattr(type(value), "__jax_array__") or isinstance(getattr(value, "value", None), jax.Array)
    if wrapped:
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise TypeError(
            f"{fn_name}(): {name} is a {kind}, a framework's parameter object, not an array: pass its value "
            f"({name}[...] for a flax nnx.Variable, else {name}.value)."
        )


def check_keywords(fn_name: str, given, valid) -> None:
    """A ``TypeError`` for the first name of ``given`` not in ``valid``, suggesting the nearest valid ones."""
    for name in given:
        if name not in valid:
            close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.7)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise TypeError(f"{fn_name}() got an unexpected keyword argument {name!r}.{hint}")


DERIVATIVES = ("vjp", "jvp")


def static(value: Any, name: str) -> Any:
    """A static option: hashable and not traced."""
    if _validate.is_tracer(value):
        raise TypeError(
            f"{name} must be a static Python value (it selects the compiled program), "
            f"got a traced value of shape {value.shape}."
        )
    try:
        hash(value)
    except TypeError:
        raise TypeError(f"{name} must be hashable (it selects the compiled program), got {value!r}.") from None
    return value


def choice(value: Any, name: str, choices) -> str:
    static(value, name)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
    return value


def flag(value: Any, name: str) -> bool:
    static(value, name)
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def size(value: Any, name: str, *, allow_none: bool = True) -> int | None:
    """A positive number of elements or bytes: a Python or NumPy integer, not a bool."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a positive integer, got None.")
    static(value, name)
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a positive integer, got the bool {value!r}.")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive integer, got {value!r}.") from None
    if out <= 0:
        raise ValueError(f"{name} must be a positive integer, got {out}.")
    return out


def _int_or_none(value: Any, name: str) -> int | None:
    """A static int option that may be None (not a bool)."""
    if value is None:
        return None
    static(value, name)
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or None, got {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or None, got {value!r}.") from None


def ignored_class(value: Any) -> int | None:
    """``ignore_index``: an int or None."""
    return _int_or_none(value, "ignore_index")


def top_k(value: Any) -> int | None:
    """``top_k``: an int (``<= 0``: off, as vLLM's ``-1``) or None."""
    out = _int_or_none(value, "top_k")
    return out if out is not None and out > 0 else None


def top_p(value: Any):
    """``top_p``: None, a number in ``(0, 1]`` (1: off), or a floating array (concrete values are
    range-checked; traced values outside ``(0, 1]`` give NaN where used). Its shape is checked by
    :func:`top_p_rows`."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"top_p must be a number in (0, 1] or a floating array, got {value!r}.")
    if isinstance(value, (int, float, np.integer, np.floating)):
        out = float(value)
        if not 0 < out <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {out}.")
        return None if out == 1 else jnp.asarray(out)
    x = value if _validate.is_tracer(value) else jnp.asarray(value)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"top_p must be floating, got dtype {x.dtype} with shape {x.shape}.")
    if not _validate.is_tracer(x) and x.size and not bool(jnp.all((x > 0) & (x <= 1))):
        raise ValueError(f"top_p must be in (0, 1], got values from {float(x.min())} to {float(x.max())}.")
    return x


def top_p_rows(x, batch_shape: tuple, what: str, dtype):
    """``top_p`` (shape ``()`` or ``batch_shape``) as one value per row, without a gradient."""
    if x.shape not in ((), tuple(batch_shape)):
        raise ValueError(f"top_p has shape {x.shape}: it must be a scalar or of {what}, {tuple(batch_shape)}.")
    x = jax.lax.stop_gradient(x.astype(dtype))
    return jnp.broadcast_to(x, batch_shape).reshape(-1)


def hashable_axes(value: Any, name: str):
    """``axis`` or a mesh axis option: a name/int or a tuple of them (a list becomes a tuple)."""
    if isinstance(value, list):
        value = tuple(value)
    return static(value, name)


def shared(
    *, reduction, ignore_index, return_aux, derivative, axis_name, batch_axis_name, check_labels, num_classes
) -> dict:
    """The static options every loss takes (checked at the door, :data:`STATIC`), by name."""
    return dict(
        num_classes=num_classes,
        reduction=reduction,
        ignore_index=ignore_index,
        return_aux=return_aux,
        derivative=derivative,
        axis_name=axis_name,
        batch_axis_name=batch_axis_name,
        check_labels=check_labels,
    )


def fused(*, weight_layout, token_block, vocab_block, memory_budget) -> dict:
    """The static options every fused loss takes (the head's layout and the blocks; checked at the door,
    :data:`STATIC`), by name."""
    return dict(
        weight_layout=weight_layout, token_block=token_block, vocab_block=vocab_block, memory_budget=memory_budget
    )


#: The static options (they select the compiled program), each declared once for every public function:
#: its name and its check. Every function decorated with :func:`keyword_checked` checks the ones it takes.
STATIC: dict[str, Callable[[Any], Any]] = {
    "axis": lambda v: hashable_axes(v, "axis"),
    "axis_name": lambda v: hashable_axes(v, "axis_name"),
    "batch_axis_name": lambda v: hashable_axes(v, "batch_axis_name"),
    "num_classes": lambda v: size(v, "num_classes"),
    "ignore_index": ignored_class,
    "top_k": top_k,
    "top_p_candidates": lambda v: size(v, "top_p_candidates", allow_none=False),
    "reduction": lambda v: choice(v, "reduction", REDUCTIONS),
    "derivative": lambda v: choice(v, "derivative", DERIVATIVES),
    "weight_layout": lambda v: choice(v, "weight_layout", ("dv", "vd")),
    "token_block": lambda v: size(v, "token_block"),
    "vocab_block": lambda v: size(v, "vocab_block"),
    "memory_budget": lambda v: size(v, "memory_budget", allow_none=False),
    "max_completion_length": lambda v: size(v, "max_completion_length"),
    **{
        name: functools.partial(lambda v, name: flag(v, name), name=name)
        for name in (
            "return_aux",
            "return_entropy",
            "check_labels",
            "batch_invariant",
            "kl_importance_correction",
            "tail",
        )
    },
}


class Floats(NamedTuple):
    """The traced float options: 0-d arrays, or None where off."""

    label_smoothing: Any = None
    z_loss: Any = None
    logit_softcap: Any = None
    temperature: Any = None


# name -> (low, high, low_open): the documented ranges.
_RANGES = {
    "label_smoothing": (0.0, 1.0, False),
    "z_loss": (0.0, None, False),
    "logit_softcap": (0.0, None, True),
    "temperature": (0.0, None, True),
    "beta": (0.0, 1.0, True),
}


def float_option(value: Any, name: str, *, off_when_zero: bool, bounds: tuple | None = None) -> jax.Array | None:
    """A float option as a 0-d array (None: off); concrete values are range-checked.

    ``bounds``: ``(low, high, low_open)`` (None: no bound), or None for the
    documented range of ``name``.
    """
    if value is None:
        if off_when_zero:
            raise TypeError(f"{name} must be a real number, got None.")
        return None
    if _validate.is_tracer(value):
        if value.shape != () or not (
            jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
        ):
            raise TypeError(
                f"{name} must be a real scalar, got a traced value of shape {value.shape} and dtype {value.dtype}."
            )
        return value
    if isinstance(value, (bool, np.bool_, str, bytes)) or (
        hasattr(value, "dtype")
        and not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer))
    ):
        # float() would accept "0.5", b"0.5" and numpy strings: refuse them.
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}.") from None
    low, high, low_open = _RANGES[name] if bounds is None else bounds
    if not np.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}.")
    if low is not None and (out < low or (low_open and out == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {out}.")
    if high is not None and out > high:
        raise ValueError(f"{name} must be <= {high}, got {out}.")
    if off_when_zero and out == 0:
        return None
    return jnp.asarray(out)  # weakly typed, like the Python number


def floats(
    *, label_smoothing: Any = 0.0, z_loss: Any = 0.0, logit_softcap: Any = None, temperature: Any = 1.0
) -> Floats:
    return Floats(
        label_smoothing=float_option(label_smoothing, "label_smoothing", off_when_zero=True),
        z_loss=float_option(z_loss, "z_loss", off_when_zero=True),
        logit_softcap=float_option(logit_softcap, "logit_softcap", off_when_zero=False),
        temperature=temperature_option(temperature),
    )


def in_dtype(fl, dtype):
    """The float options in the compute dtype, NaN where a traced value is out of range.

    They are constants for differentiation (like class weights): a schedule
    of them gets no gradient. Infinite values are out of every range (a
    traced ``temperature=inf`` would otherwise give the uniform distribution).
    """

    return type(fl)(
        *(None if x is None else traced_in_dtype(x, dtype, _RANGES[name]) for name, x in zip(fl._fields, fl))
    )


def traced_in_dtype(x, dtype, bounds: tuple) -> jax.Array:
    """One float option in ``dtype``, without a gradient; NaN where it is infinite or outside
    ``bounds = (low, high, low_open)`` (None: no bound)."""
    x = jax.lax.stop_gradient(jnp.asarray(x).astype(dtype))
    low, high, low_open = bounds
    ok = jnp.isfinite(x)
    if low is not None:
        ok = ok & ((x > low) if low_open else (x >= low))
    if high is not None:
        ok = ok & (x <= high)
    return jnp.where(ok, x, jnp.nan)


def class_count(num_classes: int | None, local: int, axis_name, what: str) -> tuple[int, int | None]:
    """``(C, padding)`` for a class axis of ``local`` columns per shard of ``axis_name``.

    ``C`` is the number of real classes: ``num_classes``, or every column over
    all shards. ``padding`` is ``C`` again when the columns from ``C`` on are
    padding (the engine's ``RowLoss.classes``), else None.
    """
    width = local * _spmd.axis_size(axis_name)
    if num_classes is None:
        return width, None
    if num_classes > width:
        shards = "" if axis_name is None else f" ({local} per shard x {width // local} shards of {axis_name!r})"
        raise ValueError(f"num_classes={num_classes} exceeds the {width} columns of {what}{shards}.")
    return num_classes, (num_classes if num_classes < width else None)


def real_class_weight(weight, padding: int | None, axis_name):
    """Per-class weights ``[C_local]`` with the padding columns' set to 0 (``weight`` itself without padding)."""
    if weight is None or padding is None:
        return weight
    col = jnp.arange(weight.shape[0], dtype=jnp.int32) + _spmd.shard_col0(weight.shape[0], axis_name)
    return jnp.where(col < padding, weight, 0)


def make_options(
    fl: Floats,
    *,
    num_classes: int,
    soft: bool,
    axis_name,
    return_aux: bool,
    is_unchecked: bool,
    padded: bool = False,
) -> Options:
    """The kernels' options from the checked public ones (floats in the compute dtype)."""
    return Options(
        padded=padded,
        num_classes=num_classes,
        soft=soft,
        vocab_axis=axis_name,
        argmax=bool(return_aux),
        vocab_unchecked=is_unchecked,
        label_smoothing=fl.label_smoothing,
        transform=Transform(fl.logit_softcap, fl.temperature),
    )


def run(fn: Callable, args: tuple, kwargs: dict[str, Any]):
    """Calls the jitted implementation.

    Called eagerly with ``check_labels``, the run-time label check surfaces
    as a plain ``ValueError`` (under the caller's ``jit`` it arrives as the
    runtime error JAX raises, carrying the same message).
    """
    if not kwargs["check_labels"] or any(_validate.is_tracer(x) for x in jax.tree.leaves(args)):
        return fn(*args, **kwargs)
    try:
        return jax.block_until_ready(fn(*args, **kwargs))
    except Exception as e:  # JaxRuntimeError; its class moved between releases
        text = str(e)
        if _labels.BAD_LABEL not in text:
            raise
        raise ValueError(text[text.index(_labels.BAD_LABEL) :].splitlines()[0]) from None


def check_class_weight(weight, num_classes: int, name: str = "weight"):
    """Per-class weights, treated as constants (no gradient, as in PyTorch)."""
    return jax.lax.stop_gradient(_validate.check_class_weight(weight, num_classes, name))


def sample_weights(sample_weight, batch_shape, what: str, dtype):
    """Per-example weights, flattened, in the compute dtype, as constants (or None)."""
    if sample_weight is None:
        return None
    sw = _validate.check_sample_weight(sample_weight, batch_shape, what)
    return jax.lax.stop_gradient(sw.reshape(-1).astype(dtype))


def temperature_option(value: Any) -> jax.Array | None:
    """``temperature > 0`` as a 0-d array; None for a concrete 1 (no division)."""
    out = float_option(value, "temperature", off_when_zero=False)
    if out is None:
        raise TypeError("temperature must be a positive real number, got None.")
    if not _validate.is_tracer(value) and float(value) == 1.0:
        return None
    return out


def transform(logit_softcap: Any, temperature: Any) -> Transform:
    """The public ``logit_softcap`` and ``temperature`` as a :class:`~jaxsce._base._transform.Transform`."""
    return Transform(
        logit_softcap=float_option(logit_softcap, "logit_softcap", off_when_zero=False),
        temperature=temperature_option(temperature),
    )
