"""GRPO fine-tuning of the next-token model with ``jaxsce.linear_policy_loss``.

    python examples/policy_gradient.py            # under a minute on 2 CPU cores
    python examples/policy_gradient.py --smoke    # a few steps (used by the tests)

1. Pretrain the tiny next-token model of ``next_token.py`` on the standard
   library's source (cross-entropy, fused: ``jaxsce.linear_cross_entropy``).
2. Fine-tune it with GRPO on a reward anyone can check: the share of the
   word ``self`` in the model's sampled continuations. For each prompt a
   group of continuations is sampled; each continuation's advantage is its
   reward normalized within its group. Each batch is used for two updates,
   so the second one is off-policy: its ratios to the sampling policy are
   clipped (PPO). A KL penalty keeps the policy near the frozen pretrained
   model, whose head is read in the same stream (``ref_hidden``,
   ``ref_weight``). The loss, its gradient and the metrics come from one
   call; the ``[tokens, vocab]`` logits never exist.

It prints the reward (the rate of ``self``) rising, with the KL to the
reference, the clipped fraction and the entropy.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from next_token import build_vocab, corpus_tokens, features, init  # noqa: E402

import jaxsce  # noqa: E402

TARGET = "self"


def pretrain_loss(params, ctx, y):
    h = features(params, ctx)
    return jaxsce.linear_cross_entropy(h, params["embed"], y, linear_bias=params["bias"], weight_layout="vd")


@functools.partial(jax.jit, static_argnames=("length", "temperature"))
def sample(params, prompts, key, *, length: int, temperature: float):
    """Continue each ``[B, context]`` prompt by ``length`` sampled tokens -> ``[B, length]``."""

    def one(window, key):
        h = features(params, window)
        logits = h @ params["embed"].T + params["bias"][None, :]  # [B, V]: one position, small
        token = jax.random.categorical(key, logits / temperature, axis=-1)
        return jnp.concatenate([window[:, 1:], token[:, None]], axis=1), token

    _, tokens = jax.lax.scan(one, prompts, jax.random.split(key, length))
    return tokens.T


def completion_features(params, prompts, tokens):
    """The hidden state before each sampled token: ``[B, L, d]``."""
    context = prompts.shape[1]
    seq = jnp.concatenate([prompts, tokens], axis=1)  # [B, context + L]
    length = tokens.shape[1]
    windows = jnp.stack([seq[:, t : t + context] for t in range(length)], axis=1)  # [B, L, context]
    return features(params, windows.reshape(-1, context)).reshape(tokens.shape + (-1,))


def grpo_objective(params, ref_params, prompts, tokens, advantage, old_logp, *, temperature: float, beta: float):
    """GRPO's clipped objective with a KL penalty to the reference model, fused; returns the metrics too."""
    h = completion_features(params, prompts, tokens)
    h_ref = completion_features(ref_params, prompts, tokens)
    return jaxsce.linear_policy_loss(
        h,
        params["embed"],
        tokens,
        advantage,
        linear_bias=params["bias"],
        weight_layout="vd",
        ref_hidden=h_ref,
        ref_weight=ref_params["embed"],
        ref_bias=ref_params["bias"],
        old_log_probs=old_logp,
        loss_type="grpo",
        epsilon=0.2,
        beta=beta,
        temperature=temperature,
        return_aux=True,
    )


def group_advantages(reward, group: int):
    """GRPO: each reward minus its group's mean, over the group's standard deviation."""
    r = reward.reshape(-1, group)
    a = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, keepdims=True) + 1e-3)
    return a.reshape(-1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--rl-steps", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.1, help="weight of the KL penalty to the reference")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pretrain_steps, args.rl_steps, args.vocab, args.prompts = 20, 4, 1024, 8
    context, d = 6, 64
    t_start = time.perf_counter()

    tokens = corpus_tokens(1_000_000 if not args.smoke else 200_000)
    index, words = build_vocab(tokens, args.vocab)
    ids = np.asarray([index.get(t, 0) for t in tokens], np.int32)
    target = index[TARGET]
    rng = np.random.default_rng(0)

    def windows(size):
        pos = rng.integers(context, len(ids), size=size)
        return np.stack([ids[pos - context + k] for k in range(context)], axis=1), ids[pos]

    params = init(jax.random.PRNGKey(0), len(words), d, context, 4 * d)
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def pretrain_step(params, state, ctx, y):
        loss, grads = jax.value_and_grad(pretrain_loss)(params, ctx, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(args.pretrain_steps):
        ctx, y = windows(1024)
        params, state, loss = pretrain_step(params, state, jnp.asarray(ctx), jnp.asarray(y))
    print(
        f"pretrained {args.pretrain_steps} steps in {time.perf_counter() - t_start:.1f} s: loss {float(loss):.3f}; "
        f"'{TARGET}' is {np.mean(ids == target):.1%} of the corpus"
    )

    ref_params = jax.tree.map(jnp.copy, params)  # the frozen reference: the pretrained model
    rl_opt = optax.adam(1e-3)
    rl_state = rl_opt.init(params)
    objective = functools.partial(grpo_objective, temperature=args.temperature, beta=args.beta)

    @jax.jit
    def behaviour_log_probs(params, prompts, tokens):
        h = completion_features(params, prompts, tokens)
        return jaxsce.linear_log_probs(
            h, params["embed"], tokens, linear_bias=params["bias"], weight_layout="vd", temperature=args.temperature
        )

    @jax.jit
    def rl_step(params, state, prompts, tokens, advantage, old_logp):
        (_, aux), grads = jax.value_and_grad(objective, has_aux=True)(
            params, ref_params, prompts, tokens, advantage, old_logp
        )
        updates, state = rl_opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, aux

    key = jax.random.PRNGKey(1)
    rewards = []
    for i in range(args.rl_steps):
        prompts, _ = windows(args.prompts)
        prompts = jnp.asarray(np.repeat(prompts, args.group, axis=0))  # each prompt, group times
        key, sub = jax.random.split(key)
        sampled = sample(params, prompts, sub, length=args.length, temperature=args.temperature)
        reward = jnp.mean(sampled == target, axis=1).astype(jnp.float32)
        advantage = group_advantages(reward, args.group)
        old_logp = behaviour_log_probs(params, prompts, sampled)
        for _ in range(2):  # the second update is off-policy: its ratios are clipped
            params, rl_state, aux = rl_step(params, rl_state, prompts, sampled, advantage, old_logp)
        rewards.append(float(reward.mean()))
        if i % 10 == 0 or i == args.rl_steps - 1:
            print(
                f"rl step {i:3d}  reward (rate of '{TARGET}') {rewards[-1]:.3f}  kl {float(aux.kl):.4f}  "
                f"clipped {float(aux.clip_ratio):.3f}  entropy {float(aux.entropy):.2f}"
            )
    k = max(1, len(rewards) // 5)
    first, last = float(np.mean(rewards[:k])), float(np.mean(rewards[-k:]))
    print(f"reward {first:.3f} -> {last:.3f} in {time.perf_counter() - t_start:.1f} s")
    return first, last


if __name__ == "__main__":
    main()
