r"""The token tier: per-token log-probabilities, entropy and a reference head's log-probabilities, streamed.

Every loss that is a function of per-token log-probabilities (``log_probs``,
the policy and the preference losses) streams its rows with
:class:`LogProbRows`; a loss that only combines them declares its objective
and lets :func:`grouped_vjp` form the cotangents per token block.

With ``s = softcap(z) / T`` (``T`` the temperature), ``p = softmax(s)`` and
``lse = log sum_c exp(s_c)``, per token:

.. math::
    \log p_y = s_y - \mathrm{lse}, \qquad
    H = -\sum_c p_c \log p_c = \mathrm{lse} - \sum_c p_c s_c .

Gradients with respect to ``s`` for cotangents ``g`` (of ``log p_y``) and
``g_H`` (of ``H``):

.. math::
    \frac{\partial \log p_y}{\partial s} = e_y - p, \qquad
    \frac{\partial H}{\partial s_c} = -p_c (\log p_c + H),

since ``d lse / d s = p`` and ``d (sum_c p_c s_c) / d s_c = p_c (1 + s_c - sum_k p_k s_k)``.
Then ``ds/dz = (1 - tanh^2(z / cap)) / T``.

Both are sums of the streaming engine (``_stream``): the sums per
row are the label's ``s_y`` and, for the entropy, ``A = sum_c exp(s_c - m)
(s_c - m)`` relative to the running max ``m``. When ``m`` moves to ``m'``,
``A' = exp(m - m') (A + (m - m') se)`` with ``se`` the sum of exponentials;
then ``H = log se - A / se``. Both terms are of order ``log V`` whatever the
logits' scale, so a confident row's small entropy is not the difference of
two large numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .._api import _front
from .._base import _spmd, _transform
from .._base._transform import Transform
from .._engine import _sampler, _stream
from .._engine._rowloss import Vocab
from .._engine._targets import block_hits, in_block, label_entry


def entropy_sum(a, blk: _stream.Block, head: int = 0):
    """One block's update of ``A = sum_c exp(s_c - m)(s_c - m)`` (``0 log 0 = 0``)."""
    e, s, m = blk.e[head], blk.s[head], blk.m[head]
    here = jnp.sum(jnp.where(e > 0, e * (s - m[:, None]), 0), axis=-1)
    before = blk.rescale[head] * (a + blk.shift[head] * blk.se_before[head])
    return jnp.where(blk.se_before[head] > 0, before, 0) + here


def entropy_to_global(a, sh: _stream.Shards, head: int = 0):
    """A shard's ``A`` relative to the global max: ``scale (A + (m_local - m) se_local)``."""
    return sh.scale[head] * (a + (sh.m_local[head] - sh.m_global[head]) * sh.se_local[head])


class TokenConsts(NamedTuple):
    """The traced parameters of the token tier: the logit transform, and a token objective's own (a pytree)."""

    transform: Transform
    objective: Any = None


class LogProbSums(NamedTuple):
    """Per-row sums: the label's ``s_y``, for the entropy ``A = sum_c exp(s_c - m)(s_c - m)``,
    a reference head's ``s_y``, and a sampler's candidates (:mod:`jaxsce._engine._sampler`)."""

    label: jax.Array
    entropy: jax.Array | None = None
    reference: jax.Array | None = None
    candidates: _sampler.Candidates | None = None
    low: jax.Array | None = None  # top-p alone: the row's smallest entry (where its search starts)


class SampledRows(NamedTuple):
    """Per-row data of sampler-matched log-probabilities: the labels and top-p's ``p`` (or None)."""

    labels: jax.Array
    top_p: jax.Array | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogProbRows(_stream.RowLoss):
    """``(log p_y,)``, ``(log p_y, H)``, then a reference head's ``log p_y`` when ``reference``; per row.

    See the module docstring. With ``reference``, head 1 is a second model
    (a frozen reference policy) read in the same stream: its log-probability
    of the same label is one more output, without a gradient. With
    ``sampler``, both outputs are of the distribution a top-k / top-p
    sampler drew from (:mod:`jaxsce._engine._sampler`); its kept set is a constant
    for differentiation, and the rows are :class:`SampledRows`.
    """

    num_classes: int
    entropy: bool
    reference: bool = False
    sampler: _sampler.Sampler | None = None
    grad_heads = 1  # the reference head gets no gradient: the backward does not recompute it

    @property
    def heads(self):  # type: ignore[override]
        return 2 if self.reference else 1

    @property
    def differentiable(self):  # type: ignore[override]
        return (0, 1) if self.entropy else (0,)

    def label_ids(self, rows):
        """The class ids among the per-row data (all of it here, or :class:`SampledRows`)."""
        return rows.labels if isinstance(rows, SampledRows) else rows

    def transform(self, z, head, c: TokenConsts):
        return _transform.apply(z, c.transform)

    def transform_grad(self, s, ds, head, c: TokenConsts):
        return _transform.chain(s, ds, c.transform)

    def searches(self) -> bool:
        # Top-p alone over more classes than the candidates hold: rows whose candidates do not reach p
        # find their threshold in further passes (:mod:`jaxsce._engine._sampler`).
        sp = self.sampler
        return sp is not None and sp.top_p and not sp.covered

    def init(self, tb, ct, c, forward_mode: bool):
        zeros = jnp.zeros((tb,), ct)
        sp = self.sampler
        cand = None if sp is None else _sampler.init(tb, sp.size, ct)
        low = jnp.full((tb,), jnp.inf, ct) if self.searches() else None
        ref = zeros if self.reference else None
        return _stream.Acc(LogProbSums(zeros, zeros if self.entropy else None, ref, cand, low))

    def accumulate(self, acc, blk: _stream.Block, c):
        sums, y = acc.sums, self.label_ids(blk.rows)
        hit = in_block(y, blk)
        s_y = sums.label + jnp.where(hit, label_entry(blk.s[0], y, blk.col0), 0)
        a = None if sums.entropy is None else entropy_sum(sums.entropy, blk)
        ref = sums.reference
        if ref is not None:
            ref = ref + jnp.where(hit, label_entry(blk.s[1], y, blk.col0), 0)
        cand = sums.candidates
        if cand is not None:
            cand = _sampler.merge_block(cand, blk.s[0], blk.fresh)
        low = sums.low
        if low is not None:
            low = _sampler.low_block(low, blk.s[0], blk.fresh)
        return _stream.Acc(LogProbSums(s_y, a, ref, cand, low))

    def to_global(self, acc, sh: _stream.Shards, c):
        sums = acc.sums
        if sums.entropy is not None:
            sums = sums._replace(entropy=entropy_to_global(sums.entropy, sh))
        if sums.candidates is not None:
            sums = sums._replace(candidates=_sampler.shard_share(sums.candidates, self.vocab_axis))
        if sums.low is not None:
            sums = sums._replace(low=_sampler.low_share(sums.low, self.vocab_axis))
        return _stream.Acc(sums)

    def _kept(self, stats: _stream.Stats, sums: LogProbSums, rows: SampledRows) -> _sampler.Kept:
        assert self.sampler is not None and sums.candidates is not None
        return _sampler.kept(self.sampler, sums.candidates, stats.shift[0], stats.se[0], rows.top_p)

    def search_init(self, acc, stats: _stream.Stats, rows):
        sums = acc.sums
        kept = self._kept(stats, sums, rows)
        return _sampler.search_init(kept, sums.candidates, sums.low, rows.top_p)

    def search_pending(self, state):
        return _sampler.search_pending(state)

    def search_rows(self, state, rows):
        return _sampler.SearchRows(rows, _sampler.search_thresholds(state))

    def search_step(self, state, pass_rows, sums):
        return _sampler.search_step(state, pass_rows.thresholds, sums, pass_rows.rows.top_p)

    def search_limit(self) -> int:
        return _sampler.SEARCH_PASSES

    def init2(self, tb, ct, c):
        return _sampler.search_sums_init(tb, ct, self.entropy)

    def accumulate2(self, acc2, blk: _stream.GradBlock, fresh, c):
        return _sampler.search_sums(acc2, blk.s[0], blk.p[0], blk.log_p[0], fresh, blk.rows.thresholds)

    def finish(self, stats: _stream.Stats, acc, second, rows, cols, c):
        sums, y = acc.sums, self.label_ids(rows)
        out_of_range = (y < 0) | (y >= self.num_classes)
        # Relative to the row max: (s_y - m) is exact, and log se is of order log V.
        log_z, a, sampled = stats.log_se[0], sums.entropy, ()
        if self.sampler is not None:
            assert sums.candidates is not None and isinstance(rows, SampledRows)
            kept = self._kept(stats, sums, rows)
            if second is not None:
                kept = _sampler.searched(kept, second, stats.log_se[0], rows.top_p)
            label_kept = sums.label >= kept.threshold
            log_z = jnp.where(kept.known, kept.log_z, jnp.nan)
            if a is not None:
                # Top-p alone, off for a row (p >= 1): the whole row's sum.
                p = rows.top_p
                a = jnp.where(p >= 1, a, kept.a) if p is not None and not self.sampler.top_k else kept.a
            # The backward's residuals: the threshold, log(se / Z) and whether the label was kept.
            sampled = (kept.threshold, stats.log_se[0] - log_z, label_kept)
        log_p = jnp.where(out_of_range | (stats.m[0] == jnp.inf), jnp.nan, (sums.label - stats.shift[0]) - log_z)
        if sampled:
            log_p = jnp.where(sampled[2] | jnp.isnan(log_p), log_p, -jnp.inf)
        outputs, res = (log_p,), sampled
        if a is not None:
            z = stats.se[0] if self.sampler is None else jnp.exp(log_z)
            h = log_z - a / z
            h = jnp.where(stats.m[0] == jnp.inf, jnp.nan, h)
            outputs, res = (log_p, h), (h,) + sampled
        if sums.reference is not None:
            bad_ref = out_of_range | (stats.m[1] == jnp.inf)
            outputs += (jnp.where(bad_ref, jnp.nan, (sums.reference - stats.shift[1]) - stats.log_se[1]),)
        return outputs, res, None

    def grad(self, blk: _stream.GradBlock, res, cts, c):
        p, log_p, y = blk.p[0], blk.log_p[0], self.label_ids(blk.rows)
        g = cts[0]
        # A counted row with a label outside [0, C) gets a NaN gradient.
        g = jnp.where((y < 0) | (y >= self.num_classes), jnp.nan, g)
        if self.sampler is not None:
            # The sampler's distribution on its kept set; a label it could not
            # emit (log-prob -inf) has no gradient.
            tau, r, label_kept = res[-3:]
            log_p = log_p + r[:, None]
            p = jnp.where(blk.s[0] >= tau[:, None], jnp.exp(log_p), 0)
            g = jnp.where(label_kept, g, 0)
        hit = block_hits(y, blk.col0, p.shape[-1])
        coef = g[:, None]
        if self.entropy:
            h, g_h = res[0], cts[1]
            log_p = jnp.where(p == 0, 0, log_p)  # 0 log 0 = 0
            coef = coef + g_h[:, None] * (log_p + h[:, None])
        if self.sampler is not None:
            # A NaN row (a top_p out of range) whose outputs the caller masked gets exactly 0, not
            # 0 * NaN: its NaN must not reach d_hidden and d_W through a zero cotangent.
            return jnp.where(hit, g[:, None], 0) - jnp.where(coef == 0, 0, p * coef)
        return jnp.where(hit, g[:, None], 0) - p * coef


def grouped_vjp(fn, args: tuple, shape: tuple):
    """A per-token objective on a token block, for the single-pass path
    (:meth:`~jaxsce._engine._rowloss.RowLoss.scalar`).

    ``fn(*args)`` takes the flat ``[T]`` arrays ``args`` (None entries stay
    None) reshaped to ``shape`` (whole groups of rows: completions, pairs)
    and returns ``(per-token values, aux)``. Returns the values and the
    cotangents of their sum for each of ``args``, flat, and ``aux`` as is.
    """
    group = lambda x: None if x is None else x.reshape(shape)  # noqa: E731
    value, vjp, aux = jax.vjp(fn, *(group(a) for a in args), has_aux=True)
    cotangents = vjp(_spmd.vary_like(jnp.ones_like(value), value))
    flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
    return value.reshape(-1), tuple(flat(g) for g in cotangents), aux


# --- token objectives ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenObjective:
    """A loss that is a function of per-token log-probabilities (and the entropy, and a reference's).

    A subclass is a frozen dataclass of its static choices and defines
    :meth:`__call__`; the tier gives it the logit level, the fused single
    pass (its cotangents from ``jax.vjp`` per token block), streaming,
    vocabulary sharding and the metrics, through :func:`evaluate`.

    Attributes:
      group: tokens per group on the single-pass path (a completion, a pair):
        token blocks hold whole groups, so the objective may combine a
        group's tokens. 1: each token stands alone.
      entropy: the objective reads the entropy ``h``.
      summed_metrics: the metrics are per-token terms the caller sums (so
        the single-pass path may return their sums); else they are returned
        as the objective forms them, and the single pass is not taken when
        they are asked for.
    """

    group: int = 1
    entropy: bool = False
    summed_metrics: bool = True

    def __call__(self, lp, h, ref, data, consts):
        """``(per-token values, metrics)`` for ``lp`` (and ``h``, ``ref``, ``data``) of shape ``shape(T)``.

        Masked tokens must give exactly 0 with a zero gradient, whatever their data.
        """
        raise NotImplementedError

    def shape(self, tokens: int) -> tuple[int, ...]:
        """The shape the ``tokens`` per-token arrays take in :meth:`__call__`: whole groups (default:
        ``[tokens / group, group]``)."""
        return (tokens // self.group, self.group)


class ObjectiveRowData(NamedTuple):
    """Per-row data of a token objective: the class ids and the objective's data (tokens on axis 0)."""

    labels: jax.Array
    data: Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveRows(LogProbRows):
    """:class:`LogProbRows` whose scalar is a :class:`TokenObjective` (the single-pass path)."""

    objective: TokenObjective

    def label_ids(self, rows: ObjectiveRowData):
        return rows.labels

    def scalar(self, outputs, rows: ObjectiveRowData, c: TokenConsts):
        obj = self.objective
        lp = outputs[0]
        shape = obj.shape(lp.shape[0])
        grouped = lambda x: None if x is None else x.reshape(shape + x.shape[1:])  # noqa: E731
        data = jax.tree.map(grouped, rows.data)
        ref = grouped(outputs[-1]) if self.reference else None
        h = outputs[1] if self.entropy else None
        fn = lambda lp, h: obj(lp, h, ref, data, c.objective)  # noqa: E731
        value, (d_lp, d_h), metrics = grouped_vjp(fn, (lp, h), shape)
        cts = (d_lp,) + ((d_h,) if self.entropy else ()) + ((None,) if self.reference else ())
        metrics = tuple(x.reshape(-1) for x in metrics) if obj.summed_metrics else ()
        return _stream.Scalar(value, jnp.zeros_like(value), cts, metrics)


def evaluate(
    objective: TokenObjective,
    heads: tuple,
    valid,
    labels,
    data,
    consts: TokenConsts,
    *,
    num_classes: int,
    vocab: Vocab | None = None,
    reference: bool = False,
    entropy: bool = False,
    fused: dict | None = None,
    n_metrics: int = 0,
    invariant: bool = False,
):
    """The sum of a token objective's values over the tokens, and its metrics.

    ``heads``: the logits ``([T, V],)`` (the logit level) or the linear
    heads (:class:`~jaxsce._engine._stream.Head`, a reference head second), with
    ``fused`` the fused path's options (``layouts``, ``token_block``,
    ``vocab_block``, ``memory_budget``). ``valid``, ``labels``: ``[T]``;
    ``data``: the objective's per-token data, a pytree of ``[T, ...]``
    arrays (grouped as ``objective.shape(T)`` before the objective sees
    them). ``vocab``: the vocabulary's layout (None: whole, every column a class).
    ``n_metrics``: the metrics wanted (0: none), summed per token where the
    objective's metrics are (``summed_metrics``), else as it forms them.

    Returns ``(value, metrics)``. A scalar loss whose ``d_W`` fits the
    budget forms its gradient in the forward stream (3 matmul passes);
    otherwise the log-probabilities are streamed and JAX differentiates the
    objective (4).
    """
    entropy = entropy or objective.entropy
    rows = ObjectiveRows(
        num_classes=num_classes,
        entropy=entropy,
        reference=reference,
        objective=objective,
        row_group=objective.group,
        vocab=vocab or Vocab(),
    )
    if fused is None:
        outputs = _front.whole(
            rows, heads, valid, ObjectiveRowData(labels, None), None, consts, "vjp", invariant=invariant
        )
    else:
        out = _front.fused(
            rows,
            heads,
            valid,
            ObjectiveRowData(labels, data),
            None,
            consts,
            fused["layouts"],
            n_outputs=1 + entropy + reference,
            scalar=objective.summed_metrics or not n_metrics,
            token_block=fused["token_block"],
            vocab_block=fused["vocab_block"],
            memory_budget=fused["memory_budget"],
            n_aux=n_metrics if objective.summed_metrics else 0,
            invariant=invariant,
        )
        if isinstance(out, _front.Total):
            return out.total, out.aux
        outputs = out
    shape = objective.shape(outputs[0].shape[0])
    grouped = tuple(x.reshape(shape) for x in outputs)
    lp, h = grouped[0], grouped[1] if entropy else None
    ref = grouped[-1] if reference else None
    data = jax.tree.map(lambda x: x.reshape(shape + x.shape[1:]), data)
    value, metrics = objective(lp, h, ref, data, consts.objective)
    if objective.summed_metrics:
        metrics = tuple(jnp.sum(x) for x in metrics)
    return jnp.sum(value), metrics if n_metrics else ()
