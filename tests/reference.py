"""Independent references for the tests.

* ``np_*``: float64 NumPy formulas written from the documented math
  (the tutorial's stable softmax; ``torch.nn.functional.cross_entropy``'s
  documentation for weights, label smoothing, ignore_index and reductions).
  They share no code with jaxsce.
* ``naive_*``: the tutorial's naive JAX formulas (``exp(x) / sum(exp(x))``,
  ``-log p[y]``), differentiated by ``jax.grad`` as the oracle for gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# One table of tolerances: (value, gradient) relative tolerances.
TOL = {
    np.dtype(np.float64): (1e-12, 1e-10),
    np.dtype(np.float32): (1e-6, 2e-3),
    np.dtype(jnp.bfloat16): (1e-2, 1e-1),
    np.dtype(np.float16): (1e-2, 1e-1),
}


def np_log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (x - m) - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def np_softmax(x, axis=-1):
    return np.exp(np_log_softmax(x, axis))


def np_logsumexp(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)), axis)


def np_cross_entropy(
    logits,
    labels,
    *,
    weight=None,
    ignore_index=None,
    label_smoothing=0.0,
    reduction="mean",
    where=None,
    z_loss=0.0,
    logit_softcap=None,
):
    """PyTorch's documented cross_entropy in float64, for ``[N, C]`` logits.

    Class ids (torch docs, "class indices"):
      l_n = -(1 - eps) w_{y_n} log p_{n,y_n} - (eps / C) sum_c w_c log p_{n,c}
      mean = sum_n l_n / sum_n w_{y_n} over non-ignored n.
    Probabilities (torch docs, "class probabilities"):
      l_n = -sum_c w_c ((1 - eps) t_{n,c} + eps / C) log p_{n,c}
      mean = sum_n l_n / N.
    jaxsce's documented additions: ``where`` drops examples like ignore_index;
    ``z_loss * lse^2`` is added per counted example; the soft cap is applied
    first; an empty mean is 0 instead of NaN.
    """
    z = np.asarray(logits, np.float64)
    if logit_softcap is not None:
        z = logit_softcap * np.tanh(z / logit_softcap)
    n, c = z.shape
    logp = np_log_softmax(z)
    lse = np_logsumexp(z)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    counted = np.ones(n, bool) if where is None else np.asarray(where, bool).copy()
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        if ignore_index is not None:
            counted &= labels != ignore_index
        safe = np.where(counted, labels, 0)
        nll = -logp[np.arange(n), safe]
        with np.errstate(invalid="ignore"):
            smooth = -np.sum(np.where(w == 0, 0, w * logp), axis=-1)
        per = (1 - label_smoothing) * w[safe] * nll + (label_smoothing / c) * smooth
        denom_terms = w[safe]
    else:
        t = np.asarray(labels, np.float64)
        q = w * ((1 - label_smoothing) * t + label_smoothing / c)
        with np.errstate(invalid="ignore"):
            per = -np.sum(np.where(q == 0, 0, q * logp), axis=-1)
        denom_terms = np.ones(n)
    per = per + z_loss * lse**2
    per = np.where(counted, per, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    denom = np.sum(np.where(counted, denom_terms, 0.0))
    return 0.0 if denom == 0 else per.sum() / denom


def naive_softmax(x):
    """The tutorial's unstable ``exp(x) / sum(exp(x))`` (last axis)."""
    e = jnp.exp(x)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def naive_cross_entropy(
    logits,
    labels,
    *,
    weight=None,
    ignore_index=None,
    label_smoothing=0.0,
    reduction="mean",
    where=None,
    z_loss=0.0,
    logit_softcap=None,
):
    """The tutorial's formula extended literally by each option, in plain JAX.

    ``-log(naive_softmax)``: overflows for large logits, so only used on
    moderate inputs, as the ``jax.grad`` oracle.
    """
    z = logits
    if logit_softcap is not None:
        z = logit_softcap * jnp.tanh(z / logit_softcap)
    n, c = z.shape
    logp = jnp.log(naive_softmax(z))
    lse = jnp.log(jnp.sum(jnp.exp(z), axis=-1))
    w = jnp.ones(c, z.dtype) if weight is None else weight.astype(z.dtype)
    counted = jnp.ones(n, bool) if where is None else where
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if ignore_index is not None:
            counted = counted & (labels != ignore_index)
        safe = jnp.where(counted, labels, 0)
        onehot = jnp.eye(c, dtype=z.dtype)[safe]
        q = (1 - label_smoothing) * w[safe][:, None] * onehot + (label_smoothing / c) * w[None, :]
        denom_terms = w[safe]
    else:
        q = w[None, :] * ((1 - label_smoothing) * labels + label_smoothing / c)
        denom_terms = jnp.ones(n, z.dtype)
    per = -jnp.sum(q * logp, axis=-1) + z_loss * lse**2
    per = jnp.where(counted, per, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    denom = jnp.sum(jnp.where(counted, denom_terms, 0.0))
    return per.sum() / jnp.where(denom == 0, 1.0, denom)


def _np_tempered(logits, temperature, logit_softcap):
    z = np.asarray(logits, np.float64)
    if logit_softcap is not None:
        z = logit_softcap * np.tanh(z / logit_softcap)
    return z / temperature


def np_log_probs(logits, labels, *, temperature=1.0, logit_softcap=None):
    """``(log p_y, H)`` for ``p = softmax(softcap(z) / T)``, ``H = -sum_c p_c log p_c``
    (``0 log 0 = 0``), float64, ``[N, C]`` logits."""
    ls = np_log_softmax(_np_tempered(logits, temperature, logit_softcap))
    p = np.exp(ls)
    lp = ls[np.arange(ls.shape[0]), np.asarray(labels)]
    with np.errstate(invalid="ignore"):
        h = -np.sum(np.where(p > 0, p * ls, 0.0), axis=-1)
    return lp, h


def np_log_probs_grad(logits, labels, g, g_h, *, temperature=1.0, logit_softcap=None):
    """``d(sum_n g_n log p_{n,y_n} + g_h,n H_n) / dz`` from the textbook derivatives:
    ``d log p_y / ds = e_y - p``, ``dH / ds_c = -p_c (log p_c + H)``,
    ``ds / dz = (1 - tanh^2(z / cap)) / T``."""
    z = np.asarray(logits, np.float64)
    ls = np_log_softmax(_np_tempered(z, temperature, logit_softcap))
    p = np.exp(ls)
    n, c = z.shape
    onehot = np.eye(c)[np.asarray(labels)]
    _, h = np_log_probs(z, labels, temperature=temperature, logit_softcap=logit_softcap)
    g, g_h = np.asarray(g, np.float64)[:, None], np.asarray(g_h, np.float64)[:, None]
    ds = g * (onehot - p) - g_h * np.where(p > 0, p * (ls + h[:, None]), 0.0)
    dz = ds / temperature
    if logit_softcap is not None:
        dz = dz * (1 - np.tanh(z / logit_softcap) ** 2)
    return dz


def naive_log_probs(logits, labels, *, temperature=1.0, logit_softcap=None):
    """The naive JAX formula (``jax.nn.log_softmax`` of the tempered, capped
    logits), the ``jax.grad`` oracle: ``(log p_y, H)``."""
    z = logits
    if logit_softcap is not None:
        z = logit_softcap * jnp.tanh(z / logit_softcap)
    ls = jax.nn.log_softmax(z / temperature, axis=-1)
    lp = jnp.take_along_axis(ls, labels[:, None], axis=-1)[:, 0]
    return lp, -jnp.sum(jnp.exp(ls) * ls, axis=-1)


def np_distillation(student, teacher, divergence, *, beta=0.5, temperature=1.0):
    """KL(P_t||P_s), KL(P_s||P_t) or beta KL(P_t||M) + (1-beta) KL(P_s||M), M = beta P_t + (1-beta) P_s,
    for P = softmax(logits / T), float64, ``[N, C]``, with 0 log 0 = 0."""
    ls = np_log_softmax(np.asarray(student, np.float64) / temperature)
    lt = np_log_softmax(np.asarray(teacher, np.float64) / temperature)
    ps, pt = np.exp(ls), np.exp(lt)

    def kl(p, lp, lq):
        with np.errstate(invalid="ignore"):
            return np.sum(np.where(p > 0, p * (lp - lq), 0.0), axis=-1)

    if divergence == "kl":
        return kl(pt, lt, ls)
    if divergence == "reverse_kl":
        return kl(ps, ls, lt)
    with np.errstate(divide="ignore"):
        lm = np.log(beta * pt + (1 - beta) * ps)
    return beta * kl(pt, lt, lm) + (1 - beta) * kl(ps, ls, lm)


def naive_distillation(student, teacher, divergence, *, beta=0.5, temperature=1.0):
    """The naive JAX formula on ``jax.nn.log_softmax``, the ``jax.grad`` oracle (finite logits)."""
    ls = jax.nn.log_softmax(student / temperature, axis=-1)
    lt = jax.nn.log_softmax(teacher / temperature, axis=-1)
    ps, pt = jnp.exp(ls), jnp.exp(lt)
    if divergence == "kl":
        return jnp.sum(pt * (lt - ls), axis=-1)
    if divergence == "reverse_kl":
        return jnp.sum(ps * (ls - lt), axis=-1)
    lm = jnp.log(beta * pt + (1 - beta) * ps)
    return beta * jnp.sum(pt * (lt - lm), axis=-1) + (1 - beta) * jnp.sum(ps * (ls - lm), axis=-1)


def naive_policy_loss(
    logits,
    labels,
    advantages,
    mask,
    *,
    old=None,
    ref=None,
    loss_type="dapo",
    level="token",
    epsilon=0.2,
    epsilon_high=None,
    delta=None,
    beta=0.0,
    kl_correction=False,
    sampler=None,
    num_items=None,
    max_len=None,
    sapo=(1.0, 1.05),
    temperature=1.0,
    logit_softcap=None,
    entropy_coef=0.0,
):
    """The GRPO family as TRL's ``GRPOTrainer`` writes it, over full ``[B, L, V]`` logits (the float64
    and ``jax.grad`` oracle): ``(loss, (kl, entropy, clip_low, clip_high, clip, ratio) means)``."""
    z = logits
    if logit_softcap is not None:
        z = logit_softcap * jnp.tanh(z / logit_softcap)
    ls = jax.nn.log_softmax(z / temperature, axis=-1)
    lp = jnp.take_along_axis(ls, labels[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(ls) * ls, axis=-1)
    m = mask.astype(lp.dtype)
    a = advantages if advantages.ndim == 2 else advantages[:, None]
    old_lp = jax.lax.stop_gradient(lp) if old is None else old
    log_ratio = lp - old_lp
    if level == "sequence":
        log_ratio = (jnp.sum(log_ratio * m, -1) / jnp.maximum(jnp.sum(m, -1), 1))[:, None]
    coef = jnp.exp(log_ratio)
    eh = epsilon if epsilon_high is None else epsilon_high
    if loss_type == "cispo":
        per_token = -jax.lax.stop_gradient(jnp.minimum(coef, eh)) * a * lp
        low, high = jnp.zeros_like(coef, bool), coef > eh
    elif loss_type == "sapo":
        tau = jnp.where(a > 0, sapo[0], sapo[1])
        per_token = -a * jax.nn.sigmoid(tau * (coef - 1)) * 4 / tau
        low, high = jnp.zeros_like(coef, bool), jnp.zeros_like(coef, bool)
    else:
        c1 = coef if delta is None else jnp.minimum(coef, delta)
        per_token = -jnp.minimum(c1 * a, jnp.clip(coef, 1 - epsilon, 1 + eh) * a)
        low, high = coef < 1 - epsilon, coef > 1 + eh
    if sampler is not None:
        per_token = per_token * (sampler if sampler.ndim == 2 else sampler[:, None])
    kl = jnp.full(lp.shape, jnp.nan, lp.dtype)
    if ref is not None:
        kl = jnp.exp(ref - lp) - (ref - lp) - 1
        if kl_correction:
            kl = kl * coef
        per_token = per_token + beta * kl
    per_token = jnp.broadcast_to(per_token, lp.shape)
    b, total = lp.shape[0], jnp.maximum(jnp.sum(m), 1)
    if loss_type in ("grpo", "sapo"):
        loss = jnp.mean(jnp.sum(per_token * m, -1) / jnp.maximum(jnp.sum(m, -1), 1))
    elif loss_type == "bnpo":
        loss = jnp.sum(per_token * m) / total
    elif loss_type == "dr_grpo":
        loss = jnp.sum(per_token * m) / (b * max_len)
    elif loss_type in ("dapo", "cispo"):
        loss = jnp.sum(per_token * m) / (total if num_items is None else max(num_items, 1))
    else:  # luspo: each completion's token sum, over B
        loss = jnp.sum(jnp.sum(per_token * m, -1)) / b
    # TRL 1.16 (GRPOTrainer._compute_loss): the entropy bonus is the token mean over the batch, subtracted
    # after the loss type's aggregation.
    loss = loss - entropy_coef * jnp.sum(ent * m) / total
    clip_low, clip_high = low & (a < 0), high & (a > 0)
    terms = (kl, ent, clip_low, clip_high, clip_low | clip_high, coef)
    means = tuple(jnp.sum(jnp.broadcast_to(x, lp.shape).astype(lp.dtype) * m) / total for x in terms)
    return loss, means


def naive_preference_loss(
    chosen_logits,
    rejected_logits,
    chosen_labels,
    rejected_labels,
    chosen_mask,
    rejected_mask,
    *,
    ref_chosen=None,
    ref_rejected=None,
    loss_type="sigmoid",
    beta=0.1,
    label_smoothing=0.0,
    gamma=0.5,
    nll_weight=0.0,
    discopop_tau=0.05,
    temperature=1.0,
):
    """DPO's family as TRL's ``DPOTrainer`` and Liger-Kernel's preference losses write them, over full
    ``[P, L, V]`` logits (the float64 and ``jax.grad`` oracle): ``(loss, chosen_rewards, rejected_rewards)``."""
    mean = loss_type in ("ipo", "simpo", "orpo")

    def seq(logits, labels, mask):
        mask = mask.astype(logits.dtype)
        ls = jax.nn.log_softmax(logits / temperature, axis=-1)
        tok = jnp.take_along_axis(ls, labels[..., None], axis=-1)[..., 0] * mask
        total = jnp.sum(tok, -1)
        return (total / jnp.sum(mask, -1) if mean else total), tok

    chosen_mask = chosen_mask.astype(chosen_logits.dtype)
    rejected_mask = rejected_mask.astype(rejected_logits.dtype)
    c, tok_c = seq(chosen_logits, chosen_labels, chosen_mask)
    r, _ = seq(rejected_logits, rejected_labels, rejected_mask)
    rc = 0.0 if ref_chosen is None else ref_chosen / (jnp.sum(chosen_mask, -1) if mean else 1)
    rr = 0.0 if ref_rejected is None else ref_rejected / (jnp.sum(rejected_mask, -1) if mean else 1)
    a, b = c - rc, r - rr
    z = beta * (a - b)
    ls, sig, eps = jax.nn.log_sigmoid, jax.nn.sigmoid, label_smoothing
    losses = {
        "sigmoid": lambda: -(1 - eps) * ls(z) - eps * ls(-z),
        "hinge": lambda: jnp.maximum(0, 1 - z),
        "robust": lambda: (-(1 - eps) * ls(z) + eps * ls(-z)) / (1 - 2 * eps),
        "exo_pair": lambda: sig(z) * (ls(z) - np.log1p(-eps)) + sig(-z) * (ls(-z) - np.log(eps)),
        "nca_pair": lambda: -ls(beta * a) - 0.5 * ls(-beta * a) - 0.5 * ls(-beta * b),
        "bco_pair": lambda: -ls(beta * a) - ls(-beta * b),
        "sppo_hard": lambda: (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2,
        "apo_zero": lambda: 1 - sig(beta * a) + sig(beta * b),
        "apo_down": lambda: sig(beta * a) + 1 - sig(z),
        "discopop": lambda: -ls(z) * (1 - sig(z / discopop_tau)) + jnp.exp(-z) * sig(z / discopop_tau),
        "ipo": lambda: (a - b - 1 / (2 * beta)) ** 2,
        "simpo": lambda: -(1 - eps) * ls(beta * (c - r) - gamma) - eps * ls(gamma - beta * (c - r)),
        "cpo": lambda: -(1 - eps) * ls(beta * (c - r)) - eps * ls(-beta * (c - r)),
        "orpo": lambda: -beta * ls((c - r) - (jnp.log1p(-jnp.exp(c)) - jnp.log1p(-jnp.exp(r)))),
    }
    loss = jnp.mean(losses[loss_type]())
    if nll_weight:
        loss = loss - nll_weight * jnp.sum(tok_c) / jnp.sum(chosen_mask)
    free = loss_type in ("simpo", "cpo", "orpo")
    return loss, beta * (c if free else a), beta * (r if free else b)
