r"""Sampler-matched log-probabilities: the tokens a top-k / top-p sampler could emit.

vLLM's sampler (``vllm/v1/sample/ops/topk_topp_sampler.py``) draws from the
softmax of the (temperature-scaled) logits ``s`` after two filters, in this
order:

* top-k: entries below the k-th largest value ``t_k`` are removed (ties at
  ``t_k`` are kept, so more than k may survive); ``k <= 0`` or ``k >= V`` is off;
* top-p over what top-k kept: with ``q`` the softmax of the survivors, an
  entry is removed when the mass of the survivors sorted below it, itself
  included, is at most ``1 - p``; the largest always stays. Here ties at
  the boundary stay together (vLLM's order among equal values is
  unspecified): ``c`` is kept iff ``sum_{j: s_j > s_c} q_j < p``.

The kept set ``K`` is ``{c : s_c >= tau}`` for one threshold ``tau`` per row;
the sampler's distribution is ``pi_c = exp(s_c) / Z`` on it, ``Z = sum_{c in
K} exp(s_c)``.

While the vocabulary streams by, each row keeps its ``size`` largest values
(a running top-k merged block by block, and across shards by one all-gather
of ``size`` values per row) and how many more entries tie with the smallest
of them. With top-k, ``size = k`` and the survivors are exactly those values
and ties. With top-p alone, ``size`` is a candidate bound: the kept set is
known whenever the candidates hold at least ``p`` of the mass. A row whose
nucleus is wider searches its threshold in further passes (:func:`search_step`):
with ``G(t) = sum_{c: s_c > t} pi_c``, the threshold lies in ``(lo, hi]``
where ``G(lo) >= p > G(hi)``, starting from the row's smallest value and its
smallest candidate; each pass sums ``G`` (and the entry count) at 65 evenly
spaced points of the interval and keeps the cell where ``G`` crosses ``p``,
until it holds one entry or one representable value. The kept set is then
``{c : s_c > lo}``, with its mass and ``sum pi log pi`` from the same sums.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._base import _spmd

#: The candidate bound of ``top_p`` without ``top_k``: rows whose nucleus holds more tokens search it.
TOP_P_CANDIDATES = 256


class Sampler(NamedTuple):
    """Static configuration: the candidate buffer's ``size``, whether top-k filters to it, whether
    a per-row top-p filters what top-k kept, and whether the buffer holds every class (``covered``)."""

    size: int
    top_k: bool
    top_p: bool
    covered: bool


def sampler(top_k: int | None, top_p: bool, num_classes: int, candidates: int) -> Sampler | None:
    """The filters in effect (None: the plain softmax): ``top_k`` None, ``<= 0`` or ``>= num_classes`` is off."""
    k_on = top_k is not None and 0 < top_k < num_classes
    if not k_on and not top_p:
        return None
    size = top_k if k_on else min(candidates, num_classes)
    assert size is not None
    return Sampler(size, k_on, top_p, covered=k_on or size >= num_classes)


class Candidates(NamedTuple):
    """Per row: the ``size`` largest values of ``s`` seen (descending; ``-inf`` until filled) and how
    many further entries equal the smallest of them."""

    values: jax.Array  # [rows, size]
    ties: jax.Array  # [rows]


def init(rows: int, size: int, dtype) -> Candidates:
    return Candidates(jnp.full((rows, size), -jnp.inf, dtype), jnp.zeros((rows,), dtype))


def _count(x, t):
    return jnp.sum((x == t[:, None]).astype(t.dtype), axis=-1)


def _merge(old: Candidates, new_values, new_ties, new_t) -> Candidates:
    """Top ``size`` of ``old.values`` and ``new_values``, the latter's own ties at ``new_t`` counted."""
    size = old.values.shape[1]
    both = jnp.concatenate([old.values, new_values], axis=-1)
    top = lax.top_k(both, size)[0]
    # The smallest kept value as a min, not top[:, -1]: a slice of the result
    # keeps XLA from rewriting the sort it lowers to into its TopK kernel.
    t = jnp.min(top, axis=-1)
    # Entries equal to the new smallest value: those seen (the lists, and the
    # ties each side had already counted) minus those in the new list.
    ties = _count(both, t) - _count(top, t)
    ties = ties + jnp.where(old.values[:, -1] == t, old.ties, 0) + jnp.where(new_t == t, new_ties, 0)
    return Candidates(top, ties)


def merge_block(c: Candidates, s, fresh) -> Candidates:
    """The candidates after one block ``s`` ``[rows, width]`` (columns where ``fresh`` is False left out)."""
    s = jnp.where(fresh, s, -jnp.inf)
    no_ties = jnp.zeros_like(c.ties)
    return _merge(c, s, no_ties, jnp.full_like(c.ties, jnp.nan))


def merge_shards(c: Candidates, axis_name) -> Candidates:
    """Every shard's candidates merged into the global ones (on every shard): one all-gather of ``size``
    values and one number per row."""
    size = c.values.shape[1]
    values = lax.all_gather(c.values, axis_name, axis=1, tiled=True)
    ties = lax.all_gather(c.ties, axis_name, axis=1)
    top = lax.top_k(values, size)[0]
    t = jnp.min(top, axis=-1)
    ends = values.reshape(values.shape[0], -1, size)[:, :, -1]
    total = _count(values, t) + jnp.sum(jnp.where(ends == t[:, None], ties, 0), axis=-1)
    return Candidates(top, total - _count(top, t))


def shard_share(c: Candidates, axis_name) -> Candidates:
    """The global candidates on the first shard and zeros on the others: their sum over the shards
    (the engine's ``psum`` of a loss's sums) is the global candidates, exactly."""
    g = merge_shards(c, axis_name)
    first = lax.axis_index(_spmd.axis_names(axis_name)) == 0
    return jax.tree.map(lambda x: jnp.where(first, x, 0), g)


class Kept(NamedTuple):
    """Per row: the threshold ``tau`` (kept iff ``s >= tau``), ``log Z`` of the kept set and
    ``A = sum_{c in K} e_c (s_c - m)`` (for the entropy), both relative to the row max ``m``
    (``e_c = exp(s_c - m)``), and whether the kept set is known (False: a top-p nucleus wider than
    the candidates)."""

    threshold: jax.Array
    log_z: jax.Array
    a: jax.Array
    known: jax.Array


def kept(sp: Sampler, c: Candidates, shift, se, top_p) -> Kept:
    """The kept set from the global candidates, the row max ``shift`` and the full ``se = sum_c e_c``.

    ``top_p``: the per-row ``p`` (None without top-p). ``p == 1`` keeps what top-k kept; ``p`` outside
    ``(0, 1]`` or NaN gives NaN.
    """
    # A barrier: slices of the merged values here would otherwise reach the
    # sort that top_k lowers to and keep XLA from using its TopK kernel.
    v = lax.optimization_barrier(c.values)
    m = shift[:, None]
    e = jnp.exp(v - m)  # 0 at -inf
    rel = jnp.where(e > 0, v - m, 0)
    t_k = jnp.min(v, axis=-1)
    e_ties = c.ties * jnp.exp(t_k - shift)
    rel_ties = jnp.where(e_ties > 0, t_k - shift, 0)
    listed, a_listed = jnp.sum(e, axis=-1), jnp.sum(e * rel, axis=-1)
    # The mass top-p is taken over: the top-k survivors, or the whole row.
    base = listed + e_ties if sp.top_k else se
    low = jnp.full_like(shift, -jnp.inf)
    if not sp.top_p:
        return Kept(t_k, jnp.log(base), a_listed + e_ties * rel_ties, jnp.ones(shift.shape, bool))
    assert top_p is not None
    # Mass strictly above each candidate: the exclusive cumulative sum at the
    # first entry of its group of equal values (values are sorted descending).
    before = jnp.cumsum(e, axis=-1) - e
    starts = jnp.concatenate([jnp.ones_like(v[:, :1], bool), v[:, 1:] != v[:, :-1]], axis=-1)
    above = lax.cummax(jnp.where(starts, before, -jnp.inf), axis=1)
    keep = (above < top_p[:, None] * base[:, None]) | (jnp.arange(v.shape[1]) == 0)[None]
    last = keep[:, -1]  # the group at t_k (and its ties beyond the list) is kept
    n_kept = jnp.sum(keep, axis=-1)
    tau = jnp.take_along_axis(v, (n_kept - 1)[:, None], axis=1)[:, 0]
    z = jnp.sum(jnp.where(keep, e, 0), axis=-1) + jnp.where(last, e_ties, 0)
    a = jnp.sum(jnp.where(keep, e * rel, 0), axis=-1) + jnp.where(last, e_ties * rel_ties, 0)
    known = jnp.ones(shift.shape, bool)
    if not sp.covered:
        # Entries below the candidates are kept iff the candidates (and their ties) hold less than p.
        known = ~(last & (listed + e_ties < top_p * base))
    off = top_p >= 1
    plain_tau = t_k if sp.top_k else low
    plain_a = a_listed + e_ties * rel_ties if sp.top_k else jnp.full_like(shift, jnp.nan)
    bad = ~((top_p > 0) & (top_p <= 1))  # a traced p outside (0, 1] (or NaN): NaN, never "off"
    return Kept(
        jnp.where(off, plain_tau, tau),
        jnp.where(bad, jnp.nan, jnp.where(off, jnp.log(base), jnp.log(z))),
        jnp.where(off, plain_a, a),
        jnp.where(off, True, known) & ~bad,
    )


# --- top-p alone: the threshold searched where the candidates do not reach p ---------------

#: Thresholds per row and pass of the search (the interval is cut into this many bins).
SEARCH_BINS = 64
#: A bound on the search's passes: enough to narrow any float32 interval to adjacent values.
SEARCH_PASSES = 80


class Search(NamedTuple):
    """Per row, the state of the top-p threshold search.

    The kept set is ``{c : s_c > lo}`` once ``done``; until then its threshold lies in ``(lo, hi]``
    (the mass strictly above ``lo`` is at least ``p``, the mass strictly above ``hi`` less). ``mass``
    and ``plogp`` are ``sum p_c`` and ``sum p_c log p_c`` over ``s_c > lo`` (``p`` the row's softmax);
    ``found`` marks rows the search settled (the others were settled by the candidates, have no
    top-p, or are not counted)."""

    lo: jax.Array
    hi: jax.Array
    done: jax.Array
    found: jax.Array
    mass: jax.Array
    plogp: jax.Array


class SearchRows(NamedTuple):
    """What a search pass sees per row: the row's data and its ``SEARCH_BINS + 1`` thresholds."""

    rows: Any
    thresholds: jax.Array  # [rows, SEARCH_BINS + 1], ascending, from lo to hi


class SearchSums(NamedTuple):
    """Per row and threshold ``t``: ``sum p_c``, ``#{c}`` and ``sum p_c log p_c`` over ``s_c > t``."""

    mass: jax.Array
    count: jax.Array
    plogp: jax.Array | None


def search_init(k: Kept, c: Candidates, low, top_p) -> Search:
    """The search's start: rows the candidates settled (``k.known``) are done; the others look below the
    smallest candidate (the mass above it is less than ``p``) and above the row's smallest entry ``low``."""
    hi = jnp.min(c.values, axis=-1)
    lo = jnp.nextafter(low, jnp.full_like(low, -jnp.inf))
    # Rows the candidates settled, rows without top-p (p = 1) or with a p out of range (NaN), and rows
    # without finite values (NaN) do not search.
    done = k.known | ~((top_p > 0) & (top_p < 1)) | ~jnp.isfinite(lo) | ~jnp.isfinite(hi)
    zeros = jnp.zeros_like(low)
    return Search(lo, hi, done, jnp.zeros(low.shape, bool), zeros, zeros)


def search_pending(s: Search):
    return ~s.done


def search_thresholds(s: Search):
    """``SEARCH_BINS + 1`` ascending thresholds from ``lo`` to ``hi`` (evenly spaced, rounded)."""
    f = jnp.arange(SEARCH_BINS + 1, dtype=s.lo.dtype) / SEARCH_BINS
    t = s.lo[:, None] + (s.hi - s.lo)[:, None] * f[None, :]
    t = jnp.clip(t, s.lo[:, None], s.hi[:, None])
    return t.at[:, 0].set(s.lo).at[:, -1].set(s.hi)


#: Whether the CPU branch of :func:`search_sums` bins each entry and scatter-adds (tests set it to False
#: to run the accelerator branch on CPU through the same ``lax.platform_dependent`` switch).
CPU_SCATTERS = True


def search_sums(acc: SearchSums, s, p, log_p, fresh, thresholds) -> SearchSums:
    """One block's terms: ``s``, ``p``, ``log_p`` ``[rows, width]``, columns where ``fresh``.

    Two ways to the same sums, chosen by backend (``lax.platform_dependent``). On accelerators, one
    fused reduction per threshold and sum (``s > t_j`` masks, memory-bound: the block is read once).
    On CPU, where XLA does not fuse those ``[rows, width, thresholds]`` reductions well (with 17
    thresholds, 10-17 times a ``[1024, 512] x [512, 4096]`` matmul, measured with jax 0.10.2 on 2
    cores), each entry's bin (how many thresholds lie below it) is counted with compares and its
    terms scatter-added into its bin (about the matmul's time); the sums above each threshold are
    then the bins' reverse cumulative sums.
    """
    term = None if acc.plogp is None else jnp.where(p > 0, p * log_p, 0)

    def reduced(s, p):
        above = (s[:, :, None] > thresholds[:, None, :]) & fresh[:, :, None]
        mass = jnp.sum(jnp.where(above, p[:, :, None], 0), axis=1)
        count = jnp.sum(above.astype(p.dtype), axis=1)
        plogp = None if term is None else jnp.sum(jnp.where(above, term[:, :, None], 0), axis=1)
        return SearchSums(mass, count, plogp)

    def scattered(s, p):
        rows, width = s.shape
        bins = thresholds.shape[1] + 1
        idx = jnp.zeros(s.shape, jnp.int32)
        for j in range(thresholds.shape[1]):
            idx = idx + (s > thresholds[:, j : j + 1]).astype(jnp.int32)
        idx = jnp.where(fresh, idx, 0)  # stale columns: below every threshold, counted nowhere
        segment = (lax.broadcasted_iota(jnp.int32, s.shape, 0) * bins + idx).reshape(-1)
        values = [p, jnp.ones_like(p)] + ([] if term is None else [term])
        per_bin = jax.ops.segment_sum(
            jnp.stack([v.reshape(-1) for v in values], axis=-1), segment, num_segments=rows * bins
        ).reshape(rows, bins, len(values))
        # Above t_j: the bins j + 1 and up.
        above = jnp.flip(jnp.cumsum(jnp.flip(per_bin[:, 1:], axis=1), axis=1), axis=1)
        return SearchSums(above[..., 0], above[..., 1], None if term is None else above[..., 2])

    if CPU_SCATTERS:
        new = lax.platform_dependent(s, p, cpu=scattered, default=reduced)
    else:
        new = reduced(s, p)
    return jax.tree.map(lambda a, b: a + b, acc, new)


def search_sums_init(rows: int, dtype, entropy: bool) -> SearchSums:
    zeros = jnp.zeros((rows, SEARCH_BINS + 1), dtype)
    return SearchSums(zeros, zeros, zeros if entropy else None)


def search_step(s: Search, t, sums: SearchSums, top_p) -> Search:
    """The state after one pass over thresholds ``t`` with sums ``sums``.

    The threshold lies above the largest ``t_j`` with mass ``>= p`` above it and at or below
    ``t_{j+1}``: settled when that interval holds one entry, or one representable value (ties kept
    together); else the interval is cut again. A row with no ``t_j`` reaching ``p`` (rounding, ``p``
    near 1) keeps every entry above ``lo``.
    """
    reach = sums.mass >= top_p[:, None]
    j = jnp.sum(reach, axis=-1) - 1  # thresholds ascend, so mass descends
    none = j < 0
    j = jnp.maximum(j, 0)
    nxt = jnp.minimum(j + 1, SEARCH_BINS)
    pick = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]  # noqa: E731
    lo, hi = pick(t, j), pick(t, nxt)
    inside = pick(sums.count, j) - pick(sums.count, nxt)
    settled = none | (inside <= 1) | (jnp.nextafter(lo, hi) >= hi)
    mass = pick(sums.mass, j)
    plogp = mass if sums.plogp is None else pick(sums.plogp, j)
    new = ~s.done
    keep = lambda old, x: jnp.where(new, x, old)  # noqa: E731
    return Search(
        keep(s.lo, lo),
        keep(s.hi, hi),
        s.done | settled,
        s.found | (new & settled),
        keep(s.mass, mass),
        keep(s.plogp, plogp),
    )


def searched(k: Kept, s: Search, log_se, top_p) -> Kept:
    """The kept set of every row: the candidates' where they settled it, the search's elsewhere.

    A row the search did not settle within :data:`SEARCH_PASSES` gives NaN."""
    tau = jnp.nextafter(s.lo, jnp.full_like(s.lo, jnp.inf))
    log_z = log_se + jnp.log(s.mass)
    # A = Z (sum p log p + q log Z) over the kept set, Z = se, q its mass.
    a = jnp.exp(log_se) * (s.plogp + s.mass * log_se)
    use = s.found
    bad = ~s.done | ~((top_p > 0) & (top_p <= 1))
    return Kept(
        jnp.where(use, tau, k.threshold),
        jnp.where(use, log_z, k.log_z),
        jnp.where(use, a, k.a),
        jnp.where(use, True, k.known) & ~bad,
    )


def low_block(low, s, fresh):
    """The running smallest entry of each row (for the search's start)."""
    return jnp.minimum(low, jnp.min(jnp.where(fresh, s, jnp.inf), axis=-1))


def low_share(low, axis_name):
    """The global smallest entry on the first shard and 0 on the others (their sum is the global one)."""
    g = lax.pmin(low, _spmd.axis_names(axis_name))
    first = lax.axis_index(_spmd.axis_names(axis_name)) == 0
    return jnp.where(first, g, 0)
