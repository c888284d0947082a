"""Properties every public function that takes class ids must have, each written once and run over all of
them: host ids that JAX would wrap are refused, ``-100`` labels are skipped by default (PyTorch's, TRL's and
Hugging Face's collators' convention) exactly as ``where=False`` skips them, ``ignore_index=None`` scores
them (out of range: NaN), and inside ``shard_map`` the local-sum idiom ``psum(loss(..., reduction="sum"))``
equals the global sum under ``check_vma=True``.
"""

from __future__ import annotations

import compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from marks import all_cases_fast, fast_cases

import jaxsce

B, L, D, C = 4, 6, 8, 37


def _data(seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, C)) * 0.5, jnp.float32)
    y = rng.integers(0, C, size=(B, L))
    return h, w, y


def _masked(y):
    """Labels with -100 at a few positions (prompt and padding), and the matching ``where`` mask."""
    y = np.array(y)
    y[0, :2] = -100
    y[2, -1] = -100
    return y, jnp.asarray(y != -100)


# Each entry: name -> call(h, w, labels, **options), where labels are [B, L] class ids (host or device).
# ``options`` are the ones under test (where, ignore_index); each call fixes the others.
ADV = jnp.asarray([1.0, -0.5, 2.0, 0.25])


def _pref(f, h, w, y, where=None, **kw):
    wk = {} if where is None else dict(chosen_where=where[:2], rejected_where=where[2:])
    ys = (y[:2], y[2:])
    return (
        f(h[:2], h[2:], w, *ys, **wk, **kw)
        if f is jaxsce.linear_preference_loss
        else f(h[:2] @ w, h[2:] @ w, *ys, **wk, **kw)
    )


CALLS = {
    "cross_entropy": lambda h, w, y, **kw: jaxsce.cross_entropy(h @ w, y, **kw),
    "linear_cross_entropy": lambda h, w, y, **kw: jaxsce.linear_cross_entropy(h, w, y, **kw),
    "log_probs": lambda h, w, y, **kw: jnp.sum(jaxsce.log_probs(h @ w, y, **kw)),
    "linear_log_probs": lambda h, w, y, **kw: jnp.sum(jaxsce.linear_log_probs(h, w, y, **kw)),
    "policy_loss": lambda h, w, y, **kw: jaxsce.policy_loss(h @ w, y, ADV, **kw),
    "linear_policy_loss": lambda h, w, y, **kw: jaxsce.linear_policy_loss(h, w, y, ADV, **kw),
    "preference_loss": lambda h, w, y, **kw: _pref(jaxsce.preference_loss, h, w, y, **kw),
    "linear_preference_loss": lambda h, w, y, **kw: _pref(jaxsce.linear_preference_loss, h, w, y, **kw),
    "distillation_loss": lambda h, w, y, **kw: jaxsce.distillation_loss(
        h @ w, h @ (w * 0.5), labels=y, hard_weight=0.5, **kw
    ),
    "linear_distillation_loss": lambda h, w, y, **kw: jaxsce.linear_distillation_loss(
        h, w, h, w * 0.5, labels=y, hard_weight=0.5, **kw
    ),
}


def test_every_public_function_taking_labels_is_listed():
    """A new function with class-id labels joins the registry (so every property below covers it)."""
    import inspect

    taking = {
        name
        for name in jaxsce.__all__
        if callable(getattr(jaxsce, name))
        and not name.startswith("sharded_")
        and any(p in ("labels", "chosen_labels") for p in inspect.signature(getattr(jaxsce, name)).parameters)
    }
    assert taking == set(CALLS)


@pytest.mark.parametrize("name", sorted(CALLS))
@fast_cases(lambda p: p["name"] == "linear_distillation_loss")  # the one that scored them; slow set: all
def test_host_ids_that_jax_would_wrap_are_refused(name):
    """An int64 label of 2**32 + 3 became class 3 in linear_distillation_loss (its twins refused it)."""
    h, w, y = _data()
    wrapped = np.array(y, np.int64)
    wrapped[1, 2] = 2**32 + 3
    with compat.enable_x64(False):
        with pytest.raises(ValueError, match="4294967299"):
            CALLS[name](h, w, wrapped)
        assert np.isfinite(CALLS[name](h, w, np.asarray(y, np.int64)))  # ids that fit are fine


@pytest.mark.parametrize("name", ["topk_distillation_loss", "linear_topk_distillation_loss"])
@all_cases_fast
def test_teacher_ids_that_jax_would_wrap_are_refused(name):
    h, w, _ = _data()
    ids = np.tile(np.arange(3, dtype=np.int64), (B, L, 1))
    lt = jnp.log(jnp.full((B, L, 3), 0.2))
    ids[0, 0, 1] = 2**32 + 5
    f = getattr(jaxsce, name)
    call = (lambda i: f(h @ w, i, lt)) if name == "topk_distillation_loss" else (lambda i: f(h, w, i, lt))
    with compat.enable_x64(False):
        with pytest.raises(ValueError, match="teacher_indices of dtype int64 hold 4294967301"):
            call(ids)


@pytest.mark.parametrize("name", sorted(CALLS))
@fast_cases(lambda p: p["name"] == "linear_policy_loss")  # slow set: every function
def test_minus_100_labels_are_skipped_by_default_like_where(name):
    """ignore_index defaulted to None: -100 labels (Hugging Face's collators) gave NaN."""
    h, w, y = _data()
    ym, where = _masked(y)
    clean = np.where(ym == -100, 0, ym)
    skipped = CALLS[name](h, w, jnp.asarray(ym))
    masked = CALLS[name](h, w, jnp.asarray(clean), where=where)
    np.testing.assert_allclose(skipped, masked, rtol=1e-6)
    assert np.isfinite(skipped)
    # ignore_index=None: -100 is a class id like any other, out of range: NaN.
    assert np.isnan(CALLS[name](h, w, jnp.asarray(ym), ignore_index=None))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize(
    "name", ["cross_entropy", "linear_cross_entropy", "linear_policy_loss", "policy_loss", "linear_distillation_loss"]
)
def test_local_sum_idiom_under_check_vma(name):
    """psum(loss(..., reduction="sum"), "data") raised "pass batch_axis_name" under check_vma=True; a local
    sum is a correct share of the global one. The policy losses sum over a given num_items_in_batch."""
    h, w, y = _data()
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    policy = name in ("policy_loss", "linear_policy_loss")
    kw = dict(num_items_in_batch=B * L) if policy else dict(reduction="sum")

    def shard_local(h, y, adv):
        if name == "policy_loss":
            out = jaxsce.policy_loss(h @ w, y, adv, **kw)
        elif name == "linear_policy_loss":
            out = jaxsce.linear_policy_loss(h, w, y, adv, **kw)
        else:
            out = CALLS[name](h, w, y, **kw)
        return jax.lax.psum(out, "data")

    f = jax.jit(
        jax.shard_map(shard_local, mesh=mesh, in_specs=(P("data"), P("data"), P("data")), out_specs=P(), check_vma=True)
    )
    got = f(h, jnp.asarray(y), ADV)
    want = CALLS[name](h, w, jnp.asarray(y), **kw)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    if name == "cross_entropy":
        # A local mean is the silent-wrong case: still an error naming the axis.
        g = jax.shard_map(
            lambda h, y: jaxsce.cross_entropy(h @ w, y),
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=P(),
            check_vma=True,
        )
        with pytest.raises(ValueError, match="batch_axis_name='data'"):
            jax.jit(g)(h, jnp.asarray(y))
