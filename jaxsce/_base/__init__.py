"""The layer everything stands on: input and dtype checks, class ids, the logit transform, reductions,
the SPMD helpers and the public option types. Nothing here knows a loss.
"""
