"""``cross_entropy``: softmax cross-entropy with PyTorch's options and analytic gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, overload

import jax
import jax.numpy as jnp

from .._api import _auto, _front, _options
from .._base import _labels, _reduce, _spmd, _typing, _validate
from .._engine import _logit_ce

if TYPE_CHECKING:
    from .._base._typing import Unpack

AxisName = str | tuple[str, ...] | None


@overload
def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    return_aux: Literal[False] = False,
    **options: Unpack[_typing.CrossEntropyOptions],
) -> jax.Array: ...
@overload
def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, return_aux: Literal[True], **options: Unpack[_typing.CrossEntropyOptions]
) -> tuple[jax.Array, _reduce.LossAux]: ...
@overload
def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, return_aux: bool, **options: Unpack[_typing.CrossEntropyOptions]
) -> jax.Array | tuple[jax.Array, _reduce.LossAux]: ...
@_options.keyword_checked
@_auto.spmd(logits=_auto.CLASSES, labels=_auto.LABELS, where=_auto.ROWS, weight=_auto.VOCAB, sample_weight=_auto.ROWS)
def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    axis: int | Sequence[int] = -1,
    where: jax.Array | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    weight: jax.Array | None = None,
    sample_weight: jax.Array | None = None,
    label_smoothing: float | jax.Array = 0.0,
    z_loss: float | jax.Array = 0.0,
    logit_softcap: float | jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    return_aux: bool = False,
    derivative: str = "vjp",
    axis_name: AxisName = None,
    batch_axis_name: AxisName = None,
    check_labels: bool = False,
    num_classes: int | None = None,
) -> jax.Array | tuple[jax.Array, _reduce.LossAux]:
    r"""Softmax cross-entropy with an analytic gradient.

    For an example with logits :math:`z` over :math:`C` classes, transformed
    logits :math:`s = \mathrm{softcap}(z) / T` (``s = z`` unless
    ``logit_softcap`` or ``temperature``) and target vector :math:`q`:

    .. math::
        \ell = \sum_c q_c \bigl(\mathrm{lse}(s) - s_c\bigr)
               + \lambda\,\mathrm{lse}(s)^2,
        \qquad
        \frac{\partial \ell}{\partial s} = Q\,\mathrm{softmax}(s) - q
               + 2\lambda\,\mathrm{lse}(s)\,\mathrm{softmax}(s),

    with :math:`Q = \sum_c q_c` and :math:`\lambda` = ``z_loss``. PyTorch's
    options set :math:`q` (``torch.nn.functional.cross_entropy``):

    * class id :math:`y`: :math:`q = (1-\varepsilon)\,w_y e_y + \tfrac{\varepsilon}{C} w`,
      where :math:`w` = ``weight`` (ones if None), :math:`\varepsilon` =
      ``label_smoothing``; without options, :math:`\ell = -\log p_y` and the
      gradient is the tutorial's :math:`p - y`;
    * probability target :math:`t`: :math:`q = w \odot ((1-\varepsilon)\,t + \tfrac{\varepsilon}{C})`.

    Reductions: ``"none"`` returns per-example losses (batch shape);
    ``"sum"`` their sum; ``"mean"`` their sum divided by the number of counted
    examples, or, for class ids with ``weight``, by :math:`\sum_n w_{y_n}` over
    counted examples (PyTorch). Probability targets with ``weight`` divide by
    the count (PyTorch). With per-example weights :math:`s_n`
    (``sample_weight``): ``"none"`` gives :math:`s_n \ell_n`, ``"sum"``
    :math:`\sum_n s_n \ell_n`, ``"mean"`` :math:`\sum_n s_n \ell_n / \sum_n s_n w_{y_n}`
    over counted examples (:math:`w_{y_n} = 1` without class weights).

    Args:
      logits: floating array ``[..., C, ...]``; any number of batch axes.
      labels: class ids (any integer dtype) of ``logits.shape`` without
        ``axis``; or probability targets (floating) of ``logits.shape``.
      axis: class axis, or tuple of axes whose product is the class set (a
        class id is then the row-major flat index over them, in the order
        given). Need not be last.
      where: boolean mask of the batch shape (``logits.shape`` without
        ``axis``): examples where it is False contribute exactly 0 to the
        loss and get exactly 0 gradient, even if their logits are NaN.
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
      ignore_index: class id marking examples to skip; -100 (default) as in
        PyTorch, TRL and Hugging Face's data collators; None: every label is
        a class id. Class-id labels only (probability labels ignore the default).

        .. versionchanged:: 0.2.0
           The default was None, which scored -100 labels as out of range (NaN).
      sample_weight: per-example weights of the batch shape, floating;
        constants like ``weight`` (no gradient). They multiply each example's
        loss (z-loss included) and its share of the ``"mean"`` denominator;
        the aux outputs are not weighted. Combine with ``where`` and
        ``ignore_index``, which still decide what is counted: an example
        they exclude contributes exactly 0 whatever its weight, NaN
        included. Weights may be negative (advantages); ``"mean"`` then
        divides by their signed sum, which is ``+-inf`` or NaN where the
        counted weights sum to 0 (use ``"sum"`` and a normalizer of your own
        for signed weights).
      weight: per-class weights ``[C]``, floating; treated as constants (no
        gradient flows to them, as in PyTorch).
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      z_loss: :math:`\lambda \ge 0`, adds :math:`\lambda\,\mathrm{lse}^2` per
        counted example (PaLM, T5X). Not multiplied by class weights.
      logit_softcap: ``cap > 0``: logits become ``cap * tanh(logits / cap)``
        before the softmax (Gemma 2); the gradient includes the chain rule.
      temperature: :math:`T > 0`: the softmax is of ``softcap(z) / T``
        (Liger-Kernel's scaled cross-entropy; the gradient gains ``1 / T``).
        The four float options may be traced values (a schedule under
        ``jit`` compiles once); they are constants for differentiation.
      return_aux: also return a :class:`LossAux` (per-example ``lse`` and
        z-loss, accuracy, count), computed in the same pass.
      derivative: ``"vjp"`` (default): a ``jax.custom_vjp`` that saves one
        logits-sized array and one float per example; fastest and leanest
        for ``jax.grad``. The array is the logits on GPU and TPU and, on CPU,
        where an ``exp`` costs more than a pass over memory, ``exp(z - max)``
        for logits in their compute dtype of up to 8192 classes without soft
        cap or label smoothing (the backward then needs no ``exp``); either
        way the gradient can be written in its place. Everything but forward mode through the loss itself
        works with it, including ``jax.hessian`` and Hessian-vector products
        ``jax.jvp(jax.grad(f), ...)`` (they differentiate the backward rule,
        which is ordinary JAX). ``"jvp"``: the same analytic derivative as a
        ``jax.custom_jvp``; needed for ``jax.jvp``, ``jax.jacfwd`` and
        ``jax.linearize`` of the loss. Reverse mode then keeps
        ``softmax``-sized intermediates.
      num_classes: the number of real classes :math:`C` when the class axis
        is padded (a vocabulary padded to divide a mesh or to a multiple of
        128): columns at or beyond it, counted over all shards, are left out
        of the softmax, the smoothing, the class weights and the argmax, and
        get exactly 0 gradient; labels must lie in ``[0, num_classes)``.
        None: every column is a class.
      axis_name: mesh axis (inside ``jax.shard_map``) over which the class
        axis is split; ``logits`` is then the local slice, ``labels`` hold
        global class ids and ``weight`` is the local slice of the class
        weights. Communication: one ``pmax`` and one ``psum`` of a few floats
        per example.
      batch_axis_name: mesh axes over which the examples are split: ``"sum"``
        and ``"mean"`` then reduce over all shards, and the mean's denominator
        counts global examples.
      check_labels: raise an error naming the first counted label outside
        ``[0, C)`` (its flat index and value) instead of returning NaN. Works
        eagerly (a ``ValueError``), under ``jit`` and under ``checkify``
        (where the error comes from a host callback and arrives as the
        runtime error JAX raises, carrying the same message). Cost: one
        host callback per call, which also waits for the labels (measured
        on the documentation's performance page).

    Returns:
      The loss: a scalar for ``"mean"``/``"sum"``, the batch shape for
      ``"none"``; float32 for 16-bit or float32 logits, float64 for float64.
      With ``return_aux``: ``(loss, aux)``. Gradients come back in the dtype
      of ``logits`` (and of probability ``labels``).

    Raises:
      TypeError: non-floating ``logits`` or ``weight``; ``labels`` neither
        integer nor floating; non-boolean ``where``; non-static options.
      ValueError: ``labels``/``where``/``weight`` of the wrong shape,
        ``axis`` out of range or with no classes, an unknown ``reduction``
        or ``derivative``, options out of range, ``ignore_index`` with
        probability targets, a class axis split inside ``shard_map`` without
        ``axis_name``; with ``check_labels``, an out-of-range label.

    Note:
      Logits of ``-inf`` (masked vocabulary) are allowed: the loss stays
      finite while the target's logit is finite (for probability targets,
      ``0 * log 0 = 0``). A NaN or ``+inf`` logit in a counted example makes
      its loss and gradient NaN. A counted class id outside ``[0, C)`` gives
      NaN (PyTorch raises; a plausible number would hide the bug). When
      nothing is counted, ``"mean"`` gives 0 with zero gradient (PyTorch:
      NaN). A traced float option outside its range gives NaN (a concrete
      one raises ``ValueError``). Labels may have any integer dtype; an
      ``ignore_index`` that their dtype cannot hold matches nothing. With
      x64 disabled, JAX converts int64 labels to int32 on entry, which wraps
      values of :math:`2^{31}` and more: host (NumPy) labels are checked for
      this and raise ``ValueError``; device arrays and traced labels cannot
      be, and get what the wrapped value names.

      Options other than the three floats and the arrays select the compiled
      program: they must be static, hashable Python values (a traced or
      unhashable one raises ``TypeError`` naming it).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxsce
      >>> logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]], jnp.float32)
      >>> labels = jnp.array([0, 1], jnp.int32)
      >>> jaxsce.cross_entropy(logits, labels)
      Array(0.3185..., dtype=float32)
      >>> g = jax.grad(jaxsce.cross_entropy)(logits, labels)  # (p - y) / N
      >>> bool(jnp.allclose(g, (jax.nn.softmax(logits) - jnp.eye(3, dtype=jnp.float32)[labels]) / 2))
      True
    """
    _labels.check_host_labels(labels)
    static = dict(
        axis=axis,
        **_options.shared(
            reduction=reduction,
            ignore_index=ignore_index,
            return_aux=return_aux,
            derivative=derivative,
            axis_name=axis_name,
            batch_axis_name=batch_axis_name,
            check_labels=check_labels,
            num_classes=num_classes,
        ),
    )
    fl = _options.floats(
        label_smoothing=label_smoothing, z_loss=z_loss, logit_softcap=logit_softcap, temperature=temperature
    )
    args = (logits, labels, where, weight, sample_weight, fl)
    return _options.run(_cross_entropy, args, static)


@_front.implementation
def _cross_entropy(
    logits,
    labels,
    where,
    weight,
    sample_weight,
    fl: _options.Floats,
    *,
    axis,
    reduction,
    ignore_index,
    return_aux,
    derivative,
    axis_name,
    batch_axis_name,
    check_labels,
    num_classes,
):
    logits = _validate.check_floating(logits, "logits")
    z, batch_shape, flatten = _validate.class_rows(logits, axis, "logits")
    n, local_classes = z.shape
    num_classes, padding = _options.class_count(num_classes, local_classes, axis_name, "the logits' class axis")

    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        soft = False
        if labels.shape != batch_shape:
            raise ValueError(
                f"integer labels have shape {labels.shape}, but logits of shape "
                f"{logits.shape} with class axis {axis} need shape {batch_shape}."
            )
        _spmd.check_split_axes("logits", logits, labels, "labels", axis_name, batch_axis_name)
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        soft = True
        if labels.shape != logits.shape:
            raise ValueError(
                f"probability labels (dtype {labels.dtype}) have shape {labels.shape}, "
                f"but must have the logits' shape {logits.shape}."
            )
        if ignore_index not in (None, _labels.DEFAULT_IGNORE_INDEX):
            raise ValueError("ignore_index applies to class-id labels only, got probability labels.")
    else:
        raise TypeError(
            f"labels must be integer class ids or floating probabilities, got "
            f"dtype {labels.dtype} with shape {labels.shape}."
        )

    if soft:
        target = flatten(labels)
    else:
        target = labels.reshape(n)
    valid = _front.counted(where, batch_shape, "the batch shape: logits.shape without axis")
    if not soft:
        target, valid = _labels.label_validity(target, num_classes, valid, ignore_index, check_labels)
    class_weight = None if weight is None else _options.check_class_weight(weight, local_classes)
    class_weight = _options.real_class_weight(class_weight, padding, axis_name)

    ct = _validate.compute_dtype(z.dtype)
    sw = _options.sample_weights(sample_weight, batch_shape, "the batch shape: logits.shape without axis", ct)
    fl = _options.in_dtype(fl, ct)
    opts = _options.make_options(
        fl,
        num_classes=num_classes,
        soft=soft,
        axis_name=axis_name,
        return_aux=return_aux,
        is_unchecked=_spmd.unchecked(axis_name),
        padded=padding is not None,
    )
    kernel = _logit_ce.ce_vjp if derivative == "vjp" else _logit_ce.ce_jvp
    outputs = kernel(z, target, valid, class_weight, opts)
    return _reduce.finish_cross_entropy(
        outputs,
        valid,
        fl.z_loss,
        reduction,
        sample_weight=sw,
        return_aux=return_aux,
        batch_axis_name=batch_axis_name,
        batch_shape=batch_shape,
    )
