"""log_probs and linear_log_probs against float64 NumPy formulas and jax.grad of the naive formula."""

import compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from marks import CountingJit, all_cases_fast, fast_cases
from reference import TOL, naive_log_probs, np_log_probs, np_log_probs_grad

import jaxsce

N, D, V = 37, 16, 300

# (temperature, logit_softcap)
TRANSFORMS = [(1.0, None), (0.7, None), (1.3, 5.0)]


def _logits(dtype, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(N, V)) * scale
    y = rng.integers(0, V, size=N)
    return jnp.asarray(z, dtype), jnp.asarray(y, jnp.int32)


def _cotangents(seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=N), rng.normal(size=N)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: f"T{t[0]}-cap{t[1]}")
def test_values_and_gradients_match_float64_numpy(dtype, transform):
    temperature, cap = transform
    z, y = _logits(dtype)
    g, g_h = _cotangents()
    kw = dict(temperature=temperature, logit_softcap=cap)
    lp, h = jaxsce.log_probs(z, y, return_entropy=True, **kw)
    lp_ref, h_ref = np_log_probs(np.asarray(z, np.float64), y, **kw)
    assert lp.dtype == h.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
    rtol, grad_rtol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(lp, lp_ref, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(h, h_ref, rtol=rtol, atol=rtol)
    obj = lambda z: (
        jnp.sum(jnp.asarray(g, lp.dtype) * (lambda o: o[0])(jaxsce.log_probs(z, y, return_entropy=True, **kw)))
        + jnp.sum(jnp.asarray(g_h, lp.dtype) * jaxsce.log_probs(z, y, return_entropy=True, **kw)[1])
    )
    dz = jax.grad(obj)(z)
    assert dz.dtype == dtype
    dz_ref = np_log_probs_grad(np.asarray(z, np.float64), y, g, g_h, **kw)
    np.testing.assert_allclose(
        np.asarray(dz, np.float64), dz_ref, rtol=grad_rtol, atol=grad_rtol * np.abs(dz_ref).max()
    )


@fast_cases(lambda p: p["transform"] != (1.0, None))
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: f"T{t[0]}-cap{t[1]}")
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
def test_gradient_equals_autodiff_of_the_naive_formula(transform, entropy):
    temperature, cap = transform
    z, y = _logits(jnp.float64, seed=2)
    g, g_h = (jnp.asarray(c) for c in _cotangents(3))
    kw = dict(temperature=temperature, logit_softcap=cap)

    def ours(z):
        out = jaxsce.log_probs(z, y, return_entropy=entropy, **kw)
        return jnp.sum(g * out[0]) + jnp.sum(g_h * out[1]) if entropy else jnp.sum(g * out)

    def naive(z):
        lp, h = naive_log_probs(z, y, **kw)
        return jnp.sum(g * lp) + (jnp.sum(g_h * h) if entropy else 0.0)

    np.testing.assert_allclose(ours(z), naive(z), rtol=1e-12)
    np.testing.assert_allclose(jax.grad(ours)(z), jax.grad(naive)(z), rtol=1e-10, atol=1e-13)


def _head(dtype=jnp.float64, seed=4, layout="dv"):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(N, D)), dtype)
    w = rng.normal(size=(D, V)) * 0.5
    w = jnp.asarray(w if layout == "dv" else w.T, dtype)
    b = jnp.asarray(rng.normal(size=V) * 0.1, dtype)
    y = jnp.asarray(rng.integers(0, V, size=N), jnp.int32)
    return h, w, b, y


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize(
    "blocks", [(8, 64), *(pytest.param(b, marks=pytest.mark.slow) for b in [(5, 299), (37, 300), (None, None)])]
)
@pytest.mark.parametrize("masked", [False, True], ids=["all", "where"])
def test_fused_equals_log_probs_of_the_logits(layout, blocks, masked):
    """Values and (h, W, b) gradients, ragged blocks, bias, both layouts, float64."""
    h, w, b, y = _head(layout=layout)
    where = jnp.asarray(np.arange(N) % 4 != 1) if masked else None
    kw = dict(temperature=0.8, logit_softcap=6.0, where=where, return_entropy=True)
    g, g_h = (jnp.asarray(c) for c in _cotangents(5))
    wt = (lambda w: w) if layout == "dv" else (lambda w: w.T)

    def fused(h, w, b):
        lp, ent = jaxsce.linear_log_probs(
            h, w, y, linear_bias=b, weight_layout=layout, token_block=blocks[0], vocab_block=blocks[1], **kw
        )
        return jnp.sum(g * lp) + jnp.sum(g_h * ent), (lp, ent)

    def plain(h, w, b):
        lp, ent = jaxsce.log_probs(h @ wt(w) + b[None, :], y, **kw)
        return jnp.sum(g * lp) + jnp.sum(g_h * ent), (lp, ent)

    (val, outs), grads = jax.value_and_grad(fused, (0, 1, 2), has_aux=True)(h, w, b)
    (val_ref, outs_ref), grads_ref = jax.value_and_grad(plain, (0, 1, 2), has_aux=True)(h, w, b)
    for a, r in zip((val, *outs), (val_ref, *outs_ref)):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-12)
    for a, r in zip(grads, grads_ref):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)


def test_fused_without_entropy_is_the_label_log_probability():
    h, w, b, y = _head(seed=6)
    lp = jaxsce.linear_log_probs(h, w, y, linear_bias=b, vocab_block=128)
    lp_ref, _ = np_log_probs(np.asarray(h @ w + b[None, :]), y)
    np.testing.assert_allclose(lp, lp_ref, rtol=1e-12)
    grads = jax.grad(lambda h, w: jnp.sum(jaxsce.linear_log_probs(h, w, y, vocab_block=128)), (0, 1))(h, w)
    grads_ref = jax.grad(lambda h, w: jnp.sum(naive_log_probs(h @ w, y)[0]), (0, 1))(h, w)
    for a, r in zip(grads, grads_ref):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn", ["logits", "linear"])
@all_cases_fast
def test_masked_rows_are_exactly_zero_even_when_nan(fn):
    h, w, b, y = _head(seed=7)
    where = jnp.asarray(np.arange(N) % 3 != 0)
    keep = np.asarray(where)
    g, g_h = (jnp.asarray(c) for c in _cotangents(8))
    if fn == "logits":
        # NaN logits in the masked rows; the gradient is taken w.r.t. them.
        args = (jnp.where(where[:, None], h @ w, jnp.nan),)
        outputs = lambda z: jaxsce.log_probs(z, y, where=where, return_entropy=True)  # noqa: E731
    else:
        args = (jnp.where(where[:, None], h, jnp.nan), w)
        outputs = lambda h, w: jaxsce.linear_log_probs(  # noqa: E731
            h, w, y, where=where, return_entropy=True, token_block=8, vocab_block=64
        )

    def obj(*a):
        lp, ent = outputs(*a)
        return jnp.sum(g * lp) + jnp.sum(g_h * ent), (lp, ent)

    (val, (lp, ent)), grads = jax.value_and_grad(obj, tuple(range(len(args))), has_aux=True)(*args)
    assert np.all(np.asarray(lp)[~keep] == 0) and np.all(np.asarray(ent)[~keep] == 0)
    assert np.isfinite(val) and np.all(np.isfinite(np.asarray(lp)[keep]))
    assert np.all(np.asarray(grads[0])[~keep] == 0) and np.all(np.isfinite(np.asarray(grads[0])[keep]))
    if fn == "linear":
        assert np.all(np.isfinite(grads[1]))


@pytest.mark.parametrize("fn", ["logits", "linear"])
def test_a_label_outside_the_classes_gives_nan_or_a_checked_error(fn):
    h, w, b, y = _head(seed=9)
    bad = y.at[3].set(V)

    def call(labels, **kw):
        if fn == "logits":
            return jaxsce.log_probs(h @ w, labels, **kw)
        return jaxsce.linear_log_probs(h, w, labels, vocab_block=64, **kw)

    lp = call(bad)
    assert np.isnan(lp[3]) and np.all(np.isfinite(np.delete(np.asarray(lp), 3)))
    dh = jax.grad(lambda h: jnp.sum(jaxsce.linear_log_probs(h, w, bad, vocab_block=64)))(h)
    assert np.all(np.isnan(dh[3])) and np.all(np.isfinite(np.delete(np.asarray(dh), 3, axis=0)))
    # Masked, it is not counted: no NaN.
    assert np.all(np.isfinite(call(bad, where=jnp.arange(N) != 3)))
    with pytest.raises(ValueError, match=f"found {V} at flat index 3"):
        call(bad, check_labels=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_16_bit_inputs_accumulate_in_float32(dtype):
    h, w, b, y = _head(seed=10)
    h16, w16 = h.astype(dtype), w.astype(dtype)
    lp, ent = jaxsce.linear_log_probs(h16, w16, y, return_entropy=True, vocab_block=128)
    assert lp.dtype == ent.dtype == jnp.float32
    lp_ref, h_ref = np_log_probs(np.asarray(h16, np.float64) @ np.asarray(w16, np.float64), y)
    np.testing.assert_allclose(lp, lp_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ent, h_ref, rtol=1e-4, atol=1e-4)
    dh, dw = jax.grad(lambda h, w: jnp.sum(jaxsce.linear_log_probs(h, w, y, vocab_block=128)), (0, 1))(h16, w16)
    assert dh.dtype == dw.dtype == dtype


def test_extreme_and_infinite_logits_stay_finite():
    z = jnp.array([[1e4, 0.0, -jnp.inf, -1e4], [3.0, 3.0, -jnp.inf, -jnp.inf], [-1e30, 2.0, 1.0, 0.0]])
    y = jnp.array([1, 0, 3])
    lp, ent = jaxsce.log_probs(z, y, return_entropy=True)
    lp_ref, h_ref = np_log_probs(z, y)
    np.testing.assert_allclose(lp, lp_ref, rtol=1e-12)
    np.testing.assert_allclose(ent, h_ref, rtol=1e-12, atol=1e-300)
    # Row 2's label has probability exp(-1e30 - ...) = 0 exactly: log p = -1e30 - lse.
    dz = jax.grad(lambda z: jnp.sum(jnp.stack(jaxsce.log_probs(z, jnp.array([1, 0, 2]), return_entropy=True))))(z)
    assert np.all(np.isfinite(dz))


def test_a_traced_temperature_compiles_once():
    z, y = _logits(jnp.float32, seed=11)

    @CountingJit
    def step(z, t):
        return jax.grad(lambda z: jnp.sum(jaxsce.log_probs(z, y, temperature=t)))(z)

    for t in (0.5, 0.9, 2.0):
        dz = step(z, jnp.float32(t))
        dz_ref = np_log_probs_grad(np.asarray(z, np.float64), y, np.ones(N), np.zeros(N), temperature=t)
        np.testing.assert_allclose(dz, dz_ref, rtol=2e-4, atol=2e-6)
    assert step.traces == 1
    # Out of range inside jit: NaN, not a silent number.
    assert np.all(np.isnan(jax.jit(lambda t: jaxsce.log_probs(z, y, temperature=t))(jnp.float32(-1.0))))


def test_batch_axes_and_a_class_axis_that_is_not_last():
    rng = np.random.default_rng(12)
    z = jnp.asarray(rng.normal(size=(3, 11, 4)))
    y = jnp.asarray(rng.integers(0, 11, size=(3, 4)))
    lp, ent = jaxsce.log_probs(z, y, axis=1, return_entropy=True)
    assert lp.shape == ent.shape == (3, 4)
    zt = np.moveaxis(np.asarray(z), 1, -1).reshape(12, 11)
    lp_ref, h_ref = np_log_probs(zt, np.asarray(y).reshape(12))
    np.testing.assert_allclose(lp.reshape(12), lp_ref, rtol=1e-12)
    np.testing.assert_allclose(ent.reshape(12), h_ref, rtol=1e-12)
    h = jnp.asarray(rng.normal(size=(2, 3, D)))
    w = jnp.asarray(rng.normal(size=(D, 20)))
    y2 = jnp.asarray(rng.integers(0, 20, size=(2, 3)))
    assert jaxsce.linear_log_probs(h, w, y2).shape == (2, 3)


def test_zero_tokens_and_zero_classes():
    assert jaxsce.log_probs(jnp.zeros((0, 5)), jnp.zeros((0,), jnp.int32)).shape == (0,)
    out = jaxsce.linear_log_probs(jnp.zeros((0, 4)), jnp.zeros((4, 5)), jnp.zeros((0,), jnp.int32), return_entropy=True)
    assert [o.shape for o in out] == [(0,), (0,)]
    with pytest.raises(ValueError, match="no classes"):
        jaxsce.log_probs(jnp.zeros((3, 0)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="no classes"):
        jaxsce.linear_log_probs(jnp.zeros((3, 4)), jnp.zeros((4, 0)), jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda z, y: jaxsce.log_probs(z, y, temperature=0.0), "temperature must be > 0"),
        (lambda z, y: jaxsce.log_probs(z, y, temperature=None), "temperature"),
        (lambda z, y: jaxsce.log_probs(z, y, logit_softcap=-1.0), "logit_softcap"),
        (lambda z, y: jaxsce.log_probs(z, y[:-1]), r"labels have shape \(36,\)"),
        (lambda z, y: jaxsce.log_probs(z, y.astype(jnp.float32)), "labels must be integer"),
        (lambda z, y: jaxsce.log_probs(z.astype(jnp.int32), y), "logits"),
        (lambda z, y: jaxsce.log_probs(z, y, where=jnp.ones(N)), "where must be a boolean"),
        (lambda z, y: jaxsce.log_probs(z, y, return_entropy=1), "return_entropy"),
        (lambda z, y: jaxsce.linear_log_probs(z, jnp.zeros((V + 1, 3)), y), "linear_weight"),
        (lambda z, y: jaxsce.linear_log_probs(z, jnp.zeros((V, 3)), y, linear_bias=jnp.zeros(2)), "linear_bias"),
        (lambda z, y: jaxsce.linear_log_probs(z, jnp.zeros((V, 3)), y, weight_layout="x"), "weight_layout"),
    ],
)
@all_cases_fast
def test_bad_input_raises_naming_the_argument(call, match):
    z, y = _logits(jnp.float32)
    with pytest.raises((TypeError, ValueError), match=match):
        call(z, y)


def test_policy_gradient_memory_stays_far_below_the_logits():
    """value_and_grad of -mean(A logp) - beta mean(H) through linear_log_probs at
    8192 x 2304 x 256000 bf16: compiled temporaries <= 256 MiB (the logits alone
    would be 8 GB in float32)."""
    if compat.JAX < (0, 10):
        pytest.skip("the block memory model is fitted to XLA in jax >= 0.10")
    t, d, v = 8192, 2304, 256000

    def objective(h, w, y, adv):
        lp, ent = jaxsce.linear_log_probs(h, w, y, return_entropy=True)
        return -jnp.mean(adv * lp) - 0.01 * jnp.mean(ent)

    args = (
        jax.ShapeDtypeStruct((t, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((d, v), jnp.bfloat16),
        jax.ShapeDtypeStruct((t,), jnp.int32),
        jax.ShapeDtypeStruct((t,), jnp.float32),
    )
    compiled = jax.jit(jax.value_and_grad(objective, (0, 1))).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 256 * 2**20, temp / 2**20


@pytest.mark.parametrize("fn", ["logits", "linear"])
def test_ignore_index_gives_what_where_gives(fn):
    """-100 padding with ignore_index=-100: the values and gradients of where=False there (with
    ignore_index=None, NaN)."""
    rng = np.random.default_rng(40)
    h = jnp.asarray(rng.normal(size=(3, 7, 6)))
    w = jnp.asarray(rng.normal(size=(6, 50)))
    y = jnp.asarray(rng.integers(0, 50, size=(3, 7)), jnp.int32)
    m = jnp.asarray(rng.random((3, 7)) > 0.3)
    padded = jnp.where(m, y, -100)

    def call(w, labels, **kw):
        if fn == "logits":
            return jaxsce.log_probs(h @ w, labels, return_entropy=True, **kw)
        return jaxsce.linear_log_probs(h, w, labels, return_entropy=True, **kw)

    got = call(w, padded, ignore_index=-100)
    want = call(w, y, where=m)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert np.isnan(np.asarray(call(w, padded, ignore_index=None)[0])).any()
    g = jax.grad(lambda w: jnp.sum(jnp.stack(call(w, padded, ignore_index=-100))))(w)
    np.testing.assert_array_equal(g, jax.grad(lambda w: jnp.sum(jnp.stack(call(w, y, where=m))))(w))
