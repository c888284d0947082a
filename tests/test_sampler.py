"""Sampler-matched log-probabilities (top_k, top_p) against vLLM's filters written in float64 NumPy,
jax.grad of the naive masked formula, the logit level, and the sharded loss."""

import compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from marks import CountingJit, all_cases_fast, fast_cases
from reference import TOL

import jaxsce

N, D, V = 40, 16, 300

# (top_k, top_p); top_k=None and top_p=None together are the plain softmax.
FILTERS = [(50, None), (None, 0.9), (20, 0.7), (1, None), (5, 0.99), (None, 0.3), (1000, None), (0, 0.8)]


def np_sampler_log_probs(s, labels, top_k, top_p):
    """vLLM's ``apply_top_k_top_p`` on one row at a time, in float64, then ``log pi_y`` and the entropy.

    Sort ascending; top-k: mask values below the k-th largest; top-p: the softmax of what is left,
    its cumulative sum, mask where it is <= 1 - p, never the last (largest). The rows used here have
    no ties at the top-p boundary, where vLLM's order among equal values is unspecified.
    """
    out, ent = [], []
    for row, y in zip(np.asarray(s, np.float64), labels):
        order = np.argsort(row, kind="stable")
        srt = row[order].copy()
        if top_k is not None and 0 < top_k < len(row):
            srt[srt < srt[len(row) - top_k]] = -np.inf
        if top_p is not None and top_p < 1:
            q = np.exp(srt - srt[-1])
            cum = np.cumsum(q / q.sum())
            mask = cum <= 1 - top_p
            mask[-1] = False
            srt[mask] = -np.inf
        filtered = np.empty_like(row)
        filtered[order] = srt
        kept = np.isfinite(filtered)
        lz = np.log(np.sum(np.exp(filtered[kept] - row.max()))) + row.max()
        out.append(row[y] - lz if kept[y] else -np.inf)
        pi = np.exp(filtered[kept] - lz)
        ent.append(-np.sum(pi * (filtered[kept] - lz)))
    return np.array(out), np.array(ent)


def naive_sampler_log_probs(s, labels, top_k, top_p):
    """The sampler's log-probabilities and entropy as JAX autodiff sees them: the kept set (value rule,
    ties kept together) is a constant."""
    kept = jnp.ones(s.shape, bool)
    if top_k is not None and 0 < top_k < s.shape[1]:
        kept = s >= jnp.sort(s, axis=1)[:, -top_k][:, None]
    if top_p is not None:
        q = jnp.where(kept, jnp.exp(s - s.max(1, keepdims=True)), 0)
        q = q / q.sum(1, keepdims=True)
        above = jnp.sum(jnp.where(s[:, None, :] > s[:, :, None], q[:, None, :], 0), -1)
        kept = kept & ((above < top_p) | (s == s.max(1, keepdims=True)))
    kept = jax.lax.stop_gradient(kept)
    lz = jax.nn.logsumexp(jnp.where(kept, s, -jnp.inf), axis=1)
    safe = jnp.where(kept, s, 0) - lz[:, None]
    label_kept = jnp.take_along_axis(kept, labels[:, None], 1)[:, 0]
    lp = jnp.where(label_kept, jnp.take_along_axis(safe, labels[:, None], 1)[:, 0], -jnp.inf)
    h = -jnp.sum(jnp.where(kept, jnp.exp(safe) * safe, 0), 1)
    return lp, h


def _data(dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, D))
    w = rng.normal(size=(D, V)) * 0.8
    z = h @ w
    y = rng.integers(0, V, size=N)
    # Half the labels each row's most likely class (kept by every filter), a quarter among its top 10.
    top = np.argsort(-z, axis=1)
    y[: N // 2] = top[: N // 2, 0]
    y[N // 2 : 3 * N // 4] = top[np.arange(N // 2, 3 * N // 4), rng.integers(1, 10, size=N // 4)]
    return jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(y, jnp.int32)


def _finite(x):
    return jnp.where(jnp.isinf(x), 0, x)


@fast_cases(lambda p: p["dtype"] == jnp.float64 or p["filters"] in ((20, 0.7), (None, 0.9)))
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: f"k{f[0]}-p{f[1]}")
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_match_vllm_filters_in_float64(filters, dtype, temperature):
    top_k, top_p = filters
    h, w, y = _data(dtype)
    z = h @ w
    s = np.asarray(z, np.float64) / temperature
    if dtype == jnp.bfloat16:
        # bf16 logits tie often, also at the top-p boundary, where vLLM's order among equal values is
        # unspecified: compare with the rule that keeps ties together, in float64.
        lp_ref, h_ref = (np.asarray(x) for x in naive_sampler_log_probs(jnp.asarray(s), y, top_k, top_p))
    else:
        lp_ref, h_ref = np_sampler_log_probs(s, np.asarray(y), top_k, top_p)
    rtol = TOL[np.dtype(dtype)][0]
    kw = dict(top_k=top_k, top_p=top_p, temperature=temperature, return_entropy=True)
    results = [jaxsce.log_probs(z, y, **kw)]
    if dtype != jnp.bfloat16:  # the fused bf16 head forms float32 logits, whose ties differ from z's
        results.append(jaxsce.linear_log_probs(h, w, y, token_block=16, vocab_block=64, **kw))
    for lp, ent in results:
        np.testing.assert_array_equal(np.isinf(lp), np.isinf(lp_ref))
        assert np.isfinite(lp_ref).sum() >= N // 2
        fin = np.isfinite(lp_ref)
        np.testing.assert_allclose(np.asarray(lp)[fin], lp_ref[fin], rtol=rtol, atol=rtol * 10)
        np.testing.assert_allclose(ent, h_ref, rtol=rtol, atol=rtol * 10)
    if top_k is not None and top_k > 0 and top_p is None and top_k < V:
        # Some labels fall outside the top k: -inf, not a finite number.
        assert np.isinf(lp_ref).sum() > 0


@fast_cases(lambda p: p["filters"] in ((20, 0.7),) or p["entropy"])
@pytest.mark.parametrize("filters", [(50, None), (None, 0.9), (20, 0.7)], ids=lambda f: f"k{f[0]}-p{f[1]}")
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
def test_gradients_equal_autodiff_with_the_kept_set_constant(filters, entropy):
    top_k, top_p = filters
    h, w, y = _data()
    rng = np.random.default_rng(3)
    g, g_h = jnp.asarray(rng.normal(size=N)), jnp.asarray(rng.normal(size=N))

    def objective(f):
        def obj(h, w):
            lp, ent = f(h, w)
            return jnp.sum(_finite(lp) * g) + (jnp.sum(ent * g_h) if entropy else 0.0)

        return obj

    kw = dict(top_k=top_k, top_p=top_p, return_entropy=True)
    fused = lambda h, w: jaxsce.linear_log_probs(h, w, y, token_block=16, vocab_block=64, **kw)
    logit = lambda h, w: jaxsce.log_probs(h @ w, y, **kw)
    naive = lambda h, w: naive_sampler_log_probs(h @ w, y, top_k, top_p)
    ref = jax.grad(objective(naive), (0, 1))(h, w)
    for f in (fused, logit):
        for a, b in zip(jax.grad(objective(f), (0, 1))(h, w), ref):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # A label the sampler could not emit: -inf, and no gradient from it.
    lp = fused(h, w)[0]
    out = np.isinf(np.asarray(lp))
    if top_k is not None:
        assert out.any()
        gh = jax.grad(lambda h: jnp.sum(_finite(fused(h, w)[0])))(h)
        np.testing.assert_array_equal(np.asarray(gh)[out], 0)


def test_ties_are_kept_together():
    # top-k: three values tie at the 2nd largest: all kept. top-p: the tie group straddles the
    # boundary (mass above it 0.5 < p = 0.7): the whole group is kept.
    z = jnp.log(jnp.array([[0.5, 0.1, 0.1, 0.1, 0.05, 0.05, 0.1]]))
    for k, p, kept in [(2, None, [0, 1, 2, 3, 6]), (None, 0.7, [0, 1, 2, 3, 6]), (None, 0.45, [0])]:
        lp = np.asarray(jaxsce.log_probs(jnp.tile(z, (7, 1)), jnp.arange(7), top_k=k, top_p=p))
        expect = np.full(7, -np.inf)
        mass = np.exp(np.asarray(z[0]))[kept].sum()
        expect[kept] = np.log(np.exp(np.asarray(z[0]))[kept] / mass)
        np.testing.assert_allclose(lp, expect, rtol=1e-12)


def test_filters_that_are_off_equal_the_plain_log_probs():
    h, w, y = _data()
    z = h @ w
    plain = jaxsce.log_probs(z, y, return_entropy=True)
    for kw in (dict(top_k=V), dict(top_k=-1), dict(top_k=0), dict(top_p=1.0), dict(top_k=V + 5, top_p=1.0)):
        for a, b in zip(jaxsce.log_probs(z, y, return_entropy=True, **kw), plain):
            np.testing.assert_array_equal(a, b)
    # A traced p of 1 for some rows: those rows are the plain ones, the others filtered.
    p = jnp.where(jnp.arange(N) % 2 == 0, 1.0, 0.8)
    lp, ent = jax.jit(lambda z, p: jaxsce.log_probs(z, y, top_p=p, return_entropy=True))(z, p)
    ref = np_sampler_log_probs(np.asarray(z), np.asarray(y), None, 0.8)
    np.testing.assert_allclose(lp[::2], plain[0][::2], rtol=1e-12)
    np.testing.assert_allclose(ent[::2], plain[1][::2], rtol=1e-12)
    np.testing.assert_allclose(lp[1::2], ref[0][1::2], rtol=1e-12)
    np.testing.assert_allclose(ent[1::2], ref[1][1::2], rtol=1e-12)


def test_top_p_beyond_its_candidates_is_exact(search_branch):
    """Rows whose nucleus is wider than top_p_candidates gave NaN; their threshold is now searched."""
    rng = np.random.default_rng(4)
    z = rng.normal(size=(6, V)) * 0.01  # flat: the nucleus of p = 0.9 holds about 270 tokens
    z[3:] *= 800  # peaked: a few tokens hold the mass
    z, y = jnp.asarray(z), jnp.asarray(np.argmax(z, axis=1), jnp.int32)
    ref, ref_h = np_sampler_log_probs(np.asarray(z), np.asarray(y), None, 0.9)
    for cand in (1, 64, V, 1000):
        lp, ent = jaxsce.log_probs(z, y, top_p=0.9, top_p_candidates=cand, return_entropy=True)
        np.testing.assert_allclose(lp, ref, rtol=1e-12)
        np.testing.assert_allclose(ent, ref_h, rtol=1e-12)
    fused = jaxsce.linear_log_probs(jnp.eye(6), z, y, top_p=0.9, top_p_candidates=64, vocab_block=64)
    np.testing.assert_allclose(fused, ref, rtol=1e-12)
    # Every class tied (a zero head): the whole row is the nucleus.
    uniform = jaxsce.linear_log_probs(jnp.ones((2, 3)), jnp.zeros((3, V)), y[:2], top_p=0.5, top_p_candidates=8)
    np.testing.assert_allclose(uniform, -np.log(V), rtol=1e-12)


@fast_cases(lambda p: p["top_p"] == 0.95)
@pytest.mark.parametrize("top_p", [0.95, 0.5, 0.8])
def test_top_p_alone_with_nuclei_of_thousands_of_tokens(top_p, search_branch):
    """vLLM users sample with top_p alone: on a plain random head at V = 5003 most nuclei hold thousands
    of tokens. Values equal vLLM's filter in float64; gradients are finite, equal between the fused and
    logit-level paths, and equal jax.grad of the naive formula with the kept set constant."""
    rng = np.random.default_rng(12)
    n, d, v = 12, 32, 5003
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.05, jnp.float32)
    y = jnp.asarray(rng.integers(0, v, size=n), jnp.int32)
    z64 = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    ref, ref_h = np_sampler_log_probs(z64, np.asarray(y), None, top_p)
    kept = z64 >= np.asarray(_thresholds(z64, top_p))[:, None]
    widths = kept.sum(1)
    if top_p == 0.95:
        assert widths.min() > 1000
    kw = dict(top_p=top_p, return_entropy=True)
    paths = {
        "logits": lambda h, w: jaxsce.log_probs(h @ w, y, **kw),
        "fused": lambda h, w: jaxsce.linear_log_probs(h, w, y, vocab_block=1024, token_block=8, **kw),
    }
    grads = {}
    for name, f in paths.items():
        lp, ent = f(h, w)
        np.testing.assert_array_equal(np.isinf(lp), np.isinf(ref), err_msg=name)
        fin = np.isfinite(ref)
        np.testing.assert_allclose(np.asarray(lp)[fin], ref[fin], rtol=2e-5, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(ent, ref_h, rtol=2e-5, err_msg=name)
        grads[name] = jax.grad(lambda h, w, f=f: _objective(*f(h, w)), (0, 1))(h, w)
        assert all(np.isfinite(g).all() for g in grads[name])
    for a, b in zip(grads["fused"], grads["logits"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)

    with compat.enable_x64(True):
        keep = jnp.asarray(kept)

        def naive(h, w):
            s = h @ w
            lz = jax.nn.logsumexp(jnp.where(keep, s, -jnp.inf), axis=1)
            safe = jnp.where(keep, s, 0) - lz[:, None]
            lab = jnp.take_along_axis(keep, y[:, None], 1)[:, 0]
            lp = jnp.where(lab, jnp.take_along_axis(safe, y[:, None], 1)[:, 0], -jnp.inf)
            return lp, -jnp.sum(jnp.where(keep, jnp.exp(safe) * safe, 0), 1)

        want = jax.grad(lambda h, w: _objective(*naive(h, w)), (0, 1))(
            jnp.asarray(h, jnp.float64), jnp.asarray(w, jnp.float64)
        )
    for a, b in zip(grads["fused"], want):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def _thresholds(z, top_p):
    """Per row, the smallest kept value of vLLM's top-p filter (float64, sorted cumulative sums)."""
    out = []
    for r in z:
        srt = np.sort(r)[::-1]
        q = np.exp(srt - srt[0])
        q /= q.sum()
        above = np.cumsum(q) - q
        out.append(srt[above < top_p].min())
    return out


def _objective(lp, ent):
    weights = jnp.linspace(-1.0, 2.0, lp.shape[0], dtype=lp.dtype)
    return jnp.sum(_finite(lp) * weights) + 0.3 * jnp.sum(ent * weights[::-1])


def test_traced_and_per_row_top_p_compile_once():
    h, w, y = _data()
    f = CountingJit(lambda h, w, p: jaxsce.linear_log_probs(h, w, y, top_k=40, top_p=p, vocab_block=64))
    z = np.asarray(h @ w)
    for p in (0.5, 0.9, jnp.linspace(0.3, 1.0, N)):
        p_arr = jnp.broadcast_to(jnp.asarray(p, jnp.float64), (N,))
        lp = f(h, w, p_arr)
        for i in (0, 7, N - 1):
            ref, _ = np_sampler_log_probs(z[i : i + 1], np.asarray(y)[i : i + 1], 40, float(p_arr[i]))
            np.testing.assert_allclose(lp[i], ref[0], rtol=1e-12)
    assert f.traces == 1


def test_a_traced_top_p_out_of_range_is_nan():
    """A traced top_p of 1.5 turned top-p off (a concrete 1.5 raises)."""
    h, w, y = _data()
    for k in (None, 30):
        f = jax.jit(lambda p, k=k: jaxsce.linear_log_probs(h, w, y, top_k=k, top_p=p, vocab_block=64))
        assert np.isfinite(_finite(f(0.9))).all() and np.isnan(f(1.5)).all() and np.isnan(f(0.0)).all()
        assert np.isnan(jax.jit(lambda p, k=k: jaxsce.log_probs(h @ w, y, top_k=k, top_p=p))(1.5)).all()
        np.testing.assert_allclose(f(1.0), jaxsce.linear_log_probs(h, w, y, top_k=k), rtol=1e-12)


def test_a_nan_row_masked_by_the_caller_leaves_the_gradients_finite():
    """Rows the sampler gives NaN (here a traced top_p of 1.5) reached d_hidden and d_W through the zero
    cotangent of a caller's mask."""
    h, w, y = _data()
    p = jnp.full(N, 0.9).at[3].set(1.5)
    for k in (None, 30):

        def obj(h, w, p, y, k=k):
            lp = jaxsce.linear_log_probs(h, w, y, top_k=k, top_p=p, vocab_block=64)
            return jnp.sum(jnp.where(jnp.isfinite(lp), lp, 0))

        gh, gw = jax.jit(jax.grad(obj, (0, 1)))(h, w, p, y)
        assert np.isfinite(gh).all() and np.isfinite(gw).all()
        np.testing.assert_array_equal(gh[3], 0)
        # The other rows' gradients are those of the batch without the NaN row.
        keep = np.arange(N) != 3
        want_h, want_w = jax.grad(obj, (0, 1))(h[keep], w, p[keep], y[keep])
        np.testing.assert_allclose(gh[keep], want_h, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gw, want_w, rtol=1e-10, atol=1e-12)


def test_where_ignore_index_and_nan_rows():
    h, w, y = _data()
    where = jnp.arange(N) % 5 != 0
    h_nan = h.at[0].set(jnp.nan)
    y_ign = y.at[1].set(-100)
    kw = dict(top_k=30, top_p=0.8, where=where, ignore_index=-100)
    lp = jaxsce.linear_log_probs(h_nan, w, y_ign, vocab_block=64, **kw)
    assert lp[0] == 0 and lp[1] == 0
    g = jax.grad(lambda h: jnp.sum(_finite(jaxsce.linear_log_probs(h, w, y_ign, vocab_block=64, **kw))))(h_nan)
    np.testing.assert_array_equal(g[0], 0)
    assert np.isfinite(g).all()


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_p=jnp.array([0.5, 2.0])), ValueError, "top_p must be in"),
        (dict(top_p=jnp.ones(3, jnp.int32)), TypeError, "top_p must be floating"),
        (dict(top_p=jnp.full((N, 2), 0.5)), ValueError, r"top_p has shape \(40, 2\)"),
        (dict(top_p="0.9"), TypeError, "top_p must be a number"),
        (dict(top_k=2.5), TypeError, "top_k must be an int"),
        (dict(top_k=True), TypeError, "top_k must be an int"),
        (dict(top_p=0.9, top_p_candidates=0), ValueError, "top_p_candidates must be a positive integer"),
    ],
)
@all_cases_fast
def test_bad_options_are_named(kw, error, match):
    h, w, y = _data()
    with pytest.raises(error, match=match):
        jaxsce.log_probs(h @ w, y, **kw)
    with pytest.raises(error, match=match):
        jaxsce.linear_log_probs(h, w, y, **kw)


def test_traced_top_k_is_refused():
    h, w, y = _data()
    with pytest.raises(TypeError, match="top_k"):
        jax.jit(lambda k: jaxsce.log_probs(h @ w, y, top_k=k))(5)


def test_forward_mode_equals_reverse_mode():
    h, w, y = _data()
    dh = jnp.asarray(np.random.default_rng(5).normal(size=h.shape))
    kw = dict(top_k=25, top_p=0.9, return_entropy=True, vocab_block=64)
    f = lambda h, derivative: jaxsce.linear_log_probs(h, w, y, derivative=derivative, **kw)
    _, tangent = jax.jvp(lambda h: jax.tree.map(_finite, f(h, "jvp")), (h,), (dh,))
    _, vjp = jax.vjp(lambda h: jax.tree.map(_finite, f(h, "vjp")), h)
    rng = np.random.default_rng(6)
    u = (jnp.asarray(rng.normal(size=N)), jnp.asarray(rng.normal(size=N)))
    (dh_rev,) = vjp(u)
    lhs = sum(jnp.sum(a * b) for a, b in zip(tangent, u))
    np.testing.assert_allclose(lhs, jnp.sum(dh_rev * dh), rtol=1e-10)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
def test_top_p_alone_searched_over_vocabulary_shards_equals_unsharded(check_vma):
    """The threshold search under shard_map: its passes' sums are combined over the shards, so every
    shard makes the same passes; values and gradients equal the unsharded loss."""
    h, w, y = _data()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    p = jnp.linspace(0.5, 0.95, N)
    kw = dict(top_p_candidates=4, return_entropy=True)

    def local(h, w, y, p):
        return jaxsce.linear_log_probs(h, w, y, top_p=p, axis_name="model", vocab_block=32, **kw)

    specs = (P("data"), P(None, "model"), P("data"), P("data"))
    f = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P("data"), P("data")), check_vma=check_vma)
    got = jax.jit(f)(h, w, y, p)
    for i in range(N):
        want, want_h = np_sampler_log_probs(np.asarray(h @ w)[i : i + 1], np.asarray(y)[i : i + 1], None, float(p[i]))
        np.testing.assert_allclose(got[0][i], want[0], rtol=1e-10)
        np.testing.assert_allclose(got[1][i], want_h[0], rtol=1e-10)
    obj = lambda fn: lambda h, w: sum(jnp.sum(_finite(o)) for o in fn(h, w))  # noqa: E731
    ga = jax.jit(jax.grad(obj(lambda h, w: f(h, w, y, p)), (0, 1)))(h, w)
    gb = jax.grad(obj(lambda h, w: jaxsce.linear_log_probs(h, w, y, top_p=p, **kw)), (0, 1))(h, w)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
def test_vocabulary_parallel_equals_unsharded(check_vma):
    h, w, y = _data()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    p = jnp.linspace(0.5, 0.95, N)
    kw = dict(top_k=30, top_p=None, return_entropy=True)

    def local(h, w, y, p):
        return jaxsce.linear_log_probs(h, w, y, axis_name="model", vocab_block=32, **{**kw, "top_p": p}, num_classes=V)

    f = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P("data"), P(None, "model"), P("data"), P("data")),
        out_specs=(P("data"), P("data")),
        check_vma=check_vma,
    )
    g = lambda h, w, p: jaxsce.linear_log_probs(h, w, y, **{**kw, "top_p": p})
    for a, b in zip(jax.jit(f)(h, w, y, p), g(h, w, p)):
        np.testing.assert_allclose(a, b, rtol=1e-10)
    obj = lambda fn: lambda h, w: sum(jnp.sum(_finite(o)) for o in fn(h, w, p))
    ga = jax.jit(jax.grad(obj(lambda h, w, p: f(h, w, y, p)), (0, 1)))(h, w)
    gb = jax.grad(obj(g), (0, 1))(h, w)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # The logit level over the same mesh, and the automatic path (the sharding read from the inputs).
    z = h @ w
    zs = jax.device_put(z, jax.sharding.NamedSharding(mesh, P("data", "model")))
    auto = jaxsce.log_probs(zs, y, top_k=30, top_p=p, return_entropy=True)
    for a, b in zip(auto, jaxsce.log_probs(z, y, top_k=30, top_p=p, return_entropy=True)):
        np.testing.assert_allclose(a, b, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("filters", [dict(top_k=50, top_p=0.95), dict(top_p=0.95)], ids=["top_k+top_p", "top_p"])
def test_memory_at_8192_tokens_2304_256000_bf16(filters):
    """value_and_grad of a policy-gradient sum of top-k (k = 50) log-probs, and of top-p alone (its
    threshold search's passes included): temporaries <= 256 MiB."""
    if compat.JAX < (0, 10):
        pytest.skip("the block memory model is fitted to XLA in jax >= 0.10")
    t, d, v = 8192, 2304, 256000

    def objective(h, w, y, adv):
        lp = jaxsce.linear_log_probs(h, w, y, **filters)
        return -jnp.mean(jnp.where(jnp.isinf(lp), 0, adv * lp))

    args = (
        jax.ShapeDtypeStruct((t, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((d, v), jnp.bfloat16),
        jax.ShapeDtypeStruct((t,), jnp.int32),
        jax.ShapeDtypeStruct((t,), jnp.float32),
    )
    compiled = jax.jit(jax.value_and_grad(objective, (0, 1))).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 256 * 2**20, temp / 2**20
