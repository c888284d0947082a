"""The conformance suite: each property every public loss must have, written once and run over the registry
of all of them (``LOSSES``; a test fails when a public loss is missing from it).

Properties: masked examples with NaN data give the results of clean data (value and gradients, the
masked gradients exactly 0); a schedule of a traced option compiles once; bad input is refused at trace
time naming the argument; 16-bit inputs give a float32 loss and gradients in their own dtype that agree
with float32; a fused loss equals its logit-level twin of ``hidden @ weight`` in float64 (values and
gradients); every option of a logit-level loss exists on its fused twin and the other way round, except
those about the head (the twins cannot drift); and inside ``jax.shard_map`` a vocabulary split over
``axis_name`` gives the unsharded loss and gradients in both ``check_vma`` modes.

The fast set runs each property on the one loss named in its ``fast_cases`` mark (declared here, not by
the registry's order); the slow set runs every loss.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from marks import CountingJit, fast_cases

import jaxsce

B, L, D, V, K = 2, 5, 8, 40, 4


@dataclasses.dataclass(frozen=True)
class Loss:
    """How to call one public loss on the suite's small batch.

    ``call(diff, data, **options)`` returns a scalar; ``diff`` are the differentiable inputs (the logits,
    or the hidden states and the head), ``data`` the rest (labels, masks, advantages...). ``mask`` names
    the keyword of the mask over the ``[B, L]`` examples (the call splits it where a loss takes two).
    ``traced``: a float option and two in-range values. ``twin``: the logit-level loss a fused one equals.
    """

    call: Callable
    fused: bool
    mask: str = "where"
    traced: tuple = ("temperature", 0.8, 1.3)
    twin: str | None = None
    first: str = "logits"  # the name of the first differentiable argument, as errors spell it
    vocab_data: tuple = ()  # data split over the vocabulary like the head (a teacher's head), by key


def _data(seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(B, L, D))
    w = rng.normal(size=(D, V)) * 0.6
    return dict(
        h=h,
        w=w,
        ht=rng.normal(size=(B, L, D)),
        wt=rng.normal(size=(D, V)) * 0.6,
        y=rng.integers(0, V, size=(B, L)).astype(np.int32),
        y2=rng.integers(0, V, size=(B, L)).astype(np.int32),
        adv=np.array([1.0, -0.5]),
        old=-np.log(V) + 0.1 * rng.normal(size=(B, L)),
        idx=np.stack([rng.permutation(V)[:K] for _ in range(B * L)]).reshape(B, L, K).astype(np.int32),
        tlp=np.log(np.full((B, L, K), 0.15)),
    )


def _policy(f, d, z, **kw):
    return f(*z, d["y"], d["adv"], old_log_probs=d["old"], **kw)


def _pref(f, d, z, chosen_where=None, **kw):
    if chosen_where is not None:  # the suite's mask for the chosen completions; flipped for the rejected
        kw.update(chosen_where=chosen_where, rejected_where=jnp.flip(chosen_where, 0))
    if len(z) == 1:  # logits [2B, L, V]: chosen then rejected
        return f(z[0][:B], z[0][B:], d["y"], d["y2"], **kw)
    h, w = z
    return f(h[:B], h[B:], w, d["y"], d["y2"], **kw)


def _sharded(f, d, z, **kw):
    mesh = jax.make_mesh((2,), ("vocab",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    return f(*z, d["y"], mesh=mesh, vocab_axis="vocab", **kw)


LOSSES: dict[str, Loss] = {
    "cross_entropy": Loss(lambda z, d, **kw: jaxsce.cross_entropy(*z, d["y"], **kw), False),
    "linear_cross_entropy": Loss(
        lambda z, d, **kw: jaxsce.linear_cross_entropy(*z, d["y"], **kw), True, twin="cross_entropy", first="hidden"
    ),
    "log_probs": Loss(lambda z, d, **kw: jnp.sum(jaxsce.log_probs(*z, d["y"], **kw)), False),
    "linear_log_probs": Loss(
        lambda z, d, **kw: jnp.sum(jaxsce.linear_log_probs(*z, d["y"], **kw)), True, twin="log_probs", first="hidden"
    ),
    "policy_loss": Loss(
        lambda z, d, **kw: _policy(jaxsce.policy_loss, d, z, **kw), False, traced=("epsilon", 0.1, 0.3)
    ),
    "linear_policy_loss": Loss(
        lambda z, d, **kw: _policy(jaxsce.linear_policy_loss, d, z, **kw),
        True,
        traced=("epsilon", 0.1, 0.3),
        twin="policy_loss",
        first="hidden",
    ),
    "preference_loss": Loss(
        lambda z, d, **kw: _pref(jaxsce.preference_loss, d, z, **kw),
        False,
        mask="chosen_where",
        traced=("beta", 0.1, 0.5),
    ),
    "linear_preference_loss": Loss(
        lambda z, d, **kw: _pref(jaxsce.linear_preference_loss, d, z, **kw),
        True,
        mask="chosen_where",
        traced=("beta", 0.1, 0.5),
        twin="preference_loss",
        first="chosen_hidden",
    ),
    "distillation_loss": Loss(
        lambda z, d, **kw: jaxsce.distillation_loss(*z, d["ht"] @ d["wt"], **kw),
        False,
        first="student_logits",
        vocab_data=("wt",),
    ),
    "linear_distillation_loss": Loss(
        lambda z, d, **kw: jaxsce.linear_distillation_loss(*z, d["ht"], d["wt"], **kw),
        True,
        twin="distillation_loss",
        first="student_hidden",
        vocab_data=("wt",),
    ),
    "topk_distillation_loss": Loss(
        lambda z, d, **kw: jaxsce.topk_distillation_loss(*z, d["idx"], d["tlp"], **kw), False, first="student_logits"
    ),
    "linear_topk_distillation_loss": Loss(
        lambda z, d, **kw: jaxsce.linear_topk_distillation_loss(*z, d["idx"], d["tlp"], **kw),
        True,
        twin="topk_distillation_loss",
        first="hidden",
    ),
    "sharded_cross_entropy": Loss(
        lambda z, d, **kw: _sharded(jaxsce.sharded_cross_entropy, d, z, **kw),
        False,
        traced=("label_smoothing", 0.1, 0.2),
    ),
    "sharded_linear_cross_entropy": Loss(
        lambda z, d, **kw: _sharded(jaxsce.sharded_linear_cross_entropy, d, z, **kw),
        True,
        traced=("label_smoothing", 0.1, 0.2),
        twin="sharded_cross_entropy",
        first="hidden",
    ),
}
NAMES = sorted(LOSSES)
FUSED = sorted(n for n in NAMES if LOSSES[n].fused)


def _inputs(name, dtype=jnp.float64, seed=0):
    """The differentiable inputs of ``name`` (in ``dtype``) and its data."""
    d = _data(seed)
    data = {k: jnp.asarray(v) for k, v in d.items()}
    h, w = data["h"], data["w"]
    if name in ("preference_loss", "linear_preference_loss"):
        h = jnp.concatenate([h, data["ht"]])  # [2B, L, D]: chosen, then rejected
    diff = (h, w) if LOSSES[name].fused else (h @ w,)
    data.update(ht=data["ht"].astype(dtype), wt=data["wt"].astype(dtype))  # a teacher in the student's dtype
    return tuple(x.astype(dtype) for x in diff), data


def _mask():
    m = np.ones((B, L), bool)
    m[0, :2] = False  # a prompt
    m[1, -1] = False  # padding
    return jnp.asarray(m)


def _poison(name, diff, mask):
    """NaN in every masked example's differentiable inputs (the logits' rows, or the hidden states')."""
    x = diff[0]
    full = jnp.concatenate([mask, jnp.flip(mask, 0)]) if x.shape[0] == 2 * B else mask
    x = jnp.where(full[..., None], x, jnp.nan)
    return (x,) + diff[1:]


def test_every_public_loss_is_in_the_registry():
    public = {
        n
        for n in jaxsce.__all__
        if callable(getattr(jaxsce, n)) and n not in ("softmax", "log_softmax", "logsumexp") and n[0].islower()
    }
    assert public == set(LOSSES)


@pytest.mark.parametrize("name", NAMES)
@fast_cases(lambda p: p["name"] == "linear_policy_loss")
def test_masked_nan_examples_give_the_results_of_clean_data(name):
    spec = LOSSES[name]
    diff, data = _inputs(name)
    mask = _mask()

    def f(*z):
        return spec.call(z, data, **{spec.mask: mask})

    clean, clean_g = jax.value_and_grad(f, argnums=tuple(range(len(diff))))(*diff)
    got, got_g = jax.value_and_grad(f, argnums=tuple(range(len(diff))))(*_poison(name, diff, mask))
    assert np.isfinite(clean)
    np.testing.assert_allclose(got, clean, rtol=1e-12)
    for g, c in zip(got_g, clean_g):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, c, rtol=1e-10, atol=1e-14)
    masked_rows = ~np.asarray(mask)
    first = np.asarray(got_g[0])[:B] if got_g[0].shape[0] == 2 * B else np.asarray(got_g[0])
    assert np.all(first[masked_rows] == 0)


@pytest.mark.parametrize("name", NAMES)
@fast_cases(lambda p: p["name"] == "linear_distillation_loss")
def test_a_schedule_of_a_traced_option_compiles_once(name):
    spec = LOSSES[name]
    diff, data = _inputs(name)
    option, a, b = spec.traced
    f = CountingJit(lambda z, value: spec.call(z, data, **{option: value}))
    first = f(diff, jnp.asarray(a))
    second = f(diff, jnp.asarray(b))
    assert f.traces == 1
    assert np.isfinite(first) and np.isfinite(second) and first != second
    np.testing.assert_allclose(first, spec.call(diff, data, **{option: a}), rtol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@fast_cases(lambda p: p["name"] == "preference_loss")
def test_bad_input_is_refused_naming_the_argument(name):
    spec = LOSSES[name]
    diff, data = _inputs(name)
    integer = (diff[0].astype(jnp.int32),) + diff[1:]
    with pytest.raises(TypeError, match=spec.first):
        spec.call(integer, data)
    with pytest.raises(ValueError, match=spec.mask):
        spec.call(diff, data, **{spec.mask: jnp.ones((B, L + 1), bool)})
    with pytest.raises(ValueError, match=spec.traced[0]):
        spec.call(diff, data, **{spec.traced[0]: -1.0})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@fast_cases(lambda p: p["name"] == "linear_log_probs")
def test_16_bit_inputs_give_float32_loss_and_gradients_in_their_dtype(name, dtype):
    spec = LOSSES[name]
    diff, data = _inputs(name, dtype)
    f = lambda *z: spec.call(z, data)  # noqa: E731
    value, grads = jax.value_and_grad(f, argnums=tuple(range(len(diff))))(*diff)
    assert value.dtype == jnp.float32
    want, want_g = jax.value_and_grad(f, argnums=tuple(range(len(diff))))(*(x.astype(jnp.float32) for x in diff))
    np.testing.assert_allclose(value, want, rtol=2e-2, atol=2e-2)
    for g, w in zip(grads, want_g):
        assert g.dtype == dtype
        scale = float(jnp.max(jnp.abs(w))) + 1e-6
        np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(w) / scale, atol=3e-2)


@pytest.mark.parametrize("name", FUSED)
@fast_cases(lambda p: p["name"] == "linear_preference_loss")
def test_a_fused_loss_equals_its_logit_level_twin(name):
    spec, twin = LOSSES[name], LOSSES[LOSSES[name].twin]
    diff, data = _inputs(name)
    mask = _mask()
    kw = {spec.mask: mask}
    fused = lambda h, w: spec.call((h, w), data, **kw)  # noqa: E731
    logits = lambda h, w: twin.call((h @ w,), data, **kw)  # noqa: E731
    got, got_g = jax.value_and_grad(fused, argnums=(0, 1))(*diff)
    want, want_g = jax.value_and_grad(logits, argnums=(0, 1))(*diff)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


#: Options that only a fused loss can have (its head and its blocks), or only the logit level.
HEAD_OPTIONS = {
    "linear_bias",
    "weight_layout",
    "token_block",
    "vocab_block",
    "memory_budget",
    "ref_hidden",
    "ref_weight",
    "ref_bias",
    "ref_chosen_hidden",
    "ref_rejected_hidden",
    "student_bias",
    "teacher_bias",
    "teacher_weight_layout",
}
LOGIT_OPTIONS = {"axis"}


@pytest.mark.parametrize("name", FUSED)
def test_twins_have_the_same_options(name):
    """distillation_loss lacked labels, hard_weight, soft_weight, ignore_index and top_k; policy_loss
    lacked batch_invariant: every option not about the head exists at both levels."""

    def options(f):
        return {n for n, p in inspect.signature(f).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    fused, logit = getattr(jaxsce, name), getattr(jaxsce, LOSSES[name].twin)
    assert options(fused) - HEAD_OPTIONS == options(logit) - LOGIT_OPTIONS


#: Every loss that takes ``axis_name`` (the ``sharded_`` wrappers build this ``shard_map`` themselves).
SPLIT = [n for n in NAMES if not n.startswith("sharded_")]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("name", SPLIT)
@pytest.mark.parametrize("check_vma", [True, False])
@fast_cases(lambda p: p["name"] == "linear_cross_entropy" and p["check_vma"])
def test_vocabulary_parallel_equals_unsharded(name, check_vma):
    """The vocabulary (the logits' last axis, the head's columns) split over 4 devices; the data (labels,
    the teacher's stored top-k ids, which are global class ids) whole on every device."""
    spec = LOSSES[name]
    diff, data = _inputs(name)
    mesh = jax.make_mesh((4,), ("vocab",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    vocab = P(None, "vocab") if spec.fused else P(None, None, "vocab")
    specs = (P(), vocab) if spec.fused else (vocab,)

    split = {k: data[k] for k in spec.vocab_data}

    def local(z, split):
        return spec.call(z, {**data, **split}, axis_name="vocab")

    in_specs = (specs, {k: P(None, "vocab") for k in split})
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=check_vma))
    f = lambda *z: spec.call(z, data)  # noqa: E731
    argnums = tuple(range(len(diff)))
    got, got_g = jax.value_and_grad(lambda *z: sharded(z, split), argnums=argnums)(*diff)
    want, want_g = jax.value_and_grad(f, argnums=argnums)(*diff)
    np.testing.assert_allclose(got, want, rtol=1e-11)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


#: A value each kind of static option refuses.
BAD_STATIC = {
    "axis": [[0]],
    "axis_name": [["x"]],
    "batch_axis_name": [["x"]],
    "num_classes": 0,
    "ignore_index": 1.5,
    "top_k": 1.5,
    "top_p_candidates": 0,
    "reduction": "average",
    "derivative": "fwd",
    "weight_layout": "vdv",
    "token_block": -8,
    "vocab_block": 0,
    "memory_budget": None,
    "max_completion_length": 0,
}


def _static_cases():
    from jaxsce._api import _options

    for name in NAMES:
        params = inspect.signature(getattr(jaxsce, name)).parameters
        for option in sorted(set(params) & set(_options.STATIC)):
            yield name, option


@pytest.mark.parametrize("name, option", list(_static_cases()))
@fast_cases(lambda p: p["name"] == "linear_policy_loss")
def test_every_static_option_is_checked_at_the_door_by_its_one_rule(name, option):
    """Each static option is declared once (``_options.STATIC``) and checked the same way for every
    function that takes it, before any array is looked at (so the arrays here may be anything)."""
    bad = BAD_STATIC.get(option, "yes")  # the flags refuse a string
    f = getattr(jaxsce, name)
    positional = sum(
        p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in inspect.signature(f).parameters.values()
    )
    with pytest.raises((TypeError, ValueError), match=option):
        f(*([None] * positional), **{option: bad})
