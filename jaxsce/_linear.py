"""``linear_cross_entropy``: ``cross_entropy(hidden @ weight + bias, labels)`` without the logits.

The logits of a language model's output layer, ``[tokens, vocab]``, are the
largest buffer of a training step. Here they only ever exist as blocks of
``[token_block, vocab_block]``:

* forward: for each token block, stream over vocabulary blocks keeping an
  online log-sum-exp (running max and rescaled sum of exponentials), the
  label's logit, the smoothing sum and the running argmax. One matmul pass.
* backward: for each vocabulary block, for each token block, recompute the
  logits block, form ``ds = (Q p - q) g_ce + p g_lse`` (``_targets``), and
  accumulate ``d_hidden += ds @ W_b^T`` and ``d_W_b += h^T @ ds``. Three
  matmul passes. The vocabulary loop is outside so that the float32
  accumulator is one ``[d, vocab_block]`` block, written to ``d_W`` (in
  ``weight``'s dtype) when done: a float32 accumulator for all of ``d_W``
  would alone be 2.3 GB at d=2304, V=256000.

Why recompute (4 matmuls) rather than form the gradient during the forward
pass (3 matmuls, as Liger-Kernel does for a scalar loss)? The forward pass
cannot know the cotangents, so it would have to keep ``d_W`` as a residual;
under ``jax.grad`` that is a second ``[d, V]`` buffer alive between the passes
(1.2 GB in bf16 at the headline shape), which breaks the memory budget this
path exists for. ``reduction="none"`` has per-token cotangents and needs the
recomputation anyway. The cost is one extra matmul pass (see benchmarks/).
When the float32 ``d_W`` does fit the memory budget, scalar losses do take
the 3-matmul single-pass path (``_linear_sum``).

16-bit inputs on CPU: XLA's CPU backend moves no bf16 data natively. A
bf16 slice becomes convert-to-float32, slice, convert back, and the whole-array
convert is then hoisted out of the loop: a float32 copy of ``weight``
(2.2 GiB at d=2304, V=256000). Blocks are therefore read behind a
conditional on CPU (``_slice``), which keeps the convert per block. Written
``d_W`` blocks still cost one fused pass over the bf16 ``d_W`` each, so
16-bit weights get fewer, wider vocabulary blocks (``choose_blocks``).

Forward mode (``derivative="jvp"``): a ``custom_jvp`` whose rule runs the
same streaming forward and carries the tangents of the per-token sums along
(``_forward``'s ``tangents``), so ``jax.jvp`` costs one pass of 3 matmuls and
no logits.

Blocks that do not divide the sizes are handled without padding copies: the
last block's start is clamped so it ends at the edge, and the entries it
shares with the previous block are masked out of every sum.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

from . import _labels, _options, _reduce, _spmd, _targets, _validate
from ._rows import in_range, max_shift, psum_rows, shard_col0, total_weight
from ._targets import Options


class Blocks(NamedTuple):
    tokens: int
    vocab: int


DEFAULT_MEMORY_BUDGET = 256 * 2**20


def choose_blocks(
    tokens: int,
    vocab: int,
    d: int,
    memory_budget: int,
    token_block=None,
    vocab_block=None,
    narrow_weight=False,
    forward_mode=False,
) -> Blocks:
    """Block sizes for the streaming path from the shapes and the memory budget.

    Compiled temporaries (measured with ``memory_analysis`` on XLA:CPU, jax
    0.10.2, both float32 and bfloat16) are about ``4 T d`` bytes for the
    float32 ``d_hidden`` accumulator plus ``12 Tb Vb`` for the logit-block
    arrays plus ``12 d Vb`` for the ``d_W`` accumulator and the weight block.
    Token blocks of 1024 make efficient matmuls; the vocabulary block gets
    the rest of the budget, in multiples of 128, up to a cap. Measured at
    2048 x 512 x 65536 (2 CPU cores): float32 ran best with vocabulary
    blocks of 2048-4096 (14336 was 15% slower), bfloat16 with 8192. 16-bit
    weights want fewer, wider blocks because on XLA:CPU each written ``d_W``
    block costs a pass over all of ``d_W`` (there is no native bf16
    dynamic-update-slice; the update runs as one fused convert-update-convert
    loop over the whole array).

    Forward mode (``forward_mode``) has no ``d_hidden`` accumulator but up to
    five float32 ``[Tb, Vb]`` arrays alive at once (logits, the tangent's
    two products, their sum and the exponentials): ``20 Tb Vb`` bytes.
    """
    if not isinstance(tokens, int):
        # A symbolic token count (jax.export): the caller pads to whole token
        # blocks, and the d_hidden accumulator's size is unknown, so the
        # vocabulary blocks get the smallest share the rule below allows.
        tb = token_block or 1024
        blocks_budget = memory_budget if forward_mode else memory_budget // 4
    else:
        tb = min(token_block or 1024, tokens)
        blocks_budget = memory_budget if forward_mode else max(memory_budget - 4 * tokens * d, memory_budget // 4)
    per_entry = 20 if forward_mode else 12
    cap = 8192 if narrow_weight else 4096
    vb = vocab_block or max(128, min(cap, blocks_budget // (per_entry * (tb + d))) // 128 * 128)
    return Blocks(max(1, tb), max(1, min(vb, vocab)))


def _num_blocks(total, size: int):
    """``ceil(total / size)``, also for a symbolic ``total`` (``jax.export``)."""
    return (total + size - 1) // size


def _clamped(i, size: int, total: int):
    """Start of block ``i`` (clamped to end at ``total``) and its first fresh index."""
    nominal = i * size
    return jnp.minimum(nominal, total - size), nominal


def _acc_dtype(h, w):
    """float32 accumulation for 16-bit and float32 inputs; float64 stays float64."""
    return _validate.compute_dtype(jnp.promote_types(h.dtype, w.dtype))


def _logits_block(h, w_blk, b_blk, layout: str):
    ct = _acc_dtype(h, w_blk)
    dims = (((1,), (0,)), ((), ())) if layout == "dv" else (((1,), (1,)), ((), ()))
    z = lax.dot_general(h, w_blk, dims, preferred_element_type=ct)
    if b_blk is not None:
        z = z + b_blk.astype(ct)[None, :]
    return z


def _is_narrow_float(dtype) -> bool:
    """16-bit floating point (bf16, fp16): computed in float32, special-cased on CPU."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4


def _slice(x, start, size: int, axis: int):
    """``x[start : start + size]`` along ``axis``, for a traced ``start`` inside a loop.

    XLA:CPU moves no 16-bit float data natively: it rewrites a bf16
    dynamic-slice as ``convert(x)`` to float32, a float32 slice and a convert
    back, and then hoists ``convert(x)`` out of the loop as loop-invariant: a
    float32 copy of all of ``x`` (2.2 GiB for a bf16 [2304, 256000] weight).
    Inside a ``lax.cond`` branch the convert is not hoisted and fuses with the
    slice, so only the block is read. The predicate is always true but not
    known to the compiler. Other platforms (native bf16) take the plain slice.
    """
    plain = lambda x, start: lax.dynamic_slice_in_dim(x, start, size, axis=axis)  # noqa: E731
    if not _is_narrow_float(x.dtype):
        return plain(x, start)
    shape = x.shape[:axis] + (size,) + x.shape[axis + 1 :]
    behind_cond = lambda x, start: lax.cond(  # noqa: E731
        start >= 0, plain, lambda x, start: jnp.zeros(shape, x.dtype), x, start
    )
    return lax.platform_dependent(x, start, cpu=behind_cond, default=plain)


def _token_rows(x, valid, start, size: int):
    """Rows ``start : start + size`` of ``x``, zero where the token is not counted.

    A masked token's hidden state may be NaN (padding); zeroing it keeps
    ``h^T @ ds`` from computing NaN * 0 into ``d_W``.
    """
    rows = _slice(x, start, size, 0)
    return jnp.where(lax.dynamic_slice_in_dim(valid, start, size)[:, None], rows, jnp.zeros((), x.dtype))


def _slice_vocab(w, start, vb: int, layout: str):
    return _slice(w, start, vb, 1 if layout == "dv" else 0)


def _transposed(h):
    """``h^T [d, T]``, made once (``T d`` is small next to ``d V``), or None.

    Not for 16-bit inputs: that dot form hit "Unsupported element type for
    DotThunk: BF16 x BF16 = F32" on XLA:CPU (jax 0.10.2) at small shapes.
    """
    return None if _is_narrow_float(h.dtype) else jnp.transpose(h)


def _h_t_times(h_t, h_blk, ds, t0, tb: int, ct):
    """``h_blk^T @ ds`` (``[d, V]``) for the single-pass ``d_W`` accumulation.

    From the pre-transposed ``h_t`` it is a plain ``[d, Tb] @ [Tb, V]``
    product: XLA:CPU ran the transposed-operand form (contracting dimension 0
    of both) at 158 GFLOP/s and this one at 187 (Tb 1024, d 512, V 32768,
    float32, 2 cores). (The streaming path's narrower ``[Tb, Vb]`` blocks
    showed no difference: 1.254 vs 1.247x plain, so it does not pay the
    ``4 T d`` bytes of the copy.)
    """
    if h_t is None:
        return lax.dot_general(h_blk, ds, (((0,), (0,)), ((), ())), preferred_element_type=ct)
    return jnp.matmul(_slice(h_t, t0, tb, 1), ds, preferred_element_type=ct)


class _Static(NamedTuple):
    blocks: Blocks
    layout: str


def _tangent_block(h_blk, w_blk, dh_blk, dw_blk, db_blk, layout: str, ct):
    """``dh_blk W_blk + h_blk dW_blk + db_blk``: the logits block's tangent (None terms skipped)."""
    dz = None
    if dh_blk is not None:
        dz = _logits_block(dh_blk, w_blk, None, layout)
    if dw_blk is not None:
        term = _logits_block(h_blk, dw_blk, None, layout)
        dz = term if dz is None else dz + term
    if db_blk is not None:
        term = jnp.broadcast_to(db_blk.astype(ct)[None, :], (h_blk.shape[0], db_blk.shape[0]))
        dz = term if dz is None else dz + term
    return dz


def _forward(h, w, b, labels, valid, cw, opts: Options, st: _Static, tangents=None):
    """Streaming forward; with ``tangents = (dh, dw, db)`` (None entries: zero)
    also the tangents of ``ce`` and ``lse``, carried online in the same pass.

    The tangent of ``lse = m + log se`` is ``sum_c p_c ds_c``: its numerator
    ``sum_c exp(s_c - m) ds_c`` is rescaled with ``se`` whenever the running
    max moves. ``ce`` is linear in ``(lse, s_y, smooth)`` for fixed weights
    (``_targets.class_id_loss``), so its tangent is the same formula applied
    to their tangents. Two more matmuls per block (``dh W_b``, ``h dW_b``).
    """
    (tb, vb), layout = st
    t_total, _ = h.shape
    v_local = w.shape[1] if layout == "dv" else w.shape[0]
    shard0 = shard_col0(v_local, opts)
    n_tok, n_voc = _num_blocks(t_total, tb), _num_blocks(v_local, vb)
    ct = _acc_dtype(h, w)
    cwf = None if cw is None else cw.astype(ct)
    dh_all, dw_all, db_all = tangents if tangents is not None else (None, None, None)
    n_out = 5 if tangents is None else 8

    def token_block(i, outs):
        t0, _ = _clamped(i, tb, t_total)
        h_blk = _token_rows(h, valid, t0, tb)
        dh_blk = None if dh_all is None else _token_rows(dh_all, valid, t0, tb)
        y_blk = lax.dynamic_slice_in_dim(labels, t0, tb)

        def vocab_block(j, carry):
            m, se, s_y, smooth, am, *tan = carry
            v0, fresh0 = _clamped(j, vb, v_local)
            b_blk = None if b is None else lax.dynamic_slice_in_dim(b, v0, vb)
            w_blk = _slice_vocab(w, v0, vb, layout)
            z = _logits_block(h_blk, w_blk, b_blk, layout)
            s = _targets.softcap(z, opts)
            fresh = lax.broadcasted_iota(jnp.int32, (1, vb), 1) + v0 >= fresh0
            s_new = jnp.where(fresh, s, -jnp.inf)
            if opts.argmax:
                bm, bi = _targets.max_and_argmax(s_new, v0 + shard0)
                am = jnp.where(bm > m, bi, am)
            else:
                bm = jnp.max(s_new, axis=-1)
            m_new = jnp.maximum(m, bm)
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0)
            rescale = jnp.exp(m - m_safe)
            e = jnp.exp(s_new - m_safe[:, None])
            se = se * rescale + jnp.sum(e, axis=-1)
            in_fresh = (y_blk - shard0 >= fresh0) & (y_blk - shard0 < v0 + vb)
            s_y = s_y + jnp.where(in_fresh, _targets.label_entry(s, y_blk, v0 + shard0), 0)
            cw_blk = None if cwf is None else lax.dynamic_slice_in_dim(cwf, v0, vb)
            if opts.label_smoothing is not None:
                ws = s if cw_blk is None else s * cw_blk[None, :]
                smooth = smooth + jnp.sum(jnp.where(fresh, ws, 0), axis=-1)
            if tangents is not None:
                d_se, d_sy, d_smooth = tan
                dw_blk = None if dw_all is None else _slice_vocab(dw_all, v0, vb, layout)
                db_blk = None if db_all is None else lax.dynamic_slice_in_dim(db_all, v0, vb)
                dz = _tangent_block(h_blk, w_blk, dh_blk, dw_blk, db_blk, layout, ct)
                assert dz is not None  # the rule handles "nothing perturbed" before streaming
                ds = jnp.where(fresh, _targets.softcap_scale(s, dz, opts), 0)
                d_se = d_se * rescale + jnp.sum(e * ds, axis=-1)
                d_sy = d_sy + jnp.where(in_fresh, _targets.label_entry(ds, y_blk, v0 + shard0), 0)
                if opts.label_smoothing is not None:
                    d_smooth = d_smooth + jnp.sum(ds if cw_blk is None else ds * cw_blk[None, :], axis=-1)
                tan = [d_se, d_sy, d_smooth]
            return (m_new, se, s_y, smooth, am, *tan)

        zeros = jnp.zeros((tb,), ct)
        init = (jnp.full((tb,), -jnp.inf, ct), zeros, zeros, zeros, jnp.zeros((tb,), jnp.int32))
        init = init + (zeros,) * (n_out - 5)
        init = _spmd.vary_like(init, h, w, b, labels, *(tangents or ()))
        rows = lax.fori_loop(0, n_voc, vocab_block, init)
        return [lax.dynamic_update_slice_in_dim(o, x, t0, 0) for o, x in zip(outs, rows)]

    zeros = jnp.zeros((t_total,), ct)
    outs = [zeros] * 4 + [jnp.zeros((t_total,), jnp.int32)] + [zeros] * (n_out - 5)
    outs = _spmd.vary_like(outs, h, w, b, labels, *(tangents or ()))
    m, sumexp, s_y, smooth, argmax, *tan = lax.fori_loop(0, n_tok, token_block, outs)

    # Combine the vocabulary shards: one pmax, one psum of a few floats per token.
    w_y = _targets.target_weight(labels - shard0, cwf, 0, opts)
    if opts.vocab_axis is not None:
        m_g = lax.pmax(m, opts.vocab_axis)
        m_gs = jnp.where(jnp.isfinite(m_g), m_g, 0)
        if opts.argmax:
            argmax = lax.pmin(jnp.where(m == m_g, argmax, jnp.iinfo(jnp.int32).max), opts.vocab_axis)
        scale = jnp.exp(m - m_gs)
        if w_y is None:
            sumexp, s_y, smooth = psum_rows(sumexp * scale, s_y, smooth, opts=opts)
        else:
            sumexp, s_y, smooth, w_y = psum_rows(sumexp * scale, s_y, smooth, w_y, opts=opts)
        if tan:
            # A separate psum: when JAX linearizes this rule (reverse mode in
            # "jvp" mode) the primal sums must not wait on tangent values.
            tan = psum_rows(tan[0] * scale, tan[1], tan[2], opts=opts)
        m = m_g
    m_safe = jnp.where(jnp.isfinite(m), m, 0)
    lse = m_safe + jnp.log(sumexp)
    mass = _targets.class_id_mass(w_y, total_weight(cwf, opts), opts)
    bad = ~in_range(labels, opts) | (m == jnp.inf)
    ce = jnp.where(bad, jnp.nan, _targets.class_id_loss(lse, s_y, smooth, w_y, mass, opts))
    correct = (argmax == labels) if opts.argmax else jnp.zeros(labels.shape, bool)
    count = jnp.ones_like(ce) if w_y is None else w_y
    hit = jnp.where(valid & correct, 1, 0).astype(ce.dtype)
    outputs = (jnp.where(valid, ce, 0), jnp.where(valid, lse, 0), hit, jnp.where(valid, count, 0))
    if tangents is None:
        return outputs, (lse, mass), None
    d_se, d_sy, d_smooth = tan
    d_lse = d_se / sumexp
    d_ce = jnp.where(bad, jnp.nan, _targets.class_id_loss(d_lse, d_sy, d_smooth, w_y, mass, opts))
    return outputs, (lse, mass), (jnp.where(valid, d_ce, 0), jnp.where(valid, d_lse, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _linear_rows(h, w, b, labels, valid, cw, opts: Options, st: _Static):
    return _forward(h, w, b, labels, valid, cw, opts, st)[0]


def _linear_rows_fwd(h, w, b, labels, valid, cw, opts, st):
    outputs, (lse, mass), _ = _forward(h, w, b, labels, valid, cw, opts, st)
    return outputs, (h, w, b, labels, valid, cw, opts, lse, mass)


def _linear_rows_bwd(st: _Static, res, cts):
    (tb, vb), layout = st
    h, w, b, labels, valid, cw, opts, lse, mass = res
    g_ce, g_lse, _, _ = cts
    g_ce, g_lse = _spmd.row_cotangents(g_ce, g_lse, axis_name=opts.vocab_axis, is_unchecked=opts.vocab_unchecked)
    t_total, d = h.shape
    v_local = w.shape[1] if layout == "dv" else w.shape[0]
    shard0 = shard_col0(v_local, opts)
    n_tok, n_voc = _num_blocks(t_total, tb), _num_blocks(v_local, vb)
    ct = _acc_dtype(h, w)
    g_ce = jnp.where(valid, g_ce, 0).astype(ct)
    g_lse = jnp.where(valid, g_lse, 0).astype(ct)
    label_ok = in_range(labels, opts)
    cwf = None if cw is None else cw.astype(ct)
    w_y_all = _targets.target_weight(labels - shard0, cwf, 0, opts)

    def vocab_block(j, carry):
        dh, dw, db = carry
        v0, fresh0 = _clamped(j, vb, v_local)
        w_blk = _slice_vocab(w, v0, vb, layout)
        b_blk = None if b is None else lax.dynamic_slice_in_dim(b, v0, vb)
        cw_blk = None if cwf is None else lax.dynamic_slice_in_dim(cwf, v0, vb)
        fresh_col = lax.broadcasted_iota(jnp.int32, (1, vb), 1) + v0 >= fresh0

        def token_block(i, inner):
            dh, dw_acc, db_acc = inner
            t0, tfresh0 = _clamped(i, tb, t_total)
            fresh_row = lax.broadcasted_iota(jnp.int32, (tb,), 0) + t0 >= tfresh0
            sl = lambda x: lax.dynamic_slice_in_dim(x, t0, tb)  # noqa: E731
            h_blk = _token_rows(h, valid, t0, tb)
            gc, gl = jnp.where(fresh_row, sl(g_ce), 0), jnp.where(fresh_row, sl(g_lse), 0)
            s = _targets.softcap(_logits_block(h_blk, w_blk, b_blk, layout), opts)
            p = jnp.exp(s - sl(lse)[:, None])
            w_y = None if w_y_all is None else sl(w_y_all)
            ms = None if mass is None else sl(mass)
            ds = _targets.class_id_grad(p, gc, gl, sl(labels), v0 + shard0, cw_blk, w_y, ms, opts)
            ds = _targets.softcap_scale(s, ds, opts)
            ds = jnp.where(sl(label_ok)[:, None], ds, jnp.nan)
            # Rows not counted (masked, ignored, or repeated by a clamped
            # block) contribute exactly 0, even if their hidden state is NaN.
            ds = jnp.where((sl(valid) & fresh_row)[:, None], ds, 0)
            ds_c = ds.astype(h.dtype)
            # Columns shared with the previous block: already in d_hidden.
            ds_h = jnp.where(fresh_col, ds, 0).astype(w.dtype)
            if layout == "dv":
                dh_blk = lax.dot_general(ds_h, w_blk, (((1,), (1,)), ((), ())), preferred_element_type=ct)
                dw_acc = dw_acc + lax.dot_general(h_blk, ds_c, (((0,), (0,)), ((), ())), preferred_element_type=ct)
            else:
                dh_blk = lax.dot_general(ds_h, w_blk, (((1,), (0,)), ((), ())), preferred_element_type=ct)
                dw_acc = dw_acc + lax.dot_general(ds_c, h_blk, (((0,), (0,)), ((), ())), preferred_element_type=ct)
            dh = lax.dynamic_update_slice_in_dim(dh, sl(dh) + dh_blk, t0, 0)
            if db_acc is not None:
                db_acc = db_acc + jnp.sum(ds, axis=0)
            return dh, dw_acc, db_acc

        acc_shape = (d, vb) if layout == "dv" else (vb, d)
        inner0 = (dh, jnp.zeros(acc_shape, ct), None if b is None else jnp.zeros((vb,), ct))
        inner0 = _spmd.vary_like(inner0, h, w, b, labels, g_ce, g_lse, lse)
        dh, dw_acc, db_acc = lax.fori_loop(0, n_tok, token_block, inner0)
        axis = 1 if layout == "dv" else 0
        dw = lax.dynamic_update_slice_in_dim(dw, dw_acc.astype(w.dtype), v0, axis)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, db_acc.astype(db.dtype), v0, 0)
        return dh, dw, db

    init = (jnp.zeros((t_total, d), ct), jnp.zeros_like(w), None if b is None else jnp.zeros_like(b))
    init = _spmd.vary_like(init, h, w, b, labels, g_ce, g_lse, lse)
    dh, dw, db = lax.fori_loop(0, n_voc, vocab_block, init)
    if opts.vocab_axis is not None and not opts.vocab_unchecked:
        # Each shard holds its vocabulary's share. (Under check_vma=False JAX
        # itself sums the input cotangents over the axes hidden is replicated on.)
        dh = lax.psum(dh, opts.vocab_axis)
    dh = jnp.where(valid[:, None], dh, 0).astype(h.dtype)
    dh, dw, db = (_spmd.sum_to_type(ct, x) for ct, x in ((dh, h), (dw, w), (db, b)))
    return dh, dw, db, None, None, None, None


_linear_rows.defvjp(_linear_rows_fwd, _linear_rows_bwd)


# --- forward mode: custom_jvp --------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(7,))
def _linear_rows_jvp(h, w, b, labels, valid, cw, opts: Options, st: _Static):
    return _forward(h, w, b, labels, valid, cw, opts, st)[0]


def _linear_rows_jvp_rule(st: _Static, primals, tangents):
    # The tangents of ce and lse come out of the same streaming pass as the
    # loss (3 matmuls per block: logits, dh W_b, h dW_b; fewer when an input
    # is not perturbed). Class weights and masks are constants, as in the
    # reverse rule.
    h, w, b, labels, valid, cw, opts = primals
    zero = jax.custom_derivatives.SymbolicZero
    dh, dw, db = (None if isinstance(t, zero) else t for t in tangents[:3])
    if dh is None and dw is None and db is None:
        outputs = _forward(h, w, b, labels, valid, cw, opts, st)[0]
        return outputs, tuple(jnp.zeros_like(o) for o in outputs)
    outputs, _, tangent_rows = _forward(h, w, b, labels, valid, cw, opts, st, tangents=(dh, dw, db))
    assert tangent_rows is not None
    d_ce, d_lse = tangent_rows
    _, _, hit, count = outputs
    return outputs, (d_ce, d_lse, jnp.zeros_like(hit), jnp.zeros_like(count))


_linear_rows_jvp.defjvp(_linear_rows_jvp_rule, symbolic_zeros=True)


# --- scalar losses: the gradient in the forward pass (3 matmuls) -------------------


class _SumStatic(NamedTuple):
    token_block: int
    layout: str


def sum_path_token_block(
    tokens: int, d: int, vocab: int, memory_budget: int, token_block=None, narrow_hidden: bool = False
) -> int | None:
    """Token block for the single-pass path, or None if it does not fit the budget.

    Compiled temporaries (``memory_analysis`` on XLA:CPU, jax 0.10.2) are
    about ``4 d V`` bytes for the float32 ``d_W`` accumulator, ``4 T d`` for
    the transposed hidden states (float32) or the ``d_hidden`` accumulator
    (16-bit inputs), and per token of the ``[Tb, V]`` row block about 4
    bytes per logit for float32 and 5-8 for 16-bit inputs (5 and 6 are used).
    Token blocks are rounded down to multiples of 256 from 512 on (at
    8192 x 512 x 32768, float32: 896 tokens ran 9% slower than 1024), of 128
    from 256. Blocks under 32 tokens make poor matmuls: use the streaming
    path then.
    """
    left = memory_budget - 4 * d * vocab - 4 * tokens * d
    if left <= 0:
        return None
    if token_block:
        return min(token_block, tokens)
    tb = min(tokens, left // ((6 if narrow_hidden else 5) * vocab))
    if tb >= 512:
        tb = tb // 256 * 256
    elif tb >= 256:
        tb = tb // 128 * 128
    return tb if tb >= min(32, tokens) else None


def _sum_forward(h, w, b, labels, valid, cw, opts: Options, z_loss, st: _SumStatic):
    tb, layout = st
    t_total, d = h.shape
    ct = _acc_dtype(h, w)
    cwf = None if cw is None else cw.astype(ct)
    total_w = None if cwf is None else jnp.sum(cwf)
    w_y_all = _targets.target_weight(labels, cwf, 0, opts)
    label_ok_all = in_range(labels, opts)

    def body(i, carry):
        total, denom, dh, dw, db = carry
        t0, fresh0 = _clamped(i, tb, t_total)
        sl = lambda x: lax.dynamic_slice_in_dim(x, t0, tb)  # noqa: E731
        h_blk, y = _token_rows(h, valid, t0, tb), sl(labels)
        ok = sl(valid) & (lax.broadcasted_iota(jnp.int32, (tb,), 0) + t0 >= fresh0)
        s = _targets.softcap(_logits_block(h_blk, w, b, layout), opts)
        shift, sumexp, pos_inf = max_shift(s, jnp.max(s, axis=-1))
        lse = shift + jnp.log(sumexp)
        s_y, smooth = _targets.class_id_partials(s, y, 0, cwf, opts)
        w_y = None if w_y_all is None else sl(w_y_all)
        mass = _targets.class_id_mass(w_y, total_w, opts)
        ce = _targets.class_id_loss(lse, s_y, smooth, w_y, mass, opts)
        label_ok = sl(label_ok_all)
        ce = jnp.where(label_ok & ~pos_inf, ce, jnp.nan)
        per_token = ce if z_loss is None else ce + z_loss * jnp.square(lse)
        total = total + jnp.sum(jnp.where(ok, per_token, 0))
        denom = denom + jnp.sum(jnp.where(ok, 1 if w_y is None else w_y, 0).astype(ct))
        g_ce = jnp.where(ok, 1, 0).astype(ct)
        g_lse = jnp.zeros_like(g_ce) if z_loss is None else jnp.where(ok, 2 * z_loss * lse, 0)
        p = jnp.exp(s - lse[:, None])
        ds = _targets.class_id_grad(p, g_ce, g_lse, y, 0, cwf, w_y, mass, opts)
        ds = _targets.softcap_scale(s, ds, opts)
        ds = jnp.where(label_ok[:, None], ds, jnp.nan)
        ds = jnp.where(ok[:, None], ds, 0)
        w_contract = 1 if layout == "dv" else 0
        dh_blk = lax.dot_general(ds.astype(w.dtype), w, (((1,), (w_contract,)), ((), ())), preferred_element_type=ct)
        dw = dw + _h_t_times(h_t, h_blk, ds.astype(h.dtype), t0, tb, ct)
        # Rows repeated by a clamped last block keep the value written before.
        dh_blk = jnp.where(ok[:, None], dh_blk, sl(dh))
        dh = lax.dynamic_update_slice_in_dim(dh, dh_blk, t0, 0)
        if db is not None:
            db = db + jnp.sum(ds, axis=0)
        return total, denom, dh, dw, db

    h_t = _transposed(jnp.where(valid[:, None], h, 0))
    zero = jnp.zeros((), ct)
    db0 = None if b is None else jnp.zeros(b.shape, ct)
    init = (zero, zero, jnp.zeros((t_total, d), ct), jnp.zeros((d, w.size // d), ct), db0)
    init = _spmd.vary_like(init, h, w, b, labels)
    total, denom, dh, dw, db = lax.fori_loop(0, _num_blocks(t_total, tb), body, init)
    dh = jnp.where(valid[:, None], dh, 0).astype(h.dtype)
    dw = dw if layout == "dv" else jnp.transpose(dw)
    grads = (dh, dw.astype(w.dtype), None if b is None else db.astype(b.dtype))
    return (total, denom), grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _linear_sum(h, w, b, labels, valid, cw, opts: Options, z_loss, st: _SumStatic):
    return _sum_forward(h, w, b, labels, valid, cw, opts, z_loss, st)[0]


def _linear_sum_fwd(h, w, b, labels, valid, cw, opts, z_loss, st):
    # The cotangent of a scalar loss only scales the gradient, so it is
    # formed here, in the same pass as the loss: 3 matmul passes in all
    # (logits, d_hidden, d_weight) instead of 4. The price is keeping d_W
    # (and d_hidden) alive until the backward pass, which the caller's
    # memory budget has to allow (sum_path_token_block).
    outputs, grads = _sum_forward(h, w, b, labels, valid, cw, opts, z_loss, st)
    return outputs, (grads, (h, w, b))


def _linear_sum_bwd(st, res, cts):
    (dh, dw, db), (h, w, b) = res
    g, _ = cts
    scale = lambda x: None if x is None else (x * g.astype(x.dtype)).astype(x.dtype)  # noqa: E731
    dh, dw, db = (_spmd.sum_to_type(scale(ct), x) for ct, x in ((dh, h), (dw, w), (db, b)))
    return dh, dw, db, None, None, None, None, None


_linear_sum.defvjp(_linear_sum_fwd, _linear_sum_bwd)


def linear_cross_entropy(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    *,
    linear_bias: jax.Array | None = None,
    weight_layout: str = "dv",
    where: jax.Array | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    weight: jax.Array | None = None,
    label_smoothing: float | jax.Array = 0.0,
    z_loss: float | jax.Array = 0.0,
    logit_softcap: float | jax.Array | None = None,
    return_aux: bool = False,
    token_block: int | None = None,
    vocab_block: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
    check_labels: bool = False,
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
      label_smoothing: as in :func:`jaxsce.cross_entropy` (may be traced).
      z_loss: as in :func:`jaxsce.cross_entropy` (may be traced).
      logit_softcap: as in :func:`jaxsce.cross_entropy` (may be traced).
      return_aux: as in :func:`jaxsce.cross_entropy`.
      axis_name: mesh axis splitting the vocabulary inside ``jax.shard_map``:
        the vocabulary axis of ``linear_weight`` (and of ``linear_bias`` and
        ``weight``) is then the local shard.
      batch_axis_name: as in :func:`jaxsce.cross_entropy`.
      check_labels: as in :func:`jaxsce.cross_entropy`.
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
        least the logits' total size (compiled temporaries at 4096 x 64 x
        32768: 735 MiB for ``jax.grad``, 1.4 GiB for the HVP, against 512 MiB
        of logits): use ``"vjp"`` for training. Reverse mode in this mode
        needs jax >= 0.10: on jax 0.6.2 JAX's own transpose of the block
        loops fails (an ``AssertionError`` inside JAX).

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
        weight_layout=_options.choice(weight_layout, "weight_layout", ("dv", "vd")),
        token_block=_options.size(token_block, "token_block"),
        vocab_block=_options.size(vocab_block, "vocab_block"),
        memory_budget=_options.size(memory_budget, "memory_budget", allow_none=False),
        **_options.shared(
            reduction=reduction,
            ignore_index=ignore_index,
            return_aux=return_aux,
            derivative=derivative,
            axis_name=axis_name,
            batch_axis_name=batch_axis_name,
            check_labels=check_labels,
        ),
    )
    fl = _options.floats(label_smoothing=label_smoothing, z_loss=z_loss, logit_softcap=logit_softcap)
    args = (hidden, linear_weight, labels, linear_bias, where, weight, fl)
    return _options.run(_linear_cross_entropy, args, static)


@functools.partial(
    jax.jit,
    static_argnames=(
        "weight_layout",
        "reduction",
        "ignore_index",
        "return_aux",
        "token_block",
        "vocab_block",
        "memory_budget",
        "axis_name",
        "batch_axis_name",
        "check_labels",
        "derivative",
    ),
)
def _linear_cross_entropy(
    hidden,
    weight,
    labels,
    bias,
    where,
    class_weight,
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
):
    layout = weight_layout
    hidden = _validate.check_floating(hidden, "hidden")
    weight = _validate.check_floating(weight, "linear_weight")
    if hidden.ndim < 1:
        raise ValueError(f"hidden must have shape [..., d], got shape {hidden.shape}.")
    if weight.ndim != 2:
        raise ValueError(f"linear_weight must be 2-D ([d, V] or [V, d]), got shape {weight.shape}.")
    d = hidden.shape[-1]
    wd, v_local = (weight.shape[0], weight.shape[1]) if layout == "dv" else (weight.shape[1], weight.shape[0])
    if wd != d:
        raise ValueError(
            f"hidden has feature size {d} (shape {hidden.shape}) but linear_weight of shape "
            f"{weight.shape} with weight_layout={layout!r} has input size {wd}."
        )
    if v_local == 0:
        raise ValueError(f"linear_weight of shape {weight.shape} (weight_layout={layout!r}) has no classes.")
    if bias is not None:
        bias = _validate.check_floating(bias, "linear_bias")
        if bias.shape != (v_local,):
            raise ValueError(f"linear_bias has shape {bias.shape} but must have shape ({v_local},).")
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype} with shape {labels.shape}.")
    batch_shape = hidden.shape[:-1]
    if labels.shape != batch_shape:
        raise ValueError(f"labels have shape {labels.shape} but hidden of shape {hidden.shape} needs {batch_shape}.")
    _spmd.check_split_axes("linear_weight", weight, labels, "labels", axis_name, batch_axis_name)

    n = math.prod(batch_shape)
    num_classes = v_local * _spmd.axis_size(axis_name)
    h2 = hidden.reshape(n, d)
    valid = jnp.ones(n, bool)
    if where is not None:
        valid = _validate.check_mask(where, batch_shape, "where", "hidden.shape[:-1]").reshape(n)
    y, valid = _labels.label_validity(labels.reshape(n), num_classes, valid, ignore_index, check_labels)
    cw = None if class_weight is None else _options.check_class_weight(class_weight, v_local)
    fl = _options.in_dtype(fl, _acc_dtype(h2, weight))
    opts = _options.make_options(
        fl,
        num_classes=num_classes,
        class_weight=cw,
        soft=False,
        axis_name=axis_name,
        return_aux=return_aux,
        is_unchecked=_spmd.unchecked(axis_name),
    )
    done = functools.partial(
        _reduce.finish,
        z_loss=fl.z_loss,
        reduction=reduction,
        return_aux=return_aux,
        batch_axis_name=batch_axis_name,
        batch_shape=batch_shape,
    )
    if isinstance(n, int) and n == 0:
        # No tokens: nothing to stream; the loss does not depend on the inputs.
        empty = jnp.zeros((0,), _acc_dtype(h2, weight))
        return done((empty,) * 4, valid)
    symbolic = not isinstance(n, int)
    # A scalar loss without aux outputs or vocabulary sharding can get its
    # gradient in the forward pass when d_W fits the budget; otherwise (and
    # for "none", whose per-token cotangents are unknown until the backward)
    # stream vocabulary blocks and recompute in the backward.
    sum_tb = None
    forward_mode = derivative == "jvp"
    scalar = reduction != "none" and not (return_aux or forward_mode)
    if scalar and axis_name is None and vocab_block is None and not symbolic:
        sum_tb = sum_path_token_block(n, d, v_local, memory_budget, token_block, _is_narrow_float(hidden.dtype))
    if sum_tb is not None:
        sums = _linear_sum(h2, weight, bias, y, valid, cw, opts, fl.z_loss, _SumStatic(sum_tb, layout))
        total, denom = cast(tuple[jax.Array, jax.Array], sums)
        return _reduce.reduce_loss(total[None], denom[None], reduction, batch_axis_name)
    if symbolic:
        # Block sizes cannot depend on an unknown token count: pad the tokens
        # to a whole number of blocks (at least one padded row, which keeps
        # every block slice provably in bounds); padded rows are not counted.
        tb = token_block or 1024
        pad = tb * (n // tb + 1) - n
        h2 = jnp.pad(h2, ((0, pad), (0, 0)))
        y = jnp.pad(y, (0, pad))
        valid = jnp.pad(valid, (0, pad))
        token_block = tb
    blocks = choose_blocks(
        h2.shape[0], v_local, d, memory_budget, token_block, vocab_block, _is_narrow_float(weight.dtype), forward_mode
    )
    kernel = _linear_rows_jvp if forward_mode else _linear_rows
    outputs = cast(tuple[jax.Array, ...], kernel(h2, weight, bias, y, valid, cw, opts, _Static(blocks, layout)))
    if symbolic:
        outputs = tuple(o[:n] for o in outputs)
        valid = valid[:n]
    return done(outputs, valid)
