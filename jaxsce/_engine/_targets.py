"""The loss options, applied in one place for every code path.

Every jaxsce loss is, per example, a cross-entropy against a (weighted,
smoothed) target vector ``q`` over the classes:

.. math::
    \\ell = \\sum_c q_c\\,(\\mathrm{lse}(s) - s_c)
          = Q\\,\\mathrm{lse}(s) - \\sum_c q_c s_c,
    \\qquad Q = \\sum_c q_c,
    \\qquad \\frac{\\partial \\ell}{\\partial s_c} = Q\\,p_c - q_c,

where ``s = softcap(z) / T`` are the transformed logits (``_transform``) and ``p = softmax(s)``. PyTorch's
options only change ``q``:

* class id ``y``: ``q = (1 - eps) w_y e_y + (eps / C) w``;
* probability target ``t``: ``q = w * ((1 - eps) t + eps / C)``;

with ``w`` the class weights (all ones if not given), ``eps`` the label
smoothing and ``C`` the number of classes. Without weights and smoothing a
class id gives ``Q = 1`` and the tutorial's ``p - y``.

The functions here work on a block of columns ``[N, B]`` whose first column
has global class index ``col0``: the whole row (``cross_entropy``), one
vocabulary block (``linear_cross_entropy``) or one shard's slice (vocabulary
parallelism). Per-row partial sums are added over blocks or with ``psum``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from .._base._transform import Transform


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["label_smoothing", "transform"],
    meta_fields=["num_classes", "soft", "vocab_axis", "argmax", "vocab_unchecked", "padded"],
)
@dataclasses.dataclass(frozen=True)
class Options:
    """Loss options as the kernels see them.

    The structure (meta fields) selects the compiled program; the float
    values are array leaves, so a schedule of them under ``jit`` compiles
    once. A float option that is off is None (its code is not traced).
    """

    num_classes: int  # C over all shards
    soft: bool = False  # probability targets instead of class ids
    vocab_axis: str | tuple[str, ...] | None = None  # mesh axis splitting the classes
    argmax: bool = False  # also find each row's argmax (for the aux accuracy)
    vocab_unchecked: bool = False  # inside shard_map(check_vma=False) over vocab_axis
    padded: bool = False  # columns at or beyond num_classes (global index) are padding
    label_smoothing: jax.Array | None = None  # eps, in the compute dtype
    transform: Transform = Transform()  # soft cap and temperature, in the compute dtype

    @property
    def eps(self):
        """The label smoothing, 0 when off."""
        return 0.0 if self.label_smoothing is None else self.label_smoothing


def real_columns(opts: Options, col0, width: int):
    """``[1, width]`` boolean: column ``col0 + j`` is a real class (None when no column is padding)."""
    if not opts.padded:
        return None
    return lax.broadcasted_iota(jnp.int32, (1, width), 1) + col0 < opts.num_classes


def keep_real(x, opts: Options, col0, fill: float = 0.0):
    """``x [N, width]`` with its padding columns set to ``fill`` (``x`` itself when there are none)."""
    real = real_columns(opts, col0, x.shape[-1])
    return x if real is None else jnp.where(real, x, fill)


def max_and_argmax(s: jax.Array, col0):
    """Row max and (global) index of its first occurrence, in one reduction.

    A variadic reduce reads ``s`` once for both, so the accuracy costs no
    second pass; comparing the label's logit with the max instead would
    depend on two fusions rounding ``tanh`` (soft cap) identically.
    """

    def pick(a, b):
        (va, ia), (vb, ib) = a, b
        take_b = (vb > va) | ((vb == va) & (ib < ia)) | jnp.isnan(vb)
        return jnp.where(take_b, vb, va), jnp.where(take_b, ib, ia)

    idx = lax.broadcasted_iota(jnp.int32, s.shape, s.ndim - 1)
    init = (jnp.array(-jnp.inf, s.dtype), jnp.array(jnp.iinfo(jnp.int32).max, jnp.int32))
    m, i = lax.reduce((s, idx), init, lambda a, b: pick(a, b), (s.ndim - 1,))
    return m, i + col0


def split_lse(shift, log_sum):
    """The log-sum-exp ``shift + log_sum`` as ``(hi, lo)``: ``hi`` its rounding, ``lo`` the rest.

    ``log p_c = (s_c - hi) - lo``. Near the row max ``s_c - hi`` is exact
    (the two are within a factor of 2), and ``lo = (shift - hi) + log_sum``
    is the small rounding error of ``hi``, so ``log p`` is as accurate at
    logits of 1e4 as at logits of 1 (``s - (shift + log_sum)`` would carry
    the ulp of the logits, 1e-3 at 1e4), whatever the shift was (the row max,
    or a label's logit far below it).
    """
    hi = shift + log_sum
    return hi, (shift - hi) + log_sum


def block_hits(labels: jax.Array, col0, width: int) -> jax.Array:
    """``[N, width]`` boolean: column ``col0 + j`` is example ``n``'s label."""
    cols = lax.broadcasted_iota(labels.dtype, (labels.shape[0], width), 1) + col0
    return cols == labels[:, None]


def target_weight(labels: jax.Array, class_weight: jax.Array | None, col0, opts: Options):
    """``w_y`` for class ids whose weight lives in this block (else 0); 1 unweighted.

    Uses a gather of ``N`` elements, so a shard contributes only the weights of
    the labels it owns; the caller adds the shards' values.
    """
    if class_weight is None:
        return None
    local = labels - col0
    inside = (local >= 0) & (local < class_weight.shape[0])
    safe = jnp.clip(local, 0, class_weight.shape[0] - 1)
    return jnp.where(inside, class_weight[safe], 0).astype(class_weight.dtype)


def label_entry(x, labels, col0):
    """``x[n, labels[n] - col0]`` where the label lies in this block, else 0.

    A gather of ``N`` elements: reading the label's logit this way costs
    nothing next to a masked reduction over all ``[N, B]`` entries.
    """
    local = labels - col0
    inside = (local >= 0) & (local < x.shape[-1])
    safe = jnp.clip(local, 0, x.shape[-1] - 1)
    picked = jnp.take_along_axis(x, safe[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return jnp.where(inside, picked, 0)


def class_id_partials(s, labels, col0, class_weight_block, opts: Options, shift=None):
    """Per-row sums over a block of class-id columns, in shifted coordinates.

    ``s`` are the logits in the compute dtype and ``shift`` the per-row shift
    the log-sum-exp is taken with (None: no shift). Returns ``(t_y, smooth)``
    for ``t = s - shift``: the label's entry (0 if its column is not in this
    block) and ``sum_c w_c t_c`` (0 without smoothing). The label's entry is
    gathered from ``s`` itself so that ``t`` is not materialized just for it
    (XLA:CPU then fuses the shift into the sum of exponentials).
    """
    s_y = label_entry(s, labels, col0)
    if shift is None:
        t_y = s_y
    else:
        local = labels - col0
        t_y = jnp.where((local >= 0) & (local < s.shape[-1]), s_y - shift, 0)
    if opts.label_smoothing is not None:
        t = s if shift is None else s - shift[:, None]
        wt = t if class_weight_block is None else t * class_weight_block[None, :]
        smooth = jnp.sum(keep_real(wt, opts, col0), axis=-1)
    else:
        smooth = jnp.zeros_like(t_y)
    return t_y, smooth


def class_id_mass(w_y, total_weight, opts: Options):
    """``Q = (1 - eps) w_y + (eps / C) sum_c w_c`` (exactly 1 unweighted)."""
    eps = opts.eps
    if w_y is None:
        return None  # Q == 1; kept symbolic so no array is saved or read.
    return (1 - eps) * w_y + (eps / opts.num_classes) * total_weight


def class_id_loss(lse_shift, t_y, smooth, w_y, mass, opts: Options):
    """``Q lse - sum_c q_c t_c`` from the per-row sums (same shift for all)."""
    eps = opts.eps
    wy = 1.0 if w_y is None else w_y
    q_dot_t = (1 - eps) * wy * t_y
    if opts.label_smoothing is not None:
        q_dot_t = q_dot_t + (eps / opts.num_classes) * smooth
    return (1.0 if mass is None else mass) * lse_shift - q_dot_t


def class_id_grad(p, g_loss, g_lse, labels, col0, class_weight_block, w_y, mass, opts):
    """``g_loss * (Q p - q) + g_lse * p`` for a block of class-id columns.

    ``g_loss``/``g_lse`` are per-row cotangents ``[N]``; ``p`` is ``[N, B]``.
    """
    eps = opts.eps
    coef = g_loss if mass is None else g_loss * mass
    out = p * (coef + g_lse)[:, None]
    hit = block_hits(labels, col0, p.shape[-1])
    on_label = (1 - eps) * g_loss if w_y is None else (1 - eps) * g_loss * w_y
    out = out - jnp.where(hit, on_label[:, None], 0)
    if opts.label_smoothing is not None:
        off = (eps / opts.num_classes) * g_loss[:, None]
        if class_weight_block is not None:
            off = off * class_weight_block[None, :]
        out = out - off
    return out


def soft_target(targets, class_weight, opts: Options):
    """``q = w * ((1 - eps) t + eps / C)`` for probability targets ``[N, B]``."""
    eps = opts.eps
    q = targets if opts.label_smoothing is None else (1 - eps) * targets + eps / opts.num_classes
    if class_weight is not None:
        q = q * class_weight[None, :]
    return q


def soft_partials(t, q):
    """``(Q, sum_c q_c t_c)`` with the convention ``0 * (-inf) = 0``."""
    return jnp.sum(q, axis=-1), jnp.sum(jnp.where(q == 0, 0, q * t), axis=-1)


def soft_target_cotangent(g_loss, lse, s, targets, class_weight, opts: Options):
    """``d loss / d t_c = (1 - eps) w_c (lse - s_c)``.

    Zero where the target and the probability are both exactly zero
    (``t_c = 0`` and ``s_c = -inf``): such a class lies outside both supports,
    so ``0 * log 0 = 0`` holds in a neighbourhood and its gradient is 0. This
    keeps distillation through a masked teacher free of ``0 * inf = NaN``.
    """
    g = (1 - opts.eps) * (lse[:, None] - s)
    if class_weight is not None:
        g = g * class_weight[None, :]
    g = jnp.where((targets == 0) & (s == -jnp.inf), 0, g)
    return g * g_loss[:, None]


def in_block(y, blk):
    """The class id lies in the block's columns not counted by an earlier block."""
    return (y >= blk.fresh_col0) & (y < blk.col0 + blk.s[0].shape[1])
