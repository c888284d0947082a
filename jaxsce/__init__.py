"""jaxsce: numerically stable softmax and softmax cross-entropy for JAX.

Everything public is re-exported here. The implementation lives in private
subpackages, one per layer, each standing only on those below it: ``_base``
(checks, class ids, the logit transform, SPMD helpers), ``_engine`` (the
streaming engine and its kernels), ``_api`` (what every public function goes
through: paths, option and input checks), ``_tiers`` (families of losses on
the engine: token objectives, divergences) and ``_losses`` (the public
losses, one module per family).
"""

from ._base._reduce import LossAux as LossAux
from ._losses._cross_entropy import cross_entropy as cross_entropy
from ._losses._distill import distillation_loss as distillation_loss
from ._losses._distill import linear_distillation_loss as linear_distillation_loss
from ._losses._linear import linear_cross_entropy as linear_cross_entropy
from ._losses._log_probs import linear_log_probs as linear_log_probs
from ._losses._log_probs import log_probs as log_probs
from ._losses._policy import PolicyAux as PolicyAux
from ._losses._policy import linear_policy_loss as linear_policy_loss
from ._losses._policy import policy_loss as policy_loss
from ._losses._preference import PreferenceAux as PreferenceAux
from ._losses._preference import linear_preference_loss as linear_preference_loss
from ._losses._preference import preference_loss as preference_loss
from ._losses._sharded import sharded_cross_entropy as sharded_cross_entropy
from ._losses._sharded import sharded_linear_cross_entropy as sharded_linear_cross_entropy
from ._losses._softmax import log_softmax as log_softmax
from ._losses._softmax import logsumexp as logsumexp
from ._losses._softmax import softmax as softmax
from ._losses._topk_distill import linear_topk_distillation_loss as linear_topk_distillation_loss
from ._losses._topk_distill import topk_distillation_loss as topk_distillation_loss

__version__ = "0.1.0"

__all__ = [
    "LossAux",
    "PolicyAux",
    "PreferenceAux",
    "cross_entropy",
    "distillation_loss",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_log_probs",
    "linear_policy_loss",
    "linear_preference_loss",
    "linear_topk_distillation_loss",
    "log_probs",
    "log_softmax",
    "logsumexp",
    "policy_loss",
    "preference_loss",
    "sharded_cross_entropy",
    "sharded_linear_cross_entropy",
    "softmax",
    "topk_distillation_loss",
]
