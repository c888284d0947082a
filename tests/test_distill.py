"""distillation_loss and linear_distillation_loss against float64 NumPy and jax.grad of the naive formula."""

import compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from marks import CountingJit, all_cases_fast, fast_cases
from reference import TOL, naive_distillation, np_distillation

import jaxsce

N, DS, DT, V = 29, 8, 12, 200
DIVERGENCES = ["kl", "reverse_kl", "jsd"]
# (temperature, beta)
SETTINGS = [(1.0, 0.5), (0.7, 0.2), (2.0, 0.9)]


def _logits(dtype=jnp.float64, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(N, V)) * scale, dtype), jnp.asarray(rng.normal(size=(N, V)) * scale, dtype))


@fast_cases(lambda p: p["setting"] == (0.7, 0.2) or p["dtype"] == jnp.float64)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"T{s[0]}-b{s[1]}")
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16], ids=["f64", "f32", "bf16"])
def test_values_match_float64_numpy(divergence, setting, dtype):
    temperature, beta = setting
    s, t = _logits(dtype)
    kw = dict(divergence=divergence, beta=beta, temperature=temperature)
    out = jaxsce.distillation_loss(s, t, reduction="none", **kw)
    assert out.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
    ref = np_distillation(np.asarray(s, np.float64), np.asarray(t, np.float64), **kw)
    rtol = TOL[np.dtype(dtype)][0]
    np.testing.assert_allclose(out, ref, rtol=max(rtol, 1e-11), atol=10 * rtol)
    np.testing.assert_allclose(jaxsce.distillation_loss(s, t, **kw), ref.mean(), rtol=max(rtol, 1e-11), atol=rtol)


@fast_cases(lambda p: p["setting"] == (0.7, 0.2))
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"T{s[0]}-b{s[1]}")
def test_gradient_equals_autodiff_of_the_naive_formula(divergence, setting):
    temperature, beta = setting
    s, t = _logits(seed=1)
    kw = dict(divergence=divergence, beta=beta, temperature=temperature)
    g = jnp.asarray(np.random.default_rng(2).normal(size=N))
    ours = lambda s: jnp.sum(g * jaxsce.distillation_loss(s, t, reduction="none", **kw))  # noqa: E731
    naive = lambda s: jnp.sum(g * naive_distillation(s, t, **kw))  # noqa: E731
    np.testing.assert_allclose(jax.grad(ours)(s), jax.grad(naive)(s), rtol=1e-10, atol=1e-13)
    # The teacher is a constant.
    assert np.all(np.asarray(jax.grad(lambda t: jaxsce.distillation_loss(s, t, **kw))(t)) == 0)


def _heads(layout="dv", seed=3):
    rng = np.random.default_rng(seed)
    ws, wt = rng.normal(size=(DS, V)) * 0.5, rng.normal(size=(DT, V)) * 0.5
    lay = (lambda w: w) if layout == "dv" else (lambda w: w.T)
    return dict(
        hs=jnp.asarray(rng.normal(size=(N, DS))),
        ws=jnp.asarray(lay(ws)),
        bs=jnp.asarray(rng.normal(size=V) * 0.1),
        ht=jnp.asarray(rng.normal(size=(N, DT))),
        wt=jnp.asarray(lay(wt)),
        bt=jnp.asarray(rng.normal(size=V) * 0.1),
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize(
    "blocks,reduction",
    [
        ((8, 64), "none"),  # streaming, ragged blocks
        ((None, None), "mean"),  # single pass (d_W fits the budget)
        pytest.param((5, 199), "sum", marks=pytest.mark.slow),
        pytest.param((None, 64), "mean", marks=pytest.mark.slow),  # streaming scalar
    ],
)
def test_fused_equals_the_logit_level_loss_of_the_two_heads(divergence, layout, blocks, reduction):
    d = _heads(layout)
    where = jnp.asarray(np.arange(N) % 4 != 1)
    kw = dict(divergence=divergence, beta=0.3, temperature=0.8, where=where, reduction=reduction)
    lay = (lambda w: w) if layout == "dv" else (lambda w: w.T)
    cot = jnp.asarray(np.random.default_rng(4).normal(size=(N,) if reduction == "none" else ()))

    def fused(hs, ws, bs):
        out = jaxsce.linear_distillation_loss(
            hs, ws, d["ht"], d["wt"], student_bias=bs, teacher_bias=d["bt"], weight_layout=layout,
            token_block=blocks[0], vocab_block=blocks[1], **kw,
        )  # fmt: skip
        return jnp.sum(cot * out)

    def plain(hs, ws, bs):
        s, t = hs @ lay(ws) + bs[None, :], d["ht"] @ lay(d["wt"]) + d["bt"][None, :]
        return jnp.sum(cot * jaxsce.distillation_loss(s, t, **kw))

    args = (d["hs"], d["ws"], d["bs"])
    val, grads = jax.value_and_grad(fused, (0, 1, 2))(*args)
    val_ref, grads_ref = jax.value_and_grad(plain, (0, 1, 2))(*args)
    np.testing.assert_allclose(val, val_ref, rtol=1e-12, atol=1e-13)
    for a, r in zip(grads, grads_ref):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)
    # No gradient reaches the teacher's head.
    tg = jax.grad(
        lambda ht, wt: jaxsce.linear_distillation_loss(d["hs"], d["ws"], ht, wt, weight_layout=layout, **kw).sum(),
        (0, 1),
    )(d["ht"], d["wt"])
    assert all(np.all(np.asarray(x) == 0) for x in tg)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits_and_infinities(divergence):
    big = 1e4
    s = jnp.array([[big, 0.0, -jnp.inf, -big], [1.0, 2.0, 3.0, -jnp.inf], [0.0, 0.0, 0.0, 0.0]])
    t = jnp.array([[big, -big, 0.0, -jnp.inf], [3.0, -jnp.inf, 1.0, -jnp.inf], [0.0, 1.0, -jnp.inf, 2.0]])
    out = jaxsce.distillation_loss(s, t, divergence=divergence, reduction="none")
    ref = np_distillation(s, t, divergence)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-300)
    # Infinite exactly where the float64 definition is (reverse KL of rows 1-2:
    # the student has mass where the teacher's logit is -inf), else finite.
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(out), finite)
    assert finite[0] and np.all(np.asarray(out) >= -1e-12)
    assert np.all(finite) == (divergence != "reverse_kl")
    g = jax.grad(lambda s: jnp.sum(jaxsce.distillation_loss(s, t, divergence=divergence, where=jnp.asarray(finite))))(s)
    assert np.all(np.isfinite(g))


def test_infinite_exactly_where_the_mathematics_is():
    # The student gives probability 0 where the teacher has mass: KL(P_t || P_s) = inf;
    # the reverse KL and the JSD stay finite.
    s = jnp.array([[0.0, -jnp.inf, 1.0]])
    t = jnp.array([[0.0, 0.5, 1.0]])
    assert np.isposinf(jaxsce.distillation_loss(s, t, divergence="kl"))
    for divergence in ("reverse_kl", "jsd"):
        out = jaxsce.distillation_loss(s, t, divergence=divergence)
        np.testing.assert_allclose(out, np_distillation(s, t, divergence)[0], rtol=1e-12)
    np.testing.assert_allclose(jaxsce.distillation_loss(t, t), 0.0, atol=1e-15)


@pytest.mark.parametrize("fn", ["logits", "linear"])
def test_masked_rows_are_exactly_zero_even_when_nan(fn):
    d = _heads(seed=5)
    where = jnp.asarray(np.arange(N) % 3 != 0)
    keep = np.asarray(where)
    if fn == "logits":
        s = jnp.where(where[:, None], d["hs"] @ d["ws"], jnp.nan)
        t = jnp.where(where[:, None], d["ht"] @ d["wt"], jnp.nan)
        f = lambda s: jaxsce.distillation_loss(s, t, divergence="jsd", where=where, reduction="none")  # noqa: E731
        args = (s,)
    else:
        hs = jnp.where(where[:, None], d["hs"], jnp.nan)
        ht = jnp.where(where[:, None], d["ht"], jnp.nan)
        f = lambda hs, ws: jaxsce.linear_distillation_loss(  # noqa: E731
            hs, ws, ht, d["wt"], divergence="jsd", where=where, reduction="none", vocab_block=64
        )
        args = (hs, d["ws"])
    out = f(*args)
    assert np.all(np.asarray(out)[~keep] == 0) and np.all(np.isfinite(np.asarray(out)[keep]))
    grads = jax.grad(lambda *a: jnp.sum(f(*a)), tuple(range(len(args))))(*args)
    assert np.all(np.asarray(grads[0])[~keep] == 0) and np.all(np.isfinite(np.asarray(grads[0])[keep]))
    if fn == "linear":
        assert np.all(np.isfinite(grads[1]))


def test_16_bit_heads_accumulate_in_float32():
    d = _heads(seed=6)
    args16 = [d[k].astype(jnp.bfloat16) for k in ("hs", "ws", "ht", "wt")]
    out = jaxsce.linear_distillation_loss(*args16, reduction="none", vocab_block=64)
    assert out.dtype == jnp.float32
    a = [np.asarray(x, np.float64) for x in args16]
    np.testing.assert_allclose(out, np_distillation(a[0] @ a[1], a[2] @ a[3], "kl"), rtol=1e-4, atol=1e-5)
    dh, dw = jax.grad(lambda h, w: jaxsce.linear_distillation_loss(h, w, *args16[2:]), (0, 1))(*args16[:2])
    assert dh.dtype == dw.dtype == jnp.bfloat16


def test_traced_temperature_and_beta_compile_once():
    s, t = _logits(jnp.float32, seed=7)

    @CountingJit
    def f(s, temperature, beta):
        return jaxsce.distillation_loss(s, t, divergence="jsd", temperature=temperature, beta=beta)

    for temperature, beta in ((0.5, 0.1), (2.0, 0.7)):
        ref = np_distillation(s, t, "jsd", beta=beta, temperature=temperature).mean()
        np.testing.assert_allclose(f(s, jnp.float32(temperature), jnp.float32(beta)), ref, rtol=1e-5)
    assert f.traces == 1
    assert np.isnan(f(s, jnp.float32(1.0), jnp.float32(1.5)))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s, t: jaxsce.distillation_loss(s, t[:, :-1]), "teacher_logits have shape"),
        (lambda s, t: jaxsce.distillation_loss(s, t, divergence="js"), "divergence must be one of"),
        (lambda s, t: jaxsce.distillation_loss(s, t, divergence="jsd", beta=1.0), "beta"),
        (lambda s, t: jaxsce.distillation_loss(s, t, divergence="jsd", beta=0.0), "beta"),
        (lambda s, t: jaxsce.distillation_loss(s, t, temperature=-1.0), "temperature"),
        (lambda s, t: jaxsce.distillation_loss(s, t.astype(jnp.int32)), "teacher_logits"),
        (lambda s, t: jaxsce.distillation_loss(s, t, reduction="avg"), "reduction"),
        (
            lambda s, t: jaxsce.linear_distillation_loss(s, jnp.zeros((V, 3)), t, jnp.zeros((V, 4))),
            "teacher_weight of shape",
        ),
        (
            lambda s, t: jaxsce.linear_distillation_loss(s, jnp.zeros((V, 3)), t[:3], jnp.zeros((V, 3))),
            "teacher_hidden has shape",
        ),
        (lambda s, t: jaxsce.linear_distillation_loss(s, jnp.zeros((5, 3)), t, jnp.zeros((V, 3))), "student_weight"),
    ],
)
@all_cases_fast
def test_bad_input_raises_naming_the_argument(call, match):
    s, t = _logits(jnp.float32)
    with pytest.raises((TypeError, ValueError), match=match):
        call(s, t)


def test_memory_of_both_heads_stays_within_384_mib():
    """value_and_grad wrt the student's hidden states and weight, both heads at
    8192 x 2304 x 256000 bf16: compiled temporaries <= 384 MiB."""
    if compat.JAX < (0, 10):
        pytest.skip("the block memory model is fitted to XLA in jax >= 0.10")
    t, d, v = 8192, 2304, 256000
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((t, d), (d, v), (t, d), (d, v))]
    for divergence in DIVERGENCES:
        loss = lambda hs, ws, ht, wt: jaxsce.linear_distillation_loss(hs, ws, ht, wt, divergence=divergence)  # noqa: E731,B023
        compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*shapes).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp <= 384 * 2**20, (divergence, temp / 2**20)


# --- the hard-label term in the same stream ---------------------------------------------------


def _hard_case(seed=50):
    rng = np.random.default_rng(seed)
    n, ds, dt, v = 12, 6, 5, 41
    y = rng.integers(0, v, size=n)
    y[[1, 7]] = -100
    return dict(
        hs=jnp.asarray(rng.normal(size=(n, ds))),
        ws=jnp.asarray(rng.normal(size=(ds, v)) * 0.6),
        ht=jnp.asarray(rng.normal(size=(n, dt))),
        wt=jnp.asarray(rng.normal(size=(dt, v)) * 0.6),
        y=jnp.asarray(y, jnp.int32),
    )


def _naive_hard(hs, ws, ht, wt, y, divergence, temperature, hard_weight, soft_weight, beta=0.5):
    """Liger-Kernel's definition: over the tokens whose label is not -100, the mean of
    soft_weight * D(student / T, teacher / T) + hard_weight * CE(student, y)."""
    zs, zt = hs @ ws, ht @ wt
    m = y != -100
    per_row = naive_distillation(zs, zt, divergence, beta=beta, temperature=temperature)
    ls = jax.nn.log_softmax(zs, axis=-1)
    ce = -jnp.take_along_axis(ls, jnp.where(m, y, 0)[:, None], axis=-1)[:, 0]
    total = soft_weight * per_row + hard_weight * ce
    return jnp.sum(jnp.where(m, total, 0)) / jnp.sum(m).astype(total.dtype)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("path", ["single pass", "streamed", "logits"])
def test_hard_label_term_in_the_same_stream(divergence, temperature, path):
    """Fused on both paths, and ``distillation_loss`` of the logits (which lacked labels and the weights)."""
    d = _hard_case()
    blocks = dict(vocab_block=16) if path == "streamed" else {}
    opts = dict(divergence=divergence, temperature=temperature, labels=d["y"], hard_weight=0.3, soft_weight=0.7)

    def ours(hs, ws):
        if path == "logits":
            return jaxsce.distillation_loss(hs @ ws, d["ht"] @ d["wt"], **opts, ignore_index=-100)
        return jaxsce.linear_distillation_loss(hs, ws, d["ht"], d["wt"], **opts, ignore_index=-100, **blocks)

    def naive(hs, ws):
        return _naive_hard(hs, ws, d["ht"], d["wt"], d["y"], divergence, temperature, 0.3, 0.7)

    got, got_g = jax.value_and_grad(ours, argnums=(0, 1))(d["hs"], d["ws"])
    want, want_g = jax.value_and_grad(naive, argnums=(0, 1))(d["hs"], d["ws"])
    np.testing.assert_allclose(got, want, rtol=1e-11)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("level", ["fused", "logits"])
def test_hard_label_term_errors_and_soft_only(level):
    d = _hard_case(51)
    if level == "fused":
        args, f = (d["hs"], d["ws"], d["ht"], d["wt"]), jaxsce.linear_distillation_loss
    else:
        args, f = (d["hs"] @ d["ws"], d["ht"] @ d["wt"]), jaxsce.distillation_loss
    with pytest.raises(ValueError, match="pass labels"):
        f(*args, hard_weight=0.5)
    with pytest.raises(ValueError, match="ignore_index applies to labels"):
        f(*args, ignore_index=3)
    with pytest.raises(TypeError, match="labels must be integer class ids"):
        f(*args, labels=d["y"].astype(jnp.float32), hard_weight=0.5)
    # labels with hard_weight 0: ignore_index masks the soft term only.
    m = d["y"] != -100
    got = f(*args, labels=d["y"], ignore_index=-100)
    np.testing.assert_allclose(got, f(*args, where=m), rtol=1e-12)


def _liger_jsd():
    try:
        import torch
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    return torch, LigerFusedLinearJSDLoss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_hard_label_jsd_equals_liger_kernel(temperature, beta):
    """Liger-Kernel 0.8.5's LigerFusedLinearJSDLoss with weight_hard_loss and weight_soft_loss (chunked,
    pure torch) on the same float64 inputs: the loss and the student's gradients (its logits are float32)."""
    peer = _liger_jsd()
    if peer is None:
        pytest.skip("liger-kernel (and torch) not installed: pip install -e '.[liger]'")
    torch, Jsd = peer
    d = _hard_case(52)
    t = lambda x: torch.tensor(np.asarray(x))  # noqa: E731
    hs, ws = t(d["hs"]).requires_grad_(True), t(d["ws"].T).requires_grad_(True)
    module = Jsd(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=beta, temperature=temperature, compiled=False)
    loss_t = module(hs, ws, t(d["ht"]), t(d["wt"].T), t(d["y"]).long())
    loss_t.backward()

    def ours(h, w):
        return jaxsce.linear_distillation_loss(
            h, w, d["ht"], d["wt"].T, weight_layout="vd", divergence="jsd", beta=beta, temperature=temperature,
            labels=d["y"], hard_weight=0.3, soft_weight=0.7, ignore_index=-100,
        )  # fmt: skip

    loss, (g_h, g_w) = jax.value_and_grad(ours, argnums=(0, 1))(d["hs"], d["ws"].T)
    np.testing.assert_allclose(float(loss), loss_t.item(), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(g_h, hs.grad.numpy(), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(g_w, ws.grad.numpy(), rtol=2e-5, atol=2e-6)
