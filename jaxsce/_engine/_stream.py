"""The streaming engine under every fused loss: softmax rows that never exist whole.

A fused loss reads one or more linear heads, ``z_k = h_k W_k + b_k`` (one
``[T, V]`` matrix of logits each: the model's head, or a student's and a
teacher's), and is, per token, a function of a few sums over the rows of
``s_k = f_k(z_k)`` (``f_k``: soft cap, temperature). Here the logits only
ever exist as ``[token_block, vocab_block]`` blocks (``_blocks``). A loss
is a :class:`~jaxsce._engine._rowloss.RowLoss` (``_rowloss``); the engine owns the
loops, the online max and sum of exponentials of every head, masking, the
matmuls and the collectives. Its drivers:

* :func:`stream_vjp` (``custom_vjp``): a streaming forward (one matmul pass per
  head) and a backward that recomputes the logits blocks, vocabulary blocks
  outside, with two more matmul passes for ``d_hidden`` and ``d_W``;
* :func:`stream_jvp` (``custom_jvp``, forward mode): the outputs' tangents,
  from the loss's own streamed tangents (``streams_tangents``) or from one
  more pass over the per-entry gradient (:func:`_tangent_pass`);
* :func:`single_pass_vjp` (``custom_vjp``): scalar losses whose float32
  ``d_W`` fits the memory budget. Token blocks of whole rows; the gradient is
  formed with the loss in the same pass (3 matmul passes for one head, not 4);
* :func:`whole_vjp` and :func:`whole_jvp`: the same formulas on given
  logits, the whole row as one block (the logit-level functions).

After the first pass, a loss may ask for a second pass (``second_pass``) or
for a search (:func:`search`): further passes, one more read of every block
each, while any counted row is pending (top-p's threshold).

Gradients flow to head 0 only: the others (a distillation teacher) are
constants. Blocks that do not divide the sizes are not padded: the last
block's start is clamped so it ends at the edge, and the entries it shares
with the previous block are masked out of every sum.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

from .._base import _spmd, _validate
from ._blocks import (
    DEFAULT_MEMORY_BUDGET,
    Blocks,
    Head,
    acc_dtype,
    block_logits,
    choose_blocks,
    clamped,
    grad_matmuls,
    h_t_times,
    head_blocks,
    is_narrow_float,
    num_blocks,
    operand_dtype,
    slice_tree,
    slice_vocab,
    sum_path_token_block,
    tangent_block,
    token_rows,
    transposed,
    vocab_size,
)
from ._rowloss import Acc, Block, GradBlock, RowLoss, Scalar, Shards, Stats
from ._targets import max_and_argmax, split_lse

__all__ = ["DEFAULT_MEMORY_BUDGET", "Acc", "Block", "GradBlock", "Head", "RowLoss", "Scalar", "Shards", "Stats"]


# --- the forward pass ----------------------------------------------------------------


def _real(loss: RowLoss, col0, width: int, mask=None):
    """``mask`` (``[1, width]``, or all) and-ed with "column ``col0 + j`` is a real class"
    (``RowLoss.classes``); None when every column is real and no mask was given."""
    if loss.classes is None:
        return mask
    real = lax.broadcasted_iota(jnp.int32, (1, width), 1) + col0 < loss.classes
    return real if mask is None else mask & real


def _keep(x, mask):
    """``x`` where ``mask`` (broadcast), 0 elsewhere; ``x`` itself without a mask."""
    return x if mask is None else jnp.where(mask, x, 0)


def _online_step(loss: RowLoss, s_heads, m, se, am, acc, fresh, col0, fresh_col0, rows, cols, consts, ds):
    """One block's update of the running max, sums of exponentials, argmax and the loss's sums."""
    s_new = [jnp.where(fresh, s, -jnp.inf) for s in s_heads]
    if am is not None:
        bm0, bi = max_and_argmax(s_new[0], col0)
        am = jnp.where(bm0 > m[0], bi, am)
        block_max = [bm0] + [jnp.max(s, axis=-1) for s in s_new[1:]]
    else:
        block_max = [jnp.max(s, axis=-1) for s in s_new]
    m_new = tuple(jnp.maximum(a, b) for a, b in zip(m, block_max))
    m_safe = tuple(jnp.where(jnp.isfinite(x), x, 0) for x in m_new)
    shift = tuple(jnp.where(jnp.isfinite(a), a - b, 0) for a, b in zip(m, m_safe))
    rescale = tuple(jnp.exp(a - b) for a, b in zip(m, m_safe))
    e = tuple(jnp.exp(s - b[:, None]) for s, b in zip(s_new, m_safe))
    blk = Block(tuple(s_heads), e, m_safe, rescale, shift, tuple(se), col0, fresh_col0, fresh, rows, cols, ds)
    acc = loss.accumulate(acc, blk, consts)
    se = tuple(a * r + jnp.sum(x, axis=-1) for a, r, x in zip(se, rescale, e))
    return m_new, se, am, acc


def _initial(loss: RowLoss, tb, ct, consts, forward_mode: bool):
    m = tuple(jnp.full((tb,), -jnp.inf, ct) for _ in range(loss.heads))
    se = tuple(jnp.zeros((tb,), ct) for _ in range(loss.heads))
    am = jnp.zeros((tb,), jnp.int32) if loss.argmax else None
    return m, se, am, loss.init(tb, ct, consts, forward_mode)


def _combine(loss: RowLoss, m, se, am, acc, consts):
    """Per-row statistics over all vocabulary shards: one pmax, one psum of a few floats per row."""
    axis = loss.vocab_axis
    if axis is None:
        return m, se, am, acc
    m_g = tuple(lax.pmax(x, axis) for x in m)
    m_gs = tuple(jnp.where(jnp.isfinite(x), x, 0) for x in m_g)
    if am is not None:
        am = lax.pmin(jnp.where(m[0] == m_g[0], am, jnp.iinfo(jnp.int32).max), axis)
    scale = tuple(jnp.exp(a - b) for a, b in zip(m, m_gs))
    m_ls = tuple(jnp.where(jnp.isfinite(x), x, 0) for x in m)
    acc = loss.to_global(acc, Shards(m_ls, m_gs, se, scale), consts)
    leaves, tree = jax.tree.flatten(acc.sums)
    summed = _spmd.psum_tuple(*(a * b for a, b in zip(se, scale)), *leaves, axis_name=axis)
    se, sums = summed[: loss.heads], jax.tree.unflatten(tree, summed[loss.heads :])
    tangents = acc.tangents
    if jax.tree.leaves(tangents):
        # A separate psum: when JAX linearizes a forward-mode rule (reverse
        # mode through derivative="jvp") the primal sums must not wait on
        # tangent values.
        tangents = _sum_shards(loss, tangents, consts)
    return m_g, tuple(se), am, Acc(sums, tangents)


def _stats(loss: RowLoss, m, se, am, acc, consts):
    m, se, am, acc = _combine(loss, m, se, am, acc, consts)
    shift = tuple(jnp.where(jnp.isfinite(a), a, 0) for a in m)
    log_se = tuple(jnp.log(b) for b in se)
    lse = tuple(a + b for a, b in zip(shift, log_se))
    return Stats(m, se, lse, am, shift, log_se), acc


def _norm(stats: Stats):
    """The per-row normalizers the backward needs: ``lse`` as ``(hi, lo)`` per head (:func:`split_lse`)."""
    pairs = [split_lse(a, b) for a, b in zip(stats.shift, stats.log_se)]
    return tuple(hi for hi, _ in pairs), tuple(lo for _, lo in pairs)


def _grad_block(s, norm, col0, rows, cols) -> GradBlock:
    """``log_p = (s - hi) - lo`` and ``p = exp(log_p)`` for every head (:func:`split_lse`)."""
    hi, lo = norm
    log_p = tuple((x - a[:, None]) - b[:, None] for x, a, b in zip(s, hi, lo))
    return GradBlock(tuple(s), tuple(jnp.exp(x) for x in log_p), log_p, col0, rows, cols)


def _sum_shards(loss: RowLoss, tree, consts):
    """Every leaf of ``tree`` summed over the vocabulary shards, in one collective."""
    axis = loss.vocab_axis
    if axis is None:
        return tree
    leaves, structure = jax.tree.flatten(tree)
    return jax.tree.unflatten(structure, _spmd.psum_tuple(*leaves, axis_name=axis))


def _whole_pass(loss: RowLoss, s, norm, col0, rows_data, cols, consts):
    """The second-pass (or search-pass) sums of a block holding whole (local) rows."""
    ct = s[0].dtype
    gblk = _grad_block(s, norm, col0, rows_data, cols)
    fresh = _real(loss, col0, s[0].shape[1], jnp.ones((1, s[0].shape[1]), bool))
    acc2 = loss.accumulate2(loss.init2(s[0].shape[0], ct, consts), gblk, fresh, consts)
    return _sum_shards(loss, acc2, consts)


def _after_first_pass(loss: RowLoss, acc: Acc, stats: Stats, rows, valid, run_pass):
    """What :meth:`~jaxsce._engine._rowloss.RowLoss.finish` gets as ``second``: the second pass's sums, the final
    state of a loss's search, or None. ``run_pass(rows)`` sums one more pass over the blocks."""
    if loss.second_pass:
        return run_pass(loss.second_rows(acc, rows))
    if not loss.searches():
        return None
    return search(loss, loss.search_init(acc, stats, rows), rows, valid, run_pass)


def search(loss: RowLoss, state, rows, valid, run_pass):
    """A loss's search (:meth:`~jaxsce._engine._rowloss.RowLoss.searches`): passes while any counted row is pending,
    at most ``loss.search_limit()``. Each pass reads every block once more (a matmul pass when fused).

    The loop's condition depends only on sums already combined over the vocabulary shards, so every
    shard of a row makes the same passes (the passes' collectives match)."""

    def cond(carry):
        state, i = carry
        return (i < loss.search_limit()) & jnp.any(valid & loss.search_pending(state))

    def body(carry):
        state, i = carry
        pass_rows = loss.search_rows(state, rows)
        return loss.search_step(state, pass_rows, run_pass(pass_rows)), i + 1

    init = _spmd.vary_like((state, jnp.zeros((), jnp.int32)), state, rows, valid)
    state, _ = lax.while_loop(cond, body, init)
    return state


def _grad_heads(loss: RowLoss, heads: tuple):
    """The heads whose blocks ``loss.grad`` reads (``RowLoss.grad_heads``): the passes that only feed
    ``grad`` (the backward, the forward-mode tangent pass) recompute no others."""
    return heads[: loss.grad_heads or len(heads)]


def _block_tangent(tangents, h_blk, w_blk, dh_blk, v0, vb: int, layout: str, ct):
    """Head 0's logits-block tangent ``dh W_b + h dW_b + db_b`` for vocabulary columns ``v0 : v0 + vb``
    (``tangents = (dh, dW, db)``, None entries zero; ``dh_blk`` is ``dh``'s token block)."""
    _, dw_all, db_all = tangents
    dw_blk = None if dw_all is None else slice_vocab(dw_all, v0, vb, layout)
    db_blk = None if db_all is None else lax.dynamic_slice_in_dim(db_all, v0, vb)
    dz = tangent_block(h_blk, w_blk, dh_blk, dw_blk, db_blk, layout, ct)
    assert dz is not None  # the rules handle "nothing perturbed" before streaming
    return dz


class Static(NamedTuple):
    """The drivers' static configuration: the loss, the blocks and each head's weight layout."""

    loss: RowLoss
    blocks: Blocks
    layouts: tuple[str, ...]


def _forward(heads: tuple[Head, ...], valid, rows, cols, consts, st: Static, tangents=None):
    """Streaming forward: ``(outputs, residuals, output tangents or None)``.

    ``tangents = (dh, dw, db)`` of head 0 (None entries: zero) are carried
    through the same pass: their logits block ``dh W_b + h dW_b + db_b``
    costs one matmul per perturbed input.
    """
    loss, (tb, vb), layouts = st
    t_total = heads[0].hidden.shape[0]
    v_local = vocab_size(heads[0], layouts[0])
    shard0 = _spmd.shard_col0(v_local, loss.vocab_axis)
    ct = acc_dtype(*(x for hd in heads for x in hd))
    dh_all = None if tangents is None else tangents[0]
    like = (heads, valid, rows, cols, tangents)

    def token_block(i, outs):
        t0, _ = clamped(i, tb, t_total)
        h_blks = [token_rows(hd.hidden, valid, t0, tb) for hd in heads]
        dh_blk = None if dh_all is None else token_rows(dh_all, valid, t0, tb)
        rows_blk = slice_tree(rows, t0, tb)

        def vocab_block(j, carry):
            m, se, am, acc = carry
            v0, fresh0 = clamped(j, vb, v_local)
            fresh = _real(loss, v0 + shard0, vb, lax.broadcasted_iota(jnp.int32, (1, vb), 1) + v0 >= fresh0)
            w_blks, b_blks = head_blocks(heads, v0, vb, layouts)
            s_heads = block_logits(loss, h_blks, w_blks, b_blks, layouts, consts, ct)
            ds = None
            if tangents is not None:
                dz = _block_tangent(tangents, h_blks[0], w_blks[0], dh_blk, v0, vb, layouts[0], ct)
                ds = jnp.where(fresh, loss.transform_grad(s_heads[0], dz, 0, consts), 0)
            cols_blk = slice_tree(cols, v0, vb)
            col0 = v0 + shard0
            return _online_step(
                loss, s_heads, m, se, am, acc, fresh, col0, fresh0 + shard0, rows_blk, cols_blk, consts, ds
            )

        init = _spmd.vary_like(_initial(loss, tb, ct, consts, tangents is not None), *like)
        block_rows = lax.fori_loop(0, num_blocks(v_local, vb), vocab_block, init)
        return jax.tree.map(lambda o, x: lax.dynamic_update_slice_in_dim(o, x, t0, 0), outs, block_rows)

    outs = _spmd.vary_like(_initial(loss, t_total, ct, consts, tangents is not None), *like)
    m, se, am, acc = lax.fori_loop(0, num_blocks(t_total, tb), token_block, outs)
    stats, acc = _stats(loss, m, se, am, acc, consts)
    norm = _norm(stats)
    second = _after_first_pass(
        loss, acc, stats, rows, valid, lambda r: _second_pass(heads, valid, r, cols, consts, st, norm, shard0)
    )
    outputs, res, d_out = loss.finish(stats, acc, second, rows, cols, consts)
    outputs = tuple(jnp.where(valid, o, 0) for o in outputs)
    if d_out is not None:
        d_out = tuple(jnp.where(valid, o, 0) for o in d_out)
    return outputs, (norm, res), d_out


def _second_pass(heads: tuple[Head, ...], valid, rows, cols, consts, st: Static, norm, shard0):
    """The loss's second-pass sums over all blocks, every head's normalizer known (one more matmul pass).

    ``shard0``: the shard's first global column, formed by the caller outside any loop (jax 0.6 cannot
    partition the ``axis_index`` it takes inside a search's ``while_loop``)."""
    loss, (tb, vb), layouts = st
    t_total = heads[0].hidden.shape[0]
    v_local = vocab_size(heads[0], layouts[0])
    ct = acc_dtype(*(x for hd in heads for x in hd))
    like = (heads, valid, rows, cols, norm)

    def token_block(i, outs):
        t0, _ = clamped(i, tb, t_total)
        h_blks = [token_rows(hd.hidden, valid, t0, tb) for hd in heads]
        rows_blk, norm_blk = slice_tree(rows, t0, tb), slice_tree(norm, t0, tb)

        def vocab_block(j, acc2):
            v0, fresh0 = clamped(j, vb, v_local)
            fresh = _real(loss, v0 + shard0, vb, lax.broadcasted_iota(jnp.int32, (1, vb), 1) + v0 >= fresh0)
            s = block_logits(loss, h_blks, *head_blocks(heads, v0, vb, layouts), layouts, consts, ct)
            gblk = _grad_block(s, norm_blk, v0 + shard0, rows_blk, slice_tree(cols, v0, vb))
            return loss.accumulate2(acc2, gblk, fresh, consts)

        init = _spmd.vary_like(loss.init2(tb, ct, consts), *like)
        block_rows = lax.fori_loop(0, num_blocks(v_local, vb), vocab_block, init)
        return jax.tree.map(lambda o, x: lax.dynamic_update_slice_in_dim(o, x, t0, 0), outs, block_rows)

    outs = _spmd.vary_like(loss.init2(t_total, ct, consts), *like)
    return _sum_shards(loss, lax.fori_loop(0, num_blocks(t_total, tb), token_block, outs), consts)


# --- reverse mode: custom_vjp ----------------------------------------------------------


def _row_cotangents(loss: RowLoss, cts, valid, consts, ct):
    picked = tuple(cts[i] for i in loss.differentiable)
    picked = _spmd.row_cotangents(*picked, axis_name=loss.vocab_axis, is_unchecked=loss.unchecked)
    picked = tuple(jnp.where(valid, g, 0).astype(ct) for g in picked)
    return tuple(picked[loss.differentiable.index(i)] if i in loss.differentiable else None for i in range(len(cts)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def stream_vjp(heads, valid, rows_data, cols, consts, st: Static):
    """Per-row outputs of ``st.loss`` over the heads' logits, streamed; reverse mode."""
    return _forward(heads, valid, rows_data, cols, consts, st)[0]


def _stream_fwd(heads, valid, rows_data, cols, consts, st):
    outputs, (norm, res), _ = _forward(heads, valid, rows_data, cols, consts, st)
    return outputs, (heads, valid, rows_data, cols, consts, norm, res)


def _stream_bwd(st: Static, saved, cts):
    loss, (tb, vb), layouts = st
    heads, valid, rows_data, cols, consts, norm, res = saved
    h0 = heads[0]
    t_total, d = h0.hidden.shape
    v_local = vocab_size(h0, layouts[0])
    shard0 = _spmd.shard_col0(v_local, loss.vocab_axis)
    ct = acc_dtype(*(x for hd in heads for x in hd))
    cts = _row_cotangents(loss, cts, valid, consts, ct)
    like = (heads, valid, rows_data, cols, norm, res, cts)
    layout = layouts[0]
    op = operand_dtype(h0)

    used = _grad_heads(loss, heads)

    def vocab_block(j, carry):
        dh, dw, db = carry
        v0, fresh0 = clamped(j, vb, v_local)
        fresh_col = lax.broadcasted_iota(jnp.int32, (1, vb), 1) + v0 >= fresh0
        real = _real(loss, v0 + shard0, vb)
        w_blks, b_blks = head_blocks(used, v0, vb, layouts)
        cols_blk = slice_tree(cols, v0, vb)

        def token_block(i, inner):
            dh, dw_acc, db_acc = inner
            t0, tfresh0 = clamped(i, tb, t_total)
            fresh_row = lax.broadcasted_iota(jnp.int32, (tb,), 0) + t0 >= tfresh0
            sl = lambda x: slice_tree(x, t0, tb)  # noqa: E731
            h_blks = [token_rows(hd.hidden, valid, t0, tb) for hd in used]
            s = block_logits(loss, h_blks, w_blks, b_blks, layouts, consts, ct)
            ok = sl(valid) & fresh_row
            blk_cts = tuple(None if g is None else jnp.where(fresh_row, sl(g), 0) for g in cts)
            gblk = _grad_block(s, sl(norm), v0 + shard0, sl(rows_data), cols_blk)
            ds = loss.transform_grad(s[0], loss.grad(gblk, sl(res), blk_cts, consts), 0, consts)
            # Rows not counted (masked, ignored, or repeated by a clamped
            # block) contribute exactly 0, even if their hidden state is NaN.
            ds = _keep(jnp.where(ok[:, None], ds, 0), real)  # padding columns: exactly 0
            # Columns shared with the previous block are already in d_hidden;
            # d_W's block is rewritten whole.
            ds_h = jnp.where(fresh_col, ds, 0)
            dh_blk, dw_blk = grad_matmuls(ds_h, ds, h_blks[0], w_blks[0], layout, op, ct)
            dw_acc = dw_acc + dw_blk
            dh = lax.dynamic_update_slice_in_dim(dh, lax.dynamic_slice_in_dim(dh, t0, tb) + dh_blk, t0, 0)
            if db_acc is not None:
                db_acc = db_acc + jnp.sum(ds, axis=0)
            return dh, dw_acc, db_acc

        acc_shape = (d, vb) if layout == "dv" else (vb, d)
        inner0 = (dh, jnp.zeros(acc_shape, ct), None if h0.bias is None else jnp.zeros((vb,), ct))
        inner0 = _spmd.vary_like(inner0, *like)
        dh, dw_acc, db_acc = lax.fori_loop(0, num_blocks(t_total, tb), token_block, inner0)
        axis = 1 if layout == "dv" else 0
        dw = lax.dynamic_update_slice_in_dim(dw, dw_acc.astype(h0.weight.dtype), v0, axis)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, db_acc.astype(db.dtype), v0, 0)
        return dh, dw, db

    init = (
        jnp.zeros((t_total, d), ct),
        jnp.zeros_like(h0.weight),
        None if h0.bias is None else jnp.zeros_like(h0.bias),
    )
    init = _spmd.vary_like(init, *like)
    dh, dw, db = lax.fori_loop(0, num_blocks(v_local, vb), vocab_block, init)
    axis_name = loss.vocab_axis
    if axis_name is not None and not loss.unchecked:
        # Each shard holds its vocabulary's share. (Under check_vma=False JAX
        # itself sums the input cotangents over the axes hidden is replicated on.)
        dh = lax.psum(dh, axis_name)
    dh = jnp.where(valid[:, None], dh, 0).astype(h0.hidden.dtype)
    d_head0 = Head(*(_spmd.sum_to_type(g, x) for g, x in ((dh, h0.hidden), (dw, h0.weight), (db, h0.bias))))  # type: ignore[arg-type]
    d_heads = (d_head0,) + tuple(None for _ in heads[1:])
    return d_heads, None, None, None, None


stream_vjp.defvjp(_stream_fwd, _stream_bwd)


# --- forward mode: custom_jvp ----------------------------------------------------------


def _unit_cotangents(loss: RowLoss, n_outputs: int, i: int, like):
    """Cotangents selecting output ``i`` (1 for every row), None for the outputs without one."""
    ones, zeros = jnp.ones_like(like), jnp.zeros_like(like)
    return tuple((ones if j == i else zeros) if j in loss.differentiable else None for j in range(n_outputs))


def _output_tangents(loss: RowLoss, gblk: GradBlock, res, dz, n_outputs: int, consts):
    """Per row, ``sum_c (d out_i / d s_c)(ds_c / dz_c) dz_c`` for each output (0 for the others)."""
    out = []
    for i in range(n_outputs):
        if i not in loss.differentiable:
            out.append(jnp.zeros(dz.shape[:1], dz.dtype))
            continue
        g = loss.grad(gblk, res, _unit_cotangents(loss, n_outputs, i, dz[:, 0]), consts)
        ds = loss.transform_grad(gblk.s[0], g, 0, consts)
        out.append(jnp.sum(jnp.where(ds == 0, 0, ds * dz), axis=-1))
    return tuple(out)


def _tangent_pass(heads: tuple[Head, ...], valid, rows, cols, consts, st: Static, norm, res, tangents, n_outputs):
    """The outputs' tangents from head 0's ``(dh, dw, db)``, once the normalizers are known.

    One more streaming pass: per block the logits of every head and the
    tangent block ``dh W + h dW + db`` (one matmul per perturbed input), then
    :func:`_output_tangents`. Summed over vocabulary blocks and shards.
    """
    loss, (tb, vb), layouts = st
    t_total = heads[0].hidden.shape[0]
    v_local = vocab_size(heads[0], layouts[0])
    shard0 = _spmd.shard_col0(v_local, loss.vocab_axis)
    ct = acc_dtype(*(x for hd in heads for x in hd))
    dh_all = tangents[0]
    like = (heads, valid, rows, cols, norm, res, tangents)

    used = _grad_heads(loss, heads)

    def token_block(i, outs):
        t0, tfresh0 = clamped(i, tb, t_total)
        h_blks = [token_rows(hd.hidden, valid, t0, tb) for hd in used]
        dh_blk = None if dh_all is None else token_rows(dh_all, valid, t0, tb)
        sl = lambda x: slice_tree(x, t0, tb)  # noqa: E731
        rows_blk, norm_blk, res_blk = sl(rows), sl(norm), sl(res)

        def vocab_block(j, acc):
            v0, fresh0 = clamped(j, vb, v_local)
            fresh = _real(loss, v0 + shard0, vb, lax.broadcasted_iota(jnp.int32, (1, vb), 1) + v0 >= fresh0)
            w_blks, b_blks = head_blocks(used, v0, vb, layouts)
            s = block_logits(loss, h_blks, w_blks, b_blks, layouts, consts, ct)
            dz = jnp.where(fresh, _block_tangent(tangents, h_blks[0], w_blks[0], dh_blk, v0, vb, layouts[0], ct), 0)
            gblk = _grad_block(s, norm_blk, v0 + shard0, rows_blk, slice_tree(cols, v0, vb))
            terms = _output_tangents(loss, gblk, res_blk, dz, n_outputs, consts)
            return tuple(a + b for a, b in zip(acc, terms))

        init = _spmd.vary_like(tuple(jnp.zeros((tb,), ct) for _ in range(n_outputs)), *like)
        block_rows = lax.fori_loop(0, num_blocks(v_local, vb), vocab_block, init)
        # Rows repeated by a clamped last block keep the value written before.
        fresh_row = lax.broadcasted_iota(jnp.int32, (tb,), 0) + t0 >= tfresh0
        block_rows = tuple(
            jnp.where(fresh_row, x, lax.dynamic_slice_in_dim(o, t0, tb)) for o, x in zip(outs, block_rows)
        )
        return tuple(lax.dynamic_update_slice_in_dim(o, x, t0, 0) for o, x in zip(outs, block_rows))

    outs = _spmd.vary_like(tuple(jnp.zeros((t_total,), ct) for _ in range(n_outputs)), *like)
    d_out = lax.fori_loop(0, num_blocks(t_total, tb), token_block, outs)
    d_out = _sum_shards(loss, d_out, consts)
    return tuple(jnp.where(valid, o, 0) for o in d_out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def stream_jvp(heads, valid, rows_data, cols, consts, st: Static):
    """As :func:`stream_vjp`, with a forward-mode rule streaming head 0's tangent."""
    return _forward(heads, valid, rows_data, cols, consts, st)[0]


def _stream_jvp_rule(st: Static, primals, tangents):
    # The tangents come out of the same streaming pass as the outputs (one
    # more matmul per block and perturbed input) for a loss that streams
    # them, else out of one more pass (_tangent_pass). Rows, columns, consts
    # and the heads after the first are constants, as in the reverse rule.
    heads, valid, rows_data, cols, consts = primals
    zero = jax.custom_derivatives.SymbolicZero
    d_head0 = tangents[0][0]
    dh, dw, db = (None if t is None or isinstance(t, zero) else t for t in d_head0)
    if dh is None and dw is None and db is None:
        outputs = _forward(heads, valid, rows_data, cols, consts, st)[0]
        return outputs, tuple(jnp.zeros_like(o) for o in outputs)
    if st.loss.streams_tangents:
        outputs, _, d_out = _forward(heads, valid, rows_data, cols, consts, st, tangents=(dh, dw, db))
    else:
        outputs, (norm, res), _ = _forward(heads, valid, rows_data, cols, consts, st)
        d_out = _tangent_pass(heads, valid, rows_data, cols, consts, st, norm, res, (dh, dw, db), len(outputs))
    assert d_out is not None
    d_out = tuple(_spmd.vary_like(t, o) for t, o in zip(d_out, outputs))
    return outputs, d_out


stream_jvp.defjvp(_stream_jvp_rule, symbolic_zeros=True)

REVERSE_THROUGH_JVP = (0, 10)


def check_linearizable(*inputs, name: str = "linear_cross_entropy"):
    """Reverse mode through :func:`stream_jvp` needs jax >= 0.10: say so rather than fail inside JAX.

    Called by the public function on its inputs: under ``jax.grad``,
    ``jax.vjp`` or ``jax.linearize`` they are JVP tracers whose tangents are
    partial-evaluation tracers (``jax.interpreters.partial_eval.JaxprTracer``),
    and JAX 0.6.2 would fail
    with an ``AssertionError`` in its own transpose of the block loops.
    (Inside the jitted implementation every tracer looks alike, so the check
    is made before it; reverse mode applied outside another transformation,
    e.g. ``jax.grad(jax.vmap(f))``, is not seen and still fails in JAX.)
    """
    if _spmd.jax_version() >= REVERSE_THROUGH_JVP:
        return
    from jax.interpreters import partial_eval

    if any(isinstance(getattr(x, "tangent", None), partial_eval.JaxprTracer) for x in inputs):
        raise NotImplementedError(
            f"Reverse mode (jax.grad, jax.vjp, jax.linearize) through {name}(derivative='jvp') "
            f"needs jax >= 0.10, found jax {jax.__version__}: JAX's transpose of the streaming loops fails on "
            "older releases. Use derivative='vjp' (the default) for gradients; forward mode (jax.jvp, "
            "jax.jacfwd) works on this release."
        )


# --- whole rows of given logits (the logit-level functions) ---------------------------


def _whole_forward(z_heads, valid, rows_data, cols, consts, loss: RowLoss):
    ct = _validate.compute_dtype(z_heads[0].dtype)
    s = tuple(loss.transform(z.astype(ct), n, consts) for n, z in enumerate(z_heads))
    n_rows, width = z_heads[0].shape
    m, se, am, acc = _initial(loss, n_rows, ct, consts, False)
    col0 = _spmd.shard_col0(width, loss.vocab_axis)
    fresh = _real(loss, col0, width, jnp.ones((1, width), bool))
    m, se, am, acc = _online_step(loss, s, m, se, am, acc, fresh, col0, col0, rows_data, cols, consts, None)
    stats, acc = _stats(loss, m, se, am, acc, consts)
    norm = _norm(stats)
    run_pass = lambda r: _whole_pass(loss, s, norm, col0, r, cols, consts)  # noqa: E731
    second = _after_first_pass(loss, acc, stats, rows_data, valid, run_pass)
    outputs, res, _ = loss.finish(stats, acc, second, rows_data, cols, consts)
    outputs = tuple(jnp.where(valid, o, 0) for o in outputs)
    return outputs, s, (norm, res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def whole_vjp(z_heads, valid, rows_data, cols, consts, loss: RowLoss):
    """Per-row outputs of ``loss`` over given logits ``[N, V]`` (one per head)."""
    return _whole_forward(z_heads, valid, rows_data, cols, consts, loss)[0]


def _whole_fwd(z_heads, valid, rows_data, cols, consts, loss):
    outputs, _, (norm, res) = _whole_forward(z_heads, valid, rows_data, cols, consts, loss)
    # Residuals: the inputs (already live) and per-row sums; the backward
    # recomputes s and p in one fused elementwise pass.
    return outputs, (z_heads, valid, rows_data, cols, consts, norm, res)


def _whole_bwd(loss: RowLoss, saved, cts):
    z_heads, valid, rows_data, cols, consts, norm, res = saved
    ct = _validate.compute_dtype(z_heads[0].dtype)
    cts = _row_cotangents(loss, cts, valid, consts, ct)
    s = tuple(loss.transform(z.astype(ct), n, consts) for n, z in enumerate(z_heads))
    col0 = _spmd.shard_col0(z_heads[0].shape[1], loss.vocab_axis)
    ds = loss.grad(_grad_block(s, norm, col0, rows_data, cols), res, cts, consts)
    ds = _keep(jnp.where(valid[:, None], loss.transform_grad(s[0], ds, 0, consts), 0), _real(loss, col0, s[0].shape[1]))
    dz = ds.astype(z_heads[0].dtype)
    return (dz,) + tuple(None for _ in z_heads[1:]), None, None, None, None


whole_vjp.defvjp(_whole_fwd, _whole_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def whole_jvp(z_heads, valid, rows_data, cols, consts, loss: RowLoss):
    """As :func:`whole_vjp`, with a forward-mode rule derived from ``loss.grad`` (head 0's tangent)."""
    return _whole_forward(z_heads, valid, rows_data, cols, consts, loss)[0]


def _whole_jvp_rule(loss: RowLoss, primals, tangents):
    z_heads, valid, rows_data, cols, consts = primals
    outputs, s, (norm, res) = _whole_forward(z_heads, valid, rows_data, cols, consts, loss)
    dz = tangents[0][0]
    if dz is None or isinstance(dz, jax.custom_derivatives.SymbolicZero):
        return outputs, tuple(jnp.zeros_like(o) for o in outputs)
    ct = s[0].dtype
    col0 = _spmd.shard_col0(z_heads[0].shape[1], loss.vocab_axis)
    dz = _keep(jnp.where(valid[:, None], dz.astype(ct), 0), _real(loss, col0, dz.shape[1]))
    gblk = _grad_block(s, norm, col0, rows_data, cols)
    d_out = _sum_shards(loss, _output_tangents(loss, gblk, res, dz, len(outputs), consts), consts)
    d_out = tuple(_spmd.vary_like(jnp.where(valid, t, 0).astype(o.dtype), o) for t, o in zip(d_out, outputs))
    return outputs, d_out


whole_jvp.defjvp(_whole_jvp_rule, symbolic_zeros=True)


# --- scalar losses: the gradient in the forward pass -----------------------------------


class SumStatic(NamedTuple):
    loss: RowLoss
    token_block: int
    layouts: tuple[str, ...]
    n_aux: int = 0


def _total_forward(heads: tuple[Head, ...], valid, rows_data, cols, consts, st: SumStatic):
    loss, tb, layouts, _ = st
    h0, layout = heads[0], layouts[0]
    t_total, d = h0.hidden.shape
    ct = acc_dtype(*(x for hd in heads for x in hd))
    op = operand_dtype(h0)
    width = vocab_size(h0, layout)

    def body(i, carry):
        (total, denom, aux), dh, dw, db = carry
        t0, fresh0 = clamped(i, tb, t_total)
        sl = lambda x: slice_tree(x, t0, tb)  # noqa: E731
        ok = sl(valid) & (lax.broadcasted_iota(jnp.int32, (tb,), 0) + t0 >= fresh0)
        h_blks = [token_rows(hd.hidden, valid, t0, tb) for hd in heads]
        weights, biases = tuple(hd.weight for hd in heads), tuple(hd.bias for hd in heads)
        s = block_logits(loss, h_blks, weights, biases, layouts, consts, ct)
        m, se, am, acc = _initial(loss, tb, ct, consts, False)
        fresh = _real(loss, 0, width, jnp.ones((1, width), bool))
        rows_blk = sl(rows_data)
        m, se, am, acc = _online_step(loss, s, m, se, am, acc, fresh, 0, 0, rows_blk, cols, consts, None)
        stats, acc = _stats(loss, m, se, am, acc, consts)
        lse = _norm(stats)
        run_pass = lambda r: _whole_pass(loss, s, lse, 0, r, cols, consts)  # noqa: E731
        second = _after_first_pass(loss, acc, stats, rows_blk, sl(valid), run_pass)
        outputs, res, _ = loss.finish(stats, acc, second, rows_blk, cols, consts)
        value, norm, cts, row_aux = loss.scalar(outputs, rows_blk, consts)
        total = total + jnp.sum(jnp.where(ok, value, 0))
        denom = denom + jnp.sum(jnp.where(ok, norm, 0).astype(ct))
        aux = tuple(a + jnp.sum(jnp.where(ok, x, 0).astype(ct)) for a, x in zip(aux, row_aux))
        cts = tuple(None if g is None else jnp.where(ok, g, 0).astype(ct) for g in cts)
        gblk = _grad_block(s, lse, 0, rows_blk, cols)
        ds = loss.transform_grad(s[0], loss.grad(gblk, res, cts, consts), 0, consts)
        ds = _keep(jnp.where(ok[:, None], ds, 0), _real(loss, 0, width))
        w_contract = 1 if layout == "dv" else 0
        w = h0.weight
        dh_blk = lax.dot_general(ds.astype(op), w, (((1,), (w_contract,)), ((), ())), preferred_element_type=ct)
        dw = dw + h_t_times(h_t, h_blks[0], ds.astype(op), t0, tb, ct)
        # Rows repeated by a clamped last block keep the value written before.
        dh_blk = jnp.where(ok[:, None], dh_blk, lax.dynamic_slice_in_dim(dh, t0, tb))
        dh = lax.dynamic_update_slice_in_dim(dh, dh_blk, t0, 0)
        if db is not None:
            db = db + jnp.sum(ds, axis=0)
        return (total, denom, aux), dh, dw, db

    h_t = transposed(jnp.where(valid[:, None], h0.hidden, 0))
    zero = jnp.zeros((), ct)
    db0 = None if h0.bias is None else jnp.zeros(h0.bias.shape, ct)
    sums = (zero, zero, tuple(zero for _ in range(st.n_aux)))
    init = (sums, jnp.zeros((t_total, d), ct), jnp.zeros((d, width), ct), db0)
    init = _spmd.vary_like(init, heads, valid, rows_data, cols)
    sums, dh, dw, db = lax.fori_loop(0, num_blocks(t_total, tb), body, init)
    dh = jnp.where(valid[:, None], dh, 0).astype(h0.hidden.dtype)
    dw = dw if layout == "dv" else jnp.transpose(dw)
    grads = Head(dh, dw.astype(h0.weight.dtype), None if h0.bias is None else db.astype(h0.bias.dtype))
    return sums, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def single_pass_vjp(heads, valid, rows_data, cols, consts, st: SumStatic):
    """``(sum of values, sum of normalizers, sums of the aux terms)`` over the counted rows, for scalar losses."""
    return _total_forward(heads, valid, rows_data, cols, consts, st)[0]


def _total_fwd(heads, valid, rows_data, cols, consts, st):
    # The cotangent of a scalar loss only scales the gradient, so it is
    # formed here, in the same pass as the loss: 3 matmul passes per head 0
    # (logits, d_hidden, d_weight) instead of 4. The price is keeping d_W
    # (and d_hidden) alive until the backward pass, which the caller's
    # memory budget has to allow (sum_path_token_block).
    outputs, grads = _total_forward(heads, valid, rows_data, cols, consts, st)
    return outputs, (grads, heads[0])


def _total_bwd(st, saved, cts):
    grads, h0 = saved
    g = cts[0]  # the normalizer and the aux terms get no gradient

    # Scaled in float32: a bf16 cotangent (1 / count for "mean") would add two roundings.
    def scale(x):
        if x is None:
            return None
        ct = _validate.compute_dtype(x.dtype)
        return (x.astype(ct) * g.astype(ct)).astype(x.dtype)

    d_head0 = Head(*(_spmd.sum_to_type(scale(gr), x) for gr, x in zip(grads, h0)))  # type: ignore[arg-type]
    return (d_head0,) + tuple(None for _ in range(st.loss.heads - 1)), None, None, None, None


single_pass_vjp.defvjp(_total_fwd, _total_bwd)


# --- entry points ----------------------------------------------------------------------


def stream(
    loss: RowLoss,
    heads: tuple[Head, ...],
    valid,
    rows_data,
    cols,
    consts,
    layouts: tuple[str, ...],
    *,
    token_block: int | None,
    vocab_block: int | None,
    memory_budget: int,
    forward_mode: bool = False,
) -> tuple[jax.Array, ...]:
    """Per-row outputs through the streaming drivers, with blocks chosen from the budget.

    A symbolic token count (``jax.export``) cannot choose blocks from its
    size: the tokens are padded to a whole number of blocks (at least one
    padded row, which keeps every block slice provably in bounds); padded
    rows are not counted.
    """
    n = heads[0].hidden.shape[0]
    symbolic = not isinstance(n, int)
    if symbolic:
        tb = token_block or 1024
        pad = tb * (n // tb + 1) - n
        pad_rows = lambda x: jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))  # noqa: E731
        heads = tuple(hd._replace(hidden=pad_rows(hd.hidden)) for hd in heads)
        valid, rows_data = pad_rows(valid), jax.tree.map(pad_rows, rows_data)
        token_block = tb
    h0 = heads[0]
    blocks = choose_blocks(
        h0.hidden.shape[0],
        vocab_size(h0, layouts[0]),
        sum(hd.hidden.shape[1] for hd in heads),
        memory_budget,
        token_block,
        vocab_block,
        is_narrow_float(h0.weight.dtype),
        forward_mode,
        heads=len(heads),
    )
    driver = stream_jvp if forward_mode else stream_vjp
    outputs = cast(tuple[jax.Array, ...], driver(heads, valid, rows_data, cols, consts, Static(loss, blocks, layouts)))
    if symbolic:
        outputs = tuple(o[:n] for o in outputs)
    return outputs


def single_pass(
    loss: RowLoss,
    heads: tuple[Head, ...],
    valid,
    rows_data,
    cols,
    consts,
    layouts,
    token_block,
    memory_budget,
    n_aux: int = 0,
):
    """``(total, normalizer, aux)`` of a scalar loss through :func:`single_pass_vjp`, or None when its
    float32 ``d_W`` does not fit ``memory_budget``, the token count is symbolic, no token block
    holds a whole ``loss.row_group``, or the weight is narrower than the hidden states."""
    n, d = heads[0].hidden.shape
    group = loss.row_group
    if not isinstance(n, int) or n % group:
        return None
    vocab = vocab_size(heads[0], layouts[0])
    narrow = is_narrow_float(heads[0].hidden.dtype)
    if operand_dtype(heads[0]) != heads[0].weight.dtype:
        # A 16-bit weight with wider hidden states: the d_hidden products of
        # this path would read it whole in float32, a copy of its size. The
        # streaming path converts one block at a time.
        return None
    tb = sum_path_token_block(n, d, vocab, memory_budget, token_block, narrow, len(heads) - 1)
    if tb is None or tb < group:
        return None
    # Blocks of whole groups; the clamped last block (n - tb) then starts on a group too.
    tb = tb // group * group
    return single_pass_vjp(heads, valid, rows_data, cols, consts, SumStatic(loss, tb, layouts, n_aux))
