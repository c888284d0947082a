"""Smoke test of an installed jaxsce, run from outside the source tree by `make package`.

Imports the installed package (not the checkout), checks its metadata, and calls every public
function once on tiny inputs, comparing a few values with plain JAX.
"""

import importlib.metadata
import pathlib
import sys

import jax
import jax.numpy as jnp

import jaxsce

here = pathlib.Path(jaxsce.__file__).resolve()
assert "site-packages" in here.parts, f"jaxsce imported from {here}, not from the installed wheel"
assert importlib.metadata.version("jaxsce") == jaxsce.__version__
assert (here.parent / "py.typed").exists(), "py.typed is missing from the wheel"

key = jax.random.split(jax.random.key(0), 6)
z = jax.random.normal(key[0], (4, 8))
y = jnp.array([1, 0, 7, 3])
h = jax.random.normal(key[1], (4, 5))
w = jax.random.normal(key[2], (5, 8))
expected = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], 1))
calls = {
    "softmax": lambda: jaxsce.softmax(z),
    "log_softmax": lambda: jaxsce.log_softmax(z),
    "logsumexp": lambda: jaxsce.logsumexp(z),
    "cross_entropy": lambda: jaxsce.cross_entropy(z, y),
    "linear_cross_entropy": lambda: jaxsce.linear_cross_entropy(h, w, y),
    "log_probs": lambda: jaxsce.log_probs(z, jnp.argmax(z, axis=1), top_k=3, top_p=0.9),
    "linear_log_probs": lambda: jaxsce.linear_log_probs(h, w, y, return_entropy=True),
    "policy_loss": lambda: jaxsce.policy_loss(z.reshape(2, 2, 8), y.reshape(2, 2), jnp.array([1.0, -1.0])),
    "linear_policy_loss": lambda: jaxsce.linear_policy_loss(
        h.reshape(2, 2, 5), w, y.reshape(2, 2), jnp.array([1.0, -1.0])
    ),
    "preference_loss": lambda: jaxsce.preference_loss(z[:2, None], z[2:, None], y[:2, None], y[2:, None]),
    "linear_preference_loss": lambda: jaxsce.linear_preference_loss(
        h[:2, None], h[2:, None], w, y[:2, None], y[2:, None]
    ),
    "distillation_loss": lambda: jaxsce.distillation_loss(z, z[::-1]),
    "linear_distillation_loss": lambda: jaxsce.linear_distillation_loss(h, w, h[::-1], w),
    "topk_distillation_loss": lambda: jaxsce.topk_distillation_loss(
        z, jnp.array([[0, 1]] * 4), jnp.log(jnp.full((4, 2), 0.25))
    ),
    "linear_topk_distillation_loss": lambda: jaxsce.linear_topk_distillation_loss(
        h, w, jnp.array([[0, 1]] * 4), jnp.log(jnp.full((4, 2), 0.25))
    ),
    "sharded_cross_entropy": lambda: jaxsce.sharded_cross_entropy(
        z, y, mesh=jax.make_mesh((1,), ("model",)), vocab_axis="model"
    ),
    "sharded_linear_cross_entropy": lambda: jaxsce.sharded_linear_cross_entropy(
        h, w, y, mesh=jax.make_mesh((1,), ("model",)), vocab_axis="model"
    ),
}
public = {name for name in jaxsce.__all__ if callable(getattr(jaxsce, name)) and name[0].islower()}
missing = public - set(calls)
assert not missing, f"the smoke test does not call {sorted(missing)}"
for name, call in calls.items():
    out = jax.block_until_ready(call())
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out)), name
assert jnp.allclose(jaxsce.cross_entropy(z, y), expected, rtol=1e-6)
assert jnp.allclose(jaxsce.linear_cross_entropy(h, w, y), jaxsce.cross_entropy(h @ w, y), rtol=1e-5)
python = sys.version.split()[0]
print(f"jaxsce {jaxsce.__version__} from {here.parent}: {len(calls)} public functions called, python {python}")
