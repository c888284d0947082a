"""A small CNN on scikit-learn's handwritten digits, trained with jaxsce.cross_entropy.

    python examples/digits_cnn.py              # train, print test accuracy
    python examples/digits_cnn.py --compare    # same seed with jax.grad of the naive formula; plot both curves
    python examples/digits_cnn.py --smoke      # a few steps (used by the tests)

The data (1797 8x8 images, 10 classes) ships inside scikit-learn: nothing is
downloaded. The whole training step is one jax.jit-compiled function.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxsce

LABEL_SMOOTHING = 0.05


def load(seed: int = 0):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # [N, 8, 8, 1]
    return train_test_split(x, digits.target.astype(np.int32), test_size=0.2, random_state=seed, stratify=digits.target)


def init(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    he = lambda k, shape, fan_in: jax.random.normal(k, shape, jnp.float32) * jnp.sqrt(2.0 / fan_in)  # noqa: E731
    return {
        "conv1": he(k1, (3, 3, 1, 32), 9),
        "b1": jnp.zeros(32, jnp.float32),
        "conv2": he(k2, (3, 3, 32, 64), 9 * 32),
        "b2": jnp.zeros(64, jnp.float32),
        "dense1": he(k3, (4 * 4 * 64, 128), 4 * 4 * 64),
        "b3": jnp.zeros(128, jnp.float32),
        "out": he(k4, (128, 10), 128) * 0.1,
        "b4": jnp.zeros(10, jnp.float32),
    }


def forward(params, x):
    """[B, 8, 8, 1] images -> [B, 10] logits: the last layer's output softmax will read."""
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(x, params["conv1"], (1, 1), "SAME", dimension_numbers=dn) + params["b1"]
    h = jax.nn.relu(h)
    h = jax.lax.conv_general_dilated(h, params["conv2"], (1, 1), "SAME", dimension_numbers=dn) + params["b2"]
    h = jax.nn.relu(h)
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")  # -> 4x4
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["dense1"] + params["b3"])
    return h @ params["out"] + params["b4"]


def jaxsce_loss(params, x, y):
    return jaxsce.cross_entropy(forward(params, x), y, label_smoothing=LABEL_SMOOTHING)


def naive_loss(params, x, y):
    """The tutorial's formula with the same smoothing: exp / sum, -sum q log p, mean."""
    logits = forward(params, x)
    e = jnp.exp(logits)
    p = e / jnp.sum(e, axis=-1, keepdims=True)
    q = (1 - LABEL_SMOOTHING) * jax.nn.one_hot(y, 10, dtype=p.dtype) + LABEL_SMOOTHING / 10
    return jnp.mean(-jnp.sum(q * jnp.log(p), axis=-1))


def train(loss_fn, data, *, steps: int, batch: int = 128, seed: int = 0, lr: float = 3e-3):
    x_train, x_test, y_train, y_test = data
    params = init(jax.random.PRNGKey(seed))
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(x_train), batch, replace=False)
        params, state, loss = step(params, state, x_train[idx], y_train[idx])
        losses.append(float(loss))
    logits = jax.jit(forward)(params, x_test)
    accuracy = float(jnp.mean(jnp.argmax(jaxsce.softmax(logits), -1) == y_test))
    return params, losses, accuracy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="5 steps, for tests")
    parser.add_argument("--plot", default="examples/digits_loss.png")
    args = parser.parse_args(argv)
    steps = 5 if args.smoke else args.steps
    data = load()
    t0 = time.perf_counter()
    params, losses, accuracy = train(jaxsce_loss, data, steps=steps)
    print(f"jaxsce: {steps} steps in {time.perf_counter() - t0:.1f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if args.compare:
        x_train, _, y_train, _ = data
        p0 = init(jax.random.PRNGKey(0))
        g_ours = jax.grad(jaxsce_loss)(p0, x_train[:256], y_train[:256])
        g_naive = jax.grad(naive_loss)(p0, x_train[:256], y_train[:256])
        gdiff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_naive)))
        print(f"max |gradient difference| at initialization: {gdiff:.2e}")
        params_naive, losses_naive, acc_naive = train(naive_loss, data, steps=steps)
        diff = max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_naive))
        )
        print(f"naive autodiff: loss {losses_naive[0]:.3f} -> {losses_naive[-1]:.3f}, test accuracy {acc_naive:.4f}")
        # float32 rounding differences of ~1e-8 in the gradients are amplified
        # by 600 Adam steps (which normalize tiny gradients); the curves overlay.
        print(f"max |param difference| after training: {diff:.2e}")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 4))
            ax.plot(losses, label="jaxsce.cross_entropy (analytic p - y)", lw=2.5, alpha=0.6)
            ax.plot(losses_naive, label="jax.grad of the naive formula", lw=1, ls="--")
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            ax.set_yscale("log")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.plot, dpi=110)
            print(f"wrote {args.plot}")
        except ImportError:
            print("matplotlib not installed: no plot")
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy, losses


if __name__ == "__main__":
    main()
