"""The keyword options of the losses whose return type depends on a flag, for their ``typing.overload``s.

``cross_entropy(..., return_aux=True)`` returns ``(loss, LossAux)`` and
``log_probs(..., return_entropy=True)`` returns ``(log_probs, entropy)``; the
overloads tell a type checker which, from the flag's literal value. Each
overload spells the positional arguments and the flag, and takes the other
options as ``**options: Unpack[...]`` of a ``TypedDict`` here, so a checker
still knows every option by name and type. ``tests/test_typing.py`` checks
that each ``TypedDict`` holds exactly the options of its function.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict

import jax

from ._spmd import AxisName

if TYPE_CHECKING:  # only annotations use it: no runtime dependency on typing_extensions
    if sys.version_info >= (3, 11):
        from typing import Unpack as Unpack
    else:
        from typing_extensions import Unpack as Unpack


class _Transform(TypedDict, total=False):
    temperature: float | jax.Array
    logit_softcap: float | jax.Array | None


class _Head(TypedDict, total=False):
    linear_bias: jax.Array | None
    weight_layout: str
    token_block: int | None
    vocab_block: int | None
    memory_budget: int


class _CrossEntropy(_Transform, total=False):
    where: jax.Array | None
    reduction: str
    ignore_index: int | None
    weight: jax.Array | None
    sample_weight: jax.Array | None
    label_smoothing: float | jax.Array
    z_loss: float | jax.Array
    derivative: str
    axis_name: AxisName
    batch_axis_name: AxisName
    check_labels: bool
    num_classes: int | None


class CrossEntropyOptions(_CrossEntropy, total=False):
    axis: int | Sequence[int]


class LinearCrossEntropyOptions(_CrossEntropy, _Head, total=False):
    pass


class _LogProbs(_Transform, total=False):
    where: jax.Array | None
    axis_name: AxisName
    check_labels: bool
    derivative: str
    num_classes: int | None
    ignore_index: int | None
    top_k: int | None
    top_p: float | jax.Array | None
    top_p_candidates: int
    batch_invariant: bool


class LogProbsOptions(_LogProbs, total=False):
    axis: int | Sequence[int]


class LinearLogProbsOptions(_LogProbs, _Head, total=False):
    pass


class _Policy(_Transform, total=False):
    where: jax.Array | None
    old_log_probs: jax.Array | None
    ref_log_probs: jax.Array | None
    loss_type: str
    importance_sampling_level: str
    epsilon: float | jax.Array
    epsilon_high: float | jax.Array | None
    delta: float | jax.Array | None
    beta: float | jax.Array
    kl_importance_correction: bool
    sampler_weights: jax.Array | None
    num_items_in_batch: int | float | jax.Array | None
    max_completion_length: int | None
    sapo_temperatures: tuple[float | jax.Array, float | jax.Array]
    entropy_coef: float | jax.Array
    axis_name: AxisName
    batch_axis_name: AxisName
    num_classes: int | None
    ignore_index: int | None
    batch_invariant: bool


class PolicyOptions(_Policy, total=False):
    axis: int | Sequence[int]


class LinearPolicyOptions(_Policy, _Head, total=False):
    ref_hidden: jax.Array | None
    ref_weight: jax.Array | None
    ref_bias: jax.Array | None


class PreferenceOptions(_Transform, total=False):
    chosen_where: jax.Array | None
    rejected_where: jax.Array | None
    ref_chosen_log_probs: jax.Array | None
    ref_rejected_log_probs: jax.Array | None
    loss_type: str
    beta: float | jax.Array
    label_smoothing: float | jax.Array
    gamma: float | jax.Array
    nll_weight: float | jax.Array
    discopop_tau: float | jax.Array
    ignore_index: int | None
    axis_name: AxisName
    batch_axis_name: AxisName
    num_classes: int | None


class LinearPreferenceOptions(PreferenceOptions, _Head, total=False):
    ref_weight: jax.Array | None
    ref_chosen_hidden: jax.Array | None
    ref_rejected_hidden: jax.Array | None
    ref_bias: jax.Array | None
