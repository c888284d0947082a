r"""``log_probs`` and ``linear_log_probs``: per-token log-probabilities and entropy.

The per-row math (``log p_y``, the entropy, their gradients, the sampler's
kept set) is :class:`~jaxsce._tiers._tokens.LogProbRows`; this module holds the two
public functions and their checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, overload

import jax

from .._api import _auto, _front, _options
from .._api._inputs import check_class_ids, check_head, check_logit_labels
from .._base import _labels, _spmd, _typing, _validate
from .._base._transform import Transform
from .._engine import _sampler, _stream
from .._engine._rowloss import Vocab
from .._engine._stream import DEFAULT_MEMORY_BUDGET
from .._tiers._tokens import LogProbRows, SampledRows, TokenConsts

if TYPE_CHECKING:
    from .._base._typing import Unpack

AxisName = str | tuple[str, ...] | None


@overload
def log_probs(
    logits: jax.Array,
    labels: jax.Array,
    *,
    return_entropy: Literal[False] = False,
    **options: Unpack[_typing.LogProbsOptions],
) -> jax.Array: ...
@overload
def log_probs(
    logits: jax.Array, labels: jax.Array, *, return_entropy: Literal[True], **options: Unpack[_typing.LogProbsOptions]
) -> tuple[jax.Array, jax.Array]: ...
@overload
def log_probs(
    logits: jax.Array, labels: jax.Array, *, return_entropy: bool, **options: Unpack[_typing.LogProbsOptions]
) -> jax.Array | tuple[jax.Array, jax.Array]: ...
@_options.keyword_checked
@_auto.spmd(logits=_auto.CLASSES, labels=_auto.ROWS, where=_auto.ROWS, top_p=_auto.ROWS)
def log_probs(
    logits: jax.Array,
    labels: jax.Array,
    *,
    axis: int | Sequence[int] = -1,
    temperature: float | jax.Array = 1.0,
    logit_softcap: float | jax.Array | None = None,
    where: jax.Array | None = None,
    return_entropy: bool = False,
    axis_name: AxisName = None,
    check_labels: bool = False,
    derivative: str = "vjp",
    num_classes: int | None = None,
    ignore_index: int | None = -100,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
    top_p_candidates: int = _sampler.TOP_P_CANDIDATES,
    batch_invariant: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Log-probability of each label, and optionally the entropy, with analytic gradients.

    With :math:`s = \mathrm{softcap}(z) / T` and :math:`p = \mathrm{softmax}(s)`:

    .. math::
        \log p_y = s_y - \log \textstyle\sum_c e^{s_c}, \qquad
        H = -\textstyle\sum_c p_c \log p_c,

    with :math:`0 \log 0 = 0`. The gradients come from a ``jax.custom_vjp``
    for any cotangents of both outputs:
    :math:`\partial \log p_y / \partial s = e_y - p` and
    :math:`\partial H / \partial s_c = -p_c (\log p_c + H)`, then
    :math:`\partial s / \partial z = (1 - \tanh^2(z / \mathrm{cap})) / T`.
    The backward recomputes :math:`p` from the logits and one number per
    example: nothing of the logits' size is saved. These are the policy
    terms of RL fine-tuning (REINFORCE, PPO, GRPO): ``log_probs`` of the
    sampled tokens and the entropy bonus.

    Args:
      logits: floating array ``[..., C, ...]``.
      labels: integer class ids of ``logits.shape`` without ``axis``.
      axis: class axis, or tuple of axes (as in :func:`jaxsce.cross_entropy`).
      temperature: :math:`T > 0` (may be traced, e.g. a schedule; it gets no
        gradient).
      logit_softcap: :math:`\mathrm{cap} > 0` or None (may be traced).
      where: boolean mask of the batch shape: examples where it is False
        give exactly 0 (value and gradient), even if their logits are NaN.
      return_entropy: also return :math:`H` per example.
      axis_name: mesh axis splitting the classes inside ``jax.shard_map``
        (``logits`` is then the local shard); the result is the same on
        every shard, from one ``pmax`` and one ``psum`` of one or two
        numbers per example.
      check_labels: raise at run time on a counted label outside ``[0, C)``
        (as in :func:`jaxsce.cross_entropy`); without it such an example
        gives NaN.
      ignore_index: labels equal to it are not counted: what ``where=False``
        gives there (0, and 0 gradient). Default -100 (PyTorch's, TRL's and
        Hugging Face's collators'); None: every label is a class id.
      num_classes: the number of real classes when the class axis is padded:
        columns at or beyond it (over all shards) are left out of the
        softmax and the entropy, with exactly 0 gradient, as in
        :func:`jaxsce.cross_entropy`.
      top_k, top_p: the sampler's filters, to get the log-probability of
        the label under the distribution a top-k / top-p sampler drew from
        (vLLM's order: temperature, then top-k, then top-p over what top-k
        kept): ``top_k`` keeps the values at or above the k-th largest (ties
        kept; None, ``<= 0`` or ``>= C``: off); ``top_p`` in ``(0, 1]`` (a
        number, or an array of the batch shape, may be traced) then keeps a
        class when the mass of the survivors above it is below ``p`` (the
        largest always; ties kept together). The softmax is renormalized
        over the kept set; a label outside it gives ``-inf`` and no gradient.
        The kept set is a constant for differentiation; the entropy is over
        it. Found by a running top-k, never by sorting the row.
      top_p_candidates: with ``top_p`` and no ``top_k``, how many of the
        largest values per row the first pass keeps (default 256). A row
        whose nucleus is wider (its candidates hold less than ``p``) finds
        its threshold exactly in further passes over the vocabulary (fused:
        each a matmul pass; 5 on random heads at V = 32768 whose nuclei
        hold 3,000 to 8,000 tokens): a search over 64 bins a pass, between the row's smallest value and its smallest
        candidate, until one entry or one representable value remains. So
        ``top_p`` alone is exact at any nucleus width, and a larger bound
        trades the running top-k's cost for fewer passes. ``top_k`` bounds
        the candidates itself.

        .. versionchanged:: 0.2.0
           A nucleus wider than the bound gave NaN.
      batch_invariant: every row's result bitwise identical whatever the
        batch it is computed in (its size, padding, and the block options):
        rows are computed in fixed blocks of 256 (padded to at least two
        blocks) and, fused, the vocabulary in fixed blocks of 4096 columns.
        The cost is stated on the performance page.
      derivative: ``"vjp"`` (default): the ``jax.custom_vjp`` above, for
        reverse mode (``jax.grad``; ``jax.jvp`` of it raises JAX's
        ``custom_vjp`` error). ``"jvp"``: a ``jax.custom_jvp`` whose rule
        forms the outputs' tangents from the same per-entry derivatives,
        :math:`\dot{o} = \sum_c (\partial o / \partial s_c)\,\dot s_c`, for
        forward mode (``jax.jvp``, ``jax.jacfwd``); reverse mode then goes
        through JAX's transpose of that rule (Hessians work; for training
        ``"vjp"`` keeps less).

    Returns:
      ``log_probs`` with the batch shape, float32 for 16- and 32-bit logits
      (float64 for float64); with ``return_entropy``, ``(log_probs, entropy)``.

    Raises:
      TypeError: non-floating logits, non-integer labels, a traced static option.
      ValueError: shapes that do not fit (named), no classes, an option out of range.

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> z = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
      >>> lp, h = jaxsce.log_probs(z, jnp.array([0]), return_entropy=True)
      >>> print(f"{lp[0]:.4f} {h[0]:.4f}")  # log 0.5, 1.5 log 2
      -0.6931 1.0397
    """
    _labels.check_host_labels(labels)
    static = dict(
        axis=axis,
        return_entropy=return_entropy,
        axis_name=axis_name,
        check_labels=check_labels,
        derivative=derivative,
        num_classes=num_classes,
        ignore_index=ignore_index,
        top_k=top_k,
        top_p_candidates=top_p_candidates,
        batch_invariant=batch_invariant,
    )
    tp = _options.transform(logit_softcap, temperature)
    return _options.run(_log_probs, (logits, labels, where, _options.top_p(top_p), tp), static)


def _outputs(outputs, batch_shape, return_entropy: bool):
    out = tuple(o.reshape(batch_shape) for o in outputs)
    return out if return_entropy else out[0]


def _sampled(y, top_k, top_p, candidates: int, num_classes: int, batch_shape, ct):
    """The sampler's filters (or None) and the per-row data: the labels, with top-p's ``p`` per row."""
    sampler = _sampler.sampler(top_k, top_p is not None, num_classes, candidates)
    if sampler is None:
        return None, y
    p = None if top_p is None else _options.top_p_rows(top_p, batch_shape, "the batch shape", ct)
    return sampler, SampledRows(y, p)


@_front.implementation
def _log_probs(
    logits,
    labels,
    where,
    top_p,
    tp: Transform,
    *,
    axis,
    return_entropy,
    axis_name,
    check_labels,
    derivative,
    num_classes,
    ignore_index,
    top_k,
    top_p_candidates,
    batch_invariant,
):
    logits = _validate.check_floating(logits, "logits")
    z, batch_shape, _ = _validate.class_rows(logits, axis, "logits")
    labels = check_logit_labels(labels, logits, axis, batch_shape)
    _spmd.check_split_axes("logits", logits, labels, "labels", axis_name, None)
    n, local_classes = z.shape
    num_classes, padding = _options.class_count(num_classes, local_classes, axis_name, "the logits' class axis")
    valid = _front.counted(where, batch_shape, "the batch shape: logits.shape without axis")
    y, valid = _labels.label_validity(labels.reshape(n), num_classes, valid, ignore_index, check_labels)
    ct = _validate.compute_dtype(z.dtype)
    consts = TokenConsts(_options.in_dtype(tp, ct))
    sampler, rows = _sampled(y, top_k, top_p, top_p_candidates, num_classes, batch_shape, ct)
    loss = LogProbRows(
        num_classes=num_classes,
        entropy=return_entropy,
        vocab=Vocab.of(axis_name, padding),
        sampler=sampler,
    )
    outputs = _front.whole(loss, (z,), valid, rows, None, consts, derivative, invariant=batch_invariant)
    return _outputs(outputs, batch_shape, return_entropy)


@overload
def linear_log_probs(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    *,
    return_entropy: Literal[False] = False,
    **options: Unpack[_typing.LinearLogProbsOptions],
) -> jax.Array: ...
@overload
def linear_log_probs(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    *,
    return_entropy: Literal[True],
    **options: Unpack[_typing.LinearLogProbsOptions],
) -> tuple[jax.Array, jax.Array]: ...
@overload
def linear_log_probs(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    *,
    return_entropy: bool,
    **options: Unpack[_typing.LinearLogProbsOptions],
) -> jax.Array | tuple[jax.Array, jax.Array]: ...
@_options.keyword_checked
@_auto.spmd(
    hidden=_auto.HIDDEN,
    linear_weight=_auto.weight("weight_layout"),
    labels=_auto.ROWS,
    linear_bias=_auto.VOCAB,
    where=_auto.ROWS,
    top_p=_auto.ROWS,
)
def linear_log_probs(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    *,
    linear_bias: jax.Array | None = None,
    weight_layout: str = "dv",
    temperature: float | jax.Array = 1.0,
    logit_softcap: float | jax.Array | None = None,
    where: jax.Array | None = None,
    return_entropy: bool = False,
    token_block: int | None = None,
    vocab_block: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    axis_name: AxisName = None,
    check_labels: bool = False,
    derivative: str = "vjp",
    num_classes: int | None = None,
    ignore_index: int | None = -100,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
    top_p_candidates: int = _sampler.TOP_P_CANDIDATES,
    batch_invariant: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Fused :func:`jaxsce.log_probs` of ``hidden @ linear_weight + linear_bias`` that never builds the logits.

    The same outputs and gradients as :func:`jaxsce.log_probs` of the logits
    :math:`z = h W + b`, computed from ``[token_block, vocab_block]`` blocks
    of :math:`z` only: a streaming forward (one matmul pass, an online
    log-sum-exp and entropy sum per token), and a backward that recomputes
    the blocks (three matmul passes) for any cotangents of the log-probs and
    the entropy, e.g. a policy-gradient objective
    ``-mean(advantage * logp) - beta * mean(entropy)``. Gradients for
    ``hidden``, ``linear_weight`` and ``linear_bias``:
    :math:`\partial h = \partial z\,W^\top`, :math:`\partial W = h^\top \partial z`,
    :math:`\partial b = \sum_n \partial z_n`.

    Args:
      hidden: ``[..., d]`` floating (float32, bfloat16, float16).
      linear_weight: ``[d, V]`` (``weight_layout="dv"``) or ``[V, d]``
        (``"vd"``), as in :func:`jaxsce.linear_cross_entropy`.
      labels: integer class ids (the sampled tokens) of ``hidden.shape[:-1]``.
      linear_bias: optional ``[V]``.
      weight_layout: ``"dv"`` or ``"vd"``.
      temperature, logit_softcap, where, return_entropy, check_labels, num_classes, ignore_index: as in
        :func:`jaxsce.log_probs`.
      top_k, top_p, top_p_candidates, batch_invariant: as in :func:`jaxsce.log_probs` (fused: the
        vocabulary blocks' running top-k, and for a wide nucleus the threshold search, never the logits).
      token_block, vocab_block, memory_budget: as in
        :func:`jaxsce.linear_cross_entropy`.
      axis_name: mesh axis splitting the vocabulary inside ``jax.shard_map``:
        the vocabulary axis of ``linear_weight`` (and ``linear_bias``) is the
        local shard. Communication is one ``pmax`` and one ``psum`` of two or
        three numbers per token.
      derivative: ``"vjp"`` (default) or ``"jvp"``, as in
        :func:`jaxsce.log_probs`. In ``"jvp"`` mode the tangents come from
        one more streaming pass once the normalizers are known (the logits
        blocks again, plus one matmul per perturbed input), so forward mode
        never builds the logits either. Reverse mode through ``"jvp"`` needs
        jax >= 0.10.

    Returns:
      As :func:`jaxsce.log_probs`: float32 (float64 for float64 inputs) of
      ``hidden.shape[:-1]``. Gradients are in the inputs' dtypes; matmuls
      accumulate in float32.

    Raises:
      TypeError: non-floating ``hidden``/``linear_weight``/``linear_bias``,
        non-integer labels, a traced static option.
      ValueError: shapes that do not fit (named), no classes, an option out of range.

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> h = jnp.ones((2, 8), jnp.float32)
      >>> w = jnp.zeros((8, 1000), jnp.float32)
      >>> lp, ent = jaxsce.linear_log_probs(h, w, jnp.array([3, 7]), return_entropy=True)
      >>> print(f"{lp[0]:.4f} {ent[0]:.4f}")  # uniform: -log 1000, log 1000
      -6.9078 6.9078
    """
    _labels.check_host_labels(labels)
    static = dict(
        **_options.fused(
            weight_layout=weight_layout, token_block=token_block, vocab_block=vocab_block, memory_budget=memory_budget
        ),
        return_entropy=return_entropy,
        axis_name=axis_name,
        check_labels=check_labels,
        derivative=derivative,
        num_classes=num_classes,
        ignore_index=ignore_index,
        top_k=top_k,
        top_p_candidates=top_p_candidates,
        batch_invariant=batch_invariant,
    )
    _front.check_forward_mode(derivative, "linear_log_probs", hidden, linear_weight, linear_bias)
    tp = _options.transform(logit_softcap, temperature)
    args = (hidden, linear_weight, labels, linear_bias, where, _options.top_p(top_p), tp)
    return _options.run(_linear_log_probs, args, static)


@_front.implementation
def _linear_log_probs(
    hidden,
    weight,
    labels,
    bias,
    where,
    top_p,
    tp: Transform,
    *,
    weight_layout,
    return_entropy,
    token_block,
    vocab_block,
    memory_budget,
    axis_name,
    check_labels,
    derivative,
    num_classes,
    ignore_index,
    top_k,
    top_p_candidates,
    batch_invariant,
):
    head, v_local = check_head(hidden, weight, bias, weight_layout)
    batch_shape = hidden.shape[:-1]
    labels = check_class_ids(labels, batch_shape, hidden.shape)
    _spmd.check_split_axes("linear_weight", weight, labels, "labels", axis_name, None)
    n = head.hidden.shape[0]
    num_classes, padding = _options.class_count(num_classes, v_local, axis_name, "linear_weight's vocabulary")
    valid = _front.counted(where, batch_shape, "hidden.shape[:-1]")
    y, valid = _labels.label_validity(labels.reshape(n), num_classes, valid, ignore_index, check_labels)
    ct = _stream.acc_dtype(*head)
    consts = TokenConsts(_options.in_dtype(tp, ct))
    sampler, rows = _sampled(y, top_k, top_p, top_p_candidates, num_classes, batch_shape, ct)
    loss = LogProbRows(
        num_classes=num_classes,
        entropy=return_entropy,
        vocab=Vocab.of(axis_name, padding),
        sampler=sampler,
    )
    outputs = _front.fused(
        loss,
        (head,),
        valid,
        rows,
        None,
        consts,
        (weight_layout,),
        n_outputs=2 if return_entropy else 1,
        scalar=False,
        token_block=token_block,
        vocab_block=vocab_block,
        memory_budget=memory_budget,
        forward_mode=derivative == "jvp",
        invariant=batch_invariant,
    )
    assert not isinstance(outputs, _front.Total)
    return _outputs(outputs, batch_shape, return_entropy)
