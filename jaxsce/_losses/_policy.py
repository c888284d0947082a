r"""``policy_loss`` and ``linear_policy_loss``: the GRPO family of policy-optimization objectives.

B completions of length L; per token ``t`` of completion ``b``: the policy's
log-probability ``lp = log softmax(s)[y]`` with ``s = softcap(z) / T``, the
entropy ``H``, the mask ``m`` (the completion's tokens), the advantage ``A``,
the sampler's log-probability ``old`` (``lp`` itself, without a gradient,
when on-policy), a reference model's ``ref``. Then

* the ratio ``r = exp(lp - old)`` (``"token"``), or GSPO's ``r_b = exp(sum_t
  m (lp - old) / max(sum_t m, 1))`` per completion (``"sequence"``);
* the policy-gradient term ``pg``: ``-min(min(r, delta) A, clip(r, 1 - eps,
  1 + eps_high) A)`` (PPO's clipping; ``delta`` INTELLECT-2's cap, off by
  default), ``-sg(min(r, eps_high)) A lp`` for ``"cispo"``, ``-A (4 / tau)
  sigmoid(tau (r - 1))`` for ``"sapo"`` (``tau`` by the sign of ``A``);
  times the sampler's importance weight ``w_s`` where given;
* ``k3 = exp(ref - lp) - (ref - lp) - 1``, an estimate of ``KL(pi || ref)``
  (times the ratio ``r`` with ``kl_importance_correction``);
* the per-token loss ``l = pg w_s + beta k3``;
* the loss ``sum_{b,t} n_{b,t} m l - c sum_{b,t} m H / max(N, 1)``, where the
  weights ``n`` (the aggregation of ``loss_type``) depend on the masks only:
  ``1 / (B max(n_b, 1))`` (``"grpo"``, ``"sapo"``), ``1 / max(N, 1)``
  (``"bnpo"``), ``1 / (B L_max)`` (``"dr_grpo"``), ``1 / max(num_items_in_batch
  or N, 1)`` (``"dapo"``, ``"cispo"``), ``1 / B`` (``"luspo"``), with ``n_b`` a
  completion's counted tokens and ``N`` the batch's. The entropy bonus is the
  token mean of ``H`` over the batch whatever ``loss_type``, as TRL 1.16
  subtracts it.

Since the weights are known before the stream and a token's loss depends
on its own log-probability (or its completion's, at the sequence level),
each token's cotangent is known as soon as its log-probability is. The
loss is a token objective (:class:`Objective`, on the tier of
:mod:`jaxsce._tiers._tokens`): the fused loss forms the gradient in its forward
stream, from ``jax.vjp`` of the objective per token block (3 matmul
passes). Where that path does not apply (vocabulary sharding, a ``d_W``
larger than the memory budget, an explicit ``vocab_block``) the per-token
log-probabilities are streamed and JAX differentiates the same objective
(4 passes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast, overload

import jax
import jax.numpy as jnp
from jax import lax

from .._api import _auto, _front, _options
from .._api._inputs import check_class_ids, check_head, check_logit_labels
from .._base import _labels, _spmd, _typing, _validate
from .._engine import _stream
from .._engine._rowloss import Vocab
from .._engine._stream import DEFAULT_MEMORY_BUDGET
from .._tiers import _tokens

if TYPE_CHECKING:
    from .._base._typing import Unpack

AxisName = str | tuple[str, ...] | None
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo")
LEVELS = ("token", "sequence")
CLIPPED = ("grpo", "dapo", "dr_grpo", "bnpo", "luspo")


class PolicyAux(NamedTuple):
    """Metrics of a policy loss: means over the counted tokens (scalars, no gradient).

    Attributes:
      kl: the mean of ``k3`` (times the ratio with ``kl_importance_correction``),
        NaN without a reference.
      entropy: the mean entropy of the policy.
      clip_ratio_low: the fraction with ``r < 1 - epsilon`` and ``A < 0``.
      clip_ratio_high: the fraction with ``r > 1 + epsilon_high`` and ``A > 0``
        (``"cispo"``: ``r > epsilon_high`` and ``A > 0``).
      clip_ratio: the fraction in either region (0 for ``"sapo"``).
      ratio_mean: the mean ratio ``r`` (before ``delta``).
    """

    kl: jax.Array
    entropy: jax.Array
    clip_ratio_low: jax.Array
    clip_ratio_high: jax.Array
    clip_ratio: jax.Array
    ratio_mean: jax.Array


class PolicyConsts(NamedTuple):
    """The objective's traced options (0-d arrays; None where off)."""

    epsilon: Any
    epsilon_high: Any
    delta: Any = None
    beta: Any = None
    sapo_pos: Any = None
    sapo_neg: Any = None
    entropy_coef: Any = None


class TokenData(NamedTuple):
    """Per-token data of the objective, in the log-probabilities' shape (None where not given)."""

    mask: jax.Array
    weight: jax.Array  # the aggregation weight n of the module docstring (0 where not counted)
    advantages: jax.Array
    old: jax.Array | None = None
    ref: jax.Array | None = None
    sampler: jax.Array | None = None
    token_mean: jax.Array | None = None  # m / (counted tokens of the batch): the entropy bonus's weight


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective(_tokens.TokenObjective):
    """The policy objective: its static choices, and the per-token loss as a token objective."""

    loss_type: str
    level: str
    kl_correction: bool

    def __call__(self, lp, h, ref, d: TokenData, c: PolicyConsts):
        """``(n m l, metrics)`` per token for ``[g, k]`` arrays: ``g`` completions of ``k`` tokens.

        ``k`` is the whole completion at the sequence level; at the token level
        any grouping gives the same per-token values. ``h`` (the entropy) and
        ``ref`` (a streamed reference head's log-probabilities; else ``d.ref``)
        may be None. Masked tokens give exactly 0 with a zero gradient,
        whatever their data (NaN included). The metrics are the six per-token
        terms behind :class:`PolicyAux`, 0 where not counted.
        """
        m = d.mask
        ref = d.ref if ref is None else ref
        zero = jnp.zeros((), lp.dtype)
        lp = jnp.where(m, lp, zero)
        adv = jnp.where(m, d.advantages, zero)
        old = lax.stop_gradient(lp) if d.old is None else jnp.where(m, d.old, zero)
        log_ratio = lp - old
        if self.level == "sequence":
            count = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1).astype(lp.dtype)
            log_ratio = jnp.broadcast_to(jnp.sum(log_ratio, axis=-1, keepdims=True) / count, lp.shape)
        r = jnp.exp(log_ratio)
        false = jnp.zeros(lp.shape, bool)
        if self.loss_type == "cispo":
            pg = -lax.stop_gradient(jnp.minimum(r, c.epsilon_high)) * adv * lp
            low, high = false, r > c.epsilon_high
        elif self.loss_type == "sapo":
            tau = jnp.where(adv > 0, c.sapo_pos, c.sapo_neg)
            pg = -adv * (4 / tau) * jax.nn.sigmoid(tau * (r - 1))
            low, high = false, false
        else:
            lo, hi = 1 - c.epsilon, 1 + c.epsilon_high
            capped = r if c.delta is None else jnp.minimum(r, c.delta)
            pg = -jnp.minimum(capped * adv, jnp.clip(r, lo, hi) * adv)
            low, high = r < lo, r > hi
        if d.sampler is not None:
            pg = pg * jnp.where(m, d.sampler, zero)
        loss = pg
        kl = jnp.full(lp.shape, jnp.nan, lp.dtype)
        if ref is not None:
            x = jnp.where(m, ref, zero) - lp
            kl = jnp.exp(x) - x - 1
            if self.kl_correction:
                kl = kl * r
            if c.beta is not None:
                loss = loss + c.beta * kl
        value = d.weight * loss
        if c.entropy_coef is not None:
            # TRL 1.16: the bonus is c times the token mean of H over the batch, whatever loss_type.
            value = value - c.entropy_coef * d.token_mean * jnp.where(m, h, zero)
        # A counted token whose log-probability is NaN (a label out of range) makes the loss NaN, on every
        # backend: min and clip need not propagate NaN (XLA:CPU in jax 0.6 returns the other operand).
        value = jnp.where(m, jnp.where(jnp.isnan(lp), lp, value), zero)
        clip_low, clip_high = low & (adv < 0), high & (adv > 0)
        terms = (kl, h if h is not None else kl, clip_low, clip_high, clip_low | clip_high, r)
        metrics = tuple(jnp.where(m, lax.stop_gradient(x).astype(lp.dtype), zero) for x in terms)
        return value, metrics


# --- options and per-token data -----------------------------------------------------------

_BOUNDS = {
    "epsilon": (0.0, None, False),
    "epsilon_high": (0.0, None, False),
    "delta": (0.0, None, True),
    "beta": (0.0, None, False),
    "sapo_temperatures": (0.0, None, True),
    "entropy_coef": (None, None, False),
    "num_items_in_batch": (0.0, None, True),
}


def _float(value, name: str, *, off_when_zero: bool = False):
    return _options.float_option(value, name, off_when_zero=off_when_zero, bounds=_BOUNDS[name])


class Settings(NamedTuple):
    """The checked options: static ones by name, traced ones (the transform and the :class:`PolicyConsts`),
    and the normalizer's ``num_items_in_batch``."""

    static: dict
    consts: _tokens.TokenConsts
    num_items: Any


#: The options :func:`_settings` checks, shared by both public functions (by name).
SETTINGS = (
    "loss_type",
    "importance_sampling_level",
    "epsilon",
    "epsilon_high",
    "delta",
    "beta",
    "kl_importance_correction",
    "num_items_in_batch",
    "max_completion_length",
    "sapo_temperatures",
    "temperature",
    "logit_softcap",
    "entropy_coef",
    "return_aux",
    "axis_name",
    "batch_axis_name",
    "num_classes",
    "ignore_index",
    "batch_invariant",
)


def _settings(
    *,
    loss_type,
    importance_sampling_level,
    epsilon,
    epsilon_high,
    delta,
    beta,
    kl_importance_correction,
    num_items_in_batch,
    max_completion_length,
    sapo_temperatures,
    temperature,
    logit_softcap,
    entropy_coef,
    return_aux,
    axis_name,
    batch_axis_name,
    num_classes,
    ignore_index,
    batch_invariant,
    has_reference: bool,
) -> Settings:
    loss_type = _options.choice(loss_type, "loss_type", LOSS_TYPES)
    level = _options.choice(importance_sampling_level, "importance_sampling_level", LEVELS)
    if level == "sequence" and loss_type in ("cispo", "sapo"):
        raise ValueError(
            f"importance_sampling_level='sequence' is not defined for loss_type={loss_type!r} "
            "(its ratio is per token); use importance_sampling_level='token'."
        )
    max_len = max_completion_length
    if loss_type == "dr_grpo" and max_len is None:
        raise ValueError("loss_type='dr_grpo' divides by B * max_completion_length: pass max_completion_length.")
    if loss_type == "cispo" and epsilon_high is None:
        raise ValueError(
            "loss_type='cispo' caps the ratio at epsilon_high (CISPO's papers use values such as 4 or 5): "
            "pass epsilon_high."
        )
    if delta is not None and loss_type not in CLIPPED:
        raise ValueError(f"delta caps the ratio of the clipped objectives {CLIPPED}, not loss_type={loss_type!r}.")
    eps = _float(epsilon, "epsilon")
    if eps is None:
        raise TypeError("epsilon must be a real number >= 0, got None.")
    eps_high = eps if epsilon_high is None else _float(epsilon_high, "epsilon_high")
    beta_v = _float(beta, "beta", off_when_zero=True)
    if beta_v is not None and not has_reference:
        raise ValueError(
            "beta > 0 adds a KL penalty to a reference model: pass ref_log_probs (or, for linear_policy_loss, "
            "ref_hidden and ref_weight), or beta=0.0."
        )
    if not isinstance(sapo_temperatures, (tuple, list)) or len(sapo_temperatures) != 2:
        raise TypeError(f"sapo_temperatures must be a pair (positive, negative advantages), got {sapo_temperatures!r}.")
    pos, neg = (_float(t, "sapo_temperatures") for t in sapo_temperatures)
    sapo = loss_type == "sapo"
    consts = PolicyConsts(
        epsilon=eps,
        epsilon_high=eps_high,
        delta=None if delta is None else _float(delta, "delta"),
        beta=beta_v,
        sapo_pos=pos if sapo else None,
        sapo_neg=neg if sapo else None,
        entropy_coef=_float(entropy_coef, "entropy_coef", off_when_zero=True),
    )
    consts = _tokens.TokenConsts(_options.transform(logit_softcap, temperature), consts)
    num_items = None if num_items_in_batch is None else _float(num_items_in_batch, "num_items_in_batch")
    static = dict(
        objective=Objective(
            loss_type=loss_type,
            level=level,
            kl_correction=kl_importance_correction,
        ),
        max_completion_length=max_len,
        return_aux=return_aux,
        axis_name=axis_name,
        batch_axis_name=batch_axis_name,
        num_classes=num_classes,
        ignore_index=ignore_index,
        batch_invariant=batch_invariant,
    )
    return Settings(static, consts, num_items)


def _consts_in(tc: _tokens.TokenConsts, ct) -> _tokens.TokenConsts:
    """The traced options in the compute dtype, without gradients; NaN where a traced value is out of range."""

    def conv(name, x):
        return None if x is None else _options.traced_in_dtype(x, ct, _BOUNDS[name])

    c = tc.objective
    return _tokens.TokenConsts(
        _options.in_dtype(tc.transform, ct),
        PolicyConsts(
            epsilon=conv("epsilon", c.epsilon),
            epsilon_high=conv("epsilon_high", c.epsilon_high),
            delta=conv("delta", c.delta),
            beta=conv("beta", c.beta),
            sapo_pos=conv("sapo_temperatures", c.sapo_pos),
            sapo_neg=conv("sapo_temperatures", c.sapo_neg),
            entropy_coef=conv("entropy_coef", c.entropy_coef),
        ),
    )


def _per_token(x, name: str, shape: tuple[int, int], ct, *, per_completion: bool = False):
    """A floating ``[B, L]`` input (or ``[B]`` where ``per_completion``), as ``[B, L]`` constants in ``ct``."""
    if x is None:
        return None
    x = _validate.check_floating(x, name)
    if per_completion and x.shape == shape[:1]:
        x = jnp.broadcast_to(x[:, None], shape)
    if x.shape != shape:
        allowed = f"{shape[:1]} or {shape}" if per_completion else f"{shape}"
        raise ValueError(f"{name} has shape {x.shape} but must have shape {allowed} (B completions of length L).")
    return lax.stop_gradient(x.astype(ct))


def _psum(x, axes):
    return x if axes is None else lax.psum(x, axes)


def _token_data(obj: Objective, valid, batch_shape, data, num_items, max_len, batch_axis_name, ct):
    """The objective's :class:`TokenData` (``[B, L]``) from ``data = (advantages, old_log_probs,
    ref_log_probs, sampler_weights)``, and the global count of counted tokens."""
    advantages, old, ref, sampler = data
    mask = valid.reshape(batch_shape)
    m = mask.astype(ct)
    n_b = jnp.sum(m, axis=-1, keepdims=True)
    total = _psum(jnp.sum(m), batch_axis_name)
    b = _psum(jnp.asarray(batch_shape[0], ct), batch_axis_name)
    if obj.loss_type in ("grpo", "sapo"):
        weight = m / (jnp.maximum(n_b, 1) * b)
    elif obj.loss_type == "bnpo":
        weight = m / jnp.maximum(total, 1)
    elif obj.loss_type == "dr_grpo":
        weight = m / (b * max_len)
    elif obj.loss_type in ("dapo", "cispo"):
        if num_items is None:
            items = total
        else:
            items = lax.stop_gradient(jnp.asarray(num_items).astype(ct))
            items = jnp.where(items > 0, items, jnp.nan)  # a traced value out of range: NaN (a concrete one raises)
        weight = m / jnp.maximum(items, 1)
    else:  # luspo
        weight = m / b
    data = TokenData(
        mask,
        weight,
        cast(jax.Array, _per_token(advantages, "advantages", batch_shape, ct, per_completion=True)),
        _per_token(old, "old_log_probs", batch_shape, ct),
        _per_token(ref, "ref_log_probs", batch_shape, ct),
        _per_token(sampler, "sampler_weights", batch_shape, ct, per_completion=True),
        m / jnp.maximum(total, 1),
    )
    return data, total


def _share(obj: Objective, num_items, consts: _tokens.TokenConsts) -> bool:
    """Whether the loss is a plain sum over the given ``num_items_in_batch`` (a shard's share of it);
    not with an entropy bonus, a mean over the batch's tokens."""
    return obj.loss_type in ("dapo", "cispo") and num_items is not None and consts.objective.entropy_coef is None


def _finish(value_sum, metric_sums, total, return_aux: bool, has_reference: bool, batch_axis_name, share: bool):
    """The loss (summed over ``batch_axis_name``) and, with ``return_aux``, the :class:`PolicyAux`.

    ``share``: the loss is a sum over a given global normalizer (``num_items_in_batch``), so a shard's
    value is its share of the global loss (the ``psum`` idiom) and an unnamed batch axis is no error.
    """
    if not share:
        _spmd.check_batch_named(value_sum, batch_axis_name)
    loss = _psum(value_sum, batch_axis_name)
    if not return_aux:
        return loss
    sums = _psum(jnp.stack(metric_sums), batch_axis_name)
    means = sums / jnp.maximum(total, 1)
    if not has_reference:
        means = means.at[0].set(jnp.nan)
    return loss, PolicyAux(*means)


def _evaluate(
    objective: Objective,
    heads,
    valid,
    y,
    data,
    consts,
    num_items,
    ct,
    batch_shape,
    vocab,
    num_classes,
    *,
    max_completion_length,
    batch_axis_name,
    return_aux,
    invariant,
    reference=False,
    fused=None,
):
    """The loss's sum over the local tokens, the metrics' sums, and the global count of counted tokens."""
    consts = _consts_in(consts, ct)
    tokens, total = _token_data(
        objective, valid, batch_shape, data, num_items, max_completion_length, batch_axis_name, ct
    )
    group = batch_shape[1] if objective.level == "sequence" else 1
    value, metrics = _tokens.evaluate(
        dataclasses.replace(objective, group=group),
        heads,
        valid,
        y,
        jax.tree.map(lambda x: x.reshape(-1), tokens),
        consts,
        num_classes=num_classes,
        vocab=vocab,
        reference=reference,
        entropy=return_aux or consts.objective.entropy_coef is not None,
        fused=fused,
        n_metrics=6 if return_aux else 0,
        invariant=invariant,
    )
    return value, metrics, total


def _check_batch_shape(batch_shape, name: str, full_shape):
    _validate.check_two_axes(batch_shape, name, full_shape, "[B, L] (B completions of length L)")


# --- public functions ------------------------------------------------------------------------


@overload
def policy_loss(
    logits: jax.Array,
    labels: jax.Array,
    advantages: jax.Array,
    *,
    return_aux: Literal[False] = False,
    **options: Unpack[_typing.PolicyOptions],
) -> jax.Array: ...
@overload
def policy_loss(
    logits: jax.Array,
    labels: jax.Array,
    advantages: jax.Array,
    *,
    return_aux: Literal[True],
    **options: Unpack[_typing.PolicyOptions],
) -> tuple[jax.Array, PolicyAux]: ...
@overload
def policy_loss(
    logits: jax.Array,
    labels: jax.Array,
    advantages: jax.Array,
    *,
    return_aux: bool,
    **options: Unpack[_typing.PolicyOptions],
) -> jax.Array | tuple[jax.Array, PolicyAux]: ...
@_options.keyword_checked
@_auto.spmd(
    leading=True,
    logits=_auto.CLASSES,
    labels=_auto.ROWS,
    advantages=_auto.ROWS,
    where=_auto.ROWS,
    old_log_probs=_auto.ROWS,
    ref_log_probs=_auto.ROWS,
    sampler_weights=_auto.ROWS,
)
def policy_loss(
    logits: jax.Array,
    labels: jax.Array,
    advantages: jax.Array,
    *,
    where: jax.Array | None = None,
    old_log_probs: jax.Array | None = None,
    ref_log_probs: jax.Array | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon: float | jax.Array = 0.2,
    epsilon_high: float | jax.Array | None = None,
    delta: float | jax.Array | None = None,
    beta: float | jax.Array = 0.0,
    kl_importance_correction: bool = False,
    sampler_weights: jax.Array | None = None,
    num_items_in_batch: int | float | jax.Array | None = None,
    max_completion_length: int | None = None,
    sapo_temperatures: tuple[float | jax.Array, float | jax.Array] = (1.0, 1.05),
    temperature: float | jax.Array = 1.0,
    logit_softcap: float | jax.Array | None = None,
    entropy_coef: float | jax.Array = 0.0,
    return_aux: bool = False,
    axis: int | Sequence[int] = -1,
    axis_name: AxisName = None,
    batch_axis_name: AxisName = None,
    num_classes: int | None = None,
    ignore_index: int | None = -100,
    batch_invariant: bool = False,
) -> jax.Array | tuple[jax.Array, PolicyAux]:
    r"""Policy-optimization loss of the GRPO family (GRPO, DAPO, Dr. GRPO, BNPO, GSPO, CISPO, SAPO, LUSPO).

    For B sampled completions of length L, with :math:`\log\pi = \log
    \mathrm{softmax}(\mathrm{softcap}(z) / T)_y` per token, the ratio
    :math:`r = \exp(\log\pi - \log\pi_\mathrm{old})` (per token, or with
    ``importance_sampling_level="sequence"`` GSPO's
    :math:`\exp(\sum_t m (\log\pi - \log\pi_\mathrm{old}) / \max(\sum_t m, 1))`
    per completion) and advantages :math:`A`, the per-token loss is

    .. math::
        \ell = -\min\big(\min(r, \delta) A,\ \mathrm{clip}(r, 1-\epsilon, 1+\epsilon_h) A\big)\, w_s
        + \beta\, k_3, \qquad
        k_3 = e^{\log\pi_\mathrm{ref} - \log\pi} - (\log\pi_\mathrm{ref} - \log\pi) - 1,

    (``"cispo"``: :math:`-\mathrm{sg}(\min(r, \epsilon_h)) A \log\pi`;
    ``"sapo"``: :math:`-A\,(4/\tau)\,\sigma(\tau (r - 1))`), aggregated over
    the counted tokens (``where``) by ``loss_type``:

    * ``"grpo"``, ``"sapo"``: the mean over completions of each completion's token mean;
    * ``"bnpo"``: the token mean over the batch;
    * ``"dr_grpo"``: the sum over :math:`B \cdot` ``max_completion_length``;
    * ``"dapo"``, ``"cispo"``: the sum over ``num_items_in_batch`` (default:
      the counted tokens, over ``batch_axis_name`` too);
    * ``"luspo"``: the sum over B (each completion weighted by its length);

    then ``entropy_coef`` :math:`c` subtracts :math:`c` times the token mean of
    the entropy :math:`H` over the batch's counted tokens.

    These are the definitions of TRL's ``GRPOTrainer`` and Liger-Kernel's
    ``LigerFusedLinearGRPOLoss``, term for term (see the post-training
    guide for the mapping of their arguments and the few deliberate
    differences). Gradients flow to ``logits`` only, analytically through
    :func:`jaxsce.log_probs`; the advantages and every given log-probability
    are constants.

    Args:
      logits: floating ``[B, L, V]`` (the class axis ``axis``).
      labels: integer ``[B, L]``: the sampled tokens.
      advantages: floating ``[B]`` (per completion) or ``[B, L]``.
      where: boolean ``[B, L]``: the completion tokens; others give exactly 0
        (value and gradient), whatever their data.
      old_log_probs: ``[B, L]`` log-probabilities under the sampling policy;
        None: on-policy (:math:`\mathrm{sg}(\log\pi)`, so :math:`r = 1`).
      ref_log_probs: ``[B, L]`` log-probabilities of a reference model
        (needed for ``beta > 0``; ``aux.kl`` is reported when given).
      loss_type: one of ``"grpo"``, ``"dapo"``, ``"dr_grpo"``, ``"bnpo"``,
        ``"cispo"``, ``"sapo"``, ``"luspo"``.
      importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO; not
        for ``"cispo"``/``"sapo"``).
      epsilon: :math:`\epsilon \geq 0`, the lower clipping range.
      epsilon_high: :math:`\epsilon_h` (None: ``epsilon``); for ``"cispo"``
        the cap of the ratio itself, and required.
      delta: cap of the unclipped ratio (INTELLECT-2), clipped types only.
      beta: weight of the KL penalty, :math:`\geq 0`.
      kl_importance_correction: multiply :math:`k_3` by the (uncapped) ratio.
      sampler_weights: ``[B]`` or ``[B, L]`` importance weights :math:`w_s`
        of the trainer's over the sampler's policy (e.g. vLLM's truncated
        ratios), multiplying the policy-gradient term.
      num_items_in_batch: the normalizer of ``"dapo"``/``"cispo"``: the number
        of completion tokens in the whole optimizer step (all micro-batches
        and processes); may be traced.
      max_completion_length: L_max of ``"dr_grpo"`` (required there).
      sapo_temperatures: :math:`(\tau_+, \tau_-)` of ``"sapo"`` for
        :math:`A > 0` and :math:`A \leq 0`.
      temperature, logit_softcap: as in :func:`jaxsce.log_probs`.
      entropy_coef: :math:`c`, an entropy bonus: :math:`c` times the token mean
        of :math:`H` over the batch's counted tokens is subtracted, whatever
        ``loss_type`` (TRL 1.16's ``entropy_coef``).
      return_aux: also return a :class:`PolicyAux` of metrics.
      axis: the class axis of ``logits``.
      axis_name: mesh axis splitting the classes inside ``jax.shard_map``.
      batch_axis_name: mesh axes splitting the completions inside
        ``jax.shard_map``: the loss and its normalizers are global.
      num_classes: the number of real classes when the class axis is padded,
        as in :func:`jaxsce.log_probs`.
      ignore_index: tokens whose label equals it are not counted (as
        ``where=False``); default -100 (TRL's and PyTorch's); None: off.
      batch_invariant: every token's log-probability (and entropy) is
        bitwise the same whatever the batch it is computed in, as in
        :func:`jaxsce.log_probs`.

    All float options may be traced (a schedule compiles once); a traced
    value out of range makes the loss NaN.

    Returns:
      The scalar loss (float32; float64 for float64 logits), and with
      ``return_aux`` a :class:`PolicyAux`.

    Raises:
      TypeError: non-floating logits or data, non-integer labels, a traced static option.
      ValueError: shapes that do not fit (named), an option out of range or
        a combination that is not defined (named).

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> z = jnp.zeros((2, 3, 4))  # uniform over 4 tokens
      >>> y = jnp.zeros((2, 3), jnp.int32)
      >>> loss = jaxsce.policy_loss(z, y, jnp.array([1.0, -1.0]))  # on-policy: r = 1
      >>> print(f"{loss:.4f}")  # -(3 * 1 + 3 * -1) / 6
      0.0000
    """
    options = locals()
    _labels.check_host_labels(labels)
    st = _settings(**{k: v for k, v in options.items() if k in SETTINGS}, has_reference=ref_log_probs is not None)
    data = (advantages, old_log_probs, ref_log_probs, sampler_weights)
    axis = axis
    return _policy_loss(logits, labels, where, data, st.consts, st.num_items, axis=axis, **st.static)


@_front.implementation
def _policy_loss(
    logits,
    labels,
    where,
    data,
    consts,
    num_items,
    *,
    objective,
    max_completion_length,
    return_aux,
    axis,
    axis_name,
    batch_axis_name,
    num_classes,
    ignore_index,
    batch_invariant,
):
    logits = _validate.check_floating(logits, "logits")
    z, batch_shape, _ = _validate.class_rows(logits, axis, "logits")
    _check_batch_shape(batch_shape, "logits", logits.shape)
    labels = check_logit_labels(labels, logits, axis, batch_shape)
    _spmd.check_split_axes("logits", logits, labels, "labels", axis_name, batch_axis_name)
    n, local_classes = z.shape
    num_classes, padding = _options.class_count(num_classes, local_classes, axis_name, "the logits' class axis")
    valid = _front.counted(where, batch_shape, "[B, L]: logits.shape without axis")
    y, valid = _labels.label_validity(labels.reshape(n), num_classes, valid, ignore_index, False)
    ct = _validate.compute_dtype(z.dtype)
    value, metrics, total = _evaluate(
        objective, (z,), valid, y, data, consts, num_items, ct, batch_shape, Vocab.of(axis_name, padding), num_classes,
        max_completion_length=max_completion_length, batch_axis_name=batch_axis_name, return_aux=return_aux,
        invariant=batch_invariant,
    )  # fmt: skip
    share = _share(objective, num_items, consts)
    return _finish(value, metrics, total, return_aux, data[2] is not None, batch_axis_name, share)


@overload
def linear_policy_loss(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    advantages: jax.Array,
    *,
    return_aux: Literal[False] = False,
    **options: Unpack[_typing.LinearPolicyOptions],
) -> jax.Array: ...
@overload
def linear_policy_loss(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    advantages: jax.Array,
    *,
    return_aux: Literal[True],
    **options: Unpack[_typing.LinearPolicyOptions],
) -> tuple[jax.Array, PolicyAux]: ...
@overload
def linear_policy_loss(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    advantages: jax.Array,
    *,
    return_aux: bool,
    **options: Unpack[_typing.LinearPolicyOptions],
) -> jax.Array | tuple[jax.Array, PolicyAux]: ...
@_options.keyword_checked
@_auto.spmd(
    leading=True,
    hidden=_auto.HIDDEN,
    linear_weight=_auto.weight("weight_layout"),
    labels=_auto.ROWS,
    advantages=_auto.ROWS,
    linear_bias=_auto.VOCAB,
    ref_hidden=_auto.HIDDEN,
    ref_weight=_auto.weight("weight_layout"),
    ref_bias=_auto.VOCAB,
    where=_auto.ROWS,
    old_log_probs=_auto.ROWS,
    ref_log_probs=_auto.ROWS,
    sampler_weights=_auto.ROWS,
)
def linear_policy_loss(
    hidden: jax.Array,
    linear_weight: jax.Array,
    labels: jax.Array,
    advantages: jax.Array,
    *,
    linear_bias: jax.Array | None = None,
    weight_layout: str = "dv",
    ref_hidden: jax.Array | None = None,
    ref_weight: jax.Array | None = None,
    ref_bias: jax.Array | None = None,
    where: jax.Array | None = None,
    old_log_probs: jax.Array | None = None,
    ref_log_probs: jax.Array | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon: float | jax.Array = 0.2,
    epsilon_high: float | jax.Array | None = None,
    delta: float | jax.Array | None = None,
    beta: float | jax.Array = 0.0,
    kl_importance_correction: bool = False,
    sampler_weights: jax.Array | None = None,
    num_items_in_batch: int | float | jax.Array | None = None,
    max_completion_length: int | None = None,
    sapo_temperatures: tuple[float | jax.Array, float | jax.Array] = (1.0, 1.05),
    temperature: float | jax.Array = 1.0,
    logit_softcap: float | jax.Array | None = None,
    entropy_coef: float | jax.Array = 0.0,
    return_aux: bool = False,
    token_block: int | None = None,
    vocab_block: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    axis_name: AxisName = None,
    batch_axis_name: AxisName = None,
    num_classes: int | None = None,
    ignore_index: int | None = -100,
    batch_invariant: bool = False,
) -> jax.Array | tuple[jax.Array, PolicyAux]:
    r"""Fused :func:`jaxsce.policy_loss` of ``hidden @ linear_weight + linear_bias`` that never builds the logits.

    The same loss, metrics and gradients as :func:`jaxsce.policy_loss` of
    the logits :math:`z = h W + b`, from ``[token_block, V]`` or
    ``[token_block, vocab_block]`` blocks of them. With ``ref_hidden`` and
    ``ref_weight`` (and ``ref_bias``) a reference model's log-probabilities
    are read from its own head in the same stream (with the policy's
    ``weight_layout``, temperature and soft cap), never materialized.

    Paths: when the float32 ``d_W`` fits ``memory_budget`` (and there is no
    ``axis_name`` or ``vocab_block``), each token's cotangent is formed as
    soon as its log-probability is, and the gradient in the forward stream:
    3 matmul passes over the policy's head (plus one over the reference
    head). At the sequence level the token blocks then hold whole
    completions (a multiple of L tokens; if L tokens do not fit the budget,
    the streaming path is taken). Otherwise the log-probabilities are
    streamed in vocabulary blocks and the backward recomputes them: 4
    passes.

    Args:
      hidden: ``[B, L, d]`` floating (float32, bfloat16, float16).
      linear_weight: ``[d, V]`` (``weight_layout="dv"``) or ``[V, d]`` (``"vd"``).
      labels: integer ``[B, L]``, the sampled tokens.
      advantages: ``[B]`` or ``[B, L]``.
      linear_bias: optional ``[V]``.
      weight_layout: ``"dv"`` or ``"vd"`` (for the reference head too).
      ref_hidden: ``[B, L, d_ref]``, the reference model's hidden states.
      ref_weight: the reference model's head, ``[d_ref, V]`` or ``[V, d_ref]``.
      ref_bias: optional ``[V]``.
      where: and every option from ``old_log_probs`` to ``return_aux``,
        ``batch_axis_name``, ``num_classes`` and ``ignore_index``: as in :func:`jaxsce.policy_loss`
        (``ref_log_probs`` or the reference head, not both).
      token_block, vocab_block, memory_budget: as in :func:`jaxsce.linear_cross_entropy`.
      axis_name: mesh axis splitting the vocabulary of the heads inside ``jax.shard_map``.
      batch_invariant: every token's log-probability (and entropy and
        reference log-probability) is bitwise the same whatever the batch
        it is computed in, as in :func:`jaxsce.linear_log_probs`; the
        streaming path with fixed blocks is taken (4 matmul passes).

    Returns:
      As :func:`jaxsce.policy_loss`. Gradients flow to ``hidden``,
      ``linear_weight`` and ``linear_bias`` in their dtypes; the reference
      head is a constant.

    Raises:
      TypeError, ValueError: as :func:`jaxsce.policy_loss` and
      :func:`jaxsce.linear_cross_entropy`, naming the argument.

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> h = jnp.ones((2, 3, 8))
      >>> w = jnp.zeros((8, 100))  # uniform: log p = -log 100
      >>> y = jnp.zeros((2, 3), jnp.int32)
      >>> old = jnp.full((2, 3), -jnp.log(100.0)) - 0.5  # r = e^0.5 > 1.2: clipped where A > 0
      >>> loss, aux = jaxsce.linear_policy_loss(h, w, y, jnp.array([1.0, -1.0]), old_log_probs=old, return_aux=True)
      >>> print(f"{loss:.4f} {aux.clip_ratio:.2f} {aux.ratio_mean:.4f}")  # -(1.2 * 3 - 1.6487 * 3) / 6
      0.2244 0.50 1.6487
    """
    options = locals()
    _labels.check_host_labels(labels)
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("A reference head needs both ref_hidden and ref_weight (and optionally ref_bias).")
    if ref_hidden is None and ref_bias is not None:
        raise ValueError("ref_bias was given without ref_hidden and ref_weight.")
    if ref_hidden is not None and ref_log_probs is not None:
        raise ValueError("Pass either ref_log_probs or the reference head (ref_hidden, ref_weight), not both.")
    st = _settings(
        **{k: v for k, v in options.items() if k in SETTINGS},
        has_reference=ref_log_probs is not None or ref_hidden is not None,
    )
    fused = _options.fused(
        weight_layout=weight_layout, token_block=token_block, vocab_block=vocab_block, memory_budget=memory_budget
    )
    heads = (hidden, linear_weight, linear_bias, ref_hidden, ref_weight, ref_bias)
    data = (advantages, old_log_probs, ref_log_probs, sampler_weights)
    return _linear_policy_loss(heads, labels, where, data, st.consts, st.num_items, **fused, **st.static)


@_front.implementation
def _linear_policy_loss(
    heads,
    labels,
    where,
    data,
    consts,
    num_items,
    *,
    objective,
    max_completion_length,
    return_aux,
    weight_layout,
    token_block,
    vocab_block,
    memory_budget,
    axis_name,
    batch_axis_name,
    num_classes,
    ignore_index,
    batch_invariant,
):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = heads
    head, v_local = check_head(hidden, weight, bias, weight_layout)
    batch_shape = hidden.shape[:-1]
    _check_batch_shape(batch_shape, "hidden", hidden.shape)
    labels = check_class_ids(labels, batch_shape, hidden.shape)
    _spmd.check_split_axes("linear_weight", weight, labels, "labels", axis_name, batch_axis_name)
    all_heads: tuple[_stream.Head, ...] = (head,)
    reference = ref_hidden is not None
    if reference:
        ref_head, v_ref = check_head(ref_hidden, ref_weight, ref_bias, weight_layout, prefix="ref_", linear="")
        if ref_hidden.shape[:-1] != batch_shape:
            raise ValueError(
                f"ref_hidden has shape {ref_hidden.shape} but must have hidden's batch shape {batch_shape}."
            )
        if v_ref != v_local:
            raise ValueError(
                f"ref_weight of shape {ref_weight.shape} has {v_ref} classes but linear_weight of shape "
                f"{weight.shape} has {v_local} (weight_layout={weight_layout!r})."
            )
        _spmd.check_split_axes("ref_weight", ref_weight, labels, "labels", axis_name, batch_axis_name)
        ref_head = _stream.Head(*(None if x is None else lax.stop_gradient(x) for x in ref_head))  # type: ignore[arg-type]
        all_heads = (head, ref_head)
    n = head.hidden.shape[0]
    num_classes, padding = _options.class_count(num_classes, v_local, axis_name, "linear_weight's vocabulary")
    valid = _front.counted(where, batch_shape, "hidden.shape[:-1]")
    y, valid = _labels.label_validity(labels.reshape(n), num_classes, valid, ignore_index, False)
    ct = _stream.acc_dtype(*(x for hd in all_heads for x in hd))
    fused = dict(
        layouts=(weight_layout,) * len(all_heads),
        token_block=token_block,
        vocab_block=vocab_block,
        memory_budget=memory_budget,
    )
    vocab = Vocab.of(axis_name, padding)
    value, metrics, total = _evaluate(
        objective, all_heads, valid, y, data, consts, num_items, ct, batch_shape, vocab, num_classes,
        max_completion_length=max_completion_length, batch_axis_name=batch_axis_name, return_aux=return_aux,
        invariant=batch_invariant, reference=reference, fused=fused,
    )  # fmt: skip
    has_reference = reference or data[2] is not None
    share = _share(objective, num_items, consts)
    return _finish(value, metrics, total, return_aux, has_reference, batch_axis_name, share)
