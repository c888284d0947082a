"""Regression tests for wrong numbers and precision loss in the newer losses.

Each test is named after the defect it guards against; each failed before
its fix. The references are float64 NumPy formulas (``reference.py``) and
``jax.grad``/``jax.jvp`` of the naive formulas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from marks import all_cases_fast
from reference import naive_distillation, naive_log_probs, np_cross_entropy, np_distillation, np_log_probs

import jaxsce

DIVERGENCES = ["kl", "reverse_kl", "jsd"]


def _rows(n=6, v=11, seed=0, scale=2.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, v)) * scale, dtype), jnp.asarray(rng.normal(size=(n, v)) * scale, dtype)


def _head(t=6, d=8, v=11, seed=1, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(t, d)), dtype), jnp.asarray(rng.normal(size=(d, v)) * 0.5, dtype)


# --- divergences: NaN policy ------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@all_cases_fast
def test_jsd_of_rows_sharing_a_nan_or_inf_entry_is_nan_not_zero(bad):
    s, t = _rows()
    s, t = s.at[0, 3].set(bad), t.at[0, 3].set(bad)
    out = jaxsce.distillation_loss(s, t, divergence="jsd", reduction="none")
    assert np.isnan(out[0]) and np.all(np.isfinite(out[1:]))
    g = jax.grad(lambda s: jaxsce.distillation_loss(s, t, divergence="jsd"))(s)
    assert np.all(np.isnan(g[0])) and np.all(np.isfinite(g[1:]))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("vocab_block", [None, 4], ids=["single-pass", "streamed"])
def test_fused_divergence_of_a_token_with_nan_hidden_states_in_both_models_is_nan(divergence, vocab_block):
    hs, ws = _head()
    ht, wt = _head(seed=2)
    hs, ht = hs.at[2].set(jnp.nan), ht.at[2].set(jnp.nan)
    kw = dict(divergence=divergence, vocab_block=vocab_block)
    out = jaxsce.linear_distillation_loss(hs, ws, ht, wt, reduction="none", **kw)
    assert np.isnan(out[2]) and np.all(np.isfinite(np.delete(np.asarray(out), 2)))
    mean = jaxsce.linear_distillation_loss(hs, ws, ht, wt, **kw)
    assert np.isnan(mean)
    dh = jax.grad(lambda h: jaxsce.linear_distillation_loss(h, ws, ht, wt, **kw))(hs)
    assert np.all(np.isnan(dh[2]))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@all_cases_fast
def test_nonfinite_student_logits_get_a_nan_gradient_not_zero(divergence, bad):
    s, t = _rows(seed=3)
    s = s.at[1, 5].set(bad)
    out = jaxsce.distillation_loss(s, t, divergence=divergence, reduction="none")
    assert np.isnan(out[1])
    g = jax.grad(lambda s: jaxsce.distillation_loss(s, t, divergence=divergence))(s)
    assert np.all(np.isnan(g[1])) and np.all(np.isfinite(np.delete(np.asarray(g), 1, axis=0)))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("vocab_block", [None, 4], ids=["single-pass", "streamed"])
def test_fused_nonfinite_student_hidden_state_gets_a_nan_gradient_row(divergence, vocab_block):
    hs, ws = _head()
    ht, wt = _head(seed=2)
    hs = hs.at[4, 0].set(jnp.inf)
    kw = dict(divergence=divergence, vocab_block=vocab_block)
    dh = jax.grad(lambda h: jaxsce.linear_distillation_loss(h, ws, ht, wt, **kw))(hs)
    assert np.all(np.isnan(dh[4]))


# --- sample weights -----------------------------------------------------------------------


def _weighted_calls():
    h, w = _head(t=6, v=11)
    y = jnp.array([0, 3, -100, 7, 2, 10])
    where = jnp.array([True, False, True, True, True, True])
    sw = jnp.array([1.0, jnp.nan, jnp.nan, 0.5, 2.0, 1.0], jnp.float32)  # NaN on the two excluded rows
    kw = dict(where=where, ignore_index=-100, sample_weight=sw)
    return h, w, y, kw, where & (y != -100)


@pytest.mark.parametrize("path", ["logits", "single-pass", "streamed"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nan_sample_weight_on_an_excluded_row_contributes_nothing(path, reduction):
    h, w, y, kw, counted = _weighted_calls()

    def loss(h, w):
        if path == "logits":
            return jaxsce.cross_entropy(h @ w, y, reduction=reduction, **kw)
        vb = 4 if path == "streamed" else None
        return jaxsce.linear_cross_entropy(h, w, y, reduction=reduction, vocab_block=vb, **kw)

    sw = np.where(np.asarray(counted), np.asarray(kw["sample_weight"]), 0.0)
    per = np_cross_entropy(
        np.asarray(h @ w, np.float64), np.where(np.asarray(counted), np.asarray(y), 0), reduction="none"
    )
    per = np.where(np.asarray(counted), per, 0.0) * sw
    ref = {"none": per, "sum": per.sum(), "mean": per.sum() / sw.sum()}[reduction]
    out = loss(h, w)
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6)
    dh, dw = jax.grad(lambda h, w: jnp.sum(loss(h, w)), (0, 1))(h, w)
    assert np.all(np.isfinite(dh)) and np.all(np.isfinite(dw))
    assert np.all(np.asarray(dh)[~np.asarray(counted)] == 0)


@pytest.mark.parametrize("path", ["logits", "single-pass", "streamed"])
def test_mean_with_counted_signed_weights_summing_to_zero_is_not_a_plausible_zero(path):
    h, w = _head(t=4, v=11)
    y = jnp.array([1, 2, 3, 4])
    sw = jnp.array([1.0, -1.0, 0.5, -0.5], jnp.float32)

    def loss(h, sw, where=None):
        if path == "logits":
            return jaxsce.cross_entropy(h @ w, y, sample_weight=sw, where=where)
        return jaxsce.linear_cross_entropy(
            h, w, y, sample_weight=sw, where=where, vocab_block=4 if path == "streamed" else None
        )

    out = loss(h, sw)
    assert not np.isfinite(out)  # total / 0: +-inf or NaN, as torch divides
    assert not np.all(np.isfinite(jax.grad(loss)(h, sw)))
    # Nothing counted is still 0 with zero gradient (documented).
    none = jnp.zeros(4, bool)
    assert loss(h, sw, none) == 0
    assert np.all(np.asarray(jax.grad(loss)(h, sw, none)) == 0)
    # All-zero class weights on the counted labels: NaN, as in PyTorch.
    cw = jnp.zeros(11, jnp.float32)
    if path == "logits":
        assert np.isnan(jaxsce.cross_entropy(h @ w, y, weight=cw))
    else:
        assert np.isnan(jaxsce.linear_cross_entropy(h, w, y, weight=cw, vocab_block=4 if path == "streamed" else None))


# --- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_block", [None, 4096], ids=["single-pass", "streamed"])
@all_cases_fast
def test_bf16_class_weights_are_summed_in_float32_for_label_smoothing(vocab_block):
    rng = np.random.default_rng(5)
    n, d, v = 64, 32, 50000
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.1, jnp.float32)
    y = jnp.asarray(rng.integers(0, v, n))
    cw = jnp.asarray(rng.uniform(0.5, 1.5, v), jnp.bfloat16)
    out = jaxsce.linear_cross_entropy(h, w, y, weight=cw, label_smoothing=0.1, vocab_block=vocab_block)
    z64 = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    ref = np_cross_entropy(z64, y, weight=np.asarray(cw, np.float64), label_smoothing=0.1)
    np.testing.assert_allclose(out, ref, rtol=2e-6)


@pytest.mark.parametrize("h_dtype", [jnp.float32, jnp.bfloat16], ids=["h32", "h16"])
@pytest.mark.parametrize("w_dtype", [jnp.float32, jnp.bfloat16], ids=["w32", "w16"])
@pytest.mark.parametrize(
    "cw_dtype",
    [pytest.param(None, marks=pytest.mark.slow), pytest.param(jnp.float32, marks=pytest.mark.slow), jnp.bfloat16],
    ids=["nocw", "cw32", "cw16"],
)
@pytest.mark.parametrize("vocab_block", [None, 64], ids=["single-pass", "streamed"])
def test_mixed_precision_heads_compute_in_the_promoted_dtype(h_dtype, w_dtype, cw_dtype, vocab_block):
    # A float32 operand means float32 products: only bf16 x bf16 may round
    # the per-logit gradient to bf16. The reference is float64 of the same
    # (rounded) inputs.
    rng = np.random.default_rng(6)
    n, d, v = 48, 16, 200
    h = jnp.asarray(rng.normal(size=(n, d)), h_dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.5, w_dtype)
    y = jnp.asarray(rng.integers(0, v, n))
    cw = None if cw_dtype is None else jnp.asarray(rng.uniform(0.5, 1.5, v), cw_dtype)
    kw = dict(weight=cw, label_smoothing=0.1, vocab_block=vocab_block)
    loss, (dh, dw) = jax.value_and_grad(lambda h, w: jaxsce.linear_cross_entropy(h, w, y, **kw), (0, 1))(h, w)
    assert dh.dtype == h_dtype and dw.dtype == w_dtype and loss.dtype == jnp.float32

    def ref(h, w):
        return naive_ce(h @ w, y, None if cw is None else jnp.asarray(cw, jnp.float64), 0.1)

    h64, w64 = jnp.asarray(h, jnp.float64), jnp.asarray(w, jnp.float64)
    ref_loss, (rh, rw) = jax.value_and_grad(ref, (0, 1))(h64, w64)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-6)
    both16 = h_dtype == jnp.bfloat16 and w_dtype == jnp.bfloat16
    # Relative to each gradient's scale: a float32 output from float32
    # products stays at ~1e-6 (it was 1.6e-3 with the per-logit gradient
    # rounded to bf16); a bf16 output carries its own roundings (2^-9 each).
    for got, want, out_dtype in ((dh, rh, h_dtype), (dw, rw, w_dtype)):
        err = np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want))) / np.max(np.abs(np.asarray(want)))
        bound = 2e-2 if both16 else (8e-3 if out_dtype == jnp.bfloat16 else 2e-5)
        assert err < bound, (err, bound)


def naive_ce(z, y, cw, eps):
    """PyTorch's weighted, smoothed cross-entropy with "mean", on jax.nn.log_softmax (autodiff oracle)."""
    ls = jax.nn.log_softmax(z, axis=-1)
    v = z.shape[-1]
    w = jnp.ones(v, z.dtype) if cw is None else cw
    q = (1 - eps) * jax.nn.one_hot(y, v, dtype=z.dtype) * w[y][:, None] + (eps / v) * w[None, :]
    return jnp.sum(-q * ls) / jnp.sum(w[y])


# --- precision at large logits ---------------------------------------------------------------


# The two middle offsets run in the slow set.
OFFSETS = [0.0, pytest.param(30.0, marks=pytest.mark.slow), pytest.param(1e3, marks=pytest.mark.slow), 1e4]


def _exact_logits(offset, n=8, v=40, seed=7, spread=3.0):
    """float32 logits ``offset + x`` with ``x`` on a 1/32 grid: exactly representable up to 16384,
    so the float64 reference sees exactly the float32 inputs."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=(n, v)) * spread * 32) / 32
    return np.asarray(offset + x, np.float32)


@pytest.mark.parametrize("offset", OFFSETS)
@all_cases_fast
def test_log_probs_and_entropy_do_not_lose_precision_at_large_logits(offset):
    z = _exact_logits(offset)
    y = jnp.asarray(np.arange(8) % 40)
    lp, h = jaxsce.log_probs(jnp.asarray(z), y, return_entropy=True)
    rlp, rh = np_log_probs(np.asarray(z, np.float64), y)
    np.testing.assert_allclose(lp, rlp, rtol=0, atol=2e-6)
    np.testing.assert_allclose(h, rh, rtol=0, atol=2e-6)
    g = jax.grad(lambda z: jnp.sum(jaxsce.log_probs(z, y)))(jnp.asarray(z))
    rg = jax.grad(lambda z: jnp.sum(naive_log_probs(z, y)[0]))(jnp.asarray(z, jnp.float64))
    np.testing.assert_allclose(g, rg, rtol=0, atol=5e-7)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_gradient_does_not_lose_precision_at_large_logits(offset, smoothing):
    z = _exact_logits(offset)
    y = jnp.asarray(np.arange(8) % 40)
    out, g = jax.value_and_grad(lambda z: jaxsce.cross_entropy(z, y, label_smoothing=smoothing))(jnp.asarray(z))
    z64 = jnp.asarray(z, jnp.float64)
    ref, rg = jax.value_and_grad(lambda z: naive_ce(z, y, None, smoothing))(z64)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(g, rg, rtol=0, atol=1e-7)


def _exact_head(offset, t=8, d=8, v=40, seed=8):
    """float32 ``h``, ``W`` on coarse grids (``h @ W`` exact, on a 1/32 grid) and a bias ``offset``:
    the fused path's logits are exactly the float64 reference's."""
    rng = np.random.default_rng(seed)
    h = np.round(rng.normal(size=(t, d)) * 4) / 4
    w = np.round(rng.normal(size=(d, v)) * 4) / 8
    b = np.full(v, offset) + np.round(rng.normal(size=v) * 32) / 32
    return (jnp.asarray(x, jnp.float32) for x in (h, w, b))


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("vocab_block", [None, 16], ids=["single-pass", "streamed"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_cross_entropy_does_not_lose_precision_at_large_logits(offset, vocab_block, smoothing):
    h, w, b = _exact_head(offset)
    y = jnp.asarray(np.arange(8) * 5)
    kw = dict(linear_bias=b, label_smoothing=smoothing, vocab_block=vocab_block)
    out, (dh, dw) = jax.value_and_grad(lambda h, w: jaxsce.linear_cross_entropy(h, w, y, **kw), (0, 1))(h, w)
    h64, w64, b64 = (jnp.asarray(x, jnp.float64) for x in (h, w, b))
    ref, (rh, rw) = jax.value_and_grad(lambda h, w: naive_ce(h @ w + b64[None, :], y, None, smoothing), (0, 1))(
        h64, w64
    )
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(dh, rh, rtol=0, atol=1e-6)
    np.testing.assert_allclose(dw, rw, rtol=0, atol=1e-6)


@pytest.mark.parametrize("offset", OFFSETS)
@all_cases_fast
def test_fused_log_probs_do_not_lose_precision_at_large_logits(offset):
    h, w, b = _exact_head(offset)
    y = jnp.asarray(np.arange(8) * 5)
    kw = dict(linear_bias=b, vocab_block=16, return_entropy=True)
    lp, ent = jaxsce.linear_log_probs(h, w, y, **kw)
    z64 = np.asarray(h, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    rlp, rh = np_log_probs(z64, y)
    np.testing.assert_allclose(lp, rlp, rtol=0, atol=2e-6)
    np.testing.assert_allclose(ent, rh, rtol=0, atol=2e-6)
    dh = jax.grad(lambda h: jnp.sum(jaxsce.linear_log_probs(h, w, y, **kw)[0]))(h)
    b64 = jnp.asarray(b, jnp.float64)
    rg = jax.grad(lambda h: jnp.sum(naive_log_probs(h @ jnp.asarray(w, jnp.float64) + b64[None, :], y)[0]))(
        jnp.asarray(h, jnp.float64)
    )
    np.testing.assert_allclose(dh, rg, rtol=0, atol=2e-6)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_of_near_identical_heads_keeps_its_relative_precision(offset, divergence):
    # Late distillation: the student is close to the teacher, the divergence
    # small (~1e-3). Formed from absolute log-sum-exps it was off by 9% at
    # a logit offset of 1e3; row-max-relative terms keep it to float32 rounding.
    t = _exact_logits(offset, seed=9)
    rng = np.random.default_rng(10)
    s = np.asarray(t + np.round(rng.normal(size=t.shape) * 0.05 * 32) / 32, np.float32)
    ref = np_distillation(np.asarray(s, np.float64), np.asarray(t, np.float64), divergence)
    assert 1e-5 < ref.min() and ref.max() < 1e-2
    out = jaxsce.distillation_loss(jnp.asarray(s), jnp.asarray(t), divergence=divergence, reduction="none")
    np.testing.assert_allclose(out, ref, rtol=2e-3)
    g = jax.grad(lambda s: jaxsce.distillation_loss(s, jnp.asarray(t), divergence=divergence))(jnp.asarray(s))
    rg = jax.grad(lambda s: jnp.mean(naive_distillation(s, jnp.asarray(t, jnp.float64), divergence)))(
        jnp.asarray(s, jnp.float64)
    )
    np.testing.assert_allclose(g, rg, rtol=0, atol=2e-3 * np.abs(rg).max())


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("vocab_block", [None, 16], ids=["single-pass", "streamed"])
def test_fused_divergence_keeps_its_precision_at_large_logits(offset, divergence, vocab_block):
    h, w, b = _exact_head(offset)
    rng = np.random.default_rng(11)
    b_t = b + jnp.asarray(np.round(rng.normal(size=b.shape) * 0.05 * 32) / 32, jnp.float32)
    kw = dict(divergence=divergence, student_bias=b, teacher_bias=b_t, vocab_block=vocab_block, reduction="none")
    out = jaxsce.linear_distillation_loss(h, w, h, w, **kw)
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    ref = np_distillation(z + np.asarray(b, np.float64), z + np.asarray(b_t, np.float64), divergence)
    np.testing.assert_allclose(out, ref, rtol=2e-3)


def test_reverse_kl_gradient_at_a_tiny_temperature_has_no_cancellation_error():
    # At T = 1e-3 the student is one-hot; r - KL at its mode is two numbers
    # near 3000 that must cancel exactly (the gradient is 0 in float64).
    s, t = _rows(n=16, v=9, seed=21, scale=3.0)
    kw = dict(divergence="reverse_kl", temperature=1e-3)
    g = jax.grad(lambda s: jaxsce.distillation_loss(s, t, **kw))(s)
    rg = jax.grad(
        lambda s: jnp.mean(naive_distillation(s, jnp.asarray(t, jnp.float64), "reverse_kl", temperature=1e-3))
    )(jnp.asarray(s, jnp.float64))
    np.testing.assert_allclose(g, rg, atol=1e-6)
    np.testing.assert_allclose(
        jaxsce.distillation_loss(s, t, reduction="none", **kw),
        np_distillation(np.asarray(s, np.float64), np.asarray(t, np.float64), "reverse_kl", temperature=1e-3),
        rtol=1e-6,
    )


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@all_cases_fast
def test_kl_does_not_overflow_before_its_last_subtraction(divergence):
    s = jnp.array([[3e38, 1e38]], jnp.float32)
    t = jnp.array([[1e38, 3e38]], jnp.float32)
    out = jaxsce.distillation_loss(s, t, divergence=divergence)
    np.testing.assert_allclose(out, 2e38, rtol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("v", [1, 7, 300])
def test_identical_distributions_have_exactly_zero_divergence_and_gradient(divergence, v):
    s, _ = _rows(n=5, v=v, seed=12, scale=4.0)
    out = jaxsce.distillation_loss(s, s, divergence=divergence, reduction="none")
    assert np.all(np.asarray(out) == 0), out
    g = jax.grad(lambda x: jaxsce.distillation_loss(x, s, divergence=divergence))(s)
    assert np.all(np.asarray(g) == 0)
    # The fused path, the same head twice.
    h, w = _head(t=5, v=v, seed=13)
    fused = jaxsce.linear_distillation_loss(h, w, h, w, divergence=divergence, reduction="none", vocab_block=4)
    assert np.all(np.asarray(fused) == 0), fused


@pytest.mark.parametrize("divergence", DIVERGENCES)
@all_cases_fast
def test_a_divergence_is_never_negative(divergence):
    # Rows shifted by a constant are the same distribution; rounding of the
    # shift must not give a negative divergence.
    s, _ = _rows(n=64, v=50, seed=14, scale=4.0)
    shifts = jnp.asarray(np.random.default_rng(15).uniform(-50, 50, (64, 1)), jnp.float32)
    out = jaxsce.distillation_loss(s, s + shifts, divergence=divergence, reduction="none")
    assert np.all(np.asarray(out) >= 0)
    assert np.all(np.asarray(out) < 1e-5)


# --- traced and mistyped options --------------------------------------------------------------


def _traced_calls():
    z, t = _rows(seed=16)
    h, w = _head(seed=17)
    y = jnp.arange(6) % 11
    return {
        "log_probs": lambda T: jaxsce.log_probs(z, y, temperature=T, return_entropy=True),
        "linear_log_probs": lambda T: jaxsce.linear_log_probs(h, w, y, temperature=T, return_entropy=True),
        **{
            f"distill-{d}": (lambda T, d=d: jaxsce.distillation_loss(z, t, divergence=d, temperature=T))
            for d in DIVERGENCES
        },
        **{
            f"linear_distill-{d}": (
                lambda T, d=d: jaxsce.linear_distillation_loss(h, w, h, w * 2, divergence=d, temperature=T)
            )
            for d in DIVERGENCES
        },
    }


@pytest.mark.parametrize("call", list(_traced_calls()))
@pytest.mark.parametrize("temperature", [np.inf, -1.0, 0.0, np.nan])
def test_traced_out_of_range_temperature_gives_nan(call, temperature):
    fn = _traced_calls()[call]
    out = jax.jit(fn)(jnp.float32(temperature))
    assert all(np.all(np.isnan(o)) for o in jax.tree.leaves(out)), out
    # A concrete one raises, naming the option.
    with pytest.raises(ValueError, match="temperature"):
        fn(float(temperature))


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5, 2.0, np.inf])
@all_cases_fast
def test_traced_out_of_range_beta_gives_nan(beta):
    z, t = _rows(seed=18)
    out = jax.jit(lambda b: jaxsce.distillation_loss(z, t, divergence="jsd", beta=b))(jnp.float32(beta))
    assert np.isnan(out)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda z, y: jaxsce.log_probs(z, y, temperature="0.5"), "temperature"),
        (lambda z, y: jaxsce.log_probs(z, y, logit_softcap="30"), "logit_softcap"),
        (lambda z, y: jaxsce.cross_entropy(z, y, label_smoothing="0.1"), "label_smoothing"),
        (lambda z, y: jaxsce.cross_entropy(z, y, z_loss=b"0.1"), "z_loss"),
        (lambda z, y: jaxsce.cross_entropy(z, y, logit_softcap=np.str_("30")), "logit_softcap"),
        (lambda z, y: jaxsce.distillation_loss(z, z, temperature="2"), "temperature"),
        (lambda z, y: jaxsce.distillation_loss(z, z, divergence="jsd", beta="0.5"), "beta"),
        (lambda z, y: jaxsce.linear_cross_entropy(z, jnp.ones((11, 3)), y, label_smoothing="0.1"), "label_smoothing"),
    ],
)
def test_string_float_options_are_refused_naming_the_option(call, name):
    z, _ = _rows()
    y = jnp.arange(6) % 11
    with pytest.raises(TypeError, match=name):
        call(z, y)


@pytest.mark.parametrize("beta", [1.0, 0.0, -3.0])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@all_cases_fast
def test_beta_is_not_checked_when_the_divergence_does_not_use_it(divergence, beta):
    s, t = _rows(seed=19)
    out = jaxsce.distillation_loss(s, t, divergence=divergence, beta=beta)
    np.testing.assert_allclose(
        out, np_distillation(np.asarray(s, np.float64), np.asarray(t, np.float64), divergence).mean(), rtol=1e-5
    )
    h, w = _head(seed=20)
    assert np.isfinite(jaxsce.linear_distillation_loss(h, w, h, w * 2, divergence=divergence, beta=beta))


# --- the NaN policy, over every public loss ------------------------------------------------------

N_POLICY, D_POLICY, V_POLICY, BAD_ROW = 6, 8, 11, 2


def _policy_inputs(seed=30):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(N_POLICY, D_POLICY)))
    w = jnp.asarray(rng.normal(size=(D_POLICY, V_POLICY)) * 0.5)
    ht = jnp.asarray(rng.normal(size=(N_POLICY, D_POLICY)))
    wt = jnp.asarray(rng.normal(size=(D_POLICY, V_POLICY)) * 0.5)
    y = jnp.asarray(np.arange(N_POLICY) % 3)  # never column 3, where a -inf goes
    return h, w, ht, wt, y


def _policy_loss(name, path):
    """``loss(h, b, where, reduction)`` for one public loss: ``h`` the (student's) hidden
    states, ``b`` a bias added to both heads' logits; logit-level losses take ``h @ w + b``."""
    _, w, ht, wt, y = _policy_inputs()
    vb = {"single-pass": None, "streamed": 4, "logits": None}[path]

    def loss(h, b, where, reduction):
        z, t = h @ w + b[None, :], ht @ wt + b[None, :]
        if name == "cross_entropy":
            if path == "logits":
                return jaxsce.cross_entropy(z, y, where=where, reduction=reduction)
            return jaxsce.linear_cross_entropy(h, w, y, linear_bias=b, where=where, reduction=reduction, vocab_block=vb)
        if name == "log_probs":
            if path == "logits":
                lp, ent = jaxsce.log_probs(z, y, where=where, return_entropy=True)
            else:
                lp, ent = jaxsce.linear_log_probs(
                    h, w, y, linear_bias=b, where=where, return_entropy=True, vocab_block=vb
                )
            per = lp + 0.1 * ent
            return per if reduction == "none" else jnp.mean(per)
        divergence = name.split("-")[1]
        if path == "logits":
            return jaxsce.distillation_loss(z, t, divergence=divergence, where=where, reduction=reduction)
        return jaxsce.linear_distillation_loss(
            h,
            w,
            ht,
            wt,
            student_bias=b,
            teacher_bias=b,
            divergence=divergence,
            where=where,
            reduction=reduction,
            vocab_block=vb,
        )

    return loss


POLICY_CASES = [
    (name, path)
    for name in ["cross_entropy", "log_probs", *(f"distill-{d}" for d in DIVERGENCES)]
    for path in ["logits", "single-pass", "streamed"]
    if not (name == "log_probs" and path == "single-pass")  # per-token outputs: streamed only
]


@pytest.mark.parametrize("name,path", POLICY_CASES, ids=lambda x: x)
@pytest.mark.parametrize("bad", ["nan", "+inf", "-inf"])
@pytest.mark.parametrize("row", ["counted", "excluded"])
def test_nan_policy(name, path, bad, row):
    """NaN or +inf in a counted example: that example's value and gradient are NaN.
    Anything in an excluded example: exactly 0 in value and gradient. A -inf logit
    (a masked class) leaves everything finite."""
    h, *_ = _policy_inputs()
    b = jnp.zeros(V_POLICY)
    loss = _policy_loss(name, path)
    if bad == "-inf":
        b = b.at[3].set(-jnp.inf)  # a masked class, for every example and both heads
    else:
        h = h.at[BAD_ROW, 0].set(jnp.nan if bad == "nan" else jnp.inf)  # a +inf logit, and -inf ones
    where = jnp.ones(N_POLICY, bool)
    if row == "excluded":
        where = where.at[BAD_ROW].set(False)
    others = np.arange(N_POLICY) != BAD_ROW
    per = np.asarray(loss(h, b, where, "none")) if path != "single-pass" else None
    value, dh = jax.value_and_grad(lambda h: loss(h, b, where, "mean"))(h)
    dh = np.asarray(dh)
    if bad == "-inf" or row == "excluded":
        assert np.isfinite(value) and np.all(np.isfinite(dh))
        if per is not None:
            assert np.all(np.isfinite(per))
        if row == "excluded":
            assert np.all(dh[BAD_ROW] == 0)
            if per is not None:
                assert per[BAD_ROW] == 0
            # The same as leaving the example out.
            h_clean = h.at[BAD_ROW].set(0.0)
            np.testing.assert_allclose(value, loss(h_clean, b, where, "mean"), rtol=1e-12)
    else:
        assert np.isnan(value)
        assert np.any(np.isnan(dh[BAD_ROW]))
        if per is not None:
            assert np.isnan(per[BAD_ROW]) and np.all(np.isfinite(per[others]))


# --- forward mode for every loss -------------------------------------------------------------------


def _forward_mode_cases():
    rng = np.random.default_rng(40)
    t, d, dt, v = 13, 8, 5, 37
    h, w, b = (jnp.asarray(rng.normal(size=s)) for s in ((t, d), (d, v), (v,)))
    ht, wt = jnp.asarray(rng.normal(size=(t, dt))), jnp.asarray(rng.normal(size=(dt, v)))
    y = jnp.asarray(rng.integers(0, v, t))
    where = jnp.asarray(np.arange(t) % 5 != 1)
    temp = 0.7
    blocks = dict(token_block=4, vocab_block=10)  # ragged: neither divides

    def naive_lp(h, w, b):
        lp, ent = naive_log_probs(h @ w + b[None, :], y, temperature=temp)
        return jnp.where(where, lp, 0), jnp.where(where, ent, 0)

    def naive_div(divergence):
        def f(h, w, b):
            per = naive_distillation(h @ w + b[None, :], ht @ wt, divergence, beta=0.3, temperature=2.0)
            return jnp.where(where, per, 0)

        return f

    lp_kw = dict(temperature=temp, return_entropy=True, where=where, derivative="jvp")
    cases = {
        "log_probs": (lambda h, w, b: jaxsce.log_probs(h @ w + b[None, :], y, **lp_kw), naive_lp),
        "linear_log_probs": (
            lambda h, w, b: jaxsce.linear_log_probs(h, w, y, linear_bias=b, **lp_kw, **blocks),
            naive_lp,
        ),
    }
    for div in DIVERGENCES:
        kw = dict(divergence=div, beta=0.3, temperature=2.0, where=where, reduction="none", derivative="jvp")
        cases[f"distillation_loss-{div}"] = (
            lambda h, w, b, kw=kw: jaxsce.distillation_loss(h @ w + b[None, :], ht @ wt, **kw),
            naive_div(div),
        )
        cases[f"linear_distillation_loss-{div}"] = (
            lambda h, w, b, kw=kw: jaxsce.linear_distillation_loss(h, w, ht, wt, student_bias=b, **kw, **blocks),
            naive_div(div),
        )
    return (h, w, b), cases


@pytest.mark.parametrize("case", list(_forward_mode_cases()[1]))
def test_forward_mode_works_for_every_loss(case):
    primals, cases = _forward_mode_cases()
    ours, naive = cases[case]
    rng = np.random.default_rng(41)
    tangents = tuple(jnp.asarray(rng.normal(size=x.shape)) for x in primals)
    out, tan = jax.jvp(ours, primals, tangents)
    ref, ref_tan = jax.jvp(naive, primals, tangents)
    for a, r in zip(jax.tree.leaves((out, tan)), jax.tree.leaves((ref, ref_tan))):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)
    # jacfwd with respect to the bias, one column per class.
    first = lambda f: lambda b: jax.tree.leaves(f(primals[0], primals[1], b))[0]  # noqa: E731
    np.testing.assert_allclose(jax.jacfwd(first(ours))(primals[2]), jax.jacfwd(first(naive))(primals[2]), atol=1e-12)


@pytest.mark.skipif(
    not jaxsce._base._spmd.jax_version() >= (0, 10), reason="reverse mode through the streaming jvp needs jax >= 0.10"
)
@pytest.mark.parametrize(
    "case", ["log_probs", "linear_log_probs", "distillation_loss-jsd", "linear_distillation_loss-reverse_kl"]
)
def test_reverse_mode_through_the_forward_rule_equals_the_reverse_rule(case):
    primals, cases = _forward_mode_cases()
    ours, naive = cases[case]
    scalar = lambda f: (
        lambda *a: sum(jnp.sum(x * (1.0 + jnp.arange(x.shape[0], dtype=x.dtype))) for x in jax.tree.leaves(f(*a)))
    )  # noqa: E731
    g = jax.grad(scalar(ours), argnums=(0, 1, 2))(*primals)
    rg = jax.grad(scalar(naive), argnums=(0, 1, 2))(*primals)
    for a, r in zip(g, rg):
        np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-11)
