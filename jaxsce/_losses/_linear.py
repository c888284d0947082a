"""``linear_cross_entropy``: ``cross_entropy(hidden @ weight + bias, labels)`` without the logits.

The logits of a language model's output layer, ``[tokens, vocab]``, are the
largest buffer of a training step. Here cross-entropy is an instance of the
streaming engine (``_stream``): :class:`CrossEntropyRows` says what is summed
per row while vocabulary blocks of the logits stream by (the label's logit,
the smoothing sum, the label's class weight; the engine keeps the online
log-sum-exp and the argmax) and the per-entry backward
``ds = (Q p - q) g_ce + p g_lse`` (``_targets``).

* forward: one matmul pass; the backward recomputes the logits blocks
  (vocabulary blocks outside, so that the float32 accumulator is one
  ``[d, vocab_block]`` block of ``d_W``): three matmul passes.
* Why recompute (4 matmuls) rather than form the gradient during the forward
  pass (3 matmuls, as Liger-Kernel does for a scalar loss)? The forward pass
  cannot know the cotangents, so it would have to keep ``d_W`` as a
  residual; under ``jax.grad`` that is a second ``[d, V]`` buffer alive
  between the passes (1.2 GB in bf16 at the headline shape), which breaks
  the memory budget this path exists for. ``reduction="none"`` has per-token
  cotangents and needs the recomputation anyway. When the float32 ``d_W``
  does fit the memory budget, scalar losses take the engine's single-pass
  path (``_stream.total``).
* forward mode (``derivative="jvp"``): the engine's ``custom_jvp`` carries
  the tangents of the per-row sums through the same pass (3 matmuls per
  block), never building the logits either.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Literal, NamedTuple, cast, overload

import jax
import jax.numpy as jnp

from .._api import _auto, _front, _options
from .._api._inputs import check_class_ids, check_head
from .._base import _labels, _reduce, _spmd, _transform, _typing
from .._engine import _stream, _targets
from .._engine._logit_ce import in_range, total_weight
from .._engine._rowloss import Vocab
from .._engine._stream import DEFAULT_MEMORY_BUDGET, Head
from .._engine._targets import Options

if TYPE_CHECKING:
    from .._base._typing import Unpack


class CERows(NamedTuple):
    """Per-token data of the cross-entropy: class ids and optional sample weights."""

    labels: jax.Array
    sample_weight: jax.Array | None = None


class CEConsts(NamedTuple):
    opts: Options
    z_loss: jax.Array | None = None


class CESums(NamedTuple):
    """Per-row sums of the cross-entropy (each block adds the entries it owns)."""

    label: jax.Array  # s_y, the label's transformed logit
    smooth: jax.Array  # sum_c w_c (s_c - m), relative to the running max m
    label_weight: jax.Array  # w_y, the label's class weight
    seen: jax.Array  # sum_c w_c over the columns seen so far


class CETangents(NamedTuple):
    """Forward-mode tangents of the sums: ``sum_c exp(s_c - m) ds_c`` (relative to the running max), ``ds_y``,
    ``sum_c w_c ds_c``."""

    se: jax.Array
    label: jax.Array
    smooth: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrossEntropyRows(_stream.RowLoss):
    """Cross-entropy against class ids as per-row sums over vocabulary blocks.

    Sums: the label's soft-capped logit ``s_y``, the smoothing sum
    ``sum_c w_c (s_c - m)`` relative to the running max ``m`` with the class
    weight it has seen, ``W = sum_c w_c`` (when ``m`` moves by ``delta`` the
    sum moves by ``delta W``), and the label's class weight ``w_y`` (each
    block adds the entries it owns); in forward mode also the tangents
    ``sum_c p_c ds_c`` (kept relative to the running max), ``ds_y`` and
    ``sum_c w_c ds_c``. Outputs ``(ce, lse, hit, count)`` as in ``_logit_ce``;
    residual ``Q``. The loss is formed from row-max-relative terms,
    ``Q log se - (1 - eps) w_y (s_y - m) - (eps / C) sum_c w_c (s_c - m)``
    (the ``m`` terms cancel exactly since ``Q = (1 - eps) w_y + (eps / C) W``),
    so large logits do not round it.
    """

    differentiable = (0, 1)
    streams_tangents = True

    def transform(self, z, head, c: CEConsts):
        return _transform.apply(z, c.opts.transform)

    def transform_grad(self, s, ds, head, c: CEConsts):
        return _transform.chain(s, ds, c.opts.transform)

    def init(self, tb, ct, c: CEConsts, forward_mode: bool):
        zeros = jnp.zeros((tb,), ct)
        return _stream.Acc(CESums(zeros, zeros, zeros, zeros), CETangents(zeros, zeros, zeros) if forward_mode else ())

    def accumulate(self, acc, blk: _stream.Block, c: CEConsts):
        (s_y, smooth, w_y, seen), tan = acc.sums, acc.tangents
        s, y, cw = blk.s[0], blk.rows.labels, blk.cols
        in_block = _targets.in_block(y, blk)
        s_y = s_y + jnp.where(in_block, _targets.label_entry(s, y, blk.col0), 0)
        if c.opts.label_smoothing is not None:
            rel = s - blk.m[0][:, None]
            ws = rel if cw is None else rel * cw[None, :]
            w_blk = jnp.where(blk.fresh, 1 if cw is None else cw[None, :], 0)
            smooth = smooth + blk.shift[0] * seen + jnp.sum(jnp.where(blk.fresh, ws, 0), axis=-1)
            seen = seen + jnp.sum(w_blk, axis=-1).astype(seen.dtype)
        if cw is not None:
            w_blk = cast(jax.Array, _targets.target_weight(y, cw, blk.col0, c.opts))
            w_y = w_y + jnp.where(in_block, w_blk, 0)
        if blk.ds is not None:
            d_se, d_sy, d_smooth = tan
            d_se = d_se * blk.rescale[0] + jnp.sum(blk.e[0] * blk.ds, axis=-1)
            d_sy = d_sy + jnp.where(in_block, _targets.label_entry(blk.ds, y, blk.col0), 0)
            if c.opts.label_smoothing is not None:
                d_smooth = d_smooth + jnp.sum(blk.ds if cw is None else blk.ds * cw[None, :], axis=-1)
            tan = CETangents(d_se, d_sy, d_smooth)
        return _stream.Acc(CESums(s_y, smooth, w_y, seen), tan)

    def to_global(self, acc, sh: _stream.Shards, c: CEConsts):
        sums, tan = acc.sums, acc.tangents
        if c.opts.label_smoothing is not None:
            sums = sums._replace(smooth=sums.smooth + (sh.m_local[0] - sh.m_global[0]) * sums.seen)
        if tan:
            tan = tan._replace(se=tan.se * sh.scale[0])
        return _stream.Acc(sums, tan)

    def finish(self, stats: _stream.Stats, acc, second, rows: CERows, cols, c: CEConsts):
        (s_y, smooth, w_y, _), tan = acc.sums, acc.tangents
        opts, y = c.opts, rows.labels
        wy = None if cols is None else w_y
        mass = _targets.class_id_mass(wy, total_weight(cols, opts), opts)
        lse = stats.lse[0]
        bad = ~in_range(y, opts) | (stats.m[0] == jnp.inf)
        rel = _targets.class_id_loss(stats.log_se[0], s_y - stats.shift[0], smooth, wy, mass, opts)
        ce = jnp.where(bad, jnp.nan, rel)
        hit = jnp.zeros(y.shape, bool) if stats.argmax is None else stats.argmax == y
        count = jnp.ones_like(ce) if wy is None else wy
        pred = jnp.full_like(ce, -1) if stats.argmax is None else stats.argmax.astype(ce.dtype)
        outputs = (ce, lse, jnp.where(hit, 1, 0).astype(ce.dtype), count, pred)
        d_out = None
        if tan:
            d_se, d_sy, d_smooth = tan
            d_lse = d_se / stats.se[0]
            d_ce = jnp.where(bad, jnp.nan, _targets.class_id_loss(d_lse, d_sy, d_smooth, wy, mass, opts))
            d_out = (d_ce, d_lse, jnp.zeros_like(ce), jnp.zeros_like(ce), jnp.zeros_like(ce))
        return outputs, (mass,), d_out

    def grad(self, blk: _stream.GradBlock, res, cts, c: CEConsts):
        (mass,), (g_ce, g_lse) = res, cts[:2]
        opts, y, cw = c.opts, blk.rows.labels, blk.cols
        g_lse = jnp.zeros_like(g_ce) if g_lse is None else g_lse
        # A counted row with a label outside [0, C) gets a NaN gradient: set
        # through its [Tb] coefficients (p * NaN is NaN even where p is 0).
        bad = ~in_range(y, opts)
        g_ce, g_lse = jnp.where(bad, jnp.nan, g_ce), jnp.where(bad, jnp.nan, g_lse)
        w_y = _targets.target_weight(y, cw, blk.col0, opts)
        return _targets.class_id_grad(blk.p[0], g_ce, g_lse, y, blk.col0, cw, w_y, mass, opts)

    def scalar(self, outputs, rows: CERows, c: CEConsts):
        ce, lse, _, count, _ = outputs
        sw = rows.sample_weight
        value = ce if c.z_loss is None else ce + c.z_loss * jnp.square(lse)
        g_ce = jnp.ones_like(ce) if sw is None else sw.astype(ce.dtype)
        g_lse = None if c.z_loss is None else 2 * c.z_loss * lse * g_ce
        if sw is not None:
            value, count = value * g_ce, count * g_ce
        return _stream.Scalar(value, count, (g_ce, g_lse, None, None, None))


@overload
def linear_cross_entropy(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    *,
    return_aux: Literal[False] = False,
    **options: Unpack[_typing.LinearCrossEntropyOptions],
) -> jax.Array: ...
@overload
def linear_cross_entropy(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    *,
    return_aux: Literal[True],
    **options: Unpack[_typing.LinearCrossEntropyOptions],
) -> tuple[jax.Array, _reduce.LossAux]: ...
@overload
def linear_cross_entropy(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    *,
    return_aux: bool,
    **options: Unpack[_typing.LinearCrossEntropyOptions],
) -> jax.Array | tuple[jax.Array, _reduce.LossAux]: ...
@_options.keyword_checked
@_auto.spmd(
    hidden=_auto.HIDDEN,
    linear_weight=_auto.weight("weight_layout"),
    labels=_auto.ROWS,
    linear_bias=_auto.VOCAB,
    weight=_auto.VOCAB,
    sample_weight=_auto.ROWS,
    where=_auto.ROWS,
)
def linear_cross_entropy(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    *,
    linear_bias: jax.Array | None = None,
    weight_layout: str = "dv",
    where: jax.Array | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    weight: jax.Array | None = None,
    sample_weight: jax.Array | None = None,
    label_smoothing: float | jax.Array = 0.0,
    z_loss: float | jax.Array = 0.0,
    logit_softcap: float | jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    return_aux: bool = False,
    token_block: int | None = None,
    vocab_block: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
    check_labels: bool = False,
    num_classes: int | None = None,
    derivative: str = "vjp",
) -> jax.Array | tuple[jax.Array, _reduce.LossAux]:
    r"""Fused ``cross_entropy(hidden @ linear_weight + linear_bias, labels)`` that never builds the logits.

    Computes exactly :func:`jaxsce.cross_entropy` of the logits
    :math:`z = h W + b` for class-id labels, with the same options and
    semantics, while only ``[token_block, vocab_block]`` blocks of :math:`z`
    ever exist (forward and backward). The names follow
    ``torch.nn.functional.linear_cross_entropy`` (PyTorch 2.13): ``weight``
    is the class weights, ``linear_weight``/``linear_bias`` the projection.
    Gradients for ``hidden``, ``linear_weight`` and ``linear_bias`` come from
    a ``jax.custom_vjp``:
    :math:`\partial z = (Q p - q)\,g + p\,g_{\mathrm{lse}}`,
    :math:`\partial h = \partial z\,W^\top`, :math:`\partial W = h^\top \partial z`,
    :math:`\partial b = \sum_n \partial z_n`.

    Args:
      hidden: ``[..., d]`` floating (float32, bfloat16, float16).
      linear_weight: ``[d, V]`` (``weight_layout="dv"``, a flax ``Dense``
        kernel) or ``[V, d]`` (``weight_layout="vd"``: a tied embedding
        table, or torch's ``Linear.weight``, used as is: blocks are sliced
        from it, nothing is transposed or copied).
      labels: integer class ids of ``hidden.shape[:-1]``.
      linear_bias: optional ``[V]``.
      weight_layout: ``"dv"`` or ``"vd"``, see ``linear_weight``.
      where: boolean mask of ``hidden.shape[:-1]``, as in :func:`jaxsce.cross_entropy`.
      reduction: as in :func:`jaxsce.cross_entropy`.
      ignore_index: as in :func:`jaxsce.cross_entropy`.
      weight: per-class weights ``[V]`` (constants), as in :func:`jaxsce.cross_entropy`.
      sample_weight: per-token weights of ``hidden.shape[:-1]`` (constants),
        as in :func:`jaxsce.cross_entropy`.
      label_smoothing: as in :func:`jaxsce.cross_entropy` (may be traced).
      z_loss: as in :func:`jaxsce.cross_entropy` (may be traced).
      logit_softcap: as in :func:`jaxsce.cross_entropy` (may be traced).
      temperature: as in :func:`jaxsce.cross_entropy` (may be traced).
      return_aux: as in :func:`jaxsce.cross_entropy`.
      axis_name: mesh axis splitting the vocabulary inside ``jax.shard_map``:
        the vocabulary axis of ``linear_weight`` (and of ``linear_bias`` and
        ``weight``) is then the local shard.
      batch_axis_name: as in :func:`jaxsce.cross_entropy`.
      check_labels: as in :func:`jaxsce.cross_entropy`.
      num_classes: the real vocabulary size when ``linear_weight`` is padded,
        as in :func:`jaxsce.cross_entropy`.
      token_block, vocab_block: block sizes (static); by default chosen from
        the shapes so that the block temporaries stay within ``memory_budget``.
      memory_budget: bytes of compiled temporaries to aim for (default
        256 MiB), counting the float32 ``d_hidden`` accumulator (``4 T d``
        bytes) and the blocks; with 16-bit inputs the weight is never copied
        to float32. Scalar losses (``"mean"``/``"sum"``, no ``return_aux``, no
        ``axis_name``, no ``vocab_block``) whose float32 ``d_W`` fits take a
        single pass that forms the gradient with the loss (3 matmuls);
        otherwise vocabulary blocks are streamed and recomputed in the
        backward (4 matmuls).
      derivative: ``"vjp"`` (default): the ``jax.custom_vjp`` above, for
        ``jax.grad``; it cannot be used with ``jax.jvp``/``jax.jacfwd``.
        ``"jvp"``: a ``jax.custom_jvp`` whose rule streams the tangent with
        the loss, :math:`\dot\ell = \sum_c (Q p_c - q_c)\,\dot z_c` with
        :math:`\dot z = \dot h W + h \dot W + \dot b` formed per block (3
        matmuls per block, one fewer per unperturbed input), so forward
        mode (``jax.jvp``, ``jax.jacfwd``) never builds the logits either.
        Reverse mode also works in this mode (JAX transposes the rule), and
        with it ``jax.hessian`` and Hessian-vector products
        ``jax.jvp(jax.grad(f))``, but it keeps per-block intermediates of at
        least the logits' total size (figures on the performance page): use
        ``"vjp"`` for training. Reverse mode in this mode
        needs jax >= 0.10: on older releases JAX's own transpose of the
        block loops fails, and ``jax.grad``/``jax.vjp`` of this function
        raise ``NotImplementedError`` saying so.

    Returns:
      As :func:`jaxsce.cross_entropy`: float32 loss (scalar or per token),
      and ``LossAux`` with ``return_aux``. Gradients are in the inputs' dtypes;
      matmuls accumulate in float32.

    Raises:
      TypeError: non-floating ``hidden``/``linear_weight``/``linear_bias``,
        non-integer labels, a traced or unhashable static option.
      ValueError: shapes that do not fit (named in the message), no classes,
        unknown ``weight_layout`` or ``derivative``, options out of range.

    Note:
      ``reduction="none"`` (per-token cotangents) and ``return_aux`` always
      take the streaming path, whose backward recomputes the logits blocks:
      4 matmul passes instead of the single-pass path's 3.

      A masked or ignored token contributes exactly 0 to the loss and to
      every gradient, even when its hidden state is NaN. Zero tokens give
      what :func:`jaxsce.cross_entropy` gives for zero examples. With a
      symbolic token count (``jax.export``), tokens are padded to a multiple
      of the token block (1024 unless ``token_block``) inside the program.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxsce
      >>> h = jnp.ones((4, 8), jnp.float32) / 8
      >>> w = jnp.zeros((8, 1000), jnp.float32)
      >>> y = jnp.array([0, 1, 2, 3], jnp.int32)
      >>> jaxsce.linear_cross_entropy(h, w, y)  # uniform: log(1000)
      Array(6.907755, dtype=float32)
    """
    _labels.check_host_labels(labels)
    static = dict(
        **_options.fused(
            weight_layout=weight_layout, token_block=token_block, vocab_block=vocab_block, memory_budget=memory_budget
        ),
        **_options.shared(
            reduction=reduction,
            ignore_index=ignore_index,
            return_aux=return_aux,
            derivative=derivative,
            axis_name=axis_name,
            batch_axis_name=batch_axis_name,
            check_labels=check_labels,
            num_classes=num_classes,
        ),
    )
    _front.check_forward_mode(derivative, "linear_cross_entropy", hidden, linear_weight, linear_bias)
    fl = _options.floats(
        label_smoothing=label_smoothing, z_loss=z_loss, logit_softcap=logit_softcap, temperature=temperature
    )
    args = (hidden, linear_weight, labels, linear_bias, where, weight, sample_weight, fl)
    return _options.run(_linear_cross_entropy, args, static)


@_front.implementation
def _linear_cross_entropy(
    hidden,
    weight,
    labels,
    bias,
    where,
    class_weight,
    sample_weight,
    fl: _options.Floats,
    *,
    weight_layout,
    reduction,
    ignore_index,
    return_aux,
    token_block,
    vocab_block,
    memory_budget,
    axis_name,
    batch_axis_name,
    check_labels,
    derivative,
    num_classes,
):
    layout = weight_layout
    head, v_local = check_head(hidden, weight, bias, layout)
    batch_shape = hidden.shape[:-1]
    labels = check_class_ids(labels, batch_shape, hidden.shape)
    _spmd.check_split_axes("linear_weight", weight, labels, "labels", axis_name, batch_axis_name)

    n = math.prod(batch_shape)
    num_classes, padding = _options.class_count(num_classes, v_local, axis_name, "linear_weight's vocabulary")
    h2, weight, bias = head
    valid = _front.counted(where, batch_shape, "hidden.shape[:-1]")
    y, valid = _labels.label_validity(labels.reshape(n), num_classes, valid, ignore_index, check_labels)
    ct = _stream.acc_dtype(h2, weight)
    # Class weights in the accumulation dtype: sums of bf16 weights (the
    # smoothing mass) would round in bf16.
    cw = None if class_weight is None else _options.check_class_weight(class_weight, v_local).astype(ct)
    cw = _options.real_class_weight(cw, padding, axis_name)
    sw = _options.sample_weights(sample_weight, batch_shape, "hidden.shape[:-1]", ct)
    fl = _options.in_dtype(fl, ct)
    opts = _options.make_options(
        fl,
        num_classes=num_classes,
        soft=False,
        axis_name=axis_name,
        return_aux=return_aux,
        is_unchecked=_spmd.unchecked(axis_name),
        padded=padding is not None,
    )
    done = functools.partial(
        _reduce.finish_cross_entropy,
        z_loss=fl.z_loss,
        reduction=reduction,
        sample_weight=sw,
        return_aux=return_aux,
        batch_axis_name=batch_axis_name,
        batch_shape=batch_shape,
    )
    loss = CrossEntropyRows(vocab=Vocab(axis_name, opts.vocab_unchecked, padding), argmax=return_aux)
    # "none" and the aux outputs need per-token outputs: never the single pass.
    out = _front.fused(
        loss,
        (Head(h2, weight, bias),),
        valid,
        CERows(y, sw),
        cw,
        CEConsts(opts, fl.z_loss),
        (layout,),
        n_outputs=5,
        scalar=reduction != "none" and not return_aux,
        token_block=token_block,
        vocab_block=vocab_block,
        memory_budget=memory_budget,
        forward_mode=derivative == "jvp",
    )
    if isinstance(out, _front.Total):
        return _front.reduce_total(out, reduction, batch_axis_name, valid)
    return done(out, valid)
