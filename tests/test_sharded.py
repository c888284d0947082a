"""Vocabulary- and data-parallel losses on 8 virtual CPU devices equal the unsharded ones."""

import functools

import compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo import collective_sizes
from jax.sharding import PartitionSpec as P
from marks import all_cases_fast, fast_cases

import jaxsce

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")

# (data, model); the 2-D mesh runs in the fast set, the 1-D ones in the slow set.
MESHES = [pytest.param((8, 1), marks=pytest.mark.slow), pytest.param((1, 8), marks=pytest.mark.slow), (2, 4)]
N, V, D = 32, 48, 8


def _mesh(shape, explicit=False):
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh(shape, ("data", "model"), axis_types=(kind, kind))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(N, V)) * 2)
    labels = rng.integers(0, V, size=N)
    labels[[2, 9]] = -100
    probs = rng.random((N, V)) ** 2
    return dict(
        logits=logits,
        labels=jnp.asarray(labels, jnp.int32),
        probs=jnp.asarray(probs / probs.sum(-1, keepdims=True)),
        weight=jnp.asarray(np.linspace(0.3, 1.7, V)),
        where=jnp.asarray(np.arange(N) % 7 != 3),
        hidden=jnp.asarray(rng.normal(size=(N, D))),
        proj=jnp.asarray(rng.normal(size=(D, V)) * 0.4),
        bias=jnp.asarray(rng.normal(size=(V,)) * 0.1),
    )


OPTIONS = {
    "plain": dict(ignore_index=-100),
    "smoothing+weight": dict(ignore_index=-100, label_smoothing=0.2, weighted=True),
    "zloss+softcap+where": dict(ignore_index=-100, z_loss=1e-2, logit_softcap=2.5, masked=True),
    "all": dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, logit_softcap=4.0, weighted=True, masked=True),
}


def _split(opts, d):
    opts = dict(opts)
    extra = {}
    if opts.pop("weighted", False):
        extra["weight"] = d["weight"]
    if opts.pop("masked", False):
        extra["where"] = d["where"]
    return opts, extra


def _unsharded(kw):
    return {k: v for k, v in kw.items() if k != "check_vma"}


def _close(a, b, rtol=1e-10, atol=1e-12):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if x.dtype == jax.dtypes.float0:  # the tangent of an integer output (LossAux.predictions)
            assert y.dtype == x.dtype and x.shape == y.shape
            continue
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# Forward mode goes through the same sharded kernel; run it on the full option set only.
# "all" (every option at once) runs in the fast set; each option group alone in the slow set.
CASES = [
    pytest.param(name, "vjp", marks=() if name == "all" else pytest.mark.slow, id=f"{name}-vjp") for name in OPTIONS
] + [pytest.param("all", "jvp", id="all-jvp")]


@fast_cases(  # two corners of (check_vma, reduction, derivative)
    lambda p: (p["check_vma"], p["reduction"], p["derivative"]) in ((True, "mean", "vjp"), (False, "none", "jvp"))
)
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name,derivative", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
def test_cross_entropy_equals_unsharded(mesh_shape, name, reduction, derivative, check_vma):
    d = _data()
    mesh = _mesh(mesh_shape)
    opts, extra = _split(OPTIONS[name], d)
    kw = dict(reduction=reduction, derivative=derivative, return_aux=True, check_vma=check_vma, **opts)

    def sharded(x):
        return jaxsce.sharded_cross_entropy(
            x, d["labels"], mesh=mesh, vocab_axis="model", batch_axes="data", **extra, **kw
        )

    def plain(x):
        return jaxsce.cross_entropy(x, d["labels"], **extra, **_unsharded(kw))

    _close(jax.jit(sharded)(d["logits"]), plain(d["logits"]))
    cot = jnp.asarray(np.random.default_rng(1).normal(size=() if reduction == "mean" else (N,)))
    g = jax.grad(lambda x: jnp.sum(cot * sharded(x)[0]) + jnp.sum(sharded(x)[1].lse))(d["logits"])
    g_ref = jax.grad(lambda x: jnp.sum(cot * plain(x)[0]) + jnp.sum(plain(x)[1].lse))(d["logits"])
    _close(g, g_ref)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
def test_probability_targets_equal_unsharded(mesh_shape, check_vma):
    d = _data(1)
    mesh = _mesh(mesh_shape)
    kw = dict(label_smoothing=0.1, weight=d["weight"], return_aux=True)
    f = lambda x, t: jaxsce.sharded_cross_entropy(
        x, t, mesh=mesh, vocab_axis="model", batch_axes="data", check_vma=check_vma, **kw
    )
    f0 = lambda x, t: jaxsce.cross_entropy(x, t, **kw)
    _close(jax.jit(f)(d["logits"], d["probs"]), f0(d["logits"], d["probs"]))
    _close(
        jax.grad(lambda x, t: f(x, t)[0], (0, 1))(d["logits"], d["probs"]),
        jax.grad(lambda x, t: f0(x, t)[0], (0, 1))(d["logits"], d["probs"]),
    )


@fast_cases(  # two corners of (check_vma, reduction, derivative)
    lambda p: (p["check_vma"], p["reduction"], p["derivative"]) in ((True, "mean", "vjp"), (False, "none", "jvp"))
)
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    "name,derivative", [pytest.param("plain", "vjp", marks=pytest.mark.slow), ("all", "vjp"), ("all", "jvp")]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
def test_linear_cross_entropy_equals_unsharded(mesh_shape, name, reduction, derivative, check_vma):
    if derivative == "jvp" and not compat.reverse_through_jvp:
        pytest.skip("reverse mode through derivative='jvp' needs jax >= 0.10")
    d = _data(2)
    mesh = _mesh(mesh_shape)
    opts, extra = _split(OPTIONS[name], d)
    kw = dict(reduction=reduction, return_aux=True, vocab_block=4, token_block=3, derivative=derivative, **opts)
    kw["check_vma"] = check_vma

    def sharded(h, w, b):
        return jaxsce.sharded_linear_cross_entropy(
            h, w, d["labels"], linear_bias=b, mesh=mesh, vocab_axis="model", batch_axes="data", **extra, **kw
        )

    def plain(h, w, b):
        return jaxsce.linear_cross_entropy(h, w, d["labels"], linear_bias=b, **extra, **_unsharded(kw))

    args = (d["hidden"], d["proj"], d["bias"])
    _close(jax.jit(sharded)(*args), plain(*args))
    cot = jnp.asarray(np.random.default_rng(3).normal(size=() if reduction == "mean" else (N,)))
    g = jax.grad(lambda *a: jnp.sum(cot * sharded(*a)[0]), (0, 1, 2))(*args)
    g_ref = jax.grad(lambda *a: jnp.sum(cot * plain(*a)[0]), (0, 1, 2))(*args)
    _close(g, g_ref)
    if derivative == "jvp":
        # The tangent's per-token sums are combined across vocabulary shards
        # like the loss's (rescaled by the global max, then summed).
        rng = np.random.default_rng(5)
        tans = tuple(jnp.asarray(rng.normal(size=x.shape)) for x in args)
        _close(jax.jit(lambda *a: jax.jvp(sharded, a, tans))(*args), jax.jvp(plain, args, tans))


@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
def test_explicit_mesh_and_tied_layout(check_vma):
    d = _data(4)
    mesh = _mesh((2, 4), explicit=True)
    if compat.JAX < (0, 7):
        with pytest.raises(NotImplementedError, match="Explicit axes need jax >= 0.7"):
            jaxsce.sharded_linear_cross_entropy(d["hidden"], d["proj"], d["labels"], mesh=mesh, vocab_axis="model")
        return
    with compat.set_mesh(mesh):
        f = lambda h, e: jaxsce.sharded_linear_cross_entropy(
            h,
            e,
            d["labels"],
            mesh=mesh,
            vocab_axis="model",
            batch_axes="data",
            weight_layout="vd",
            ignore_index=-100,
            check_vma=check_vma,
        )
        f0 = lambda h, e: jaxsce.linear_cross_entropy(h, e, d["labels"], weight_layout="vd", ignore_index=-100)
        emb = d["proj"].T
        _close(jax.jit(f)(d["hidden"], emb), f0(d["hidden"], emb))
        _close(jax.grad(f, (0, 1))(d["hidden"], emb), jax.grad(f0, (0, 1))(d["hidden"], emb))


@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
def test_hand_written_shard_map_with_axis_names(check_vma):
    d = _data(5)
    mesh = _mesh((2, 4))

    def local(x, y, w):
        return jaxsce.cross_entropy(
            x, y, weight=w, ignore_index=-100, label_smoothing=0.1, axis_name="model", batch_axis_name="data"
        )

    f = jax.shard_map(
        local, mesh=mesh, in_specs=(P("data", "model"), P("data"), P("model")), out_specs=P(), check_vma=check_vma
    )
    f0 = lambda x, y, w: jaxsce.cross_entropy(x, y, weight=w, ignore_index=-100, label_smoothing=0.1)
    args = (d["logits"], d["labels"], d["weight"])
    _close(jax.jit(f)(*args), f0(*args))
    _close(jax.jit(jax.grad(f))(*args), jax.grad(f0)(*args))


@fast_cases(lambda p: (p["reduction"], p["derivative"]) in {("mean", "vjp"), ("none", "jvp")})
@pytest.mark.parametrize("derivative", ["vjp", "jvp"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_unchecked_shard_map_gradients_are_not_divided_by_the_shard_count(reduction, derivative):
    if derivative == "jvp" and not compat.reverse_through_jvp:
        pytest.skip("reverse mode through derivative='jvp' needs jax >= 0.10")
    """Under shard_map(check_vma=False) JAX divides a replicated output's
    cotangent by the device count and expects the transpose of each psum to
    sum it back; the custom rules' hidden psums must do the same (they gave
    1/M of the gradients). hidden is computed inside the shard_map from a
    replicated layer, so d_hidden also passes through JAX's own transposition."""
    d = _data(7)
    mesh = _mesh((2, 4))
    kw = dict(reduction=reduction, derivative=derivative, label_smoothing=0.1, z_loss=1e-3)

    def loss(x, a, w, b, y, cw, **names):
        h = jnp.tanh(x @ a)
        return jaxsce.linear_cross_entropy(h, w, y, linear_bias=b, weight=cw, vocab_block=4, **kw, **names)

    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(N, 6)))
    a = jnp.asarray(rng.normal(size=(6, D)) * 0.5)
    cot = jnp.asarray(rng.normal(size=() if reduction != "none" else (N,)))
    args = (x, a, d["proj"], d["bias"], d["labels"], d["weight"])
    f = jax.shard_map(
        functools.partial(loss, axis_name="model", batch_axis_name="data"),
        mesh=mesh,
        in_specs=(P("data"), P(), P(None, "model"), P("model"), P("data"), P("model")),
        out_specs=P("data") if reduction == "none" else P(),
        check_vma=False,
    )
    _close(jax.jit(f)(*args), loss(*args))
    g = jax.jit(jax.grad(lambda *t: jnp.sum(cot * f(*t)), (0, 1, 2, 3)))(*args)
    g_ref = jax.grad(lambda *t: jnp.sum(cot * loss(*t)), (0, 1, 2, 3))(*args)
    _close(g, g_ref)


def test_label_smoothing_uses_global_vocab_size_megatron_737():
    """Megatron-LM issue 737: smoothing divided by the local vocabulary size is wrong with >1 shard."""
    d = _data(6)
    mesh = _mesh((1, 8))
    f = lambda x: jaxsce.sharded_cross_entropy(x, d["labels"] % V, mesh=mesh, vocab_axis="model", label_smoothing=0.3)
    expected = jaxsce.cross_entropy(d["logits"], d["labels"] % V, label_smoothing=0.3)
    _close(f(d["logits"]), expected)
    # What dividing by the local vocabulary size (V / 8) would give instead:
    logp = np.asarray(jax.nn.log_softmax(d["logits"]))
    y = np.asarray(d["labels"]) % V
    bug = np.mean(-0.7 * logp[np.arange(N), y] - 0.3 / (V // 8) * logp.sum(-1))
    assert abs(float(f(d["logits"])) - bug) > 1e-2


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
def test_no_collective_moves_tokens_times_local_vocab(mesh_shape, check_vma):
    mesh = _mesh(mesh_shape)
    tokens, vocab, d = 256, 1024, 8
    local_tokens, local_vocab = tokens // mesh_shape[0], vocab // mesh_shape[1]
    limit = local_tokens * local_vocab
    x = jax.ShapeDtypeStruct((tokens, vocab), jnp.float32)
    y = jax.ShapeDtypeStruct((tokens,), jnp.int32)
    w = jax.ShapeDtypeStruct((vocab,), jnp.float32)
    f = jax.jit(
        jax.value_and_grad(
            lambda x, y, w: jaxsce.sharded_cross_entropy(
                x,
                y,
                mesh=mesh,
                vocab_axis="model",
                batch_axes="data",
                weight=w,
                label_smoothing=0.1,
                z_loss=1e-4,
                check_vma=check_vma,
            )
        )
    )
    sizes = collective_sizes(f.lower(x, y, w).compile().as_text())
    if mesh_shape != (1, 1):
        assert sizes, "expected collectives in a sharded program"
    assert max(sizes) < limit, (sizes, limit)
    h = jax.ShapeDtypeStruct((tokens, d), jnp.float32)
    wp = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
    g = jax.jit(
        jax.value_and_grad(
            lambda h, wp, y: jaxsce.sharded_linear_cross_entropy(
                h, wp, y, mesh=mesh, vocab_axis="model", batch_axes="data", label_smoothing=0.1, check_vma=check_vma
            ),
            argnums=(0, 1),
        )
    )
    sizes = collective_sizes(g.lower(h, wp, y).compile().as_text())
    assert max(sizes) < limit, (sizes, limit)


def test_collective_parser_sees_a_logits_sized_all_gather():
    """The check above can fail: an all-gather of the logits is detected."""
    mesh = _mesh((1, 8))
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    f = jax.jit(
        jax.shard_map(
            lambda x: jax.lax.all_gather(x, "model", axis=1, tiled=True),
            mesh=mesh,
            in_specs=P(None, "model"),
            out_specs=P(),
            check_vma=False,
        )
    )
    sizes = collective_sizes(f.lower(x).compile().as_text())
    assert max(sizes) >= 64 * 256 // 8


@pytest.mark.parametrize("fn", ["ce", "linear"])
@all_cases_fast
def test_forgetting_axis_name_inside_shard_map_says_so(fn):
    """A class axis split over "model" without axis_name gave an internal
    "cond branches must have equal output types" error."""
    d = _data(9)
    mesh = _mesh((2, 4))
    if fn == "ce":
        local = lambda x, y: jaxsce.cross_entropy(x, y, batch_axis_name="data")
        specs, args = (P("data", "model"), P("data")), (d["logits"], d["labels"])
    else:
        local = lambda h, w, y: jaxsce.linear_cross_entropy(h, w, y, batch_axis_name="data")
        specs, args = (P("data"), P(None, "model"), P("data")), (d["hidden"], d["proj"], d["labels"])
    f = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
    with pytest.raises(ValueError, match="axis_name='model'"):
        jax.jit(f)(*args)


@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
def test_data_parallel_shard_map_without_axis_name(check_vma):
    """Examples split over "data", classes whole: no axis_name is needed, and
    the label-shift fast path's cond must type-check inside shard_map."""
    d = _data(10)
    mesh = _mesh((8, 1))
    kw = dict(ignore_index=-100, label_smoothing=0.1)
    f = jax.shard_map(
        lambda x, y: jaxsce.cross_entropy(x, y, batch_axis_name="data", **kw),
        mesh=mesh,
        in_specs=(P("data"), P("data")),
        out_specs=P(),
        check_vma=check_vma,
    )
    f0 = lambda x, y: jaxsce.cross_entropy(x, y, **kw)
    y = d["labels"] % V
    _close(jax.jit(f)(d["logits"], y), f0(d["logits"], y))
    _close(jax.jit(jax.grad(f))(d["logits"], y), jax.grad(f0)(d["logits"], y))


# --- log_probs, linear_log_probs, sample_weight ----------------------------------------


@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("fn", ["logits", "linear"])
@pytest.mark.parametrize("entropy", [True, False], ids=["logp+entropy", "logp"])
def test_log_probs_equal_unsharded(fn, check_vma, entropy):
    """With one output (no entropy) under check_vma=False, the row cotangents'
    psum returned an array, not a tuple, and the gradient was wrong."""
    d = _data(3)
    mesh = _mesh((2, 4))
    y = jnp.where(d["labels"] < 0, 0, d["labels"])
    kw = dict(temperature=0.8, logit_softcap=4.0, return_entropy=entropy)
    rng = np.random.default_rng(4)
    g, g_h = jnp.asarray(rng.normal(size=N)), jnp.asarray(rng.normal(size=N))
    if fn == "logits":
        args = (d["logits"], y, d["where"])
        specs = (P("data", "model"), P("data"), P("data"))
        call = lambda x, y, m, **names: jaxsce.log_probs(x, y, where=m, **kw, **names)  # noqa: E731
    else:
        args = (d["hidden"], d["proj"], d["bias"], y, d["where"])
        specs = (P("data"), P(None, "model"), P("model"), P("data"), P("data"))
        call = lambda h, w, b, y, m, **names: jaxsce.linear_log_probs(  # noqa: E731
            h, w, y, linear_bias=b, where=m, vocab_block=4, token_block=3, **kw, **names
        )
    sharded = jax.shard_map(
        functools.partial(call, axis_name="model"),
        mesh=mesh,
        in_specs=specs,
        out_specs=(P("data"), P("data")) if entropy else P("data"),
        check_vma=check_vma,
    )
    _close(jax.jit(sharded)(*args), call(*args))
    n_diff = 1 if fn == "logits" else 3
    if entropy:
        obj = lambda f: lambda *a: jnp.sum(g * f(*a)[0]) + jnp.sum(g_h * f(*a)[1])  # noqa: E731
    else:
        obj = lambda f: lambda *a: jnp.sum(g * f(*a))  # noqa: E731
    grads = jax.jit(jax.grad(obj(sharded), tuple(range(n_diff))))(*args)
    _close(grads, jax.grad(obj(call), tuple(range(n_diff)))(*args))


def test_linear_log_probs_communicate_per_token_only():
    mesh = _mesh((2, 4))
    tokens, vocab, d = 256, 1024, 8
    limit = (tokens // 2) * (vocab // 4)

    def objective(h, w, y, adv):
        lp, ent = jaxsce.linear_log_probs(h, w, y, return_entropy=True, axis_name="model")
        return -adv * lp - 0.01 * ent

    f = jax.shard_map(
        objective,
        mesh=mesh,
        in_specs=(P("data"), P(None, "model"), P("data"), P("data")),
        out_specs=P("data"),
        check_vma=False,
    )
    shapes = (
        jax.ShapeDtypeStruct((tokens, d), jnp.float32),
        jax.ShapeDtypeStruct((d, vocab), jnp.float32),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
        jax.ShapeDtypeStruct((tokens,), jnp.float32),
    )
    g = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a)), (0, 1)))
    sizes = collective_sizes(g.lower(*shapes).compile().as_text())
    assert sizes and max(sizes) < limit, (sizes, limit)


@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
def test_sample_weight_equals_unsharded(check_vma):
    d = _data(5)
    mesh = _mesh((2, 4))
    s = jnp.asarray(np.random.default_rng(6).random(N))
    kw = dict(ignore_index=-100, weight=d["weight"], sample_weight=s, label_smoothing=0.1)
    names = dict(mesh=mesh, vocab_axis="model", batch_axes="data", check_vma=check_vma)
    f = lambda x: jaxsce.sharded_cross_entropy(x, d["labels"], **names, **kw)  # noqa: E731
    f0 = lambda x: jaxsce.cross_entropy(x, d["labels"], **kw)  # noqa: E731
    _close(jax.jit(f)(d["logits"]), f0(d["logits"]))
    _close(jax.jit(jax.grad(f))(d["logits"]), jax.grad(f0)(d["logits"]))
    h_args = (d["hidden"], d["proj"])
    fl = lambda h, w: jaxsce.sharded_linear_cross_entropy(h, w, d["labels"], vocab_block=4, **names, **kw)  # noqa: E731
    fl0 = lambda h, w: jaxsce.linear_cross_entropy(h, w, d["labels"], **kw)  # noqa: E731
    _close(jax.jit(fl)(*h_args), fl0(*h_args))
    _close(jax.jit(jax.grad(fl, (0, 1)))(*h_args), jax.grad(fl0, (0, 1))(*h_args))


@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_distillation_equals_unsharded(divergence, check_vma):
    d = _data(8)
    mesh = _mesh((2, 4))
    rng = np.random.default_rng(9)
    teacher = jnp.asarray(rng.normal(size=(N, V)) * 2)
    t_hidden, t_proj = jnp.asarray(rng.normal(size=(N, 5))), jnp.asarray(rng.normal(size=(5, V)) * 0.4)
    kw = dict(divergence=divergence, beta=0.3, temperature=0.8, reduction="none")
    g = jnp.asarray(rng.normal(size=N))
    spec = dict(mesh=mesh, out_specs=P("data"), check_vma=check_vma)
    f = lambda s, t, m, **names: jaxsce.distillation_loss(s, t, where=m, **kw, **names)  # noqa: E731
    sharded = jax.shard_map(
        functools.partial(f, axis_name="model", batch_axis_name="data"),
        in_specs=(P("data", "model"), P("data", "model"), P("data")),
        **spec,
    )
    args = (d["logits"], teacher, d["where"])
    _close(jax.jit(sharded)(*args), f(*args))
    _close(
        jax.jit(jax.grad(lambda *a: jnp.sum(g * sharded(*a))))(*args),
        jax.grad(lambda *a: jnp.sum(g * f(*a)))(*args),
    )
    fl = lambda h, w, b, th, tw, m, **names: jaxsce.linear_distillation_loss(  # noqa: E731
        h, w, th, tw, student_bias=b, where=m, vocab_block=4, token_block=3, **kw, **names
    )
    sharded_l = jax.shard_map(
        functools.partial(fl, axis_name="model"),
        in_specs=(P("data"), P(None, "model"), P("model"), P("data"), P(None, "model"), P("data")),
        **spec,
    )
    args = (d["hidden"], d["proj"], d["bias"], t_hidden, t_proj, d["where"])
    _close(jax.jit(sharded_l)(*args), fl(*args))
    obj = lambda f: lambda *a: jnp.sum(g * f(*a))  # noqa: E731
    _close(jax.jit(jax.grad(obj(sharded_l), (0, 1, 2)))(*args), jax.grad(obj(fl), (0, 1, 2))(*args))


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@all_cases_fast
def test_distillation_with_a_split_class_axis_and_no_axis_name_raises(divergence):
    # Each device would otherwise compute the divergence of its own shard of
    # the classes (visible under check_vma=True, where JAX tracks it).
    d = _data(8)
    mesh = _mesh((2, 4))
    rng = np.random.default_rng(10)
    teacher = jnp.asarray(rng.normal(size=(N, V)))
    f = lambda s, t: jaxsce.distillation_loss(s, t, divergence=divergence, batch_axis_name="data")  # noqa: E731
    sharded = jax.shard_map(f, mesh=mesh, in_specs=(P("data", "model"), P("data", "model")), out_specs=P())
    with pytest.raises(ValueError, match="axis_name='model'"):
        sharded(d["logits"], teacher)
    # A split batch that batch_axis_name does not name is reported too.
    g = lambda s, t: jaxsce.distillation_loss(s, t, divergence=divergence, reduction="none")  # noqa: E731
    sharded = jax.shard_map(g, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
    with pytest.raises(ValueError, match="batch_axis_name='data'"):
        sharded(d["logits"], teacher)
    t_hidden, t_proj = jnp.asarray(rng.normal(size=(N, 5))), jnp.asarray(rng.normal(size=(5, V)))
    fl = lambda h, w, th, tw: jaxsce.linear_distillation_loss(h, w, th, tw, divergence=divergence)  # noqa: E731
    sharded_l = jax.shard_map(fl, mesh=mesh, in_specs=(P(), P(None, "model"), P(), P(None, "model")), out_specs=P())
    with pytest.raises(ValueError, match="student_weight varies over the mesh axes \\['model'\\]"):
        sharded_l(d["hidden"], d["proj"], t_hidden, t_proj)


@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_distillation_batch_axis_name_reduces_over_the_whole_batch(reduction, check_vma):
    d = _data(8)
    mesh = _mesh((2, 4))
    rng = np.random.default_rng(11)
    t_hidden, t_proj = jnp.asarray(rng.normal(size=(N, 5))), jnp.asarray(rng.normal(size=(5, V)) * 0.4)
    kw = dict(divergence="kl", reduction=reduction, temperature=0.8)
    fl = lambda h, w, th, tw, m, **names: jaxsce.linear_distillation_loss(h, w, th, tw, where=m, **kw, **names)  # noqa: E731
    sharded = jax.shard_map(
        functools.partial(fl, axis_name="model", batch_axis_name="data"),
        mesh=mesh,
        in_specs=(P("data"), P(None, "model"), P("data"), P(None, "model"), P("data")),
        out_specs=P(),
        check_vma=check_vma,
    )
    args = (d["hidden"], d["proj"], t_hidden, t_proj, d["where"])
    _close(jax.jit(sharded)(*args), fl(*args))
    _close(jax.jit(jax.grad(sharded, (0, 1)))(*args), jax.grad(fl, (0, 1))(*args))


def _fused_16bit_call(fn, dtype):
    """One fused function with 16-bit inputs: ``(f(h, w, y, ht, wt, **names), names, out_spec, args)``."""
    rng = np.random.default_rng(12)
    h = jnp.asarray(rng.normal(size=(N, D)), dtype)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.4, dtype)
    y = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    ht, wt = jnp.asarray(rng.normal(size=(N, 5)), dtype), jnp.asarray(rng.normal(size=(5, V)) * 0.4, dtype)
    blocks = dict(token_block=3, vocab_block=4)
    both = dict(axis_name="model", batch_axis_name="data")
    if fn == "linear_cross_entropy":
        f = lambda h, w, y, ht, wt, **nm: jaxsce.linear_cross_entropy(h, w, y, label_smoothing=0.1, **blocks, **nm)  # noqa: E731
        return f, both, P(), (h, w, y, ht, wt)
    if fn == "linear_log_probs":
        f = lambda h, w, y, ht, wt, **nm: jaxsce.linear_log_probs(h, w, y, return_entropy=True, **blocks, **nm)  # noqa: E731
        return f, dict(axis_name="model"), (P("data"), P("data")), (h, w, y, ht, wt)
    f = lambda h, w, y, ht, wt, **nm: jaxsce.linear_distillation_loss(h, w, ht, wt, divergence="jsd", **blocks, **nm)  # noqa: E731
    return f, both, P(), (h, w, y, ht, wt)


@fast_cases(lambda p: p["dtype"] == jnp.bfloat16 and p["check_vma"])
@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fn", ["linear_cross_entropy", "linear_log_probs", "linear_distillation_loss"])
def test_16bit_fused_losses_under_shard_map_equal_unsharded(fn, dtype, check_vma):
    # bf16 inside shard_map(check_vma=True) failed for every fused function:
    # the CPU block read's never-taken cond branch lacked the sharding type.
    f, names, out_spec, args = _fused_16bit_call(fn, dtype)
    in_specs = (P("data"), P(None, "model"), P("data"), P("data"), P(None, "model"))
    sharded = jax.shard_map(
        functools.partial(f, **names), mesh=_mesh((2, 4)), in_specs=in_specs, out_specs=out_spec, check_vma=check_vma
    )
    _close(jax.jit(sharded)(*args), f(*args), rtol=1e-5, atol=1e-6)
    total = lambda g: lambda h, w: sum(jnp.sum(x) for x in jax.tree.leaves(g(h, w, *args[2:])))  # noqa: E731
    grads = jax.jit(jax.grad(total(sharded), (0, 1)))(*args[:2])
    for a, b in zip(grads, jax.grad(total(f), (0, 1))(*args[:2])):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-3)
