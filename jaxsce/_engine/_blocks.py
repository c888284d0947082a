"""Blocks of the streaming engine: the memory model, block slicing, the heads and their matmuls.

The engine (``_stream``) never builds a ``[tokens, V]`` logits array: it
reads ``[token_block, vocab_block]`` blocks of ``z = h W + b``. This module
says how large those blocks are for a memory budget (:func:`choose_blocks`,
:func:`sum_path_token_block`), how they are sliced (clamped, never padded;
16-bit data read behind a conditional on CPU), and forms each head's logits
block (:func:`block_logits`) and the gradient matmuls (:func:`grad_matmuls`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._base import _spmd, _validate


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


def clamped(i, size: int, total: int):
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


def slice_block(x, start, size: int, axis: int):
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
    # The never-taken branch carries the slice's sharding type (inside
    # shard_map(check_vma=True) both branches must vary over the same axes).
    empty = lambda x, start: _spmd.vary_like(jnp.zeros(shape, x.dtype), x, start)  # noqa: E731
    behind_cond = lambda x, start: lax.cond(start >= 0, plain, empty, x, start)  # noqa: E731
    return lax.platform_dependent(x, start, cpu=behind_cond, default=plain)


def token_rows(x, valid, start, size: int):
    """Rows ``start : start + size`` of ``x``, zero where the token is not counted.

    A masked token's hidden state may be NaN (padding); zeroing it keeps
    ``h^T @ ds`` from computing NaN * 0 into ``d_W``.
    """
    rows = slice_block(x, start, size, 0)
    return jnp.where(lax.dynamic_slice_in_dim(valid, start, size)[:, None], rows, jnp.zeros((), x.dtype))


def slice_tree(tree, start, size: int):
    """Rows ``start : start + size`` of every array of a pytree (along axis 0)."""
    return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, size), tree)


class Head(NamedTuple):
    """One linear head: ``z = hidden @ weight + bias`` (``weight`` ``[d, V]``, or ``[V, d]``)."""

    hidden: jax.Array
    weight: jax.Array
    bias: jax.Array | None = None


def vocab_size(head: Head, layout: str) -> int:
    return head.weight.shape[1] if layout == "dv" else head.weight.shape[0]


def slice_vocab(w, start, vb: int, layout: str):
    return slice_block(w, start, vb, 1 if layout == "dv" else 0)


def matmul(h, w_blk, layout: str, ct):
    dims = (((1,), (0,)), ((), ())) if layout == "dv" else (((1,), (1,)), ((), ()))
    return lax.dot_general(h, w_blk, dims, preferred_element_type=ct)


def logits_block(h, w_blk, b_blk, layout: str, ct):
    z = matmul(h, w_blk, layout, ct)
    if b_blk is not None:
        z = z + b_blk.astype(ct)[None, :]
    return z


def tangent_block(h_blk, w_blk, dh_blk, dw_blk, db_blk, layout: str, ct):
    """``dh_blk W_blk + h_blk dW_blk + db_blk``: the logits block's tangent (None terms skipped)."""
    dz = None
    if dh_blk is not None:
        dz = matmul(dh_blk, w_blk, layout, ct)
    if dw_blk is not None:
        term = matmul(h_blk, dw_blk, layout, ct)
        dz = term if dz is None else dz + term
    if db_blk is not None:
        term = jnp.broadcast_to(db_blk.astype(ct)[None, :], (h_blk.shape[0], db_blk.shape[0]))
        dz = term if dz is None else dz + term
    return dz


def transposed(h):
    """``h^T [d, T]``, made once (``T d`` is small next to ``d V``), or None.

    Not for 16-bit inputs: that dot form hit "Unsupported element type for
    DotThunk: BF16 x BF16 = F32" on XLA:CPU (jax 0.10.2) at small shapes.
    """
    return None if is_narrow_float(h.dtype) else jnp.transpose(h)


def h_t_times(h_t, h_blk, ds, t0, tb: int, ct):
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
    return jnp.matmul(slice_block(h_t, t0, tb, 1), ds, preferred_element_type=ct)


def head_blocks(heads, v0, vb: int, layouts):
    """Each head's weight and bias block for vocabulary columns ``v0 : v0 + vb``."""
    w_blks = tuple(slice_vocab(hd.weight, v0, vb, lay) for hd, lay in zip(heads, layouts))
    b_blks = tuple(None if hd.bias is None else lax.dynamic_slice_in_dim(hd.bias, v0, vb) for hd in heads)
    return w_blks, b_blks


def block_logits(loss, h_blks, w_blks, b_blks, layouts, consts, ct) -> tuple:
    """Every head's transformed logits block ``s_n = f_n(h_n W_n + b_n)``, in the compute dtype."""
    return tuple(
        loss.transform(logits_block(h, w, b, lay, ct), n, consts)
        for n, (h, w, b, lay) in enumerate(zip(h_blks, w_blks, b_blks, layouts))
    )


def grad_matmuls(ds_h, ds_w, h_blk, w_blk, layout: str, op, ct):
    """``(ds_h W_blk^T, h_blk^T ds_w)``: a block's share of ``d_hidden`` and its ``d_W`` block (in
    the weight's layout). ``ds_h`` and ``ds_w`` are the block's gradient with respect to its logits,
    masked as each product needs; operands in ``op`` (:func:`operand_dtype`: bf16 only when both
    hidden states and weight are 16-bit), accumulation in ``ct``."""
    ds_h, ds_w = ds_h.astype(op), ds_w.astype(op)
    if layout == "dv":
        dh = lax.dot_general(ds_h, w_blk, (((1,), (1,)), ((), ())), preferred_element_type=ct)
        dw = lax.dot_general(h_blk, ds_w, (((0,), (0,)), ((), ())), preferred_element_type=ct)
    else:
        dh = lax.dot_general(ds_h, w_blk, (((1,), (0,)), ((), ())), preferred_element_type=ct)
        dw = lax.dot_general(ds_w, h_blk, (((0,), (0,)), ((), ())), preferred_element_type=ct)
    return dh, dw
