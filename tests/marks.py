"""Where each test says which of its cases run in the fast set, and a trace counter.

``make test`` runs the tests not marked slow; CI also runs the slow set, so
the two together run every case. The fast set is a quick loop (under five
minutes on two cores): by default it runs the first case of each
parametrized test (``FAST_CASES_PER_TEST``), the one its parameter lists put
first. A test says otherwise where it is defined: :func:`fast_cases` picks
which of its cases may run in the fast set (the first of those runs), and
:func:`all_cases_fast` keeps every case of a test whose cases cost little
(trace-time errors). ``conftest.py`` marks the other cases slow. Renaming a
test moves nothing.
"""

from __future__ import annotations

import os

import jax

# JAXSCE_FAST_CASES=all lifts the cap: every case the tests' own marks leave fast (each value of every
# parameter), which CI runs on the oldest supported JAX.
_cap = os.environ.get("JAXSCE_FAST_CASES", "1")
FAST_CASES_PER_TEST = None if _cap == "all" else int(_cap)


def fast_cases(predicate):
    """Decorator: only the cases whose parameters satisfy ``predicate(params)`` may run in the fast set
    (the first ``FAST_CASES_PER_TEST`` of them do); the rest are marked slow. ``params`` is the case's
    dict of parameter values."""

    def mark(fn):
        fn.fast_cases = predicate
        return fn

    return mark


def all_cases_fast(fn):
    """Decorator: every case of ``fn`` (not marked slow otherwise) runs in the fast set."""
    fn.all_cases_fast = True
    return fn


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
