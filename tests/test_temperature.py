"""``temperature`` on the cross-entropies: the shared logit transform ``softcap(z) / T``.

References: PyTorch's documented cross-entropy in float64 NumPy of
``softcap(z) / T`` (the definition of Liger-Kernel's scaled cross-entropy)
and ``jax.grad``/``jax.jvp`` of the naive formula.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from marks import CountingJit
from reference import naive_cross_entropy, np_cross_entropy

import jaxsce

N, D, V = 23, 8, 37
OPTIONS = {
    "plain": {},
    "smooth+weight": dict(label_smoothing=0.1, weight=np.linspace(0.5, 1.5, V)),
    "softcap+zloss": dict(logit_softcap=4.0, z_loss=1e-3),
}


def _data(seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(N, D)))
    w = jnp.asarray(rng.normal(size=(D, V)))
    y = jnp.asarray(rng.integers(0, V, N))
    return h, w, y


def _np_tempered_ce(z, y, temperature, logit_softcap=None, **kw):
    z = np.asarray(z, np.float64)
    if logit_softcap is not None:
        z = logit_softcap * np.tanh(z / logit_softcap)
    return np_cross_entropy(z / temperature, np.asarray(y), **kw)


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_cross_entropy_with_temperature_matches_float64_and_autodiff(name, temperature, residual_branch):
    h, w, y = _data()
    z = h @ w
    opts = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in OPTIONS[name].items()}
    out = jaxsce.cross_entropy(z, y, temperature=temperature, **opts)
    np_opts = {k: v for k, v in OPTIONS[name].items() if k not in ("z_loss",)}
    ref = _np_tempered_ce(z, y, temperature, **np_opts)
    if "z_loss" in opts:  # z-loss of the transformed logits' lse
        zc = 4.0 * np.tanh(np.asarray(z) / 4.0) / temperature
        m = zc.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(zc - m).sum(-1, keepdims=True)))[:, 0]
        ref = ref + 1e-3 * np.mean(lse**2)
    np.testing.assert_allclose(out, ref, rtol=1e-12)

    def naive(z):
        return naive_cross_entropy(
            z / temperature if "logit_softcap" not in opts else 4.0 * jnp.tanh(z / 4.0) / temperature,
            y,
            **{k: v for k, v in opts.items() if k != "logit_softcap"},
        )

    g = jax.grad(lambda z: jaxsce.cross_entropy(z, y, temperature=temperature, **opts))(z)
    np.testing.assert_allclose(g, jax.grad(naive)(z), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("path", ["single-pass", "streamed", "jvp"])
def test_fused_cross_entropy_with_temperature_equals_the_logit_level(name, path):
    h, w, y = _data(1)
    opts = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in OPTIONS[name].items()}
    kw = dict(temperature=0.7, **opts)
    fused_kw = dict(kw, vocab_block=10 if path == "streamed" else None, derivative="jvp" if path == "jvp" else "vjp")

    def fused(h, w):
        return jaxsce.linear_cross_entropy(h, w, y, **fused_kw)

    def plain(h, w):
        return jaxsce.cross_entropy(h @ w, y, derivative=fused_kw["derivative"], **kw)

    np.testing.assert_allclose(fused(h, w), plain(h, w), rtol=1e-12)
    if path == "jvp":
        rng = np.random.default_rng(2)
        th, tw = jnp.asarray(rng.normal(size=h.shape)), jnp.asarray(rng.normal(size=w.shape))
        np.testing.assert_allclose(jax.jvp(fused, (h, w), (th, tw))[1], jax.jvp(plain, (h, w), (th, tw))[1], rtol=1e-10)
    else:
        for a, b in zip(jax.grad(fused, (0, 1))(h, w), jax.grad(plain, (0, 1))(h, w)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_traced_temperature_compiles_once_and_is_nan_out_of_range():
    h, w, y = _data(3)

    @CountingJit
    def step(t):
        return jaxsce.linear_cross_entropy(h, w, y, temperature=t)

    values = [step(jnp.float64(t)) for t in (0.5, 1.0, 2.0)]
    assert step.traces == 1
    for t, v in zip((0.5, 1.0, 2.0), values):
        np.testing.assert_allclose(v, _np_tempered_ce(h @ w, y, t), rtol=1e-12)
    assert np.isnan(step(jnp.float64(-1.0))) and np.isnan(step(jnp.float64(np.inf)))
    with pytest.raises(ValueError, match="temperature"):
        jaxsce.cross_entropy(h @ w, y, temperature=0.0)
    with pytest.raises(TypeError, match="temperature"):
        jaxsce.cross_entropy(h @ w, y, temperature="2")
