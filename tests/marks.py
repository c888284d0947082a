"""Where each test says which of its cases run in the fast set, and a trace counter.

``make test`` runs the tests not marked slow; CI also runs the slow set, so
the two together run every case. A test whose parameters are crossed keeps
each value of every parameter in the fast set but not every combination: it
says so where it is defined, with :func:`fast_cases`, and ``conftest.py``
marks the other cases slow. Renaming a test moves nothing.
"""

from __future__ import annotations

import jax


def fast_cases(predicate):
    """Decorator: the cases whose parameters satisfy ``predicate(params)`` run in the fast set, the rest
    are marked slow. ``params`` is the case's dict of parameter values."""

    def mark(fn):
        fn.fast_cases = predicate
        return fn

    return mark


class CountingJit:
    """``jax.jit(fn)`` that counts how often ``fn`` is traced (``.traces``): a schedule of traced
    options must compile once."""

    def __init__(self, fn):
        self.traces = 0

        def traced(*args, **kwargs):
            self.traces += 1
            return fn(*args, **kwargs)

        self._jitted = jax.jit(traced)

    def __call__(self, *args, **kwargs):
        return self._jitted(*args, **kwargs)
