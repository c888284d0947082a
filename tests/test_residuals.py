"""cross_entropy's platform-dependent residuals: both branches give the same numbers.

On CPU the reverse rule keeps ``exp(s - m)`` (one ``exp`` per logit); on
GPU/TPU it keeps the logits and recomputes. The ``residual_branch`` fixture
runs each test under both, switching the same ``lax.platform_dependent``.
"""

import compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from marks import all_cases_fast, fast_cases
from reference import naive_cross_entropy, np_cross_entropy

import jaxsce
from jaxsce._engine import _logit_ce

N, C = 12, 37

OPTIONS = {
    "plain": {},
    "weight": dict(weight=np.linspace(0.5, 2.0, C)),
    "z_loss": dict(z_loss=1e-3),
    "aux": dict(return_aux=True),
    "ignore_index": dict(ignore_index=3),
    "where": dict(where=np.arange(N) % 4 != 1),
    "sample_weight": dict(sample_weight=np.linspace(0.0, 2.0, N)),
    # Not eligible for the kept exponentials: the same code either way.
    "label_smoothing": dict(label_smoothing=0.1),
    "logit_softcap": dict(logit_softcap=5.0),
}


def _data(dtype=np.float64, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(N, C)) * scale, dtype)
    labels = jnp.asarray(rng.integers(0, C, size=N), jnp.int32)
    return logits, labels


def _loss(logits, labels, kw, reduction="mean"):
    out = jaxsce.cross_entropy(logits, labels, reduction=reduction, **kw)
    return out[0] if kw.get("return_aux") else out


@pytest.mark.slow  # both branches run fast in test_extreme_rows_agree_between_branches_and_with_float64
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_value_and_gradient_match_float64_references(residual_branch, name, reduction):
    logits, labels = _data()
    labels = labels.at[0].set(3)  # one ignored example for ignore_index
    kw = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in OPTIONS[name].items()}
    ref_kw = {k: v for k, v in OPTIONS[name].items() if k not in ("return_aux", "sample_weight")}
    sw = OPTIONS[name].get("sample_weight")
    value = _loss(logits, labels, kw, reduction)
    ref = np_cross_entropy(np.asarray(logits), labels, reduction="none" if sw is not None else reduction, **ref_kw)
    if sw is not None:
        ref = {"none": ref * sw, "sum": np.sum(ref * sw), "mean": np.sum(ref * sw) / np.sum(sw)}[reduction]
    np.testing.assert_allclose(value, ref, rtol=1e-12, atol=1e-14)
    if sw is not None:
        return  # the sample-weight gradient is checked in test_sample_weight
    cot = jnp.asarray(np.random.default_rng(1).normal(size=np.shape(value)))
    grad = jax.grad(lambda x: jnp.sum(cot * _loss(x, labels, kw, reduction)))(logits)
    naive_kw = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in ref_kw.items()}
    naive = jax.grad(lambda x: jnp.sum(cot * naive_cross_entropy(x, labels, reduction=reduction, **naive_kw)))(logits)
    np.testing.assert_allclose(grad, naive, rtol=1e-10, atol=1e-13)


@fast_cases(lambda p: p["case"] == "far_label")  # under both branches
@all_cases_fast
@pytest.mark.parametrize("case", ["large", "far_label", "nan", "pos_inf", "neg_inf_column", "masked_nan"])
def test_extreme_rows_agree_between_branches_and_with_float64(residual_branch, case):
    logits, labels = _data(np.float32, seed=2)
    x = np.array(logits)
    where = None
    if case == "large":
        x *= 1e30
    elif case == "far_label":
        x[np.arange(N), np.asarray(labels)] = x.max(-1) - 200.0
    elif case in ("nan", "pos_inf", "masked_nan"):
        x[2, 5] = np.inf if case == "pos_inf" else np.nan
        where = None if case != "masked_nan" else jnp.asarray(np.arange(N) != 2)
    elif case == "neg_inf_column":
        x[:, 4] = -np.inf
        labels = jnp.where(labels == 4, 0, labels)
    x = jnp.asarray(x)
    out = jaxsce.cross_entropy(x, labels, reduction="none", where=where)
    grad = jax.grad(lambda x: jaxsce.cross_entropy(x, labels, where=where))(x)
    x64 = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore"):
        ref = np_cross_entropy(x64, labels, reduction="none", where=None if where is None else np.asarray(where))
    if case == "neg_inf_column":  # the reference's 0 * log(0) in the smoothing-free sum is NaN
        x_y = x64[np.arange(N), np.asarray(labels)]
        m = x64.max(-1)
        ref = m + np.log(np.sum(np.exp(x64 - m[:, None]), -1)) - x_y
    if case in ("nan", "pos_inf"):
        # The row's loss is NaN, and so is its gradient at the bad entry.
        assert np.isnan(out[2]) and np.isnan(grad[2, 5])
        rows = np.arange(N) != 2
        np.testing.assert_allclose(out[rows], ref[rows], rtol=2e-6)
        return
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6)
    with np.errstate(invalid="ignore"):
        m = np.max(x64, -1, keepdims=True)
        p = np.exp(x64 - m) / np.sum(np.exp(x64 - m), -1, keepdims=True)
    counted = np.ones(N, bool) if where is None else np.asarray(where)
    expected = np.where(counted[:, None], p - np.eye(C)[np.asarray(labels)], 0) / counted.sum()
    np.testing.assert_allclose(grad, expected, atol=1e-7)
    assert np.all(np.isfinite(grad))


@fast_cases(lambda p: p["classes"] == 37)
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("classes", [C, _logit_ce.KEEP_EXP_MAX_CLASSES + 1])
@all_cases_fast
def test_the_one_logits_sized_residual(residual_branch, dtype, classes):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, classes)) * 3, dtype)
    labels = jnp.asarray(rng.integers(0, classes, size=4), jnp.int32)
    _, vjp = jax.vjp(lambda x: jaxsce.cross_entropy(x, labels), logits)
    leaves = jax.tree.leaves(vjp)
    big = [leaf for leaf in leaves if leaf.size >= logits.size]
    # Exactly one logits-sized residual, in the logits' dtype (no float32 copy
    # of bf16 logits, no softmax next to the logits), and [N]-sized floats.
    assert len(big) == 1 and big[0].dtype == logits.dtype
    assert all(leaf.size <= 4 for leaf in leaves if leaf is not big[0])
    kept = np.asarray(big[0], np.float64)
    x = np.asarray(logits, np.float64)
    if residual_branch == "cpu" and dtype == np.float32 and classes <= _logit_ce.KEEP_EXP_MAX_CLASSES:
        np.testing.assert_allclose(kept, np.exp(x - x.max(-1, keepdims=True)), rtol=1e-6)
    else:
        np.testing.assert_array_equal(kept, x)


@fast_cases(lambda p: p["v"] != 8192)
@pytest.mark.parametrize("n,v", [(2048, 1024), (512, 8192), (256, 32768)])
@all_cases_fast
def test_training_step_writes_the_gradient_in_place(residual_branch, n, v):
    # value_and_grad w.r.t. (h, W) of cross_entropy(h @ W, y): the logits are an
    # intermediate, and either residual replaces them one for one, so the
    # compiled temporaries stay one logits-sized buffer (plus [N]-sized rows).
    d = 64
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    step = jax.jit(jax.value_and_grad(lambda h, w, y: jaxsce.cross_entropy(h @ w, y), argnums=(0, 1)))
    temp = step.lower(h, w, y).compile().memory_analysis().temp_size_in_bytes
    logits_bytes = n * v * 4
    # The XLA of jax < 0.10 aliases neither branch's gradient with its residual
    # (two logits-sized buffers either way); from 0.10 both write in place.
    limit = 1.05 if compat.JAX >= (0, 10) else 2.05
    assert temp <= logits_bytes * limit, temp / logits_bytes


def test_cpu_branch_keeps_exponentials_only_on_cpu():
    # Lowered for an accelerator, the same function keeps the logits: the
    # exported module for cuda and tpu computes the same on CPU.
    logits, labels = _data(np.float32)
    f = jax.jit(jax.value_and_grad(lambda x: jaxsce.cross_entropy(x, labels)))
    exported = jax.export.export(f, platforms=["cpu", "cuda", "tpu"])(logits)
    (value, grad), (value_ref, grad_ref) = exported.call(logits), f(logits)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-8)
