"""A tiny next-token model on the Python standard library's own source, output layer fused.

    python examples/next_token.py            # a few hundred steps
    python examples/next_token.py --smoke    # a few steps (used by the tests)

The corpus is the .py files of this interpreter's standard library (present
offline on every machine). Tokens are words and punctuation; the vocabulary
is the most frequent few thousand. The model embeds the previous ``context``
tokens, mixes them with an MLP, and scores the next token against the tied
embedding table with ``jaxsce.linear_cross_entropy(..., weight_layout="vd")``,
so the [tokens, vocab] logits never exist. It prints the training loss and the
compiled temporary memory of the training step next to the plain
``h @ E.T`` + cross-entropy step.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsce

TOKEN = re.compile(r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]")


def corpus_tokens(max_chars: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    text, total = [], 0
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib", "site-packages"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), encoding="utf-8", errors="ignore") as f:
                    chunk = f.read()
                text.append(chunk)
                total += len(chunk)
                if total >= max_chars:
                    return TOKEN.findall("\n".join(text))
    return TOKEN.findall("\n".join(text))


def build_vocab(tokens, size: int):
    common = [w for w, _ in collections.Counter(tokens).most_common(size - 1)]
    index = {w: i + 1 for i, w in enumerate(common)}  # 0 = <unk>
    return index, ["<unk>"] + common


def init(key, vocab: int, d: int, context: int, hidden: int):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "embed": jax.random.normal(k1, (vocab, d), jnp.float32) * 0.02,  # tied input/output table
        "w1": jax.random.normal(k2, (context * d, hidden), jnp.float32) / np.sqrt(context * d),
        "b1": jnp.zeros(hidden, jnp.float32),
        "w2": jax.random.normal(k3, (hidden, d), jnp.float32) / np.sqrt(hidden),
        "bias": jnp.zeros(vocab, jnp.float32),
    }


def features(params, ctx):
    """[B, context] token ids -> [B, d] hidden states."""
    e = params["embed"][ctx].reshape(ctx.shape[0], -1)
    return jax.nn.gelu(e @ params["w1"] + params["b1"]) @ params["w2"]


# Temporaries the fused loss may use. At this size the logits are 64 MiB, so
# the default budget (256 MiB) would take the whole batch as one block; a
# budget below them shows the blocking at work.
MEMORY_BUDGET = 16 * 2**20


def fused_loss(params, ctx, y):
    h = features(params, ctx)
    return jaxsce.linear_cross_entropy(
        h,
        params["embed"],
        y,
        linear_bias=params["bias"],
        weight_layout="vd",
        label_smoothing=0.05,
        memory_budget=MEMORY_BUDGET,
    )


def plain_loss(params, ctx, y):
    logits = features(params, ctx) @ params["embed"].T + params["bias"][None, :]
    return jaxsce.cross_entropy(logits, y, label_smoothing=0.05)


def make_step(loss_fn, opt):
    @jax.jit
    def step(params, state, ctx, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, ctx, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


def step_temp_mib(step, *args) -> float:
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2048, help="tokens per step")
    parser.add_argument("--context", type=int, default=6)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--max-chars", type=int, default=3_000_000)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.max_chars, args.batch, args.vocab = 5, 200_000, 256, 2048

    tokens = corpus_tokens(args.max_chars)
    index, words = build_vocab(tokens, args.vocab)
    ids = np.asarray([index.get(t, 0) for t in tokens], np.int32)
    print(
        f"corpus: {len(tokens):,} tokens from the standard library; "
        f"vocabulary {len(words):,} (unk rate {np.mean(ids == 0):.1%})"
    )
    n_val = len(ids) // 20
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]

    rng = np.random.default_rng(0)

    def batch(source, size):
        pos = rng.integers(args.context, len(source), size=size)
        ctx = np.stack([source[pos - args.context + k] for k in range(args.context)], axis=1)
        return jnp.asarray(ctx), jnp.asarray(source[pos])

    params = init(jax.random.PRNGKey(0), len(words), args.d, args.context, 4 * args.d)
    opt = optax.adamw(3e-3, weight_decay=0.01)
    state = opt.init(params)
    step = make_step(fused_loss, opt)
    ctx, y = batch(train_ids, args.batch)
    fused_mib = step_temp_mib(step, params, state, ctx, y)
    plain_mib = step_temp_mib(make_step(plain_loss, opt), params, state, ctx, y)
    print(
        f"training step temporary memory (compiled): fused {fused_mib:.1f} MiB vs plain {plain_mib:.1f} MiB "
        f"(logits alone: {args.batch * len(words) * 4 / 2**20:.1f} MiB)"
    )

    t0 = time.perf_counter()
    for i in range(args.steps):
        ctx, y = batch(train_ids, args.batch)
        params, state, loss = step(params, state, ctx, y)
        if i % 50 == 0 or i == args.steps - 1:
            print(f"step {i:4d}  train loss {float(loss):.3f}")
    vctx, vy = batch(val_ids, 4096)
    val = float(jax.jit(fused_loss)(params, vctx, vy))
    print(
        f"{args.steps} steps in {time.perf_counter() - t0:.1f} s; "
        f"validation loss {val:.3f} (uniform: {np.log(len(words)):.3f})"
    )
    return val


if __name__ == "__main__":
    main()
