"""The streaming engine under every fused loss: softmax rows that never exist whole.

A fused loss reads one or more linear heads, ``z_k = h_k W_k + b_k`` (one
``[T, V]`` matrix of logits each: the model's head, or a student's and a
teacher's), and is, per token, a function of a few sums over the rows of
``s_k = f_k(z_k)`` (``f_k``: soft cap, temperature). Here the logits only
ever exist as ``[token_block, vocab_block]`` blocks. A loss is a
:class:`RowLoss`, which says:

* what it sums per row while the vocabulary blocks stream by, beside the
  online log-sum-exp of every head that the engine keeps (``init``,
  ``accumulate``). Sums weighted by ``exp(s - m)`` are kept relative to the
  running max ``m`` and rescaled when it moves (:class:`Block` gives the
  factor);
* how the partial sums of vocabulary shards combine (``to_global``);
* how the sums give the per-row outputs and the residuals of the backward
  pass (``finish``);
* the backward's per-entry formula: the gradient with respect to head 0's
  ``s`` in a block, from the rows' cotangents (``grad``);
* for the single-pass path of scalar losses, each row's share of the total
  and of the mean's denominator and its cotangents (``scalar``).

The engine owns the rest: the loops, block slicing, the online max and sum
of exponentials, masking, the matmuls and the collectives. Its drivers:

* :func:`rows` (``custom_vjp``): a streaming forward (one matmul pass per
  head) and a backward that recomputes the logits blocks, vocabulary blocks
  outside, with two more matmul passes for ``d_hidden`` and ``d_W``;
* :func:`rows_jvp` (``custom_jvp``, forward mode): the streaming forward
  carrying the tangent of head 0 (cross-entropy only);
* :func:`total` (``custom_vjp``): scalar losses whose float32 ``d_W`` fits
  the memory budget. Token blocks of whole rows; the gradient is formed with
  the loss in the same pass (3 matmul passes for one head, not 4);
* :func:`whole_rows` (``custom_vjp``): the same formulas on given logits,
  the whole row as one block (the logit-level functions).

Gradients flow to head 0 only: the others (a distillation teacher) are
constants. 16-bit inputs on CPU: XLA:CPU moves no bf16 data natively; a
bf16 slice becomes convert, slice, convert, and the whole-array convert is
hoisted out of the loop (a float32 copy of the weight). Blocks are therefore
read behind a conditional on CPU (``_slice``). Blocks that do not divide the
sizes are not padded: the last block's start is clamped so it ends at the
edge, and the entries it shares with the previous block are masked out of
every sum.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

from . import _spmd, _validate
from ._targets import max_and_argmax, split_lse

# --- blocks ----------------------------------------------------------------------


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
    heads: int = 1,
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
    loop over the whole array). Each further head (a distillation teacher)
    adds its logits block and weight block: ``8 (Tb + d) Vb`` bytes.

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
    per_entry = (20 if forward_mode else 12) + 8 * (heads - 1)
    cap = 8192 if narrow_weight else 4096
    vb = vocab_block or max(128, min(cap, blocks_budget // (per_entry * (tb + d))) // 128 * 128)
    return Blocks(max(1, tb), max(1, min(vb, vocab)))


def sum_path_token_block(
    tokens: int,
    d: int,
    vocab: int,
    memory_budget: int,
    token_block=None,
    narrow_hidden: bool = False,
    other_heads: int = 0,
) -> int | None:
    """Token block for the single-pass path (:func:`total`), or None if it does not fit.

    Compiled temporaries (``memory_analysis`` on XLA:CPU, jax 0.10.2) are
    about ``4 d V`` bytes for the float32 ``d_W`` accumulator, ``4 T d`` for
    the transposed hidden states (float32) or the ``d_hidden`` accumulator
    (16-bit inputs), and per token of the ``[Tb, V]`` row block about 4
    bytes per logit for float32 and 5-8 for 16-bit inputs (5 and 6 are used),
    and 8 more per logit of each further head (``other_heads``). Token
    blocks are rounded down to multiples of 256 from 512 on (at
    8192 x 512 x 32768, float32: 896 tokens ran 9% slower than 1024), of 128
    from 256. Blocks under 32 tokens make poor matmuls: stream then.
    """
    left = memory_budget - 4 * d * vocab - 4 * tokens * d
    if left <= 0:
        return None
    if token_block:
        return min(token_block, tokens)
    tb = min(tokens, left // (((6 if narrow_hidden else 5) + 8 * other_heads) * vocab))
    if tb >= 512:
        tb = tb // 256 * 256
    elif tb >= 256:
        tb = tb // 128 * 128
    return tb if tb >= min(32, tokens) else None


def num_blocks(total, size: int):
    """``ceil(total / size)``, also for a symbolic ``total`` (``jax.export``)."""
    return (total + size - 1) // size


def _clamped(i, size: int, total: int):
    """Start of block ``i`` (clamped to end at ``total``) and its first fresh index."""
    nominal = i * size
    return jnp.minimum(nominal, total - size), nominal


def acc_dtype(*arrays):
    """float32 accumulation for 16-bit and float32 inputs; float64 stays float64."""
    dtypes = [x.dtype for x in arrays if x is not None]
    return _validate.compute_dtype(_validate.promote(*dtypes))


def operand_dtype(head) -> jnp.dtype:
    """The gradient matmuls' operand dtype: JAX's promotion of the head's hidden states and weight.

    A float32 operand means float32 products: with bf16 hidden states and a
    float32 weight, ``d_W = h^T ds`` keeps ``ds`` in float32 (as
    ``cross_entropy(h @ W)`` does) rather than rounding it to bf16.
    """
    return _validate.promote(head.hidden.dtype, head.weight.dtype)


def is_narrow_float(dtype) -> bool:
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
    if not is_narrow_float(x.dtype):
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


def _slice_tree(tree, start, size: int):
    """Rows ``start : start + size`` of every array of a pytree (along axis 0)."""
    return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, size), tree)


class Head(NamedTuple):
    """One linear head: ``z = hidden @ weight + bias`` (``weight`` ``[d, V]``, or ``[V, d]``)."""

    hidden: jax.Array
    weight: jax.Array
    bias: jax.Array | None = None


def _vocab_size(head: Head, layout: str) -> int:
    return head.weight.shape[1] if layout == "dv" else head.weight.shape[0]


def _slice_vocab(w, start, vb: int, layout: str):
    return _slice(w, start, vb, 1 if layout == "dv" else 0)


def _matmul(h, w_blk, layout: str, ct):
    dims = (((1,), (0,)), ((), ())) if layout == "dv" else (((1,), (1,)), ((), ()))
    return lax.dot_general(h, w_blk, dims, preferred_element_type=ct)


def _logits_block(h, w_blk, b_blk, layout: str, ct):
    z = _matmul(h, w_blk, layout, ct)
    if b_blk is not None:
        z = z + b_blk.astype(ct)[None, :]
    return z


def _tangent_block(h_blk, w_blk, dh_blk, dw_blk, db_blk, layout: str, ct):
    """``dh_blk W_blk + h_blk dW_blk + db_blk``: the logits block's tangent (None terms skipped)."""
    dz = None
    if dh_blk is not None:
        dz = _matmul(dh_blk, w_blk, layout, ct)
    if dw_blk is not None:
        term = _matmul(h_blk, dw_blk, layout, ct)
        dz = term if dz is None else dz + term
    if db_blk is not None:
        term = jnp.broadcast_to(db_blk.astype(ct)[None, :], (h_blk.shape[0], db_blk.shape[0]))
        dz = term if dz is None else dz + term
    return dz


def _transposed(h):
    """``h^T [d, T]``, made once (``T d`` is small next to ``d V``), or None.

    Not for 16-bit inputs: that dot form hit "Unsupported element type for
    DotThunk: BF16 x BF16 = F32" on XLA:CPU (jax 0.10.2) at small shapes.
    """
    return None if is_narrow_float(h.dtype) else jnp.transpose(h)


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


# --- the loss interface ------------------------------------------------------------


class Block(NamedTuple):
    """What a loss sees of one ``[Tb, Vb]`` block in the forward pass.

    Per head (tuples): ``s`` the transformed logits (stale columns included:
    mask them with ``fresh``); ``e = exp(s - m)`` with ``m`` the running max
    after this block (0 at stale columns); ``m`` that max (0 where no finite
    entry has been seen); ``rescale = exp(m_before - m)`` and ``shift =
    m_before - m`` (0 where nothing was seen before), to carry sums kept
    relative to the running max; ``se_before`` the sum of exponentials
    before this block, relative to ``m_before``.
    """

    s: tuple
    e: tuple
    m: tuple
    rescale: tuple
    shift: tuple
    se_before: tuple
    col0: Any  # global class index of the block's first column
    fresh_col0: Any  # global class index of its first column not counted by an earlier block
    fresh: jax.Array  # [1, Vb]: columns not counted by an earlier block
    rows: Any  # the token block's rows of the per-row data
    cols: Any  # the vocabulary block's columns of the per-class data
    ds: jax.Array | None  # forward mode: tangent of head 0's s (0 at stale columns)


class Stats(NamedTuple):
    """The engine's per-row statistics of every head, over all blocks and shards.

    Losses form their outputs from ``shift`` and ``log_se`` (``log p_c = (s_c
    - shift) - log_se``), never from the absolute ``lse``: at large logits
    ``shift + log_se`` rounds to the ulp of the logits, which would put that
    error into every log-probability.
    """

    m: tuple  # the row max (may be +-inf)
    se: tuple  # sum of exp(s - shift)
    lse: tuple  # log-sum-exp of s (shift + log_se)
    argmax: jax.Array | None  # head 0's first argmax (global class index), if asked for
    shift: tuple = ()  # the row max where finite, else 0
    log_se: tuple = ()  # log(se)


class Shards(NamedTuple):
    """What ``to_global`` needs to rescale per-shard sums: per head, the local
    and global (finite-safe) maxima, the local sum of exponentials, and
    ``scale = exp(m_local - m_global)``."""

    m_local: tuple
    m_global: tuple
    se_local: tuple
    scale: tuple


class GradBlock(NamedTuple):
    """What a loss sees of one block in the backward pass: per head ``s``, and
    ``log_p = (s - shift) - log_se`` and ``p = exp(log_p)`` formed relative to
    the row max; the rest as in :class:`Block`."""

    s: tuple
    p: tuple
    log_p: tuple
    col0: Any
    rows: Any
    cols: Any


class RowLoss:
    """A loss as per-row statistics of softmax rows; subclasses are hashable (static).

    ``consts`` (any pytree) holds the loss's traced parameters; ``rows``
    per-token data (arrays with the tokens as axis 0), ``cols`` per-class
    data (the vocabulary as axis 0). Neither gets a gradient.
    """

    heads: int = 1
    #: Indices of the outputs that carry cotangents.
    differentiable: tuple[int, ...] = (0,)
    #: Whether the loss needs a second pass over the blocks, once every
    #: head's log-sum-exp is known (``init2``/``accumulate2``); ``finish``
    #: then receives ``(sums, second-pass sums)`` as ``acc``.
    second_pass: bool = False
    #: Whether ``accumulate``/``finish`` carry forward-mode tangents themselves
    #: (from ``Block.ds``, in the forward pass). Otherwise forward mode is
    #: derived from ``grad``: a row's output tangent is ``sum_c (d out / d s_c)
    #: ds_c``, the per-entry gradient for a unit cotangent times the logits'
    #: tangent, formed in one more streaming pass once the normalizers are known.
    streams_tangents: bool = False

    def argmax(self, consts) -> bool:
        """Whether the engine should find head 0's argmax (static)."""
        return False

    def vocab_axis(self, consts):
        """The mesh axis splitting the vocabulary inside shard_map, or None (static)."""
        return None

    def unchecked(self, consts) -> bool:
        """Inside ``shard_map(check_vma=False)`` over the vocabulary axis (static)."""
        return False

    def transform(self, z, head: int, consts):
        """``s = f(z)`` for head ``head``."""
        return z

    def transform_grad(self, s, ds, head: int, consts):
        """``ds/dz`` applied to ``ds`` (elementwise), written in terms of ``s``."""
        return ds

    def init(self, tb, ct, consts, forward_mode: bool) -> tuple[tuple, tuple]:
        """Initial ``(sums, tangent sums)``, each a tuple of ``[tb]`` arrays."""
        raise NotImplementedError

    def accumulate(self, acc: tuple[tuple, tuple], blk: Block, consts) -> tuple[tuple, tuple]:
        raise NotImplementedError

    def to_global(self, acc: tuple[tuple, tuple], sh: Shards, consts) -> tuple[tuple, tuple]:
        """The shard's sums as shares of the global ones (summed by the engine)."""
        return acc

    def init2(self, tb, ct, consts) -> tuple:
        """Initial second-pass sums, a tuple of ``[tb]`` arrays (summed over blocks and shards)."""
        raise NotImplementedError

    def accumulate2(self, acc2: tuple, blk: GradBlock, fresh, consts) -> tuple:
        """Adds one block's terms; ``blk.p`` are normalized probabilities, ``fresh`` masks columns."""
        raise NotImplementedError

    def finish(self, stats: Stats, acc: tuple[tuple, tuple], rows, cols, consts):
        """``(outputs, residuals, output tangents or None)``: tuples of ``[T]`` arrays."""
        raise NotImplementedError

    def grad(self, blk: GradBlock, res: tuple, cts: tuple, consts):
        """``d(sum_o ct_o * output_o) / ds`` for head 0's block ``[Tb, Vb]``."""
        raise NotImplementedError

    def scalar(self, outputs: tuple, rows, consts):
        """``(value, normalizer, cotangents)`` per row for :func:`total`."""
        raise NotImplementedError


# --- the forward pass ----------------------------------------------------------------


def _online_step(k: RowLoss, s_heads, m, se, am, acc, fresh, col0, fresh_col0, rows, cols, consts, ds):
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
    acc = k.accumulate(acc, blk, consts)
    se = tuple(a * r + jnp.sum(x, axis=-1) for a, r, x in zip(se, rescale, e))
    return m_new, se, am, acc


def _initial(k: RowLoss, tb, ct, consts, forward_mode: bool):
    m = tuple(jnp.full((tb,), -jnp.inf, ct) for _ in range(k.heads))
    se = tuple(jnp.zeros((tb,), ct) for _ in range(k.heads))
    am = jnp.zeros((tb,), jnp.int32) if k.argmax(consts) else None
    return m, se, am, k.init(tb, ct, consts, forward_mode)


def _combine(k: RowLoss, m, se, am, acc, consts):
    """Per-row statistics over all vocabulary shards: one pmax, one psum of a few floats per row."""
    axis = k.vocab_axis(consts)
    if axis is None:
        return m, se, am, acc
    m_g = tuple(lax.pmax(x, axis) for x in m)
    m_gs = tuple(jnp.where(jnp.isfinite(x), x, 0) for x in m_g)
    if am is not None:
        am = lax.pmin(jnp.where(m[0] == m_g[0], am, jnp.iinfo(jnp.int32).max), axis)
    scale = tuple(jnp.exp(a - b) for a, b in zip(m, m_gs))
    m_ls = tuple(jnp.where(jnp.isfinite(x), x, 0) for x in m)
    primal, tangent = k.to_global(acc, Shards(m_ls, m_gs, se, scale), consts)
    summed = _spmd.psum_tuple(*(a * b for a, b in zip(se, scale)), *primal, axis_name=axis)
    se, primal = summed[: k.heads], summed[k.heads :]
    if tangent:
        # A separate psum: when JAX linearizes a forward-mode rule (reverse
        # mode through derivative="jvp") the primal sums must not wait on
        # tangent values.
        tangent = _spmd.psum_tuple(*tangent, axis_name=axis)
    return m_g, tuple(se), am, (tuple(primal), tuple(tangent))


def _stats(k: RowLoss, m, se, am, acc, consts):
    m, se, am, acc = _combine(k, m, se, am, acc, consts)
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


def _sum_shards(k: RowLoss, acc2, consts):
    axis = k.vocab_axis(consts)
    return acc2 if axis is None else _spmd.psum_tuple(*acc2, axis_name=axis)


def _whole_second_pass(k: RowLoss, s, stats: Stats, acc, col0, rows_data, cols, consts):
    """``acc`` as ``finish`` takes it, for a block holding whole (local) rows."""
    if not k.second_pass:
        return acc
    ct = s[0].dtype
    gblk = _grad_block(s, _norm(stats), col0, rows_data, cols)
    fresh = jnp.ones((1, s[0].shape[1]), bool)
    acc2 = k.accumulate2(k.init2(s[0].shape[0], ct, consts), gblk, fresh, consts)
    return acc, _sum_shards(k, acc2, consts)


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
    k, (tb, vb), layouts = st
    t_total = heads[0].hidden.shape[0]
    v_local = _vocab_size(heads[0], layouts[0])
    shard0 = _spmd.shard_col0(v_local, k.vocab_axis(consts))
    ct = acc_dtype(*(x for hd in heads for x in hd))
    dh_all, dw_all, db_all = tangents if tangents is not None else (None, None, None)
    like = (heads, valid, rows, cols, tangents)

    def token_block(i, outs):
        t0, _ = _clamped(i, tb, t_total)
        h_blks = [_token_rows(hd.hidden, valid, t0, tb) for hd in heads]
        dh_blk = None if dh_all is None else _token_rows(dh_all, valid, t0, tb)
        rows_blk = _slice_tree(rows, t0, tb)

        def vocab_block(j, carry):
            m, se, am, acc = carry
            v0, fresh0 = _clamped(j, vb, v_local)
            fresh = lax.broadcasted_iota(jnp.int32, (1, vb), 1) + v0 >= fresh0
            s_heads, w_blks = [], []
            for n, (hd, h_blk, layout) in enumerate(zip(heads, h_blks, layouts)):
                w_blk = _slice_vocab(hd.weight, v0, vb, layout)
                b_blk = None if hd.bias is None else lax.dynamic_slice_in_dim(hd.bias, v0, vb)
                s_heads.append(k.transform(_logits_block(h_blk, w_blk, b_blk, layout, ct), n, consts))
                w_blks.append(w_blk)
            ds = None
            if tangents is not None:
                dw_blk = None if dw_all is None else _slice_vocab(dw_all, v0, vb, layouts[0])
                db_blk = None if db_all is None else lax.dynamic_slice_in_dim(db_all, v0, vb)
                dz = _tangent_block(h_blks[0], w_blks[0], dh_blk, dw_blk, db_blk, layouts[0], ct)
                assert dz is not None  # the rule handles "nothing perturbed" before streaming
                ds = jnp.where(fresh, k.transform_grad(s_heads[0], dz, 0, consts), 0)
            cols_blk = _slice_tree(cols, v0, vb)
            col0 = v0 + shard0
            return _online_step(
                k, s_heads, m, se, am, acc, fresh, col0, fresh0 + shard0, rows_blk, cols_blk, consts, ds
            )

        init = _spmd.vary_like(_initial(k, tb, ct, consts, tangents is not None), *like)
        block_rows = lax.fori_loop(0, num_blocks(v_local, vb), vocab_block, init)
        return jax.tree.map(lambda o, x: lax.dynamic_update_slice_in_dim(o, x, t0, 0), outs, block_rows)

    outs = _spmd.vary_like(_initial(k, t_total, ct, consts, tangents is not None), *like)
    m, se, am, acc = lax.fori_loop(0, num_blocks(t_total, tb), token_block, outs)
    stats, acc = _stats(k, m, se, am, acc, consts)
    if k.second_pass:
        acc = acc, _second_pass(heads, valid, rows, cols, consts, st, _norm(stats))
    outputs, res, d_out = k.finish(stats, acc, rows, cols, consts)
    outputs = tuple(jnp.where(valid, o, 0) for o in outputs)
    if d_out is not None:
        d_out = tuple(jnp.where(valid, o, 0) for o in d_out)
    return outputs, (_norm(stats), res), d_out


def _second_pass(heads: tuple[Head, ...], valid, rows, cols, consts, st: Static, norm):
    """The loss's second-pass sums over all blocks, every head's normalizer known (one more matmul pass)."""
    k, (tb, vb), layouts = st
    t_total = heads[0].hidden.shape[0]
    v_local = _vocab_size(heads[0], layouts[0])
    shard0 = _spmd.shard_col0(v_local, k.vocab_axis(consts))
    ct = acc_dtype(*(x for hd in heads for x in hd))
    like = (heads, valid, rows, cols, norm)

    def token_block(i, outs):
        t0, _ = _clamped(i, tb, t_total)
        h_blks = [_token_rows(hd.hidden, valid, t0, tb) for hd in heads]
        rows_blk, norm_blk = _slice_tree(rows, t0, tb), _slice_tree(norm, t0, tb)

        def vocab_block(j, acc2):
            v0, fresh0 = _clamped(j, vb, v_local)
            fresh = lax.broadcasted_iota(jnp.int32, (1, vb), 1) + v0 >= fresh0
            s = []
            for n, (hd, h_blk, layout) in enumerate(zip(heads, h_blks, layouts)):
                w_blk = _slice_vocab(hd.weight, v0, vb, layout)
                b_blk = None if hd.bias is None else lax.dynamic_slice_in_dim(hd.bias, v0, vb)
                s.append(k.transform(_logits_block(h_blk, w_blk, b_blk, layout, ct), n, consts))
            gblk = _grad_block(s, norm_blk, v0 + shard0, rows_blk, _slice_tree(cols, v0, vb))
            return k.accumulate2(acc2, gblk, fresh, consts)

        init = _spmd.vary_like(k.init2(tb, ct, consts), *like)
        block_rows = lax.fori_loop(0, num_blocks(v_local, vb), vocab_block, init)
        return jax.tree.map(lambda o, x: lax.dynamic_update_slice_in_dim(o, x, t0, 0), outs, block_rows)

    outs = _spmd.vary_like(k.init2(t_total, ct, consts), *like)
    return _sum_shards(k, lax.fori_loop(0, num_blocks(t_total, tb), token_block, outs), consts)


# --- reverse mode: custom_vjp ----------------------------------------------------------


def _row_cotangents(k: RowLoss, cts, valid, consts, ct):
    picked = tuple(cts[i] for i in k.differentiable)
    picked = _spmd.row_cotangents(*picked, axis_name=k.vocab_axis(consts), is_unchecked=k.unchecked(consts))
    picked = tuple(jnp.where(valid, g, 0).astype(ct) for g in picked)
    return tuple(picked[k.differentiable.index(i)] if i in k.differentiable else None for i in range(len(cts)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def rows(heads, valid, rows_data, cols, consts, st: Static):
    """Per-row outputs of ``st.loss`` over the heads' logits, streamed; reverse mode."""
    return _forward(heads, valid, rows_data, cols, consts, st)[0]


def _rows_fwd(heads, valid, rows_data, cols, consts, st):
    outputs, (norm, res), _ = _forward(heads, valid, rows_data, cols, consts, st)
    return outputs, (heads, valid, rows_data, cols, consts, norm, res)


def _rows_bwd(st: Static, saved, cts):
    k, (tb, vb), layouts = st
    heads, valid, rows_data, cols, consts, norm, res = saved
    h0 = heads[0]
    t_total, d = h0.hidden.shape
    v_local = _vocab_size(h0, layouts[0])
    shard0 = _spmd.shard_col0(v_local, k.vocab_axis(consts))
    ct = acc_dtype(*(x for hd in heads for x in hd))
    cts = _row_cotangents(k, cts, valid, consts, ct)
    like = (heads, valid, rows_data, cols, norm, res, cts)
    layout = layouts[0]
    op = operand_dtype(h0)

    def vocab_block(j, carry):
        dh, dw, db = carry
        v0, fresh0 = _clamped(j, vb, v_local)
        fresh_col = lax.broadcasted_iota(jnp.int32, (1, vb), 1) + v0 >= fresh0
        w_blks = [_slice_vocab(hd.weight, v0, vb, lay) for hd, lay in zip(heads, layouts)]
        b_blks = [None if hd.bias is None else lax.dynamic_slice_in_dim(hd.bias, v0, vb) for hd in heads]
        cols_blk = _slice_tree(cols, v0, vb)

        def token_block(i, inner):
            dh, dw_acc, db_acc = inner
            t0, tfresh0 = _clamped(i, tb, t_total)
            fresh_row = lax.broadcasted_iota(jnp.int32, (tb,), 0) + t0 >= tfresh0
            sl = lambda x: _slice_tree(x, t0, tb)  # noqa: E731
            h_blks = [_token_rows(hd.hidden, valid, t0, tb) for hd in heads]
            s = tuple(
                k.transform(_logits_block(h, w, b, lay, ct), n, consts)
                for n, (h, w, b, lay) in enumerate(zip(h_blks, w_blks, b_blks, layouts))
            )
            ok = sl(valid) & fresh_row
            blk_cts = tuple(None if g is None else jnp.where(fresh_row, sl(g), 0) for g in cts)
            gblk = _grad_block(s, sl(norm), v0 + shard0, sl(rows_data), cols_blk)
            ds = k.transform_grad(s[0], k.grad(gblk, sl(res), blk_cts, consts), 0, consts)
            # Rows not counted (masked, ignored, or repeated by a clamped
            # block) contribute exactly 0, even if their hidden state is NaN.
            ds = jnp.where(ok[:, None], ds, 0)
            h_blk = h_blks[0]
            # The matmul operands are in JAX's promoted dtype of the head:
            # bf16 only when both hidden and weight are 16-bit.
            ds_c = ds.astype(op)
            # Columns shared with the previous block: already in d_hidden.
            ds_h = jnp.where(fresh_col, ds, 0).astype(op)
            if layout == "dv":
                dh_blk = lax.dot_general(ds_h, w_blks[0], (((1,), (1,)), ((), ())), preferred_element_type=ct)
                dw_acc = dw_acc + lax.dot_general(h_blk, ds_c, (((0,), (0,)), ((), ())), preferred_element_type=ct)
            else:
                dh_blk = lax.dot_general(ds_h, w_blks[0], (((1,), (0,)), ((), ())), preferred_element_type=ct)
                dw_acc = dw_acc + lax.dot_general(ds_c, h_blk, (((0,), (0,)), ((), ())), preferred_element_type=ct)
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
    axis_name = k.vocab_axis(consts)
    if axis_name is not None and not k.unchecked(consts):
        # Each shard holds its vocabulary's share. (Under check_vma=False JAX
        # itself sums the input cotangents over the axes hidden is replicated on.)
        dh = lax.psum(dh, axis_name)
    dh = jnp.where(valid[:, None], dh, 0).astype(h0.hidden.dtype)
    d_head0 = Head(*(_spmd.sum_to_type(g, x) for g, x in ((dh, h0.hidden), (dw, h0.weight), (db, h0.bias))))  # type: ignore[arg-type]
    d_heads = (d_head0,) + tuple(None for _ in heads[1:])
    return d_heads, None, None, None, None


rows.defvjp(_rows_fwd, _rows_bwd)


# --- forward mode: custom_jvp ----------------------------------------------------------


def _unit_cotangents(k: RowLoss, n_outputs: int, i: int, like):
    """Cotangents selecting output ``i`` (1 for every row), None for the outputs without one."""
    ones, zeros = jnp.ones_like(like), jnp.zeros_like(like)
    return tuple((ones if j == i else zeros) if j in k.differentiable else None for j in range(n_outputs))


def _output_tangents(k: RowLoss, gblk: GradBlock, res, dz, n_outputs: int, consts):
    """Per row, ``sum_c (d out_i / d s_c)(ds_c / dz_c) dz_c`` for each output (0 for the others)."""
    out = []
    for i in range(n_outputs):
        if i not in k.differentiable:
            out.append(jnp.zeros(dz.shape[:1], dz.dtype))
            continue
        g = k.grad(gblk, res, _unit_cotangents(k, n_outputs, i, dz[:, 0]), consts)
        ds = k.transform_grad(gblk.s[0], g, 0, consts)
        out.append(jnp.sum(jnp.where(ds == 0, 0, ds * dz), axis=-1))
    return tuple(out)


def _tangent_pass(heads: tuple[Head, ...], valid, rows, cols, consts, st: Static, norm, res, tangents, n_outputs):
    """The outputs' tangents from head 0's ``(dh, dw, db)``, once the normalizers are known.

    One more streaming pass: per block the logits of every head and the
    tangent block ``dh W + h dW + db`` (one matmul per perturbed input), then
    :func:`_output_tangents`. Summed over vocabulary blocks and shards.
    """
    k, (tb, vb), layouts = st
    t_total = heads[0].hidden.shape[0]
    v_local = _vocab_size(heads[0], layouts[0])
    shard0 = _spmd.shard_col0(v_local, k.vocab_axis(consts))
    ct = acc_dtype(*(x for hd in heads for x in hd))
    dh_all, dw_all, db_all = tangents
    like = (heads, valid, rows, cols, norm, res, tangents)

    def token_block(i, outs):
        t0, tfresh0 = _clamped(i, tb, t_total)
        h_blks = [_token_rows(hd.hidden, valid, t0, tb) for hd in heads]
        dh_blk = None if dh_all is None else _token_rows(dh_all, valid, t0, tb)
        sl = lambda x: _slice_tree(x, t0, tb)  # noqa: E731
        rows_blk, norm_blk, res_blk = sl(rows), sl(norm), sl(res)

        def vocab_block(j, acc):
            v0, fresh0 = _clamped(j, vb, v_local)
            fresh = lax.broadcasted_iota(jnp.int32, (1, vb), 1) + v0 >= fresh0
            s, w_blks = [], []
            for n, (hd, h_blk, layout) in enumerate(zip(heads, h_blks, layouts)):
                w_blk = _slice_vocab(hd.weight, v0, vb, layout)
                b_blk = None if hd.bias is None else lax.dynamic_slice_in_dim(hd.bias, v0, vb)
                s.append(k.transform(_logits_block(h_blk, w_blk, b_blk, layout, ct), n, consts))
                w_blks.append(w_blk)
            dw_blk = None if dw_all is None else _slice_vocab(dw_all, v0, vb, layouts[0])
            db_blk = None if db_all is None else lax.dynamic_slice_in_dim(db_all, v0, vb)
            dz = _tangent_block(h_blks[0], w_blks[0], dh_blk, dw_blk, db_blk, layouts[0], ct)
            assert dz is not None  # the rule handles "nothing perturbed" before streaming
            dz = jnp.where(fresh, dz, 0)
            gblk = _grad_block(s, norm_blk, v0 + shard0, rows_blk, _slice_tree(cols, v0, vb))
            terms = _output_tangents(k, gblk, res_blk, dz, n_outputs, consts)
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
    d_out = _sum_shards(k, d_out, consts)
    return tuple(jnp.where(valid, o, 0) for o in d_out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def rows_jvp(heads, valid, rows_data, cols, consts, st: Static):
    """As :func:`rows`, with a forward-mode rule streaming head 0's tangent."""
    return _forward(heads, valid, rows_data, cols, consts, st)[0]


def _rows_jvp_rule(st: Static, primals, tangents):
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


rows_jvp.defjvp(_rows_jvp_rule, symbolic_zeros=True)

REVERSE_THROUGH_JVP = (0, 10)


def check_linearizable(*inputs, name: str = "linear_cross_entropy"):
    """Reverse mode through :func:`rows_jvp` needs jax >= 0.10: say so rather than fail inside JAX.

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


def _whole_forward(z_heads, valid, rows_data, cols, consts, k: RowLoss):
    ct = _validate.compute_dtype(z_heads[0].dtype)
    s = tuple(k.transform(z.astype(ct), n, consts) for n, z in enumerate(z_heads))
    n_rows, width = z_heads[0].shape
    m, se, am, acc = _initial(k, n_rows, ct, consts, False)
    fresh = jnp.ones((1, width), bool)
    col0 = _spmd.shard_col0(width, k.vocab_axis(consts))
    m, se, am, acc = _online_step(k, s, m, se, am, acc, fresh, col0, col0, rows_data, cols, consts, None)
    stats, acc = _stats(k, m, se, am, acc, consts)
    acc = _whole_second_pass(k, s, stats, acc, col0, rows_data, cols, consts)
    outputs, res, _ = k.finish(stats, acc, rows_data, cols, consts)
    outputs = tuple(jnp.where(valid, o, 0) for o in outputs)
    return outputs, s, (_norm(stats), res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def whole_rows(z_heads, valid, rows_data, cols, consts, k: RowLoss):
    """Per-row outputs of ``k`` over given logits ``[N, V]`` (one per head)."""
    return _whole_forward(z_heads, valid, rows_data, cols, consts, k)[0]


def _whole_fwd(z_heads, valid, rows_data, cols, consts, k):
    outputs, _, (norm, res) = _whole_forward(z_heads, valid, rows_data, cols, consts, k)
    # Residuals: the inputs (already live) and per-row sums; the backward
    # recomputes s and p in one fused elementwise pass.
    return outputs, (z_heads, valid, rows_data, cols, consts, norm, res)


def _whole_bwd(k: RowLoss, saved, cts):
    z_heads, valid, rows_data, cols, consts, norm, res = saved
    ct = _validate.compute_dtype(z_heads[0].dtype)
    cts = _row_cotangents(k, cts, valid, consts, ct)
    s = tuple(k.transform(z.astype(ct), n, consts) for n, z in enumerate(z_heads))
    col0 = _spmd.shard_col0(z_heads[0].shape[1], k.vocab_axis(consts))
    ds = k.grad(_grad_block(s, norm, col0, rows_data, cols), res, cts, consts)
    dz = jnp.where(valid[:, None], k.transform_grad(s[0], ds, 0, consts), 0).astype(z_heads[0].dtype)
    return (dz,) + tuple(None for _ in z_heads[1:]), None, None, None, None


whole_rows.defvjp(_whole_fwd, _whole_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def whole_rows_jvp(z_heads, valid, rows_data, cols, consts, k: RowLoss):
    """As :func:`whole_rows`, with a forward-mode rule derived from ``k.grad`` (head 0's tangent)."""
    return _whole_forward(z_heads, valid, rows_data, cols, consts, k)[0]


def _whole_jvp_rule(k: RowLoss, primals, tangents):
    z_heads, valid, rows_data, cols, consts = primals
    outputs, s, (norm, res) = _whole_forward(z_heads, valid, rows_data, cols, consts, k)
    dz = tangents[0][0]
    if dz is None or isinstance(dz, jax.custom_derivatives.SymbolicZero):
        return outputs, tuple(jnp.zeros_like(o) for o in outputs)
    ct = s[0].dtype
    dz = jnp.where(valid[:, None], dz.astype(ct), 0)
    col0 = _spmd.shard_col0(z_heads[0].shape[1], k.vocab_axis(consts))
    gblk = _grad_block(s, norm, col0, rows_data, cols)
    d_out = _sum_shards(k, _output_tangents(k, gblk, res, dz, len(outputs), consts), consts)
    d_out = tuple(_spmd.vary_like(jnp.where(valid, t, 0).astype(o.dtype), o) for t, o in zip(d_out, outputs))
    return outputs, d_out


whole_rows_jvp.defjvp(_whole_jvp_rule, symbolic_zeros=True)


# --- scalar losses: the gradient in the forward pass -----------------------------------


class SumStatic(NamedTuple):
    loss: RowLoss
    token_block: int
    layouts: tuple[str, ...]


def _total_forward(heads: tuple[Head, ...], valid, rows_data, cols, consts, st: SumStatic):
    k, tb, layouts = st
    h0, layout = heads[0], layouts[0]
    t_total, d = h0.hidden.shape
    ct = acc_dtype(*(x for hd in heads for x in hd))
    op = operand_dtype(h0)
    width = _vocab_size(h0, layout)

    def body(i, carry):
        total, denom, dh, dw, db = carry
        t0, fresh0 = _clamped(i, tb, t_total)
        sl = lambda x: _slice_tree(x, t0, tb)  # noqa: E731
        ok = sl(valid) & (lax.broadcasted_iota(jnp.int32, (tb,), 0) + t0 >= fresh0)
        h_blks = [_token_rows(hd.hidden, valid, t0, tb) for hd in heads]
        s = [
            k.transform(_logits_block(h, hd.weight, hd.bias, lay, ct), n, consts)
            for n, (h, hd, lay) in enumerate(zip(h_blks, heads, layouts))
        ]
        m, se, am, acc = _initial(k, tb, ct, consts, False)
        fresh = jnp.ones((1, width), bool)
        rows_blk = sl(rows_data)
        m, se, am, acc = _online_step(k, s, m, se, am, acc, fresh, 0, 0, rows_blk, cols, consts, None)
        stats, acc = _stats(k, m, se, am, acc, consts)
        acc = _whole_second_pass(k, s, stats, acc, 0, rows_blk, cols, consts)
        outputs, res, _ = k.finish(stats, acc, rows_blk, cols, consts)
        value, norm, cts = k.scalar(outputs, rows_blk, consts)
        total = total + jnp.sum(jnp.where(ok, value, 0))
        denom = denom + jnp.sum(jnp.where(ok, norm, 0).astype(ct))
        cts = tuple(None if g is None else jnp.where(ok, g, 0).astype(ct) for g in cts)
        gblk = _grad_block(s, _norm(stats), 0, rows_blk, cols)
        ds = k.transform_grad(s[0], k.grad(gblk, res, cts, consts), 0, consts)
        ds = jnp.where(ok[:, None], ds, 0)
        w_contract = 1 if layout == "dv" else 0
        w = h0.weight
        dh_blk = lax.dot_general(ds.astype(op), w, (((1,), (w_contract,)), ((), ())), preferred_element_type=ct)
        dw = dw + _h_t_times(h_t, h_blks[0], ds.astype(op), t0, tb, ct)
        # Rows repeated by a clamped last block keep the value written before.
        dh_blk = jnp.where(ok[:, None], dh_blk, lax.dynamic_slice_in_dim(dh, t0, tb))
        dh = lax.dynamic_update_slice_in_dim(dh, dh_blk, t0, 0)
        if db is not None:
            db = db + jnp.sum(ds, axis=0)
        return total, denom, dh, dw, db

    h_t = _transposed(jnp.where(valid[:, None], h0.hidden, 0))
    zero = jnp.zeros((), ct)
    db0 = None if h0.bias is None else jnp.zeros(h0.bias.shape, ct)
    init = (zero, zero, jnp.zeros((t_total, d), ct), jnp.zeros((d, width), ct), db0)
    init = _spmd.vary_like(init, heads, valid, rows_data, cols)
    total, denom, dh, dw, db = lax.fori_loop(0, num_blocks(t_total, tb), body, init)
    dh = jnp.where(valid[:, None], dh, 0).astype(h0.hidden.dtype)
    dw = dw if layout == "dv" else jnp.transpose(dw)
    grads = Head(dh, dw.astype(h0.weight.dtype), None if h0.bias is None else db.astype(h0.bias.dtype))
    return (total, denom), grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def total(heads, valid, rows_data, cols, consts, st: SumStatic):
    """``(sum of values, sum of normalizers)`` over the counted rows, for scalar losses."""
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
    g, _ = cts

    # Scaled in float32: a bf16 cotangent (1 / count for "mean") would add two roundings.
    def scale(x):
        if x is None:
            return None
        ct = _validate.compute_dtype(x.dtype)
        return (x.astype(ct) * g.astype(ct)).astype(x.dtype)

    d_head0 = Head(*(_spmd.sum_to_type(scale(gr), x) for gr, x in zip(grads, h0)))  # type: ignore[arg-type]
    return (d_head0,) + tuple(None for _ in range(st.loss.heads - 1)), None, None, None, None


total.defvjp(_total_fwd, _total_bwd)


# --- entry points ----------------------------------------------------------------------


def stream(
    k: RowLoss,
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
        _vocab_size(h0, layouts[0]),
        sum(hd.hidden.shape[1] for hd in heads),
        memory_budget,
        token_block,
        vocab_block,
        is_narrow_float(h0.weight.dtype),
        forward_mode,
        heads=len(heads),
    )
    driver = rows_jvp if forward_mode else rows
    outputs = cast(tuple[jax.Array, ...], driver(heads, valid, rows_data, cols, consts, Static(k, blocks, layouts)))
    if symbolic:
        outputs = tuple(o[:n] for o in outputs)
    return outputs


def single_pass(
    k: RowLoss, heads: tuple[Head, ...], valid, rows_data, cols, consts, layouts, token_block, memory_budget
):
    """``(total, normalizer)`` of a scalar loss through :func:`total`, or None when
    its float32 ``d_W`` does not fit ``memory_budget`` (or the token count is symbolic)."""
    n, d = heads[0].hidden.shape
    if not isinstance(n, int):
        return None
    vocab = _vocab_size(heads[0], layouts[0])
    narrow = is_narrow_float(heads[0].hidden.dtype)
    if operand_dtype(heads[0]) != heads[0].weight.dtype:
        # A 16-bit weight with wider hidden states: the d_hidden products
        # read it in float32, a copy of its size.
        memory_budget -= 4 * d * vocab
    tb = sum_path_token_block(n, d, vocab, memory_budget, token_block, narrow, len(heads) - 1)
    if tb is None:
        return None
    return total(heads, valid, rows_data, cols, consts, SumStatic(k, tb, layouts))
