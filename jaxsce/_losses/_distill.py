r"""``distillation_loss`` and ``linear_distillation_loss``: KL, reverse KL and JSD.

With ``s = student / T``, ``t = teacher / T``, ``P_s = softmax(s)``,
``P_t = softmax(t)`` and ``r = log P_s - log P_t``, per example:

* ``"kl"``: ``KL(P_t || P_s) = sum_c P_t (t_c - s_c) + lse(s) - lse(t)``;
  ``d/ds = P_s - P_t``.
* ``"reverse_kl"``: ``KL(P_s || P_t) = sum_c P_s (s_c - t_c) + lse(t) - lse(s)``;
  ``d/ds_c = P_s,c (r_c - KL(P_s || P_t))`` (the derivative of
  ``sum_k P_k f_k`` with ``f = log P_s - log P_t``: ``sum_k P_k df_k/ds_c``
  vanishes, and ``dP_k/ds_c = P_k (delta_kc - P_c)``).
* ``"jsd"``: ``beta KL(P_t || M) + (1 - beta) KL(P_s || M)``, ``M = beta P_t
  + (1 - beta) P_s``. Writing it as ``beta sum P_t log P_t + (1 - beta) sum
  P_s log P_s - sum M log M`` and differentiating, ``d/ds_c = (1 - beta)
  P_s,c (log P_s,c - log M_c - KL(P_s || M))``.

Then ``d/d student = (d/ds) / T``; the teacher gets no gradient. ``0 log 0 =
0`` throughout: entries where the weighting probability is 0 contribute
nothing, so the loss is infinite only where the mathematics says so (forward
KL with ``P_s = 0`` where ``P_t > 0``).

All three are instances of the streaming engine (``_stream``) with two heads
(student = head 0, teacher = head 1). The KLs are one pass: the sum weighted
by the teacher's (or the student's) exponentials is kept relative to its
running max. JSD needs both normalizers before ``log M``: a second pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

from .._api import _auto, _front, _options
from .._api._inputs import check_class_ids, check_head, check_logit_labels
from .._base import _labels, _spmd, _transform, _validate
from .._engine import _sampler, _stream
from .._engine._rowloss import Vocab
from .._engine._stream import DEFAULT_MEMORY_BUDGET
from .._engine._targets import block_hits, in_block, label_entry
from .._tiers import _divergence
from .._tiers._divergence import DistillConsts

AxisName = str | tuple[str, ...] | None


class WeightedSum(NamedTuple):
    """``sum_c exp(w_c - m_w) (x_c - y_c)`` for the KLs: ``w`` the weighting head, relative to its running
    max; for the hard-label term, the student's ``sum_c exp(T (s_c - m))`` (its untempered log-sum-exp,
    relative to the same max) and its label's ``s_y``."""

    weighted: jax.Array | None = None
    hard_se: jax.Array | None = None
    label: jax.Array | None = None
    candidates: _sampler.Candidates | None = None  # with top_k: the weighting head's largest values


class TopKBins(NamedTuple):
    """With ``top_k``, the second pass's sums: over the weighting head's top k (ties kept),
    ``sum P_w (log P_w - log P_o)``; over the other classes, each head's mass (the tail bins)."""

    inside: jax.Array
    tail_w: jax.Array
    tail_o: jax.Array


class SecondRows(NamedTuple):
    """The second pass's per-row data with ``top_k``: the first pass's and the top-k threshold."""

    rows: Any
    threshold: jax.Array


def _power(x, t):
    """``x ** t`` for the temperature ``t`` (None: 1): rescales a sum of ``exp(s - m)`` to ``exp(T (s - m))``."""
    return x if t is None else jnp.where(x > 0, x**t, 0)


class MixtureSums(NamedTuple):
    """JSD's second pass: ``KL(P_t || M)`` and ``KL(P_s || M)`` per row."""

    teacher: jax.Array
    student: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillRows(_stream.RowLoss):
    """One output per row, the divergence; see the module docstring."""

    divergence: str
    hard: bool = False  # a cross-entropy term on the student's labels (rows: the class ids)
    num_classes: int = 0  # the labels' range, with ``hard``
    top_k: int | None = None  # bins: the weighting head's top k (ties kept) and a tail
    heads = 2

    @property
    def second_pass(self):  # type: ignore[override]
        return self.divergence == "jsd" or self.top_k is not None

    @property
    def _weighting(self) -> int:
        """The head whose probabilities weight the KL (and whose top k are the bins): the teacher for "kl"."""
        return 1 if self.divergence == "kl" else 0

    @property
    def _n_soft(self) -> int:
        """How many residuals the divergence's gradient reads (those of the hard-label term follow)."""
        return 4 if self.top_k is not None else 1

    def transform(self, z, head, c: DistillConsts):
        return _transform.apply(z, c.transform)

    def transform_grad(self, s, ds, head, c: DistillConsts):
        return _transform.chain(s, ds, c.transform)

    def init(self, tb, ct, c, forward_mode: bool):
        zeros = jnp.zeros((tb,), ct)
        weighted = None if self.divergence == "jsd" or self.top_k is not None else zeros
        cand = None if self.top_k is None else _sampler.init(tb, self.top_k, ct)
        return _stream.Acc(WeightedSum(weighted, *((zeros, zeros) if self.hard else (None, None)), cand))

    def accumulate(self, acc, blk: _stream.Block, c):
        a, hard_se, label, cand = acc.sums
        if cand is not None:
            cand = _sampler.merge_block(cand, blk.s[self._weighting], blk.fresh)
        if a is not None:
            s, t = blk.s
            w = 1 if self.divergence == "kl" else 0  # the weighting head: the teacher for "kl"
            diff = t - s if w == 1 else s - t
            a = blk.rescale[w] * a + jnp.sum(_divergence.xlogy_terms(blk.e[w], diff), axis=-1)
        if self.hard:
            temp = c.transform.temperature
            hard_se = _power(blk.rescale[0], temp) * hard_se + jnp.sum(_power(blk.e[0], temp), axis=-1)
            y = blk.rows
            label = label + jnp.where(in_block(y, blk), label_entry(blk.s[0], y, blk.col0), 0)
        return _stream.Acc(WeightedSum(a, hard_se, label, cand))

    def to_global(self, acc, sh: _stream.Shards, c):
        a, hard_se, label, cand = acc.sums
        if a is not None:
            a = sh.scale[self._weighting] * a
        if hard_se is not None:
            hard_se = _power(sh.scale[0], c.transform.temperature) * hard_se
        if cand is not None:
            cand = _sampler.shard_share(cand, self.vocab_axis)
        return _stream.Acc(WeightedSum(a, hard_se, label, cand))

    def second_rows(self, acc, rows):
        cand = acc.sums.candidates
        if cand is None:
            return rows
        return SecondRows(rows, jnp.min(cand.values, axis=-1))

    def init2(self, tb, ct, c):
        zeros = jnp.zeros((tb,), ct)
        if self.top_k is not None:
            return TopKBins(zeros, zeros, zeros)
        return MixtureSums(zeros, zeros)

    def accumulate2(self, acc2, blk: _stream.GradBlock, fresh, c: DistillConsts):
        if self.top_k is not None:
            w = self._weighting
            inside = (blk.s[w] >= blk.rows.threshold[:, None]) & fresh
            outside = fresh & ~inside
            p_w, p_o, log_w, log_o = blk.p[w], blk.p[1 - w], blk.log_p[w], blk.log_p[1 - w]
            return TopKBins(
                acc2.inside + jnp.sum(jnp.where(inside, _divergence.xlogy_terms(p_w, log_w - log_o), 0), axis=-1),
                acc2.tail_w + jnp.sum(jnp.where(outside, p_w, 0), axis=-1),
                acc2.tail_o + jnp.sum(jnp.where(outside, p_o, 0), axis=-1),
            )
        k_t, k_s = acc2
        (p_s, p_t), (log_ps, log_pt) = blk.p, blk.log_p
        gap_s, gap_t = _divergence.mixture_gaps(log_ps, log_pt, c.beta)
        k_t = k_t + jnp.sum(jnp.where(fresh, _divergence.xlogy_terms(p_t, gap_t), 0), axis=-1)
        k_s = k_s + jnp.sum(jnp.where(fresh, _divergence.xlogy_terms(p_s, gap_s), 0), axis=-1)
        return MixtureSums(k_t, k_s)

    def finish(self, stats: _stream.Stats, acc, second, rows, cols, c: DistillConsts):
        soft, res = self._soft(stats, acc, second, c)
        if c.soft_weight is not None:
            soft = c.soft_weight * soft
        if not self.hard:
            return (soft,), res, None
        # The cross-entropy of the untempered student, T s: log sum_c exp(T (s_c - m)) - T (s_y - m).
        temp = 1 if c.transform.temperature is None else c.transform.temperature
        shift, log_se = stats.shift[0], jnp.log(acc.sums.hard_se)
        bad = (rows < 0) | (rows >= self.num_classes) | (stats.m[0] == jnp.inf)
        ce = jnp.where(bad, jnp.nan, log_se - temp * (acc.sums.label - shift))
        hard_weight = cast(jax.Array, c.hard_weight)  # set whenever self.hard
        return (soft + hard_weight * ce,), res + (shift, log_se), None

    def _soft(self, stats: _stream.Stats, acc, second, c: DistillConsts):
        """The divergence per row and the residuals its gradient needs."""
        # A +inf logit in either head has no defined distribution: NaN.
        bad = (stats.m[0] == jnp.inf) | (stats.m[1] == jnp.inf)
        if self.top_k is not None:
            bins = cast(TopKBins, second)
            gap = jnp.log(bins.tail_w) - jnp.log(bins.tail_o)
            kl = jnp.maximum(bins.inside + _divergence.xlogy_terms(bins.tail_w, gap), 0)
            threshold = jnp.min(cast(_sampler.Candidates, acc.sums.candidates).values, axis=-1)
            return jnp.where(bad, jnp.nan, kl), (threshold, bins.tail_w, bins.tail_o, kl)
        if self.divergence == "jsd":
            k_t, k_s = second
            beta = cast(jax.Array, c.beta)
            jsd = jnp.maximum(beta * k_t + (1 - beta) * k_s, 0)
            return jnp.where(bad, jnp.nan, jsd), (k_s,)
        a = acc.sums.weighted
        # Row-max-relative: sum_c P_w (x_c - y_c) + (m_y - m_x) + (log se_y - log se_x),
        # with w the weighting head, x its logits and y the other head's. The
        # shifts' difference is exact and the log-sums are of order log V, so
        # near-identical heads at large logits keep their small divergence.
        (m_s, m_t), (ls_s, ls_t) = stats.shift, stats.log_se
        se_s, se_t = stats.se
        if self.divergence == "kl":
            mean_diff = a / se_t
            kl = mean_diff + ((m_s - m_t) + (ls_s - ls_t))
        else:
            mean_diff = a / se_s
            kl = mean_diff + ((m_t - m_s) + (ls_t - ls_s))
        # A divergence is never negative; rounding can make it -1e-7.
        return jnp.where(bad, jnp.nan, jnp.maximum(kl, 0)), (mean_diff,)

    def grad(self, blk: _stream.GradBlock, res, cts, c: DistillConsts):
        g = cts[0] if c.soft_weight is None else cts[0] * c.soft_weight
        out = self._soft_grad(blk, res[: self._n_soft], g[:, None], c)
        if not self.hard:
            return out
        # d(hard_weight ce)/ds_c = hard_weight T (softmax(T s)_c - [c = y]).
        shift, log_se = res[self._n_soft :]
        y = blk.rows
        temp = 1 if c.transform.temperature is None else c.transform.temperature
        g_h = jnp.where((y < 0) | (y >= self.num_classes), jnp.nan, cts[0] * c.hard_weight * temp)
        s = blk.s[0]
        q = jnp.exp(temp * (s - shift[:, None]) - log_se[:, None])
        return out + g_h[:, None] * (q - jnp.where(block_hits(y, blk.col0, s.shape[-1]), 1, 0).astype(s.dtype))

    def _soft_grad(self, blk: _stream.GradBlock, res, g, c: DistillConsts):
        (s, t), (p_s, p_t) = blk.s, blk.p
        if self.top_k is not None:
            # The bins are constants: for "kl", P_s - P_t inside the teacher's top k and P_s (1 -
            # tail_t / tail_s) outside; for "reverse_kl", P_s (f_c - KL) with f_c = log P_s,c -
            # log P_t,c inside the student's top k and log(tail_s / tail_t) outside.
            threshold, tail_w, tail_o, kl = (x[:, None] for x in res)
            inside = blk.s[self._weighting] >= threshold
            if self.divergence == "kl":
                ratio = jnp.where(tail_w == 0, 0, tail_w / tail_o)
                return g * jnp.where(inside, p_s - p_t, p_s * (1 - ratio))
            f = jnp.where(inside, blk.log_p[0] - blk.log_p[1], jnp.log(tail_w) - jnp.log(tail_o))
            return g * _divergence.xlogy_terms(p_s, f - kl)
        if self.divergence == "kl":
            return g * (p_s - p_t)
        if self.divergence == "reverse_kl":
            # r_c - KL = (s_c - t_c) - sum_k P_s,k (s_k - t_k): the shifts and
            # log-sums cancel exactly, so no two large numbers are subtracted.
            (mean_diff,) = res
            return g * _divergence.xlogy_terms(p_s, (s - t) - mean_diff[:, None])
        (k_s,) = res
        beta = cast(jax.Array, c.beta)
        gap_s, _ = _divergence.mixture_gaps(blk.log_p[0], blk.log_p[1], beta)
        return g * (1 - beta) * _divergence.xlogy_terms(p_s, gap_s - k_s[:, None])


@_options.keyword_checked
@_auto.spmd(student_logits=_auto.CLASSES, teacher_logits=_auto.CLASSES, where=_auto.ROWS, labels=_auto.ROWS)
def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    divergence: str = "kl",
    beta: float | jax.Array = 0.5,
    temperature: float | jax.Array = 1.0,
    axis: int | Sequence[int] = -1,
    where: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
    batch_axis_name: AxisName = None,
    derivative: str = "vjp",
    num_classes: int | None = None,
    labels: jax.Array | None = None,
    hard_weight: float | jax.Array = 0.0,
    soft_weight: float | jax.Array = 1.0,
    ignore_index: int | None = -100,
    top_k: int | None = None,
) -> jax.Array:
    r"""Divergence between the student's and the teacher's softmax, with analytic gradients.

    With :math:`P_s = \mathrm{softmax}(s / T)` and :math:`P_t = \mathrm{softmax}(t / T)`:

    * ``"kl"``: :math:`\mathrm{KL}(P_t \| P_s) = \sum_c P_{t,c} (\log P_{t,c} - \log P_{s,c})`,
      gradient :math:`(P_s - P_t) / T` with respect to the student's logits;
    * ``"reverse_kl"``: :math:`\mathrm{KL}(P_s \| P_t)`, gradient
      :math:`P_s \odot (\log P_s - \log P_t - \mathrm{KL}(P_s \| P_t)) / T`;
    * ``"jsd"``: :math:`\beta\,\mathrm{KL}(P_t \| M) + (1-\beta)\,\mathrm{KL}(P_s \| M)`
      with :math:`M = \beta P_t + (1-\beta) P_s`, gradient
      :math:`(1-\beta)\,P_s \odot (\log P_s - \log M - \mathrm{KL}(P_s \| M)) / T`.

    :math:`0 \log 0 = 0`: the loss is infinite only where the mathematics
    is (forward KL when the student gives probability 0, e.g. a ``-inf``
    logit, where the teacher has mass); large logits and ``-inf`` entries
    elsewhere stay finite. There is no :math:`T^2` factor: for Hinton et
    al.'s scaling multiply the loss by ``temperature ** 2``. The teacher is a
    constant (``stop_gradient``): its logits get no gradient.

    Args:
      student_logits: floating ``[..., C, ...]``.
      teacher_logits: floating, the student's shape.
      divergence: ``"kl"``, ``"reverse_kl"`` or ``"jsd"``.
      beta: :math:`\beta \in (0, 1)` for ``"jsd"`` (may be traced).
      temperature: :math:`T > 0` (may be traced; no gradient).
      axis: class axis, or tuple of axes (as in :func:`jaxsce.cross_entropy`).
      where: boolean mask of the batch shape; masked examples give exactly
        0 (value and gradient), even with NaN logits.
      reduction: ``"mean"`` over counted examples (0 if none), ``"sum"``,
        or ``"none"`` (batch shape).
      axis_name: mesh axis splitting the classes inside ``jax.shard_map``;
        O(examples) communication.
      batch_axis_name: mesh axes splitting the examples (for ``"mean"``/``"sum"``).
        Inside ``shard_map(check_vma=True)`` every mesh axis the logits vary
        over must be named by ``axis_name`` or ``batch_axis_name`` (a
        ``ValueError`` says which is missing): a split class axis computed
        as if whole would give each device the divergence of its shard.
      num_classes: the number of real classes when the class axis of both
        logits is padded: columns at or beyond it (over all shards) are left
        out of both distributions, with exactly 0 gradient, as in
        :func:`jaxsce.cross_entropy`.
        Under ``check_vma=False`` JAX tracks no such types and the caller
        must name them.
      derivative: ``"vjp"`` (default, reverse mode) or ``"jvp"`` (forward
        mode: ``jax.jvp``, ``jax.jacfwd``), as in :func:`jaxsce.log_probs`.
      labels: integer class ids of the batch shape: with ``hard_weight``, the
        loss per example is ``soft_weight * divergence + hard_weight * CE``,
        the cross-entropy of the student's untempered logits (Liger-Kernel's
        ``weight_hard_loss``/``weight_soft_loss``); examples whose label is
        ``ignore_index`` are left out of both terms.
      hard_weight, soft_weight: the two terms' weights (``>= 0``, may be traced).
      ignore_index: labels equal to it are not counted (default -100, as in
        PyTorch; None: off).
      top_k: compare the two on ``k + 1`` bins: ``"kl"`` on the teacher's top
        ``k`` classes, ``"reverse_kl"`` on the student's, each plus one tail
        bin with the rest of each side's mass (ties at the k-th value kept;
        the bins are constants for differentiation), as
        :func:`jaxsce.topk_distillation_loss` does with a stored teacher.
        ``"jsd"`` with ``top_k`` is a ``ValueError``; None, ``<= 0`` or
        ``>= C``: the full divergence.

    Returns:
      float32 (float64 for float64 logits), scalar or of the batch shape.

    Raises:
      TypeError: non-floating logits, non-integer labels, a traced static option.
      ValueError: shapes that differ (named), no classes, an option out of range,
        ``hard_weight > 0`` without labels, ``top_k`` with ``"jsd"``.

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> t = jnp.log(jnp.array([[0.5, 0.5]]))
      >>> s = jnp.log(jnp.array([[0.25, 0.75]]))
      >>> print(f"{jaxsce.distillation_loss(s, t):.4f}")  # 0.5 log 2 + 0.5 log(2/3)
      0.1438
    """
    static: dict[str, Any] = dict(axis=axis, **_static(reduction, axis_name, batch_axis_name, derivative, num_classes))
    divergence, consts, hard, static["top_k"], static["ignore_index"] = _divergence_options(
        divergence, beta, temperature, labels, hard_weight, soft_weight, ignore_index, top_k
    )
    return _distillation_loss(
        student_logits, teacher_logits, where, labels, consts, divergence=divergence, hard=hard, **static
    )


@_front.implementation
def _distillation_loss(
    student,
    teacher,
    where,
    labels,
    consts,
    *,
    divergence,
    hard,
    axis,
    reduction,
    axis_name,
    batch_axis_name,
    derivative,
    num_classes,
    ignore_index,
    top_k,
):
    student = _validate.check_floating(student, "student_logits")
    teacher = _validate.check_floating(teacher, "teacher_logits")
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_logits have shape {teacher.shape} but must have student_logits' shape {student.shape}."
        )
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        _spmd.check_named_axes(name, x, axis_name, batch_axis_name)
    s_rows, batch_shape, flat = _validate.class_rows(student, axis, "student_logits")
    valid = _front.counted(where, batch_shape, "the batch shape: logits.shape without axis")
    ct = _validate.compute_dtype(_validate.promote(student.dtype, teacher.dtype))
    consts = _divergence.consts_in(consts, ct, divergence)
    count, padding = _options.class_count(num_classes, s_rows.shape[1], axis_name, "the logits' class axis")
    if labels is not None:
        labels = check_logit_labels(labels, student, axis, batch_shape)
    y, valid = _labels_in(labels, valid, count, ignore_index)
    loss = DistillRows(
        divergence=divergence,
        hard=hard,
        num_classes=count,
        top_k=top_k if top_k is not None and top_k < count else None,
        vocab=Vocab.of(axis_name, padding),
    )
    z = (s_rows, lax.stop_gradient(flat(teacher)))
    outputs = _front.whole(loss, z, valid, y if hard else None, None, consts, derivative)
    return _divergence.reduced(outputs, valid, reduction, batch_axis_name, batch_shape)


def _hard_options(consts: DistillConsts, labels, hard_weight, soft_weight) -> tuple[DistillConsts, bool]:
    """The hard-label term's weights in the consts, and whether there is one (labels and a weight)."""
    hard = _options.float_option(hard_weight, "hard_weight", off_when_zero=True, bounds=(0.0, None, False))
    soft = _options.float_option(soft_weight, "soft_weight", off_when_zero=False, bounds=(0.0, None, False))
    if hard is not None and labels is None:
        raise ValueError("hard_weight > 0 adds the cross-entropy of the student's labels: pass labels.")
    if soft is not None and not _validate.is_tracer(soft_weight) and float(soft_weight) == 1.0:
        soft = None
    return consts._replace(soft_weight=soft, hard_weight=hard), hard is not None


def _static(reduction, axis_name, batch_axis_name, derivative, num_classes) -> dict[str, Any]:
    """The static options both distillation functions share (checked at the door), by name."""
    return dict(
        reduction=reduction,
        axis_name=axis_name,
        batch_axis_name=batch_axis_name,
        derivative=derivative,
        num_classes=num_classes,
    )


def _labels_in(labels, valid, num_classes: int, ignore_index):
    """Checked class ids, flat (0 where not counted), and the mask without ``ignore_index``."""
    if labels is None:
        return None, valid
    return _labels.label_validity(labels.reshape(-1), num_classes, valid, ignore_index, False)


def _divergence_options(divergence, beta, temperature, labels, hard_weight, soft_weight, ignore_index, top_k):
    """The options both distillation functions share, checked: ``(divergence, consts, hard, top_k,
    ignore_index)``; host labels that JAX would wrap are refused here."""
    if labels is not None:
        _labels.check_host_labels(labels)
    divergence, consts = _divergence.options_of(divergence, beta, temperature)
    k = top_k
    if k is not None and divergence == "jsd":
        raise ValueError(
            "top_k bins the teacher's top k for divergence='kl' and the student's for 'reverse_kl'; "
            "'jsd' has no such bins: pass top_k=None or another divergence."
        )
    consts, hard = _hard_options(consts, labels, hard_weight, soft_weight)
    ignore = ignore_index
    if labels is None and ignore not in (None, _labels.DEFAULT_IGNORE_INDEX):
        raise ValueError("ignore_index applies to labels: pass labels.")
    return divergence, consts, hard, k, ignore


@_options.keyword_checked
@_auto.spmd(
    student_hidden=_auto.HIDDEN,
    student_weight=_auto.weight("weight_layout"),
    teacher_hidden=_auto.HIDDEN,
    teacher_weight=_auto.weight("teacher_weight_layout", "weight_layout"),
    student_bias=_auto.VOCAB,
    teacher_bias=_auto.VOCAB,
    where=_auto.ROWS,
    labels=_auto.ROWS,
)
def linear_distillation_loss(
    student_hidden: jax.Array,
    student_weight: jax.Array,
    teacher_hidden: jax.Array,
    teacher_weight: jax.Array,
    *,
    student_bias: jax.Array | None = None,
    teacher_bias: jax.Array | None = None,
    weight_layout: str = "dv",
    divergence: str = "kl",
    beta: float | jax.Array = 0.5,
    temperature: float | jax.Array = 1.0,
    where: jax.Array | None = None,
    reduction: str = "mean",
    token_block: int | None = None,
    vocab_block: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    axis_name: AxisName = None,
    batch_axis_name: AxisName = None,
    derivative: str = "vjp",
    num_classes: int | None = None,
    teacher_weight_layout: str | None = None,
    labels: jax.Array | None = None,
    hard_weight: float | jax.Array = 0.0,
    soft_weight: float | jax.Array = 1.0,
    ignore_index: int | None = -100,
    top_k: int | None = None,
) -> jax.Array:
    r"""Fused :func:`jaxsce.distillation_loss` of two linear heads that never builds either's logits.

    Equals ``distillation_loss(student_hidden @ student_weight + student_bias,
    teacher_hidden @ teacher_weight + teacher_bias)`` with the same options,
    streaming vocabulary blocks of both heads together. The student and the
    teacher may have different hidden sizes; their vocabularies are the
    same. Gradients flow to the student's hidden states, weight and bias
    only (the teacher is a constant).

    Paths: a scalar loss (``"mean"``/``"sum"``, no ``axis_name``, no
    ``vocab_block``) whose float32 ``d_W`` fits ``memory_budget`` forms its
    gradient in the forward pass over token blocks of whole rows (4 matmul
    passes: both heads' logits, ``d_hidden``, ``d_W``); otherwise the
    vocabulary is streamed in blocks and the backward recomputes both heads'
    blocks (6 matmul passes; ``"jsd"`` adds 2 for its second forward pass).

    Args:
      student_hidden: ``[..., d_s]`` floating.
      student_weight: ``[d_s, V]`` (``weight_layout="dv"``) or ``[V, d_s]`` (``"vd"``).
      teacher_hidden: ``[..., d_t]``, the student's batch shape.
      teacher_weight: ``[d_t, V]`` or ``[V, d_t]`` (``teacher_weight_layout``).
      student_bias, teacher_bias: optional ``[V]``.
      weight_layout: ``"dv"`` or ``"vd"``, the student's weight layout (and
        the teacher's unless ``teacher_weight_layout``).
      teacher_weight_layout: the teacher's layout when it differs (a tied
        ``[V, d]`` student table distilled from an untied ``[d, V]`` teacher
        kernel): each head's blocks are sliced from its own layout, nothing
        is transposed or copied. None: ``weight_layout``.
      divergence, beta, temperature, where, reduction: as in
        :func:`jaxsce.distillation_loss`.
      token_block, vocab_block, memory_budget: as in
        :func:`jaxsce.linear_cross_entropy` (the budget counts both heads' blocks).
      axis_name: mesh axis splitting the vocabulary of both heads inside
        ``jax.shard_map``. A weight whose vocabulary is split over a mesh
        axis that ``axis_name`` does not name is a ``ValueError`` (under
        ``check_vma=True``, where JAX tracks it).
      batch_axis_name: mesh axes splitting the tokens, for ``"mean"``/``"sum"``
        over the whole batch.
      derivative: ``"vjp"`` (default) or ``"jvp"`` (forward mode, one more
        streaming pass for the tangents), as in :func:`jaxsce.linear_log_probs`.
      num_classes: the real vocabulary size when both weights are padded, as
        in :func:`jaxsce.distillation_loss`.
      labels: integer class ids of the batch shape: with ``hard_weight``, the
        loss per token is ``soft_weight * divergence + hard_weight * CE``, the
        cross-entropy of the student's logits ``T s`` (untempered, as
        Liger-Kernel's ``weight_hard_loss``/``weight_soft_loss``), read in the
        same stream; tokens whose label is ``ignore_index`` are left out of
        both terms.
      hard_weight, soft_weight: the two terms' weights (``>= 0``, may be traced).
      ignore_index: labels equal to it are not counted (default -100, as in PyTorch; None: off).
      top_k: compare the heads on ``k + 1`` bins, as
        :func:`jaxsce.topk_distillation_loss` does with a stored teacher:
        ``"kl"`` on the teacher's top ``k`` classes, ``"reverse_kl"`` on the
        student's, each plus one tail bin with the rest of each side's mass
        (ties at the k-th value are kept; the bins are constants for
        differentiation). The top ``k`` are found while the vocabulary
        streams by (a running top-k), the bins' sums in one more streaming
        pass. ``"jsd"`` with ``top_k`` is a ``ValueError``; None, ``<= 0`` or
        ``>= V``: the full divergence.

    Returns:
      As :func:`jaxsce.distillation_loss`.

    Raises:
      TypeError, ValueError: as :func:`jaxsce.linear_cross_entropy`, naming
      the student's or the teacher's argument.

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> h = jnp.ones((4, 8)) / 8
      >>> ws, wt = jnp.zeros((8, 100)), jnp.zeros((16, 100))
      >>> print(f"{jaxsce.linear_distillation_loss(h, ws, jnp.ones((4, 16)), wt):.4f}")  # both uniform
      0.0000
    """
    static: dict[str, Any] = dict(
        **_options.fused(
            weight_layout=weight_layout, token_block=token_block, vocab_block=vocab_block, memory_budget=memory_budget
        ),
        **_static(reduction, axis_name, batch_axis_name, derivative, num_classes),
        teacher_weight_layout=_options.choice(
            weight_layout if teacher_weight_layout is None else teacher_weight_layout,
            "teacher_weight_layout",
            ("dv", "vd"),
        ),
    )
    _front.check_forward_mode(derivative, "linear_distillation_loss", student_hidden, student_weight, student_bias)
    divergence, consts, hard, static["top_k"], static["ignore_index"] = _divergence_options(
        divergence, beta, temperature, labels, hard_weight, soft_weight, ignore_index, top_k
    )
    args = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, where, labels)
    return _linear_distillation_loss(*args, consts, divergence=divergence, hard=hard, **static)


@_front.implementation
def _linear_distillation_loss(
    hs,
    ws,
    bs,
    ht,
    wt,
    bt,
    where,
    labels,
    consts,
    *,
    divergence,
    hard,
    ignore_index,
    weight_layout,
    reduction,
    token_block,
    vocab_block,
    memory_budget,
    axis_name,
    batch_axis_name,
    derivative,
    num_classes,
    teacher_weight_layout,
    top_k,
):
    student, v_s = check_head(hs, ws, bs, weight_layout, prefix="student_", linear="")
    teacher, v_t = check_head(ht, wt, bt, teacher_weight_layout, prefix="teacher_", linear="")
    batch_shape = hs.shape[:-1]
    if ht.shape[:-1] != batch_shape:
        raise ValueError(
            f"teacher_hidden has shape {ht.shape} but must have student_hidden's batch shape {batch_shape} "
            f"(student_hidden has shape {hs.shape})."
        )
    if v_t != v_s:
        raise ValueError(
            f"teacher_weight of shape {wt.shape} (teacher_weight_layout={teacher_weight_layout!r}) has {v_t} "
            f"classes but student_weight of shape {ws.shape} (weight_layout={weight_layout!r}) has {v_s}."
        )
    for prefix, w, h in (("student", ws, hs), ("teacher", wt, ht)):
        _spmd.check_split_axes(f"{prefix}_weight", w, h, f"{prefix}_hidden", axis_name, batch_axis_name)
    valid = _front.counted(where, batch_shape, "student_hidden.shape[:-1]")
    teacher = _stream.Head(*(None if x is None else lax.stop_gradient(x) for x in teacher))  # type: ignore[arg-type]
    heads = (student, teacher)
    ct = _stream.acc_dtype(*student, *teacher)
    consts = _divergence.consts_in(consts, ct, divergence)
    count, padding = _options.class_count(num_classes, v_s, axis_name, "student_weight's vocabulary")
    if labels is not None:
        labels = check_class_ids(labels, batch_shape, hs.shape)
    y, valid = _labels_in(labels, valid, count, ignore_index)
    loss = DistillRows(
        divergence=divergence,
        hard=hard,
        num_classes=count,
        top_k=top_k if top_k is not None and top_k < count else None,
        vocab=Vocab.of(axis_name, padding),
    )
    out = _front.fused(
        loss,
        heads,
        valid,
        y if hard else None,
        None,
        consts,
        (weight_layout, teacher_weight_layout),
        n_outputs=1,
        scalar=reduction != "none",
        token_block=token_block,
        vocab_block=vocab_block,
        memory_budget=memory_budget,
        forward_mode=derivative == "jvp",
    )
    if isinstance(out, _front.Total):
        return _front.reduce_total(out, reduction, batch_axis_name, valid)
    return _divergence.reduced(out, valid, reduction, batch_axis_name, batch_shape)
