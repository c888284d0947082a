r"""``topk_distillation_loss`` and ``linear_topk_distillation_loss``: distillation on a teacher's stored top-k.

The teacher is known only at ``k`` classes ``I`` per token: its log-probabilities
``log P_t,i`` (of its full distribution, as stored offline). With the student's
``s = z / T`` and ``log q = log_softmax(s)`` over all classes, the two are
compared on ``k + 1`` bins:

* ``tail=True``: the ``k`` classes and one tail bin holding the rest of each
  side's mass, ``P_t,tail = 1 - sum_i P_t,i`` and ``q_tail = sum_{c not in I} q_c``
  (summed directly, not as ``1 - sum_i q_i``, so a small tail keeps its digits);
* ``tail=False``: the ``k`` classes, each side renormalized over them.

The divergence of the bins is that of :func:`jaxsce.distillation_loss`:
``"kl"`` (``KL(P_t || q)``), ``"reverse_kl"`` (``KL(q || P_t)``) or ``"jsd"``.
With ``G_b = d loss / d log q_b`` (autodiff of the ``k + 1``-bin formula), the
gradient with respect to ``s`` is, for ``tail=True``,
``[c in I] G_c + [c not in I] G_tail q_c / q_tail - q_c sum_b G_b``, and for
``tail=False``, ``[c in I] (G_c - q~_c sum_b G_b)`` with ``q~`` the renormalized
student; then ``/ T``.

One instance of the streaming engine (``_stream``): per row it gathers the
student's ``s`` at the ``k`` indices and sums ``exp(s_c - m)`` over the other
classes while the vocabulary streams by, and counts the indices it met, so
that a repeated or out-of-range index gives NaN rather than a wrong number.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._api import _auto, _front, _options
from .._api._inputs import check_head
from .._base import _labels, _spmd, _transform, _validate
from .._engine import _stream
from .._engine._rowloss import Vocab
from .._engine._stream import DEFAULT_MEMORY_BUDGET
from .._tiers import _divergence
from .._tiers._divergence import DIVERGENCES, DistillConsts

AxisName = str | tuple[str, ...] | None

#: How far the stored teacher probabilities may sum above 1 (rounding of stored log-probs) before a row is NaN.
TEACHER_MASS_SLACK = 1e-2


class TopKRows(NamedTuple):
    """Per-row data: the teacher's class ids ``[T, k]`` and log-probabilities ``[T, k]``."""

    indices: jax.Array
    log_probs: jax.Array


class TopKSums(NamedTuple):
    """Per row: the student's ``s`` at the indices ``[T, k]``, ``sum exp(s_c - m)`` over the other classes
    (relative to the running max) and how many distinct indices were met."""

    gathered: jax.Array
    tail: jax.Array
    hits: jax.Array


def _block_columns(idx, col0, width: int, low, num_classes: int):
    """``(local column, inside)``: each index's column in a block of ``width`` columns from ``col0``,
    ``width`` (dropped by a scatter) where it is not in ``[low, col0 + width)`` or not a real class."""
    inside = (idx >= low) & (idx < col0 + width) & (idx < num_classes)
    return jnp.where(inside, idx - col0, width), inside


def _scatter(values, local, width: int):
    """``[T, width]`` holding ``values[t, j]`` at column ``local[t, j]`` (entries at ``width`` dropped)."""
    rows = jnp.arange(local.shape[0])[:, None]
    return jnp.zeros((local.shape[0], width), values.dtype).at[rows, local].add(values, mode="drop")


def bin_divergence(log_t, log_q, divergence: str, beta):
    """The divergence of two distributions on the last axis, given as log-probabilities (0 log 0 = 0)."""
    t, q = jnp.exp(log_t), jnp.exp(log_q)
    if divergence == "kl":
        return jnp.sum(_divergence.xlogy_terms(t, log_t - log_q), axis=-1)
    if divergence == "reverse_kl":
        return jnp.sum(_divergence.xlogy_terms(q, log_q - log_t), axis=-1)
    gap_q, gap_t = _divergence.mixture_gaps(log_q, log_t, beta)
    return jnp.sum(beta * _divergence.xlogy_terms(t, gap_t) + (1 - beta) * _divergence.xlogy_terms(q, gap_q), axis=-1)


def _bins(lq_top, lq_tail, lt_top, tail: bool):
    """``(teacher, student)`` log-probabilities of the bins."""
    t_mass = jnp.sum(jnp.exp(lt_top), axis=-1)
    if tail:
        lt_tail = jnp.log(jnp.maximum(1 - t_mass, 0))
        return (
            jnp.concatenate([lt_top, lt_tail[:, None]], axis=-1),
            jnp.concatenate([lq_top, lq_tail[:, None]], axis=-1),
        )
    norm = lambda x: x - jax.nn.logsumexp(x, axis=-1, keepdims=True)  # noqa: E731
    return norm(lt_top), norm(lq_top)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKDistillRows(_stream.RowLoss):
    """One output per row, the divergence of the bins; see the module docstring."""

    divergence: str
    tail: bool
    num_classes: int
    k: int

    def transform(self, z, head, c: DistillConsts):
        return _transform.apply(z, c.transform)

    def transform_grad(self, s, ds, head, c: DistillConsts):
        return _transform.chain(s, ds, c.transform)

    def init(self, tb, ct, c, forward_mode: bool):
        zeros = jnp.zeros((tb,), ct)
        return _stream.Acc(TopKSums(jnp.zeros((tb, self.k), ct), zeros, zeros))

    def accumulate(self, acc, blk: _stream.Block, c):
        sums, rows = acc.sums, blk.rows
        s, width = blk.s[0], blk.s[0].shape[1]
        local, inside = _block_columns(rows.indices, blk.col0, width, blk.fresh_col0, self.num_classes)
        picked = jnp.take_along_axis(s, jnp.minimum(local, width - 1), axis=1)
        gathered = sums.gathered + jnp.where(inside, picked, 0)
        member = _scatter(jnp.ones(local.shape, s.dtype), local, width) > 0
        tail = sums.tail * blk.rescale[0] + jnp.sum(jnp.where(member, 0, blk.e[0]), axis=-1)
        hits = sums.hits + jnp.sum(member, axis=-1).astype(s.dtype)
        return _stream.Acc(TopKSums(gathered, tail, hits))

    def to_global(self, acc, sh: _stream.Shards, c):
        return _stream.Acc(acc.sums._replace(tail=acc.sums.tail * sh.scale[0]))

    def finish(self, stats: _stream.Stats, acc, second, rows: TopKRows, cols, c: DistillConsts):
        sums, k = acc.sums, self.k
        shift, log_se = stats.shift[0], stats.log_se[0]
        lq_top = (sums.gathered - shift[:, None]) - log_se[:, None]
        lq_tail = jnp.log(sums.tail) - log_se
        lt_top = rows.log_probs
        beta = c.beta

        def loss(lq_top, lq_tail):
            return bin_divergence(*_bins(lq_top, lq_tail, lt_top, self.tail), self.divergence, beta)

        value, vjp = jax.vjp(loss, lq_top, lq_tail)
        # The cotangent with the value's sharding type (jax 0.6 does not give ones_like it).
        g_top, g_tail = vjp(_spmd.vary_like(jnp.ones_like(value), value))
        if self.tail:
            total = jnp.sum(g_top, axis=-1) + g_tail
        else:  # the renormalized student: d/ds_i = G_i - q~_i sum G, and nothing outside the top k
            total = jnp.zeros_like(value)
        bad = (sums.hits != k) | (jnp.sum(jnp.exp(lt_top), axis=-1) > 1 + TEACHER_MASS_SLACK)
        bad = bad | (stats.m[0] == jnp.inf)
        value = jnp.where(bad, jnp.nan, value)
        return (value,), (g_top, g_tail, lq_tail, total), None

    def grad(self, blk: _stream.GradBlock, res, cts, c):
        g_top, g_tail, lq_tail, total = res
        g = cts[0]
        width = blk.p[0].shape[1]
        local, _ = _block_columns(blk.rows.indices, blk.col0, width, blk.col0, self.num_classes)
        ds = _scatter(g_top * g[:, None], local, width)
        if not self.tail:
            return ds
        member = _scatter(jnp.ones(local.shape, ds.dtype), local, width) > 0
        # Tail classes: G_tail q_c / q_tail (0 where G_tail is, even if the tail is empty).
        coef = jnp.where(g_tail == 0, 0, g * g_tail)
        ratio = jnp.exp(blk.log_p[0] - lq_tail[:, None])
        tail_part = jnp.where(member | (coef[:, None] == 0), 0, coef[:, None] * ratio)
        return ds + tail_part - blk.p[0] * (g * total)[:, None]


def _teacher_top_k(indices, log_probs, batch_shape, what: str):
    """The teacher's ``[..., k]`` class ids and log-probabilities, flat ``[T, k]``."""
    indices, log_probs = jnp.asarray(indices), jnp.asarray(log_probs)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"teacher_indices must be integer class ids, got dtype {indices.dtype}.")
    log_probs = _validate.check_floating(log_probs, "teacher_log_probs")
    if indices.ndim != len(batch_shape) + 1 or indices.shape[:-1] != tuple(batch_shape):
        raise ValueError(
            f"teacher_indices have shape {indices.shape}: they must be {what} {tuple(batch_shape)} plus the top-k axis."
        )
    if log_probs.shape != indices.shape:
        raise ValueError(
            f"teacher_log_probs have shape {log_probs.shape} but must have teacher_indices' shape {indices.shape}."
        )
    if indices.shape[-1] == 0:
        raise ValueError("teacher_indices have an empty top-k axis (k = 0).")
    k = indices.shape[-1]
    return indices.reshape(-1, k).astype(jnp.int32), log_probs.reshape(-1, k), k


def _statics(tail, reduction, axis_name, batch_axis_name, num_classes) -> dict:
    """The static options both functions share, checked."""
    return dict(
        tail=tail,
        reduction=reduction,
        axis_name=axis_name,
        batch_axis_name=batch_axis_name,
        num_classes=num_classes,
    )


def _setup(data, batch_shape, what: str, ct, classes, *, divergence, tail, axis_name, num_classes):
    """The loss, its per-row data, the counted rows and the consts in ``ct``, for both functions.

    ``data``: ``(teacher_indices, teacher_log_probs, where, consts)``; ``classes``: the local class
    count and how to name it.
    """
    indices, log_probs, where, consts = data
    idx, lt, k = _teacher_top_k(indices, log_probs, batch_shape, what)
    valid = _front.counted(where, batch_shape, what)
    count, padding = _options.class_count(num_classes, classes[0], axis_name, classes[1])
    loss = TopKDistillRows(
        divergence=divergence,
        tail=tail,
        num_classes=count,
        k=k,
        vocab=Vocab.of(axis_name, padding),
    )
    rows = TopKRows(idx, lax.stop_gradient(lt.astype(ct)))
    return loss, rows, valid, _divergence.consts_in(consts, ct, divergence)


@_options.keyword_checked
@_auto.spmd(student_logits=_auto.CLASSES, teacher_indices=_auto.ROWS, teacher_log_probs=_auto.ROWS, where=_auto.ROWS)
def topk_distillation_loss(
    student_logits: jax.Array,
    teacher_indices: jax.Array,
    teacher_log_probs: jax.Array,
    *,
    divergence: str = "kl",
    beta: float | jax.Array = 0.5,
    tail: bool = True,
    temperature: float | jax.Array = 1.0,
    where: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
    batch_axis_name: AxisName = None,
    num_classes: int | None = None,
) -> jax.Array:
    r"""Distillation from a teacher's stored top-k log-probabilities, with analytic gradients.

    With the student's :math:`\log q = \log\mathrm{softmax}(z / T)` over all
    classes and the teacher known at :math:`k` classes :math:`I` (its
    log-probabilities :math:`\log P_{t,i}`), the two are compared on bins:

    * ``tail=True`` (default): the :math:`k` classes plus a tail bin with the
      rest of each side's mass, :math:`P_{t,\mathrm{tail}} = 1 - \sum_i P_{t,i}`
      and :math:`q_\mathrm{tail} = \sum_{c \notin I} q_c`;
    * ``tail=False``: the :math:`k` classes, both sides renormalized over them.

    The divergence of the bins is ``"kl"`` (:math:`\mathrm{KL}(P_t \| q)`, the
    default), ``"reverse_kl"`` or ``"jsd"``, as in
    :func:`jaxsce.distillation_loss`. The gradient with respect to the
    student's logits is analytic (see the module ``jaxsce._losses._topk_distill``);
    the backward keeps one number per token and bin, nothing of the logits'
    size. The temperature applies to the student only; the teacher's
    log-probabilities are used as stored.

    Args:
      student_logits: floating ``[..., V]`` (class axis last).
      teacher_indices: integer ``[..., k]``: the teacher's top-k class ids
        (distinct: a repeated id, or one outside ``[0, V)``, makes that
        token's loss NaN).
      teacher_log_probs: floating ``[..., k]``: the teacher's
        log-probabilities at those ids, of its full distribution (a token
        whose ``k`` probabilities sum above ``1 + 1e-2`` -- logits passed
        for log-probabilities -- gives NaN; a smaller excess from rounding
        leaves an empty teacher tail). No gradient.
      divergence: ``"kl"``, ``"reverse_kl"`` or ``"jsd"``.
      beta: :math:`\beta \in (0, 1)` for ``"jsd"`` (may be traced).
      tail: keep the tail bin (True) or renormalize over the top k (False).
      temperature: :math:`T > 0` for the student (may be traced; no gradient).
      where: boolean mask of the batch shape; masked tokens give exactly 0
        (value and gradient), even with NaN logits.
      reduction: ``"mean"`` over counted tokens (0 if none), ``"sum"`` or
        ``"none"`` (batch shape).
      axis_name, batch_axis_name, num_classes: as in
        :func:`jaxsce.distillation_loss` (the class axis split inside
        ``jax.shard_map``: O(tokens x k) communication).

    Returns:
      float32 (float64 for float64 logits), scalar or of the batch shape.

    Raises:
      TypeError: non-floating logits or log-probabilities, non-integer
        indices, a traced static option.
      ValueError: shapes that do not fit (named), an option out of range.

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> s = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
      >>> idx, lt = jnp.array([[0]]), jnp.log(jnp.array([[0.5]]))
      >>> print(f"{jaxsce.topk_distillation_loss(s, idx, lt):.4f}")  # bins (0.5, 0.5) on both sides
      0.0000
    """
    _labels.check_host_labels(teacher_indices, "teacher_indices")
    static = _statics(tail, reduction, axis_name, batch_axis_name, num_classes)
    divergence, consts = _divergence.options_of(divergence, beta, temperature)
    args = (student_logits, teacher_indices, teacher_log_probs, where, consts)
    return _topk_distillation_loss(*args, divergence=divergence, **static)


@_front.implementation
def _topk_distillation_loss(
    student, indices, log_probs, where, consts, *, divergence, tail, reduction, axis_name, batch_axis_name, num_classes
):
    student = _validate.check_floating(student, "student_logits")
    if student.ndim < 1 or student.shape[-1] == 0:
        raise ValueError(f"student_logits of shape {student.shape} have no classes on their last axis.")
    batch_shape = student.shape[:-1]
    _spmd.check_named_axes("student_logits", student, axis_name, batch_axis_name)
    ct = _validate.compute_dtype(student.dtype)
    loss, rows, valid, consts = _setup(
        (indices, log_probs, where, consts),
        batch_shape,
        "student_logits.shape[:-1]",
        ct,
        (student.shape[-1], "the logits' class axis"),
        divergence=divergence,
        tail=tail,
        axis_name=axis_name,
        num_classes=num_classes,
    )
    outputs = _front.whole(loss, (student.reshape(-1, student.shape[-1]),), valid, rows, None, consts, "vjp")
    return _divergence.reduced(outputs, valid, reduction, batch_axis_name, batch_shape)


@_options.keyword_checked
@_auto.spmd(
    hidden=_auto.HIDDEN,
    linear_weight=_auto.weight("weight_layout"),
    teacher_indices=_auto.ROWS,
    teacher_log_probs=_auto.ROWS,
    linear_bias=_auto.VOCAB,
    where=_auto.ROWS,
)
def linear_topk_distillation_loss(
    hidden: jax.Array,
    linear_weight: jax.Array,
    teacher_indices: jax.Array,
    teacher_log_probs: jax.Array,
    *,
    linear_bias: jax.Array | None = None,
    weight_layout: str = "dv",
    divergence: str = "kl",
    beta: float | jax.Array = 0.5,
    tail: bool = True,
    temperature: float | jax.Array = 1.0,
    where: jax.Array | None = None,
    reduction: str = "mean",
    token_block: int | None = None,
    vocab_block: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    axis_name: AxisName = None,
    batch_axis_name: AxisName = None,
    num_classes: int | None = None,
) -> jax.Array:
    r"""Fused :func:`jaxsce.topk_distillation_loss` of the student's head ``hidden @ linear_weight + linear_bias``.

    The same loss and gradients, with the student's logits formed only as
    ``[token_block, vocab_block]`` blocks (the streaming engine, as in
    :func:`jaxsce.linear_cross_entropy`): per token, the student's logits at
    the teacher's ``k`` ids are gathered and its tail mass summed while the
    vocabulary streams by. Scalar reductions take the single pass (3 matmul
    passes) when the float32 ``d_W`` fits ``memory_budget``.

    Args:
      hidden: ``[..., d]`` floating (float32, bfloat16, float16).
      linear_weight: ``[d, V]`` (``weight_layout="dv"``) or ``[V, d]`` (``"vd"``).
      teacher_indices, teacher_log_probs: ``[..., k]``, as in
        :func:`jaxsce.topk_distillation_loss`.
      linear_bias: optional ``[V]``.
      weight_layout: ``"dv"`` or ``"vd"``.
      divergence, beta, tail, temperature, where, reduction, num_classes: as
        in :func:`jaxsce.topk_distillation_loss`.
      token_block, vocab_block, memory_budget: as in :func:`jaxsce.linear_cross_entropy`.
      axis_name, batch_axis_name: the vocabulary and token mesh axes inside
        ``jax.shard_map``, as in :func:`jaxsce.linear_cross_entropy`.

    Returns:
      float32 (float64 for float64 inputs), scalar or of ``hidden.shape[:-1]``.

    Raises:
      TypeError, ValueError: as :func:`jaxsce.topk_distillation_loss`, and for the head's shapes.

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> h, w = jnp.ones((2, 4)), jnp.zeros((4, 10))  # a uniform student over 10 classes
      >>> idx = jnp.array([[0, 1], [2, 3]])
      >>> lt = jnp.log(jnp.full((2, 2), 0.1))  # the teacher agrees on its top 2
      >>> print(f"{jaxsce.linear_topk_distillation_loss(h, w, idx, lt):.4f}")
      0.0000
    """
    _labels.check_host_labels(teacher_indices, "teacher_indices")
    static = dict(
        **_options.fused(
            weight_layout=weight_layout, token_block=token_block, vocab_block=vocab_block, memory_budget=memory_budget
        ),
        **_statics(tail, reduction, axis_name, batch_axis_name, num_classes),
    )
    divergence, consts = _divergence.options_of(divergence, beta, temperature)
    args = (hidden, linear_weight, linear_bias, teacher_indices, teacher_log_probs, where, consts)
    return _linear_topk_distillation_loss(*args, divergence=divergence, **static)


@_front.implementation
def _linear_topk_distillation_loss(
    hidden,
    weight,
    bias,
    indices,
    log_probs,
    where,
    consts,
    *,
    divergence,
    tail,
    weight_layout,
    reduction,
    token_block,
    vocab_block,
    memory_budget,
    axis_name,
    batch_axis_name,
    num_classes,
):
    head, v_local = check_head(hidden, weight, bias, weight_layout)
    batch_shape = hidden.shape[:-1]
    _spmd.check_split_axes("linear_weight", weight, hidden, "hidden", axis_name, batch_axis_name)
    loss, rows, valid, consts = _setup(
        (indices, log_probs, where, consts),
        batch_shape,
        "hidden.shape[:-1]",
        _stream.acc_dtype(*head),
        (v_local, "linear_weight's vocabulary"),
        divergence=divergence,
        tail=tail,
        axis_name=axis_name,
        num_classes=num_classes,
    )
    out = _front.fused(
        loss,
        (head,),
        valid,
        rows,
        None,
        consts,
        (weight_layout,),
        n_outputs=1,
        scalar=reduction != "none",
        token_block=token_block,
        vocab_block=vocab_block,
        memory_budget=memory_budget,
        forward_mode=False,
    )
    if isinstance(out, _front.Total):
        return _front.reduce_total(out, reduction, batch_axis_name, valid)
    return _divergence.reduced(out, valid, reduction, batch_axis_name, batch_shape)


__all__ = ["DIVERGENCES", "linear_topk_distillation_loss", "topk_distillation_loss"]
