"""The streaming engine's contract, exercised by losses defined here (``docs/extending.md``).

``WeightedLabelLogProb`` (one pass) and ``SecondPassEntropy`` (a second pass
once the normalizer is known) are not jaxsce losses: each is one small
:class:`~jaxsce._engine._rowloss.RowLoss`, run through every driver (logit level,
streamed, single pass, forward mode, vocabulary-sharded in both ``check_vma``
modes) and compared with float64 NumPy formulas of its definition.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from reference import np_log_softmax

from jaxsce._api import _front
from jaxsce._engine import _rowloss, _stream
from jaxsce._engine._targets import block_hits, label_entry


class LabelSum(NamedTuple):
    label: jax.Array  # s_y, added by the block that owns the label's column


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightedLabelLogProb(_stream.RowLoss):
    """``w_n log p(y_n)``: ``rows = (labels, weights)``; gradient ``w (e_y - p)``."""

    def init(self, tb, ct, consts, forward_mode):
        return _stream.Acc(LabelSum(jnp.zeros((tb,), ct)))

    def accumulate(self, acc, blk, consts):
        y, _ = blk.rows
        owns = (y >= blk.fresh_col0) & (y < blk.col0 + blk.s[0].shape[1])
        return _stream.Acc(LabelSum(acc.sums.label + jnp.where(owns, label_entry(blk.s[0], y, blk.col0), 0)))

    def finish(self, stats, acc, second, rows, cols, consts):
        _, w = rows
        log_p = (acc.sums.label - stats.shift[0]) - stats.log_se[0]
        return (w * log_p,), (), None

    def grad(self, blk, res, cts, consts):
        y, w = blk.rows
        g = (cts[0] * w)[:, None]
        return jnp.where(block_hits(y, blk.col0, blk.p[0].shape[1]), g, 0) - blk.p[0] * g


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecondPassEntropy(_stream.RowLoss):
    """``H = -sum_c p_c log p_c`` summed in a second pass; gradient ``-p (log p + H)``."""

    second_pass = True

    def init(self, tb, ct, consts, forward_mode):
        return _stream.Acc(())

    def accumulate(self, acc, blk, consts):
        return acc

    def init2(self, tb, ct, consts):
        return (jnp.zeros((tb,), ct),)

    def accumulate2(self, acc2, blk, fresh, consts):
        p, log_p = blk.p[0], blk.log_p[0]
        return (acc2[0] + jnp.sum(jnp.where(fresh & (p > 0), p * log_p, 0), axis=-1),)

    def finish(self, stats, acc, second, rows, cols, consts):
        h = -second[0]
        return (h,), (h,), None

    def grad(self, blk, res, cts, consts):
        (h,) = res
        p, log_p = blk.p[0], blk.log_p[0]
        return -cts[0][:, None] * jnp.where(p > 0, p * (log_p + h[:, None]), 0)


T, D, V = 19, 6, 40
LOSSES = {"label": WeightedLabelLogProb, "entropy": SecondPassEntropy}


def _data(seed=0):
    rng = np.random.default_rng(seed)
    h, w, b = (jnp.asarray(rng.normal(size=s)) for s in ((T, D), (D, V), (V,)))
    y = jnp.asarray(rng.integers(0, V, T), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, T))
    valid = jnp.asarray(np.arange(T) % 6 != 4)
    return h, w, b, y, weights, valid


def _reference(name, h, w, b, y, weights, valid, cot):
    """float64 NumPy: the per-row values and d(sum cot * values)/dz."""
    z = np.asarray(h) @ np.asarray(w) + np.asarray(b)
    ls = np_log_softmax(z)
    p = np.exp(ls)
    rows = np.arange(T)
    if name == "label":
        value = np.asarray(weights) * ls[rows, np.asarray(y)]
        g = (np.asarray(cot) * np.asarray(weights))[:, None]
        dz = g * (np.eye(V)[np.asarray(y)] - p)
    else:
        value = -np.sum(p * ls, axis=-1)
        dz = -np.asarray(cot)[:, None] * p * (ls + value[:, None])
    m = np.asarray(valid)
    return np.where(m, value, 0), np.where(m[:, None], dz, 0)


def _fused(loss, h, w, b, y, weights, valid, *, scalar=False, forward_mode=False, vocab_block=7, token_block=5):
    return _front.fused(
        loss,
        (_stream.Head(h, w, b),),
        valid,
        (y, weights),
        None,
        None,
        ("dv",),
        n_outputs=1,
        scalar=scalar,
        token_block=token_block,
        vocab_block=vocab_block,
        memory_budget=_stream.DEFAULT_MEMORY_BUDGET,
        forward_mode=forward_mode,
    )


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("driver", ["logits", "streamed"])
def test_a_new_loss_runs_through_the_reverse_drivers(name, driver):
    h, w, b, y, weights, valid = _data()
    loss = LOSSES[name]()
    cot = jnp.asarray(np.random.default_rng(1).normal(size=T))

    def values(h, w, b):
        if driver == "logits":
            return _stream.whole_vjp((h @ w + b[None, :],), valid, (y, weights), None, None, loss)[0]
        return _fused(loss, h, w, b, y, weights, valid)[0]

    ref, dz = _reference(name, h, w, b, y, weights, valid, cot)
    np.testing.assert_allclose(values(h, w, b), ref, rtol=1e-12, atol=1e-12)
    dh, dw, db = jax.grad(lambda *a: jnp.sum(cot * values(*a)), (0, 1, 2))(h, w, b)
    np.testing.assert_allclose(dh, dz @ np.asarray(w).T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, np.asarray(h).T @ dz, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, dz.sum(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_new_loss_takes_the_single_pass_path_for_a_scalar(name):
    h, w, b, y, weights, valid = _data(2)
    loss = LOSSES[name]()
    out = _fused(loss, h, w, b, y, weights, valid, scalar=True, vocab_block=None, token_block=None)
    assert isinstance(out, _front.Total)
    ref, dz = _reference(name, h, w, b, y, weights, valid, np.ones(T))
    np.testing.assert_allclose(out.total, ref.sum(), rtol=1e-12)
    np.testing.assert_allclose(out.normalizer, np.sum(np.asarray(valid)))  # the default scalar(): 1 per row

    def total(h, w, b):
        return _fused(loss, h, w, b, y, weights, valid, scalar=True, vocab_block=None, token_block=None).total

    dh, dw = jax.grad(total, (0, 1))(h, w, b)
    np.testing.assert_allclose(dh, dz @ np.asarray(w).T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, np.asarray(h).T @ dz, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("driver", ["logits", "streamed"])
def test_a_new_loss_gets_forward_mode_from_its_gradient(name, driver):
    h, w, b, y, weights, valid = _data(3)
    loss = LOSSES[name]()
    rng = np.random.default_rng(4)
    tangents = tuple(jnp.asarray(rng.normal(size=x.shape)) for x in (h, w, b))

    def values(h, w, b):
        if driver == "logits":
            return _stream.whole_jvp((h @ w + b[None, :],), valid, (y, weights), None, None, loss)[0]
        return _fused(loss, h, w, b, y, weights, valid, forward_mode=True)[0]

    _, tangent = jax.jvp(values, (h, w, b), tangents)
    th, tw, tb = (np.asarray(t) for t in tangents)
    dz = np.asarray(th) @ np.asarray(w) + np.asarray(h) @ tw + tb
    # Row n's tangent is sum_c (d value_n / dz_c) dz_c: the reference gradient with a unit cotangent.
    _, grad = _reference(name, h, w, b, y, weights, valid, np.ones(T))
    np.testing.assert_allclose(tangent, np.sum(grad * dz, axis=-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("driver", ["logits", "streamed"])
def test_a_new_loss_is_vocabulary_parallel(name, driver, check_vma):
    h, w, b, y, weights, valid = _data(5)
    mesh = jax.make_mesh((4,), ("model",), **_auto())
    cot = jnp.asarray(np.random.default_rng(6).normal(size=T))

    def values(h, w, b, axis_name=None):
        loss = LOSSES[name](vocab=_rowloss.Vocab.of(axis_name))
        if driver == "logits":
            return _stream.whole_vjp((h @ w + b[None, :],), valid, (y, weights), None, None, loss)[0]
        return _fused(loss, h, w, b, y, weights, valid)[0]

    sharded = jax.shard_map(
        functools.partial(values, axis_name="model"),
        mesh=mesh,
        in_specs=(P(), P(None, "model"), P("model")),
        out_specs=P(),
        check_vma=check_vma,
    )
    ref, dz = _reference(name, h, w, b, y, weights, valid, cot)
    np.testing.assert_allclose(jax.jit(sharded)(h, w, b), ref, rtol=1e-12, atol=1e-12)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(cot * sharded(*a)), (0, 1, 2)))(h, w, b)
    for got, want in zip(grads, (dz @ np.asarray(w).T, np.asarray(h).T @ dz, dz.sum(0))):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def _auto():
    """An Auto-axes mesh on every supported JAX (axis_types is jax >= 0.7)."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    return {} if axis_type is None else {"axis_types": (axis_type.Auto,)}
