"""Per-example weights (sample_weight) against float64 NumPy formulas and jax.grad of the naive formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from marks import all_cases_fast, fast_cases
from reference import naive_cross_entropy, np_cross_entropy

import jaxsce

N, D, V = 29, 8, 40

# Two labels are -100: every option set ignores them.
OPTIONS = {
    "plain": dict(ignore_index=-100),
    "weight": dict(weight=True, ignore_index=-100),
    "where+zloss+smoothing": dict(where=True, z_loss=1e-2, label_smoothing=0.1, ignore_index=-100),
}
# cross_entropy; linear_cross_entropy on the single-pass path (a scalar loss whose
# d_W fits the budget) and on the streaming path (vocab_block given).
PATHS = ["logits", "linear-single-pass", "linear-streaming"]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, D))
    w = rng.normal(size=(D, V)) * 0.5
    y = rng.integers(0, V, size=N)
    y[[1, 6]] = -100
    return dict(
        h=jnp.asarray(h),
        w=jnp.asarray(w),
        y=jnp.asarray(y, jnp.int32),
        s=jnp.asarray(rng.random(N) * 2),
        weight=jnp.asarray(np.linspace(0.5, 1.5, V)),
        where=jnp.asarray(np.arange(N) % 5 != 2),
    )


def _kwargs(name, d):
    kw = dict(OPTIONS[name])
    if kw.pop("weight", False):
        kw["weight"] = d["weight"]
    if kw.pop("where", False):
        kw["where"] = d["where"]
    return kw


def _np_weighted(d, kw, reduction):
    """sum_n s_n l_n (/ sum_n s_n w_{y_n} over counted examples for "mean")."""
    z = np.asarray(d["h"]) @ np.asarray(d["w"])
    y, s = np.asarray(d["y"]), np.asarray(d["s"])
    np_kw = {k: (np.asarray(v) if hasattr(v, "shape") else v) for k, v in kw.items()}
    per = np_cross_entropy(z, y, reduction="none", **np_kw)  # 0 where not counted
    counted = np.ones(N, bool) if "where" not in kw else np.array(kw["where"])
    if "ignore_index" in kw:
        counted &= y != kw["ignore_index"]
    w_y = np.ones(N) if "weight" not in kw else np.asarray(kw["weight"])[np.where(counted, y, 0)]
    if reduction == "none":
        return s * per
    if reduction == "sum":
        return np.sum(s * per)
    return np.sum(s * per) / np.sum(np.where(counted, s * w_y, 0))


def _ours(path, d, kw, reduction):
    def loss(h, w):
        if path == "logits":
            return jaxsce.cross_entropy(h @ w, d["y"], sample_weight=d["s"], reduction=reduction, **kw)
        extra = dict(vocab_block=16, token_block=8) if path == "linear-streaming" else {}
        return jaxsce.linear_cross_entropy(h, w, d["y"], sample_weight=d["s"], reduction=reduction, **kw, **extra)

    return loss


@fast_cases(lambda p: p["reduction"] == "mean" or p["name"] == "weight")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weighted_loss_and_gradient(path, name, reduction):
    d = _data()
    kw = _kwargs(name, d)
    loss = _ours(path, d, kw, reduction)
    np.testing.assert_allclose(loss(d["h"], d["w"]), _np_weighted(d, kw, reduction), rtol=1e-11, atol=1e-13)

    cot = jnp.asarray(np.random.default_rng(1).normal(size=(N,) if reduction == "none" else ()))

    def naive(h, w):
        per = naive_cross_entropy(h @ w, d["y"], reduction="none", **kw)
        if reduction == "none":
            return d["s"] * per
        if reduction == "sum":
            return jnp.sum(d["s"] * per)
        counted = (d["y"] != -100) & (kw["where"] if "where" in kw else True)
        w_y = kw["weight"][jnp.where(counted, d["y"], 0)] if "weight" in kw else 1.0
        return jnp.sum(d["s"] * per) / jnp.sum(jnp.where(counted, d["s"] * w_y, 0))

    g = jax.grad(lambda h, w: jnp.sum(cot * loss(h, w)), (0, 1))(d["h"], d["w"])
    g_ref = jax.grad(lambda h, w: jnp.sum(cot * naive(h, w)), (0, 1))(d["h"], d["w"])
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@all_cases_fast
def test_sample_weights_are_constants(path):
    d = _data(2)
    g = jax.grad(lambda s: _ours(path, {**d, "s": s}, {"ignore_index": -100}, "mean")(d["h"], d["w"]))(d["s"])
    assert np.all(np.asarray(g) == 0)


def test_unit_weights_change_nothing_and_zero_weights_drop_examples():
    d = _data(3)
    z = d["h"] @ d["w"]
    base = jaxsce.cross_entropy(z, d["y"], ignore_index=-100)
    np.testing.assert_allclose(jaxsce.cross_entropy(z, d["y"], ignore_index=-100, sample_weight=jnp.ones(N)), base)
    keep = np.arange(N) % 3 == 0
    dropped = jaxsce.cross_entropy(z, d["y"], ignore_index=-100, sample_weight=jnp.asarray(keep, z.dtype))
    np.testing.assert_allclose(dropped, jaxsce.cross_entropy(z, d["y"], ignore_index=-100, where=jnp.asarray(keep)))


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (jnp.ones(N - 1), ValueError, r"sample_weight has shape \(28,\)"),
        (jnp.ones(N, jnp.int32), TypeError, "sample_weight"),
    ],
)
@pytest.mark.parametrize("fn", ["logits", "linear"])
def test_bad_sample_weight_raises_naming_it(bad, error, match, fn):
    d = _data()
    with pytest.raises(error, match=match):
        if fn == "logits":
            jaxsce.cross_entropy(d["h"] @ d["w"], d["y"], sample_weight=bad)
        else:
            jaxsce.linear_cross_entropy(d["h"], d["w"], d["y"], sample_weight=bad)
