"""Per-example cross-entropy over rows of logits, with analytic derivative rules.

The kernel maps logits ``z [N, V]`` (``V`` may be one shard of the classes) and
class ids ``[N]`` or probability targets ``[N, V]`` to five per-example
outputs:

* ``ce``: the (weighted, smoothed) cross-entropy, 0 where not counted;
* ``lse``: the log-sum-exp of the transformed logits ``softcap(z) / T``, 0 where not counted;
* ``correct``: 1.0 where the label is the row's argmax (top-1 hit), else 0;
* ``w_y``: what the example adds to the ``"mean"`` normalizer (its class
  weight, or 1; 0 where not counted);
* ``pred``: the row's first argmax (a class id, as a float), -1 where not
  counted or without ``return_aux``.

Reductions, z-loss and auxiliary outputs are computed from these ``[N]``
arrays by ordinary JAX code; only this kernel touches ``[N, V]`` data, and its
derivative is analytic (``_targets``): ``dz = (Q p - q) g_ce + p g_lse``,
times the transform's chain rule (``_transform.chain``). Two rules are attached to the same forward:

* ``custom_vjp`` (``derivative="vjp"``): saves one logits-sized array, the
  ``lse`` per row and, when weights make ``Q`` vary, ``Q`` per row. It is the
  least memory; it cannot be used in forward mode. Which logits-sized array
  depends on the platform (:func:`keeps_exp`): the logits themselves, or on
  CPU ``exp(s - max)``, so that the backward needs no second ``exp``.
* ``custom_jvp`` (``derivative="jvp"``): the JVP ``sum_c (Q p_c - q_c) dz_c``
  is linear in the tangents, so JAX transposes it for reverse mode and
  differentiates it again for ``jax.hessian``. Reverse mode saves ``p``-sized
  intermediates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .._base import _spmd, _transform
from .._base._validate import compute_dtype
from . import _targets
from ._targets import Options


def psum_rows(*rows: jax.Array, opts: Options):
    """Sums per-row partials over the vocabulary shards in one collective."""
    return _spmd.psum_rows(*rows, axis_name=opts.vocab_axis)


def _pmax(x, opts: Options):
    return x if opts.vocab_axis is None else lax.pmax(x, opts.vocab_axis)


def shard_col0(width: int, opts: Options):
    """Global class index of this shard's first column (0 when unsharded)."""
    return _spmd.shard_col0(width, opts.vocab_axis)


def total_weight(class_weight, opts: Options):
    if class_weight is None:
        return None
    return psum_rows(jnp.sum(class_weight), opts=opts)


def _forward(z, target, valid, class_weight, opts: Options, keep_exp: bool = False):
    """Returns ``(outputs, internals)``; internals feed the derivative rules.

    ``internals`` is ``(s, (m, lse_shift), mass, kept)``: the rows' shift
    ``m`` and ``log sum_c exp(s_c - m)``, from which the rules form ``p``
    without the rounding of ``m + lse_shift`` (``_targets.split_lse``). With ``keep_exp`` the rows are
    shifted by their max and ``kept = (exp(s - m), m)``: the exponentials the
    sum was taken of, which the backward turns into ``p`` with one multiply.
    """
    ct = compute_dtype(z.dtype)
    col0 = shard_col0(z.shape[-1], opts)
    # Padding columns (num_classes) are -inf: out of the log-sum-exp, the argmax and every probability.
    s = _targets.keep_real(_transform.apply(z.astype(ct), opts.transform), opts, col0, -jnp.inf)
    cw = None if class_weight is None else class_weight.astype(ct)
    kept = partials = None
    if opts.argmax or opts.soft or opts.vocab_axis is not None or keep_exp:
        m_raw, argmax = _row_max(s, col0, opts)
        if keep_exp:
            m = lax.stop_gradient(jnp.where(jnp.isfinite(m_raw), m_raw, 0))
            # Every other read of s happens first, so that writing exp(s - m)
            # is the logits' last use and XLA may write it in their place.
            partials = _targets.class_id_partials(s, target, col0, cw, opts, shift=m)
            e = jnp.exp(s - _after(m, partials[0])[:, None])
            sumexp, pos_inf = jnp.sum(e, axis=-1), m_raw == jnp.inf
            kept = (e, m)
        else:
            m, sumexp, pos_inf = max_shift(s, m_raw)
    else:
        argmax = None
        m, sumexp, pos_inf = _label_shift(s, target, valid)

    if opts.soft:
        q = _targets.keep_real(_targets.soft_target(target.astype(ct), cw, opts), opts, col0)
        mass, q_dot_t = _targets.soft_partials(s - m[:, None], q)
        sumexp, mass, q_dot_t = psum_rows(sumexp, mass, q_dot_t, opts=opts)
        lse_shift = jnp.log(sumexp)
        ce = mass * lse_shift - q_dot_t
        correct = _soft_hit(target, argmax, col0, opts)
        w_y = jnp.ones_like(ce)
    else:
        if partials is None:
            partials = _targets.class_id_partials(s, target, col0, cw, opts, shift=m)
        t_y, smooth = partials
        w_y = _targets.target_weight(target, cw, col0, opts)
        if w_y is None:
            sumexp, t_y, smooth = psum_rows(sumexp, t_y, smooth, opts=opts)
        else:
            sumexp, t_y, smooth, w_y = psum_rows(sumexp, t_y, smooth, w_y, opts=opts)
        mass = _targets.class_id_mass(w_y, total_weight(cw, opts), opts)
        lse_shift = jnp.log(sumexp)
        ce = _targets.class_id_loss(lse_shift, t_y, smooth, w_y, mass, opts)
        correct = jnp.zeros(ce.shape, bool) if argmax is None else argmax == target
        # A label outside [0, C) must never give a plausible number.
        ce = jnp.where(in_range(target, opts), ce, jnp.nan)
        w_y = jnp.ones_like(ce) if w_y is None else w_y
    ce = jnp.where(pos_inf, jnp.nan, ce)  # +inf logit: inf - inf
    lse = m + lse_shift
    outputs = (
        jnp.where(valid, ce, 0),
        jnp.where(valid, lse, 0),
        # A 0/1 float rather than bool: its (zero) tangent then carries the
        # same sharding type as the other outputs inside shard_map.
        jnp.where(valid & correct, 1, 0).astype(ce.dtype),
        jnp.where(valid, w_y, 0),
        # The argmax's class id (exact in floating point below 2**24), -1 where not counted.
        jnp.where(valid, -1 if argmax is None else argmax, -1).astype(ce.dtype),
    )
    return outputs, (s, (m, lse_shift), mass, kept)


def _after(x, dep):
    """``x``, computed after ``dep`` (an exact ``+ 0``).

    Makes a cheap ``[N]`` result an input of the pass that consumes it, so
    XLA computes it once, before that pass, instead of recomputing it (and
    re-reading the logits) after.
    """
    zero = jnp.where(jnp.isnan(dep), 0, jnp.clip(dep, -1, 1)) * 0
    return x + zero.astype(x.dtype)


def _row_max(s, col0, opts: Options):
    """The row max over all shards and, with ``opts.argmax``, the first global
    index attaining it (else None)."""
    if not opts.argmax:
        return _pmax(jnp.max(s, axis=-1), opts), None
    m_local, i_local = _targets.max_and_argmax(s, col0)
    m_raw = _pmax(m_local, opts)
    candidate = jnp.where(m_local == m_raw, i_local, jnp.iinfo(jnp.int32).max)
    argmax = candidate if opts.vocab_axis is None else lax.pmin(candidate, opts.vocab_axis)
    return m_raw, argmax


def max_shift(s, m_raw):
    """Shift by the row max: ``(shift, sum_c exp(s_c - shift), row has +inf)``.

    The shift is 0 for an all -inf row so that -inf - (-inf) never appears.
    The loss does not depend on the shift: it is held constant.
    """
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m_raw), m_raw, 0))
    return m, row_sum_exp(s, m), m_raw == jnp.inf


def _label_shift(s, labels, valid):
    """As ``max_shift``, but shifted by the label's logit when that is safe.

    Any shift ``c`` gives the same log-sum-exp, ``c + log sum_c exp(s_c - c)``,
    as long as the sum neither overflows nor loses its largest terms. With
    ``c`` one of the row's own logits the sum is at least 1, so it can only
    overflow, when the row max exceeds ``c`` by more than about ``88 - ln V``
    (float32) -- then, or on any NaN / inf, the whole batch falls back to the
    max shift. Skipping the max saves one read of the logits, and the loss
    becomes ``log sum_c exp(s_c - s_y)``, free of the cancellation in
    ``lse - s_y``. (Out-of-range labels pick a clipped column; their loss is
    NaN anyway.)
    """
    c = lax.stop_gradient(_targets.label_entry(s, labels, 0))
    sumexp = row_sum_exp(s, c)
    safe = jnp.all(jnp.isfinite(sumexp) | ~valid)
    fast = lambda: _spmd.vary_like((c, sumexp, jnp.zeros(c.shape, bool)), s)  # noqa: E731
    slow = lambda: _spmd.vary_like(max_shift(s, jnp.max(s, axis=-1)), s)  # noqa: E731
    return lax.cond(safe, fast, slow)


def row_sum_exp(s, m):
    """``sum_c exp(s[n, c] - m[n])``.

    Long rows are summed as ``[N * V / k, k]`` blocks and then added: XLA's
    CPU reduction is several times slower on rows of 10^5 entries than on
    many rows of 10^3 (jax 0.10.2, 2 cores: 512 x 131072 took 213 ms as rows,
    37 ms as blocks of 1024). On GPU/TPU the reshape is free and the result
    identical up to summation order.
    """
    n, v = s.shape
    k = next((k for k in (2048, 1024, 512) if v > 4 * k and v % k == 0), None)
    if k is None:
        return jnp.sum(jnp.exp(s - m[:, None]), axis=-1)
    blocks = s.reshape(n * (v // k), k) - jnp.repeat(m, v // k)[:, None]
    return jnp.sum(jnp.exp(blocks), axis=-1).reshape(n, v // k).sum(axis=-1)


def _soft_hit(target, argmax, col0, opts: Options):
    """The logits' argmax class carries the target's largest probability."""
    if argmax is None:
        return jnp.zeros(target.shape[:1], bool)
    at_argmax = _targets.label_entry(target, argmax, col0)
    best = jnp.max(target, axis=-1)
    if opts.vocab_axis is not None:
        at_argmax = lax.psum(at_argmax, opts.vocab_axis)
        best = lax.pmax(best, opts.vocab_axis)
    return at_argmax >= best


def in_range(labels, opts: Options):
    """Class ids inside ``[0, C)``, ``C`` the class count over all shards."""
    return (labels >= 0) & (labels < opts.num_classes)


def _logit_grad(p, g_ce, g_lse, target, valid, class_weight, mass, opts: Options):
    """``d(g_ce * ce + g_lse * lse) / ds`` for counted rows (``[N, V]``), from ``p = softmax(s)``."""
    cw = None if class_weight is None else class_weight.astype(p.dtype)
    col0 = shard_col0(p.shape[-1], opts)
    if opts.soft:
        q = _targets.keep_real(_targets.soft_target(target.astype(p.dtype), cw, opts), opts, col0)
        return p * (g_ce * mass + g_lse)[:, None] - g_ce[:, None] * q
    w_y = _targets.target_weight(target, cw, col0, opts)
    # A counted row with a label outside [0, C) gets a NaN gradient: set
    # through its [N] coefficients (p * NaN is NaN even where p is 0) rather
    # than by a select over all [N, V] entries.
    bad = valid & ~in_range(target, opts)
    g_ce, g_lse = jnp.where(bad, jnp.nan, g_ce), jnp.where(bad, jnp.nan, g_lse)
    return _targets.class_id_grad(p, g_ce, g_lse, target, col0, cw, w_y, mass, opts)


# --- reverse mode: custom_vjp --------------------------------------------------

#: Widest row (classes per shard) whose exponentials the CPU branch keeps.
KEEP_EXP_MAX_CLASSES = 8192

#: Whether the CPU branch of the reverse rule keeps exp(s - m). Tests set it to False to run the
#: accelerator branch on CPU through the same ``lax.platform_dependent`` switch.
CPU_KEEPS_EXP = True


def keeps_exp(z, opts: Options) -> bool:
    """Whether, on CPU, the reverse rule keeps ``exp(s - m)`` rather than the logits.

    On CPU an ``exp`` costs more than a pass over memory (jax 0.10.2, 2 cores,
    4096 x 1024 float32: a jitted ``exp`` into a fresh buffer 2.5-3 ms, a row
    max 0.8-1.0 ms). Keeping the exponentials the forward summed costs one
    ``exp`` per logit instead of two; the backward forms ``p`` from them with a
    multiply and writes the gradient in their place, as it otherwise writes it
    in place of the logits, so a training step's temporaries do not grow.

    It applies where the gradient is a function of ``p`` alone and the kept
    array replaces the logits one for one: class ids without a soft cap (whose
    chain rule needs ``s``) or label smoothing (whose sum reads ``s`` again),
    logits already in the compute dtype (a float32 copy of bf16 logits would
    be twice their size), and rows of at most :data:`KEEP_EXP_MAX_CLASSES`
    classes: for longer rows XLA:CPU no longer fuses the exponentials'
    sum with their write, and a training step kept both the logits and the
    exponentials (2048 x 32768: 512 MiB of temporaries instead of 256).

    On GPU and TPU, bandwidth-bound, recomputing ``exp`` is free and the
    logits are kept: the rules choose with ``lax.platform_dependent``, which
    lowers only the branch of the platform being compiled for.
    """
    return (
        CPU_KEEPS_EXP
        and not opts.soft
        and _transform.is_identity(opts.transform)
        and opts.label_smoothing is None
        and compute_dtype(z.dtype) == z.dtype
        and z.shape[-1] <= KEEP_EXP_MAX_CLASSES
    )


@jax.custom_vjp
def ce_vjp(z, target, valid, class_weight, opts: Options):
    return _forward(z, target, valid, class_weight, opts)[0]


def _ce_fwd(z, target, valid, class_weight, opts):
    def keep_logits(z):
        outputs, (_, (m, lse_shift), mass, _) = _forward(z, target, valid, class_weight, opts)
        # Neither softmax(z) nor the transformed logits are kept: the backward
        # recomputes them in one fused elementwise pass.
        return outputs, z, m, lse_shift, mass

    def keep_exp(z):
        outputs, (_, (m, lse_shift), mass, kept) = _forward(z, target, valid, class_weight, opts, keep_exp=True)
        assert kept is not None
        return outputs, kept[0], m, lse_shift, mass

    if keeps_exp(z, opts):
        outputs, kept, m, lse_shift, mass = lax.platform_dependent(z, cpu=keep_exp, default=keep_logits)
    else:
        outputs, kept, m, lse_shift, mass = keep_logits(z)
    # Residuals: one logits-sized array (the logits, or exp(s - m)), [N]-sized
    # shift / log-sum / mass, and the inputs that are already live.
    return outputs, (kept, target, valid, class_weight, opts, m, lse_shift, mass)


def _ce_bwd(residuals, cotangents):
    kept, target, valid, class_weight, opts, m, lse_shift, mass = residuals
    g_ce, g_lse = cotangents[:2]
    g_ce, g_lse = _spmd.row_cotangents(g_ce, g_lse, axis_name=opts.vocab_axis, is_unchecked=opts.vocab_unchecked)
    ct = compute_dtype(kept.dtype)
    g_ce = jnp.where(valid, g_ce, 0).astype(ct)
    g_lse = jnp.where(valid, g_lse, 0).astype(ct)

    hi, lo = _targets.split_lse(m, lse_shift)

    col0 = shard_col0(kept.shape[-1], opts)

    def from_logits(z):
        s = _targets.keep_real(_transform.apply(z.astype(ct), opts.transform), opts, col0, -jnp.inf)
        p = jnp.exp((s - hi[:, None]) - lo[:, None])
        ds = _logit_grad(p, g_ce, g_lse, target, valid, class_weight, mass, opts)
        return _transform.chain(s, ds, opts.transform)

    def from_exp(e):
        # p = exp(s - m) * exp(-lse_shift): a multiply, no exp.
        return _logit_grad(e * jnp.exp(-lse_shift)[:, None], g_ce, g_lse, target, valid, class_weight, mass, opts)

    if keeps_exp(kept, opts):
        ds = lax.platform_dependent(kept, cpu=from_exp, default=from_logits)
    else:
        ds = from_logits(kept)
    # Padding columns get exactly 0 (the soft cap's chain rule is not finite at -inf).
    dz = _targets.keep_real(jnp.where(valid[:, None], ds, 0), opts, col0).astype(kept.dtype)
    d_target = None
    if opts.soft:
        s = _transform.apply(kept.astype(ct), opts.transform)
        cw = None if class_weight is None else class_weight.astype(ct)
        d_target = _targets.soft_target_cotangent(g_ce, lo, s - hi[:, None], target.astype(ct), cw, opts)
        d_target = _targets.keep_real(jnp.where(valid[:, None], d_target, 0), opts, col0).astype(target.dtype)
    # Class weights and masks are constants (as in PyTorch, whose weight has no
    # gradient); the public functions apply stop_gradient to make that visible.
    return dz, d_target, None, None, None


ce_vjp.defvjp(_ce_fwd, _ce_bwd)


# --- forward mode: custom_jvp --------------------------------------------------


@jax.custom_jvp
def ce_jvp(z, target, valid, class_weight, opts: Options):
    return _forward(z, target, valid, class_weight, opts)[0]


@ce_jvp.defjvp
def _ce_jvp_rule(primals, tangents):
    z, target, valid, class_weight, opts = primals
    dz, d_target, _, _, _ = tangents
    outputs, (s, (m, lse_shift), mass, _) = _forward(z, target, valid, class_weight, opts)
    ct = s.dtype
    ones = jnp.ones(m.shape, ct)
    zeros = jnp.zeros(m.shape, ct)
    dzf = jnp.where(valid[:, None], dz.astype(ct), 0)
    hi, lo = _targets.split_lse(m, lse_shift)
    p = jnp.exp((s - hi[:, None]) - lo[:, None])
    col0 = shard_col0(s.shape[-1], opts)
    g = _transform.chain(s, _logit_grad(p, ones, zeros, target, valid, class_weight, mass, opts), opts.transform)
    g = _targets.keep_real(g, opts, col0)
    p = _targets.keep_real(_transform.chain(s, p, opts.transform), opts, col0)
    d_ce = jnp.sum(g * dzf, axis=-1)
    d_lse = jnp.sum(jnp.where(p == 0, 0, p * dzf), axis=-1)
    if opts.soft and not _is_symbolic_zero(d_target):
        cw = None if class_weight is None else class_weight.astype(ct)
        gt = _targets.soft_target_cotangent(ones, lo, s - hi[:, None], target.astype(ct), cw, opts)
        gt = _targets.keep_real(gt, opts, col0)
        d_ce = d_ce + jnp.sum(jnp.where(gt == 0, 0, gt * d_target.astype(ct)), axis=-1)
    d_ce, d_lse = psum_rows(d_ce, d_lse, opts=opts)
    _, _, correct, w_y, pred = outputs
    tangent_out = (
        jnp.where(valid, d_ce, 0),
        jnp.where(valid, d_lse, 0),
        jnp.zeros_like(correct),
        jnp.zeros_like(w_y),
        jnp.zeros_like(pred),
    )
    # Tangents carry their primals' sharding types (jax < 0.7 checks this).
    d_ce, d_lse, d_hit, d_w, d_pred = (_spmd.vary_like(t, p) for t, p in zip(tangent_out, outputs))
    return outputs, (d_ce, d_lse, d_hit, d_w, d_pred)


def _is_symbolic_zero(x) -> bool:
    return x is None or (hasattr(x, "dtype") and x.dtype == jax.dtypes.float0)
