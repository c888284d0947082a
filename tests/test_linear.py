"""linear_cross_entropy against the plain path cross_entropy(h @ W + b, y) differentiated by JAX."""

import compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from marks import all_cases_fast, fast_cases
from reference import naive_cross_entropy

import jaxsce

T, D, V = 37, 16, 300  # the block sizes used below divide neither


def _data(dtype=np.float32, seed=0, batch=None):
    rng = np.random.default_rng(seed)
    shape = batch or (T,)
    h = jnp.asarray(rng.normal(size=shape + (D,)), dtype)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.3, dtype)
    b = jnp.asarray(rng.normal(size=(V,)) * 0.1, dtype)
    y = rng.integers(0, V, size=shape)
    y.reshape(-1)[[3, 11]] = -100
    return h, w, b, jnp.asarray(y, jnp.int32)


OPTIONS = [
    dict(ignore_index=-100),
    dict(ignore_index=-100, label_smoothing=0.1),
    dict(ignore_index=-100, z_loss=1e-3, logit_softcap=4.0),
    dict(ignore_index=-100, class_weight=True, label_smoothing=0.2),
    dict(ignore_index=-100, where=True, class_weight=True, z_loss=1e-2),
]


def _resolve(kw, y):
    kw = dict(kw)
    if kw.pop("class_weight", False):
        kw["weight"] = jnp.asarray(np.linspace(0.5, 1.5, V), jnp.float32)
    if kw.pop("where", False):
        kw["where"] = jnp.asarray(np.arange(y.size).reshape(y.shape) % 5 != 0)
    return kw, dict(kw)


def _temp_bytes(loss, t, d, v, dtype=jnp.float32, layout="dv", mode="grad"):
    """Compiled temporaries at these shapes of value_and_grad(loss) w.r.t. (h, W)
    (``mode="grad"``) or of its jax.jvp in a direction (th, tW) given as inputs."""
    if compat.JAX < (0, 10):
        pytest.skip("the block memory model is fitted to XLA in jax >= 0.10")
    hw = (jax.ShapeDtypeStruct((t, d), dtype), jax.ShapeDtypeStruct((d, v) if layout == "dv" else (v, d), dtype))
    y = jax.ShapeDtypeStruct((t,), jnp.int32)
    if mode == "grad":
        fn, args = jax.value_and_grad(loss, (0, 1)), (*hw, y)
    else:
        fn, args = (lambda h, w, th, tw, y: jax.jvp(lambda h, w: loss(h, w, y), (h, w), (th, tw))), (*hw, *hw, y)
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o))
# (None, None) and (5, None) take the single-pass path for "mean"/"sum".
@fast_cases(lambda p: p["reduction"] != "sum")
@pytest.mark.parametrize(
    "blocks",
    [(8, 64), *(pytest.param(b, marks=pytest.mark.slow) for b in [(37, 300), (5, 299), (5, None), (None, None)])],
)
def test_matches_plain_path(opts, reduction, blocks):
    h, w, b, y = _data()
    kw, plain_kw = _resolve(opts, y)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=() if reduction != "none" else (T,)), jnp.float32)
    fused = lambda h, w, b: jnp.sum(
        cot
        * jaxsce.linear_cross_entropy(
            h, w, y, linear_bias=b, reduction=reduction, token_block=blocks[0], vocab_block=blocks[1], **kw
        )
    )
    plain = lambda h, w, b: jnp.sum(cot * jaxsce.cross_entropy(h @ w + b[None, :], y, reduction=reduction, **plain_kw))
    np.testing.assert_allclose(fused(h, w, b), plain(h, w, b), rtol=2e-6)
    for g, g_ref in zip(jax.grad(fused, (0, 1, 2))(h, w, b), jax.grad(plain, (0, 1, 2))(h, w, b)):
        np.testing.assert_allclose(g, g_ref, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("vocab_block", [64, None])
def test_gradient_matches_naive_autodiff_in_float64(vocab_block):
    h, w, b, y = _data(np.float64)
    y = jnp.abs(y) % V
    fused = lambda h, w, b: jaxsce.linear_cross_entropy(h, w, y, linear_bias=b, token_block=8, vocab_block=vocab_block)
    naive = lambda h, w, b: naive_cross_entropy(h @ w + b[None, :], y)
    np.testing.assert_allclose(fused(h, w, b), naive(h, w, b), rtol=1e-12)
    for g, g_ref in zip(jax.grad(fused, (0, 1, 2))(h, w, b), jax.grad(naive, (0, 1, 2))(h, w, b)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-13)


def test_batch_dims_tied_layout_and_aux():
    h, w, b, y = _data(batch=(3, 7))
    kw = dict(ignore_index=-100, return_aux=True, token_block=4, vocab_block=128)
    loss, aux = jaxsce.linear_cross_entropy(h, w.T, y, weight_layout="vd", **kw)
    loss_ref, aux_ref = jaxsce.cross_entropy(h @ w, y, ignore_index=-100, return_aux=True)
    np.testing.assert_allclose(loss, loss_ref, rtol=2e-6)
    np.testing.assert_allclose(aux.lse, aux_ref.lse, rtol=2e-6)
    assert aux.lse.shape == (3, 7)
    np.testing.assert_allclose(aux.accuracy, aux_ref.accuracy)
    g = jax.grad(
        lambda h, wt: jaxsce.linear_cross_entropy(h, wt, y, weight_layout="vd", ignore_index=-100, vocab_block=128)
    )(h, w.T)
    g_ref = jax.grad(lambda h, w: jaxsce.cross_entropy(h @ w, y, ignore_index=-100))(h, w)
    np.testing.assert_allclose(g, g_ref, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("blocks", [(8, 64), (5, 299), (None, None)])
def test_bf16_inputs_accumulate_in_float32_and_return_input_dtypes(layout, blocks):
    h, w, b, y = _data(jnp.bfloat16)
    y = jnp.abs(y) % V
    w_in = w if layout == "dv" else w.T
    fused = lambda h, w, b: jaxsce.linear_cross_entropy(
        h, w, y, linear_bias=b, weight_layout=layout, token_block=blocks[0], vocab_block=blocks[1]
    )
    loss, grads = jax.value_and_grad(fused, (0, 1, 2))(h, w_in, b)
    assert loss.dtype == jnp.float32 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert grads[1].shape == w_in.shape
    f32 = lambda x: x.astype(jnp.float32)
    plain = lambda h, w, b: jaxsce.cross_entropy(h @ w + b[None, :], y)
    np.testing.assert_allclose(loss, plain(f32(h), f32(w), f32(b)), rtol=1e-5)
    g_ref = jax.grad(plain, (0, 1, 2))(f32(h), f32(w), f32(b))
    g_ref = (g_ref[0], g_ref[1] if layout == "dv" else g_ref[1].T, g_ref[2])
    for g, gr in zip(grads, g_ref):
        # bf16 matmul operands (ds is rounded to bf16 like h and W), float32
        # accumulation: errors of a few bf16 ulps of the gradient's scale.
        np.testing.assert_allclose(np.asarray(g, np.float32), gr, rtol=2e-2, atol=1e-2 * float(jnp.max(jnp.abs(gr))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "shape,budget,reduction",
    [
        ((4096, 512, 32768), 256, "mean"),  # single-pass path
        ((4096, 512, 32768), 256, "none"),  # streaming path
        ((2048, 1024, 65536), 64, "mean"),  # d_W does not fit: streaming
        ((8192, 128, 50000), 32, "sum"),  # blocks divide nothing
    ],
)
def test_compiled_temporaries_stay_within_the_memory_budget(shape, budget, reduction, dtype):
    loss = lambda h, w, y: jnp.sum(
        jaxsce.linear_cross_entropy(h, w, y, reduction=reduction, memory_budget=budget * 2**20)
    )
    temp = _temp_bytes(loss, *shape, dtype)
    assert temp <= budget * 2**20, temp / 2**20


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_bf16_weight_is_never_copied_to_float32(layout, reduction):
    # XLA:CPU rewrites a bf16 slice as convert-to-float32 + slice and hoists the
    # convert out of the loop: a float32 copy of the whole weight (here 128 MiB)
    # unless each block is read behind a conditional (_blocks.slice_block).
    t, d, v = 1024, 512, 65536
    loss = lambda h, w, y: jnp.sum(
        jaxsce.linear_cross_entropy(h, w, y, weight_layout=layout, reduction=reduction, memory_budget=32 * 2**20)
    )
    temp = _temp_bytes(loss, t, d, v, jnp.bfloat16, layout)
    assert temp <= 32 * 2**20, temp / 2**20
    assert temp < d * v * 2 / 2  # less than half of one bf16 copy of the weight


def test_compiled_temporary_memory_is_far_below_the_logits():
    t, d, v = 4096, 64, 32768
    temp = _temp_bytes(lambda h, w, y: jaxsce.linear_cross_entropy(h, w, y, memory_budget=16 * 2**20), t, d, v)
    logits_bytes = t * v * 4
    assert temp < logits_bytes / 8, (temp, logits_bytes)
    assert _temp_bytes(lambda h, w, y: jaxsce.cross_entropy(h @ w, y), t, d, v) >= logits_bytes


# --- forward mode: derivative="jvp" ------------------------------------------------


def _tangents(*xs, seed=5):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in xs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.slow  # the fused forward mode runs fast in test_forward_mode_with_some_inputs_fixed_in_float64
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o))
@pytest.mark.parametrize("blocks", [(8, 64), (5, 299), (None, None)])
def test_forward_mode_matches_plain_path(opts, reduction, blocks):
    h, w, b, y = _data()
    kw, plain_kw = _resolve(opts, y)
    common = dict(reduction=reduction, return_aux=True, derivative="jvp")
    fused = lambda h, w, b: jaxsce.linear_cross_entropy(
        h, w, y, linear_bias=b, token_block=blocks[0], vocab_block=blocks[1], **common, **kw
    )
    plain = lambda h, w, b: jaxsce.cross_entropy(h @ w + b[None, :], y, **common, **plain_kw)
    args, tans = (h, w, b), _tangents(h, w, b)
    out, t_out = jax.jvp(fused, args, tans)
    out_ref, t_ref = jax.jvp(plain, args, tans)
    for x, x_ref in zip(jax.tree.leaves((out, t_out)), jax.tree.leaves((out_ref, t_ref))):
        if x.dtype == jax.dtypes.float0:  # the tangent of LossAux.predictions (integer)
            assert x_ref.dtype == x.dtype and x.shape == x_ref.shape
            continue
        np.testing.assert_allclose(x, x_ref, rtol=2e-4, atol=2e-5)
    # Reverse mode also works in this mode (JAX transposes the JVP), on jax
    # >= 0.10: jax 0.6.2's scan transpose fails on it, so it is refused with
    # an error naming the version.
    loss = lambda f: lambda *a: jnp.sum(f(*a)[0])
    if not compat.reverse_through_jvp:
        with pytest.raises(NotImplementedError, match=r"needs jax >= 0\.10"):
            jax.grad(loss(fused), (0, 1, 2))(*args)
        return
    for g, g_ref in zip(jax.grad(loss(fused), (0, 1, 2))(*args), jax.grad(loss(plain), (0, 1, 2))(*args)):
        np.testing.assert_allclose(g, g_ref, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("perturbed", [(0,), (1,), (2,), (0, 2)], ids=["h", "W", "b", "h+b"])
@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_forward_mode_with_some_inputs_fixed_in_float64(perturbed, layout):
    # Unperturbed inputs reach the rule as symbolic zeros and skip their
    # matmul; the tangent must still be that of the naive formula.
    h, w, b, y = _data(np.float64)
    y = jnp.abs(y) % V
    w_in = w if layout == "dv" else w.T
    fused = lambda h, w, b: jaxsce.linear_cross_entropy(
        h, w, y, linear_bias=b, weight_layout=layout, token_block=8, vocab_block=64, derivative="jvp"
    )
    naive = lambda h, w, b: naive_cross_entropy(h @ (w if layout == "dv" else w.T) + b[None, :], y)
    args = (h, w_in, b)
    tans = _tangents(*args)

    def restricted(f):
        def g(*picked):
            full = list(args)
            for i, x in zip(perturbed, picked):
                full[i] = x
            return f(*full)

        return g

    picked, picked_t = tuple(args[i] for i in perturbed), tuple(tans[i] for i in perturbed)
    val, tan = jax.jvp(restricted(fused), picked, picked_t)
    val_ref, tan_ref = jax.jvp(restricted(naive), picked, picked_t)
    np.testing.assert_allclose(val, val_ref, rtol=1e-12)
    np.testing.assert_allclose(tan, tan_ref, rtol=1e-10, atol=1e-13)


@pytest.mark.slow  # the fused path's HVP and jacfwd (17 s); the logit level's stay fast
def test_forward_mode_hessian_vector_product_and_jacfwd_in_float64():
    if not compat.reverse_through_jvp:
        pytest.skip("reverse mode through derivative='jvp' needs jax >= 0.10")
    h, w, b, y = _data(np.float64)
    y = jnp.abs(y) % V
    fused = lambda h, w, b: jaxsce.linear_cross_entropy(
        h, w, y, linear_bias=b, token_block=8, vocab_block=64, derivative="jvp", label_smoothing=0.1
    )
    naive = lambda h, w, b: naive_cross_entropy(h @ w + b[None, :], y, label_smoothing=0.1)
    args = (h, w, b)
    tans = _tangents(*args)
    hvp = lambda f: jax.jvp(jax.grad(f, (0, 1, 2)), args, tans)[1]
    for x, x_ref in zip(hvp(fused), hvp(naive)):
        np.testing.assert_allclose(x, x_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(jax.jacfwd(fused, 2)(*args), jax.jacrev(naive, 2)(*args), rtol=1e-10, atol=1e-14)


def test_forward_mode_bf16_inputs():
    h, w, b, y = _data(jnp.bfloat16)
    y = jnp.abs(y) % V
    fused = lambda h, w, b: jaxsce.linear_cross_entropy(
        h, w, y, linear_bias=b, token_block=8, vocab_block=64, derivative="jvp", reduction="none"
    )
    f32 = lambda x: x.astype(jnp.float32)
    plain = lambda h, w, b: jaxsce.cross_entropy(h @ w + b[None, :], y, derivative="jvp", reduction="none")
    tans = _tangents(h, w, b)
    val, tan = jax.jvp(fused, (h, w, b), tans)
    val_ref, tan_ref = jax.jvp(plain, tuple(map(f32, (h, w, b))), tuple(map(f32, tans)))
    assert val.dtype == tan.dtype == jnp.float32
    np.testing.assert_allclose(val, val_ref, rtol=1e-5)
    # The tangent's matmuls (dh W_b, h dW_b) take bf16 operands and
    # accumulate in float32, as the plain path's float32 ones do not.
    np.testing.assert_allclose(tan, tan_ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(tan_ref))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "shape,budget,reduction",
    [((4096, 512, 32768), 256, "mean"), ((4096, 512, 32768), 64, "none"), ((8192, 128, 50000), 32, "sum")],
)
def test_forward_mode_temporaries_stay_within_the_memory_budget(shape, budget, reduction, dtype):
    loss = lambda h, w, y: jnp.sum(
        jaxsce.linear_cross_entropy(h, w, y, reduction=reduction, derivative="jvp", memory_budget=budget * 2**20)
    )
    temp = _temp_bytes(loss, *shape, dtype, mode="jvp")
    assert temp <= budget * 2**20, temp / 2**20


def test_forward_mode_keeps_the_logits_out_of_memory():
    t, d, v = 4096, 64, 32768
    fused = _temp_bytes(
        lambda h, w, y: jaxsce.linear_cross_entropy(h, w, y, derivative="jvp", memory_budget=16 * 2**20),
        t,
        d,
        v,
        mode="jvp",
    )
    plain = _temp_bytes(lambda h, w, y: jaxsce.cross_entropy(h @ w, y, derivative="jvp"), t, d, v, mode="jvp")
    assert plain >= t * v * 4
    assert fused < t * v * 4 / 8, (fused / 2**20, plain / 2**20)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(linear_weight=jnp.ones((15, V))), ValueError, r"\(15, 300\)"),
        (dict(labels=jnp.zeros((T + 1,), jnp.int32)), ValueError, r"\(38,\)"),
        (dict(labels=jnp.zeros((T,), jnp.float32)), TypeError, "float32"),
        (dict(hidden=jnp.ones((T, D), jnp.int32)), TypeError, "int32"),
        (dict(linear_bias=jnp.ones((V + 1,))), ValueError, r"\(301,\)"),
        (dict(weight_layout="dV"), ValueError, "weight_layout"),
        # A [V, d] table (an embedding) without weight_layout: the error says which layout to pass.
        (dict(linear_weight=jnp.ones((V, D))), ValueError, "pass weight_layout='vd'"),
        (dict(linear_weight=jnp.ones((D, V)), weight_layout="vd"), ValueError, "pass weight_layout='dv'"),
        (dict(vocab_block=0), ValueError, "vocab_block"),
        (dict(derivative="forward"), ValueError, "derivative"),
    ],
)
@all_cases_fast
def test_bad_input_is_a_trace_time_error(kwargs, exc, match):
    h, w, b, y = _data()
    args = dict(hidden=h, linear_weight=w, labels=y)
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(exc, match=match):
        jaxsce.linear_cross_entropy(args["hidden"], args["linear_weight"], args["labels"], **kwargs)


def test_exports_for_gpu_and_tpu_and_runs_the_same_on_cpu():
    # The bf16 block reads take a CPU-only detour (lax.platform_dependent);
    # the plain branch must lower too, and the multi-platform module must
    # compute the same on CPU.
    h, w, b, y = _data(jnp.bfloat16)
    y = jnp.abs(y) % V
    f = jax.jit(
        jax.value_and_grad(lambda h, w: jaxsce.linear_cross_entropy(h, w, y, token_block=8, vocab_block=64), (0, 1))
    )
    exported = jax.export.export(f, platforms=["cpu", "cuda", "tpu"])(h, w)
    (loss, grads), (loss_ref, grads_ref) = exported.call(h, w), f(h, w)
    assert loss == loss_ref
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_ref, np.float32))


@pytest.mark.parametrize("path", ["logits", "fused", "fused streamed", "probabilities"])
def test_aux_predictions_are_the_first_argmax(path):
    """LossAux.predictions: each counted example's argmax (the first of equal maxima), -1 elsewhere."""
    rng = np.random.default_rng(41)
    h = jnp.asarray(rng.normal(size=(5, 6, 8)))
    w = jnp.asarray(np.round(rng.normal(size=(8, 30)), 1))
    w = w.at[:, 7].set(w[:, 3])  # ties: column 7 equals column 3, which comes first
    y = jnp.asarray(rng.integers(0, 30, size=(5, 6)), jnp.int32)
    m = jnp.asarray(rng.random((5, 6)) > 0.3)
    z = h @ w
    if path == "logits":
        _, aux = jaxsce.cross_entropy(z, y, where=m, return_aux=True)
    elif path == "probabilities":
        _, aux = jaxsce.cross_entropy(z, jax.nn.softmax(z, axis=-1), where=m, return_aux=True)
    else:
        _, aux = jaxsce.linear_cross_entropy(
            h, w, y, where=m, return_aux=True, vocab_block=8 if path == "fused streamed" else None
        )
    assert aux.predictions.dtype == jnp.int32
    np.testing.assert_array_equal(aux.predictions, np.where(m, np.argmax(np.asarray(z), axis=-1), -1))
