r"""``preference_loss`` and ``linear_preference_loss``: DPO and its family, IPO, SimPO, CPO and ORPO.

P pairs of a chosen and a rejected completion, each of length L. Per
sequence, the policy's log-probability ``c`` (chosen) or ``r`` (rejected):
the sum over its counted tokens of ``log softmax(s)[y]`` (``s = softcap(z) /
T``), or their mean for ``"ipo"``, ``"simpo"`` and ``"orpo"``; a reference
model's ``rc``, ``rr`` alike (0 when absent). With ``a = c - rc``, ``b = r -
rr`` and ``z = beta (a - b)``, each pair's loss ``l`` is that of
``loss_type`` (:data:`FORMULAS`), and

    loss = sum_pairs l / P  +  nll_weight * (-sum of the chosen tokens' log p) / N_chosen,

with ``P`` the counted pairs and ``N_chosen`` the counted chosen tokens of
the whole batch (over ``batch_axis_name`` too).

The weights that spread a pair's loss over its tokens depend on the masks
only, so each token's cotangent is known as soon as its pair's
log-probabilities are: the fused loss forms the gradient in its forward
stream (the engine's single-pass path, token blocks of whole pairs, 3
matmul passes), from ``jax.vjp`` of the token objective (:class:`Objective`) per block.
Elsewhere (vocabulary sharding, a ``d_W`` beyond the memory budget, an
explicit ``vocab_block``, ``return_aux``) the per-token log-probabilities
are streamed and JAX differentiates the same objective (4 passes).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, overload

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
from .._tiers._tokens import LogProbRows

if TYPE_CHECKING:
    from .._base._typing import Unpack

AxisName = str | tuple[str, ...] | None

#: Liger-Kernel 0.8.5's DPO loss types, then TRL's IPO, SimPO, CPO and ORPO.
DPO_TYPES = (
    "sigmoid",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
)
LOSS_TYPES = DPO_TYPES + ("ipo", "simpo", "cpo", "orpo")
#: Types whose sequence log-probabilities are token means (else sums).
MEAN_TYPES = ("ipo", "simpo", "orpo")
#: Reference-free types.
NO_REFERENCE = ("simpo", "cpo", "orpo")
#: Types that use ``label_smoothing``.
SMOOTHED = ("sigmoid", "robust", "exo_pair", "simpo", "cpo")

#: Each pair's loss, with ``ls = logsigmoid``, ``eps = label_smoothing``, ``tau = discopop_tau``.
FORMULAS = {
    "sigmoid": "-(1 - eps) ls(z) - eps ls(-z)",
    "hinge": "relu(1 - z)",
    "robust": "(-(1 - eps) ls(z) + eps ls(-z)) / (1 - 2 eps)",
    "exo_pair": "sigmoid(z) (ls(z) - log(1 - eps)) + sigmoid(-z) (ls(-z) - log eps)",
    "nca_pair": "-ls(beta a) - ls(-beta a) / 2 - ls(-beta b) / 2",
    "bco_pair": "-ls(beta a) - ls(-beta b)",
    "sppo_hard": "(a - 1 / (2 beta))^2 + (b + 1 / (2 beta))^2",
    "apo_zero": "1 - sigmoid(beta a) + sigmoid(beta b)",
    "apo_down": "sigmoid(beta a) + 1 - sigmoid(z)",
    "discopop": "-ls(z) (1 - sigmoid(z / tau)) + exp(-z) sigmoid(z / tau)",
    "ipo": "(a - b - 1 / (2 beta))^2",
    "simpo": "-(1 - eps) ls(beta (c - r) - gamma) - eps ls(gamma - beta (c - r))",
    "cpo": "-(1 - eps) ls(beta (c - r)) - eps ls(-beta (c - r))",
    "orpo": "-beta ls((c - r) - (log(1 - e^c) - log(1 - e^r)))",
}


class PreferenceAux(NamedTuple):
    """Metrics of a preference loss (no gradient).

    Attributes:
      chosen_rewards: ``[P]``: ``beta a`` (``beta c`` for the reference-free
        types), 0 for pairs that are not counted.
      rejected_rewards: ``[P]``: ``beta b`` (``beta r``).
      reward_margin: the mean of ``chosen_rewards - rejected_rewards`` over the counted pairs.
      reward_accuracy: the fraction of counted pairs with ``chosen_rewards > rejected_rewards``.
      chosen_log_probs: ``[P]``: the policy's ``c`` (a sum or a mean, as the loss uses it).
      rejected_log_probs: ``[P]``: the policy's ``r``.
    """

    chosen_rewards: jax.Array
    rejected_rewards: jax.Array
    reward_margin: jax.Array
    reward_accuracy: jax.Array
    chosen_log_probs: jax.Array
    rejected_log_probs: jax.Array


class PreferenceConsts(NamedTuple):
    """The objective's traced options (0-d arrays; None where off)."""

    beta: Any
    label_smoothing: Any = None
    gamma: Any = None
    nll_weight: Any = None
    discopop_tau: Any = None


class PairData(NamedTuple):
    """Per-token data in the pairs' shape ``[P, 2, L]`` (chosen, rejected)."""

    mask: jax.Array
    weight: jax.Array  # mask / (n_pair P): spreads a pair's loss over its counted tokens
    nll: jax.Array  # chosen mask / N_chosen
    ref_seq: jax.Array | None = None  # given per-sequence reference sums, broadcast over L


def _sequence(x, m, mean: bool):
    """Per-sequence sums (or means; 0 / 0 is NaN) of ``x [..., 2, L]`` over the mask ``m``."""
    s = jnp.sum(jnp.where(m, x, 0), axis=-1)
    return s / jnp.sum(m, axis=-1).astype(s.dtype) if mean else s


def pair_losses(loss_type: str, c, r, rc, rr, k: PreferenceConsts):
    """``(l, chosen_rewards, rejected_rewards)`` per pair from the sequence log-probabilities."""
    ls, sig = jax.nn.log_sigmoid, jax.nn.sigmoid
    beta = k.beta
    eps = 0.0 if k.label_smoothing is None else k.label_smoothing
    a, b = c - rc, r - rr
    z = beta * (a - b)
    if loss_type in NO_REFERENCE:
        rewards = (beta * c, beta * r)
        if loss_type == "orpo":
            log_odds = (c - r) - (jnp.log1p(-jnp.exp(c)) - jnp.log1p(-jnp.exp(r)))
            return -beta * ls(log_odds), *rewards
        margin = beta * (c - r) - (k.gamma if loss_type == "simpo" else 0)
        return -(1 - eps) * ls(margin) - eps * ls(-margin), *rewards
    if loss_type == "sigmoid":
        loss = -(1 - eps) * ls(z) - eps * ls(-z)
    elif loss_type == "hinge":
        loss = jax.nn.relu(1 - z)
    elif loss_type == "robust":
        loss = (-(1 - eps) * ls(z) + eps * ls(-z)) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        loss = sig(z) * (ls(z) - jnp.log1p(-eps)) + sig(-z) * (ls(-z) - jnp.log(eps))
    elif loss_type == "nca_pair":
        loss = -ls(beta * a) - 0.5 * ls(-beta * a) - 0.5 * ls(-beta * b)
    elif loss_type == "bco_pair":
        loss = -ls(beta * a) - ls(-beta * b)
    elif loss_type == "sppo_hard":
        loss = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        loss = 1 - sig(beta * a) + sig(beta * b)
    elif loss_type == "apo_down":
        loss = sig(beta * a) + 1 - sig(z)
    elif loss_type == "discopop":
        mix = sig(z / k.discopop_tau)
        loss = -ls(z) * (1 - mix) + jnp.exp(-z) * mix
    else:  # ipo
        loss = (a - b - 0.5 / beta) ** 2
    return loss, beta * a, beta * b


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective(_tokens.TokenObjective):
    """The preference objective over pairs of completions of length ``length``, as a token objective."""

    loss_type: str
    length: int
    summed_metrics: bool = False  # per-pair rewards and sequence log-probabilities

    def shape(self, tokens: int) -> tuple[int, ...]:
        return (tokens // (2 * self.length), 2, self.length)

    def __call__(self, lp, h, ref, d: PairData, k: PreferenceConsts):
        """``(per-token values, (chosen_rewards, rejected_rewards, c, r))`` for ``[g, 2, L]`` log-probabilities.

        The values sum to the loss: each pair's ``l`` spread over its counted
        tokens (``d.weight``), plus the NLL term on the chosen tokens. ``ref``:
        the reference's per-token log-probabilities (a streamed head), or None
        (then ``d.ref_seq``, or 0). Masked tokens give exactly 0 with a zero
        gradient, whatever their data.
        """
        m = d.mask
        zero = jnp.zeros((), lp.dtype)
        lp = jnp.where(m, lp, zero)
        mean = self.loss_type in MEAN_TYPES
        seq = _sequence(lp, m, mean)
        if ref is not None:
            ref_seq = _sequence(ref, m, mean)
        elif d.ref_seq is not None:
            ref_seq = d.ref_seq[..., 0]
            if mean:
                ref_seq = ref_seq / jnp.sum(m, axis=-1).astype(ref_seq.dtype)
        else:
            ref_seq = jnp.zeros_like(seq)
        loss, chosen_rewards, rejected_rewards = pair_losses(
            self.loss_type, seq[..., 0], seq[..., 1], ref_seq[..., 0], ref_seq[..., 1], k
        )
        counted = jnp.any(m, axis=(-2, -1))
        loss = jnp.where(counted, loss, zero)
        value = d.weight * loss[..., None, None]
        if k.nll_weight is not None:
            value = value - k.nll_weight * d.nll * lp
        value = jnp.where(m, value, zero)
        metrics = tuple(
            jnp.where(counted, lax.stop_gradient(x), zero)
            for x in (chosen_rewards, rejected_rewards, seq[..., 0], seq[..., 1])
        )
        return value, metrics


# --- options and per-pair data ---------------------------------------------------------------

_BOUNDS = {
    "beta": (0.0, None, True),
    "label_smoothing": (0.0, 1.0, False),
    "gamma": (None, None, False),
    "nll_weight": (0.0, None, False),
    "discopop_tau": (0.0, None, True),
}


def _float(value, name: str, *, off_when_zero: bool = False):
    return _options.float_option(value, name, off_when_zero=off_when_zero, bounds=_BOUNDS[name])


def _settings(loss_type, beta, label_smoothing, gamma, nll_weight, discopop_tau, temperature, logit_softcap, has_ref):
    loss_type = _options.choice(loss_type, "loss_type", LOSS_TYPES)
    if has_ref and loss_type in NO_REFERENCE:
        raise ValueError(f"loss_type={loss_type!r} is reference-free: pass no reference log-probabilities or head.")
    eps = _float(label_smoothing, "label_smoothing", off_when_zero=True)
    if eps is not None and loss_type not in SMOOTHED:
        raise ValueError(
            f"loss_type={loss_type!r} does not use label_smoothing (the types that do: {SMOOTHED}); "
            "pass label_smoothing=0.0."
        )
    concrete = eps is not None and not _validate.is_tracer(label_smoothing)
    if loss_type == "exo_pair" and (eps is None or (concrete and float(label_smoothing) >= 1)):
        raise ValueError("loss_type='exo_pair' needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3).")
    if loss_type == "robust" and concrete and float(label_smoothing) >= 0.5:
        raise ValueError(f"loss_type='robust' needs label_smoothing < 0.5, got {float(label_smoothing)}.")
    beta_v = _float(beta, "beta")
    if beta_v is None:
        raise TypeError("beta must be a positive real number, got None.")
    return loss_type, _tokens.TokenConsts(
        _options.transform(logit_softcap, temperature),
        PreferenceConsts(
            beta=beta_v,
            label_smoothing=eps,
            gamma=_float(gamma, "gamma") if loss_type == "simpo" else None,
            nll_weight=_float(nll_weight, "nll_weight", off_when_zero=True),
            discopop_tau=_float(discopop_tau, "discopop_tau") if loss_type == "discopop" else None,
        ),
    )


def _consts_in(tc: _tokens.TokenConsts, ct, loss_type: str) -> _tokens.TokenConsts:
    """The traced options in the compute dtype; NaN where a traced value is out of range."""

    def conv(name, x):
        return None if x is None else _options.traced_in_dtype(x, ct, _BOUNDS[name])

    fields = {n: conv(n, getattr(tc.objective, n)) for n in PreferenceConsts._fields}
    eps = fields["label_smoothing"]
    if eps is not None and loss_type == "robust":
        fields["label_smoothing"] = jnp.where(eps < 0.5, eps, jnp.nan)
    if eps is not None and loss_type == "exo_pair":
        fields["label_smoothing"] = jnp.where((eps > 0) & (eps < 1), eps, jnp.nan)
    return _tokens.TokenConsts(_options.in_dtype(tc.transform, ct), PreferenceConsts(**fields))


def _psum(x, axes):
    return x if axes is None else lax.psum(x, axes)


def _pair_data(mask, refs, batch_axis_name, ct) -> tuple[PairData, jax.Array]:
    """The objective's :class:`PairData` from the ``[P, 2, L]`` mask and the given reference sums,
    and the global number of counted pairs."""
    p, _, length = mask.shape
    m = mask.astype(ct)
    n_pair = jnp.sum(m, axis=(1, 2), keepdims=True)
    pairs = _psum(jnp.sum(n_pair > 0).astype(ct), batch_axis_name)
    chosen = m.at[:, 1].set(0)
    n_chosen = _psum(jnp.sum(chosen), batch_axis_name)
    ref_seq = None
    if any(x is not None for x in refs):
        sums = []
        for name, x in zip(("ref_chosen_log_probs", "ref_rejected_log_probs"), refs):
            if x is None:
                raise ValueError("Pass both ref_chosen_log_probs and ref_rejected_log_probs, or neither.")
            x = _validate.check_floating(x, name)
            if x.shape != (p,):
                raise ValueError(f"{name} has shape {x.shape} but must have shape ({p},): one sum per pair.")
            sums.append(lax.stop_gradient(x.astype(ct)))
        ref_seq = jnp.broadcast_to(jnp.stack(sums, axis=1)[..., None], (p, 2, length))
    weight = m / (jnp.maximum(n_pair, 1) * jnp.maximum(pairs, 1))
    return PairData(mask, weight, chosen / jnp.maximum(n_chosen, 1), ref_seq), pairs


def _finish(value_sum, metrics, pairs, return_aux: bool, batch_axis_name):
    _spmd.check_batch_named(value_sum, batch_axis_name)
    loss = _psum(value_sum, batch_axis_name)
    if not return_aux:
        return loss
    chosen_rewards, rejected_rewards, c, r = metrics
    margin = _psum(jnp.sum(chosen_rewards - rejected_rewards), batch_axis_name) / jnp.maximum(pairs, 1)
    wins = jnp.sum((chosen_rewards > rejected_rewards).astype(loss.dtype))
    accuracy = _psum(wins, batch_axis_name) / jnp.maximum(pairs, 1)
    return loss, PreferenceAux(chosen_rewards, rejected_rewards, margin, accuracy, c, r)


def _pair_mask(wheres, labels_pair, ignore_index, shape):
    """The ``[P, 2, L]`` mask of counted tokens: ``*_where`` and, with ``ignore_index``, the labels."""
    masks = []
    for name, where, labels in zip(("chosen_where", "rejected_where"), wheres, labels_pair):
        m = _front.counted(where, shape, f"[P, L], the {name.split('_')[0]} labels' shape", name).reshape(shape)
        if ignore_index is not None:
            m = m & (labels != ignore_index)
        masks.append(m)
    return jnp.stack(masks, axis=1)


def _check_pairs(shape, name: str, full_shape):
    _validate.check_two_axes(shape, name, full_shape, "[P, L] (P pairs of length L)")


# --- public functions ------------------------------------------------------------------------


@overload
def preference_loss(
    chosen_logits: jax.Array,
    rejected_logits: jax.Array,
    chosen_labels: jax.Array,
    rejected_labels: jax.Array,
    *,
    return_aux: Literal[False] = False,
    **options: Unpack[_typing.PreferenceOptions],
) -> jax.Array: ...
@overload
def preference_loss(
    chosen_logits: jax.Array,
    rejected_logits: jax.Array,
    chosen_labels: jax.Array,
    rejected_labels: jax.Array,
    *,
    return_aux: Literal[True],
    **options: Unpack[_typing.PreferenceOptions],
) -> tuple[jax.Array, PreferenceAux]: ...
@overload
def preference_loss(
    chosen_logits: jax.Array,
    rejected_logits: jax.Array,
    chosen_labels: jax.Array,
    rejected_labels: jax.Array,
    *,
    return_aux: bool,
    **options: Unpack[_typing.PreferenceOptions],
) -> jax.Array | tuple[jax.Array, PreferenceAux]: ...
@_options.keyword_checked
@_auto.spmd(
    leading=True,
    chosen_logits=_auto.CLASSES,
    rejected_logits=_auto.CLASSES,
    chosen_labels=_auto.ROWS,
    rejected_labels=_auto.ROWS,
    chosen_where=_auto.ROWS,
    rejected_where=_auto.ROWS,
    ref_chosen_log_probs=_auto.ROWS,
    ref_rejected_log_probs=_auto.ROWS,
)
def preference_loss(
    chosen_logits: jax.Array,
    rejected_logits: jax.Array,
    chosen_labels: jax.Array,
    rejected_labels: jax.Array,
    *,
    chosen_where: jax.Array | None = None,
    rejected_where: jax.Array | None = None,
    ref_chosen_log_probs: jax.Array | None = None,
    ref_rejected_log_probs: jax.Array | None = None,
    loss_type: str = "sigmoid",
    beta: float | jax.Array = 0.1,
    label_smoothing: float | jax.Array = 0.0,
    gamma: float | jax.Array = 0.5,
    nll_weight: float | jax.Array = 0.0,
    discopop_tau: float | jax.Array = 0.05,
    temperature: float | jax.Array = 1.0,
    logit_softcap: float | jax.Array | None = None,
    ignore_index: int | None = -100,
    return_aux: bool = False,
    axis_name: AxisName = None,
    batch_axis_name: AxisName = None,
    num_classes: int | None = None,
) -> jax.Array | tuple[jax.Array, PreferenceAux]:
    r"""Preference-optimization loss over pairs of completions (DPO and its variants, IPO, SimPO, CPO, ORPO).

    For pair :math:`i`, the policy's sequence log-probabilities :math:`c_i`
    (chosen) and :math:`r_i` (rejected) are sums of
    :math:`\log \mathrm{softmax}(s)_y` over the counted tokens, :math:`s =
    \mathrm{softcap}(z) / T` (token means for ``"ipo"``, ``"simpo"``,
    ``"orpo"``); the reference's :math:`rc_i, rr_i` likewise (0 when not
    given). With :math:`a = c - rc`, :math:`b = r - rr`, :math:`z = \beta(a - b)`:

    .. math::
        \mathcal{L} = \frac{1}{P} \sum_i \ell(a_i, b_i)
          - \alpha \frac{1}{N_c} \sum_{\text{chosen tokens}} \log p_y,

    with :math:`\ell` of ``loss_type``: ``"sigmoid"`` :math:`-\log\sigma(z)`
    (DPO; with ``label_smoothing`` :math:`\varepsilon` conservative DPO's
    :math:`-(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)`, which
    TRL 1.16 and Liger-Kernel do not apply to ``"sigmoid"``: pass 0 for their
    values), ``"hinge"`` :math:`\max(0, 1 - z)`, ``"robust"`` (rDPO)
    :math:`(-(1-\varepsilon)\log\sigma(z) + \varepsilon\log\sigma(-z)) /
    (1 - 2\varepsilon)`, ``"exo_pair"``, ``"nca_pair"``, ``"bco_pair"``,
    ``"sppo_hard"``, ``"apo_zero"``, ``"apo_down"``, ``"discopop"`` as
    Liger-Kernel 0.8.5's ``LigerFusedLinearDPOLoss`` computes them,
    ``"ipo"`` :math:`(a - b - 1/(2\beta))^2` on token means (TRL),
    ``"simpo"`` :math:`-(1-\varepsilon)\log\sigma(\beta(c - r) - \gamma) -
    \varepsilon\log\sigma(\gamma - \beta(c - r))`, ``"cpo"`` the same with
    :math:`\gamma = 0` on sums, and ``"orpo"``
    :math:`-\beta\log\sigma((c - r) - (\log(1 - e^c) - \log(1 - e^r)))`.
    :math:`P` counts the pairs with a counted token and :math:`N_c` the
    counted chosen tokens, over ``batch_axis_name`` too. The guide lists
    every formula (:data:`jaxsce._losses._preference.FORMULAS`).

    Args:
      chosen_logits, rejected_logits: ``[P, L, V]`` floating.
      chosen_labels, rejected_labels: integer ``[P, L]``, the completions' tokens.
      chosen_where, rejected_where: boolean ``[P, L]``: the completions' tokens
        (not the prompt, not padding); masked tokens give exactly 0, NaN logits included.
      ref_chosen_log_probs, ref_rejected_log_probs: ``[P]`` reference
        sequence log-probabilities (sums over the same tokens; divided by the
        token count for the mean types). None: 0 (as Liger-Kernel does).
      loss_type: one of ``LOSS_TYPES``.
      beta: :math:`\beta > 0`.
      label_smoothing: :math:`\varepsilon`, used by ``"robust"`` (``< 0.5``),
        ``"exo_pair"`` (``> 0``), ``"simpo"`` and ``"cpo"``.
      gamma: SimPO's margin :math:`\gamma`.
      nll_weight: :math:`\alpha`, the weight of the chosen tokens' NLL (TRL's
        ORPO is ``nll_weight=1``; Liger-Kernel's ``alpha`` with ``compute_nll_loss``).
      discopop_tau: DiscoPOP's temperature.
      temperature, logit_softcap: as in :func:`jaxsce.log_probs`.
      ignore_index: labels equal to it are not counted (as ``where=False``); default -100 (TRL's
        and PyTorch's); None: off.
      return_aux: also return a :class:`PreferenceAux`.
      axis_name: mesh axis splitting the classes inside ``jax.shard_map``.
      batch_axis_name: mesh axes splitting the pairs: ``P`` and ``N_c`` are global.
      num_classes: the real number of classes of a padded class axis.

    All float options may be traced; a traced value out of range makes the loss NaN.
    A counted pair whose chosen or rejected completion has no counted token
    is NaN for the mean types (0 / 0, as in Liger-Kernel); pairs with no
    counted token at all are not counted.

    Returns:
      The scalar loss (float32; float64 for float64 logits), and with
      ``return_aux`` a :class:`PreferenceAux`.

    Raises:
      TypeError: non-floating logits, non-integer labels, a traced static option.
      ValueError: shapes that do not fit (named), an option out of range, a
        reference for a reference-free type.

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> z = jnp.zeros((1, 2, 4))  # uniform: every sequence log p = 2 log(1/4)
      >>> y = jnp.zeros((1, 2), jnp.int32)
      >>> print(f"{jaxsce.preference_loss(z, z, y, y):.4f}")  # -log sigmoid(0) = log 2
      0.6931
    """
    _labels.check_host_labels(chosen_labels, "chosen_labels")
    _labels.check_host_labels(rejected_labels, "rejected_labels")
    has_ref = ref_chosen_log_probs is not None or ref_rejected_log_probs is not None
    kind, consts = _settings(
        loss_type, beta, label_smoothing, gamma, nll_weight, discopop_tau, temperature, logit_softcap, has_ref
    )
    static = dict(
        loss_type=kind,
        ignore_index=ignore_index,
        return_aux=return_aux,
        axis_name=axis_name,
        batch_axis_name=batch_axis_name,
        num_classes=num_classes,
    )
    logits = (chosen_logits, rejected_logits)
    labels = (chosen_labels, rejected_labels)
    wheres = (chosen_where, rejected_where)
    refs = (ref_chosen_log_probs, ref_rejected_log_probs)
    return _preference_loss(logits, labels, wheres, refs, consts, **static)


@_front.implementation
def _preference_loss(
    logits,
    labels,
    wheres,
    refs,
    consts,
    *,
    loss_type,
    ignore_index,
    return_aux,
    axis_name,
    batch_axis_name,
    num_classes,
):
    zs, ys = [], []
    for side, z, y in zip(("chosen", "rejected"), logits, labels):
        z = _validate.check_floating(z, f"{side}_logits")
        if z.shape != logits[0].shape:
            raise ValueError(f"rejected_logits have shape {z.shape} but chosen_logits have {logits[0].shape}.")
        rows, shape, _ = _validate.class_rows(z, -1, f"{side}_logits")
        _check_pairs(shape, f"{side}_logits", z.shape)
        y = check_logit_labels(y, z, -1, shape)
        _spmd.check_split_axes(f"{side}_logits", z, y, f"{side}_labels", axis_name, batch_axis_name)
        zs.append(rows)
        ys.append(y)
    shape = logits[0].shape[:-1]
    mask = _pair_mask(wheres, ys, ignore_index, shape)
    ct = _validate.compute_dtype(zs[0].dtype)
    data, pairs = _pair_data(mask, refs, batch_axis_name, ct)
    num, padding = _options.class_count(num_classes, zs[0].shape[1], axis_name, "the logits' class axis")
    consts = _consts_in(consts, ct, loss_type)
    loss = LogProbRows(num_classes=num, entropy=False, vocab=Vocab.of(axis_name, padding))
    lps = []
    for i, (z, y) in enumerate(zip(zs, ys)):
        y, valid = _labels.label_validity(y.reshape(-1), num, mask[:, i].reshape(-1), None, False)
        lps.append(_front.whole(loss, (z,), valid, y, None, consts, "vjp")[0].reshape(shape))
    lp = jnp.stack(lps, axis=1)
    value, metrics = Objective(loss_type=loss_type, length=shape[1])(lp, None, None, data, consts.objective)
    return _finish(jnp.sum(value), metrics, pairs, return_aux, batch_axis_name)


@overload
def linear_preference_loss(
    chosen_hidden: jax.Array,
    rejected_hidden: jax.Array,
    linear_weight: jax.Array,
    chosen_labels: jax.Array,
    rejected_labels: jax.Array,
    *,
    return_aux: Literal[False] = False,
    **options: Unpack[_typing.LinearPreferenceOptions],
) -> jax.Array: ...
@overload
def linear_preference_loss(
    chosen_hidden: jax.Array,
    rejected_hidden: jax.Array,
    linear_weight: jax.Array,
    chosen_labels: jax.Array,
    rejected_labels: jax.Array,
    *,
    return_aux: Literal[True],
    **options: Unpack[_typing.LinearPreferenceOptions],
) -> tuple[jax.Array, PreferenceAux]: ...
@overload
def linear_preference_loss(
    chosen_hidden: jax.Array,
    rejected_hidden: jax.Array,
    linear_weight: jax.Array,
    chosen_labels: jax.Array,
    rejected_labels: jax.Array,
    *,
    return_aux: bool,
    **options: Unpack[_typing.LinearPreferenceOptions],
) -> jax.Array | tuple[jax.Array, PreferenceAux]: ...
@_options.keyword_checked
@_auto.spmd(
    leading=True,
    chosen_hidden=_auto.HIDDEN,
    rejected_hidden=_auto.HIDDEN,
    linear_weight=_auto.weight("weight_layout"),
    chosen_labels=_auto.ROWS,
    rejected_labels=_auto.ROWS,
    linear_bias=_auto.VOCAB,
    ref_weight=_auto.weight("weight_layout"),
    ref_chosen_hidden=_auto.HIDDEN,
    ref_rejected_hidden=_auto.HIDDEN,
    ref_bias=_auto.VOCAB,
    chosen_where=_auto.ROWS,
    rejected_where=_auto.ROWS,
    ref_chosen_log_probs=_auto.ROWS,
    ref_rejected_log_probs=_auto.ROWS,
)
def linear_preference_loss(
    chosen_hidden: jax.Array,
    rejected_hidden: jax.Array,
    linear_weight: jax.Array,
    chosen_labels: jax.Array,
    rejected_labels: jax.Array,
    *,
    linear_bias: jax.Array | None = None,
    weight_layout: str = "dv",
    ref_weight: jax.Array | None = None,
    ref_chosen_hidden: jax.Array | None = None,
    ref_rejected_hidden: jax.Array | None = None,
    ref_bias: jax.Array | None = None,
    chosen_where: jax.Array | None = None,
    rejected_where: jax.Array | None = None,
    ref_chosen_log_probs: jax.Array | None = None,
    ref_rejected_log_probs: jax.Array | None = None,
    loss_type: str = "sigmoid",
    beta: float | jax.Array = 0.1,
    label_smoothing: float | jax.Array = 0.0,
    gamma: float | jax.Array = 0.5,
    nll_weight: float | jax.Array = 0.0,
    discopop_tau: float | jax.Array = 0.05,
    temperature: float | jax.Array = 1.0,
    logit_softcap: float | jax.Array | None = None,
    ignore_index: int | None = -100,
    return_aux: bool = False,
    token_block: int | None = None,
    vocab_block: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    axis_name: AxisName = None,
    batch_axis_name: AxisName = None,
    num_classes: int | None = None,
) -> jax.Array | tuple[jax.Array, PreferenceAux]:
    r"""Fused :func:`jaxsce.preference_loss` of ``hidden @ linear_weight + linear_bias`` that never builds the logits.

    The same loss, metrics and gradients as :func:`jaxsce.preference_loss`
    of the logits :math:`z = h W + b` of both completions, from
    ``[token_block, V]`` or ``[token_block, vocab_block]`` blocks. A
    reference model is given as sums (``ref_*_log_probs``) or as its head
    (``ref_weight``, ``ref_chosen_hidden``, ``ref_rejected_hidden``,
    ``ref_bias``), read in the same stream with the policy's layout,
    temperature and soft cap.

    Paths: when the float32 ``d_W`` fits ``memory_budget`` (no ``axis_name``,
    ``vocab_block`` or ``return_aux``), each token block holds whole pairs
    and the gradient is formed in the forward stream: 3 matmul passes over
    the policy's head (plus one over a reference head). Otherwise the
    log-probabilities are streamed and the backward recomputes them: 4.

    Args:
      chosen_hidden, rejected_hidden: ``[P, L, d]`` floating.
      linear_weight: ``[d, V]`` (``weight_layout="dv"``) or ``[V, d]`` (``"vd"``).
      chosen_labels, rejected_labels: integer ``[P, L]``.
      linear_bias: optional ``[V]``.
      weight_layout: ``"dv"`` or ``"vd"`` (for the reference head too).
      ref_weight, ref_chosen_hidden, ref_rejected_hidden, ref_bias: a
        reference head (``[d_ref, V]`` or ``[V, d_ref]``, ``[P, L, d_ref]``).
      token_block, vocab_block, memory_budget: as in :func:`jaxsce.linear_cross_entropy`.
      axis_name: mesh axis splitting the vocabulary of the heads inside ``jax.shard_map``.
      The other options: as in :func:`jaxsce.preference_loss`.

    Returns:
      As :func:`jaxsce.preference_loss`. Gradients flow to both hidden
      states, ``linear_weight`` and ``linear_bias``; the reference is a constant.

    Raises:
      TypeError, ValueError: as :func:`jaxsce.preference_loss` and
      :func:`jaxsce.linear_cross_entropy`, naming the argument.

    Examples:
      >>> import jax.numpy as jnp, jaxsce
      >>> h = jnp.ones((2, 3, 8))
      >>> w = jnp.zeros((8, 100))  # uniform: c = r = 3 log(1/100)
      >>> y = jnp.zeros((2, 3), jnp.int32)
      >>> print(f"{jaxsce.linear_preference_loss(h, h, w, y, y, loss_type='ipo', beta=0.5):.4f}")  # (0 - 1)^2
      1.0000
    """
    _labels.check_host_labels(chosen_labels, "chosen_labels")
    _labels.check_host_labels(rejected_labels, "rejected_labels")
    head_given = (ref_weight is not None, ref_chosen_hidden is not None, ref_rejected_hidden is not None)
    if any(head_given) and not all(head_given):
        raise ValueError("A reference head needs ref_weight, ref_chosen_hidden and ref_rejected_hidden.")
    if ref_bias is not None and not all(head_given):
        raise ValueError("ref_bias was given without a reference head.")
    if all(head_given) and (ref_chosen_log_probs is not None or ref_rejected_log_probs is not None):
        raise ValueError("Pass either ref_*_log_probs or the reference head, not both.")
    has_ref = all(head_given) or ref_chosen_log_probs is not None or ref_rejected_log_probs is not None
    kind, consts = _settings(
        loss_type, beta, label_smoothing, gamma, nll_weight, discopop_tau, temperature, logit_softcap, has_ref
    )
    static = dict(
        **_options.fused(
            weight_layout=weight_layout, token_block=token_block, vocab_block=vocab_block, memory_budget=memory_budget
        ),
        loss_type=kind,
        ignore_index=ignore_index,
        return_aux=return_aux,
        axis_name=axis_name,
        batch_axis_name=batch_axis_name,
        num_classes=num_classes,
    )
    hidden = (chosen_hidden, rejected_hidden)
    ref_head = (ref_chosen_hidden, ref_rejected_hidden, ref_weight, ref_bias)
    labels = (chosen_labels, rejected_labels)
    wheres = (chosen_where, rejected_where)
    refs = (ref_chosen_log_probs, ref_rejected_log_probs)
    return _linear_preference_loss(hidden, linear_weight, linear_bias, ref_head, labels, wheres, refs, consts, **static)


def _stacked(pair, name: str):
    """``[P, L, d]`` hidden states of both completions as ``[P, 2, L, d]`` (pairs adjacent)."""
    chosen, rejected = pair
    if rejected.shape[:-1] != chosen.shape[:-1] or rejected.ndim != chosen.ndim:
        raise ValueError(f"rejected_{name} has shape {rejected.shape} but chosen_{name} has {chosen.shape}.")
    _check_pairs(chosen.shape[:-1], f"chosen_{name}", chosen.shape)
    return jnp.stack([chosen, rejected], axis=1)


@_front.implementation
def _linear_preference_loss(
    hidden,
    weight,
    bias,
    ref_head,
    labels,
    wheres,
    refs,
    consts,
    *,
    weight_layout,
    token_block,
    vocab_block,
    memory_budget,
    loss_type,
    ignore_index,
    return_aux,
    axis_name,
    batch_axis_name,
    num_classes,
):
    for side, h in zip(("chosen", "rejected"), hidden):
        _validate.check_floating(h, f"{side}_hidden")
    check_head(hidden[0], weight, bias, weight_layout, prefix="chosen_")  # errors name the arguments
    h = _stacked(hidden, "hidden")
    head, v_local = check_head(h, weight, bias, weight_layout)
    shape = hidden[0].shape[:-1]
    ys = [check_class_ids(y, shape, hidden[0].shape) for y in labels]
    for side, y in zip(("chosen", "rejected"), ys):
        _spmd.check_split_axes("linear_weight", weight, y, f"{side}_labels", axis_name, batch_axis_name)
    heads: tuple[_stream.Head, ...] = (head,)
    ref_ch, ref_rj, ref_w, ref_b = ref_head
    reference = ref_w is not None
    if reference:
        rh = _stacked((ref_ch, ref_rj), "ref_hidden") if ref_ch.shape[:-1] == shape else None
        if rh is None:
            raise ValueError(f"ref_chosen_hidden has shape {ref_ch.shape} but must have the batch shape {shape}.")
        check_head(ref_ch, ref_w, ref_b, weight_layout, prefix="ref_chosen_", linear="ref_")
        r_head, v_ref = check_head(rh, ref_w, ref_b, weight_layout, prefix="ref_", linear="")
        if v_ref != v_local:
            raise ValueError(
                f"ref_weight of shape {ref_w.shape} has {v_ref} classes but linear_weight of shape "
                f"{weight.shape} has {v_local} (weight_layout={weight_layout!r})."
            )
        heads = (head, _stream.Head(*(None if x is None else lax.stop_gradient(x) for x in r_head)))  # type: ignore[arg-type]
    mask = _pair_mask(wheres, ys, ignore_index, shape)
    ct = _stream.acc_dtype(*(x for hd in heads for x in hd))
    data, pairs = _pair_data(mask, refs, batch_axis_name, ct)
    num, padding = _options.class_count(num_classes, v_local, axis_name, "linear_weight's vocabulary")
    y = jnp.stack(ys, axis=1).reshape(-1)
    y, valid = _labels.label_validity(y, num, mask.reshape(-1), None, False)
    consts = _consts_in(consts, ct, loss_type)
    value, metrics = _tokens.evaluate(
        Objective(loss_type=loss_type, length=shape[1], group=2 * shape[1]),
        heads,
        valid,
        y,
        jax.tree.map(lambda x: x.reshape((-1,) + x.shape[3:]), data),
        consts,
        num_classes=num,
        vocab=Vocab.of(axis_name, padding),
        reference=reference,
        fused=dict(
            layouts=(weight_layout,) * len(heads),
            token_block=token_block,
            vocab_block=vocab_block,
            memory_budget=memory_budget,
        ),
        n_metrics=4 if return_aux else 0,
    )
    return _finish(value, metrics, pairs, return_aux, batch_axis_name)
