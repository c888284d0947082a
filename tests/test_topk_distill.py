"""topk_distillation_loss and linear_topk_distillation_loss against float64 NumPy bins written from the
definition, jax.grad of the naive formula, the sharded loss, and the compile-only memory target."""

import compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from marks import all_cases_fast, fast_cases
from reference import TOL

import jaxsce

N, D, V, K = 30, 8, 200, 12
DIVERGENCES = ["kl", "reverse_kl", "jsd"]


def _data(dtype=jnp.float64, seed=0, k=K):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, D))
    w = rng.normal(size=(D, V))
    t = rng.normal(size=(N, V)) * 2
    t_lp = t - np.log(np.exp(t).sum(1, keepdims=True))
    idx = np.argsort(-t_lp, axis=1)[:, :k]
    return (
        jnp.asarray(h, dtype),
        jnp.asarray(w, dtype),
        jnp.asarray(idx, jnp.int32),
        jnp.asarray(np.take_along_axis(t_lp, idx, 1)),
    )


def np_topk_distillation(z, idx, lt, divergence, tail, temperature=1.0, beta=0.5):
    """Per row, from the definition: the bins of both sides in float64, then the divergence."""
    z, idx, lt = (np.asarray(x, np.float64) for x in (z, idx, lt))
    idx = idx.astype(int)
    out = []
    for s, i, t_lp in zip(z / temperature, idx, lt):
        q = np.exp(s - s.max())
        q /= q.sum()
        t = np.exp(t_lp)
        if tail:
            rest = np.ones(len(s), bool)
            rest[i] = False
            p_t, p_s = np.append(t, 1 - t.sum()), np.append(q[i], q[rest].sum())
        else:
            p_t, p_s = t / t.sum(), q[i] / q[i].sum()
        kl = lambda a, b: np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1) / b), 0))  # noqa: E731
        if divergence == "kl":
            out.append(kl(p_t, p_s))
        elif divergence == "reverse_kl":
            out.append(kl(p_s, p_t))
        else:
            m = beta * p_t + (1 - beta) * p_s
            out.append(beta * kl(p_t, m) + (1 - beta) * kl(p_s, m))
    return np.array(out)


def naive_topk_distillation(z, idx, lt, divergence, tail, temperature=1.0, beta=0.5):
    """The same with jax.numpy on the whole logits: autodiff gives the reference gradient."""
    lq = jax.nn.log_softmax(z / temperature, axis=1)
    lq_top = jnp.take_along_axis(lq, idx, 1)
    if tail:
        rest = jnp.ones(z.shape, bool).at[jnp.arange(z.shape[0])[:, None], idx].set(False)
        lq_b = jnp.concatenate([lq_top, jax.nn.logsumexp(jnp.where(rest, lq, -jnp.inf), axis=1)[:, None]], 1)
        lt_b = jnp.concatenate([lt, jnp.log(1 - jnp.exp(lt).sum(1))[:, None]], 1)
    else:
        lq_b = lq_top - jax.nn.logsumexp(lq_top, 1, keepdims=True)
        lt_b = lt - jax.nn.logsumexp(lt, 1, keepdims=True)
    p_t, p_s = jnp.exp(lt_b), jnp.exp(lq_b)
    if divergence == "kl":
        return jnp.sum(p_t * (lt_b - lq_b), 1)
    if divergence == "reverse_kl":
        return jnp.sum(p_s * (lq_b - lt_b), 1)
    log_m = jnp.log(beta * p_t + (1 - beta) * p_s)
    return beta * jnp.sum(p_t * (lt_b - log_m), 1) + (1 - beta) * jnp.sum(p_s * (lq_b - log_m), 1)


@fast_cases(lambda p: p["dtype"] != jnp.bfloat16 or p["divergence"] == "kl")
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renormalized"])
def test_values_match_float64_numpy(dtype, divergence, tail):
    h, w, idx, lt = _data(dtype)
    z = h @ w
    kw = dict(divergence=divergence, tail=tail, temperature=0.7, reduction="none")
    ref = np_topk_distillation(np.asarray(z, np.float64), idx, lt, divergence, tail, 0.7)
    rtol = TOL[np.dtype(dtype)][0]
    for out in (
        jaxsce.topk_distillation_loss(z, idx, lt, **kw),
        jaxsce.linear_topk_distillation_loss(h, w, idx, lt, token_block=8, vocab_block=48, **kw),
    ):
        assert out.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol)


@fast_cases(lambda p: p["reduction"] == "mean" or p["divergence"] == "kl")
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renormalized"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_equal_autodiff_of_the_naive_formula(divergence, tail, reduction):
    h, w, idx, lt = _data()
    b = jnp.asarray(np.random.default_rng(2).normal(size=V) * 0.1)
    g = jnp.asarray(np.random.default_rng(1).normal(size=N))
    kw = dict(divergence=divergence, tail=tail, temperature=0.7)
    red = (lambda x: jnp.sum(g * x)) if reduction == "none" else jnp.mean
    naive = lambda h, w, b: red(naive_topk_distillation(h @ w + b[None], idx, lt, divergence, tail, 0.7))
    ref = jax.grad(naive, (0, 1, 2))(h, w, b)
    fns = {
        "logits": lambda h, w, b: jaxsce.topk_distillation_loss(h @ w + b[None], idx, lt, reduction=reduction, **kw),
        "streamed": lambda h, w, b: jaxsce.linear_topk_distillation_loss(
            h, w, idx, lt, linear_bias=b, reduction=reduction, token_block=8, vocab_block=48, **kw
        ),
        # A budget too small for the single pass's float32 d_W: the streaming path for scalars too.
        "small budget": lambda h, w, b: jaxsce.linear_topk_distillation_loss(
            h, w, idx, lt, linear_bias=b, reduction=reduction, memory_budget=4096, **kw
        ),
    }

    def summed(f):
        return lambda *a: jnp.sum(g * f(*a))

    for name, f in fns.items():
        obj = summed(f) if reduction == "none" else f
        for a, r in zip(jax.grad(obj, (0, 1, 2))(h, w, b), ref):
            np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-13, err_msg=name)


def test_a_small_tail_keeps_its_digits():
    # The student puts 1 - 1e-9 on the teacher's top 3: its tail mass is summed, not 1 - sum.
    z = jnp.asarray(np.r_[np.full(3, 20.0), np.full(V - 3, 20.0 - 24.0)][None].repeat(4, 0), jnp.float32)
    idx = jnp.asarray(np.tile(np.arange(3), (4, 1)), jnp.int32)
    lt = jnp.log(jnp.full((4, 3), 0.3, jnp.float32))
    lt64 = np.log(np.full((4, 3), 0.3))
    ref = np_topk_distillation(np.asarray(z, np.float64), idx, lt64, "kl", True)
    out = jaxsce.topk_distillation_loss(z, idx, lt, reduction="none")
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_repeated_or_out_of_range_ids_and_logits_for_log_probs_give_nan():
    h, w, idx, lt = _data()
    bad_idx = idx.at[0, 1].set(idx[0, 0]).at[1, 2].set(V).at[2, 0].set(-1)
    bad_lt = lt.at[3].set(jnp.zeros(K))  # k probabilities of 1: logits passed as log-probabilities
    for f in (
        lambda i, t: jaxsce.topk_distillation_loss(h @ w, i, t, reduction="none"),
        lambda i, t: jaxsce.linear_topk_distillation_loss(h, w, i, t, reduction="none", vocab_block=48),
    ):
        out = np.asarray(f(bad_idx, bad_lt))
        assert np.isnan(out[:4]).all()
        np.testing.assert_allclose(out[4:], np.asarray(f(idx, lt))[4:], rtol=1e-12)


def test_where_masks_rows_exactly():
    h, w, idx, lt = _data()
    where = jnp.arange(N) % 4 != 1
    h_nan = h.at[1].set(jnp.nan)
    kw = dict(where=where, vocab_block=48)
    out = jaxsce.linear_topk_distillation_loss(h_nan, w, idx, lt, **kw)
    ref = np_topk_distillation(np.asarray(h @ w), idx, lt, "kl", True)[np.asarray(where)].mean()
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    g = jax.grad(lambda h: jaxsce.linear_topk_distillation_loss(h, w, idx, lt, **kw))(h_nan)
    np.testing.assert_array_equal(g[1], 0)
    assert np.isfinite(g).all()


def test_agreeing_teacher_gives_zero():
    h, w, _, _ = _data()
    z = h @ w
    idx = jnp.argsort(-z, axis=1)[:, :K].astype(jnp.int32)
    lt = jnp.take_along_axis(jax.nn.log_softmax(z, axis=1), idx, 1)
    for tail in (True, False):
        out = jaxsce.topk_distillation_loss(z, idx, lt, tail=tail, reduction="none")
        np.testing.assert_allclose(out, 0, atol=1e-13)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (dict(idx=np.zeros((N, K)) + 0.5), TypeError, "teacher_indices must be integer"),
        (dict(idx=np.zeros((N, K, 1), np.int32)), ValueError, r"teacher_indices have shape \(30, 12, 1\)"),
        (dict(lt=np.zeros((N, K + 1))), ValueError, r"teacher_log_probs have shape \(30, 13\)"),
        (dict(lt=np.zeros((N, K), np.int32)), TypeError, "teacher_log_probs"),
        (dict(divergence="kld"), ValueError, "divergence"),
    ],
)
@all_cases_fast
def test_bad_inputs_are_named(args, error, match):
    h, w, idx, lt = _data()
    idx, lt = args.pop("idx", idx), args.pop("lt", lt)
    with pytest.raises(error, match=match):
        jaxsce.topk_distillation_loss(h @ w, idx, lt, **args)
    with pytest.raises(error, match=match):
        jaxsce.linear_topk_distillation_loss(h, w, idx, lt, **args)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
def test_vocabulary_and_data_parallel_equal_unsharded(check_vma):
    h, w, idx, lt = _data()
    h, idx, lt = h[:24], idx[:24], lt[:24]  # 24 tokens over 2 data shards
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    kw = dict(divergence="jsd", tail=True, temperature=0.8)

    def local(h, w, idx, lt):
        return jaxsce.linear_topk_distillation_loss(
            h, w, idx, lt, axis_name="model", batch_axis_name="data", vocab_block=16, **kw
        )

    f = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P("data"), P(None, "model"), P("data"), P("data")),
        out_specs=P(),
        check_vma=check_vma,
    )
    g = lambda h, w: jaxsce.linear_topk_distillation_loss(h, w, idx, lt, **kw)
    np.testing.assert_allclose(jax.jit(f)(h, w, idx, lt), g(h, w), rtol=1e-10)
    ga = jax.jit(jax.grad(lambda h, w: f(h, w, idx, lt), (0, 1)))(h, w)
    for a, b in zip(ga, jax.grad(g, (0, 1))(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    # The logit level, with the sharding read from the inputs.
    zs = jax.device_put(h @ w, jax.sharding.NamedSharding(mesh, P("data", "model")))
    auto = jaxsce.topk_distillation_loss(zs, idx, lt, **kw)
    np.testing.assert_allclose(auto, jaxsce.topk_distillation_loss(h @ w, idx, lt, **kw), rtol=1e-10)


@pytest.mark.slow
def test_memory_at_8192_tokens_2304_256000_bf16():
    """value_and_grad's temporaries <= 256 MiB at the issue's shape, k = 64."""
    if compat.JAX < (0, 10):
        pytest.skip("the block memory model is fitted to XLA in jax >= 0.10")
    t, d, v, k = 8192, 2304, 256000, 64
    args = (
        jax.ShapeDtypeStruct((t, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((d, v), jnp.bfloat16),
        jax.ShapeDtypeStruct((t, k), jnp.int32),
        jax.ShapeDtypeStruct((t, k), jnp.float32),
    )
    f = lambda h, w, i, lt: jaxsce.linear_topk_distillation_loss(h, w, i, lt)
    compiled = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 256 * 2**20, temp / 2**20


# --- top_k on linear_distillation_loss: two heads, the bins found while streaming ---------------


def _two_heads(seed=3):
    rng = np.random.default_rng(seed)
    hs, ws = rng.normal(size=(N, D)), rng.normal(size=(D, V))
    ht, wt = rng.normal(size=(N, 6)), rng.normal(size=(6, V)) * 1.5
    return tuple(jnp.asarray(x) for x in (hs, ws, ht, wt))


def naive_two_head_top_k(zs, zt, k, divergence, temperature):
    """The bins from the weighting head's top k (the teacher's for "kl"), as constants; jax.numpy."""
    s, t = zs / temperature, zt / temperature
    w = t if divergence == "kl" else s
    inside = jax.lax.stop_gradient(w >= jnp.sort(w, axis=1)[:, -k][:, None])
    log_w, log_o = jax.nn.log_softmax(t, 1), jax.nn.log_softmax(s, 1)
    if divergence == "reverse_kl":
        log_w, log_o = log_o, log_w
    p_w, p_o = jnp.exp(log_w), jnp.exp(log_o)
    tail_w = jnp.sum(jnp.where(inside, 0, p_w), 1)
    tail_o = jnp.sum(jnp.where(inside, 0, p_o), 1)
    return jnp.sum(jnp.where(inside, p_w * (log_w - log_o), 0), 1) + tail_w * (jnp.log(tail_w) - jnp.log(tail_o))


@fast_cases(lambda p: p["path"] != "single pass" or p["divergence"] == "kl")
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@pytest.mark.parametrize("path", ["streamed", "single pass", "small budget", "logits"])
def test_two_head_top_k_equals_autodiff_of_the_naive_bins(divergence, path):
    """The fused loss on every path, and ``distillation_loss`` of the two heads' logits (which lacked top_k)."""
    hs, ws, ht, wt = _two_heads()
    g = jnp.asarray(np.random.default_rng(4).normal(size=N))
    kw = {
        "streamed": dict(reduction="none", token_block=8, vocab_block=48),
        "single pass": dict(reduction="mean"),
        "small budget": dict(reduction="mean", memory_budget=4096),
        "logits": dict(reduction="none"),
    }[path]
    red = (lambda x: jnp.sum(g * x)) if kw["reduction"] == "none" else jnp.mean
    opts = dict(divergence=divergence, temperature=0.8, top_k=K, **kw)
    if path == "logits":
        f = lambda hs, ws: red(jaxsce.distillation_loss(hs @ ws, ht @ wt, **opts))
    else:
        f = lambda hs, ws: red(jaxsce.linear_distillation_loss(hs, ws, ht, wt, **opts))
    naive = lambda hs, ws: red(naive_two_head_top_k(hs @ ws, ht @ wt, K, divergence, 0.8))
    np.testing.assert_allclose(f(hs, ws), naive(hs, ws), rtol=1e-12)
    for a, b in zip(jax.grad(f, (0, 1))(hs, ws), jax.grad(naive, (0, 1))(hs, ws)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_two_head_top_k_kl_equals_the_stored_teacher_top_k():
    # The teacher's own top k as it would be stored offline: the two losses agree.
    hs, ws, ht, wt = _two_heads()
    zt = ht @ wt
    idx = jnp.argsort(-zt, axis=1)[:, :K].astype(jnp.int32)
    lt = jnp.take_along_axis(jax.nn.log_softmax(zt, axis=1), idx, 1)
    stored = jaxsce.linear_topk_distillation_loss(hs, ws, idx, lt, reduction="none")
    two = jaxsce.linear_distillation_loss(hs, ws, ht, wt, top_k=K, reduction="none", vocab_block=48)
    np.testing.assert_allclose(two, stored, rtol=1e-11)
    # With the hard-label term in the same stream, and a top_k at or past V: the full divergence.
    y = jnp.asarray(np.random.default_rng(5).integers(0, V, N), jnp.int32)
    both = dict(labels=y, hard_weight=0.3, soft_weight=0.7, reduction="none")
    ce = jaxsce.cross_entropy(hs @ ws, y, reduction="none")
    hard = jaxsce.linear_distillation_loss(hs, ws, ht, wt, top_k=K, **both)
    np.testing.assert_allclose(hard, 0.7 * stored + 0.3 * ce, rtol=1e-11)
    full = jaxsce.linear_distillation_loss(hs, ws, ht, wt, reduction="none")
    np.testing.assert_allclose(jaxsce.linear_distillation_loss(hs, ws, ht, wt, top_k=V, reduction="none"), full)


def test_two_head_top_k_refuses_jsd():
    hs, ws, ht, wt = _two_heads()
    with pytest.raises(ValueError, match="'jsd' has no such bins"):
        jaxsce.linear_distillation_loss(hs, ws, ht, wt, divergence="jsd", top_k=8)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_two_head_top_k_vocabulary_parallel_equals_unsharded():
    hs, ws, ht, wt = _two_heads()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    kw = dict(divergence="reverse_kl", top_k=K, temperature=0.9)
    f = jax.shard_map(
        lambda hs, ws, ht, wt: jaxsce.linear_distillation_loss(
            hs, ws, ht, wt, axis_name="model", batch_axis_name="data", vocab_block=16, **kw
        ),
        mesh=mesh,
        in_specs=(P("data"), P(None, "model"), P("data"), P(None, "model")),
        out_specs=P(),
    )
    hs24, ht24 = hs[:24], ht[:24]
    g24 = lambda hs, ws: jaxsce.linear_distillation_loss(hs, ws, ht24, wt, **kw)
    np.testing.assert_allclose(jax.jit(f)(hs24, ws, ht24, wt), g24(hs24, ws), rtol=1e-10)
    ga = jax.jit(jax.grad(lambda a, b: f(a, b, ht24, wt), (0, 1)))(hs24, ws)
    for a, b in zip(ga, jax.grad(g24, (0, 1))(hs24, ws)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
