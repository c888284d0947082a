"""Timing and checking: interleaved calls in a shuffled order, compiled memory, gradient gaps."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np


@dataclass
class Row:
    section: str
    impl: str
    shape: str
    dtype: str
    median_ms: float
    min_ms: float
    max_ms: float
    tokens_per_s: float
    ratio_to_peer: float | None = None
    ratio_to_roofline: float | None = None
    temp_mib: float | None = None
    max_abs_grad_diff: float | None = None
    grad_ok: bool | None = None
    extra: dict = field(default_factory=dict)


def temp_mib(fn, *args) -> float | None:
    return compiled_temp_mib(fn.lower(*args).compile())


def compiled_temp_mib(compiled) -> float | None:
    """Compiled temporary memory (``memory_analysis``) in MiB, None where the backend does not report it."""
    stats = compiled.memory_analysis()
    return None if stats is None else stats.temp_size_in_bytes / 2**20


def compiled_bytes_accessed(compiled) -> float | None:
    """XLA's cost-analysis estimate of the bytes a compiled call reads and writes (an accelerator's
    bandwidth proxy), None where the backend does not report it. XLA counts a loop's body once,
    whatever its trip count: for the fused paths, whose work is in loops over blocks, it is a lower
    bound (their arrays of the logits' size do not exist to be counted at all)."""
    try:
        costs = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(costs, (list, tuple)):  # jax < 0.7: one dict per computation
        costs = costs[0] if costs else None
    value = None if not costs else costs.get("bytes accessed")
    return None if value is None else float(value)


#: Seconds to wait before each timed call (``--settle``): the previous call's
#: freed buffers (gigabytes for the plain paths at the large shapes) are
#: returned to the system in the background, and that work must not be
#: charged to whichever call comes next.
SETTLE = 0.0


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, block, progress=None) -> dict[str, np.ndarray]:
    for call in calls.values():  # warm-up and compile
        block(call())
    times = {k: [] for k in calls}
    # The order is shuffled every round: on CPU a call that follows one which
    # freed a large buffer reuses its pages and skips page faults, so a fixed
    # order would favour whoever comes second.
    order = np.random.default_rng(0)
    names = list(calls)
    for _ in range(repeats):
        for name in order.permutation(names):
            if SETTLE:
                gc.collect()
                time.sleep(SETTLE)
            t0 = time.perf_counter()
            block(calls[name]())
            times[name].append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(1)
    return {k: np.asarray(v) * 1e3 for k, v in times.items()}


def _block(out):
    jax.block_until_ready(out)
    return out


def max_diff(a, b) -> float:
    la = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    lb = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
    return float(max(np.max(np.abs(x - y)) for x, y in zip(la, lb)))


def grad_tolerance(grad, narrow: bool | None = None) -> float:
    """Allowed gap to the naive autodiff gradient: float32 rounding of p - y, or for 16-bit inputs
    (a bf16 run; ``narrow``, by default read from the gradient's dtypes) a few of their ulps (bf16
    keeps 8 significant bits)."""
    leaves = jax.tree.leaves(grad)
    scale = max(float(np.max(np.abs(np.asarray(g, np.float64)))) for g in leaves)
    if narrow is None:
        narrow = any(np.dtype(getattr(g, "dtype", np.float32)).itemsize <= 2 for g in leaves)
    return (2e-2 if narrow else 1e-4) * max(scale, 1e-30) + 1e-7


def _measured_row(section, name, shape, dtype, t, tokens, *, peer_ms, roofline, temp, diff, tol, extra) -> Row:
    median = float(np.median(t))
    return Row(
        section=section,
        impl=name,
        shape=shape,
        dtype=jnp.dtype(dtype).name,
        median_ms=median,
        min_ms=float(t.min()),
        max_ms=float(t.max()),
        tokens_per_s=tokens / (median / 1e3),
        ratio_to_peer=None if peer_ms is None else float(median / peer_ms),
        ratio_to_roofline=None if roofline is None else float(roofline),
        temp_mib=temp,
        max_abs_grad_diff=diff,
        grad_ok=bool(diff <= tol),
        extra=extra,
    )


def _gradient(call, is_torch):
    grad = call()[1]
    if is_torch:
        return tuple(g.detach().numpy() for g in grad) if isinstance(grad, tuple) else grad.detach().numpy()
    return grad
