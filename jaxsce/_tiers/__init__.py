"""Families of losses on the engine: the token tier (``_tokens``: losses that are functions of per-token
log-probabilities declare one objective) and the divergences the distillation losses share
(``_divergence``).
"""
