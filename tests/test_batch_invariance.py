"""batch_invariant=True: a row's log-probability, entropy and hidden-state gradient are bitwise the same
whatever the batch it is computed in (its size, its padding rows, and the block options)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsce

D, V = 64, 5000
ROWS = 7  # the rows compared

# (tokens in the batch, block options): sizes below, at and above the fixed token block of 256.
BATCHES = [
    (ROWS, {}),
    (300, {}),
    (600, dict(token_block=64)),
    (520, dict(vocab_block=1024)),
    (260, dict(memory_budget=2**20)),
]


MOST = max(b for b, _ in BATCHES)


def _data(dtype, n=MOST, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(n, D)), dtype)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.2, dtype)
    y = jnp.asarray(rng.integers(0, V, n), jnp.int32)
    return h, w, y


def _assert_bitwise(results):
    first = results[0]
    for other in results[1:]:
        for a, b in zip(first, other):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("sampler", [{}, dict(top_k=20)], ids=["plain", "top_k"])
def test_linear_log_probs_rows_are_bitwise_the_same_in_any_batch(dtype, sampler):
    h, w, y = _data(dtype)
    g = jnp.asarray(np.random.default_rng(1).normal(size=MOST), jnp.float32)
    results = []
    for n, blocks in BATCHES:

        def f(h, n=n, blocks=blocks):
            lp, ent = jaxsce.linear_log_probs(
                h, w, y[:n], return_entropy=True, batch_invariant=True, **blocks, **sampler
            )
            return lp, ent

        lp, ent = jax.jit(f)(h[:n])
        # The gradient of a per-row objective: each row's d_hidden depends on that row only.
        obj = lambda h, n=n, f=f: jnp.sum(g[:n] * jnp.where(jnp.isinf(f(h)[0]), 0, f(h)[0]))  # noqa: E731
        dh = jax.jit(jax.grad(obj))(h[:n])
        results.append((lp[:ROWS], ent[:ROWS], dh[:ROWS]))
    _assert_bitwise(results)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_rows_are_bitwise_the_same_at_any_temperature(temperature):
    """At T = 0.7 and 1.3, 13 of the first 256 rows differed in the last bit between batches of 256 and
    257 rows (a loop that runs once compiles to other roundings than one that runs twice)."""
    h, w, y = _data(jnp.float32, n=257, seed=2)
    kw = dict(temperature=temperature, return_entropy=True, batch_invariant=True)
    g = jnp.asarray(np.random.default_rng(3).normal(size=257), jnp.float32)
    fused, logits, z = [], [], h @ w
    for n in (1, 256, 257):
        f = lambda h, n=n: jaxsce.linear_log_probs(h, w, y[:n], **kw)  # noqa: E731
        dh = jax.jit(jax.grad(lambda h, f=f, n=n: jnp.sum(g[:n] * f(h)[0] + g[:n] ** 2 * f(h)[1])))(h[:n])
        fused.append(jax.jit(f)(h[:n]) + (dh,))
        logits.append(jaxsce.log_probs(z[:n], y[:n], **kw))  # slices of the same logits
    for rows in (1, 256):
        _assert_bitwise([tuple(x[:rows] for x in r) for r in fused if len(r[0]) >= rows])
        _assert_bitwise([tuple(x[:rows] for x in r) for r in logits if len(r[0]) >= rows])


def test_log_probs_rows_are_bitwise_the_same_in_any_batch():
    h, w, y = _data(jnp.float32)
    z = h @ w
    results = [
        jaxsce.log_probs(z[:n], y[:n], return_entropy=True, batch_invariant=True, top_k=k)
        for n in (ROWS, 300, 600)
        for k in (None, 20)
    ]
    _assert_bitwise([(lp[:ROWS], ent[:ROWS]) for lp, ent in results[0::2]])
    _assert_bitwise([(lp[:ROWS], ent[:ROWS]) for lp, ent in results[1::2]])
    # The same numbers as without the option, up to rounding.
    plain = jaxsce.log_probs(z[:300], y[:300], return_entropy=True)
    for a, b in zip(results[2], plain):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_linear_policy_loss_gradient_rows_are_bitwise_the_same_in_any_batch():
    # The first completion alone, or among others that are masked out: the same counted tokens, so the
    # same normalizer; its rows of d_hidden must be bitwise equal.
    length = 40
    h, w, y = _data(jnp.float32, n=12 * length)
    adv = jnp.asarray(np.random.default_rng(2).normal(size=12), jnp.float32)
    old = jnp.full((12, length), -8.0, jnp.float32)
    results, values = [], []
    for b, blocks in ((1, {}), (7, dict(token_block=32)), (12, dict(vocab_block=512))):
        hb = h[: b * length].reshape(b, length, D)
        where = jnp.broadcast_to(jnp.arange(b)[:, None] == 0, (b, length))

        def f(hb, b=b, blocks=blocks, where=where):
            return jaxsce.linear_policy_loss(
                hb,
                w,
                y[: b * length].reshape(b, length),
                adv[:b],
                old_log_probs=old[:b],
                where=where,
                batch_invariant=True,
                **blocks,
            )

        value, dh = jax.jit(jax.value_and_grad(f))(hb)
        results.append((dh[0],))
        values.append(value)
    _assert_bitwise(results)
    np.testing.assert_allclose(values, values[0], rtol=1e-6)


def test_policy_loss_gradient_rows_are_bitwise_the_same_in_any_batch():
    """The logit-level twin lacked batch_invariant (linear_policy_loss had it)."""
    length = 40
    h, w, y = _data(jnp.float32, n=12 * length)
    z = (h @ w).reshape(12, length, V)
    adv = jnp.asarray(np.random.default_rng(2).normal(size=12), jnp.float32)
    old = jnp.full((12, length), -8.0, jnp.float32)
    results, values = [], []
    for b in (1, 7, 12):
        where = jnp.broadcast_to(jnp.arange(b)[:, None] == 0, (b, length))
        yb = y[: b * length].reshape(b, length)

        def f(zb, b=b, where=where, yb=yb):
            return jaxsce.policy_loss(
                zb, yb, adv[:b], old_log_probs=old[:b], where=where, temperature=0.7, batch_invariant=True
            )

        value, dz = jax.jit(jax.value_and_grad(f))(z[:b])
        results.append((dz[0],))
        values.append(value)
    _assert_bitwise(results)
    np.testing.assert_allclose(values, values[0], rtol=1e-6)
