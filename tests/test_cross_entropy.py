"""cross_entropy core: the custom rule against jax.grad of the naive formula and float64 NumPy."""

import compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify
from jax.test_util import check_grads
from marks import all_cases_fast
from reference import TOL, naive_cross_entropy, np_cross_entropy

import jaxsce

RNG = np.random.default_rng(0)


def _data(n, c, dtype=np.float64, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(n, c)) * scale, dtype)
    labels = jnp.asarray(rng.integers(0, c, size=n), jnp.int32)
    return logits, labels


def _move(logits, axis):
    """[N, C] -> logits with the class axis at ``axis`` (batch split as (2, N/2))."""
    n, c = logits.shape
    x = logits.reshape(2, n // 2, c)
    return jnp.moveaxis(x, -1, axis)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("derivative", ["vjp", "jvp"])
def test_float64_matches_naive_autodiff_to_1e12(reduction, derivative):
    logits, labels = _data(16, 11)
    ours = lambda x: jnp.sum(jaxsce.cross_entropy(x, labels, reduction=reduction, derivative=derivative))  # noqa: E731
    naive = lambda x: jnp.sum(naive_cross_entropy(x, labels, reduction=reduction))  # noqa: E731
    np.testing.assert_allclose(ours(logits), naive(logits), rtol=1e-12)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(naive)(logits), rtol=1e-12, atol=1e-14)
    ref = np_cross_entropy(logits, labels, reduction=reduction)
    np.testing.assert_allclose(jaxsce.cross_entropy(logits, labels, reduction=reduction), ref, rtol=1e-12)


def test_gradient_is_p_minus_y_over_n():
    logits, labels = _data(8, 5)
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True)
    y = np.eye(5)[np.asarray(labels)]
    np.testing.assert_allclose(jax.grad(jaxsce.cross_entropy)(logits, labels), (p - y) / 8, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("axis", [-1, 0, 1, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_axis_need_not_be_last(axis, dtype):
    logits, labels = _data(8, 7, dtype)
    x = _move(logits, axis)
    lab = labels.reshape(2, 4)
    out = jaxsce.cross_entropy(x, lab, axis=axis, reduction="none")
    assert out.shape == (2, 4)
    np.testing.assert_allclose(
        out.reshape(-1), np_cross_entropy(logits, labels, reduction="none"), rtol=TOL[np.dtype(dtype)][0] * 10
    )
    g = jax.grad(lambda x: jaxsce.cross_entropy(x, lab, axis=axis))(x)
    g_ref = jax.grad(lambda z: naive_cross_entropy(z, labels))(logits)
    np.testing.assert_allclose(jnp.moveaxis(g, axis, -1).reshape(8, 7), g_ref, rtol=TOL[np.dtype(dtype)][1], atol=1e-7)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
    batch=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    classes=st.integers(1, 12),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_float32_property_against_float64(batch, classes, scale, masked, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(batch)
    x = rng.normal(size=shape + (classes,)) * scale
    y = rng.integers(0, classes, size=shape)
    where = rng.random(shape) < 0.7 if masked else None
    logits = jnp.asarray(x, jnp.float32)
    n = int(np.prod(shape))
    x64 = np.asarray(logits, np.float64).reshape(n, classes)
    ref = np_cross_entropy(x64, y.reshape(n), where=None if where is None else where.reshape(n), reduction="none")
    kw = {} if where is None else {"where": jnp.asarray(where)}
    out = jaxsce.cross_entropy(logits, jnp.asarray(y, jnp.int32), reduction="none", **kw)
    assert out.shape == shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out).reshape(n), ref, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda z: jaxsce.cross_entropy(z, jnp.asarray(y, jnp.int32), **kw))(logits)
    g64 = jax.grad(
        lambda z: naive_cross_entropy(
            z, jnp.asarray(y.reshape(n)), where=None if where is None else jnp.asarray(where.reshape(n))
        )
    )(jnp.asarray(x64))
    np.testing.assert_allclose(np.asarray(g).reshape(n, classes), g64, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_large_logits_where_naive_overflows(scale):
    logits, labels = _data(6, 9, np.float32, scale=scale, seed=3)
    naive = naive_cross_entropy(logits, labels, reduction="none")
    assert not np.all(np.isfinite(naive))
    out = jaxsce.cross_entropy(logits, labels, reduction="none")
    ref = np_cross_entropy(np.asarray(logits, np.float64), labels, reduction="none")
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    g = jax.grad(jaxsce.cross_entropy)(logits, labels)
    assert np.all(np.isfinite(g))
    x64 = np.asarray(logits, np.float64)
    p = np.exp(x64 - x64.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(g, (p - np.eye(9)[np.asarray(labels)]) / 6, atol=1e-7)


@pytest.mark.parametrize("gap", [0.0, 30.0, 80.0, 86.0, 90.0, 1e3, 1e5])
@pytest.mark.parametrize("derivative", ["vjp", "jvp"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_far_below_the_max(gap, derivative, smoothing):
    # The forward pass shifts by the label's logit when the float32 sum of
    # exp(s - s_y) cannot overflow (gap below about 88 - ln C) and falls back
    # to the max shift otherwise; both must match the float64 reference.
    logits, labels = _data(8, 50, np.float64, seed=4)
    x = np.array(logits)
    rows = np.arange(8)
    x[rows[::2], np.asarray(labels)[::2]] = x[rows[::2]].max(-1) - gap  # every other row
    x32 = jnp.asarray(x, jnp.float32)
    kw = dict(label_smoothing=smoothing, derivative=derivative)
    out = jaxsce.cross_entropy(x32, labels, reduction="none", **kw)
    x64 = np.asarray(x32, np.float64)
    ref = np_cross_entropy(x64, labels, reduction="none", label_smoothing=smoothing)
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6)
    g = jax.grad(lambda x: jaxsce.cross_entropy(x, labels, **kw))(x32)
    p = np.exp(x64 - x64.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = (1 - smoothing) * np.eye(50)[np.asarray(labels)] + smoothing / 50
    np.testing.assert_allclose(g, (p - q) / 8, atol=1e-7)


def test_jit_eager_vmap_and_one_hot_agree():
    logits, labels = _data(12, 6, np.float32)
    eager = jaxsce.cross_entropy(logits, labels, reduction="none")
    jitted = jax.jit(lambda x, y: jaxsce.cross_entropy(x, y, reduction="none"))(logits, labels)
    vmapped = jax.vmap(lambda x, y: jaxsce.cross_entropy(x, y, reduction="none"))(logits, labels)
    onehot = jaxsce.cross_entropy(logits, jax.nn.one_hot(labels, 6, dtype=jnp.float32), reduction="none")
    np.testing.assert_array_equal(eager, jitted)
    np.testing.assert_allclose(vmapped, eager, rtol=1e-6)
    np.testing.assert_allclose(onehot, eager, rtol=1e-6)
    g = jax.grad(jaxsce.cross_entropy)(logits, labels)
    g_vmap = jax.vmap(jax.grad(lambda x, y: jaxsce.cross_entropy(x, y)))(logits, labels) / 12
    g_onehot = jax.grad(jaxsce.cross_entropy)(logits, jax.nn.one_hot(labels, 6, dtype=jnp.float32))
    np.testing.assert_allclose(g_vmap, g, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(g_onehot, g, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("derivative", ["vjp", "jvp"])
@pytest.mark.parametrize("soft", [False, True])
def test_check_grads(derivative, soft):
    logits, labels = _data(5, 4)
    if soft:
        labels = jax.nn.softmax(jnp.asarray(RNG.normal(size=(5, 4))))
    modes = ["rev"] if derivative == "vjp" else ["fwd", "rev"]
    check_grads(lambda x: jaxsce.cross_entropy(x, labels, derivative=derivative), (logits,), order=1, modes=modes)


def test_masked_examples_get_exact_zero_even_with_nan_logits():
    logits, labels = _data(6, 5, np.float32)
    logits = logits.at[2].set(jnp.nan)
    where = jnp.array([True, True, False, True, True, True])
    loss = jaxsce.cross_entropy(logits, labels, where=where)
    assert np.isfinite(loss)
    g = jax.grad(jaxsce.cross_entropy)(logits, labels, where=where)
    np.testing.assert_array_equal(g[2], 0)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(
        loss, np_cross_entropy(np.asarray(logits, np.float64), labels, where=np.asarray(where)), rtol=1e-6
    )


def test_neg_inf_vocabulary_entries_are_allowed():
    logits, labels = _data(4, 6, np.float32)
    logits = logits.at[:, 5].set(-jnp.inf)
    labels = labels % 5
    loss = jaxsce.cross_entropy(logits, labels)
    assert np.isfinite(loss)
    g = jax.grad(jaxsce.cross_entropy)(logits, labels)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[:, 5], 0)


def test_nan_and_pos_inf_logits_give_nan():
    logits, labels = _data(3, 4, np.float32)
    for bad in (jnp.nan, jnp.inf):
        x = logits.at[1, (int(labels[1]) + 1) % 4].set(bad)
        per = jaxsce.cross_entropy(x, labels, reduction="none")
        assert np.isnan(per[1]) and np.all(np.isfinite(np.asarray(per)[[0, 2]]))
        assert np.any(np.isnan(jax.grad(jaxsce.cross_entropy)(x, labels)[1]))


def test_out_of_range_labels_give_nan_and_checkify_names_them():
    logits, _ = _data(4, 5, np.float32)
    labels = jnp.array([0, 5, 2, -1], jnp.int32)
    per = jaxsce.cross_entropy(logits, labels, reduction="none")
    assert np.isnan(per[1]) and np.isnan(per[3]) and np.isfinite(per[0])
    assert np.all(np.isnan(jax.grad(jaxsce.cross_entropy)(logits, labels)[1]))
    # Code that wraps the loss in checkify keeps running; a bad label raises
    # from the call itself (a host callback), naming the value and index.
    checked = jax.jit(checkify.checkify(lambda x, y: jaxsce.cross_entropy(x, y, check_labels=True)))
    with pytest.raises(Exception, match="found 5 at flat index 1"):
        jax.block_until_ready(checked(logits, labels))
    err, _ = checked(logits, labels % 5)
    err.throw()  # in range: no error


def test_wide_labels_are_not_wrapped_into_range():
    with compat.enable_x64(True):
        logits, _ = _data(2, 5, np.float32)
        labels = jnp.array([2**32 + 1, 1], jnp.int64)
        per = jaxsce.cross_entropy(logits, labels, reduction="none")
        assert np.isnan(per[0]) and np.isfinite(per[1])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(logits=jnp.ones((2, 3), jnp.int32)), TypeError, "int32"),
        (dict(labels=jnp.zeros((3,), jnp.int32)), ValueError, r"\(3,\)"),
        (dict(labels=jnp.zeros((2, 4), jnp.float32)), ValueError, r"\(2, 4\)"),
        (dict(labels=jnp.zeros((2,), bool)), TypeError, "bool"),
        (dict(reduction="avg"), ValueError, "avg"),
        (dict(axis=3), ValueError, "out of range"),
        (dict(where=jnp.ones((3,), bool)), ValueError, r"\(3,\)"),
        (dict(where=jnp.ones((2,), jnp.int32)), TypeError, "int32"),
        (dict(weight=jnp.ones((4,), jnp.float32)), ValueError, r"\(4,\)"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(logit_softcap=0.0), ValueError, "logit_softcap"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(derivative="fwd"), ValueError, "fwd"),
        (dict(labels=jnp.zeros((2, 3), jnp.float32), ignore_index=0), ValueError, "ignore_index"),
    ],
)
@all_cases_fast
def test_bad_input_is_a_trace_time_error(kwargs, exc, match):
    args = dict(logits=jnp.ones((2, 3), jnp.float32), labels=jnp.zeros((2,), jnp.int32))
    args.update(kwargs)
    logits, labels = args.pop("logits"), args.pop("labels")
    with pytest.raises(exc, match=match):
        jax.eval_shape(lambda x, y: jaxsce.cross_entropy(x, y, **args), logits, labels)
