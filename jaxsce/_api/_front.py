"""The front door every loss goes through: the jitted implementation, masks, and the path.

A public loss is its signature and docstring, the checks of its own options,
and a jitted implementation (:func:`implementation`) that builds its
:class:`~jaxsce._engine._rowloss.RowLoss` and hands it to :func:`fused` (from hidden
states and heads) or to the logit-level drivers. What every loss shares is
here, once:

* :func:`implementation`: ``jax.jit`` with the keyword-only parameters as
  static arguments, declared once by the signature;
* :func:`counted`: the ``where`` mask, checked and flattened;
* :func:`fused`: zero tokens, and the choice between the single-pass path
  (a scalar loss whose float32 ``d_W`` fits the budget: the gradient is
  formed with the loss, 3 matmul passes) and the streaming path (4).
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp

from .._base import _reduce, _validate
from .._engine import _stream


def implementation(fn):
    """``jax.jit(fn)`` with every keyword-only parameter of ``fn`` static (one declaration: the signature)."""
    static = tuple(
        name for name, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    )
    return functools.wraps(fn)(jax.jit(fn, static_argnames=static))


def counted(where, batch_shape: tuple[int, ...], what: str, name: str = "where") -> jax.Array:
    """The ``[n]`` boolean mask of counted examples: ``where`` (the argument ``name``) checked against the
    batch shape, or all."""
    n = 1
    for d in batch_shape:
        n = n * d
    if where is None:
        return jnp.ones(n, bool)
    return _validate.check_mask(where, batch_shape, name, what).reshape(n)


def _invariant_padding(n: int) -> int:
    """Rows to add to ``n`` for ``batch_invariant=True``: whole chunks of :data:`INVARIANT_TOKENS`, and at
    least two. XLA compiles a loop that runs once as straight-line code, whose fusions (and so its
    roundings, e.g. a temperature's scaling) differ from those of a loop body: one chunk would not
    give the rows of two or more."""
    return max(-n % INVARIANT_TOKENS, 2 * INVARIANT_TOKENS - n)


def whole(
    loss: _stream.RowLoss, z_heads, valid, rows, cols, consts, derivative: str, invariant: bool = False
) -> tuple[jax.Array, ...]:
    """Per-row outputs of ``loss`` over given logits (the logit-level path), with the derivative rule asked for:
    ``"vjp"`` (reverse mode) or ``"jvp"`` (forward mode).

    ``invariant``: the rows are padded to whole chunks of :data:`INVARIANT_TOKENS` and computed one chunk
    at a time (``lax.map``), so every row meets the same computation of the same shapes whatever the
    number of rows.
    """
    driver = _stream.whole_vjp if derivative == "vjp" else _stream.whole_jvp
    if not invariant:
        return driver(z_heads, valid, rows, cols, consts, loss)
    n = z_heads[0].shape[0]
    pad = _invariant_padding(n)
    chunks = lambda x: _pad_rows(x, pad).reshape(-1, INVARIANT_TOKENS, *x.shape[1:])  # noqa: E731
    per_chunk = (tuple(chunks(z) for z in z_heads), chunks(valid), jax.tree.map(chunks, rows))
    outputs = jax.lax.map(lambda a: driver(a[0], a[1], a[2], cols, consts, loss), per_chunk)
    return tuple(o.reshape(-1)[:n] for o in outputs)


def check_forward_mode(derivative: str, name: str, hidden, *head) -> None:
    """Reverse mode through a fused loss's ``derivative="jvp"`` rule needs jax >= 0.10: say so up front
    (zero tokens have no loops to transpose)."""
    if derivative == "jvp" and getattr(hidden, "size", 1) != 0:
        _stream.check_linearizable(hidden, *head, name=name)


class Total(NamedTuple):
    """A scalar loss from the single-pass path: the sum of values and of the mean's normalizers."""

    total: jax.Array
    normalizer: jax.Array
    aux: tuple = ()  # sums of the loss's aux terms over the counted rows


#: ``batch_invariant=True``: the fixed token block (tokens are padded to whole blocks) and vocabulary block.
INVARIANT_TOKENS = 256
INVARIANT_VOCAB = 4096


def _pad_rows(x, pad: int):
    return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))


def fused(
    loss: _stream.RowLoss,
    heads: tuple[_stream.Head, ...],
    valid,
    rows,
    cols,
    consts,
    layouts: tuple[str, ...],
    *,
    n_outputs: int,
    scalar: bool,
    token_block: int | None,
    vocab_block: int | None,
    memory_budget: int,
    forward_mode: bool = False,
    n_aux: int = 0,
    invariant: bool = False,
) -> tuple[jax.Array, ...] | Total:
    """Per-row outputs of ``loss`` over the heads' logits, or a :class:`Total`.

    ``scalar``: the caller reduces to ``"mean"``/``"sum"`` and needs no
    per-row output, so the single-pass path may be taken (not with vocabulary
    sharding, an explicit ``vocab_block``, or forward mode); its
    :meth:`~jaxsce._engine._rowloss.RowLoss.scalar` then returns ``n_aux`` aux
    terms. Zero tokens give empty outputs without streaming.

    ``invariant`` (``batch_invariant=True``): every row's outputs are
    computed in blocks of the same fixed shapes, whatever the number of
    tokens and the block options: the tokens are padded (with rows that are
    not counted) to whole blocks of :data:`INVARIANT_TOKENS`, and the
    vocabulary is streamed in blocks of :data:`INVARIANT_VOCAB` columns
    (fewer if the vocabulary is smaller), so each row meets the same
    matmuls and sums in the same order.
    """
    n = heads[0].hidden.shape[0]
    if isinstance(n, int) and n == 0:
        ct = _stream.acc_dtype(*(x for hd in heads for x in hd))
        return tuple(jnp.zeros((0,), ct) for _ in range(n_outputs))
    pad = 0
    if invariant:
        pad = _invariant_padding(n)
        heads = tuple(hd._replace(hidden=_pad_rows(hd.hidden, pad)) for hd in heads)
        valid, rows = _pad_rows(valid, pad), jax.tree.map(lambda x: _pad_rows(x, pad), rows)
        token_block, vocab_block = INVARIANT_TOKENS, INVARIANT_VOCAB
    elif scalar and loss.vocab_axis is None and vocab_block is None and not forward_mode:
        sums = _stream.single_pass(
            loss, heads, valid, rows, cols, consts, layouts, token_block, memory_budget, n_aux=n_aux
        )
        if sums is not None:
            total, normalizer, aux = cast(tuple[jax.Array, jax.Array, tuple], sums)
            return Total(total, normalizer, aux)
    outputs = _stream.stream(
        loss,
        heads,
        valid,
        rows,
        cols,
        consts,
        layouts,
        token_block=token_block,
        vocab_block=vocab_block,
        memory_budget=memory_budget,
        forward_mode=forward_mode,
    )
    return tuple(o[:n] for o in outputs) if pad else outputs


def reduce_total(out: Total, reduction: str, batch_axis_name, valid) -> jax.Array:
    """A :class:`Total` as ``"mean"`` or ``"sum"``, over ``batch_axis_name`` too."""
    return _reduce.reduce_loss(out.total[None], out.normalizer[None], reduction, batch_axis_name, valid)
