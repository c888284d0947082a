"""policy_loss and linear_policy_loss: the GRPO family against TRL's formula written naively
(float64, jax.grad), against Liger-Kernel's LigerFusedLinearGRPOLoss where installed, and
the fused paths, masks, dtypes, options and sharding."""

import functools
import itertools

import compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo import collective_sizes
from jax.sharding import PartitionSpec as P
from marks import CountingJit, all_cases_fast, fast_cases
from reference import naive_policy_loss

import jaxsce

B, L, D, V = 4, 6, 8, 29
LOSS_TYPES = ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo"]
MAX_LEN = 9


def _data(seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(B, L, D))
    w = rng.normal(size=(D, V)) * 0.6
    b = rng.normal(size=V) * 0.2
    y = rng.integers(0, V, size=(B, L))
    z = h @ w + b
    ls = z - np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1, keepdims=True)) - z.max(-1, keepdims=True)
    lp = np.take_along_axis(ls, y[..., None], -1)[..., 0]
    mask = np.ones((B, L), bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    return dict(
        h=jnp.asarray(h),
        w=jnp.asarray(w),
        b=jnp.asarray(b),
        y=jnp.asarray(y, jnp.int32),
        adv=jnp.asarray([1.0, -0.7, 0.4, -1.3]),
        mask=jnp.asarray(mask),
        # Ratios spread on both sides of the clipping range.
        old=jnp.asarray(lp + rng.normal(size=(B, L)) * 0.4),
        ref=jnp.asarray(lp + rng.normal(size=(B, L)) * 0.5),
        sampler=jnp.asarray(rng.uniform(0.3, 1.0, size=(B, L))),
    )


# name -> (public options, the reference's options); each uses the data by name.
OPTIONS = {
    "plain": {},
    "kl": dict(beta=0.05),
    "kl+correction+delta+sampler": dict(beta=0.04, kl_importance_correction=True, delta=1.3, sampler=True),
    "temperature+softcap+entropy": dict(temperature=0.7, logit_softcap=3.0, entropy_coef=0.01, beta=0.02),
}


def _valid(loss_type, level, option):
    if level == "sequence" and loss_type in ("cispo", "sapo"):
        return False
    return not ("delta" in OPTIONS[option] and loss_type in ("cispo", "sapo"))


def _kwargs(d, loss_type, level, option):
    """The public call's and the reference's keyword arguments."""
    o = dict(OPTIONS[option])
    sampler = o.pop("sampler", False)
    eps_high = 4.0 if loss_type == "cispo" else 0.28
    public = dict(
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_high=eps_high,
        max_completion_length=MAX_LEN,
        where=d["mask"],
        old_log_probs=d["old"],
        ref_log_probs=d["ref"],
        sampler_weights=d["sampler"] if sampler else None,
        sapo_temperatures=(0.9, 1.1),
        return_aux=True,
        **o,
    )
    naive = dict(
        old=d["old"],
        ref=d["ref"],
        loss_type=loss_type,
        level=level,
        epsilon_high=eps_high,
        delta=o.get("delta"),
        beta=o.get("beta", 0.0),
        kl_correction=o.get("kl_importance_correction", False),
        sampler=d["sampler"] if sampler else None,
        max_len=MAX_LEN,
        sapo=(0.9, 1.1),
        temperature=o.get("temperature", 1.0),
        logit_softcap=o.get("logit_softcap"),
        entropy_coef=o.get("entropy_coef", 0.0),
    )
    return public, naive


def _call(fn, d, public):
    if fn == "logits":
        return lambda h, w, b: jaxsce.policy_loss(h @ w + b[None, None], d["y"], d["adv"], **public)
    return lambda h, w, b: jaxsce.linear_policy_loss(h, w, d["y"], d["adv"], linear_bias=b, **public)


def _close(a, b, rtol=1e-10, atol=1e-12):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# Fast set: each loss type with one option set (in turn), both levels and both entry points.
@fast_cases(lambda p: p["option"] == list(OPTIONS)[LOSS_TYPES.index(p["loss_type"]) % len(OPTIONS)])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("fn", ["logits", "linear"])
def test_loss_metrics_and_gradients_equal_the_naive_formula(fn, loss_type, level, option):
    if not _valid(loss_type, level, option):
        pytest.skip("not a defined combination (tested to raise below)")
    d = _data()
    public, naive = _kwargs(d, loss_type, level, option)
    f = _call(fn, d, public)

    def ref(h, w, b):
        return naive_policy_loss(h @ w + b[None, None], d["y"], d["adv"], d["mask"], **naive)

    args = (d["h"], d["w"], d["b"])
    (loss, aux), grads = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(*args)
    (r_loss, r_aux), r_grads = jax.value_and_grad(ref, (0, 1, 2), has_aux=True)(*args)
    _close(loss, r_loss)
    _close(tuple(aux), r_aux)
    _close(grads, r_grads)
    assert isinstance(aux, jaxsce.PolicyAux)


def test_per_token_advantages_and_per_completion_sampler_weights():
    d = _data(1)
    adv = jnp.asarray(np.random.default_rng(2).normal(size=(B, L)))
    sw = jnp.asarray([0.5, 1.0, 0.8, 0.3])
    kw = dict(where=d["mask"], old_log_probs=d["old"], loss_type="bnpo")
    ours = jaxsce.linear_policy_loss(d["h"], d["w"], d["y"], adv, sampler_weights=sw, **kw)
    z = d["h"] @ d["w"]
    ref, _ = naive_policy_loss(z, d["y"], adv, d["mask"], old=d["old"], sampler=sw, loss_type="bnpo")
    _close(ours, ref)


def _liger():
    try:
        import torch
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    return torch, LigerFusedLinearGRPOLoss


LIGER_GRID = list(
    itertools.product(LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [None, 1.5], [False, True], [1.0, 0.7])
)


def _liger_case(p):
    lt, level, beta, delta, _, _ = p
    return not (level == "sequence" and lt in ("cispo", "sapo")) and not (delta and lt in ("cispo", "sapo"))


# Fast set: each loss type at the token level (alternately with the KL, sampler weights and a
# temperature, or none), and GRPO at the sequence level with delta.
@fast_cases(
    lambda p: (
        (
            p["case"][1] == "token"
            and p["case"][2:]
            == ((0.04, None, True, 0.7) if LOSS_TYPES.index(p["case"][0]) % 2 else (0.0, None, False, 1.0))
        )
        or p["case"] == ("grpo", "sequence", 0.04, 1.5, False, 1.0)
    )
)
@pytest.mark.parametrize("case", [c for c in LIGER_GRID if _liger_case(c)], ids=lambda c: "-".join(map(str, c)))
def test_equals_liger_kernel_fused_linear_grpo(case):
    """Liger-Kernel 0.8.5's LigerFusedLinearGRPOLoss (its chunked, pure-torch path) on the same float64
    inputs: loss, d_hidden, d_weight, d_bias, and its metrics (the KL and the clipped fraction). Its
    log-probabilities are float32, hence the tolerance. LUSPO with padding is compared on full
    masks: Liger (as TRL) also weights the padding positions' losses there (see the guide)."""
    peer = _liger()
    if peer is None:
        pytest.skip("liger-kernel (and torch) not installed: pip install -e '.[liger]'")
    torch, Grpo = peer
    lt, level, beta, delta, sampler, temp = case
    d = _data(3)
    mask = np.ones((B, L), bool) if lt == "luspo" else np.asarray(d["mask"])
    eps_high = 4.0 if lt == "cispo" else 0.28
    module = Grpo(
        beta=beta, compiled=False, use_ref_model=beta != 0, epsilon_low=0.2, epsilon_high=eps_high, loss_type=lt,
        max_completion_length=MAX_LEN, importance_sampling_level=level, temperature=temp, delta=delta,
    )  # fmt: skip
    t = lambda x: torch.tensor(np.asarray(x))  # noqa: E731
    ht, wt, bt = (t(x).requires_grad_(True) for x in (d["h"], d["w"].T, d["b"]))
    loss_t, metrics = module(
        ht, wt, t(d["y"]).long(), t(mask).long(), t(d["adv"]), bt,
        ref_per_token_logps=t(d["ref"]) if beta else None, old_per_token_logps=t(d["old"]),
        vllm_is_ratio=t(d["sampler"]) if sampler else None,
    )  # fmt: skip
    loss_t.backward()

    def ours(h, w, b):
        return jaxsce.linear_policy_loss(
            h, w, d["y"], d["adv"], linear_bias=b, weight_layout="vd", where=jnp.asarray(mask),
            old_log_probs=d["old"], ref_log_probs=d["ref"] if beta else None, beta=beta, loss_type=lt,
            importance_sampling_level=level, epsilon_high=eps_high, delta=delta, temperature=temp,
            sampler_weights=d["sampler"] if sampler else None, max_completion_length=MAX_LEN, return_aux=True,
        )  # fmt: skip

    (loss, aux), grads = jax.value_and_grad(ours, (0, 1, 2), has_aux=True)(d["h"], d["w"].T, d["b"])
    np.testing.assert_allclose(float(loss), loss_t.item(), rtol=2e-6, atol=2e-6)
    for g, g_t in zip(grads, (ht.grad, wt.grad, bt.grad)):
        np.testing.assert_allclose(np.asarray(g), g_t.numpy(), rtol=1e-5, atol=2e-6)
    theirs = [m.item() for m in metrics]
    mine = ([float(aux.kl)] if beta else []) + [float(aux.clip_ratio)]
    np.testing.assert_allclose(mine, theirs, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("fn", ["logits", "linear"])
def test_masked_tokens_are_exactly_zero_even_with_nan_data(fn):
    d = _data(4)
    bad = ~d["mask"]
    nan = lambda x: jnp.where(bad, jnp.nan, x)  # noqa: E731
    public = dict(
        where=d["mask"], loss_type="grpo", beta=0.1, entropy_coef=0.01, importance_sampling_level="sequence",
        sampler_weights=nan(d["sampler"]), return_aux=True,
    )  # fmt: skip
    adv_tok = nan(jnp.broadcast_to(d["adv"][:, None], (B, L)))
    if fn == "logits":  # NaN logits; the weight is unused
        x = d["h"] @ d["w"]
        f = lambda z, w, old, ref: jaxsce.policy_loss(  # noqa: E731
            z, d["y"], adv_tok, old_log_probs=old, ref_log_probs=ref, **public
        )
    else:  # NaN hidden states
        x = d["h"]
        f = lambda h, w, old, ref: jaxsce.linear_policy_loss(  # noqa: E731
            h, w, d["y"], adv_tok, old_log_probs=old, ref_log_probs=ref, **public
        )
    x_nan, clean = jnp.where(bad[..., None], jnp.nan, x), jnp.where(bad[..., None], 0.0, x)
    (loss, aux), (gh, gw) = jax.value_and_grad(f, (0, 1), has_aux=True)(x_nan, d["w"], nan(d["old"]), nan(d["ref"]))
    (loss0, aux0), (gh0, gw0) = jax.value_and_grad(f, (0, 1), has_aux=True)(
        clean, d["w"], jnp.where(bad, 0.0, d["old"]), jnp.where(bad, 0.0, d["ref"])
    )
    assert np.isfinite(loss)
    _close((loss, tuple(aux), gh, gw), (loss0, tuple(aux0), gh0, gw0))
    assert np.all(np.asarray(gh)[np.asarray(bad)] == 0)


def _dot_count(fn, *args):
    """Matrix products in the jaxpr of value_and_grad (each one a matmul pass over the head)."""

    def count(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "dot_general"
            for v in eqn.params.values():
                for j in v if isinstance(v, (tuple, list)) else (v,):
                    inner = getattr(j, "jaxpr", j)  # a ClosedJaxpr's jaxpr, or a Jaxpr
                    if hasattr(inner, "eqns"):
                        n += count(inner)
        return n

    return count(jax.make_jaxpr(jax.value_and_grad(fn, (0, 1)))(*args).jaxpr)


@pytest.mark.parametrize(
    "level,blocks,passes",
    [
        ("token", {}, 3),
        ("sequence", {}, 3),
        ("sequence", dict(token_block=2 * L), 3),
        ("sequence", dict(token_block=L - 1), 4),
        ("token", dict(vocab_block=7), 4),
    ],
)
def test_three_matmul_passes_where_the_token_blocks_hold_whole_completions(level, blocks, passes):
    """The single-pass path (3 products: logits, d_hidden, d_W) for token-level ratios, and for
    sequence-level ones when the token block is a multiple of L; 4 (streamed, the backward
    recomputing the logits) otherwise. Both paths give the same loss and gradients."""
    d = _data(5)

    def f(h, w, **kw):
        return jaxsce.linear_policy_loss(
            h, w, d["y"], d["adv"], where=d["mask"], old_log_probs=d["old"], ref_log_probs=d["ref"], beta=0.04,
            importance_sampling_level=level, **kw,
        )  # fmt: skip

    assert _dot_count(functools.partial(f, **blocks), d["h"], d["w"]) == passes
    got = jax.value_and_grad(functools.partial(f, **blocks), (0, 1))(d["h"], d["w"])
    want = jax.value_and_grad(functools.partial(f, vocab_block=5), (0, 1))(d["h"], d["w"])
    _close(got, want)


def test_a_fused_reference_head_equals_its_given_log_probs():
    """ref_hidden/ref_weight stream the reference's log-probabilities (one more product, no gradient)."""
    d = _data(6)
    rng = np.random.default_rng(7)
    hr, wr, br = jnp.asarray(rng.normal(size=(B, L, 5))), jnp.asarray(rng.normal(size=(5, V))), d["b"] * 0.5
    ref_lp = jaxsce.linear_log_probs(hr, wr, d["y"], linear_bias=br, temperature=0.8)
    kw = dict(where=d["mask"], old_log_probs=d["old"], beta=0.1, temperature=0.8, return_aux=True, loss_type="grpo")

    def fused(h, w, hr, wr):
        return jaxsce.linear_policy_loss(h, w, d["y"], d["adv"], ref_hidden=hr, ref_weight=wr, ref_bias=br, **kw)

    def given(h, w, hr, wr):
        return jaxsce.linear_policy_loss(h, w, d["y"], d["adv"], ref_log_probs=ref_lp, **kw)

    args = (d["h"], d["w"], hr, wr)
    got = jax.value_and_grad(fused, (0, 1, 2, 3), has_aux=True)(*args)
    want = jax.value_and_grad(given, (0, 1), has_aux=True)(*args)
    _close(got[0], want[0])
    _close(got[1][:2], want[1])
    assert not np.any(got[1][2]) and not np.any(got[1][3])  # the reference is a constant
    # The policy's 3 products and the reference's logits; streamed, 4 + 1.
    assert _dot_count(lambda *a: fused(*a)[0], *args) == 4
    kw["vocab_block"] = 7
    assert _dot_count(lambda *a: fused(*a)[0], *args) == 5  # the backward recomputes the policy only
    _close(jax.value_and_grad(fused, (0, 1), has_aux=True)(*args), want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_16_bit_inputs_accumulate_in_float32(dtype):
    d = _data(8)
    h, w = d["h"].astype(dtype), d["w"].astype(dtype)
    kw = dict(where=d["mask"], old_log_probs=d["old"], ref_log_probs=d["ref"], beta=0.04, return_aux=True)
    loss, aux = jaxsce.linear_policy_loss(h, w, d["y"], d["adv"], **kw)
    assert loss.dtype == jnp.float32
    want, want_aux = jaxsce.linear_policy_loss(h.astype(jnp.float64), w.astype(jnp.float64), d["y"], d["adv"], **kw)
    np.testing.assert_allclose(float(loss), float(want), rtol=2e-6, atol=1e-6)
    _close(tuple(aux), tuple(want_aux), rtol=2e-6, atol=1e-6)
    gh, gw = jax.grad(lambda h, w: jaxsce.linear_policy_loss(h, w, d["y"], d["adv"], **kw)[0], (0, 1))(h, w)
    assert gh.dtype == dtype and gw.dtype == dtype


def test_traced_float_options_compile_once():
    d = _data(9)

    def f(eps, eps_high, beta, coef, temp, delta, items):
        return jaxsce.linear_policy_loss(
            d["h"], d["w"], d["y"], d["adv"], where=d["mask"], old_log_probs=d["old"], ref_log_probs=d["ref"],
            epsilon=eps, epsilon_high=eps_high, beta=beta, entropy_coef=coef, temperature=temp, delta=delta,
            num_items_in_batch=items,
        )  # fmt: skip

    jitted = CountingJit(f)
    values = [jitted(*(jnp.asarray(x) for x in vals)) for vals in [(0.2, 0.28, 0.04, 0.01, 1.0, 1.5, 17.0),
                                                                    (0.1, 0.2, 0.1, 0.0, 0.8, 2.0, 20.0)]]  # fmt: skip
    assert jitted.traces == 1
    for vals, got in zip([(0.2, 0.28, 0.04, 0.01, 1.0, 1.5, 17.0), (0.1, 0.2, 0.1, 0.0, 0.8, 2.0, 20.0)], values):
        _close(got, f(*vals))
    sapo = CountingJit(
        lambda tp, tn: jaxsce.policy_loss(
            d["h"] @ d["w"], d["y"], d["adv"], loss_type="sapo", old_log_probs=d["old"], sapo_temperatures=(tp, tn)
        )
    )
    sapo(jnp.asarray(1.0), jnp.asarray(1.05))
    sapo(jnp.asarray(2.0), jnp.asarray(0.5))
    assert sapo.traces == 1


def test_a_traced_option_out_of_range_gives_nan():
    d = _data(10)
    f = jax.jit(
        lambda eps: jaxsce.linear_policy_loss(d["h"], d["w"], d["y"], d["adv"], old_log_probs=d["old"], epsilon=eps)
    )
    assert np.isfinite(f(0.2)) and np.isnan(f(-0.1))
    # A traced num_items_in_batch of 0 or -5 gave a finite loss (a sum over max(n, 1)); a concrete one raises.
    g = jax.jit(lambda n: jaxsce.linear_policy_loss(d["h"], d["w"], d["y"], d["adv"], num_items_in_batch=n))
    assert np.isfinite(g(7.0)) and np.isnan(g(0.0)) and np.isnan(g(-5.0))
    with pytest.raises(ValueError, match="num_items_in_batch"):
        jaxsce.linear_policy_loss(d["h"], d["w"], d["y"], d["adv"], num_items_in_batch=-5)


def test_num_items_in_batch_adds_micro_batches_up_to_the_whole_batch():
    """DAPO over two micro-batches with num_items_in_batch = all their tokens sums to the whole
    batch's loss (TRL's gradient accumulation)."""
    d = _data(11)
    kw = dict(old_log_probs=d["old"], where=d["mask"])
    whole = jaxsce.policy_loss(d["h"] @ d["w"], d["y"], d["adv"], **kw)
    items = int(np.sum(np.asarray(d["mask"])))
    parts = 0.0
    for sl in (slice(0, 2), slice(2, 4)):
        parts += jaxsce.policy_loss(
            (d["h"] @ d["w"])[sl], d["y"][sl], d["adv"][sl], old_log_probs=d["old"][sl], where=d["mask"][sl],
            num_items_in_batch=items,
        )  # fmt: skip
    _close(parts, whole)


@pytest.mark.parametrize("fn", ["logits", "linear"])
def test_zero_completions_and_nothing_counted_give_zero(fn):
    d = _data(12)
    for h, y, a, m in (
        (d["h"][:0], d["y"][:0], d["adv"][:0], d["mask"][:0]),
        (d["h"], d["y"], d["adv"], d["mask"] & False),
    ):
        f = _call(fn, dict(d, y=y, adv=a), dict(where=m, loss_type="grpo"))
        loss, grads = jax.value_and_grad(f, (0, 1, 2))(h, d["w"], d["b"])
        assert float(loss) == 0.0 and all(not np.any(g) for g in grads)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="dr_grpo"), "max_completion_length"),
        (dict(loss_type="cispo"), "epsilon_high"),
        (dict(loss_type="cispo", epsilon_high=4.0, importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(loss_type="sapo", delta=2.0), "delta"),
        (dict(beta=0.04), "ref_log_probs"),
        (dict(loss_type="ppo"), "loss_type"),
        (dict(importance_sampling_level="completion"), "importance_sampling_level"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(sapo_temperatures=1.0), "sapo_temperatures"),
        (dict(old_log_probs=jnp.zeros((B,))), "old_log_probs"),
        (dict(advantages=jnp.zeros((L,))), "advantages"),
        (dict(sampler_weights=jnp.zeros((B, L, 1))), "sampler_weights"),
        (dict(where=jnp.ones((B,), bool)), "where"),
        (dict(logits_3d=False), r"\[B, L\]"),
        (dict(ref_hidden=jnp.zeros((B, L, D))), "ref_weight"),
        (
            dict(ref_hidden=jnp.zeros((B, L, D)), ref_weight=jnp.zeros((D, V)), ref_log_probs=jnp.zeros((B, L))),
            "not both",
        ),
        (dict(ref_hidden=jnp.zeros((B, L, D)), ref_weight=jnp.zeros((D, V + 1))), "ref_weight"),
        (dict(return_aux=1), "return_aux"),
    ],
)
@all_cases_fast
def test_bad_input_raises_naming_the_argument(kwargs, match):
    d = _data()
    kwargs = dict(kwargs)
    adv = kwargs.pop("advantages", d["adv"])
    h, y = d["h"], d["y"]
    if not kwargs.pop("logits_3d", True):
        h, y = h.reshape(B * L, D), y.reshape(B * L)
    with pytest.raises((TypeError, ValueError), match=match):
        jaxsce.linear_policy_loss(h, d["w"], y, adv, **kwargs)


def test_memory_stays_far_below_the_logits():
    """value_and_grad at 8192 x 2304 x 256000 bf16 (32 completions of 256 tokens): compiled temporaries
    <= 256 MiB with given reference log-probs, <= 384 MiB with the reference head fused (the logits
    alone would be 8 GB in float32)."""
    if compat.JAX < (0, 10):
        pytest.skip("the block memory model is fitted to XLA in jax >= 0.10")
    b, n, d, v = 32, 256, 2304, 256000
    s = jax.ShapeDtypeStruct
    hid, w = s((b, n, d), jnp.bfloat16), s((d, v), jnp.bfloat16)
    per_token, y, adv = s((b, n), jnp.float32), s((b, n), jnp.int32), s((b,), jnp.float32)

    def given(h, w, y, a, old, ref):
        return jaxsce.linear_policy_loss(h, w, y, a, old_log_probs=old, ref_log_probs=ref, beta=0.04)

    def fused(h, w, y, a, old, hr, wr):
        return jaxsce.linear_policy_loss(h, w, y, a, old_log_probs=old, ref_hidden=hr, ref_weight=wr, beta=0.04)

    for fn, args, limit in (
        (given, (hid, w, y, adv, per_token, per_token), 256),
        (fused, (hid, w, y, adv, per_token, hid, w), 384),
    ):
        compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(*args).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp <= limit * 2**20, (fn.__name__, temp / 2**20)


# --- sharded ----------------------------------------------------------------------------------


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@fast_cases(lambda p: p["check_vma"] and (p["fn"] == "logits") == (p["loss_type"] == "dapo"))
@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("fn", ["logits", "linear"])
@pytest.mark.parametrize("loss_type,level", [("grpo", "sequence"), ("dapo", "token"), ("luspo", "token")])
def test_vocabulary_and_data_parallel_equal_unsharded(fn, loss_type, level, check_vma):
    """On a 2 x 4 (data, model) mesh: completions split over "data" (batch_axis_name: the
    normalizers are global), the vocabulary over "model" (axis_name)."""
    bsz, vocab = 4, 32
    rng = np.random.default_rng(13)
    h = jnp.asarray(rng.normal(size=(bsz, L, D)))
    w = jnp.asarray(rng.normal(size=(D, vocab)) * 0.5)
    y = jnp.asarray(rng.integers(0, vocab, size=(bsz, L)), jnp.int32)
    adv = jnp.asarray(rng.normal(size=bsz))
    mask = jnp.asarray(rng.uniform(size=(bsz, L)) < 0.8)
    old = jnp.asarray(-np.log(vocab) + rng.normal(size=(bsz, L)) * 0.3)
    ref = jnp.asarray(-np.log(vocab) + rng.normal(size=(bsz, L)) * 0.3)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.05, entropy_coef=0.01, return_aux=True)
    if fn == "logits":

        def call(h, w, y, a, m, old, ref, **names):
            return jaxsce.policy_loss(h @ w, y, a, where=m, old_log_probs=old, ref_log_probs=ref, **kw, **names)
    else:

        def call(h, w, y, a, m, old, ref, **names):
            return jaxsce.linear_policy_loss(
                h, w, y, a, where=m, old_log_probs=old, ref_log_probs=ref, vocab_block=3, **kw, **names
            )

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = jax.shard_map(
        functools.partial(call, axis_name="model", batch_axis_name="data"),
        mesh=mesh,
        in_specs=(P("data"), P(None, "model"), P("data"), P("data"), P("data"), P("data"), P("data")),
        out_specs=P(),
        check_vma=check_vma,
    )
    args = (h, w, y, adv, mask, old, ref)
    got = jax.jit(jax.value_and_grad(sharded, (0, 1), has_aux=True))(*args)
    want = jax.value_and_grad(call, (0, 1), has_aux=True)(*args)
    _close(got, want)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_sharded_policy_loss_communicates_per_token_only():
    """No collective in value_and_grad moves more than a few numbers per token (the largest
    allowed is a quarter of one device's logits block; a logits- or weight-sized one would fail)."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    b, n, vocab, d = 8, 32, 1024, 16
    limit = (b * n // 2) * (vocab // 4) // 4

    def loss(h, w, y, a, old, hr, wr):
        return jaxsce.linear_policy_loss(
            h, w, y, a, old_log_probs=old, ref_hidden=hr, ref_weight=wr, beta=0.04, loss_type="grpo",
            importance_sampling_level="sequence", axis_name="model", batch_axis_name="data",
        )  # fmt: skip

    f = jax.shard_map(
        loss,
        mesh=mesh,
        in_specs=(P("data"), P(None, "model"), P("data"), P("data"), P("data"), P("data"), P(None, "model")),
        out_specs=P(),
    )
    s = jax.ShapeDtypeStruct
    args = (
        s((b, n, d), jnp.float32), s((d, vocab), jnp.float32), s((b, n), jnp.int32), s((b,), jnp.float32),
        s((b, n), jnp.float32), s((b, n, d), jnp.float32), s((d, vocab), jnp.float32),
    )  # fmt: skip
    hlo = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*args).compile().as_text()
    sizes = collective_sizes(hlo)
    assert sizes and max(sizes) <= limit, (sizes, limit)
