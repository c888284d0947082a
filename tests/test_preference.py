"""preference_loss and linear_preference_loss: the DPO family, IPO, SimPO, CPO and ORPO.

Against the naive float64 formula over full logits (values, and ``jax.grad`` of it for gradients),
against Liger-Kernel 0.8.5's chunked preference losses where installed, fused against logit level,
single pass against streamed, sharded against unsharded, and the compile-only memory target.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from marks import fast_cases
from reference import naive_preference_loss

import jaxsce
from jaxsce._losses._preference import DPO_TYPES, LOSS_TYPES

PAIRS, L, D, V = 3, 5, 6, 37
SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3, "simpo": 0.1, "cpo": 0.1, "sigmoid": 0.1}


def _data(seed=0):
    rng = np.random.default_rng(seed)
    mc = rng.random((PAIRS, L)) > 0.25
    mr = rng.random((PAIRS, L)) > 0.25
    mc[:, 0] = mr[:, 0] = True  # every sequence has a counted token
    return dict(
        hc=jnp.asarray(rng.normal(size=(PAIRS, L, D))),
        hr=jnp.asarray(rng.normal(size=(PAIRS, L, D))),
        w=jnp.asarray(rng.normal(size=(D, V)) * 0.5),
        b=jnp.asarray(rng.normal(size=(V,)) * 0.1),
        yc=jnp.asarray(rng.integers(0, V, size=(PAIRS, L)), jnp.int32),
        yr=jnp.asarray(rng.integers(0, V, size=(PAIRS, L)), jnp.int32),
        mc=jnp.asarray(mc),
        mr=jnp.asarray(mr),
        ref_c=jnp.asarray(-rng.random(PAIRS) * 10 - 5),
        ref_r=jnp.asarray(-rng.random(PAIRS) * 10 - 5),
        # heads of a reference model
        rhc=jnp.asarray(rng.normal(size=(PAIRS, L, D))),
        rhr=jnp.asarray(rng.normal(size=(PAIRS, L, D))),
        rw=jnp.asarray(rng.normal(size=(D, V)) * 0.5),
    )


def _opts(loss_type, **extra):
    o = dict(loss_type=loss_type, beta=0.3 if loss_type != "sppo_hard" else 2.0)
    if loss_type in SMOOTHING:
        o["label_smoothing"] = SMOOTHING[loss_type]
    return {**o, **extra}


def _b(b):
    return b if np.ndim(b) == 0 else b[None, None]


def _naive(d, h_c, h_r, w, b, loss_type, with_ref, **extra):
    o = _opts(loss_type, **extra)
    refs = dict(ref_chosen=d["ref_c"], ref_rejected=d["ref_r"]) if with_ref else {}
    return naive_preference_loss(h_c @ w + _b(b), h_r @ w + _b(b), d["yc"], d["yr"], d["mc"], d["mr"], **refs, **o)


def _ours(d, fn, loss_type, with_ref, **extra):
    o = _opts(loss_type, **extra)
    refs = dict(ref_chosen_log_probs=d["ref_c"], ref_rejected_log_probs=d["ref_r"]) if with_ref else {}
    masks = dict(chosen_where=d["mc"], rejected_where=d["mr"])

    def loss(h_c, h_r, w, b):
        if fn == "logits":
            return jaxsce.preference_loss(h_c @ w + _b(b), h_r @ w + _b(b), d["yc"], d["yr"], **masks, **refs, **o)
        return jaxsce.linear_preference_loss(h_c, h_r, w, d["yc"], d["yr"], linear_bias=b, **masks, **refs, **o)

    return loss


CASES = [(t, t not in ("simpo", "cpo", "orpo")) for t in LOSS_TYPES]


@fast_cases(lambda p: p["fn"] == "linear" or p["case"][0] in ("sigmoid", "ipo", "orpo"))
@pytest.mark.parametrize("fn", ["logits", "linear"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_value_and_gradients_equal_the_naive_formula(case, fn):
    loss_type, with_ref = case
    d = _data()
    args = (d["hc"], d["hr"], d["w"], d["b"])
    extra = dict(nll_weight=0.5) if loss_type in ("sigmoid", "orpo", "simpo") else {}
    got, got_g = jax.value_and_grad(_ours(d, fn, loss_type, with_ref, **extra), argnums=(0, 1, 2, 3))(*args)
    want, want_g = jax.value_and_grad(lambda *a: _naive(d, *a, loss_type, with_ref, **extra)[0], argnums=(0, 1, 2, 3))(
        *args
    )
    np.testing.assert_allclose(got, want, rtol=1e-11)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "orpo"])
def test_aux_rewards_and_paths(loss_type):
    """PreferenceAux against the formula; the single pass, the streamed path and a reference head agree."""
    d = _data(1)
    with_ref = loss_type in ("sigmoid", "ipo")
    o = _opts(loss_type)
    masks = dict(chosen_where=d["mc"], rejected_where=d["mr"])
    refs = dict(ref_chosen_log_probs=d["ref_c"], ref_rejected_log_probs=d["ref_r"]) if with_ref else {}
    args = (d["hc"], d["hr"], d["w"], d["yc"], d["yr"])
    loss, aux = jaxsce.linear_preference_loss(*args, **masks, **refs, **o, return_aux=True)
    want, cr, rr = _naive(d, d["hc"], d["hr"], d["w"], 0.0, loss_type, with_ref)
    np.testing.assert_allclose(loss, want, rtol=1e-11)
    np.testing.assert_allclose(aux.chosen_rewards, cr, rtol=1e-11)
    np.testing.assert_allclose(aux.rejected_rewards, rr, rtol=1e-11)
    np.testing.assert_allclose(aux.reward_margin, jnp.mean(cr - rr), rtol=1e-11)
    np.testing.assert_allclose(aux.reward_accuracy, jnp.mean(cr > rr), rtol=1e-11)
    single = jax.value_and_grad(lambda w: jaxsce.linear_preference_loss(*args[:2], w, *args[3:], **masks, **refs, **o))
    stream = jax.value_and_grad(
        lambda w: jaxsce.linear_preference_loss(*args[:2], w, *args[3:], **masks, **refs, **o, vocab_block=8)
    )
    (v1, g1), (v2, g2) = single(d["w"]), stream(d["w"])
    np.testing.assert_allclose(v1, v2, rtol=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-14)
    if with_ref:
        # The reference as a head read in the same stream equals its sums given.
        lp = lambda h, y, m: jnp.sum(jnp.where(m, jaxsce.linear_log_probs(h, d["rw"], y), 0), -1)  # noqa: E731
        given = dict(
            ref_chosen_log_probs=lp(d["rhc"], d["yc"], d["mc"]), ref_rejected_log_probs=lp(d["rhr"], d["yr"], d["mr"])
        )
        head = dict(ref_weight=d["rw"], ref_chosen_hidden=d["rhc"], ref_rejected_hidden=d["rhr"])
        a = jaxsce.linear_preference_loss(*args, **masks, **o, **given)
        for extra in ({}, dict(vocab_block=8)):
            np.testing.assert_allclose(
                jaxsce.linear_preference_loss(*args, **masks, **o, **head, **extra), a, rtol=1e-12
            )


def _pass_count(f, *args):
    jaxpr = jax.make_jaxpr(jax.value_and_grad(f))(*args)
    return str(jaxpr).count("dot_general")


def test_single_pass_has_three_matmul_passes():
    d = _data(2)
    args = (d["hc"], d["hr"])
    f = lambda w: jaxsce.linear_preference_loss(*args, w, d["yc"], d["yr"])  # noqa: E731
    g = lambda w: jaxsce.linear_preference_loss(*args, w, d["yc"], d["yr"], vocab_block=16)  # noqa: E731
    assert _pass_count(f, d["w"]) == 3
    assert _pass_count(g, d["w"]) == 4


@pytest.mark.parametrize("fn", ["logits", "linear"])
def test_masked_tokens_are_exactly_zero_even_with_nan_data(fn):
    """NaN logits (or hidden states) at masked tokens: the loss of the clean data, finite gradients, 0 there."""
    d = _data(3)
    mc, mr = d["mc"][..., None], d["mr"][..., None]
    o = dict(chosen_where=d["mc"], rejected_where=d["mr"], nll_weight=0.2, beta=0.3)
    o.update(ref_chosen_log_probs=d["ref_c"], ref_rejected_log_probs=d["ref_r"])
    if fn == "logits":
        xc, xr = d["hc"] @ d["w"], d["hr"] @ d["w"]
        f = lambda zc, zr: jaxsce.preference_loss(zc, zr, d["yc"], d["yr"], **o)  # noqa: E731
    else:
        xc, xr = d["hc"], d["hr"]
        f = lambda hc, hr: jaxsce.linear_preference_loss(hc, hr, d["w"], d["yc"], d["yr"], **o)  # noqa: E731
    v, g = jax.value_and_grad(f, argnums=(0, 1))(jnp.where(mc, xc, jnp.nan), jnp.where(mr, xr, jnp.nan))
    np.testing.assert_allclose(v, f(xc, xr), rtol=1e-12)
    for grad, m in zip(g, (mc, mr)):
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad))
        assert np.all(grad[~np.asarray(m[..., 0])] == 0)


def test_ignore_index_equals_where():
    d = _data(4)
    yc = jnp.where(d["mc"], d["yc"], -100)
    yr = jnp.where(d["mr"], d["yr"], -100)
    a = jaxsce.linear_preference_loss(d["hc"], d["hr"], d["w"], yc, yr, ignore_index=-100)
    b = jaxsce.linear_preference_loss(
        d["hc"], d["hr"], d["w"], d["yc"], d["yr"], chosen_where=d["mc"], rejected_where=d["mr"]
    )
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_errors_name_the_problem():
    d = _data(5)
    args = (d["hc"], d["hr"], d["w"], d["yc"], d["yr"])
    with pytest.raises(ValueError, match="reference-free"):
        jaxsce.linear_preference_loss(
            *args, loss_type="simpo", ref_chosen_log_probs=d["ref_c"], ref_rejected_log_probs=d["ref_r"]
        )
    with pytest.raises(ValueError, match="exo_pair' needs 0 < label_smoothing"):
        jaxsce.linear_preference_loss(*args, loss_type="exo_pair")
    with pytest.raises(ValueError, match="does not use label_smoothing"):
        jaxsce.linear_preference_loss(*args, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"ref_chosen_log_probs has shape \(2,\)"):
        jaxsce.linear_preference_loss(*args, ref_chosen_log_probs=d["ref_c"][:2], ref_rejected_log_probs=d["ref_r"])
    with pytest.raises(ValueError, match="rejected_hidden has shape"):
        jaxsce.linear_preference_loss(d["hc"], d["hr"][:2], d["w"], d["yc"], d["yr"])
    with pytest.raises(TypeError, match="Did you mean 'nll_weight'"):
        jaxsce.preference_loss(d["hc"] @ d["w"], d["hr"] @ d["w"], d["yc"], d["yr"], nll_weigth=1.0)


def test_traced_options_compile_once_and_out_of_range_is_nan():
    d = _data(6)
    args = (d["hc"], d["hr"], d["w"], d["yc"], d["yr"])
    traces = []

    @jax.jit
    def f(beta, eps):
        traces.append(1)
        return jaxsce.linear_preference_loss(*args, loss_type="robust", beta=beta, label_smoothing=eps)

    f(0.1, 0.1)
    f(0.2, 0.05)
    assert len(traces) == 1
    assert np.isnan(f(0.1, 0.6))


def test_bf16_hidden_states_accumulate_in_float32():
    d = _data(7)
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    got = jaxsce.linear_preference_loss(bf(d["hc"]), bf(d["hr"]), bf(d["w"]), d["yc"], d["yr"], loss_type="ipo")
    want = jaxsce.linear_preference_loss(
        bf(d["hc"]).astype(jnp.float32), bf(d["hr"]).astype(jnp.float32), bf(d["w"]).astype(jnp.float32),
        d["yc"], d["yr"], loss_type="ipo",
    )  # fmt: skip
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --- sharded --------------------------------------------------------------------------------


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("check_vma", [True, False])
def test_vocabulary_and_data_parallel_equal_unsharded(check_vma):
    rng = np.random.default_rng(8)
    pairs, v = 4, 64
    d = dict(
        hc=jnp.asarray(rng.normal(size=(pairs, L, D))),
        hr=jnp.asarray(rng.normal(size=(pairs, L, D))),
        w=jnp.asarray(rng.normal(size=(D, v)) * 0.5),
        yc=jnp.asarray(rng.integers(0, v, size=(pairs, L)), jnp.int32),
        yr=jnp.asarray(rng.integers(0, v, size=(pairs, L)), jnp.int32),
        rc=jnp.asarray(-rng.random(pairs) * 10),
        rr=jnp.asarray(-rng.random(pairs) * 10),
    )
    o = dict(loss_type="sigmoid", nll_weight=0.3)

    def local(hc, hr, w, yc, yr, rc, rr):
        return jaxsce.linear_preference_loss(
            hc, hr, w, yc, yr, ref_chosen_log_probs=rc, ref_rejected_log_probs=rr, axis_name="model",
            batch_axis_name="data", **o,
        )  # fmt: skip

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = (P("data"), P("data"), P(None, "model"), P("data"), P("data"), P("data"), P("data"))
    f = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma)
    args = (d["hc"], d["hr"], d["w"], d["yc"], d["yr"], d["rc"], d["rr"])
    got, got_g = jax.jit(jax.value_and_grad(f, argnums=(0, 2)))(*args)
    plain = lambda hc, hr, w, yc, yr, rc, rr: jaxsce.linear_preference_loss(  # noqa: E731
        hc, hr, w, yc, yr, ref_chosen_log_probs=rc, ref_rejected_log_probs=rr, **o
    )
    want, want_g = jax.value_and_grad(plain, argnums=(0, 2))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-11)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-13)


# --- Liger-Kernel as the oracle ---------------------------------------------------------------


def _liger():
    try:
        import torch
        from liger_kernel import chunked_loss
    except ImportError:
        return None
    return torch, chunked_loss


@fast_cases(lambda p: p["loss_type"] in ("sigmoid", "orpo", "simpo", "cpo", "robust"))
@pytest.mark.parametrize("loss_type", list(DPO_TYPES) + ["simpo", "cpo", "orpo"])
def test_equals_liger_kernel(loss_type):
    """Liger-Kernel 0.8.5's fused preference losses (chunked, pure torch) on the same float64 inputs:
    the loss, d_hidden, d_weight, d_bias and the rewards. Liger's log-probabilities are float32."""
    peer = _liger()
    if peer is None:
        pytest.skip("liger-kernel (and torch) not installed: pip install -e '.[liger]'")
    torch, cl = peer
    d = _data(9)
    beta = 2.0 if loss_type == "sppo_hard" else 0.3
    eps = {"robust": 0.1, "exo_pair": 1e-3, "simpo": 0.1, "cpo": 0.1}.get(loss_type, 0.0)
    nll = loss_type in ("sigmoid", "simpo", "cpo", "orpo")
    if loss_type in DPO_TYPES:
        module = cl.LigerFusedLinearDPOLoss(
            beta=beta, loss_type=loss_type, label_smoothing=eps, compute_nll_loss=nll, alpha=0.5, compiled=False
        )
    elif loss_type == "simpo":
        module = cl.LigerFusedLinearSimPOLoss(beta=beta, gamma=0.5, label_smoothing=eps, alpha=0.5, compiled=False)
    elif loss_type == "cpo":
        module = cl.LigerFusedLinearCPOLoss(beta=beta, label_smoothing=eps, alpha=0.5, compiled=False)
    else:
        module = cl.LigerFusedLinearORPOLoss(beta=beta, compiled=False)
    t = lambda x: torch.tensor(np.asarray(x))  # noqa: E731
    x = t(jnp.concatenate([d["hc"], d["hr"]])).requires_grad_(True)
    wt, bt = t(d["w"].T).requires_grad_(True), t(d["b"]).requires_grad_(True)
    target = t(jnp.concatenate([jnp.where(d["mc"], d["yc"], -100), jnp.where(d["mr"], d["yr"], -100)])).long()
    if loss_type in DPO_TYPES:
        ref_x = t(jnp.concatenate([d["rhc"], d["rhr"]]))
        loss_t, aux_t = module(wt, x, target, bt, ref_x, t(d["rw"].T), None)
    else:
        loss_t, aux_t = module(wt, x, target, bt)
    loss_t.backward()

    def ours(hc, hr, w, b):
        head = dict(ref_weight=d["rw"].T, ref_chosen_hidden=d["rhc"], ref_rejected_hidden=d["rhr"])
        return jaxsce.linear_preference_loss(
            hc, hr, w, d["yc"], d["yr"], linear_bias=b, weight_layout="vd", chosen_where=d["mc"],
            rejected_where=d["mr"], loss_type=loss_type, beta=beta, label_smoothing=eps, gamma=0.5,
            nll_weight=(1.0 if loss_type == "orpo" else 0.5) if nll else 0.0, return_aux=True,
            **(head if loss_type in DPO_TYPES else {}),
        )  # fmt: skip

    (loss, aux), grads = jax.value_and_grad(ours, (0, 1, 2, 3), has_aux=True)(d["hc"], d["hr"], d["w"].T, d["b"])
    scale = max(1.0, abs(loss_t.item()))
    np.testing.assert_allclose(float(loss), loss_t.item(), rtol=2e-6, atol=2e-6 * scale)
    g_x = x.grad.numpy()
    mine = (np.concatenate([grads[0], grads[1]]), grads[2], grads[3])
    for g, g_t in zip(mine, (g_x, wt.grad.numpy(), bt.grad.numpy())):
        np.testing.assert_allclose(np.asarray(g), g_t, rtol=2e-5, atol=2e-6 * scale)
    np.testing.assert_allclose(aux.chosen_rewards, aux_t[5].detach().numpy(), rtol=2e-6, atol=2e-6 * scale)
    np.testing.assert_allclose(aux.rejected_rewards, aux_t[6].detach().numpy(), rtol=2e-6, atol=2e-6 * scale)


# --- memory: compile-only -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("reference", [False, True])
def test_memory_at_8192_tokens_2304_256000_bf16(reference):
    """16 pairs x 2 x 256 tokens, d 2304, V 256000, bf16: temporaries of value_and_grad <= 256 MiB
    (<= 384 MiB with a reference head)."""
    pairs, length, d, v = 16, 256, 2304, 256000
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    y = jax.ShapeDtypeStruct((pairs, length), jnp.int32)
    extra = dict(
        ref_weight=sds(d, v), ref_chosen_hidden=sds(pairs, length, d), ref_rejected_hidden=sds(pairs, length, d)
    )

    def f(hc, hr, w, yc, yr, *ref):
        head = dict(zip(("ref_weight", "ref_chosen_hidden", "ref_rejected_hidden"), ref))
        return jaxsce.linear_preference_loss(hc, hr, w, yc, yr, **head)

    args = (sds(pairs, length, d), sds(pairs, length, d), sds(d, v), y, y) + (
        tuple(extra.values()) if reference else ()
    )
    temp = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp <= (384 if reference else 256) * 2**20, temp / 2**20
