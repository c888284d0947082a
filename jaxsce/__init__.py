"""jaxsce: numerically stable softmax and softmax cross-entropy for JAX.

Everything public is re-exported here; the implementation lives in private
modules, one per concern.
"""

from ._cross_entropy import cross_entropy as cross_entropy
from ._distill import distillation_loss as distillation_loss
from ._distill import linear_distillation_loss as linear_distillation_loss
from ._linear import linear_cross_entropy as linear_cross_entropy
from ._log_probs import linear_log_probs as linear_log_probs
from ._log_probs import log_probs as log_probs
from ._policy import PolicyAux as PolicyAux
from ._policy import linear_policy_loss as linear_policy_loss
from ._policy import policy_loss as policy_loss
from ._preference import PreferenceAux as PreferenceAux
from ._preference import linear_preference_loss as linear_preference_loss
from ._preference import preference_loss as preference_loss
from ._reduce import LossAux as LossAux
from ._sharded import sharded_cross_entropy as sharded_cross_entropy
from ._sharded import sharded_linear_cross_entropy as sharded_linear_cross_entropy
from ._softmax import log_softmax as log_softmax
from ._softmax import logsumexp as logsumexp
from ._softmax import softmax as softmax
from ._topk_distill import linear_topk_distillation_loss as linear_topk_distillation_loss
from ._topk_distill import topk_distillation_loss as topk_distillation_loss

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
