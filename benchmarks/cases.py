"""The implementations compared in each section of the main job, and the sections' runs.

Each ``bench_*`` function times every implementation of its section side by
side in one process (``timing.interleaved``) and returns ``timing.Row``s.
Adding a section means adding a function here and its title in ``report``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxsce

from .timing import (
    Row,
    _block,
    _gradient,
    _measured_row,
    compiled_bytes_accessed,
    compiled_temp_mib,
    grad_tolerance,
    interleaved,
    max_diff,
    temp_mib,
)

try:
    import optax
except ImportError:  # pragma: no cover - optax is in the bench extra
    optax = None
# torch's OpenMP threads spin after each op by default, stealing the cores
# from the JAX call timed next; passive waiting keeps interleaving fair.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
    import torch
except ImportError:
    torch = None


def naive_loss(x, y):
    """The tutorial: exp(x) / sum(exp(x)), -log p[y], mean."""
    e = jnp.exp(x.astype(jnp.float32))
    p = e / jnp.sum(e, axis=-1, keepdims=True)
    return -jnp.mean(jnp.log(jnp.take_along_axis(p, y[:, None], axis=-1)))


def stable_loss(x, y):
    logp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def logit_impls() -> dict[str, Callable]:
    impls = {
        "jaxsce (vjp)": lambda x, y: jaxsce.cross_entropy(x, y),
        "jaxsce (jvp)": lambda x, y: jaxsce.cross_entropy(x, y, derivative="jvp"),
        "autodiff naive": naive_loss,
        "autodiff stable": stable_loss,
    }
    if optax is not None:
        impls["optax"] = lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()
    return {k: jax.jit(jax.value_and_grad(f)) for k, f in impls.items()}


def fused_impls(mode: str = "grad") -> dict[str, Callable]:
    """``mode="grad"``: value_and_grad wrt (h, W) of ``f(h, w, y)``.
    ``mode="jvp"``: ``jax.jvp`` wrt (h, W) in the direction (th, tw), called
    as ``f(h, w, y, th, tw)``; jaxsce then uses ``derivative="jvp"``."""
    derivative = "jvp" if mode == "jvp" else "vjp"
    impls = {
        "jaxsce fused": lambda h, w, y: jaxsce.linear_cross_entropy(h, w, y, derivative=derivative),
        "plain h@W + jaxsce": lambda h, w, y: jaxsce.cross_entropy(h @ w, y, derivative=derivative),
        "plain h@W + autodiff naive": lambda h, w, y: naive_loss(h @ w, y),
    }
    if optax is not None:
        impls["plain h@W + optax"] = lambda h, w, y: optax.softmax_cross_entropy_with_integer_labels(h @ w, y).mean()
    if mode == "grad":
        return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for k, f in impls.items()}

    def forward(f):
        return lambda h, w, y, th, tw: jax.jvp(lambda h, w: f(h, w, y), (h, w), (th, tw))

    return {k: jax.jit(forward(f)) for k, f in impls.items()}


def torch_logit(x_np, y_np):
    x = torch.tensor(x_np, requires_grad=True)
    y = torch.tensor(y_np, dtype=torch.long)

    def step():
        x.grad = None
        loss = torch.nn.functional.cross_entropy(x, y)
        loss.backward()
        return loss, x.grad

    return step


def torch_fused(h_np, w_np, y_np, native: bool):
    """torch's loss head: ``h @ W`` then ``F.cross_entropy``, or (``native``) its
    chunked ``F.linear_cross_entropy`` (torch >= 2.13), which takes the weight
    as ``[V, d]``."""
    h = torch.tensor(h_np, requires_grad=True)
    w = torch.tensor(np.ascontiguousarray(w_np.T) if native else w_np, requires_grad=True)
    y = torch.tensor(y_np, dtype=torch.long)
    options = torch.nn.LinearCrossEntropyOptions() if native else None

    def step():
        h.grad = w.grad = None
        if native:
            loss = torch.nn.functional.linear_cross_entropy(h, w, y, options=options)
        else:
            loss = torch.nn.functional.cross_entropy(h @ w, y)
        loss.backward()
        return loss, (h.grad, w.grad.T if native else w.grad)

    return step


def has_torch_linear_cross_entropy() -> bool:
    return torch is not None and hasattr(torch.nn.functional, "linear_cross_entropy")


def block_matmuls(tokens: int, d: int, vocab: int, dtype) -> Callable:
    """The fused single-pass path's matmuls alone, in its own blocks.

    ``linear_cross_entropy`` (mean) walks token blocks of the size
    ``sum_path_token_block`` picks and does three matmuls per block: the
    logits ``h_b @ W``, ``d_h_b = ds @ W^T`` and ``d_W += h_b^T @ ds``. This
    does the same three with ``ds`` = the logits block and nothing between:
    the time the fused path cannot go below on this machine.
    """
    from jaxsce._engine import _stream

    narrow = _stream.is_narrow_float(jnp.dtype(dtype))
    tb = _stream.sum_path_token_block(tokens, d, vocab, _stream.DEFAULT_MEMORY_BUDGET, None, narrow)
    tb = tb or tokens
    blocks = -(-tokens // tb)

    def run(h, w):
        h_t = h.T

        def body(i, carry):
            dh, dw = carry
            t0 = jnp.minimum(i * tb, tokens - tb)
            hb = jax.lax.dynamic_slice_in_dim(h, t0, tb)
            z = jnp.dot(hb, w, preferred_element_type=jnp.float32)
            dh = jax.lax.dynamic_update_slice_in_dim(dh, jnp.dot(z, w.T.astype(jnp.float32)), t0, 0)
            dw = dw + jnp.dot(jax.lax.dynamic_slice_in_dim(h_t, t0, tb, axis=1).astype(jnp.float32), z)
            return dh, dw

        init = (jnp.zeros((tokens, d), jnp.float32), jnp.zeros((d, vocab), jnp.float32))
        return jax.lax.fori_loop(0, blocks, body, init)

    return jax.jit(run)


def _section(
    section, shape, impls, args, repeats, progress, *, peer, ref, tol, tokens, extra_calls=None, rates=None, logits=None
):
    """Times every implementation of one case side by side and returns its rows.

    ``impls`` are jitted JAX functions of ``args`` returning ``(value, grad)``;
    ``extra_calls`` are further timed calls (torch peers, returning tensors,
    and roofline calls whose names start with ``"roofline"``). ``ref`` names
    the implementation whose derivative the others are compared with, and
    ``peer`` the one the time ratio is taken to. ``rates(times, median_ms)``
    returns ``(ratio to the roofline, extra fields)`` for a row. ``logits``: the
    case's number of logits, to report XLA's estimate of the bytes accessed per
    logit (``compiled_bytes_accessed``) of each JAX implementation.
    """
    # Compiled once, ahead of time: the same executable is timed and its
    # memory read (compiling each case twice dominated the small default run).
    compiled = {k: f.lower(*args).compile() for k, f in impls.items()}
    calls = {k: (lambda c=c: c(*args)) for k, c in compiled.items()}
    calls.update(extra_calls or {})
    times = interleaved(calls, repeats, _block, progress)
    roofs = {k: float(np.median(times.pop(k))) for k in list(times) if k.startswith("roofline")}
    expected = calls[ref]()[1]
    peer_ms = np.median(times[peer]) if peer in times else None
    rows = []
    for name, t in times.items():
        is_torch = name.startswith("torch")
        roof, extra = rates(roofs, float(np.median(t))) if rates else (None, {})
        if logits and name in compiled:
            accessed = compiled_bytes_accessed(compiled[name])
            extra = dict(extra, bytes_per_logit=None if accessed is None else accessed / logits)
        rows.append(
            _measured_row(
                section,
                name,
                shape,
                args[0].dtype,
                t,
                tokens,
                peer_ms=peer_ms,
                roofline=roof,
                temp=None if is_torch else compiled_temp_mib(compiled[name]),
                diff=max_diff(_gradient(calls[name], is_torch), expected),
                tol=tol(expected),
                extra=extra,
            )
        )
    return rows


def _matmul_rates(t_, d, v):
    """``rates`` for the fused-family sections: the FLOP rate (6 T d V: the
    logits, ``d_hidden`` and ``d_W``, or in forward mode the logits and the two
    tangent products) over one ``h @ W``'s, and the ratio to the fused path's
    own block matmuls where they were timed."""
    flops = 6 * t_ * d * v

    def rates(roofs, ms):
        matmul_rate = 2 * t_ * d * v / (roofs["roofline: h@W matmul"] / 1e3)
        extra = {"gflops_6TdV": flops / (ms / 1e3) / 1e9, "matmul_gflops": matmul_rate / 1e9}
        blocks = roofs.get("roofline: fused path's block matmuls")
        if blocks is not None:
            extra["block_matmuls_ms"] = blocks
            extra["ratio_to_block_matmuls"] = ms / blocks
        return flops / (ms / 1e3) / matmul_rate, extra

    return rates


def _matmul_call(h, w) -> dict:
    """The ``h @ W`` roofline call of a case."""
    matmul = jax.jit(lambda h, w: h @ w)
    return {"roofline: h@W matmul": lambda: matmul(h, w)}


def _normal(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, dtype)


def bench_logits(shapes, dtype, repeats, progress) -> list[Row]:
    rows = []
    impls = logit_impls()
    for n, v in shapes:
        rng = np.random.default_rng(0)
        x = _normal(rng, (n, v), dtype)
        y = jnp.asarray(rng.integers(0, v, size=n), jnp.int32)
        roof = jax.jit(jnp.exp)
        row_max = jax.jit(lambda x: jnp.max(x, axis=-1))
        extra = {
            "roofline: exp over logits": lambda x=x, roof=roof: roof(x),
            "roofline: row max": lambda x=x, row_max=row_max: row_max(x),
        }
        if torch is not None and dtype == jnp.float32:
            extra["torch F.cross_entropy"] = torch_logit(np.asarray(x), np.asarray(y))

        def rates(roofs, ms):
            # An overflow-safe loss must know each row's max before its exps
            # (a read pass) and exponentiate every logit into a fresh buffer
            # (the gradient's, or a residual's): exp + max is its floor.
            exp_ms, max_ms = roofs["roofline: exp over logits"], roofs["roofline: row max"]
            return ms / exp_ms, {
                "roofline_ms": exp_ms,
                "row_max_ms": max_ms,
                "ratio_to_exp_and_max": ms / (exp_ms + max_ms),
            }

        rows += _section(
            "logits", f"{n}x{v}", impls, (x, y), repeats, progress, peer="optax", ref="autodiff naive",
            tol=grad_tolerance, tokens=n, extra_calls=extra, rates=rates, logits=n * v,
        )  # fmt: skip
    return rows


def step_impls() -> dict[str, Callable]:
    """A training step's loss head: value_and_grad wrt (h, W) of ``loss(h @ W, y)``."""
    impls = {
        "jaxsce": lambda h, w, y: jaxsce.cross_entropy(h @ w, y),
        "autodiff naive": lambda h, w, y: naive_loss(h @ w, y),
    }
    if optax is not None:
        impls["optax"] = lambda h, w, y: optax.softmax_cross_entropy_with_integer_labels(h @ w, y).mean()
    return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for k, f in impls.items()}


def _step_matmuls(h, w) -> dict:
    """The step's three matmuls alone (``z = h @ W`` into a fresh buffer, then
    ``z @ W^T`` and ``h^T @ z``): what any loss head adds its passes to."""
    matmuls = jax.jit(lambda h, w: (lambda z: (z @ w.T, h.T @ z))(h @ w))
    return {"roofline: the step's matmuls": lambda: matmuls(h, w)}


def _over_matmuls(roofs, ms):
    mm = roofs["roofline: the step's matmuls"]
    return ms / mm, {"matmuls_ms": mm, "loss_ms": ms - mm}


def bench_step(shapes, d, dtype, repeats, progress) -> list[Row]:
    """The logit-level loss inside a training step (the logits are an intermediate)."""
    rows = []
    impls = step_impls()
    for n, v in shapes:
        rng = np.random.default_rng(0)
        args = (
            _normal(rng, (n, d), dtype),
            _normal(rng, (d, v), dtype, 1 / math.sqrt(d)),
            jnp.asarray(rng.integers(0, v, size=n), jnp.int32),
        )
        part = _section(
            "step", f"{n}x{d}x{v}", impls, args, repeats, progress, peer="optax", ref="autodiff naive",
            tol=lambda g: 10 * grad_tolerance(g), tokens=n, extra_calls=_step_matmuls(*args[:2]), rates=_over_matmuls,
        )  # fmt: skip
        peer_temp = next((r.temp_mib for r in part if r.impl == "optax"), None)
        for r in part:
            r.extra["temp_ratio_to_optax"] = None if not peer_temp else r.temp_mib / peer_temp
        rows += part
    return rows


def bench_fused(shapes, dtype, repeats, progress, mode: str = "grad") -> list[Row]:
    """Fused vs plain ``h @ W``; ``mode`` as in :func:`fused_impls` (section "fused" or "forward")."""
    rows = []
    impls = fused_impls(mode)
    for t_, d, v in shapes:
        rng = np.random.default_rng(0)
        h = _normal(rng, (t_, d), dtype)
        w = _normal(rng, (d, v), dtype, 1 / math.sqrt(d))
        y = jnp.asarray(rng.integers(0, v, size=t_), jnp.int32)
        args = (h, w, y)
        if mode == "jvp":
            args += (_normal(rng, (t_, d), dtype), _normal(rng, (d, v), dtype, 1 / d))
        extra = _matmul_call(h, w)
        if mode == "grad":
            blocks = block_matmuls(t_, d, v, dtype)
            extra["roofline: fused path's block matmuls"] = lambda h=h, w=w, blocks=blocks: blocks(h, w)
            if torch is not None and dtype == jnp.float32:
                hn, wn, yn = np.asarray(h), np.asarray(w), np.asarray(y)
                extra["torch h@W + F.cross_entropy"] = torch_fused(hn, wn, yn, native=False)
                if has_torch_linear_cross_entropy():
                    extra["torch F.linear_cross_entropy (chunked)"] = torch_fused(hn, wn, yn, native=True)

        part = _section(
            "fused" if mode == "grad" else "forward", f"{t_}x{d}x{v}", impls, args, repeats, progress,
            peer="plain h@W + jaxsce", ref="plain h@W + autodiff naive", tokens=t_, extra_calls=extra,
            tol=lambda g: 10 * grad_tolerance(g, jnp.dtype(dtype).itemsize <= 2),  # a tangent is float32
            rates=_matmul_rates(t_, d, v), logits=t_ * v,
        )  # fmt: skip
        native = next((r.median_ms for r in part if r.impl.startswith("torch F.linear_cross_entropy")), None)
        for r in part:
            r.extra["ratio_to_torch_linear_cross_entropy"] = None if native is None else r.median_ms / native
        rows += part
    return rows


def memory_table(d, vocab, tokens, dtype) -> list[dict]:
    """Compile-only temporary memory of value_and_grad, fused vs plain."""
    out = []
    dt = jnp.dtype(dtype)
    for t_ in tokens:
        h = jax.ShapeDtypeStruct((t_, d), dt)
        w = jax.ShapeDtypeStruct((d, vocab), dt)
        y = jax.ShapeDtypeStruct((t_,), jnp.int32)
        fused = jax.jit(jax.value_and_grad(lambda h, w, y: jaxsce.linear_cross_entropy(h, w, y), argnums=(0, 1)))
        plain = jax.jit(jax.value_and_grad(lambda h, w, y: jaxsce.cross_entropy(h @ w, y), argnums=(0, 1)))
        out.append(
            dict(
                tokens=t_,
                d=d,
                vocab=vocab,
                dtype=dt.name,
                fused_temp_mib=temp_mib(fused, h, w, y),
                plain_temp_mib=temp_mib(plain, h, w, y),
            )
        )
    return out


# --- post-training: policy-gradient objective through the LM head ------------------


POLICY_PEER = "plain h@W + log_softmax (autodiff)"
DISTILL_PEER = "plain matmuls + log_softmax (autodiff)"
POLICY_LENGTH = 256  # tokens per completion
BETA = 0.04


def _grpo_terms(lp, lp_ref, a, old, mask):
    """DAPO's clipped objective with a k3 KL penalty, written out as a user would (TRL's formula)."""
    r = jnp.exp(lp - old)
    adv = a[:, None]
    pg = -jnp.minimum(r * adv, jnp.clip(r, 0.8, 1.2) * adv)
    x = lp_ref - lp
    loss = pg + BETA * (jnp.exp(x) - x - 1)
    m = mask.astype(lp.dtype)
    return jnp.sum(loss * m) / jnp.maximum(jnp.sum(m), 1)


def policy_impls(fused_reference: bool) -> dict[str, Callable]:
    """value_and_grad wrt (h, W) of DAPO with beta = 0.04: the reference's log-probabilities given
    (args ``h, w, y, a, old, mask, ref_lp``), or from the reference's head (``..., h_ref, w_ref``)."""

    def plain(h, w, y, a, old, mask, *ref):
        ls = jax.nn.log_softmax(h @ w, axis=-1)
        lp = jnp.take_along_axis(ls, y[..., None], axis=-1)[..., 0]
        if fused_reference:
            h_ref, w_ref = ref
            ls_ref = jax.nn.log_softmax(jax.lax.stop_gradient(h_ref @ w_ref), axis=-1)
            lp_ref = jnp.take_along_axis(ls_ref, y[..., None], axis=-1)[..., 0]
        else:
            (lp_ref,) = ref
        return _grpo_terms(lp, lp_ref, a, old, mask)

    def by_hand(h, w, y, a, old, mask, *ref):
        lp = jaxsce.linear_log_probs(h, w, y)
        lp_ref = jaxsce.linear_log_probs(*ref, y) if fused_reference else ref[0]
        return _grpo_terms(lp, jax.lax.stop_gradient(lp_ref), a, old, mask)

    def fused(h, w, y, a, old, mask, *ref):
        refs = dict(ref_hidden=ref[0], ref_weight=ref[1]) if fused_reference else dict(ref_log_probs=ref[0])
        return jaxsce.linear_policy_loss(h, w, y, a, where=mask, old_log_probs=old, beta=BETA, loss_type="dapo", **refs)

    impls = {
        "jaxsce linear_policy_loss": fused,
        "jaxsce linear_log_probs + GRPO by hand": by_hand,
        POLICY_PEER: plain,
    }
    return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for k, f in impls.items()}


def _head_case(t_, d, v, dtype, heads: int):
    """``heads`` pairs (hidden ``[T, d]``, weight ``[d, V]``), as a flat tuple."""
    rng = np.random.default_rng(0)
    out = ()
    for _ in range(heads):
        out += (_normal(rng, (t_, d), dtype), _normal(rng, (d, v), dtype, 1 / math.sqrt(d)))
    return out, rng


def liger_grpo():
    """Liger-Kernel's chunked ``LigerFusedLinearGRPOLoss`` (pure torch: runs on CPU), or None if not installed."""
    if torch is None:
        return None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    return LigerFusedLinearGRPOLoss


def _liger_call(grpo, args, fused_reference: bool, compiled: bool):
    """Liger's step on the same data; its weight is ``[V, d]`` and its gradient is returned as ``[d, V]``."""
    h, w, y, a, old, mask, *ref = (np.asarray(x) for x in args)
    module = grpo(beta=BETA, compiled=compiled, chunk_size=1, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2)
    ht = torch.tensor(h, requires_grad=True)
    wt = torch.tensor(np.ascontiguousarray(w.T), requires_grad=True)
    fixed = (torch.tensor(y).long(), torch.tensor(mask).long(), torch.tensor(a))
    kw = dict(old_per_token_logps=torch.tensor(old))
    if fused_reference:
        kw.update(ref_input=torch.tensor(ref[0]), ref_weight=torch.tensor(np.ascontiguousarray(ref[1].T)))
    else:
        kw.update(ref_per_token_logps=torch.tensor(ref[0]))

    def step():
        ht.grad = wt.grad = None
        loss, _ = module(ht, wt, *fixed, **kw)
        loss.backward()
        return loss, (ht.grad, wt.grad.T)

    return step


def bench_policy(shapes, dtype, repeats, progress, *, fused_reference: bool = False, liger_compiled: bool = False):
    """DAPO (beta = 0.04) from the head: jaxsce's fused loss, the same objective by hand on
    ``linear_log_probs``, plain autodiff, and Liger-Kernel's fused GRPO where installed (float32)."""
    rows = []
    impls = policy_impls(fused_reference)
    grpo = liger_grpo() if dtype == jnp.float32 else None
    for t_, d, v in shapes:
        length = min(POLICY_LENGTH, t_)
        b = t_ // length
        (h, w), rng = _head_case(t_, d, v, dtype, 1)
        h = h.reshape(b, length, d)
        y = jnp.asarray(rng.integers(0, v, size=(b, length)), jnp.int32)
        a = jnp.asarray(rng.normal(size=b), jnp.float32)
        base = -math.log(v)
        old = jnp.asarray(base + 0.1 * rng.normal(size=(b, length)), jnp.float32)
        mask = jnp.asarray(rng.uniform(size=(b, length)) < 0.9)
        if fused_reference:
            ref = (_normal(rng, (b, length, d), dtype), _normal(rng, (d, v), dtype, 1 / math.sqrt(d)))
        else:
            ref = (jnp.asarray(base + 0.1 * rng.normal(size=(b, length)), jnp.float32),)
        args = (h, w, y, a, old, mask) + ref
        extra = _matmul_call(h.reshape(t_, d), w)
        if grpo is not None:
            extra[LIGER] = _liger_call(grpo, args, fused_reference, liger_compiled)
        part = _section(
            "policy_ref" if fused_reference else "policy", f"{b}x{length}x{d}x{v}", impls, args, repeats,
            progress, peer=POLICY_PEER, ref=POLICY_PEER, tol=lambda g: 10 * grad_tolerance(g), tokens=t_,
            extra_calls=extra, rates=_passes(3 + fused_reference),
        )  # fmt: skip
        _liger_ratios(part, LIGER, 3 + fused_reference)
        rows += part
    return rows


LIGER = "torch Liger-Kernel LigerFusedLinearGRPOLoss (chunked)"


def _liger_ratios(part: list[Row], liger: str, passes: int) -> None:
    """Adds each row's time over Liger-Kernel's (``liger``, None when it did not run) and the floor of
    that ratio: no fused loss can go below its ``passes`` matmul passes."""
    liger_ms = next((r.median_ms for r in part if r.impl == liger), None)
    floor_ms = passes * part[0].extra["matmul_ms"]
    for r in part:
        r.extra["ratio_to_liger"] = None if liger_ms is None else r.median_ms / liger_ms
        r.extra["floor_ratio_to_liger"] = None if liger_ms is None else floor_ms / liger_ms


def _passes(n: int):
    """``rates``: time over ``n`` ``h @ W`` matmuls (a fused loss's floor: its matmul passes)."""

    def rates(roofs, ms):
        matmul = roofs["roofline: h@W matmul"]
        return ms / (n * matmul), {"matmul_ms": matmul}

    return rates


# --- distillation: KL between a student's and a teacher's head ----------------------


def distill_impls() -> dict[str, Callable]:
    """value_and_grad wrt the student's (h, W) of the mean KL(P_t || P_s) of two heads."""

    def autodiff(hs, ws, ht, wt):
        ls = jax.nn.log_softmax(hs @ ws, axis=-1)
        lt = jax.nn.log_softmax(jax.lax.stop_gradient(ht @ wt), axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1))

    impls = {
        "jaxsce linear_distillation_loss": lambda hs, ws, ht, wt: jaxsce.linear_distillation_loss(hs, ws, ht, wt),
        "plain matmuls + jaxsce.distillation_loss": lambda hs, ws, ht, wt: jaxsce.distillation_loss(hs @ ws, ht @ wt),
        DISTILL_PEER: autodiff,
    }
    return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for k, f in impls.items()}


def _four_matmuls(roofs, ms):
    """Distillation's floor: 4 matmul passes (both heads' logits, d_hidden, d_W)."""
    return ms / (4 * roofs["roofline: h@W matmul"]), {"matmul_ms": roofs["roofline: h@W matmul"]}


def bench_distill(shapes, dtype, repeats, progress) -> list[Row]:
    rows = []
    impls = distill_impls()
    for t_, d, v in shapes:
        args, _ = _head_case(t_, d, v, dtype, 2)
        rows += _section(
            "distill", f"{t_}x{d}x{v}", impls, args, repeats, progress,
            peer=DISTILL_PEER, ref=DISTILL_PEER, tol=lambda g: 10 * grad_tolerance(g), tokens=t_,
            extra_calls=_matmul_call(args[0], args[1]), rates=_four_matmuls,
        )  # fmt: skip
    return rows


# --- preference optimization: DPO through the LM head ---------------------------------

PREFERENCE_PEER = "plain h@W + log_softmax (autodiff)"
PREFERENCE_LIGER = "torch Liger-Kernel LigerFusedLinearDPOLoss (chunked)"
DPO_BETA = 0.1


def _dpo_by_hand(c, r, ref_c, ref_r):
    """DPO's sigmoid loss from sequence log-probabilities, as a user writes it (TRL's formula)."""
    z = DPO_BETA * ((c - ref_c) - (r - ref_r))
    return -jnp.mean(jax.nn.log_sigmoid(z))


def preference_impls() -> dict[str, Callable]:
    """value_and_grad wrt (chosen hidden, rejected hidden, W) of DPO (sigmoid) with the reference's
    sequence log-probabilities given (args ``hc, hr, w, yc, yr, mc, mr, ref_c, ref_r``)."""

    def plain(hc, hr, w, yc, yr, mc, mr, ref_c, ref_r):
        def seq(h, y, m):
            ls = jax.nn.log_softmax(h @ w, axis=-1)
            return jnp.sum(jnp.take_along_axis(ls, y[..., None], axis=-1)[..., 0] * m.astype(ls.dtype), -1)

        return _dpo_by_hand(seq(hc, yc, mc), seq(hr, yr, mr), ref_c, ref_r)

    def by_hand(hc, hr, w, yc, yr, mc, mr, ref_c, ref_r):
        def seq(h, y, m):
            return jnp.sum(jnp.where(m, jaxsce.linear_log_probs(h, w, y), 0), -1)

        return _dpo_by_hand(seq(hc, yc, mc), seq(hr, yr, mr), ref_c, ref_r)

    def fused(hc, hr, w, yc, yr, mc, mr, ref_c, ref_r):
        return jaxsce.linear_preference_loss(
            hc, hr, w, yc, yr, chosen_where=mc, rejected_where=mr, ref_chosen_log_probs=ref_c,
            ref_rejected_log_probs=ref_r, beta=DPO_BETA,
        )  # fmt: skip

    impls = {
        "jaxsce linear_preference_loss": fused,
        "jaxsce linear_log_probs + DPO by hand": by_hand,
        PREFERENCE_PEER: plain,
    }
    return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))) for k, f in impls.items()}


def liger_dpo():
    """Liger-Kernel's chunked ``LigerFusedLinearDPOLoss`` (pure torch), or None if not installed."""
    if torch is None:
        return None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError:
        return None
    return LigerFusedLinearDPOLoss


def _liger_dpo_call(dpo, args, compiled: bool):
    """Liger's DPO step on the same pairs (chosen rows first, masked labels -100, no reference model:
    the benchmark's reference log-probabilities are 0, Liger's ``use_ref_model=False``)."""
    hc, hr, w, yc, yr, mc, mr, _, _ = (np.asarray(x) for x in args)
    module = dpo(beta=DPO_BETA, compiled=compiled, use_ref_model=False, chunk_size=1)
    x = torch.tensor(np.concatenate([hc, hr]), requires_grad=True)
    wt = torch.tensor(np.ascontiguousarray(w.T), requires_grad=True)
    target = torch.tensor(np.concatenate([np.where(mc, yc, -100), np.where(mr, yr, -100)])).long()
    p = hc.shape[0]

    def step():
        x.grad = wt.grad = None
        loss, _ = module(wt, x, target)
        loss.backward()
        return loss, (x.grad[:p], x.grad[p:], wt.grad.T)

    return step


def bench_preference(shapes, dtype, repeats, progress, *, liger_compiled: bool = False) -> list[Row]:
    """DPO (sigmoid) from the head over pairs of 256-token completions: jaxsce's fused loss, the same
    loss by hand on ``linear_log_probs``, plain autodiff, and Liger-Kernel's fused DPO where installed."""
    rows = []
    impls = preference_impls()
    dpo = liger_dpo() if dtype == jnp.float32 else None
    for t_, d, v in shapes:
        length = min(POLICY_LENGTH, t_ // 2)
        pairs = max(t_ // (2 * length), 1)
        rng = np.random.default_rng(0)
        hc, hr = (_normal(rng, (pairs, length, d), dtype) for _ in range(2))
        w = _normal(rng, (d, v), dtype, 1 / math.sqrt(d))
        yc, yr = (jnp.asarray(rng.integers(0, v, size=(pairs, length)), jnp.int32) for _ in range(2))
        mc, mr = (jnp.asarray(rng.uniform(size=(pairs, length)) < 0.9) for _ in range(2))
        zero = jnp.zeros((pairs,), jnp.float32)
        args = (hc, hr, w, yc, yr, mc, mr, zero, zero)
        extra = _matmul_call(jnp.concatenate([hc, hr]).reshape(-1, d), w)
        if dpo is not None:
            extra[PREFERENCE_LIGER] = _liger_dpo_call(dpo, args, liger_compiled)
        part = _section(
            "preference", f"{pairs}x2x{length}x{d}x{v}", impls, args, repeats, progress,
            peer=PREFERENCE_PEER, ref=PREFERENCE_PEER, tol=lambda g: 10 * grad_tolerance(g), tokens=2 * pairs * length,
            extra_calls=extra, rates=_passes(3),
        )  # fmt: skip
        _liger_ratios(part, PREFERENCE_LIGER, 3)
        rows += part
    return rows


# --- distillation with the hard-label term: JSD + cross-entropy, as Liger-Kernel's JSD loss ------

JSD_LIGER = "torch Liger-Kernel LigerFusedLinearJSDLoss (chunked)"
HARD, SOFT = 0.5, 0.5  # Liger-Kernel's default weight_hard_loss, weight_soft_loss


def distill_jsd_impls() -> dict[str, Callable]:
    """value_and_grad wrt the student's (h, W) of 0.5 JSD(beta 0.5) + 0.5 CE(labels), mean over tokens."""

    def autodiff(hs, ws, ht, wt, y):
        ls = jax.nn.log_softmax(hs @ ws, axis=-1)
        lt = jax.nn.log_softmax(jax.lax.stop_gradient(ht @ wt), axis=-1)
        lm = jnp.log(0.5 * jnp.exp(lt) + 0.5 * jnp.exp(ls))
        jsd = 0.5 * jnp.sum(jnp.exp(lt) * (lt - lm), -1) + 0.5 * jnp.sum(jnp.exp(ls) * (ls - lm), -1)
        ce = -jnp.take_along_axis(ls, y[:, None], axis=-1)[:, 0]
        return jnp.mean(SOFT * jsd + HARD * ce)

    def fused(hs, ws, ht, wt, y):
        return jaxsce.linear_distillation_loss(
            hs, ws, ht, wt, divergence="jsd", labels=y, hard_weight=HARD, soft_weight=SOFT
        )

    impls = {"jaxsce linear_distillation_loss (jsd + hard labels)": fused, DISTILL_PEER: autodiff}
    return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for k, f in impls.items()}


def _liger_jsd_call(args, compiled: bool):
    """Liger-Kernel's JSD step with the hard-label term, or None; its weights are ``[V, d]``."""
    if torch is None:
        return None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    hs, ws, ht, wt, y = (np.asarray(x) for x in args)
    module = LigerFusedLinearJSDLoss(weight_hard_loss=HARD, weight_soft_loss=SOFT, beta=0.5, compiled=compiled)
    h_t = torch.tensor(hs, requires_grad=True)
    w_t = torch.tensor(np.ascontiguousarray(ws.T), requires_grad=True)
    fixed = (torch.tensor(ht), torch.tensor(np.ascontiguousarray(wt.T)), torch.tensor(y).long())

    def step():
        h_t.grad = w_t.grad = None
        loss = module(h_t, w_t, *fixed)
        loss.backward()
        return loss, (h_t.grad, w_t.grad.T)

    return step


def bench_distill_jsd(shapes, dtype, repeats, progress, *, liger_compiled: bool = False) -> list[Row]:
    rows = []
    impls = distill_jsd_impls()
    for t_, d, v in shapes:
        args, rng = _head_case(t_, d, v, dtype, 2)
        args = args + (jnp.asarray(rng.integers(0, v, size=t_), jnp.int32),)
        extra = _matmul_call(args[0], args[1])
        liger = _liger_jsd_call(args, liger_compiled) if dtype == jnp.float32 else None
        if liger is not None:
            extra[JSD_LIGER] = liger
        part = _section(
            "distill_jsd", f"{t_}x{d}x{v}", impls, args, repeats, progress,
            peer=DISTILL_PEER, ref=DISTILL_PEER, tol=lambda g: 10 * grad_tolerance(g), tokens=t_,
            extra_calls=extra, rates=_four_matmuls,
        )  # fmt: skip
        _liger_ratios(part, JSD_LIGER, 4)
        rows += part
    return rows


# --- sampler-matched log-probabilities: top-k from the head ---------------------------------

SAMPLER_PEER = "plain h@W + top-k mask + log_softmax (autodiff)"
SAMPLER_K = 50


def _policy_gradient_sum(lp, a):
    """A policy-gradient objective on the log-probabilities, labels outside the kept set left out."""
    return -jnp.mean(jnp.where(jnp.isinf(lp), 0, a * lp))


def sampler_impls() -> dict[str, Callable]:
    """value_and_grad wrt (h, W) of a policy-gradient sum of the top-k (k = 50) log-probabilities."""

    def plain(h, w, y, a):
        z = h @ w
        kth = jax.lax.stop_gradient(jnp.min(jax.lax.top_k(z, SAMPLER_K)[0], axis=-1))
        masked = jnp.where(z >= kth[:, None], z, -jnp.inf)
        ls = jax.nn.log_softmax(masked, axis=-1)
        return _policy_gradient_sum(jnp.take_along_axis(ls, y[:, None], axis=-1)[:, 0], a)

    impls = {
        "jaxsce linear_log_probs(top_k=50)": lambda h, w, y, a: _policy_gradient_sum(
            jaxsce.linear_log_probs(h, w, y, top_k=SAMPLER_K), a
        ),
        "jaxsce linear_log_probs(top_k=50, batch_invariant=True)": lambda h, w, y, a: _policy_gradient_sum(
            jaxsce.linear_log_probs(h, w, y, top_k=SAMPLER_K, batch_invariant=True), a
        ),
        SAMPLER_PEER: plain,
    }
    return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for k, f in impls.items()}


def _unfiltered_calls(args) -> dict:
    """``linear_log_probs`` without a filter (the issue's yardstick), and with ``top_p`` alone and
    ``batch_invariant=True``, as timed calls whose times become each row's ratios."""
    h, w, y, a = args

    def step(**kw):
        f = jax.jit(jax.value_and_grad(lambda h, w: _policy_gradient_sum(jaxsce.linear_log_probs(h, w, y, **kw), a)))
        return lambda: f(h, w)

    return {
        "roofline: linear_log_probs": step(),
        "roofline: linear_log_probs(top_p=0.9)": step(top_p=0.9),
        "roofline: linear_log_probs(batch_invariant=True)": step(batch_invariant=True),
    }


def _over_unfiltered(roofs, ms):
    base = roofs["roofline: linear_log_probs"]
    extra = {
        "unfiltered_ms": base,
        "top_p_alone_over_unfiltered": roofs["roofline: linear_log_probs(top_p=0.9)"] / base,
        "batch_invariant_over_unfiltered": roofs["roofline: linear_log_probs(batch_invariant=True)"] / base,
    }
    return ms / base, extra


def _one_head(t_, d, v, dtype):
    """A seeded generator, hidden states ``[T, d]`` and a weight ``[d, V]`` scaled by ``1 / sqrt(d)``."""
    rng = np.random.default_rng(0)
    return rng, _normal(rng, (t_, d), dtype), _normal(rng, (d, v), dtype, 1 / math.sqrt(d))


def bench_sampler(shapes, dtype, repeats, progress) -> list[Row]:
    rows = []
    impls = sampler_impls()
    for t_, d, v in shapes:
        rng, h, w = _one_head(t_, d, v, dtype)
        y = jnp.asarray(rng.integers(0, v, size=t_), jnp.int32)
        args = (h, w, y, _normal(rng, (t_,), jnp.float32))
        rows += _section(
            "sampler", f"{t_}x{d}x{v}", impls, args, repeats, progress,
            peer=SAMPLER_PEER, ref=SAMPLER_PEER, tol=lambda g: 10 * grad_tolerance(g), tokens=t_,
            extra_calls=_unfiltered_calls(args), rates=_over_unfiltered,
        )  # fmt: skip
    return rows


# --- top-k distillation: a teacher's stored top-k log-probabilities --------------------------

TOPK_PEER = "plain h@W + log_softmax + top-k bins (autodiff)"
TOPK_K = 64


def topk_distill_impls() -> dict[str, Callable]:
    """value_and_grad wrt (h, W) of the mean forward KL on the teacher's top 64 plus the tail bin."""

    def plain(h, w, idx, lt):
        ls = jax.nn.log_softmax(h @ w, axis=-1)
        lq = jnp.take_along_axis(ls, idx, axis=-1)
        rest = jnp.ones(ls.shape, bool).at[jnp.arange(ls.shape[0])[:, None], idx].set(False)
        lq_tail = jax.nn.logsumexp(jnp.where(rest, ls, -jnp.inf), axis=-1)
        lt_tail = jnp.log(jnp.maximum(1 - jnp.sum(jnp.exp(lt), axis=-1), 0))
        kl = jnp.sum(jnp.exp(lt) * (lt - lq), -1) + jnp.exp(lt_tail) * (lt_tail - lq_tail)
        return jnp.mean(kl)

    impls = {
        "jaxsce linear_topk_distillation_loss": lambda h, w, idx, lt: jaxsce.linear_topk_distillation_loss(
            h, w, idx, lt
        ),
        "plain h@W + jaxsce.topk_distillation_loss": lambda h, w, idx, lt: jaxsce.topk_distillation_loss(
            h @ w, idx, lt
        ),
        TOPK_PEER: plain,
    }
    return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for k, f in impls.items()}


def bench_topk_distill(shapes, dtype, repeats, progress) -> list[Row]:
    rows = []
    impls = topk_distill_impls()
    for t_, d, v in shapes:
        rng, h, w = _one_head(t_, d, v, dtype)
        # A teacher's top 64 as stored offline: its log-probabilities at its own largest logits.
        zt = rng.normal(size=(t_, v)).astype(np.float32) * 2
        idx = np.argpartition(-zt, TOPK_K, axis=-1)[:, :TOPK_K]
        lse = np.log(np.sum(np.exp(zt - zt.max(-1, keepdims=True)), -1, keepdims=True)) + zt.max(-1, keepdims=True)
        lt = np.take_along_axis(zt, idx, -1) - lse
        args = (h, w, jnp.asarray(idx, jnp.int32), jnp.asarray(lt, jnp.float32))
        rows += _section(
            "topk_distill", f"{t_}x{d}x{v}", impls, args, repeats, progress,
            peer=TOPK_PEER, ref=TOPK_PEER, tol=lambda g: 10 * grad_tolerance(g), tokens=t_,
            extra_calls=_matmul_call(h, w), rates=_passes(3),
        )  # fmt: skip
    return rows
