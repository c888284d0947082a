"""Every loss option, alone and in pairs, against PyTorch's documented formulas in float64."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marks import all_cases_fast
from reference import naive_cross_entropy, np_cross_entropy, np_logsumexp

import jaxsce

N, C = 10, 7
IGNORE = -100


def _inputs(soft: bool, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(N, C)) * 2, dtype)
    if soft:
        t = rng.random((N, C)) ** 3
        t[:, 0] = 0.0  # zero-probability classes exercise 0 * log 0
        labels = jnp.asarray(t / t.sum(-1, keepdims=True), dtype)
    else:
        y = rng.integers(0, C, size=N)
        y[[1, 6]] = IGNORE  # ignored unless ignore_index is off, then masked below
        labels = jnp.asarray(y, jnp.int32)
    return logits, labels


OPTION_VALUES = {
    "ignore_index": IGNORE,
    "weight": jnp.asarray(np.linspace(0.2, 2.0, C)),
    "label_smoothing": 0.15,
    "z_loss": 1e-2,
    "logit_softcap": 3.0,
    "where": jnp.asarray(np.arange(N) % 4 != 2),
}
SINGLES = [(k,) for k in OPTION_VALUES]
PAIRS = list(itertools.combinations(OPTION_VALUES, 2))
# Every option alone runs in the fast set; every pair of options in the slow one.
OPTION_SETS = [pytest.param(n, id="+".join(n) or "plain") for n in [(), *SINGLES]] + [
    pytest.param(n, id="+".join(n), marks=pytest.mark.slow) for n in PAIRS
]


def _kwargs(names, soft):
    kw = {k: OPTION_VALUES[k] for k in names}
    if soft:
        kw.pop("ignore_index", None)
    elif "ignore_index" not in kw:
        # IGNORE labels must not be counted: mask them with where instead.
        keep = jnp.asarray(np.array([i not in (1, 6) for i in range(N)]))
        kw["where"] = keep & kw["where"] if "where" in kw else keep
    return kw


def _np_kwargs(kw):
    return {k: (np.asarray(v) if hasattr(v, "shape") else v) for k, v in kw.items()}


@pytest.mark.parametrize("soft", [False, True], ids=["class_ids", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("names", OPTION_SETS)
def test_value_and_grad_against_float64_references(names, reduction, soft):
    logits, labels = _inputs(soft)
    kw = _kwargs(names, soft)
    ref = np_cross_entropy(np.asarray(logits), np.asarray(labels), reduction=reduction, **_np_kwargs(kw))
    out = jaxsce.cross_entropy(logits, labels, reduction=reduction, **kw)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)

    cot = jnp.asarray(np.random.default_rng(1).normal(size=np.shape(ref)))

    def ours(x, y):
        return jnp.sum(cot * jaxsce.cross_entropy(x, y, reduction=reduction, **kw))

    def naive(x, y):
        return jnp.sum(cot * naive_cross_entropy(x, y, reduction=reduction, **kw))

    argnums = (0, 1) if soft else 0
    g, g_naive = jax.grad(ours, argnums)(logits, labels), jax.grad(naive, argnums)(logits, labels)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_naive)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # forward mode runs fast in test_correctness::test_forward_mode_works_for_every_loss
@pytest.mark.parametrize("soft", [False, True], ids=["class_ids", "probs"])
@pytest.mark.parametrize("names", OPTION_SETS)
def test_jvp_mode_hessian_and_jvp_match_naive(names, soft):
    logits, labels = _inputs(soft, seed=2)
    logits, labels = logits[:4], labels[:4]
    kw = _kwargs(names, soft)
    if "where" in kw:
        kw["where"] = kw["where"][:4]
    ours = lambda x: jaxsce.cross_entropy(x, labels, derivative="jvp", **kw)
    naive = lambda x: naive_cross_entropy(x, labels, **kw)
    np.testing.assert_allclose(jax.hessian(ours)(logits), jax.hessian(naive)(logits), rtol=1e-9, atol=1e-12)
    tangent = jnp.asarray(np.random.default_rng(3).normal(size=logits.shape))
    (v, t), (v_ref, t_ref) = jax.jvp(ours, (logits,), (tangent,)), jax.jvp(naive, (logits,), (tangent,))
    np.testing.assert_allclose(v, v_ref, rtol=1e-12)
    np.testing.assert_allclose(t, t_ref, rtol=1e-10, atol=1e-12)


def test_jvp_mode_forward_mode_through_probability_targets():
    logits, targets = _inputs(True, seed=4)
    t_dot = jnp.asarray(np.random.default_rng(5).normal(size=targets.shape))
    ours = lambda y: jaxsce.cross_entropy(logits, y, derivative="jvp", label_smoothing=0.1)
    naive = lambda y: naive_cross_entropy(logits, y, label_smoothing=0.1)
    np.testing.assert_allclose(
        jax.jvp(ours, (targets,), (t_dot,))[1], jax.jvp(naive, (targets,), (t_dot,))[1], rtol=1e-10
    )


def test_vjp_mode_refuses_forward_mode_clearly():
    logits, labels = _inputs(False)
    labels = jnp.abs(labels) % C
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: jaxsce.cross_entropy(x, labels), (logits,), (logits,))


@pytest.mark.parametrize("derivative", ["vjp", "jvp"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_everything_masked_gives_zero_loss_and_zero_gradient(reduction, derivative):
    logits, labels = _inputs(False)
    labels = jnp.full((N,), IGNORE, jnp.int32)
    f = lambda x: jaxsce.cross_entropy(
        x, labels, ignore_index=IGNORE, reduction=reduction, derivative=derivative, weight=OPTION_VALUES["weight"]
    )
    assert f(logits) == 0
    np.testing.assert_array_equal(jax.grad(f)(logits), 0)


def test_soft_labels_zero_probability_with_neg_inf_logit_is_nan_free():
    logits, targets = _inputs(True)
    logits = logits.at[:, 0].set(-jnp.inf)  # targets[:, 0] == 0
    loss = jaxsce.cross_entropy(logits, targets, weight=OPTION_VALUES["weight"])
    assert np.isfinite(loss)
    g_logits, g_targets = jax.grad(jaxsce.cross_entropy, (0, 1))(logits, targets)
    assert np.all(np.isfinite(g_logits)) and np.all(np.isfinite(g_targets))
    # Distillation through a masked teacher: d/d teacher_logits stays finite.
    teacher = jnp.asarray(np.random.default_rng(6).normal(size=(N, C))).at[:, 0].set(-jnp.inf)
    g_teacher = jax.grad(lambda t: jaxsce.cross_entropy(logits, jaxsce.softmax(t)))(teacher)
    assert np.all(np.isfinite(g_teacher))


def test_tuple_axis_labels_are_flat_indices():
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(3, 4, 5, 2)))
    labels = jnp.asarray(rng.integers(0, 10, size=(3, 4)), jnp.int32)
    out = jaxsce.cross_entropy(logits, labels, axis=(2, 3), reduction="none", label_smoothing=0.1)
    flat = np.asarray(logits).reshape(12, 10)
    np.testing.assert_allclose(
        out.reshape(-1),
        np_cross_entropy(flat, np.asarray(labels).reshape(-1), label_smoothing=0.1, reduction="none"),
        rtol=1e-12,
    )
    g = jax.grad(lambda x: jaxsce.cross_entropy(x, labels, axis=(2, 3)))(logits)
    g_ref = jax.grad(lambda x: naive_cross_entropy(x, labels.reshape(-1)))(jnp.asarray(flat))
    np.testing.assert_allclose(g.reshape(12, 10), g_ref, rtol=1e-10)


def test_aux_outputs_match_reference():
    logits, labels = _inputs(False, seed=8)
    where = jnp.asarray(np.array([i not in (1, 6) for i in range(N)]))
    loss, aux = jaxsce.cross_entropy(logits, labels, where=where, z_loss=1e-2, logit_softcap=3.0, return_aux=True)
    capped = 3.0 * np.tanh(np.asarray(logits) / 3.0)
    lse = np_logsumexp(capped)
    keep = np.asarray(where)
    np.testing.assert_allclose(aux.lse, np.where(keep, lse, 0), rtol=1e-12)
    np.testing.assert_allclose(aux.z_loss, np.where(keep, 1e-2 * lse**2, 0), rtol=1e-12)
    hits = (np.argmax(capped, -1) == np.asarray(labels))[keep]
    np.testing.assert_allclose(aux.accuracy, hits.mean())
    assert float(aux.count) == keep.sum()
    # The aux lse is differentiable: its gradient is the softmax.
    g = jax.grad(lambda x: jnp.sum(jaxsce.cross_entropy(x, labels, where=where, return_aux=True)[1].lse))(logits)
    p = np.exp(np.asarray(logits) - np_logsumexp(np.asarray(logits))[:, None])
    np.testing.assert_allclose(g, np.where(keep[:, None], p, 0), rtol=1e-12)


def test_aux_accuracy_for_probability_targets():
    logits, targets = _inputs(True, seed=9)
    _, aux = jaxsce.cross_entropy(logits, targets, return_aux=True)
    expected = np.mean(np.argmax(np.asarray(logits), -1) == np.argmax(np.asarray(targets), -1))
    np.testing.assert_allclose(aux.accuracy, expected)


def test_class_weights_get_no_gradient_like_pytorch():
    logits, labels = _inputs(False)
    labels = jnp.abs(labels) % C
    g = jax.grad(lambda w: jaxsce.cross_entropy(logits, labels, weight=w))(OPTION_VALUES["weight"])
    np.testing.assert_array_equal(g, 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(dtype):
    rng = np.random.default_rng(10)
    logits = jnp.asarray(rng.normal(size=(256, 512)) * 4, dtype)
    labels = jnp.asarray(rng.integers(0, 512, size=256), jnp.int32)
    upcast = logits.astype(jnp.float32)
    ours = jaxsce.cross_entropy(logits, labels, label_smoothing=0.1)
    assert ours.dtype == jnp.float32
    f32 = jaxsce.cross_entropy(upcast, labels, label_smoothing=0.1)
    np.testing.assert_allclose(ours, f32, rtol=1e-6)
    ref = np_cross_entropy(np.asarray(upcast, np.float64), np.asarray(labels), label_smoothing=0.1)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    # optax computes in the input dtype (optax issue 1020): visibly quantized.
    theirs = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    ours_plain = jaxsce.cross_entropy(logits, labels)
    ref_plain = np_cross_entropy(np.asarray(upcast, np.float64), np.asarray(labels))
    assert abs(float(ours_plain) - ref_plain) < 1e-5 * ref_plain
    assert abs(float(theirs) - ref_plain) > 100 * abs(float(ours_plain) - ref_plain)
    g = jax.grad(jaxsce.cross_entropy)(logits, labels, label_smoothing=0.1)
    assert g.dtype == dtype
    g32 = jax.grad(jaxsce.cross_entropy)(upcast, labels, label_smoothing=0.1)
    np.testing.assert_allclose(np.asarray(g, np.float32), g32, rtol=1e-1, atol=1e-5)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(
    names=st.sets(st.sampled_from(sorted(OPTION_VALUES)), max_size=4),
    soft=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    derivative=st.sampled_from(["vjp", "jvp"]),
    dtype=st.sampled_from([np.float32, jnp.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_property_options_in_low_precision(names, soft, reduction, derivative, dtype, seed):
    logits, labels = _inputs(soft, seed=seed, dtype=np.float64)
    kw = _kwargs(sorted(names), soft)
    x = logits.astype(dtype)
    y = labels.astype(dtype) if soft else labels
    ref = np_cross_entropy(
        np.asarray(x, np.float64),
        np.asarray(y, np.float64) if soft else np.asarray(y),
        reduction=reduction,
        **_np_kwargs(kw),
    )
    out = jaxsce.cross_entropy(x, y, reduction=reduction, derivative=derivative, **kw)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(jaxsce.cross_entropy(x, y, reduction=reduction, derivative=derivative, **kw)))(x)
    g_ref = jax.grad(
        lambda x: jnp.sum(
            naive_cross_entropy(x, jnp.asarray(np.asarray(y, np.float64)) if soft else y, reduction=reduction, **kw)
        )
    )(jnp.asarray(np.asarray(x, np.float64)))
    assert g.dtype == x.dtype
    tol = 2e-3 if dtype == np.float32 else 1e-1
    np.testing.assert_allclose(np.asarray(g, np.float64), g_ref, rtol=tol, atol=tol * 1e-2)


_Z, _Y, _A = jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), jnp.zeros((2,))
_H, _W = jnp.zeros((2, 1, 3)), jnp.zeros((3, 4))


@pytest.mark.parametrize(
    "call,typo,meant",
    [
        (lambda **kw: jaxsce.cross_entropy(_Z, _Y, **kw), "label_smothing", "label_smoothing"),
        (lambda **kw: jaxsce.linear_cross_entropy(_Z, _W.T, _Y, **kw), "weight_layot", "weight_layout"),
        (lambda **kw: jaxsce.log_probs(_Z, _Y, **kw), "return_entropies", "return_entropy"),
        (lambda **kw: jaxsce.linear_log_probs(_Z, _W.T, _Y, **kw), "temprature", "temperature"),
        (lambda **kw: jaxsce.distillation_loss(_Z, _Z, **kw), "divergance", "divergence"),
        (lambda **kw: jaxsce.linear_distillation_loss(_Z, _W.T, _Z, _W.T, **kw), "reductions", "reduction"),
        (lambda **kw: jaxsce.policy_loss(_H @ _W, _Y[:, None], _A, **kw), "loss_typ", "loss_type"),
        (lambda **kw: jaxsce.linear_policy_loss(_H, _W, _Y[:, None], _A, **kw), "epsilon_hi", "epsilon_high"),
        (lambda **kw: jaxsce.softmax(_Z, **kw), "axes", "axis"),
        (lambda **kw: jaxsce.sharded_cross_entropy(_Z, _Y, mesh=None, **kw), "z_los", "z_loss"),
        (lambda **kw: jaxsce.sharded_linear_cross_entropy(_Z, _W.T, _Y, mesh=None, **kw), "chunk_size", None),
    ],
)
@all_cases_fast
def test_a_mistyped_option_is_named_with_the_nearest_valid_name(call, typo, meant):
    hint = f" Did you mean '{meant}'" if meant else r"$"
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{typo}'.{hint}"):
        call(**{typo: 1})
