"""Regression tests for unusual and bad input: each is named after the bug it catches.

Label dtypes, NaN in masked tokens, empty and symbolic shapes, traced and
static options, check_labels. (Sharded cases live in test_sharded.py.)
"""

import compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marks import CountingJit, all_cases_fast, fast_cases
from reference import np_cross_entropy

import jaxsce

LABEL_DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.uint32, np.int32, np.int64]


def _logits(n, c, seed=0, dtype=np.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, c)) * 2, dtype)


def _close(a, b, rtol=1e-10, atol=1e-12):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# --- label dtypes -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_narrow_and_unsigned_labels_score_the_right_class(dtype):
    """uint8 labels with 300 classes: label 100 was scored as class 255 (the
    range check and the out-of-range sentinel were computed in uint8)."""
    c = 300
    hi = min(c, int(np.iinfo(dtype).max) + 1)
    labels = np.random.default_rng(1).integers(0, hi, size=24)
    labels[:3] = [100, 0, hi - 1]
    logits = _logits(24, c)
    y = jnp.asarray(labels.astype(dtype))
    per = jaxsce.cross_entropy(logits, y, reduction="none", check_labels=True)
    _close(per, np_cross_entropy(logits, labels, reduction="none"))
    g = jax.grad(jaxsce.cross_entropy)(logits, y)
    _close(g, jax.grad(jaxsce.cross_entropy)(logits, jnp.asarray(labels, jnp.int32)))
    h, w = _logits(24, 8, 2), _logits(8, c, 3) * 0.3
    fused = jaxsce.linear_cross_entropy(h, w, y, reduction="none", check_labels=True)
    _close(fused, np_cross_entropy(np.asarray(h) @ np.asarray(w), labels, reduction="none"))


@pytest.mark.parametrize("dtype,ignore", [(np.uint8, -100), (np.uint16, -100), (np.int8, 200), (np.uint32, -1)])
@all_cases_fast
def test_ignore_index_the_label_dtype_cannot_hold_matches_nothing(dtype, ignore):
    """ignore_index=-100 with uint8 labels wrapped to class 156 and dropped
    those examples."""
    labels = np.array([156, 3, 65436 % 300, 4294967295 % 300, 1]) % min(300, np.iinfo(dtype).max + 1)
    logits = _logits(5, 300)
    y = jnp.asarray(labels.astype(dtype))
    per = jaxsce.cross_entropy(logits, y, reduction="none", ignore_index=ignore)
    _close(per, np_cross_entropy(logits, labels, reduction="none"))
    assert np.all(np.asarray(per) > 0)


def test_unsigned_label_above_the_class_count_is_nan_not_a_class():
    logits = _logits(3, 300)
    per = jaxsce.cross_entropy(logits, jnp.array([5, 299, 300], jnp.uint16), reduction="none")
    assert np.isfinite(per[0]) and np.isfinite(per[1]) and np.isnan(per[2])


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(LABEL_DTYPES),
    classes=st.sampled_from([5, 300]),
    ignore=st.sampled_from([None, -100, 0, 3, 255, 300, 70000]),
    masked=st.booleans(),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_label_dtype_ignore_index_where_and_weights_match_float64(dtype, classes, ignore, masked, weighted, seed):
    rng = np.random.default_rng(seed)
    n = 12
    info = np.iinfo(dtype)
    labels = rng.integers(0, min(classes, int(info.max) + 1), size=n)
    if ignore is not None and info.min <= ignore <= info.max:
        labels[rng.random(n) < 0.3] = ignore  # a representable ignore_index (maybe a valid class id)
    logits = _logits(n, classes, seed)
    kw = dict(ignore_index=ignore)
    ref_kw = dict(kw)
    if masked:
        kw["where"] = ref_kw["where"] = jnp.asarray(rng.random(n) < 0.7)
    if weighted:
        kw["weight"] = jnp.asarray(rng.random(classes) + 0.2)
        ref_kw["weight"] = np.asarray(kw["weight"])
    y = jnp.asarray(labels.astype(dtype))
    for reduction in ("none", "mean"):
        ours = jaxsce.cross_entropy(logits, y, reduction=reduction, **kw)
        _close(ours, np_cross_entropy(logits, labels, reduction=reduction, **ref_kw))


# --- NaN in masked tokens ------------------------------------------------------------

PATHS = {
    "single-pass": dict(),
    "streaming": dict(vocab_block=16, token_block=4),
    "none": dict(reduction="none", vocab_block=16, token_block=4),
    "jvp": dict(derivative="jvp", vocab_block=16, token_block=4),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_masked_or_ignored_token_with_nan_hidden_state_gets_exact_zero_gradients(path, layout):
    """A masked token's NaN hidden state made d_W NaN (h^T @ ds computed
    NaN * 0) on every path, and d_hidden NaN in derivative="jvp" mode."""
    if path == "jvp" and not compat.reverse_through_jvp:
        pytest.skip("reverse mode through derivative='jvp' needs jax >= 0.10")
    rng = np.random.default_rng(4)
    t, d, v = 11, 6, 40
    h = rng.normal(size=(t, d))
    w = jnp.asarray(rng.normal(size=(d, v) if layout == "dv" else (v, d)) * 0.3)
    b = jnp.asarray(rng.normal(size=(v,)) * 0.1)
    labels = rng.integers(0, v, size=t)
    labels[4] = -100
    where = np.ones(t, bool)
    where[1] = False
    clean = h.copy()
    clean[[1, 4]] = 0.0
    h[[1, 4]] = np.nan
    y, mask = jnp.asarray(labels, jnp.int32), jnp.asarray(where)
    kw = dict(PATHS[path], weight_layout=layout, where=mask, ignore_index=-100, label_smoothing=0.1)
    cot = jnp.asarray(rng.normal(size=(t,))) if path == "none" else 1.0

    def f(h, w, b):
        return jnp.sum(cot * jaxsce.linear_cross_entropy(h, w, y, linear_bias=b, **kw))

    loss, grads = jax.value_and_grad(f, (0, 1, 2))(jnp.asarray(h), w, b)
    loss_ref, grads_ref = jax.value_and_grad(f, (0, 1, 2))(jnp.asarray(clean), w, b)
    _close((loss, grads), (loss_ref, grads_ref))
    np.testing.assert_array_equal(np.asarray(grads[0])[[1, 4]], 0.0)


# --- int64 labels with x64 disabled --------------------------------------------------


def test_int64_host_labels_that_x64_off_jax_would_wrap_are_an_error():
    """With x64 disabled JAX wraps int64 labels to int32 at the jit boundary:
    2**32 + 1 became class 1."""
    with compat.enable_x64(False):
        logits = _logits(2, 5, dtype=np.float32)
        with pytest.raises(ValueError, match=r"4294967297 at flat index 0"):
            jaxsce.cross_entropy(logits, np.array([2**32 + 1, 1], np.int64))
        with pytest.raises(ValueError, match=r"labels of dtype int64"):
            jaxsce.linear_cross_entropy(logits, jnp.ones((5, 7), jnp.float32), np.array([1, -(2**40)], np.int64))
        ok = jaxsce.cross_entropy(logits, np.array([4, 1], np.int64))  # values that fit are fine
        assert np.isfinite(ok)


# --- empty inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["single-pass", "streaming", "jvp"])
@all_cases_fast
def test_zero_tokens_behave_like_zero_examples_of_cross_entropy(path):
    """0 tokens raised ZeroDivisionError / TypeError in linear_cross_entropy."""
    kw = {"single-pass": {}, "streaming": dict(vocab_block=8), "jvp": dict(derivative="jvp")}[path]
    h, w, y = jnp.zeros((0, 4)), _logits(4, 10), jnp.zeros((0,), jnp.int32)
    loss, grads = jax.value_and_grad(lambda h, w: jaxsce.linear_cross_entropy(h, w, y, **kw), (0, 1))(h, w)
    assert loss == 0 and grads[0].shape == (0, 4)
    np.testing.assert_array_equal(grads[1], 0)
    assert jaxsce.linear_cross_entropy(h, w, y, reduction="none", **kw).shape == (0,)
    assert jaxsce.linear_cross_entropy(h, w, y, reduction="sum", **kw) == 0
    loss, aux = jaxsce.linear_cross_entropy(h.reshape(2, 0, 4), w, y.reshape(2, 0), return_aux=True, **kw)
    assert loss == 0 and aux.count == 0 and aux.lse.shape == (2, 0)
    assert jaxsce.cross_entropy(jnp.zeros((0, 10)), y) == 0  # the behaviour it matches


@pytest.mark.parametrize(
    "call",
    [
        lambda: jaxsce.cross_entropy(jnp.zeros((3, 0)), jnp.zeros((3,), jnp.int32)),
        lambda: jaxsce.cross_entropy(jnp.zeros((0, 3)), jnp.zeros((3,), jnp.int32), axis=0),
        lambda: jaxsce.linear_cross_entropy(jnp.ones((3, 4)), jnp.zeros((4, 0)), jnp.zeros((3,), jnp.int32)),
        lambda: jaxsce.softmax(jnp.zeros((3, 0))),
        lambda: jaxsce.log_softmax(jnp.zeros((3, 0))),
        lambda: jaxsce.logsumexp(jnp.zeros((3, 0))),
    ],
    ids=["cross_entropy", "cross_entropy-axis0", "linear", "softmax", "log_softmax", "logsumexp"],
)
@all_cases_fast
def test_zero_classes_is_a_value_error_naming_the_class_axis(call):
    """0 classes gave "zero-size array to reduction operation max"."""
    with pytest.raises(ValueError, match="no (classes|entries) along axis|has no classes"):
        call()


# --- jax.export ---------------------------------------------------------------------


@fast_cases(lambda p: not p["kw"])
@pytest.mark.parametrize("kw", [dict(), dict(reduction="none", token_block=8), dict(derivative="jvp")])
def test_export_with_a_symbolic_token_count(kw):
    """Block sizes were chosen by Python comparisons on the token count."""
    (n,) = jax.export.symbolic_shape("n")
    d, v = 6, 50
    w = _logits(d, v, 1, np.float32)

    def f(h, w, y):
        return jaxsce.linear_cross_entropy(h, w, y, ignore_index=-100, label_smoothing=0.1, **kw)

    if kw.get("derivative") == "jvp":
        g = jax.jit(lambda h, w, y: jax.jvp(lambda h: f(h, w, y), (h,), (jnp.ones_like(h),)))
    else:
        g = jax.jit(lambda h, w, y: jax.value_and_grad(lambda h, w: jnp.sum(f(h, w, y)), (0, 1))(h, w))
    spec = (jax.ShapeDtypeStruct((n, d), jnp.float32), w, jax.ShapeDtypeStruct((n,), jnp.int32))
    exported = jax.export.deserialize(jax.export.export(g)(*spec).serialize())
    for t in (1, 7, 1030):
        h = _logits(t, d, t, np.float32)
        y = jnp.asarray(np.random.default_rng(t).integers(-1, v, size=t) % v, jnp.int32).at[0].set(-100)
        _close(exported.call(h, w, y), g(h, w, y), rtol=2e-5, atol=1e-6)


def test_return_aux_exports_and_serializes():
    """LossAux was not registered for export serialization."""
    logits, labels = _logits(4, 6, 0, np.float32), jnp.array([0, 1, 2, 3], jnp.int32)
    f = jax.jit(lambda z, y: jaxsce.cross_entropy(z, y, return_aux=True))
    exported = jax.export.deserialize(jax.export.export(f)(logits, labels).serialize())
    loss, aux = exported.call(logits, labels)
    assert isinstance(aux, jaxsce.LossAux)
    _close((loss, aux), f(logits, labels))


# --- options ------------------------------------------------------------------------


def _ce_linear_and_streaming(logits, h, w, labels, **kw):
    return (
        jax.value_and_grad(lambda z: jaxsce.cross_entropy(z, labels, **kw))(logits),
        jax.value_and_grad(lambda w: jaxsce.linear_cross_entropy(h, w, labels, **kw))(w),
        jax.value_and_grad(lambda w: jaxsce.linear_cross_entropy(h, w, labels, vocab_block=4, **kw))(w),
    )


def test_float_options_accept_traced_values_and_compile_once():
    """label_smoothing, z_loss and logit_softcap were static: a schedule
    recompiled per value, and a traced value was an error."""
    logits, labels = _logits(8, 11, 5), jnp.asarray(np.arange(8) % 11, jnp.int32)
    h, w = _logits(8, 4, 6), _logits(4, 11, 7)

    @CountingJit
    def step(eps, zl, cap):
        return _ce_linear_and_streaming(logits, h, w, labels, label_smoothing=eps, z_loss=zl, logit_softcap=cap)

    for eps, zl, cap in [(0.1, 1e-3, 5.0), (0.0, 0.0, 30.0), (0.3, 1e-2, 2.0)]:
        expected = _ce_linear_and_streaming(logits, h, w, labels, label_smoothing=eps, z_loss=zl, logit_softcap=cap)
        _close(step(eps, zl, cap), expected)
        np.testing.assert_allclose(
            expected[0][0], np_cross_entropy(logits, labels, label_smoothing=eps, z_loss=zl, logit_softcap=cap)
        )
    assert step.traces == 1


@pytest.mark.parametrize(
    "name,value",
    [
        ("label_smoothing", 1.5),
        ("label_smoothing", -0.1),
        ("z_loss", -1.0),
        ("logit_softcap", 0.0),
        ("logit_softcap", -2.0),
    ],
)
def test_traced_float_option_out_of_range_gives_nan(name, value):
    logits, labels = _logits(4, 5), jnp.array([0, 1, 2, 3], jnp.int32)
    assert np.isnan(jax.jit(lambda v: jaxsce.cross_entropy(logits, labels, **{name: v}))(value))
    with pytest.raises(ValueError, match=name):
        jaxsce.cross_entropy(logits, labels, **{name: value})


def test_float_options_are_constants_for_differentiation():
    logits, labels = _logits(4, 5), jnp.array([0, 1, 2, 3], jnp.int32)
    g = jax.grad(lambda e: jaxsce.cross_entropy(logits, labels, label_smoothing=e, z_loss=e))(0.1)
    assert g == 0


@pytest.mark.parametrize(
    "fn,name,value",
    [
        ("ce", "ignore_index", "traced"),
        ("ce", "reduction", "traced"),
        ("ce", "axis", {"a": 1}),
        ("ce", "return_aux", "traced"),
        ("linear", "token_block", "traced"),
        ("linear", "memory_budget", np.array([1 << 20])),
        ("linear", "axis_name", ["model", {"x"}]),
    ],
)
def test_static_options_given_a_tracer_or_unhashable_value_are_named(fn, name, value):
    """JAX's "Non-hashable static arguments" message named no option."""
    logits, labels = _logits(4, 5), jnp.array([0, 1, 2, 3], jnp.int32)
    call = {
        "ce": lambda **kw: jaxsce.cross_entropy(logits, labels, **kw),
        "linear": lambda **kw: jaxsce.linear_cross_entropy(logits, _logits(5, 7), labels, **kw),
    }[fn]
    with pytest.raises(TypeError, match=name):
        if value == "traced":
            jax.jit(lambda v: call(**{name: v}))(1)
        else:
            call(**{name: value})


def test_axis_as_a_list_and_numpy_integer_sizes_work():
    logits, labels = _logits(4, 5), jnp.array([0, 1, 2, 3], jnp.int32)
    assert jaxsce.cross_entropy(logits, labels, axis=[-1]) == jaxsce.cross_entropy(logits, labels)
    h, w = _logits(4, 3), _logits(3, 5)
    base = jaxsce.linear_cross_entropy(h, w, labels)
    for kw in (dict(memory_budget=np.int64(1 << 20)), dict(token_block=np.int32(2), vocab_block=np.int64(2))):
        _close(jaxsce.linear_cross_entropy(h, w, labels, **kw), base)


@pytest.mark.parametrize("name", ["vocab_block", "token_block", "memory_budget"])
def test_a_bool_is_not_a_block_size(name):
    """vocab_block=True was accepted as 1."""
    h, w, y = _logits(4, 3), _logits(3, 5), jnp.array([0, 1, 2, 3], jnp.int32)
    with pytest.raises(TypeError, match=name):
        jaxsce.linear_cross_entropy(h, w, y, **{name: True})


# --- check_labels ---------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["ce", "linear"])
@all_cases_fast
def test_check_labels_works_eagerly_and_under_jit_without_checkify(fn):
    """check_labels=True failed even with valid labels unless the caller
    wrapped the call in checkify."""
    logits = _logits(4, 5)
    call = {
        "ce": lambda y: jaxsce.cross_entropy(logits, y, check_labels=True, ignore_index=-100),
        "linear": lambda y: jaxsce.linear_cross_entropy(logits, _logits(5, 7), y, check_labels=True, ignore_index=-100),
    }[fn]
    good = jnp.array([0, -100, 2, 3], jnp.int32)
    bad = jnp.array([0, -100, 9, -3], jnp.int32)
    assert np.isfinite(call(good)) and np.isfinite(jax.jit(call)(good))
    with pytest.raises(ValueError, match=r"found 9 at flat index 2"):
        call(bad)
    with pytest.raises(Exception, match=r"found 9 at flat index 2"):
        jax.block_until_ready(jax.jit(call)(bad))
    with pytest.raises(ValueError, match=r"found 7 at flat index 0"):
        call(jnp.array([7, 1, 2, 3], jnp.uint8))  # unsigned and in the error too


def test_check_labels_does_not_flag_valid_narrow_labels():
    """With C = 300 the range check ran in uint8, where 300 wraps to 44, so
    valid labels of 44 and more were flagged."""
    logits = _logits(3, 300)
    out = jaxsce.cross_entropy(logits, jnp.array([100, 200, 255], jnp.uint8), check_labels=True)
    assert np.isfinite(out)
