"""softmax / log_softmax / logsumexp against float64 NumPy and the naive formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference import TOL, naive_softmax, np_log_softmax, np_logsumexp, np_softmax

import jaxsce

DTYPES = [np.float64, np.float32, jnp.bfloat16]
SHAPES_AXES = [((7,), -1), ((4, 9), -1), ((4, 9), 0), ((2, 3, 5), 1), ((2, 3, 5), (1, 2))]


def _np_axis_moved(fn, x, axis):
    axis = axis if isinstance(axis, tuple) else (axis,)
    axis = tuple(a % x.ndim for a in axis)
    rest = [i for i in range(x.ndim) if i not in axis]
    xt = np.transpose(x, rest + list(axis)).reshape([x.shape[i] for i in rest] + [-1])
    return xt, rest, axis


def _np_apply(fn, x, axis, reduce=False):
    xt, rest, axes = _np_axis_moved(fn, x, axis)
    out = fn(xt, -1)
    if reduce:
        return out
    out = out.reshape([x.shape[i] for i in rest] + [x.shape[a] for a in axes])
    return np.transpose(out, np.argsort(rest + list(axes)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
@pytest.mark.parametrize(
    "name,fn,ref,reduce",
    [
        ("softmax", jaxsce.softmax, np_softmax, False),
        ("log_softmax", jaxsce.log_softmax, np_log_softmax, False),
        ("logsumexp", jaxsce.logsumexp, np_logsumexp, True),
    ],
)
def test_matches_float64_reference(name, fn, ref, reduce, shape, axis, dtype):
    x = np.random.default_rng(0).normal(size=shape) * 5
    xd = jnp.asarray(x, dtype)
    expected = _np_apply(ref, np.asarray(xd.astype(jnp.float64)), axis, reduce)
    out = fn(xd, axis=axis)
    assert out.dtype == xd.dtype
    rtol = TOL[np.dtype(dtype)][0]
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_no_overflow_where_naive_formula_fails(scale):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 6)) * scale, jnp.float32)
    naive = naive_softmax(x)
    assert not np.all(np.isfinite(naive))  # the tutorial's first version breaks here
    out = jaxsce.softmax(x)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np_softmax(np.asarray(x, np.float64)), atol=1e-6)
    np.testing.assert_allclose(jaxsce.logsumexp(x), np_logsumexp(np.asarray(x, np.float64)), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gradient_matches_naive_formula(dtype):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 8)), dtype)
    w = jnp.asarray(np.random.default_rng(3).normal(size=(5, 8)), dtype)
    rtol = TOL[np.dtype(dtype)][1]
    for fn, naive in [
        (jaxsce.softmax, naive_softmax),
        (jaxsce.log_softmax, lambda x: jnp.log(naive_softmax(x))),
        (lambda x: jaxsce.logsumexp(x)[:, None], lambda x: jnp.log(jnp.sum(jnp.exp(x), -1, keepdims=True))),
    ]:
        g = jax.grad(lambda x, fn=fn: jnp.sum(fn(x) * w))(x)
        g_naive = jax.grad(lambda x, naive=naive: jnp.sum(naive(x) * w))(x)
        np.testing.assert_allclose(g, g_naive, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("fn", [jaxsce.softmax, jaxsce.log_softmax, jaxsce.logsumexp])
def test_check_grads_forward_and_reverse(fn):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 5)))
    check_grads(fn, (x,), order=2, modes=["fwd", "rev"])


def test_all_neg_inf_and_fully_masked_rows_are_nan_free():
    x = jnp.array([[-jnp.inf, -jnp.inf, -jnp.inf], [1.0, 2.0, 3.0]], jnp.float32)
    mask = jnp.array([[True, True, True], [False, False, False]])
    for where in (None, mask):
        for fn in (jaxsce.softmax, jaxsce.log_softmax, jaxsce.logsumexp):
            out = fn(x, where=where)
            assert not np.any(np.isnan(out)), (fn, where)

            def finite_sum(x, fn=fn, where=where):
                y = fn(x, where=where)
                return jnp.sum(jnp.where(jnp.isfinite(y), y, 0))

            g = jax.grad(finite_sum)(x)
            assert np.all(np.isfinite(g)), (fn, where)
    np.testing.assert_array_equal(jaxsce.softmax(x)[0], 0)
    np.testing.assert_array_equal(jaxsce.logsumexp(x, where=mask)[1], -np.inf)
    np.testing.assert_array_equal(jaxsce.log_softmax(x, where=mask)[1], -np.inf)


def test_mask_matches_dropping_entries():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(6,)))
    mask = jnp.array([True, False, True, True, False, True])
    kept = np.asarray(x)[np.asarray(mask)]
    np.testing.assert_allclose(jaxsce.softmax(x, where=mask)[np.asarray(mask)], np_softmax(kept), rtol=1e-12)
    np.testing.assert_array_equal(jaxsce.softmax(x, where=mask)[~np.asarray(mask)], 0)
    np.testing.assert_allclose(jaxsce.logsumexp(x, where=mask), np_logsumexp(kept), rtol=1e-12)
    g = jax.grad(lambda x: jaxsce.logsumexp(x, where=mask))(x)
    np.testing.assert_array_equal(g[~np.asarray(mask)], 0)


def test_plus_inf_gives_nan_as_documented():
    x = jnp.array([1.0, jnp.inf, 0.0])
    assert np.all(np.isnan(jaxsce.softmax(x))[1])
    assert jaxsce.logsumexp(x) == jnp.inf


def test_softmax_saves_one_residual():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(4, 50)), jnp.float32)
    _, vjp = jax.vjp(jaxsce.softmax, x)
    big = [leaf for leaf in jax.tree.leaves(vjp) if leaf.size >= x.size]
    assert len(big) == 1


def test_bad_input_errors_name_the_fault():
    with pytest.raises(TypeError, match="int32"):
        jaxsce.softmax(jnp.arange(3, dtype=jnp.int32))
    with pytest.raises(ValueError, match="out of range"):
        jaxsce.softmax(jnp.ones((2, 3)), axis=2)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        jaxsce.softmax(jnp.ones((2, 3)), where=jnp.ones(4, bool))
    with pytest.raises(TypeError, match="boolean"):
        jaxsce.logsumexp(jnp.ones((2, 3)), where=jnp.ones((2, 3)))
