"""Scale-out: losses that read the sharding of their inputs, padded vocabularies, errors in global shapes.

Every loss called on inputs whose sharding is visible (Explicit mesh axes
under ``jit``, concrete ``NamedSharding`` arrays outside it) equals the
unsharded call and communicates O(tokens); ``num_classes`` makes padded
vocabularies exact; the wrappers pad a vocabulary that does not divide the
mesh.
"""

import compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo import collective_sizes, collectives
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsce

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")

B, L, D, V = 4, 6, 8, 96


def _mesh(explicit=True, shape=(2, 4)):
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh(shape, ("data", "model"), axis_types=(kind, kind))


def _data(seed=0, v=V, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return dict(
        hidden=jnp.asarray(rng.normal(size=(B, L, D)), dtype),
        weight=jnp.asarray(rng.normal(size=(D, v)) * 0.5, dtype),
        teacher_hidden=jnp.asarray(rng.normal(size=(B, L, D)), dtype),
        teacher_weight=jnp.asarray(rng.normal(size=(D, v)) * 0.5, dtype),
        labels=jnp.asarray(rng.integers(0, v, size=(B, L)), jnp.int32),
        advantages=jnp.asarray(rng.normal(size=(B,)), jnp.float32),
        old=jnp.asarray(-rng.random((B, L)) * 5, jnp.float32),
        where=jnp.asarray(rng.random((B, L)) > 0.2),
        class_weight=jnp.asarray(np.linspace(0.5, 1.5, v), jnp.float32),
    )


def _put(mesh, x, *spec):
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


# Each loss as (hidden, weight, data) -> scalar, with its options; the first two are differentiated.
CASES = {
    "cross_entropy": lambda h, w, d: jaxsce.cross_entropy(
        h @ w, d["labels"], label_smoothing=0.1, z_loss=1e-3, where=d["where"]
    ),
    "linear_cross_entropy": lambda h, w, d: jaxsce.linear_cross_entropy(
        h, w, d["labels"], label_smoothing=0.1, weight=d["class_weight"], where=d["where"], memory_budget=4096
    ),
    "log_probs": lambda h, w, d: jnp.sum(jnp.stack(jaxsce.log_probs(h @ w, d["labels"], return_entropy=True))),
    "linear_log_probs": lambda h, w, d: jnp.sum(
        jnp.stack(jaxsce.linear_log_probs(h, w, d["labels"], return_entropy=True, memory_budget=4096))
    ),
    "distillation_loss": lambda h, w, d: jaxsce.distillation_loss(
        h @ w, d["teacher_hidden"] @ d["teacher_weight"], divergence="jsd"
    ),
    "linear_distillation_loss": lambda h, w, d: jaxsce.linear_distillation_loss(
        h, w, d["teacher_hidden"], d["teacher_weight"], divergence="reverse_kl", memory_budget=4096
    ),
    "policy_loss": lambda h, w, d: jaxsce.policy_loss(
        h @ w, d["labels"], d["advantages"], old_log_probs=d["old"], where=d["where"]
    ),
    "linear_policy_loss": lambda h, w, d: jaxsce.linear_policy_loss(
        h, w, d["labels"], d["advantages"], old_log_probs=d["old"], where=d["where"], loss_type="grpo"
    ),
}


def _sharded_data(mesh, d):
    """Rows over "data", every class axis over "model"."""
    out = {}
    for k, x in d.items():
        if k in ("weight", "teacher_weight"):
            out[k] = _put(mesh, x, None, "model")
        elif k == "class_weight":
            out[k] = _put(mesh, x, "model")
        else:
            out[k] = _put(mesh, x, "data")
    return out


@pytest.mark.skipif(not compat.HAS_EXPLICIT, reason="explicit sharding is public from jax 0.7")
@pytest.mark.parametrize("case", list(CASES))
def test_explicit_inputs_take_the_sharded_path(case):
    """Under jit on Explicit-sharded inputs: the unsharded values and gradients, O(tokens) communication."""
    fn = CASES[case]
    d = _data()
    want, want_g = jax.value_and_grad(fn, argnums=(0, 1))(d["hidden"], d["weight"], d)
    mesh = _mesh()
    s = _sharded_data(mesh, d)
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    with compat.set_mesh(mesh):
        got, got_g = step(s["hidden"], s["weight"], s)
        hlo = step.lower(s["hidden"], s["weight"], s).compile().as_text()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)
    assert got_g[1].sharding.spec == P(None, "model")
    tokens = B * L // 2  # per data shard
    # Logit-level losses take logits from an ordinary (sharded) matmul; the loss itself sends O(tokens).
    limit = tokens * D if case.startswith("linear") else tokens * max(D, 4)
    assert max(collective_sizes(hlo), default=0) <= max(limit, D * V // 4), case
    if case.startswith("linear"):
        assert "all-gather" not in hlo


def test_concrete_sharded_arrays_outside_jit():
    """Concrete arrays with a NamedSharding (an Auto mesh too): the sharded path, the unsharded result."""
    d = _data(1)
    want = jaxsce.linear_cross_entropy(d["hidden"], d["weight"], d["labels"], label_smoothing=0.1)
    for explicit in (True, False) if compat.HAS_EXPLICIT else (False,):
        mesh = _mesh(explicit)
        s = _sharded_data(mesh, d)
        got = jaxsce.linear_cross_entropy(s["hidden"], s["weight"], s["labels"], label_smoothing=0.1)
        np.testing.assert_allclose(got, want, rtol=2e-5)


@pytest.mark.skipif(not compat.HAS_EXPLICIT, reason="explicit sharding is public from jax 0.7")
def test_explicit_reduction_none_keeps_the_row_sharding():
    d = _data(2)
    mesh = _mesh()
    s = _sharded_data(mesh, d)
    with compat.set_mesh(mesh):
        got = jax.jit(lambda h, w, y: jaxsce.linear_cross_entropy(h, w, y, reduction="none"))(
            s["hidden"], s["weight"], s["labels"]
        )
    np.testing.assert_allclose(
        got, jaxsce.linear_cross_entropy(d["hidden"], d["weight"], d["labels"], reduction="none"), rtol=2e-5
    )
    assert got.sharding.spec[0] == "data"


@pytest.mark.skipif(not compat.HAS_EXPLICIT, reason="explicit sharding is public from jax 0.7")
def test_weights_split_over_different_axes_are_an_error():
    d = _data(3)
    mesh = _mesh()
    student = _put(mesh, d["weight"], None, "model")
    teacher = _put(mesh, d["teacher_weight"], None, "data")
    with compat.set_mesh(mesh), pytest.raises(ValueError, match="teacher_weight has its classes split over"):
        jax.jit(lambda w, t: jaxsce.linear_distillation_loss(d["hidden"], w, d["teacher_hidden"], t))(student, teacher)


# --- padded vocabularies --------------------------------------------------------------

VP = 50257  # GPT-2's vocabulary: divides neither 4 nor 8 shards


def _padded(x, axis, to):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, widths, constant_values=7.0 if jnp.issubdtype(x.dtype, jnp.floating) else 0)


@pytest.mark.parametrize("shards", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_wrappers_pad_a_vocabulary_that_does_not_divide_the_mesh(shards):
    """V = 50257 over 4 (8) vocabulary shards: the unpadded, unsharded loss and gradients."""
    rng = np.random.default_rng(4)
    n, d = 8, 4
    h = jnp.asarray(rng.normal(size=(n, d)))
    w = jnp.asarray(rng.normal(size=(d, VP)) * 0.3)
    y = jnp.asarray(rng.integers(0, VP, size=n), jnp.int32)
    cw = jnp.asarray(rng.random(VP) + 0.5)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, weight=cw)
    mesh = jax.make_mesh((8 // shards, shards), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def sharded(h, w):
        return jaxsce.sharded_linear_cross_entropy(h, w, y, mesh=mesh, vocab_axis="model", batch_axes="data", **opts)

    want, want_g = jax.value_and_grad(lambda h, w: jaxsce.linear_cross_entropy(h, w, y, **opts), argnums=(0, 1))(h, w)
    got, got_g = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    for g, e in zip(got_g, want_g):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-14)
    z = h @ w
    logit = jax.jit(lambda z: jaxsce.sharded_cross_entropy(z, y, mesh=mesh, vocab_axis="model", **opts))(z)
    np.testing.assert_allclose(logit, jaxsce.cross_entropy(z, y, **opts), rtol=1e-10)


def _padded_cases(h, w, ht, wt, y, cw, vp):
    """Every loss on tables padded to ``vp`` columns, with ``num_classes=VP``."""
    pad = lambda x: _padded(x, x.ndim - 1, vp)  # noqa: E731
    nc = dict(num_classes=VP)
    out = {
        "ce smoothing+weight+z": (
            lambda w: jaxsce.linear_cross_entropy(h, pad(w), y, weight=pad(cw), label_smoothing=0.1, z_loss=1e-3, **nc),
            lambda w: jaxsce.linear_cross_entropy(h, w, y, weight=cw, label_smoothing=0.1, z_loss=1e-3),
        ),
        "logit ce": (
            lambda w: jaxsce.cross_entropy(h @ pad(w), y, label_smoothing=0.2, weight=pad(cw), **nc),
            lambda w: jaxsce.cross_entropy(h @ w, y, label_smoothing=0.2, weight=cw),
        ),
        "log_probs+entropy": (
            lambda w: jnp.sum(jnp.stack(jaxsce.linear_log_probs(h, pad(w), y, return_entropy=True, **nc))),
            lambda w: jnp.sum(jnp.stack(jaxsce.linear_log_probs(h, w, y, return_entropy=True))),
        ),
    }
    for div in ("kl", "reverse_kl", "jsd"):
        out[div] = (
            lambda w, div=div: jaxsce.linear_distillation_loss(h, pad(w), ht, pad(wt), divergence=div, **nc),
            lambda w, div=div: jaxsce.linear_distillation_loss(h, w, ht, wt, divergence=div),
        )
    return out


@pytest.mark.slow  # padding runs fast in test_num_classes_padding_is_exact_and_gets_zero_gradient
@pytest.mark.skipif(not compat.HAS_EXPLICIT, reason="explicit sharding is public from jax 0.7")
@pytest.mark.parametrize("shards", [4, 8])
def test_padded_tables_on_explicit_meshes(shards):
    """A table padded to divide the mesh, with num_classes: every loss equals the unpadded unsharded one."""
    rng = np.random.default_rng(5)
    n, d = 8, 4
    vp = -(-VP // shards) * shards
    h, ht = (jnp.asarray(rng.normal(size=(n, d))) for _ in range(2))
    w, wt = (jnp.asarray(rng.normal(size=(d, VP)) * 0.3) for _ in range(2))
    y = jnp.asarray(rng.integers(0, VP, size=n), jnp.int32)
    cw = jnp.asarray(rng.random(VP) + 0.5)
    mesh = jax.make_mesh((8 // shards, shards), ("data", "model"))
    for name, (padded, plain) in _padded_cases(h, w, ht, wt, y, cw, vp).items():
        want, want_g = jax.value_and_grad(plain)(w)

        def on_mesh(w, padded=padded):
            return padded(jax.sharding.reshard(w, P(None, None)))

        with compat.set_mesh(mesh):
            got, got_g = jax.jit(jax.value_and_grad(on_mesh))(w)
        np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(got_g, want_g, rtol=1e-7, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("name", ["ce smoothing+weight+z", "logit ce", "log_probs+entropy", "kl", "reverse_kl", "jsd"])
def test_num_classes_padding_is_exact_and_gets_zero_gradient(name):
    """Unsharded: padding columns (any value, even huge) change nothing and get exactly 0 gradient."""
    rng = np.random.default_rng(6)
    n, d, v, vp = 6, 5, 37, 48
    h, ht = (jnp.asarray(rng.normal(size=(n, d))) for _ in range(2))
    w, wt = (jnp.asarray(rng.normal(size=(d, v)) * 0.5) for _ in range(2))
    y = jnp.asarray(rng.integers(0, v, size=n), jnp.int32)
    cw = jnp.asarray(rng.random(v) + 0.5)
    global VP
    saved, VP = VP, v
    try:
        padded, plain = _padded_cases(h, w, ht, wt, y, cw, vp)[name]
    finally:
        VP = saved
    want, want_g = jax.value_and_grad(plain)(w)
    got, got_g = jax.value_and_grad(padded)(w)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-10, atol=1e-15)
    # The padding's own gradient, through the padded table directly.
    wp = _padded(w, 1, vp)
    gp = jax.grad(lambda wp: jaxsce.linear_cross_entropy(h, wp, y, label_smoothing=0.3, num_classes=v))(wp)
    assert np.all(np.asarray(gp[:, v:]) == 0)


def test_num_classes_is_checked():
    z = jnp.zeros((2, 8))
    y = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="num_classes=9 exceeds the 8 columns"):
        jaxsce.cross_entropy(z, y, num_classes=9)
    with pytest.raises(TypeError, match="num_classes must be a positive integer"):
        jaxsce.log_probs(z, y, num_classes=2.5)
    # A label in the padding is out of range: NaN, as any label outside [0, C).
    assert np.isnan(jaxsce.cross_entropy(z, jnp.array([0, 6], jnp.int32), num_classes=6, reduction="none")[1])


@pytest.mark.parametrize("opts", [dict(logit_softcap=2.0), dict(label_smoothing=0.2)], ids=["softcap", "smoothing"])
def test_logit_level_padding_with_probability_targets(opts):
    rng = np.random.default_rng(7)
    z = jnp.asarray(rng.normal(size=(5, 20)) * 3)
    t = jnp.asarray(rng.dirichlet(np.ones(13), size=5))
    t_pad = jnp.pad(t, ((0, 0), (0, 7)))
    want, want_g = jax.value_and_grad(lambda z: jaxsce.cross_entropy(z[:, :13], t, **opts))(z)
    got, got_g = jax.value_and_grad(lambda z: jaxsce.cross_entropy(z, t_pad, num_classes=13, **opts))(z)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-10, atol=1e-15)
    assert np.all(np.asarray(got_g[:, 13:]) == 0)
    # Forward mode: a tangent on the padding changes nothing.
    dz = jnp.asarray(rng.normal(size=z.shape))
    padded = lambda z: jaxsce.cross_entropy(z, t_pad, num_classes=13, derivative="jvp", **opts)  # noqa: E731
    _, tangent = jax.jvp(padded, (z,), (dz,))
    _, want_t = jax.jvp(lambda z: jaxsce.cross_entropy(z[:, :13], t, derivative="jvp", **opts), (z,), (dz,))
    np.testing.assert_allclose(tangent, want_t, rtol=1e-10)


# --- errors that name what the user passed ---------------------------------------------


def test_wrapper_errors_name_global_shapes():
    mesh = _mesh(False)
    h = jnp.zeros((16, 32))
    w = jnp.zeros((1000, 32))  # [V, d] without weight_layout="vd"
    y = jnp.zeros((16,), jnp.int32)
    with pytest.raises(ValueError, match=r"linear_weight of shape \(1000, 32\)"):
        jaxsce.sharded_linear_cross_entropy(h, w, y, mesh=mesh, vocab_axis="model", batch_axes="data")


def test_missing_batch_axis_name_is_named():
    mesh = _mesh(False)
    h, w, y = jnp.zeros((16, 4)), jnp.zeros((4, 32)), jnp.zeros((16,), jnp.int32)

    def local(h, w, y):
        return jaxsce.linear_cross_entropy(h, w, y, axis_name="model")

    f = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(None, "model"), P("data")), out_specs=P())
    with pytest.raises(ValueError, match="pass batch_axis_name='data'"):
        jax.jit(f)(h, w, y)


# --- memory: the shape, compile-only -------------------------------------------


@pytest.mark.skipif(not compat.HAS_EXPLICIT, reason="explicit sharding is public from jax 0.7")
def test_explicit_direct_call_memory_and_no_all_gather():
    """2 data x 4 vocabulary shards, 16 x 512 tokens, d = 1024, V = 131072, bf16: per-device temporaries of
    value_and_grad within the 256 MiB budget (+1 MiB bookkeeping), and no all-gather."""
    mesh = _mesh()
    s = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    h = jax.ShapeDtypeStruct((16, 512, 1024), jnp.bfloat16, sharding=s("data"))
    w = jax.ShapeDtypeStruct((1024, 131072), jnp.bfloat16, sharding=s(None, "model"))
    y = jax.ShapeDtypeStruct((16, 512), jnp.int32, sharding=s("data"))
    step = jax.jit(jax.value_and_grad(lambda h, w, y: jaxsce.linear_cross_entropy(h, w, y), argnums=(0, 1)))
    with compat.set_mesh(mesh):
        compiled = step.lower(h, w, y).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 257 * 2**20, temp / 2**20
    assert "all-gather" not in compiled.as_text()


# --- the sharding guide's recipes, compiled: no collective of the weight's or the logits' size ---------


def _recipes():
    """name -> (function of (hidden, weight, labels), mesh, specs), as the sharding guide writes them."""
    auto = _mesh(False)
    tiny = dict(memory_budget=64 * 1024)  # the vocabulary streams in blocks

    def in_shard_map(h, w, y):
        local = lambda h, w, y: jaxsce.linear_cross_entropy(  # noqa: E731
            h, w, y, axis_name="model", batch_axis_name="data", **tiny
        )
        specs = (P("data"), P(None, "model"), P("data"))
        return jax.shard_map(local, mesh=auto, in_specs=specs, out_specs=P())(h, w, y)

    def wrapper(h, w, y):
        return jaxsce.sharded_linear_cross_entropy(h, w, y, mesh=auto, vocab_axis="model", batch_axes="data", **tiny)

    def logit_wrapper(h, w, y):
        return jaxsce.sharded_cross_entropy(
            jax.lax.with_sharding_constraint(h @ w, NamedSharding(auto, P("data", "model"))),
            y,
            mesh=auto,
            vocab_axis="model",
            batch_axes="data",
        )

    recipes = {
        "shard_map": (in_shard_map, auto),
        "sharded_linear_cross_entropy": (wrapper, auto),
        "sharded_cross_entropy": (logit_wrapper, auto),
    }
    if compat.HAS_EXPLICIT:
        explicit = _mesh(True)
        recipes["explicit direct call"] = (
            lambda h, w, y: jaxsce.linear_cross_entropy(h, w, y, **tiny),
            explicit,
        )

        def tied(table, tokens, _):
            x = table.at[tokens[:, :-1]].get(out_sharding=P("data"))
            x = x + jnp.cumsum(x, axis=1)
            return jaxsce.linear_cross_entropy(x, table, tokens[:, 1:], weight_layout="vd", **tiny)

        recipes["tied embedding"] = (tied, explicit)
    return recipes


@pytest.mark.parametrize(
    "name",
    ["shard_map", "sharded_linear_cross_entropy", "sharded_cross_entropy", "explicit direct call", "tied embedding"],
)
def test_guide_recipes_communicate_no_weight_or_logits(name):
    recipes = _recipes()
    if name not in recipes:
        pytest.skip("explicit sharding is public from jax 0.7")
    fn, mesh = recipes[name]
    t, d, v = 64, 16, 4096
    rng = np.random.default_rng(8)
    if name == "tied embedding":
        table = _put(mesh, jnp.asarray(rng.normal(size=(v, d)) * 0.1, jnp.float32), "model", None)
        tokens = _put(mesh, jnp.asarray(rng.integers(0, v, size=(8, 9)), jnp.int32), "data")
        args = (table, tokens, None)
    else:
        args = (
            _put(mesh, jnp.asarray(rng.normal(size=(t, d)), jnp.float32), "data"),
            _put(mesh, jnp.asarray(rng.normal(size=(d, v)) * 0.1, jnp.float32), None, "model"),
            _put(mesh, jnp.asarray(rng.integers(0, v, size=t), jnp.int32), "data"),
        )
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)) if name != "tied embedding" else jax.value_and_grad(fn))
    with compat.set_mesh(mesh):
        hlo = step.lower(*args).compile().as_text()
    local_tokens = t // 2
    weight_shard = d * v // 4
    for kind, size in collectives(hlo):
        # O(tokens): d_hidden's psum (T x d) is the largest, but for the data-parallel all-reduce of
        # each device's d_W shard that any data-parallel step makes. Never the weight (d x V) or the
        # logits (T x V / 4 per device).
        assert size <= local_tokens * d or (kind == "all-reduce" and size == weight_shard), (name, kind, size)


@pytest.mark.skipif(
    compat.JAX < (0, 7),
    reason="the XLA of jax 0.6 hoists the blocks' float32 conversion of the weight out of the loop (52 MiB here)",
)
def test_float32_hidden_states_make_no_float32_copy_of_a_16_bit_weight():
    """float32 hidden states with a bf16 weight once took the single-pass path, whose d_hidden products
    read the whole weight in float32 (a copy of twice its size, next to the float32 d_W): the streaming
    path converts one block at a time. Compile-only temporaries stay below one float32 weight."""
    t, d, v = 64, 256, 32768
    h = jax.ShapeDtypeStruct((t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((t,), jnp.int32)
    step = jax.jit(jax.grad(lambda h, w, y: jaxsce.linear_cross_entropy(h, w, y), (0, 1)))
    temp = step.lower(h, w, y).compile().memory_analysis().temp_size_in_bytes
    assert temp < 4 * d * v, temp / 2**20
