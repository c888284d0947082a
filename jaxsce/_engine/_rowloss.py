"""The contract between a loss and the streaming engine: :class:`RowLoss` and what it sees.

A loss is, per token, a function of a few sums over the rows of each head's
transformed logits ``s = f(z)``. It says what it sums while vocabulary blocks
stream by (:class:`Block`), how shards' partial sums combine (:class:`Shards`),
how the sums give its outputs (:class:`Stats`), and its per-entry backward
(:class:`GradBlock`). The engine (``_stream``) owns the loops.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from .._base import _spmd


class Block(NamedTuple):
    """What a loss sees of one ``[Tb, Vb]`` block in the forward pass.

    Per head (tuples): ``s`` the transformed logits (stale columns included:
    mask them with ``fresh``); ``e = exp(s - m)`` with ``m`` the running max
    after this block (0 at stale columns); ``m`` that max (0 where no finite
    entry has been seen); ``rescale = exp(m_before - m)`` and ``shift =
    m_before - m`` (0 where nothing was seen before), to carry sums kept
    relative to the running max; ``se_before`` the sum of exponentials
    before this block, relative to ``m_before``.
    """

    s: tuple
    e: tuple
    m: tuple
    rescale: tuple
    shift: tuple
    se_before: tuple
    col0: Any  # global class index of the block's first column
    fresh_col0: Any  # global class index of its first column not counted by an earlier block
    fresh: jax.Array  # [1, Vb]: columns not counted by an earlier block
    rows: Any  # the token block's rows of the per-row data
    cols: Any  # the vocabulary block's columns of the per-class data
    ds: jax.Array | None  # forward mode: tangent of head 0's s (0 at stale columns)


class Stats(NamedTuple):
    """The engine's per-row statistics of every head, over all blocks and shards.

    Losses form their outputs from ``shift`` and ``log_se`` (``log p_c = (s_c
    - shift) - log_se``), never from the absolute ``lse``: at large logits
    ``shift + log_se`` rounds to the ulp of the logits, which would put that
    error into every log-probability.
    """

    m: tuple  # the row max (may be +-inf)
    se: tuple  # sum of exp(s - shift)
    lse: tuple  # log-sum-exp of s (shift + log_se)
    argmax: jax.Array | None  # head 0's first argmax (global class index), if asked for
    shift: tuple = ()  # the row max where finite, else 0
    log_se: tuple = ()  # log(se)


class Shards(NamedTuple):
    """What ``to_global`` needs to rescale per-shard sums: per head, the local
    and global (finite-safe) maxima, the local sum of exponentials, and
    ``scale = exp(m_local - m_global)``."""

    m_local: tuple
    m_global: tuple
    se_local: tuple
    scale: tuple


class GradBlock(NamedTuple):
    """What a loss sees of one block in the backward pass: per head ``s``, and
    ``log_p = (s - shift) - log_se`` and ``p = exp(log_p)`` formed relative to
    the row max; the rest as in :class:`Block`."""

    s: tuple
    p: tuple
    log_p: tuple
    col0: Any
    rows: Any
    cols: Any


class Scalar(NamedTuple):
    """A scalar loss's per-row terms on the single-pass path (:meth:`RowLoss.scalar`).

    ``value`` and ``normalizer`` are summed over the counted rows (the loss
    and the denominator of ``"mean"``); ``cotangents`` are the per-row
    derivatives of the summed value with respect to each output (None: no
    cotangent); ``aux`` are per-row terms summed over the counted rows
    without a gradient (metrics such as a clipped fraction).
    """

    value: jax.Array
    normalizer: jax.Array
    cotangents: tuple
    aux: tuple = ()


class Acc(NamedTuple):
    """A loss's running per-row sums: each a pytree (a NamedTuple) of ``[rows]`` arrays.

    ``sums`` are summed over vocabulary blocks by the loss and over shards by
    the engine; ``tangents`` (forward mode, losses that stream their own
    tangents) likewise, in a collective of their own.
    """

    sums: Any
    tangents: Any = ()


class Vocab(NamedTuple):
    """How a loss's vocabulary is laid out: static, part of the loss's configuration.

    Attributes:
      axis: mesh axes splitting the vocabulary inside ``shard_map`` (the
        engine's collectives run over them), or None.
      unchecked: inside ``shard_map(check_vma=False)`` over ``axis``.
      classes: the number of real classes when the last columns (over all
        shards) are padding (``num_classes``): the engine leaves columns at
        or beyond it out of every block a loss sees (as it does stale
        columns, through ``Block.fresh``) and gives them exactly 0 gradient.
        None: every column is a class.
    """

    axis: str | tuple[str, ...] | None = None
    unchecked: bool = False
    classes: int | None = None

    @classmethod
    def of(cls, axis_name, classes: int | None = None) -> Vocab:
        """The vocabulary split over ``axis_name`` (its ``check_vma`` mode read from the current trace)."""
        return cls(axis_name, _spmd.unchecked(axis_name), classes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowLoss:
    """A loss as per-row statistics of softmax rows: static configuration and formulas.

    An instance is hashable (the engine's static argument) and holds all the
    static configuration; the traced parameters travel separately as
    ``consts`` (any pytree). ``rows`` is per-token data (arrays with the
    tokens as axis 0), ``cols`` per-class data (the vocabulary as axis 0);
    neither gets a gradient. A loss defines :meth:`init`,
    :meth:`accumulate`, :meth:`finish` and :meth:`grad`; the other hooks
    have defaults.

    Attributes:
      vocab: the vocabulary's layout (:class:`Vocab`): its mesh axes, their
        ``check_vma`` mode and the real classes.
      argmax: whether the engine finds head 0's first argmax (``Stats.argmax``).
      row_group: on the single-pass path, token blocks hold whole groups of
        this many consecutive rows (a completion of a policy loss), so that
        :meth:`scalar` may combine a group's rows; the token count must be
        a multiple of it, or the streaming path is taken.
    """

    vocab: Vocab = Vocab()
    argmax: bool = False
    row_group: int = 1

    @property
    def vocab_axis(self):
        return self.vocab.axis

    @property
    def unchecked(self) -> bool:
        return self.vocab.unchecked

    @property
    def classes(self) -> int | None:
        return self.vocab.classes

    #: Number of linear heads (logits matrices) the loss reads; gradients flow to head 0.
    heads: ClassVar[int] = 1
    #: How many heads (from head 0) :meth:`grad` reads; the backward and the
    #: forward-mode tangent pass recompute only their blocks (None: all).
    grad_heads: ClassVar[int | None] = None
    #: Indices of the outputs that carry cotangents.
    differentiable: ClassVar[tuple[int, ...]] = (0,)
    #: Whether the loss needs a second pass over the blocks once every head's
    #: normalizer is known (:meth:`init2`, :meth:`accumulate2`).
    second_pass: ClassVar[bool] = False
    #: Whether :meth:`accumulate`/:meth:`finish` carry forward-mode tangents
    #: themselves (from ``Block.ds``, in ``Acc.tangents``). Otherwise forward
    #: mode is derived from :meth:`grad`: a row's output tangent is ``sum_c
    #: (d out / d s_c) ds_c``, formed in one more streaming pass.
    streams_tangents: ClassVar[bool] = False

    def transform(self, z, head: int, consts):
        """``s = f(z)`` for head ``head`` (default: the identity)."""
        return z

    def transform_grad(self, s, ds, head: int, consts):
        """``ds * (ds/dz)`` (elementwise), written in terms of ``s`` (default: the identity)."""
        return ds

    def init(self, tb, ct, consts, forward_mode: bool) -> Acc:
        """Initial sums: an :class:`Acc` of ``[tb]`` arrays in dtype ``ct``."""
        raise NotImplementedError

    def accumulate(self, acc: Acc, blk: Block, consts) -> Acc:
        """Adds one block's terms (stale columns masked by ``blk.fresh``)."""
        raise NotImplementedError

    def to_global(self, acc: Acc, sh: Shards, consts) -> Acc:
        """The shard's sums as shares of the global ones, which the engine adds.

        The default suits sums that do not depend on the running max; sums
        kept relative to it are rescaled here (``sh.scale``).
        """
        return acc

    def second_rows(self, acc: Acc, rows):
        """The per-row data the second pass sees (in ``GradBlock.rows``), from the first pass's global
        sums ``acc`` (default: ``rows`` itself)."""
        return rows

    def init2(self, tb, ct, consts):
        """Initial second-pass sums, a pytree of ``[tb]`` arrays (summed over blocks and shards)."""
        raise NotImplementedError(f"{type(self).__name__} has no second pass")

    def accumulate2(self, acc2, blk: GradBlock, fresh, consts):
        """Adds one block's second-pass terms; ``blk.p`` are probabilities, ``fresh`` masks columns."""
        raise NotImplementedError(f"{type(self).__name__} has no second pass")

    def searches(self) -> bool:
        """Whether the loss searches per-row thresholds in further passes once the first pass's sums are
        known (:meth:`search_init`); such a loss has no second pass and uses its hooks for the search."""
        return False

    def search_init(self, acc: Acc, stats: Stats, rows):
        """The search's initial state (a pytree of ``[T]`` arrays) from the first pass's global sums."""
        raise NotImplementedError(f"{type(self).__name__} does not search")

    def search_pending(self, state):
        """``[T]`` bool: the rows whose search goes on (the engine passes again while any counted row is)."""
        raise NotImplementedError(f"{type(self).__name__} does not search")

    def search_rows(self, state, rows):
        """The per-row data one search pass sees (in ``GradBlock.rows``; summed by :meth:`init2` and
        :meth:`accumulate2`)."""
        raise NotImplementedError(f"{type(self).__name__} does not search")

    def search_step(self, state, pass_rows, sums):
        """The state after one pass (``pass_rows`` from :meth:`search_rows`, ``sums`` its global sums)."""
        raise NotImplementedError(f"{type(self).__name__} does not search")

    def search_limit(self) -> int:
        """The most passes the search may take."""
        return 0

    def finish(self, stats: Stats, acc: Acc, second, rows, cols, consts):
        """``(outputs, residuals, output tangents or None)``: tuples of ``[T]`` arrays.

        ``second`` holds the second-pass sums, or the final search state of a loss that
        :meth:`searches` (None otherwise).
        """
        raise NotImplementedError

    def grad(self, blk: GradBlock, res: tuple, cts: tuple, consts):
        """``d(sum_o ct_o * output_o) / ds`` for head 0's block ``[Tb, Vb]`` (None: no cotangent)."""
        raise NotImplementedError

    def scalar(self, outputs: tuple, rows, consts) -> Scalar:
        """A :class:`Scalar` of per-row terms for the single-pass path of a scalar loss.

        ``outputs`` and ``rows`` are a token block's (whole groups of
        ``row_group`` rows). The default suits a loss with one output, the
        per-row value: each counted row adds 1 to the mean's denominator,
        with cotangent 1.
        """
        (value,) = outputs
        ones = jnp.ones_like(value)
        return Scalar(value, ones, (ones,))
